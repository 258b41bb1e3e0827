"""The ``lsa`` command: one parser; each layer registers its own subcommands.

    lsa generate | demo                      one process, one prompt          cli/generate.py
    lsa eval | dump-traces | train-indexer   the research wing                lab/commands.py
    lsa serve | batch | cluster-demo         the Ray cluster                  cluster/commands.py
    lsa bench decode                         benchmarks                       benchmarks/commands.py

Each layer's ``add_commands(subparsers)`` adds its parsers and sets ``func``, the handler,
which returns the exit status. Every parser shows its defaults in ``--help`` (one
``HelpFormatter``). Mistakes exit with status 2 in a line or two: a bad flag as argparse says
it, and any ``engine.errors.LSAError`` a handler raises as ``lsa: error: ...``; handlers check
their arguments before slow work (loading a model, starting Ray). Nothing below this package
imports it.
"""
from __future__ import annotations

import argparse
import sys

from engine.options import HelpFormatter


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows defaults and whose errors are two lines (not
    the usage, which runs to 30 lines for ``lsa serve``); subcommand parsers are of this
    class too, so every layer's parsers get both without asking."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import benchmarks.commands
    import cli.generate
    import cluster.commands
    import lab.commands

    parser = Parser(prog="lsa", description="lsa-serve: long-context LLM serving with Lookahead Sparse "
                    "Attention, in one process or on a Ray cluster")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for layer in (cli.generate, lab.commands, cluster.commands, benchmarks.commands):
        layer.add_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse an ``lsa`` command line. A command that takes ``key=value`` words (``app_args``,
    as ``lsa serve``) takes them anywhere, between flags too, which argparse alone does not."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "app_args"):
        pairs = [word for word in rest if "=" in word and not word.startswith("-")]
        args.app_args += pairs
        rest = [word for word in rest if word not in pairs]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The ``lsa`` console script."""
    from engine.errors import LSAError

    args = parse_args(argv)
    try:
        return args.func(args)
    except LSAError as exc:
        print(f"lsa: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["Parser", "build_parser", "parse_args", "main"]
