"""The messages actors exchange: small frozen dataclasses of plain fields (str, int, float,
bool, lists and dicts of them, and other messages), so that ``dataclasses.asdict`` of any
of them packs with msgpack.

    KV store  --ArenaInfo, SessionView, StoreStats-->  decode worker
    worker    --PlanReport-->  Indexer  --stage(plan)-->  the worker's node store
    worker    --WorkerStats (with its store's StoreStats)-->  Indexer  -->  /metrics
    worker    --TurnResult-->  ingress
    session directory  --DirectoryEntry-->  ingress
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.host_arena import ArenaLayout

SPILLED = -1  # the host id of a session block held by another node's store


@dataclass(frozen=True)
class ArenaInfo:
    """What a node's store tells a worker, so that the worker maps the same arena."""

    node_id: str  # the store's node (its key among stores)
    path: str  # the arena file, mapped with ``HostArena.from_file``
    num_blocks: int
    layout: ArenaLayout

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes


@dataclass(frozen=True)
class SessionView:
    """What a worker needs of a pinned session."""

    session_id: str
    context_ids: list[int]
    host_ids: list[int]  # this arena, logical order; SPILLED where not staged yet

    @property
    def complete(self) -> bool:
        return SPILLED not in self.host_ids


@dataclass(frozen=True)
class PlanReport:
    """A worker's plan for a session's next cycle(s), for the Indexer."""

    worker: str
    node_id: str
    session_id: str
    blocks: list[int]  # logical context blocks the next cycle wants


@dataclass(frozen=True)
class StoreStats:
    """A node store's counters (blocks are arena blocks of ``block_bytes``)."""

    node_id: str
    sessions: int
    capacity_blocks: int
    block_bytes: int
    session_blocks: int  # owned by sessions held here
    leased_blocks: int  # leased to engines for requests in flight
    free_blocks: int
    evictions: int
    spilled_blocks: int  # blocks of sessions held here, kept by another store now
    staged_blocks: int  # copies of spilled blocks fetched back here
    foreign_blocks: int  # blocks kept here for other stores' sessions
    blocks_sent: int
    blocks_received: int
    blocks_spilled: int
    blocks_prefetched: int  # staged by a prefetch plan
    blocks_fetched_at_use: int  # staged by a turn that needed them
    prefix_blocks: int = 0  # blocks kept for prefix reuse (finished stateless requests)
    prefix_hits: int = 0  # requests that reused prefix blocks
    prefix_blocks_reused: int = 0
    expired: int = 0  # sessions deleted after their idle TTL
    stage_s: float = 0.0  # seconds spent staging blocks from other stores (its batches' wall time)
    spill_s: float = 0.0  # seconds spent spilling blocks to other stores

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_blocks * self.block_bytes

    @property
    def session_bytes(self) -> int:
        return self.session_blocks * self.block_bytes

    @property
    def free_bytes(self) -> int:
        return self.free_blocks * self.block_bytes

    @property
    def prefix_bytes(self) -> int:
        return self.prefix_blocks * self.block_bytes


@dataclass(frozen=True)
class WorkerStats:
    """A decode worker's counters; the deployment adds its node, sessions and store."""

    queue: int
    running: int
    device_kv_bytes: int
    device_kv_capacity_bytes: int
    full_kv_bytes: int
    host_kv_bytes_in_flight: int
    resident_fraction: float
    blocks_copied: int
    bytes_copied: int
    misses: int
    generated_tokens: int
    busy_s: float
    tokens_per_s: float
    prefill_tokens: int
    rebuilt: dict[str, int]  # sessions rebuilt: from another node's store, by prefill
    node_id: str = ""
    cached_tokens: int = 0  # prompt tokens loaded from the host KV (sessions, prefix blocks), not computed
    cancelled: int = 0  # requests cancelled (clients gone, sessions deleted)
    store_generation: int = 0  # times its node store was replaced under it
    warnings: list[str] = field(default_factory=list)  # what the operator should know (capacity)
    sessions: int = 0  # sessions this replica holds
    store: StoreStats | None = None
    memory: dict[str, int] = field(default_factory=dict)  # the worker process: pid, rss_bytes, gpu_allocated_bytes,
    # gpu_reserved_bytes, pinned_host_bytes (torch's pinned pool; the registered arena is not in it)
    host_copy: dict[str, float] = field(default_factory=dict)  # GB/s to the GPU measured at warm-up: arena,
    # arena_layer, pinned (engine/host_copy.py copy_probe); empty off CUDA


@dataclass(frozen=True)
class TurnResult:
    """A request's answer, from a worker to the ingress."""

    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    prefill_tokens: int  # prompt tokens computed by this request (the rest came from the KV store)
    prefill_s: float
    decode_s: float
    kv: dict = field(default_factory=dict)  # the engine's KV accounting and policy counters of the request
    replica: str = ""  # set by the deployment
    node_id: str = ""
    held: bool = False  # the replica held the session before this turn
    cached_tokens: int = 0  # prompt tokens loaded from the host KV (a session's, prefix blocks): not computed
    logprobs: list | None = None  # per generated token [id, logprob, [[id, logprob], ...]] when asked
    timings: dict = field(default_factory=dict)  # seconds per phase in the worker (``Request.timings``)


@dataclass(frozen=True)
class DirectoryEntry:
    """A session's record in the session directory (any ingress replica reads it)."""

    session_id: str
    context_ids: list[int]  # empty when asked without
    replica: str | None  # the DecodeWorker replica that holds its KV
    node_id: str | None
    num_tokens: int
    turns: int
    created: float
    last_used: float
    owner: str | None = None  # a digest of the API key that created it (None: no keys configured)
