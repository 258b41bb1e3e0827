"""Thin Ray wrappers around engine pieces: ``DecodeWorkerCore`` (one engine, sessions,
continuous batching), ``KVStoreCore`` (one host block arena per node), ``IndexerCore``
(indexer weights, prefetch plans). Each plain class is driven directly by tests; the Ray
actors (``kv_store.KVStore``, ``indexer.Indexer``) and the Serve deployment
(``cluster/serve_app.py``) wrap them. Importing this package needs no Ray.
"""
