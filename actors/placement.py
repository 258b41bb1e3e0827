"""One actor per node, pinned with node affinity: how each node gets its KVStore.

``ensure_per_node`` is idempotent: it names each actor after its node and creates only
the missing ones, so calling it again (the app does, every few seconds) gives a node that
joined later its own actor and leaves the others alone.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def actor_name(prefix: str, node_id: str) -> str:
    return f"{prefix}:{node_id}"


def ensure_per_node(actor_cls, prefix: str, *args,
                    node_filter: Callable[[dict], bool] = lambda node: True,
                    namespace: str | None = None, **options: Any) -> Dict[str, Any]:
    """Handles of ``actor_cls`` (a ``@ray.remote`` class), one per alive node that
    ``node_filter`` accepts (it gets the ``ray.nodes()`` entry), keyed by node id.

    Actors are named ``prefix:<node id>`` and placed with a hard
    ``NodeAffinitySchedulingStrategy``: they never run elsewhere, and die with their
    node. They are detached by default: a named actor that is not dies with the last
    handle to it, and a KVStore must outlive the workers and calls that use it.
    ``options`` go to ``actor_cls.options`` (e.g. ``num_cpus``, ``resources``)."""
    options.setdefault("lifetime", "detached")
    handles = {}
    for node in ray.nodes():
        if not node["Alive"] or not node_filter(node):
            continue
        node_id = node["NodeID"]
        handles[node_id] = actor_cls.options(
            name=actor_name(prefix, node_id),
            namespace=namespace,
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            **options,
        ).remote(*args)
    return handles
