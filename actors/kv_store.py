"""The node's host KV store: one block arena in shared memory, the sessions it holds.

    /dev/shm/lsa-kv-<cluster>-<node>.arena   [N blocks of K/V][N key summaries]
        ^ mapped by every DecodeWorker on the node (torch.from_file(shared=True)): no copy

``KVStoreCore`` is plain Python (tests drive it directly) and implements ``SessionStore``
(actors/session_store.py); ``KVStore`` (actors/kv_store_actor.py) is the Ray actor that wraps
it, exactly one per node (actors/placement.py), detached so that it outlives the workers.

Host ids go three ways: free, leased to a worker's engine (in-flight sequences), or owned
by a session (its complete context blocks). A session's blocks can also live in another
node's store (*spilled*, when this node's arena was full); the Indexer's prefetch plan
*stages* them back into this arena before a turn needs them. Blocks travel between nodes as
uint8 numpy arrays through the Ray object store (no copy in or out of it), in batches of
``BATCH_BYTES`` with ``IN_FLIGHT`` on the way at once (actors/session_store.py).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Iterable, Iterator

import lsa_env
from actors.messages import SPILLED, ArenaInfo, SessionView, StoreStats
from actors.session_store import Rows, Stores, batch_blocks, num_rows
from actors.session_table import SessionTable
from engine.errors import CacheFullError
from engine.host_arena import ArenaLayout, HostArena


def arena_path(cluster: str, node_id: str, directory: str | None = None, incarnation: str = "") -> str:
    """``lsa-kv-<cluster>-<node>[-<incarnation>].arena``: a store that replaces a dead one on the
    same node (``incarnation``) gets a file of its own, never the one its predecessor's workers map."""
    stem = f"lsa-kv-{cluster}-{node_id}" + (f"-{incarnation}" if incarnation else "")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return os.path.join(directory or lsa_env.kv_dir(), name + ".arena")


