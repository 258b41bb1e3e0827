"""Thin Ray wrappers around engine pieces: ``DecodeWorkerCore`` (one engine, sessions,
continuous batching), ``KVStoreCore`` (one host block arena per node), ``IndexerCore``
(indexer weights, prefetch plans). Each plain class is driven directly by tests; the Ray
actors (``kv_store.KVStore``, ``indexer.Indexer``) and the Serve deployment
(``cluster/serve_app.py``) wrap them. Importing this package needs no Ray.
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
