"""Sessions: a long context prefilled once, then any number of turns on it.

    context   c0 ................................ c(n-1)
    blocks    | b0 | b1 | ... | b(k-1) | partial |         k = n // B complete blocks
    session   host ids h0 .. h(k-1), owned by the session (device slots released)
    turn      prompt = context + question; b0..b(k-1) are loaded from the host mirror,
              only the partial block (< B tokens) and the question are prefilled

After a turn the session keeps exactly its k context blocks; blocks holding question or
answer tokens are freed. Turns do not extend the context: every question is asked of the
same document.

Three pieces, plain Python (the KV store actor and the decode worker wrap them):

- ``HostArena``: the host mirror tensors (private, or a KV store's shared memory) and the
  allocator of their host ids.
- ``SessionTable``: who owns which host blocks: session records with LRU eviction of idle
  sessions, and leases of free blocks to engines. One per node (the KV store).
- ``SessionManager``: drives an ``LLMEngine``: a pool of leased host ids for in-flight
  sequences, session creation and turns, handing kept blocks to the table.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockAllocator
from engine.errors import CacheFullError, InvalidRequestError, SessionEvicted, SessionNotFound
from engine.sampling import SamplingParams
from engine.sequence import Sequence


class IdPool(BlockAllocator):
    """A ``BlockAllocator`` over an arbitrary, growable set of host ids."""

    def __init__(self, ids=()):
        super().__init__(what="host", ids=ids)

    def add(self, ids) -> None:
        """Ids leased into the pool."""
        ids = list(ids)
        self._free.extend(ids)
        self.num_blocks += len(ids)

    def take(self, n: int) -> list[int]:
        """Free ids leaving the pool (given back, or handed to a session)."""
        out = self.allocate(n)
        self.num_blocks -= n
        return out

    def forget(self, n: int) -> None:
        """``n`` allocated ids now belong to someone else (a session)."""
        self.num_blocks -= n


@dataclass(frozen=True)
class ArenaLayout:
    """Shapes of a host block arena; one block holds all layers of B tokens."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_elems(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim

    @property
    def summary_elems(self) -> int:
        return self.num_layers * 3 * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes in the arena: its K/V and its key summary."""
        return (self.block_elems + self.summary_elems) * self.itemsize

    def num_blocks(self, capacity_bytes: int) -> int:
        return max(0, capacity_bytes // self.block_bytes)

    def views(self, flat: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(host [N, L, 2, H, B, D], summary [N, L, 3, H, D]) over one flat buffer."""
        l, h, b, d = self.num_layers, self.num_kv_heads, self.block_size, self.head_dim
        data = flat[: num_blocks * self.block_elems].view(num_blocks, l, 2, h, b, d)
        summary = flat[num_blocks * self.block_elems: num_blocks * (self.block_elems + self.summary_elems)]
        return data, summary.view(num_blocks, l, 3, h, d)

    def as_tuple(self) -> tuple:
        """(layers, KV heads, head dim, block size, dtype name): the layout as a small message."""
        return (self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, str(self.dtype))

    @classmethod
    def of(cls, model_config, block_size: int, dtype: torch.dtype) -> ArenaLayout:
        return cls(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, block_size, dtype)


@dataclass
class HostArena:
    host: torch.Tensor  # [N, L, 2, H, B, D]
    summary: torch.Tensor  # [N, L, 3, H, D]
    allocator: IdPool

    @classmethod
    def private(cls, layout: ArenaLayout, num_blocks: int) -> HostArena:
        flat = torch.empty(num_blocks * (layout.block_elems + layout.summary_elems), dtype=layout.dtype)
        host, summary = layout.views(flat, num_blocks)
        return cls(host, summary, IdPool())

    @classmethod
    def from_file(cls, path: str, layout: ArenaLayout, num_blocks: int, pin: bool = False) -> HostArena:
        """Map a KV store's arena file without copying (``shared=True``: writes go to the file)."""
        numel = num_blocks * (layout.block_elems + layout.summary_elems)
        flat = torch.from_file(path, shared=True, size=numel, dtype=layout.dtype)
        if pin and torch.cuda.is_available():  # page-locked for DMA, still the same memory
            torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), numel * flat.element_size(), 0)
        host, summary = layout.views(flat, num_blocks)
        return cls(host, summary, IdPool())


# ---------------------------------------------------------------- the table (one per node)


@dataclass
class SessionRecord:
    id: str
    tokens: list[int]  # the context
    host_ids: list[int]  # complete context blocks in this arena, logical order
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0  # turns running on it: never evicted while pinned
    # host id < 0: the block is held by another node's store (actors/kv_store.py)


