"""The cluster's subcommands of ``lsa``:

    lsa serve [key=value ...]                a local Ray cluster serving cluster:app (blocks)
    lsa batch JOBS --url URL --out RESULTS   run a JSONL file of long-context jobs against a server
    lsa cluster-demo                         local cluster + app + a batch of long-context sessions

Arguments are checked before anything starts (Ray takes seconds to come up): a mistake is
one line, an ``InvalidRequestError`` that ``lsa`` prints as ``lsa: error: ...``.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from engine.errors import InvalidRequestError


def add_commands(sub) -> None:
    from cluster import demo

    add_serve_parser(sub)
    add_batch_parser(sub)
    demo.add_parser(sub)


# ------------------------------------------------------------------ lsa batch


def add_batch_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("batch", help="run a JSONL file of jobs (OpenAI Batch format, or long-context jobs) "
                       "against a server",
                       description="Run a JSONL file against a running lsa-serve (cluster/batch.py): OpenAI's Batch "
                       "format (custom_id, method, url, body; results as OpenAI writes them), or long-context jobs "
                       "(each job one session, its context prefilled once, each question a turn).")
    p.add_argument("jobs", help='jobs file, one JSON object a line: {"custom_id", "method", "url", "body"} '
                   '(OpenAI Batch), or {"id", "context" | "context_file", "questions": [...], "answers": [...]}')
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    p.add_argument("--out", required=True, help="results file (appended; re-runs resume)")
    p.add_argument("--concurrency", type=int, default=4, help="jobs running at once")
    p.add_argument("--retries", type=int, default=3, help="retries of an error that can pass (429, 503, "
                   "connection); never of a 4xx")
    p.add_argument("--api-key", default=None, help="bearer token, when the server has api_keys")
    p.add_argument("--msgpack", action="store_true", help="send and accept msgpack bodies")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_batch_command)
    return p


def run_batch_command(args: argparse.Namespace) -> int:
    from cluster.batch import JobLineError, read_jobs, run_batch
    from cluster.batch_openai import is_openai_batch, read_requests
    from cluster.client import LSAClient

    if not Path(args.jobs).is_file():
        raise InvalidRequestError(f"jobs file {args.jobs} not found: give a JSONL file, one job a line "
                                  f"(see lsa batch --help)")
    if not Path(args.out).resolve().parent.is_dir():
        raise InvalidRequestError(f"cannot write results to {args.out}: its directory does not exist")
    if args.concurrency < 1 or args.retries < 0:
        raise InvalidRequestError("--concurrency must be >= 1 and --retries >= 0")
    try:
        (read_requests if is_openai_batch(args.jobs) else read_jobs)(args.jobs)  # every line, before sending
    except JobLineError as exc:
        raise InvalidRequestError(f"{exc}; fix that line and run again") from None
    client = LSAClient(args.url, api_key=args.api_key, msgpack=args.msgpack)
    wait_healthy(client, args.retries)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish running jobs, then exit
    s = run_batch(client, args.jobs, args.out, concurrency=args.concurrency, retries=args.retries,
                  temperature=args.temperature, progress=not args.no_progress, stop=stop)
    accuracy = "n/a" if s.accuracy is None else f"{s.accuracy:.1%} of {s.num_checked}"
    print(f"{s.succeeded} done, {s.failed} failed, {s.skipped} already done; accuracy {accuracy}")
    return 0 if s.failed == 0 else 1


def wait_healthy(client, retries: int) -> None:
    """Return once the server answers its health check; after ``retries`` more tries (1, 2,
    4... s apart), an error that says what to do."""
    for attempt in range(retries + 1):
        if client.healthy():
            return
        if attempt < retries:
            time.sleep(min(2 ** attempt, 8))
    raise InvalidRequestError(f"no lsa-serve answers at {client.url}: start one (lsa serve) or give its "
                              f"address with --url")


# ------------------------------------------------------------------ lsa serve


def add_serve_parser(sub) -> None:
    from actors.config import ServeConfig
    from engine.options import add_arguments

    p = sub.add_parser("serve", help="start a local Ray cluster serving cluster:app (Ctrl-C stops it)",
                       description="Start a local Ray cluster serving cluster:app; Ctrl-C stops it. Application "
                       "arguments are key=value as for 'serve run cluster:app' (model=... budget=0.1 "
                       "num_workers=2), or the flags below (--budget 0.1); both name the fields of ServeConfig.")
    p.add_argument("app_args", nargs="*", metavar="key=value", help="application arguments")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    add_arguments(p.add_argument_group("application (every field of ServeConfig, also as key=value)"),
                  ServeConfig, suppress=True)
    p.set_defaults(func=run_serve)


def parse_app_args(pairs: list[str]) -> dict:
    """``["budget=0.1", ...]`` -> ``{"budget": "0.1"}``; each value is parsed by its option's type."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"application arguments are key=value, got {pair!r}")
        out[key] = value
    return out


def app_args_from(args: argparse.Namespace, pairs: list[str]) -> dict:
    """The application arguments of ``lsa serve``: flags given, then ``key=value`` pairs,
    checked as a ``ServeConfig`` (unknown names get a did-you-mean) before Ray starts."""
    from actors.config import ServeConfig
    from engine.options import build, given_values

    app_args = {**given_values(args, ServeConfig), **parse_app_args(pairs)}
    build(ServeConfig, app_args)
    return app_args


def run_serve(args: argparse.Namespace) -> int:
    from cluster.local import local_app

    app_args = app_args_from(args, args.app_args)
    try:  # local_app checks the port before Ray starts
        with local_app(app_args, num_cpus=args.num_cpus, port=args.port, host=args.host) as url:
            print(f"lsa serve: cluster:app at {url} (OpenAI API under {url}/v1, metrics at {url}/metrics); "
                  f"Ctrl-C stops", file=sys.stderr)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("lsa serve: stopped", file=sys.stderr)
    return 0
