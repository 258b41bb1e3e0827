"""The served app a benchmark drives: its ``key=value`` arguments, as ``lsa serve`` takes them (the
bench starts ``cluster:app`` on a local Ray cluster and stops it afterwards), or ``--url`` of a
running one. ``lsa bench serve``, ``lsa bench chat`` and ``benchmarks/device/served_checks.py``
take the same flags through here."""
from __future__ import annotations

import argparse
from contextlib import contextmanager

URL_HELP = "a running app instead"


def add_arguments(p: argparse.ArgumentParser, url_help: str | None = URL_HELP) -> None:
    """The app's ``key=value`` words, ``--port`` and ``--num-cpus`` of the app this command starts,
    and ``--url`` (left out when ``url_help`` is None: the command always starts its app)."""
    p.add_argument("app_args", nargs="*", metavar="key=value", help="the app's arguments, as lsa serve takes them")
    if url_help is not None:
        p.add_argument("--url", default=None, help=url_help)
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the app this command starts")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")


def app_args(args: argparse.Namespace, url_too: bool = False) -> dict:
    """The app's arguments as a dict (``{}`` with ``--url``). One of the two is needed; both only
    when ``url_too`` (the served part at the URL, the arguments for the engine alone)."""
    from cluster.commands import parse_app_args
    from engine.errors import InvalidRequestError

    parsed = parse_app_args(args.app_args)
    if (not parsed and not args.url) or (parsed and args.url and not url_too):
        raise InvalidRequestError("give the app's key=value arguments (the bench starts it), or --url of a "
                                  "running app")
    return parsed


@contextmanager
def started_app(args: argparse.Namespace, app_args: dict):
    """``cluster:app`` of ``app_args`` on a local Ray cluster for the ``with`` block; yields its URL."""
    from cluster.local import local_app

    with local_app(app_args, num_cpus=args.num_cpus, port=args.port) as url:
        yield url


@contextmanager
def app_url(args: argparse.Namespace, app_args: dict):
    """The URL to drive: ``--url``, else the app this command starts from ``app_args``."""
    if args.url:
        yield args.url
    else:
        with started_app(args, app_args) as url:
            yield url


def finish(report: dict, out: str | None, print_table) -> int:
    """A bench's last step: its table printed, its report written to ``out`` (JSON) when given."""
    import json

    print_table(report)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return 0
