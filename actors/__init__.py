"""The cluster's actors, each a thin Ray wrapper beside the plain class it wraps:

    decode_worker.DecodeWorkerCore   <- worker_deployment.DecodeWorker (Serve deployment, one per GPU)
    tp_worker.TensorParallelWorkerCore <- tp_deployment.TensorParallelWorker (the same, over P GPUs' ranks:
                                         tp_engine.TensorParallelEngine; tp_sessions.SessionRank per rank)
    kv_store.KVStoreCore             <- kv_store_actor.KVStore (one per node, placement.ensure_per_node)
    indexer.IndexerCore              <- indexer.Indexer (prefetch plans, worker stats)
    directory.SessionDirectoryCore   <- directory.SessionDirectory (session records, head node)

Tests drive the plain classes without Ray. Importing this package needs no Ray.
"""


def lazy_attr(name: str, make):
    """A module ``__getattr__`` that builds attribute ``name`` with ``make()`` on first use:
    the Ray actor classes are defined only when asked for, so importing stays free of Ray."""
    built = []

    def __getattr__(attr: str):
        if attr != name:
            raise AttributeError(attr)
        if not built:
            built.append(make())
        return built[0]

    return __getattr__
