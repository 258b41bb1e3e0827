"""The per-node session table: who owns which host blocks of one arena (plain bookkeeping).

    host ids   free  |  leased to an engine (its in-flight sequences)  |  owned by a session
                     ^ lease / give_back                                  ^ put (leased -> session)

A session owns the complete blocks of its context. ``lease`` evicts idle sessions (least
recently used first) when the free blocks do not suffice; a pinned session (a turn runs on
it) is never evicted. One table per node, inside the node's KV store (actors/kv_store.py).
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.errors import CacheFullError, InvalidRequestError, SessionEvicted, SessionNotFound


@dataclass
class SessionRecord:
    session_id: str
    context_ids: list[int]
    host_ids: list[int]  # complete context blocks in this arena, logical order
    # (a host id < 0: the block is held by another node's store, actors/kv_store.py)
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0  # turns running on it: never evicted while pinned


class SessionTable:
    """Host blocks of one arena: free, leased to engines, or owned by sessions."""

    def __init__(self, num_blocks: int, block_bytes: int, remember_evicted: int = 10_000):
        self.free = deque(range(num_blocks))
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.records: OrderedDict[str, SessionRecord] = OrderedDict()  # LRU first
        self.leases: dict[str, set[int]] = {}
        self.evicted: OrderedDict[str, str] = OrderedDict()  # session_id -> why
        self._remember = remember_evicted
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def session_blocks(self) -> int:
        """Blocks of this arena owned by sessions."""
        return sum(sum(i >= 0 for i in r.host_ids) for r in self.records.values())

    @property
    def leased_blocks(self) -> int:
        return sum(len(ids) for ids in self.leases.values())

    def session_bytes(self, session_id: str) -> int:
        return sum(i >= 0 for i in self.records[session_id].host_ids) * self.block_bytes

    def idle_sessions(self) -> list[str]:
        """Evictable sessions, least recently used first."""
        return [session_id for session_id, r in self.records.items() if r.pins == 0]

    def make_room(self, n: int) -> None:
        if n > self.num_blocks:
            raise CacheFullError(f"{n} host blocks wanted; the whole arena holds {self.num_blocks}")
        while len(self.free) < n:
            idle = self.idle_sessions()
            if not idle:
                raise CacheFullError(f"host KV arena is full ({self.num_blocks} blocks of {self.block_bytes} "
                                     f"bytes) and every session is in use; retry later")
            self.evict(idle[0], "least recently used idle session, evicted to make room in host KV")

    def evict(self, session_id: str, reason: str) -> list[int]:
        rec = self.records.pop(session_id)
        self.free.extend(i for i in rec.host_ids if i >= 0)  # < 0: held by another store
        self.evicted[session_id] = reason
        while len(self.evicted) > self._remember:
            self.evicted.popitem(last=False)
        self.num_evictions += 1
        return rec.host_ids

    def lease(self, owner: str, n: int) -> list[int]:
        self.make_room(n)
        ids = [self.free.popleft() for _ in range(n)]
        self.leases.setdefault(owner, set()).update(ids)
        return ids

    def give_back(self, owner: str, ids: list[int]) -> None:
        held = self.leases.get(owner, set())
        bad = [i for i in ids if i not in held]
        if bad:
            raise ValueError(f"{owner} does not lease host blocks {bad[:5]}")
        held.difference_update(ids)
        self.free.extend(ids)

    def drop_owner(self, owner: str) -> int:
        """Free every block leased to ``owner`` (an engine that died); sessions stay."""
        ids = self.leases.pop(owner, set())
        self.free.extend(ids)
        return len(ids)

    def put(self, owner: str, session_id: str, context_ids: list[int], host_ids: list[int]) -> None:
        """A new session: ``host_ids`` (leased to ``owner``) now belong to it."""
        if session_id in self.records:
            raise InvalidRequestError(f"session {session_id} already exists")
        held = self.leases.get(owner, set())
        if any(i not in held for i in host_ids):
            raise ValueError(f"session {session_id} names host blocks not leased to {owner}")
        held.difference_update(host_ids)
        self.records[session_id] = SessionRecord(session_id, list(context_ids), list(host_ids))
        self.evicted.pop(session_id, None)

    def get(self, session_id: str) -> SessionRecord:
        rec = self.records.get(session_id)
        if rec is None:
            if session_id in self.evicted:
                raise SessionEvicted(f"session {session_id} was evicted ({self.evicted[session_id]}); "
                                     f"create it again")
            raise SessionNotFound(f"no session {session_id} here: create it first")
        return rec

    def pin(self, session_id: str) -> SessionRecord:
        rec = self.get(session_id)
        rec.pins += 1
        rec.last_used = time.monotonic()
        self.records.move_to_end(session_id)
        return rec

    def unpin(self, session_id: str) -> None:
        rec = self.records.get(session_id)
        if rec is not None:
            rec.pins = max(0, rec.pins - 1)
            rec.last_used = time.monotonic()

    def delete(self, session_id: str) -> bool:
        rec = self.records.pop(session_id, None)
        if rec is None:
            return False
        self.free.extend(i for i in rec.host_ids if i >= 0)
        return True

