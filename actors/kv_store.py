"""The node's host KV store: one block arena in shared memory, the sessions it holds.

    /dev/shm/lsa-kv-<cluster>-<node>.arena   [N blocks of K/V][N key summaries]
        ^ mapped by every DecodeWorker on the node (torch.from_file(shared=True)): no copy

``KVStoreCore`` is plain Python (tests drive it directly); ``KVStore`` is the Ray actor,
exactly one per node (actors/placement.py), detached so that it outlives the workers.

Host ids go three ways: free, leased to a worker's engine (in-flight sequences), or owned
by a session (its complete context blocks). A session's blocks can also live in another
node's store (*spilled*, when this node's arena was full); the Indexer's prefetch plan
*stages* them back into this arena before a turn needs them. Blocks travel between nodes as
tensors through the Ray object store.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

import lsa_env
from actors import lazy_attr
from engine.errors import CacheFullError
from actors.session_table import SessionTable
from engine.host_arena import ArenaLayout, HostArena

SPILLED = -1  # host id of a block held by another store


@dataclass(frozen=True)
class SessionView:
    """What a worker needs of a pinned session (a small message between actors)."""

    session_id: str
    context_ids: list[int]
    host_ids: list[int]  # this arena, logical order; SPILLED where not staged yet

    @property
    def complete(self) -> bool:
        return SPILLED not in self.host_ids


def arena_path(cluster: str, node: str, directory: str | None = None) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"lsa-kv-{cluster}-{node}")
    return os.path.join(directory or lsa_env.kv_dir(), name + ".arena")


class KVStoreCore:
    """``fetch(store_key, host_ids) -> (data, summary)`` reads blocks from another store;
    ``peers() -> [(store_key, free blocks)]`` lists the other stores, and ``write(store_key,
    owner, data, summary) -> ids`` stores blocks there: with both, a full arena spills idle
    sessions to the peer with the most room before it evicts anything. (The actor passes
    Ray calls; tests pass dict lookups.)"""

    def __init__(self, key: str, layout: ArenaLayout, capacity_bytes: int, path: str, fetch=None,
                 peers=None, write=None):
        self.key = key
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
        self.fetch = fetch
        self.peers = peers
        self.write = write
        self.num_spilled = 0  # blocks spilled to make room
        self.lock = threading.RLock()
        self.remote: dict[str, dict[int, tuple[str, int]]] = {}  # session -> logical -> (store, id)
        self.staged: dict[str, dict[int, int]] = {}  # session -> logical -> local id
        self.planned: dict[str, set[int]] = {}  # session -> logical blocks a prefetch plan staged
        self.blocks_prefetched = self.blocks_fetched_at_use = 0
        self.foreign: dict[str, list[int]] = {}  # blocks held for other stores' sessions
        self.blocks_sent = self.blocks_received = 0

    # -- what a worker needs --------------------------------------------------------------

    def info(self) -> dict:
        lay = self.layout
        return {"key": self.key, "path": self.path, "num_blocks": self.num_blocks, "block_bytes": lay.block_bytes,
                "layout": lay}

    def lease(self, owner: str, n: int) -> list[int]:
        """``n`` free blocks for ``owner``: spilling idle sessions to peers first when the
        arena is short, evicting idle sessions (LRU) only when no peer has room."""
        self.make_room(n)
        with self.lock:
            ids = self.table.lease(owner, n)
            for sid in [s for s in self.staged if s not in self.table.records]:  # evicted: its copies go too
                self.staged.pop(sid)
                self.planned.pop(sid, None)
                self.table.drop_owner(f"stage:{sid}")
            return ids

    def make_room(self, n: int, keep: str | None = None) -> int:
        """Drop staged copies of idle sessions, then spill idle sessions other than ``keep``
        (least recently used first; their last blocks, the sinks stay) to the peer store with
        the most free blocks, until ``n`` blocks are free here or no peer has room. Returns the
        blocks spilled. Peer calls run outside the lock."""
        with self.lock:  # staged copies of idle sessions are caches (the peer keeps the block): first
            for sid in [s for s in self.staged if s != keep and getattr(self.table.records.get(s), "pins", 0) == 0]:
                if self.table.num_free >= n:
                    break
                self._drop_staged(sid)
        spilled = 0
        while self.peers is not None and self.write is not None and self.table.num_free < n:
            with self.lock:
                idle = [sid for sid in self.table.idle_sessions() if sid != keep and self.spill_plan(sid, 1)]
            peers = [p for p in self.peers() if p[1] > 0]
            if not idle or not peers:
                break
            peer, room = max(peers, key=lambda p: p[1])
            sid = idle[0]
            with self.lock:
                logical = self.spill_plan(sid, min(room, n - self.table.num_free))
            if not logical:
                break
            self.spill(sid, logical, peer, lambda d, s, p=peer, o=f"spill:{self.key}:{sid}": self.write(p, o, d, s))
            spilled += len(logical)
        self.num_spilled += spilled
        return spilled

    def give_back(self, owner: str, ids: list[int]) -> None:
        with self.lock:
            self.table.give_back(owner, ids)

    def drop_owner(self, owner: str) -> int:
        with self.lock:
            return self.table.drop_owner(owner)

    def put(self, owner: str, sid: str, tokens: list[int], host_ids: list[int]) -> None:
        with self.lock:
            self.table.put(owner, sid, tokens, host_ids)

    def view(self, sid: str) -> SessionView:
        rec = self.table.get(sid)
        ids = list(rec.host_ids)
        for j, local in self.staged.get(sid, {}).items():
            ids[j] = local
        return SessionView(sid, list(rec.context_ids), ids)

    def pin(self, sid: str) -> SessionView:
        with self.lock:
            self.table.pin(sid)
            return self.view(sid)

    def unpin(self, sid: str) -> None:
        with self.lock:
            self.table.unpin(sid)
            rec = self.table.records.get(sid)
            if rec is not None and rec.pins == 0:
                self._drop_staged(sid, keep_planned=True)

    def has(self, sid: str) -> bool:
        return sid in self.table.records

    def delete(self, sid: str) -> bool:
        with self.lock:
            self._drop_staged(sid)
            self.remote.pop(sid, None)
            return self.table.delete(sid)

    def stats(self) -> dict:
        with self.lock:
            s = self.table.stats()
            spilled = sum(len(r) for r in self.remote.values())
            return {**s, "key": self.key, "capacity_bytes": self.num_blocks * self.layout.block_bytes,
                    "session_bytes": s["session_blocks"] * self.layout.block_bytes,
                    "free_bytes": s["free_blocks"] * self.layout.block_bytes, "spilled_blocks": spilled,
                    "staged_blocks": sum(len(v) for v in self.staged.values()),
                    "foreign_blocks": sum(len(v) for v in self.foreign.values()),
                    "blocks_sent": self.blocks_sent, "blocks_received": self.blocks_received,
                    "blocks_spilled": self.num_spilled, "blocks_prefetched": self.blocks_prefetched,
                    "blocks_fetched_at_use": self.blocks_fetched_at_use}

    # -- serving blocks to other nodes ----------------------------------------------------

    def read_blocks(self, host_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of blocks: (data [n, L, 2, H, B, D], summary [n, L, 3, H, D])."""
        idx = torch.tensor(host_ids, dtype=torch.long)
        with self.lock:
            self.blocks_sent += len(host_ids)
            return self.arena.host[idx].clone(), self.arena.summary[idx].clone()

    def write_blocks(self, owner: str, data: torch.Tensor, summary: torch.Tensor) -> list[int]:
        """Store blocks for ``owner`` (another store's spilled session); returns their ids."""
        with self.lock:
            ids = self.table.lease(owner, data.shape[0])
            idx = torch.tensor(ids, dtype=torch.long)
            self.arena.host[idx] = data
            self.arena.summary[idx] = summary
            self.foreign.setdefault(owner, []).extend(ids)
            self.blocks_received += len(ids)
            return ids

    # -- spilling and staging -------------------------------------------------------------

    def spill_plan(self, sid: str, num_blocks: int) -> list[int]:
        """The session's last ``num_blocks`` local blocks (logical ids): sinks stay home."""
        rec = self.table.get(sid)
        local = [j for j, h in enumerate(rec.host_ids) if h != SPILLED and j > 0]
        return local[-num_blocks:] if num_blocks else []

    def spill(self, sid: str, logical: list[int], peer: str, write) -> None:
        """Move blocks of an idle session to store ``peer`` (``write(data, summary) -> ids``)."""
        with self.lock:
            rec = self.table.get(sid)
            if rec.pins:
                raise CacheFullError(f"session {sid} is in use and cannot spill")
            local = [rec.host_ids[j] for j in logical]
            data, summary = self.read_blocks(local)
        remote_ids = write(data, summary)
        with self.lock:
            for j, rid in zip(logical, remote_ids):
                rec.host_ids[j] = SPILLED
                self.remote.setdefault(sid, {})[j] = (peer, rid)
            self.table.free.extend(local)

    def missing(self, sid: str) -> dict[str, list[tuple[int, int]]]:
        """Blocks of a session not in this arena: store -> [(logical, id there)]."""
        staged = self.staged.get(sid, {})
        out: dict[str, list[tuple[int, int]]] = {}
        for j, (peer, rid) in sorted(self.remote.get(sid, {}).items()):
            if j not in staged:
                out.setdefault(peer, []).append((j, rid))
        return out

    def stage(self, sid: str, logical: list[int] | None = None, plan: bool = False) -> int:
        """Copy the session's spilled blocks (all, or those of ``logical``) into this arena;
        returns the number of blocks fetched. ``plan``: a prefetch plan from the Indexer
        (the blocks its next cycles want): those copies stay after the turn, until the
        session is deleted; other staged copies are dropped when the session is idle again.
        Fetches without a plan happen at use time and are counted as such."""
        self.table.get(sid)
        want = None if logical is None else set(logical)
        missing = {peer: [(j, rid) for j, rid in blocks if want is None or j in want]
                   for peer, blocks in self.missing(sid).items()}
        self.make_room(sum(len(b) for b in missing.values()), keep=sid)
        fetched = 0
        for peer, blocks in missing.items():
            if not blocks:
                continue
            data, summary = self.fetch(peer, [rid for _, rid in blocks])
            with self.lock:
                if sid not in self.table.records:
                    break
                ids = self.table.lease(f"stage:{sid}", len(blocks))
                idx = torch.tensor(ids, dtype=torch.long)
                self.arena.host[idx] = data
                self.arena.summary[idx] = summary
                self.staged.setdefault(sid, {}).update({j: i for (j, _), i in zip(blocks, ids)})
                self.blocks_received += len(ids)
                fetched += len(ids)
        with self.lock:
            if plan and want is not None:
                self.planned.setdefault(sid, set()).update(j for j in want if j in self.remote.get(sid, {}))
            if plan:
                self.blocks_prefetched += fetched
            else:
                self.blocks_fetched_at_use += fetched
        return fetched

    def _drop_staged(self, sid: str, keep_planned: bool = False) -> None:
        staged = self.staged.pop(sid, None)
        if staged is None:
            return
        keep = self.planned.get(sid, set()) if keep_planned else set()
        drop = [i for j, i in staged.items() if j not in keep]
        kept = {j: i for j, i in staged.items() if j in keep}
        self.table.give_back(f"stage:{sid}", drop)
        if kept:
            self.staged[sid] = kept
        else:
            self.table.drop_owner(f"stage:{sid}")
            self.planned.pop(sid, None)


