"""The research wing: tools that measure and train, above the runtime.

    evaluation.py, grid.py, runs.py      ``lsa eval``: accuracy of the policies (docs/accuracy.md)
    tasks.py, running.py                 its samples, and running them many at once on an engine
    report.py, stats.py, plot.py         its tables with 95% intervals, and the budget-sweep curves
    calibrate.py, attention_profile.py   ``lsa calibrate``: a model's layer plan (docs/lsa.md)
    haystack.py                          long text and needle prompts for demos and evaluation
    traces.py                            ``lsa dump-traces``: golden-block traces (docs/indexer.md)
    train_indexer.py                     ``lsa train-indexer``: the learned Level-1 indexer
    commands.py                          registers those four subcommands of ``lsa``

The wing imports the engine; nothing in the runtime (kernels/, engine/, actors/) imports it.
The indexer *model* the runtime loads stays in engine/indexer.py.
"""
