"""How actors talk to a node's KV store: one protocol, an in-process and a Ray implementation.

    SessionStore   one node's store: KVStoreCore (in process), RayStore (its KVStore actor;
                   a store that died raises StoreUnavailable)
    Stores         every node's store, by node id: LocalStores (a dict), RayStores (named actors)

A decode worker, the Indexer and the stores themselves (spilling to and staging from each
other) are written against these protocols, so tests drive them with plain objects and the
cluster with Ray handles, method by method.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from actors.messages import ArenaInfo, SessionView, StoreStats
from engine.errors import StoreUnavailable

STORE_PREFIX = "kvstore"  # the store of node N is the actor "kvstore:N"
BATCH_BYTES = 64 << 20  # blocks travel between stores in batches of about this many bytes
IN_FLIGHT = 4  # batches a stager or spiller has on the way at once (pulls overlap copies)

# Blocks between stores: a tuple of uint8 numpy arrays [n, ...] (``read_blocks``, one gathered copy)
# or a list of such tuples, one per run of consecutive ids (``read_runs``, views: what batches carry)
Rows = tuple | list


def batch_blocks(block_bytes: int) -> int:
    """Blocks per batch between stores."""
    return max(1, BATCH_BYTES // block_bytes)


def num_rows(rows: Rows) -> int:
    return sum(piece[0].shape[0] for piece in (rows if isinstance(rows, list) else [rows]))


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

    # -- prefix blocks (engine/prefix.py hash chains of finished stateless requests)
    def match_prefix(self, hashes: list[str]) -> list[int]:
        """Host ids of the longest held run of the chain ``hashes``, pinned until ``put_prefix``
        or ``unpin_prefix``."""

    def unpin_prefix(self, hashes: list[str]) -> None: ...

    def put_prefix(self, owner: str, hashes: list[str], host_ids: list[int], pinned: int = 0) -> int:
        """Blocks leased to ``owner`` become prefix blocks (the first ``pinned`` are unpinned)."""

    def holding_prefixes(self, hashes: list[str]) -> list[str]: ...

    # -- blocks between stores (``Rows``: numpy, so that Ray moves them without copies)
    def read_blocks(self, host_ids: list[int]) -> Rows: ...

    def read_runs(self, host_ids: list[int]) -> Rows: ...

    def read_batches(self, host_ids: list[int], batch: int) -> Iterator[tuple[int, Rows]]:
        """``read_blocks`` of ``host_ids`` in slices of ``batch``: (offset of the slice, its rows)
        as each arrives, in any order (over Ray, ``IN_FLIGHT`` slices on the way at once)."""

    def write_blocks(self, owner: str, rows: Rows) -> list[int]: ...

    def write_batches(self, owner: str, batches: Iterable[Rows]) -> list[int]:
        """``write_blocks`` of each of ``batches`` (over Ray, ``IN_FLIGHT`` on the way at once);
        returns the ids of all their blocks, in order."""

    def drop_foreign(self, owner: str, host_ids: list[int] | None = None) -> None: ...


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
        """One call; a store that died or does not answer raises ``StoreUnavailable``."""
        from ray.exceptions import RayActorError

        try:
            ref = getattr(self.handle, method).remote(*args, **kwargs)
        except RayActorError as exc:
            raise StoreUnavailable(f"the node's KV store does not answer {method} ({type(exc).__name__}): it died "
                                   f"or its node is going away") from None
        return self._get(ref, method)

    def ping(self, timeout_s: float = 5.0) -> str:
        """The store's node id, within ``timeout_s`` (health checks)."""
        return RayStore(self.handle, timeout_s)._call("ping")

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

    def match_prefix(self, hashes: list[str]) -> list[int]:
        return self._call("match_prefix", hashes)

    def unpin_prefix(self, hashes: list[str]) -> None:
        self._call("unpin_prefix", hashes)

    def put_prefix(self, owner: str, hashes: list[str], host_ids: list[int], pinned: int = 0) -> int:
        return self._call("put_prefix", owner, hashes, host_ids, pinned)

    def holding_prefixes(self, hashes: list[str]) -> list[str]:
        return self._call("holding_prefixes", hashes)

    def read_blocks(self, host_ids: list[int]):
        return self._call("read_blocks", host_ids)

    def read_runs(self, host_ids: list[int]):
        return self._call("read_runs", host_ids)

    def read_batches(self, host_ids: list[int], batch: int) -> Iterator[tuple[int, Rows]]:
        starts = iter(range(0, len(host_ids), batch))
        pending: dict = {}  # ref -> offset

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                pending[self.handle.read_runs.remote(host_ids[start:start + batch])] = start

        for _ in range(IN_FLIGHT):
            submit()
        while pending:  # ray.wait pulls every pending batch to this node meanwhile
            done, _ = self._wait(list(pending), 1)
            start = pending.pop(done[0])
            submit()
            yield start, self._get(done[0], "read_runs")

    def write_blocks(self, owner: str, rows) -> list[int]:
        return self._call("write_blocks", owner, rows)

    def write_batches(self, owner: str, batches: Iterable[Rows]) -> list[int]:
        refs, pending = [], []
        for rows in batches:
            if len(pending) >= IN_FLIGHT:
                _, pending = self._wait(pending, len(pending) - IN_FLIGHT + 1)
            refs.append(self.handle.write_blocks.remote(owner, rows))
            pending.append(refs[-1])
        return [i for ref in refs for i in self._get(ref, "write_blocks")]

    def _wait(self, refs: list, num_returns: int) -> tuple[list, list]:
        done, rest = self._ray.wait(refs, num_returns=num_returns, timeout=self.timeout_s)
        if len(done) < num_returns:
            raise StoreUnavailable("the node's KV store does not answer a block transfer: it died or its node "
                                   "is going away")
        return done, rest

    def _get(self, ref, method: str):
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return self._ray.get(ref, timeout=self.timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            raise StoreUnavailable(f"the node's KV store does not answer {method} ({type(exc).__name__}): it died "
                                   f"or its node is going away") from None

    def drop_foreign(self, owner: str, host_ids: list[int] | None = None) -> None:
        self._call("drop_foreign", owner, host_ids)


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