class KVStoreCore:
    """The store of node ``node_id``. ``stores`` (every node's store): with it, a full arena
    spills idle sessions to the peer with the most room before it evicts anything, and
    stages spilled blocks back from where they went."""

    def __init__(self, node_id: str, layout: ArenaLayout, capacity_bytes: int, path: str,
                 stores: Stores | None = None):
        self.node_id = node_id
        self.layout = layout
        self.path = path
        self.num_blocks = layout.num_blocks(capacity_bytes)
        if self.num_blocks < 1:
            raise CacheFullError(f"kv store capacity {capacity_bytes} bytes is less than one block "
                                 f"({layout.block_bytes} bytes)")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(self.num_blocks * layout.block_bytes)
        self.arena = HostArena.from_file(path, layout, self.num_blocks)
        self.table = SessionTable(self.num_blocks, layout.block_bytes)
        self.stores = stores
        self.num_spilled = 0  # blocks spilled to make room
        self.lock = threading.RLock()
        self._stage_locks: dict[str, threading.Lock] = {}  # session_id -> held while staging it
        self._spilling: set[str] = set()  # sessions whose blocks are on their way to a peer
        self.remote: dict[str, dict[int, tuple[str, int]]] = {}  # session_id -> logical -> (node_id, id)
        self.staged: dict[str, dict[int, int]] = {}  # session_id -> logical -> local id
        self.blocks_prefetched = self.blocks_fetched_at_use = 0
        self.foreign: dict[str, list[int]] = {}  # blocks held for other stores' sessions
        self.blocks_sent = self.blocks_received = 0
        self.stage_s = self.spill_s = 0.0
        self.prefix_hits = self.prefix_blocks_reused = 0

    def close(self) -> None:
        """Remove the arena file (workers that map it keep their mapping)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- what a worker needs --------------------------------------------------------------

    def info(self) -> ArenaInfo:
        return ArenaInfo(self.node_id, self.path, self.num_blocks, self.layout)

    def lease(self, owner: str, n: int) -> list[int]:
        """``n`` free blocks for ``owner``: spilling idle sessions to peers first when the
        arena is short, evicting idle sessions (LRU) only when no peer has room."""
        self.make_room(n)
        with self.lock:
            ids = self.table.lease(owner, n)
            self._drop_staged_of_evicted()
            return ids

    def _drop_staged_of_evicted(self) -> None:
        for session_id in [s for s in self.staged if s not in self.table.records]:  # evicted: copies go too
            self._drop_staged(session_id)

    def make_room(self, n: int, keep: str | None = None) -> int:
        """Drop staged copies of idle sessions, then spill idle sessions other than ``keep``
        (least recently used first; their last blocks, the sinks stay) to the peer store with
        the most free blocks, until ``n`` blocks are free here or no peer has room. Returns the
        blocks spilled. Peer calls run outside the lock."""
        with self.lock:  # staged copies of idle sessions are caches (the peer keeps the block): first
            for session_id in [s for s in self.staged
                               if s != keep and getattr(self.table.records.get(s), "pins", 0) == 0]:
                if self.table.num_free >= n:
                    break
                self._drop_staged(session_id)
        spilled = 0
        while self.stores is not None and self.table.num_free < n:
            with self.lock:
                idle = [s for s in self.table.idle_sessions()
                        if s != keep and s not in self._spilling and self.spill_plan(s, 1)]
            peers = self.stores.peers_by_room(self.node_id)
            if not idle or not peers:
                break
            peer, room = peers[0]
            with self.lock:
                logical = self.spill_plan(idle[0], min(room, n - self.table.num_free))
            if not logical:
                break
            try:
                if self.spill(idle[0], logical, peer):
                    spilled += len(logical)
            except CacheFullError:  # pinned, or spilled by another thread, since it was picked
                continue
        self.num_spilled += spilled
        return spilled

    def give_back(self, owner: str, ids: list[int]) -> None:
        with self.lock:
            self.table.give_back(owner, ids)

    def drop_owner(self, owner: str) -> int:
        with self.lock:
            return self.table.drop_owner(owner)

    def put(self, owner: str, session_id: str, context_ids: list[int], host_ids: list[int]) -> None:
        with self.lock:
            self.table.put(owner, session_id, context_ids, host_ids)

    def view(self, session_id: str) -> SessionView:
        rec = self.table.records.get(session_id) or self.table.doomed.get(session_id) or self.table.get(session_id)
        ids = list(rec.host_ids)
        for j, local in self.staged.get(session_id, {}).items():
            ids[j] = local
        return SessionView(session_id, list(rec.context_ids), ids)

    def pin(self, session_id: str) -> SessionView:
        with self.lock:
            self.table.pin(session_id)
            return self.view(session_id)

    def unpin(self, session_id: str) -> None:
        with self.lock:
            if self.table.unpin(session_id):  # deleted during its last turn: now it goes
                self._forget(session_id)
        # staged copies stay: the next turn needs them all again, and ``make_room`` drops the
        # copies of idle sessions first, at no cost (the peer keeps every block)

    def has(self, session_id: str) -> bool:
        return session_id in self.table.records

    def holding(self, session_ids: list[str]) -> list[str]:
        return [s for s in session_ids if s in self.table.records]

    def delete(self, session_id: str) -> bool:
        """Forget the session here, and its spilled blocks at the stores that keep them; a
        session a turn still reads goes when that turn unpins it."""
        with self.lock:
            deleted = self.table.delete(session_id)
            if session_id not in self.table.doomed:
                self._forget(session_id)
        return deleted

    def expire(self, ttl_s: float) -> list[str]:
        """Delete the sessions idle for more than ``ttl_s`` seconds; returns their ids."""
        with self.lock:
            gone = self.table.expire(ttl_s)
            for session_id in gone:
                self._forget(session_id)
        return gone

    def _forget(self, session_id: str) -> None:
        """Drop a deleted session's staged copies here and its spilled blocks at its peers."""
        self._drop_staged(session_id)
        for peer in {peer for peer, _ in self.remote.pop(session_id, {}).values()}:
            try:
                self.stores.store(peer).drop_foreign(f"spill:{self.node_id}:{session_id}")
            except Exception:  # that node is gone, and its blocks with it
                pass

    # -- prefix blocks: the KV of finished stateless requests, by hash chain ----------------

    def match_prefix(self, hashes: list[str]) -> list[int]:
        """Host ids of the longest held run of the chain ``hashes``, pinned for the caller's turn
        (``put_prefix`` or ``unpin_prefix`` unpins them)."""
        with self.lock:
            ids = self.table.match_prefix(hashes)
            self.prefix_hits += bool(ids)
            self.prefix_blocks_reused += len(ids)
            return ids

    def unpin_prefix(self, hashes: list[str]) -> None:
        with self.lock:
            self.table.unpin_prefix(hashes)

    def put_prefix(self, owner: str, hashes: list[str], host_ids: list[int], pinned: int = 0) -> int:
        """A finished request's complete blocks (leased to ``owner``; the first ``pinned`` of the
        chain were pinned by ``match_prefix``) become prefix blocks; returns the blocks added."""
        with self.lock:
            self.table.unpin_prefix(hashes[:pinned])
            return self.table.put_prefix(owner, hashes, host_ids)

    def holding_prefixes(self, hashes: list[str]) -> list[str]:
        """Those of ``hashes`` held here as prefix blocks."""
        return [h for h in hashes if h in self.table.prefix]

    def stats(self) -> StoreStats:
        with self.lock:
            table = self.table
            return StoreStats(
                node_id=self.node_id, sessions=len(table.records), capacity_blocks=self.num_blocks,
                block_bytes=self.layout.block_bytes,
                session_blocks=table.session_blocks, leased_blocks=table.leased_blocks, free_blocks=table.num_free,
                evictions=table.num_evictions, spilled_blocks=sum(len(r) for r in self.remote.values()),
                staged_blocks=sum(len(v) for v in self.staged.values()),
                foreign_blocks=sum(len(v) for v in self.foreign.values()), blocks_sent=self.blocks_sent,
                blocks_received=self.blocks_received, blocks_spilled=self.num_spilled,
                blocks_prefetched=self.blocks_prefetched, blocks_fetched_at_use=self.blocks_fetched_at_use,
                prefix_blocks=len(table.prefix), prefix_hits=self.prefix_hits,
                prefix_blocks_reused=self.prefix_blocks_reused, expired=table.num_expired, stage_s=self.stage_s,
                spill_s=self.spill_s)

    # -- serving blocks to other nodes ----------------------------------------------------

    def read_blocks(self, host_ids: list[int]) -> Rows:
        """Copies of blocks as uint8 numpy arrays: (data [n, L, 2, H, B, D'], summary [n, L, 3, H, D'])
        and, in an FP8 arena, their scales [n, L, 2, H'] (``HostArena.read_bytes``; ' in bytes)."""
        with self.lock:
            self.blocks_sent += len(host_ids)
        return self.arena.read_bytes(host_ids)  # blocks read are held by their session: no lock to copy

    def read_runs(self, host_ids: list[int]) -> Rows:
        """Blocks without a copy, per run of consecutive ids (``HostArena.read_runs``): Ray
        copies them once, into its object store, when this returns."""
        with self.lock:
            self.blocks_sent += len(host_ids)
        return self.arena.read_runs(host_ids)

    def read_batches(self, host_ids: list[int], batch: int) -> Iterator[tuple[int, Rows]]:
        for start in range(0, len(host_ids), batch):
            yield start, self.read_runs(host_ids[start:start + batch])

    def write_blocks(self, owner: str, rows: Rows) -> list[int]:
        """Store blocks (``read_blocks`` of another store) for ``owner`` (that store's spilled
        session); returns their ids."""
        with self.lock:
            ids = self.table.lease(owner, num_rows(rows))
            self.arena.write(ids, rows)
            self.foreign.setdefault(owner, []).extend(ids)
            self.blocks_received += len(ids)
            return ids

    def write_batches(self, owner: str, batches: Iterable[Rows]) -> list[int]:
        return [i for rows in batches for i in self.write_blocks(owner, rows)]

    def drop_foreign(self, owner: str, host_ids: list[int] | None = None) -> None:
        """Free the blocks kept for ``owner`` (another store's session, deleted there): all, or
        ``host_ids`` of them."""
        with self.lock:
            if host_ids is None:
                self.foreign.pop(owner, None)
                self.table.drop_owner(owner)
                return
            drop = set(host_ids)
            kept = [i for i in self.foreign.get(owner, []) if i not in drop]
            self.table.give_back(owner, [i for i in self.foreign.pop(owner, []) if i in drop])
            if kept:
                self.foreign[owner] = kept

    # -- spilling and staging -------------------------------------------------------------

    def spill_plan(self, session_id: str, num_blocks: int) -> list[int]:
        """The session's last ``num_blocks`` local blocks (logical ids): sinks stay home."""
        rec = self.table.get(session_id)
        local = [j for j, h in enumerate(rec.host_ids) if h != SPILLED and j > 0]
        return local[-num_blocks:] if num_blocks else []

    def spill(self, session_id: str, logical: list[int], peer: str) -> bool:
        """Move blocks of an idle session to node ``peer``'s store, in batches streamed to it.
        False (the peer's copies dropped, nothing moved) when a turn pinned the session or it
        was deleted meanwhile."""
        with self.lock:
            rec = self.table.get(session_id)
            if rec.pins or session_id in self._spilling:
                raise CacheFullError(f"session {session_id} is in use and cannot spill")
            local = [rec.host_ids[j] for j in logical]
            self._spilling.add(session_id)
        owner = f"spill:{self.node_id}:{session_id}"
        batch = batch_blocks(self.layout.block_bytes)
        batches = (self.read_runs(local[s:s + batch]) for s in range(0, len(local), batch))
        peer_store = self.stores.store(peer)
        t0 = time.perf_counter()
        try:
            remote_ids = peer_store.write_batches(owner, batches)
        finally:
            with self.lock:
                self._spilling.discard(session_id)
        with self.lock:
            self.spill_s += time.perf_counter() - t0
            if self.table.records.get(session_id) is rec and not rec.pins:
                for j, rid in zip(logical, remote_ids):
                    rec.host_ids[j] = SPILLED
                    self.remote.setdefault(session_id, {})[j] = (peer, rid)
                self.table.free.extend(local)
                return True
        peer_store.drop_foreign(owner, remote_ids)
        return False

    def spill_session(self, session_id: str, num_blocks: int, peer: str) -> list[int]:
        """Move the last ``num_blocks`` local blocks of an idle session to ``peer``'s store
        (what ``make_room`` does under pressure); returns their logical ids."""
        logical = self.spill_plan(session_id, num_blocks)
        self.spill(session_id, logical, peer)
        return logical

    def missing(self, session_id: str) -> dict[str, list[tuple[int, int]]]:
        """Blocks of a session not in this arena: node id -> [(logical, id there)]."""
        staged = self.staged.get(session_id, {})
        out: dict[str, list[tuple[int, int]]] = {}
        for j, (peer, rid) in sorted(self.remote.get(session_id, {}).items()):
            if j not in staged:
                out.setdefault(peer, []).append((j, rid))
        return out

    def stage(self, session_id: str, logical: list[int] | None = None, plan: bool = False) -> int:
        """Copy the session's spilled blocks (all, or those of ``logical``) into this arena;
        returns the number of blocks fetched. ``plan``: a prefetch plan from the Indexer (the
        blocks its next cycles want), counted as prefetched; fetches without a plan happen at
        use time and are counted as such. Staged copies stay until the session is deleted or
        ``make_room`` needs their blocks (idle sessions' copies go first there).

        Blocks come in batches of ``BATCH_BYTES``, ``IN_FLIGHT`` on the way at once, each
        written here as it lands (into blocks leased to an in-flight owner, outside the lock);
        two stages of one session run one after the other, the second fetching what is left."""
        self.table.get(session_id)
        with self._stage_lock(session_id):
            want = None if logical is None else set(logical)
            missing = {peer: [(j, rid) for j, rid in blocks if want is None or j in want]
                       for peer, blocks in self.missing(session_id).items()}
            self.make_room(sum(len(b) for b in missing.values()), keep=session_id)
            fetched = 0
            batch = batch_blocks(self.layout.block_bytes)
            for peer, blocks in missing.items():
                if not blocks:
                    continue
                landing = f"landing:{session_id}"
                with self.lock:
                    if session_id not in self.table.records:
                        break
                    ids = self.table.lease(landing, len(blocks))
                    self._drop_staged_of_evicted()
                t0 = time.perf_counter()
                try:
                    for start, rows in self.stores.store(peer).read_batches([rid for _, rid in blocks], batch):
                        self.arena.write(ids[start:start + num_rows(rows)], rows)
                except BaseException:
                    with self.lock:
                        self.table.give_back(landing, ids)
                    raise
                with self.lock:
                    self.stage_s += time.perf_counter() - t0
                    if session_id not in self.table.records:  # deleted meanwhile
                        self.table.give_back(landing, ids)
                        break
                    self.table.transfer(landing, f"stage:{session_id}", ids)
                    self.staged.setdefault(session_id, {}).update({j: i for (j, _), i in zip(blocks, ids)})
                    self.blocks_received += len(ids)
                    fetched += len(ids)
            with self.lock:
                if plan:
                    self.blocks_prefetched += fetched
                else:
                    self.blocks_fetched_at_use += fetched
            return fetched

    def _stage_lock(self, session_id: str) -> threading.Lock:
        with self.lock:
            if len(self._stage_locks) > 10_000:  # forget idle ones
                for key in [k for k, lock in self._stage_locks.items() if not lock.locked()]:
                    del self._stage_locks[key]
            return self._stage_locks.setdefault(session_id, threading.Lock())

    def _drop_staged(self, session_id: str) -> None:
        if self.staged.pop(session_id, None) is not None:
            self.table.drop_owner(f"stage:{session_id}")
