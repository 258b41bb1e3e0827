"""The research wing's subcommands of ``lsa``: eval, calibrate, dump-traces, train-indexer."""
from __future__ import annotations


def add_commands(sub) -> None:
    from lab.calibrate import add_calibrate_parser, run_calibrate
    from lab.evaluation import add_eval_parser, run_eval
    from lab.traces import add_dump_traces_parser, run_dump_traces
    from lab.train_indexer import add_train_indexer_parser, run_train_indexer

    add_eval_parser(sub).set_defaults(func=run_eval)
    add_calibrate_parser(sub).set_defaults(func=run_calibrate)
    add_dump_traces_parser(sub).set_defaults(func=run_dump_traces)
    add_train_indexer_parser(sub).set_defaults(func=run_train_indexer)