class SessionTable:
    """Host blocks of one arena: free, leased to engines, or owned by sessions.

    ``lease`` evicts idle sessions, least recently used first, when the free blocks do not
    suffice; a later ``pin`` of an evicted session raises ``SessionEvicted``."""

    def __init__(self, num_blocks: int, block_bytes: int, remember_evicted: int = 10_000):
        self.free = deque(range(num_blocks))
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.records: OrderedDict[str, SessionRecord] = OrderedDict()  # LRU first
        self.leases: dict[str, set[int]] = {}
        self.evicted: OrderedDict[str, str] = OrderedDict()
        self._remember = remember_evicted
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def session_bytes(self, sid: str) -> int:
        return sum(i >= 0 for i in self.records[sid].host_ids) * self.block_bytes

    def idle_sessions(self) -> list[str]:
        """Evictable sessions, least recently used first."""
        return [sid for sid, r in self.records.items() if r.pins == 0]

    def make_room(self, n: int) -> None:
        if n > self.num_blocks:
            raise CacheFullError(f"{n} host blocks wanted; the whole arena holds {self.num_blocks}")
        while len(self.free) < n:
            idle = self.idle_sessions()
            if not idle:
                raise CacheFullError(f"host KV arena is full ({self.num_blocks} blocks of {self.block_bytes} "
                                     f"bytes) and every session is in use; retry later")
            self.evict(idle[0], "least recently used idle session, evicted to make room in host KV")

    def evict(self, sid: str, reason: str) -> list[int]:
        rec = self.records.pop(sid)
        self.free.extend(i for i in rec.host_ids if i >= 0)  # < 0: held by another store
        self.evicted[sid] = reason
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

    def put(self, owner: str, sid: str, tokens: list[int], host_ids: list[int]) -> None:
        """A new session: ``host_ids`` (leased to ``owner``) now belong to it."""
        if sid in self.records:
            raise InvalidRequestError(f"session {sid} already exists")
        held = self.leases.get(owner, set())
        if any(i not in held for i in host_ids):
            raise ValueError(f"session {sid} names host blocks not leased to {owner}")
        held.difference_update(host_ids)
        self.records[sid] = SessionRecord(sid, list(tokens), list(host_ids))
        self.evicted.pop(sid, None)

    def get(self, sid: str) -> SessionRecord:
        rec = self.records.get(sid)
        if rec is None:
            if sid in self.evicted:
                raise SessionEvicted(f"session {sid} was evicted ({self.evicted[sid]}); create it again")
            raise SessionNotFound(f"no session {sid} here: create it first")
        return rec

    def pin(self, sid: str) -> SessionRecord:
        rec = self.get(sid)
        rec.pins += 1
        rec.last_used = time.monotonic()
        self.records.move_to_end(sid)
        return rec

    def unpin(self, sid: str) -> None:
        rec = self.records.get(sid)
        if rec is not None:
            rec.pins = max(0, rec.pins - 1)
            rec.last_used = time.monotonic()

    def delete(self, sid: str) -> bool:
        rec = self.records.pop(sid, None)
        if rec is None:
            return False
        self.free.extend(i for i in rec.host_ids if i >= 0)
        return True

    def stats(self) -> dict:
        used = sum(sum(i >= 0 for i in r.host_ids) for r in self.records.values())
        leased = sum(len(v) for v in self.leases.values())
        return {"sessions": len(self.records), "session_blocks": used, "leased_blocks": leased,
                "free_blocks": len(self.free), "capacity_blocks": self.num_blocks,
                "block_bytes": self.block_bytes, "evictions": self.num_evictions}


# ---------------------------------------------------------------- the engine side


@dataclass
class Turn:
    """A running request on the engine, and what to do with it when it finishes."""

    seq: Sequence
    session: str | None
    creates: bool  # prefills a new session (its blocks go to the table)
    context: list[int]
    prefill_tokens: int  # tokens this request prefills (the rest came from the host mirror)
    pool_need: int  # host blocks it may draw from the pool


