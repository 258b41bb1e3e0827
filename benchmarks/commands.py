"""The benchmarks' subcommand of ``lsa``: ``lsa bench decode`` (benchmarks/decode.py)."""
from __future__ import annotations


def add_commands(sub) -> None:
    from benchmarks import decode

    bench = sub.add_parser("bench", help="benchmarks (writing JSON)")
    inner = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p = inner.add_parser("decode", help="long-context decode: full attention vs lsa (synthetic KV)",
                         description=decode.__doc__, formatter_class=decode.DocHelpFormatter)
    decode.add_arguments(p)
    p.set_defaults(func=decode.run_bench)
