"""How actors talk to a node's KV store: one protocol, an in-process and a Ray implementation.

    SessionStore   one node's store: KVStoreCore (in process), RayStore (its KVStore actor)
    Stores         every node's store, by node id: LocalStores (a dict), RayStores (named actors)

A decode worker, the Indexer and the stores themselves (spilling to and staging from each
other) are written against these protocols, so tests drive them with plain objects and the
cluster with Ray handles, method by method.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from actors.messages import ArenaInfo, SessionView, StoreStats

if TYPE_CHECKING:
    import torch

STORE_PREFIX = "kvstore"  # the store of node N is the actor "kvstore:N"


class SessionStore(Protocol):
    """A node's host KV store: its arena, the sessions it holds, leases to engines."""

    def info(self) -> ArenaInfo: ...

    # -- a worker's engine: host blocks for its in-flight sequences
    def lease(self, owner: str, n: int) -> list[int]:
        """``n`` free blocks for ``owner``, making room (spill, then evict idle sessions)."""

    def give_back(self, owner: str, ids: list[int]) -> None: ...

    # -- sessions
    def put(self, owner: str, session_id: str, context_ids: list[int], host_ids: list[int]) -> None:
        """A new session: ``host_ids``, leased to ``owner``, now belong to it."""

    def pin(self, session_id: str) -> SessionView:
        """Hold the session for a turn (never evicted while pinned); raises ``SessionNotFound``
        or ``SessionEvicted``."""

    def view(self, session_id: str) -> SessionView: ...

    def unpin(self, session_id: str) -> None: ...

    def has(self, session_id: str) -> bool: ...

    def holding(self, session_ids: list[str]) -> list[str]:
        """Those of ``session_ids`` this store holds."""

    def delete(self, session_id: str) -> bool: ...

    def stage(self, session_id: str, logical: list[int] | None = None, plan: bool = False) -> int:
        """Copy the session's blocks held by other stores here; returns blocks fetched."""

    def stats(self) -> StoreStats: ...

    # -- blocks between stores
    def read_blocks(self, host_ids: list[int]) -> tuple[torch.Tensor, ...]: ...

    def write_blocks(self, owner: str, rows: tuple[torch.Tensor, ...]) -> list[int]: ...

    def drop_foreign(self, owner: str) -> None: ...


class Stores(Protocol):
    """Every node's store, by node id."""

    def store(self, node_id: str) -> SessionStore: ...

    def peers_by_room(self, node_id: str) -> list[tuple[str, int]]:
        """(node id, free blocks) of the other stores with free blocks, most free first."""

    def holder(self, session_id: str, node_id: str) -> str | None:
        """A node other than ``node_id`` whose store holds the session, or None."""


class LocalStores:
    """``Stores`` over in-process stores (tests, one process). ``spill=False``: stores stage
    from each other but never spill to each other."""

    def __init__(self, stores: dict[str, SessionStore] | None = None, spill: bool = True):
        self.stores = stores if stores is not None else {}
        self.spill = spill

    def store(self, node_id: str) -> SessionStore:
        return self.stores[node_id]

    def peers_by_room(self, node_id: str) -> list[tuple[str, int]]:
        if not self.spill:
            return []
        room = [(n, s.stats().free_blocks) for n, s in self.stores.items() if n != node_id]
        return sorted([p for p in room if p[1] > 0], key=lambda p: -p[1])

    def holder(self, session_id: str, node_id: str) -> str | None:
        return next((n for n, s in self.stores.items() if n != node_id and s.has(session_id)), None)


class RayStore:
    """``SessionStore`` over a node's ``KVStore`` actor: each method is one blocking Ray call.
    Call it from threads that may wait (a worker's admission and settling threads, the
    Indexer, another store), never from a decode loop or an event loop."""

    def __init__(self, handle, timeout_s: float | None = None):
        import ray

        self.handle = handle
        self.timeout_s = timeout_s
        self._ray = ray

    def _call(self, method: str, *args, **kwargs):
        ref = getattr(self.handle, method).remote(*args, **kwargs)
        return self._ray.get(ref, timeout=self.timeout_s)

    def info(self) -> ArenaInfo:
        return self._call("info")

    def lease(self, owner: str, n: int) -> list[int]:
        return self._call("lease", owner, n)

    def give_back(self, owner: str, ids: list[int]) -> None:
        self._call("give_back", owner, ids)

    def put(self, owner: str, session_id: str, context_ids: list[int], host_ids: list[int]) -> None:
        self._call("put", owner, session_id, context_ids, host_ids)

    def pin(self, session_id: str) -> SessionView:
        return self._call("pin", session_id)

    def view(self, session_id: str) -> SessionView:
        return self._call("view", session_id)

    def unpin(self, session_id: str) -> None:
        self._call("unpin", session_id)

    def has(self, session_id: str) -> bool:
        return self._call("has", session_id)

    def holding(self, session_ids: list[str]) -> list[str]:
        return self._call("holding", session_ids)

    def delete(self, session_id: str) -> bool:
        return self._call("delete", session_id)

    def stage(self, session_id: str, logical: list[int] | None = None, plan: bool = False) -> int:
        return self._call("stage", session_id, logical, plan)

    def stats(self) -> StoreStats:
        return self._call("stats")

    def read_blocks(self, host_ids: list[int]):
        return self._call("read_blocks", host_ids)

    def write_blocks(self, owner: str, rows) -> list[int]:
        return self._call("write_blocks", owner, rows)

    def drop_foreign(self, owner: str) -> None:
        self._call("drop_foreign", owner)


def store_name(node_id: str) -> str:
    from actors.placement import actor_name

    return actor_name(STORE_PREFIX, node_id)


class RayStores:
    """``Stores`` over the named ``KVStore`` actors of the alive nodes (``namespace``: the
    app's Ray namespace). Peers that do not answer within ``timeout_s`` are passed over."""

    def __init__(self, namespace: str, timeout_s: float = 10.0):
        import ray

        self.namespace = namespace
        self.timeout_s = timeout_s
        self._ray = ray

    def store(self, node_id: str, timeout_s: float | None = None) -> RayStore:
        return RayStore(self._ray.get_actor(store_name(node_id), namespace=self.namespace), timeout_s)

    def _others(self, node_id: str) -> list[str]:
        return [n["NodeID"] for n in self._ray.nodes() if n["Alive"] and n["NodeID"] != node_id]

    def _ask(self, node_id: str, method: str, *args):
        """``method`` of the node's store, or None when it has none or it does not answer."""
        try:
            return getattr(self.store(node_id, self.timeout_s), method)(*args)
        except Exception:  # no store there (yet), or it died or hangs: not a peer now
            return None

    def peers_by_room(self, node_id: str) -> list[tuple[str, int]]:
        room = [(n, getattr(self._ask(n, "stats"), "free_blocks", 0)) for n in self._others(node_id)]
        return sorted([p for p in room if p[1] > 0], key=lambda p: -p[1])

    def holder(self, session_id: str, node_id: str) -> str | None:
        return next((n for n in self._others(node_id) if self._ask(n, "has", session_id)), None)