class SessionManager:
    """Sessions and plain requests on one ``LLMEngine`` whose host allocator is ``pool``.

    ``table`` is a ``SessionTable`` or anything with its ``lease / give_back / put / pin /
    unpin / delete`` (the KV store actor's proxy). ``owner`` names this engine's lease."""

    def __init__(self, engine, table, pool: IdPool, owner: str = "engine", spare_blocks: int = 0):
        self.engine = engine
        self.table = table
        self.pool = pool
        self.owner = owner
        self.block_size = engine.cache.block_size
        self.spare_blocks = spare_blocks  # free pool blocks kept beyond what running requests need
        self.turns: dict[int, Turn] = {}
        self.prefill_tokens = 0  # tokens prefilled (not loaded) over all requests

    # -------------------------------------------------------- pool

    def _reserved(self) -> int:
        return sum(t.pool_need for t in self.turns.values())

    def _ensure_pool(self, need: int) -> None:
        # blocks the running requests may still draw, plus this one
        want = self._reserved() + need + self.spare_blocks
        drawn = sum(max(0, len(self.engine.cache.blocks.seqs[t.seq.seq_id].host_ids)
                        - len(t.seq.prefix_host_ids))
                    for t in self.turns.values() if t.seq.seq_id in self.engine.cache.blocks.seqs)
        missing = want - drawn - self.pool.num_free
        if missing > 0:
            self.pool.add(self.table.lease(self.owner, missing))

    def trim_pool(self) -> None:
        """Give idle free blocks back to the table when nothing runs."""
        if not self.turns and self.pool.num_free > self.spare_blocks:
            self.table.give_back(self.owner, self.pool.take(self.pool.num_free - self.spare_blocks))

    # -------------------------------------------------------- requests

    def _add(self, ids: list[int], params: SamplingParams, session: str | None, creates: bool,
             context: list[int], prefix: list[int], request_id: str = "") -> Sequence:
        need = self.engine.cache.blocks.blocks_for(len(ids) + params.max_tokens) - len(prefix)
        self._ensure_pool(need)
        seq = self.engine.add_request(ids, params, request_id=request_id)
        seq.prefix_host_ids = list(prefix)
        seq.keep_host_blocks = len(context) // self.block_size if creates else len(prefix)
        self.turns[seq.seq_id] = Turn(seq, session, creates, context, len(ids) - len(prefix) * self.block_size,
                                      need)
        return seq

    def generate(self, ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        return self._add(ids, params, None, False, [], [], request_id)

    def create(self, sid: str, context: list[int]) -> Sequence:
        """Prefill ``context`` once; when the sequence finishes the session exists."""
        if not context:
            raise InvalidRequestError("the session context is empty")
        return self._add(list(context), SamplingParams(max_tokens=1, ignore_eos=True), sid, True,
                         list(context), [])

    def ask(self, sid: str, question: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        """A turn: the session's context, then ``question``; only the partial context block and
        the question are prefilled."""
        if not question:
            raise InvalidRequestError("the question is empty")
        rec = self.table.pin(sid)
        try:
            if any(h < 0 for h in rec.host_ids):
                raise SessionNotFound(f"session {sid} has blocks on other nodes that were not staged")
            # a policy that observes the prompt's last queries (snapkv, lsa's first plan) sees
            # as many of them as a fresh request would: they are prefilled again
            window = max(1, self.engine.policy.prefill_window)
            prefix = list(rec.host_ids)[: max(0, len(rec.tokens) + len(question) - window) // self.block_size]
            return self._add(list(rec.tokens) + list(question), params, sid, False, list(rec.tokens), prefix,
                             request_id)
        except BaseException:
            self.table.unpin(sid)
            raise

    def delete(self, sid: str) -> bool:
        return self.table.delete(sid)

    # -------------------------------------------------------- stepping

    def finished(self, seqs: list[Sequence]) -> list[Turn]:
        """Call with what ``engine.step()`` returned (or aborted sequences): settles their
        blocks with the table and returns their turns."""
        done = []
        for seq in seqs:
            turn = self.turns.pop(seq.seq_id, None)
            if turn is None:
                continue
            self.prefill_tokens += turn.prefill_tokens
            if turn.creates:
                self.pool.forget(len(seq.kept_host_ids))
                if seq.finish_reason != "abort" and len(seq.kept_host_ids) == len(turn.context) // self.block_size:
                    self.table.put(self.owner, turn.session, turn.context, seq.kept_host_ids)
                else:  # never became a session: the blocks return to the table as leased free ones
                    self.pool.add(seq.kept_host_ids)
            elif turn.session is not None:
                self.table.unpin(turn.session)
            done.append(turn)
        return done

    def step(self) -> list[Turn]:
        return self.finished(self.engine.step())

    def run(self, seq: Sequence) -> Turn:
        """Step until ``seq`` finishes (other requests advance too)."""
        while True:
            for turn in self.step():
                if turn.seq is seq:
                    return turn


def local_sessions(engine_factory, layout: ArenaLayout, num_host_blocks: int, spare_blocks: int = 0):
    """An engine over a private arena with its own table: sessions in one process."""
    arena = HostArena.private(layout, num_host_blocks)
    engine = engine_factory(arena)
    table = SessionTable(num_host_blocks, layout.block_bytes)
    return SessionManager(engine, table, arena.allocator, spare_blocks=spare_blocks)
