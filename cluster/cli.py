"""``lsa batch``: run a JSONL file of long-context jobs against a running server.

The ``lsa`` entry point registers it with ``add_batch_parser(subparsers)``; ``main`` runs
it on its own (``python -m cluster.cli jobs.jsonl --url ... --out results.jsonl``).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from cluster.batch import JobLineError, run_batch
from cluster.client import LSAClient


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("batch", help="run a JSONL file of long-context jobs")
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", help="jobs file, one JSON object a line")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    p.add_argument("--out", required=True, help="results file (appended; re-runs resume)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--api-key", default=None)
    p.add_argument("--msgpack", action="store_true", help="send and accept msgpack bodies")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    client = LSAClient(args.url, api_key=args.api_key, msgpack=args.msgpack)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish running jobs, then exit
    try:
        s = run_batch(client, args.jobs, args.out, concurrency=args.concurrency,
                      retries=args.retries, temperature=args.temperature,
                      progress=not args.no_progress, stop=stop)
    except JobLineError as e:
        print(f"lsa batch: {e}", file=sys.stderr)
        return 2
    accuracy = "n/a" if s.accuracy is None else f"{s.accuracy:.1%} of {s.num_checked}"
    print(f"{s.succeeded} done, {s.failed} failed, {s.skipped} already done; accuracy {accuracy}")
    return 0 if s.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lsa batch")
    configure(p)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
