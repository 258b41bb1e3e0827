"""The benchmarks' subcommands of ``lsa``: ``lsa bench decode`` (benchmarks/decode.py), ``lsa bench
prefill`` (benchmarks/prefill.py), ``lsa bench serve`` (benchmarks/serve.py), ``lsa bench chat``
(benchmarks/chat.py), ``lsa bench soak`` (benchmarks/soak.py), ``lsa bench hol``
(benchmarks/hol.py)."""
from __future__ import annotations


def add_commands(sub) -> None:
    from benchmarks import chat, decode, hol, prefill, serve, soak

    bench = sub.add_parser("bench", help="benchmarks (writing JSON)")
    inner = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p = inner.add_parser("decode", help="long-context decode: full attention vs lsa (synthetic KV)",
                         description=decode.__doc__, formatter_class=decode.DocHelpFormatter)
    decode.add_arguments(p)
    p.set_defaults(func=decode.run_bench)
    p = inner.add_parser("prefill", help="long prefill against its floor (matmul + flash attention rates)",
                         description=prefill.__doc__, formatter_class=decode.DocHelpFormatter)
    prefill.add_arguments(p)
    p.set_defaults(func=prefill.run_bench)
    p = inner.add_parser("serve", help="a served app: TTFT, inter-token latency, tokens/s at N sessions, and the "
                         "same workload on the engine alone", description=serve.__doc__,
                         formatter_class=decode.DocHelpFormatter)
    serve.add_arguments(p)
    p.set_defaults(func=serve.run_bench)
    p = inner.add_parser("chat", help="multi-turn chats through the openai client: KV reused across turns, TTFT",
                         description=chat.__doc__, formatter_class=decode.DocHelpFormatter)
    chat.add_arguments(p)
    p.set_defaults(func=chat.run_bench)
    p = inner.add_parser("soak", help="minutes of mixed sessions, chats and bad requests at a fixed rate: statuses, "
                         "p99 latency per window, memory at start and end", description=soak.__doc__,
                         formatter_class=decode.DocHelpFormatter)
    soak.add_arguments(p)
    p.set_defaults(func=soak.run_bench)
    p = inner.add_parser("hol", help="head-of-line blocking: TTFT of short requests behind a long prefill, against "
                         "the same on the idle server", description=hol.__doc__,
                         formatter_class=decode.DocHelpFormatter)
    hol.add_arguments(p)
    p.set_defaults(func=hol.run_bench)
