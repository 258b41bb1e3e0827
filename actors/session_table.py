"""The per-node session table: who owns which host blocks of one arena (plain bookkeeping).

    host ids   free | leased to an engine (in-flight sequences) | owned by a session | a prefix block
                    ^ lease / give_back                           ^ put                ^ put_prefix
                                                                  (leased -> session)  (leased -> prefix)

A session owns the complete blocks of its context. A *prefix block* is one complete block of
a finished stateless request (prompt and answer), keyed by its hash chain (engine/prefix.py):
a later request whose prompt starts with the same blocks loads them instead of prefilling
them. ``lease`` makes room by evicting idle prefix blocks first, then idle sessions (least
recently used first); a pinned session or prefix block (a turn reads it) is never evicted. A
session deleted or expired while pinned keeps its blocks until its last turn unpins it. One
table per node, inside the node's KV store (actors/kv_store.py).
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.errors import CacheFullError, InvalidRequestError, PromptTooLongError, SessionEvicted, SessionNotFound


@dataclass
class SessionRecord:
    session_id: str
    context_ids: list[int]
    host_ids: list[int]  # complete context blocks in this arena, logical order
    # (a host id < 0: the block is held by another node's store, actors/kv_store.py)
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0  # turns running on it: never evicted while pinned


@dataclass
class PrefixBlock:
    host_id: int
    pins: int = 0  # turns reading it


class SessionTable:
    """Host blocks of one arena: free, leased to engines, or owned by sessions."""

    def __init__(self, num_blocks: int, block_bytes: int, remember_evicted: int = 10_000):
        self.free = deque(range(num_blocks))
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.records: OrderedDict[str, SessionRecord] = OrderedDict()  # LRU first
        self.doomed: dict[str, SessionRecord] = {}  # deleted while pinned: freed at the last unpin
        self.prefix: OrderedDict[str, PrefixBlock] = OrderedDict()  # block hash -> block, LRU first
        self.leases: dict[str, set[int]] = {}
        self.evicted: OrderedDict[str, str] = OrderedDict()  # session_id -> why
        self._remember = remember_evicted
        self.num_evictions = 0
        self.num_expired = 0
        self.prefix_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def session_blocks(self) -> int:
        """Blocks of this arena owned by sessions (deleted ones still pinned included)."""
        records = list(self.records.values()) + list(self.doomed.values())
        return sum(sum(i >= 0 for i in r.host_ids) for r in records)

    @property
    def leased_blocks(self) -> int:
        return sum(len(ids) for ids in self.leases.values())

    def session_bytes(self, session_id: str) -> int:
        return sum(i >= 0 for i in self.records[session_id].host_ids) * self.block_bytes

    def idle_sessions(self) -> list[str]:
        """Evictable sessions, least recently used first."""
        return [session_id for session_id, r in self.records.items() if r.pins == 0]

    def make_room(self, n: int) -> None:
        """Free ``n`` blocks: idle prefix blocks go first (least recently used first), then idle
        sessions. Raises ``CacheFullError`` (load that passes) when the rest is in use, and
        ``PromptTooLongError`` when the whole arena is less than ``n``."""
        if n > self.num_blocks:
            raise PromptTooLongError(f"{n} host blocks wanted; the whole host KV arena holds {self.num_blocks}: "
                                     f"shorten the prompt or lower max_tokens")
        if len(self.free) < n:
            for key in [k for k, b in self.prefix.items() if b.pins == 0]:
                self.free.append(self.prefix.pop(key).host_id)
                self.prefix_evictions += 1
                if len(self.free) >= n:
                    break
        while len(self.free) < n:
            idle = self.idle_sessions()
            if not idle:
                raise CacheFullError(f"host KV arena is full ({self.num_blocks} blocks of {self.block_bytes} "
                                     f"bytes) and every session in it is in use; retry when turns finish")
            self.evict(idle[0], "least recently used idle session, evicted to make room in host KV")

    def evict(self, session_id: str, reason: str) -> list[int]:
        rec = self.records.pop(session_id)
        self.free.extend(i for i in rec.host_ids if i >= 0)  # < 0: held by another store
        self._remember_gone(session_id, reason)
        self.num_evictions += 1
        return rec.host_ids

    def _remember_gone(self, session_id: str, reason: str) -> None:
        self.evicted[session_id] = reason
        while len(self.evicted) > self._remember:
            self.evicted.popitem(last=False)

    def expire(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Delete the sessions idle (unpinned, unused) for more than ``ttl_s`` seconds; returns
        their ids. Asking one afterwards says it expired (``SessionEvicted``)."""
        now = time.monotonic() if now is None else now
        gone = [s for s, r in self.records.items() if r.pins == 0 and now - r.last_used > ttl_s]
        for session_id in gone:
            self.delete(session_id)
            self._remember_gone(session_id, f"expired after {ttl_s:g} s without a turn")
            self.num_expired += 1
        return gone

    def lease(self, owner: str, n: int) -> list[int]:
        self.make_room(n)
        ids = sorted(self.free.popleft() for _ in range(n))  # ascending: adjacent ids are one copy (engine/host_copy.py)
        self.leases.setdefault(owner, set()).update(ids)
        return ids

    def give_back(self, owner: str, ids: list[int]) -> None:
        held = self.leases.get(owner, set())
        bad = [i for i in ids if i not in held]
        if bad:
            raise ValueError(f"{owner} does not lease host blocks {bad[:5]}")
        held.difference_update(ids)
        self.free.extend(ids)

    def transfer(self, owner: str, to: str, ids: list[int]) -> None:
        """Blocks ``ids`` leased to ``owner`` are leased to ``to`` from now on."""
        held = self.leases.get(owner, set())
        bad = [i for i in ids if i not in held]
        if bad:
            raise ValueError(f"{owner} does not lease host blocks {bad[:5]}")
        held.difference_update(ids)
        if not held:
            self.leases.pop(owner, None)
        self.leases.setdefault(to, set()).update(ids)

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

    def unpin(self, session_id: str) -> bool:
        """True when this freed a session deleted while pinned (its last turn is done)."""
        rec = self.records.get(session_id) or self.doomed.get(session_id)
        if rec is None:
            return False
        rec.pins = max(0, rec.pins - 1)
        rec.last_used = time.monotonic()
        if rec.pins == 0 and self.doomed.pop(session_id, None) is not None:
            self.free.extend(i for i in rec.host_ids if i >= 0)
            return True
        return False

    def delete(self, session_id: str) -> bool:
        """Forget the session; a pinned one keeps its blocks until its last turn unpins it."""
        rec = self.records.pop(session_id, None)
        if rec is None:
            return False
        if rec.pins:
            self.doomed[session_id] = rec
        else:
            self.free.extend(i for i in rec.host_ids if i >= 0)
        return True

    # -- prefix blocks (block hash chains of finished stateless requests) ------------------

    def match_prefix(self, hashes: list[str]) -> list[int]:
        """Host ids of the longest run of ``hashes`` (a chain, engine/prefix.py) held here, from
        the first; each is pinned until ``unpin_prefix``."""
        ids = []
        for key in hashes:
            block = self.prefix.get(key)
            if block is None:
                break
            ids.append(block.host_id)
        for key in reversed(hashes[: len(ids)]):  # parents end up most recent: leaves are evicted first
            self.prefix[key].pins += 1
            self.prefix.move_to_end(key)
        return ids

    def unpin_prefix(self, hashes: list[str]) -> None:
        for key in hashes:
            block = self.prefix.get(key)
            if block is not None:
                block.pins = max(0, block.pins - 1)

    def put_prefix(self, owner: str, hashes: list[str], host_ids: list[int]) -> int:
        """Blocks ``host_ids`` (their chain ``hashes``) become prefix blocks; ids leased to
        ``owner`` whose hash is held already (the same tokens computed twice) are freed.
        Returns the blocks added."""
        held = self.leases.get(owner, set())
        new = []
        for key, host_id in zip(hashes, host_ids):
            block = self.prefix.get(key)
            if block is not None and block.host_id == host_id:
                continue
            if host_id not in held:
                raise ValueError(f"prefix block {host_id} is not leased to {owner}")
            held.discard(host_id)
            if block is not None:  # a duplicate of a block held already
                self.free.append(host_id)
            else:
                new.append((key, host_id))
        for key, host_id in new:
            self.prefix[key] = PrefixBlock(host_id)
        for key in reversed(hashes):  # parents more recent than their children: leaves go first
            if key in self.prefix:
                self.prefix.move_to_end(key)
        return len(new)
