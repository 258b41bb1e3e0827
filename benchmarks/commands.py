"""The benchmarks' subcommands of ``lsa``: ``lsa bench decode`` (benchmarks/decode.py), ``lsa bench
prefill`` (benchmarks/prefill.py), ``lsa bench serve`` (benchmarks/serve.py), ``lsa bench chat``
(benchmarks/chat.py), ``lsa bench soak`` (benchmarks/soak.py), ``lsa bench hol``
(benchmarks/hol.py). Each module has ``add_arguments(parser)`` and ``run_bench(args)``; ``main``
runs one of them as ``python -m benchmarks.NAME``."""
from __future__ import annotations

import argparse
import importlib

from engine.options import HelpFormatter

BENCHMARKS = {
    "decode": "long-context decode: full attention vs lsa (synthetic KV)",
    "prefill": "long prefill against its floor (matmul + flash attention rates)",
    "serve": "a served app: TTFT, inter-token latency, tokens/s at N sessions, and the same workload on the "
             "engine alone",
    "chat": "multi-turn chats through the openai client: KV reused across turns, TTFT",
    "soak": "minutes of mixed sessions, chats and bad requests at a fixed rate: statuses, p99 latency per window, "
            "memory at start and end",
    "hol": "head-of-line blocking: TTFT of short requests behind a long prefill, against the same on the idle server",
}


class DocHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring as written, and each flag's default."""


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (writing JSON)")
    inner = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, help in BENCHMARKS.items():
        module = importlib.import_module(f"benchmarks.{name}")
        p = inner.add_parser(name, help=help, description=module.__doc__, formatter_class=DocHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run_bench)


def main(name: str, argv: list[str] | None = None) -> int:
    """``python -m benchmarks.NAME ...``: the same as ``lsa bench NAME ...``."""
    module = importlib.import_module(f"benchmarks.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=module.__doc__,
                                     formatter_class=DocHelpFormatter)
    module.add_arguments(parser)
    return module.run_bench(parser.parse_args(argv))
