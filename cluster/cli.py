"""The ``lsa`` command line: the engine's subcommands (generate, demo, eval, ...) plus

    lsa batch JOBS --url URL --out RESULTS   run a JSONL file of long-context jobs against a server
    lsa serve [key=value ...]                a local Ray cluster serving cluster:app (blocks)
    lsa cluster-demo                         local cluster + app + a batch of long-context sessions

``batch_main`` runs ``lsa batch`` on its own (``python -m cluster.cli batch ...`` also works).
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


def batch_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lsa batch")
    configure(p)
    args = p.parse_args(argv)
    return args.func(args)


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="start a local Ray cluster serving cluster:app (Ctrl-C stops it)")
    p.add_argument("app_args", nargs="*", metavar="key=value",
                   help="application arguments, as for 'serve run cluster:app' (model=..., policy=..., "
                        "num_workers=..., kv_store_bytes=..., api_keys=...)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-cpus", type=int, default=None)
    p.set_defaults(func=run_serve)


def parse_app_args(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"lsa serve: application arguments are key=value, got {pair!r}")
        out[key] = value  # parsed by the option's type (engine/options.py)
    return out


def run_serve(args: argparse.Namespace) -> int:
    import time

    from cluster.local import local_app

    app_args = parse_app_args(args.app_args)
    try:
        with local_app(app_args, num_cpus=args.num_cpus, port=args.port, host=args.host) as url:
            print(f"lsa serve: cluster:app at {url} (OpenAI API under {url}/v1, metrics at {url}/metrics); "
                  f"Ctrl-C stops", file=sys.stderr)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("lsa serve: stopped", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cluster import demo
    from engine.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="lsa", description="lsa-serve: long-context LLM serving with "
                                     "Lookahead Sparse Attention, on one machine or a Ray cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    add_batch_parser(sub)
    add_serve_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``lsa`` console script."""
    from engine.cli import COMMANDS
    from engine.errors import LSAError

    args = build_parser().parse_args(argv)
    try:
        handler = getattr(args, "func", None) or COMMANDS[args.command]
        return handler(args)
    except LSAError as exc:
        print(f"lsa: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