# ---------------------------------------------------------------- the Ray actor


def store_name(node_id: str) -> str:
    from actors.placement import actor_name

    return actor_name("kvstore", node_id)


def _make_actor():
    import ray

    @ray.remote(max_concurrency=16)
    class KVStore(KVStoreCore):
        """One per node: ``ensure_per_node(KVStore, "kvstore", cluster, capacity, layout)``."""

        def __init__(self, cluster: str, capacity_bytes: int, layout: ArenaLayout, directory: str | None = None):
            node = ray.get_runtime_context().get_node_id()
            super().__init__(node, layout, capacity_bytes, arena_path(cluster, node, directory), fetch=self._fetch,
                             peers=self._peers_by_room, write=self._write)
            self.namespace = ray.get_runtime_context().namespace
            self.owners: dict[str, str] = {}  # lease owner -> actor id, to reap dead workers

        def _peer(self, node: str):
            return ray.get_actor(store_name(node), namespace=self.namespace)

        def _fetch(self, node: str, ids: list[int]):
            return ray.get(self._peer(node).read_blocks.remote(ids))

        def _write(self, node: str, owner: str, data, summary) -> list[int]:
            return ray.get(self._peer(node).write_blocks.remote(owner, data, summary))

        def node_id(self) -> str:
            return self.key

        def attach(self, owner: str, actor_id: str | None) -> dict:
            self.reap()
            if actor_id:
                self.owners[owner] = actor_id
            return self.info()

        def reap(self) -> int:
            """Free the leases of workers whose actor died."""
            freed = 0
            for owner, actor_id in list(self.owners.items()):
                info = ray._private.state.state.actor_table(actor_id)
                if info and info.get("State") == "DEAD":
                    freed += self.drop_owner(owner)
                    del self.owners[owner]
            return freed

        def lease(self, owner: str, n: int) -> list[int]:
            if self.table.num_free < n:
                self.reap()  # blocks leased to dead workers first
            return super().lease(owner, n)

        def _peers_by_room(self) -> list[tuple[str, int]]:
            out = []
            for node in ray.nodes():
                if not node["Alive"] or node["NodeID"] == self.key:
                    continue
                try:
                    stats = ray.get(self._peer(node["NodeID"]).stats.remote(), timeout=5)
                except Exception:
                    continue
                if stats["free_blocks"] > 0:
                    out.append((node["NodeID"], stats["free_blocks"]))
            return sorted(out, key=lambda p: -p[1])

        def delete(self, sid: str) -> bool:
            for peer, _ in self.missing(sid).items():
                try:
                    self._peer(peer).drop_foreign.remote(f"spill:{self.key}:{sid}")
                except Exception:
                    pass
            return super().delete(sid)

        def drop_foreign(self, owner: str) -> None:
            with self.lock:
                self.foreign.pop(owner, None)
                self.table.drop_owner(owner)

        def spill_session(self, sid: str, num_blocks: int, peer: str) -> list[int]:
            """Move the last ``num_blocks`` local blocks of an idle session to ``peer``'s store
            (what ``make_room`` does under pressure); returns their logical ids."""
            logical = self.spill_plan(sid, num_blocks)
            handle = self._peer(peer)
            self.spill(sid, logical, peer,
                       lambda d, s: ray.get(handle.write_blocks.remote(f"spill:{self.key}:{sid}", d, s)))
            return logical

        def stage_session(self, sid: str) -> int:
            return self.stage(sid)

        def stage_plan(self, sid: str, logical: list[int]) -> int:
            return self.stage(sid, logical, plan=True)

    return KVStore


__getattr__ = lazy_attr("KVStore", _make_actor)
