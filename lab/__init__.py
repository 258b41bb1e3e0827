"""The research wing: tools that measure and train, above the runtime.

    evaluation.py, tasks.py, report.py   ``lsa eval``: accuracy of the policies (docs/accuracy.md)
    haystack.py                          long text and needle prompts for demos and evaluation
    traces.py                            ``lsa dump-traces``: golden-block traces (docs/indexer.md)
    train_indexer.py                     ``lsa train-indexer``: the learned Level-1 indexer
    commands.py                          registers those three subcommands of ``lsa``

The wing imports the engine; nothing in the runtime (kernels/, engine/, actors/) imports it.
The indexer *model* the runtime loads stays in engine/indexer.py.
"""
