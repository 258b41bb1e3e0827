"""The cluster layer: the Serve application ``cluster:app``, the KV-locality request
router and the HTTP client.

Importing the package is free of Ray and torch, so ``import cluster.client`` works on a
machine that only talks to a server. ``cluster.app`` (what ``serve run cluster:app``
looks up) is resolved lazily.
"""


def __getattr__(name: str):
    if name == "app":
        from cluster.serve_app import app  # needs ray[serve] and the engine

        return app
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
