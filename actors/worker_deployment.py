"""The DecodeWorker Serve deployment: a ``DecodeWorkerCore`` per replica (one per GPU), the
node's KVStore found (or created) with node affinity, the Indexer for prefetch plans (each
LSA cycle's plan is reported to it in batches by a background thread).

Replicas publish ``{"sessions", "prefixes", "free_kv_bytes"}`` through ``record_routing_stats``
so that ``KVLocalityRouter`` (cluster/router.py) sends a session's turns back here, and a
stateless request to the replica whose store holds its prompt's longest prefix. Each answer, a
``TurnResult``, carries ``replica``, ``held`` (this replica's own record: it created or served
the session before this turn) and ``cached_tokens`` (prompt tokens loaded, not computed).

The same class is the ``PrefillWorker`` deployment when ``prefill_workers > 0`` (role
``"prefill"``, docs/cluster.md "Disaggregated prefill"): it creates sessions (the context
prefilled, its complete blocks into its node's store) and refuses turns and stateless requests
with a typed error; a decode worker then adopts such a session from the store at its first turn
(actors/session_recovery.py: pinned on the same node, copied from the prefill node's store on
another), without prefilling it again.

A caller that goes away cancels its call (Serve cancels the replica's task when the HTTP client
disconnects): the awaited future is cancelled with it, and the request's sequence is aborted
before the next engine step. When the node's store dies, the worker moves to a new one
(actors/store_healing.py); its health check fails while no store answers.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace

import ray
from ray import serve

import lsa_env

from actors.config import ServeConfig
from actors.decode_worker import DecodeWorkerCore
from actors.messages import TurnResult, WorkerStats
from actors.plans import PlanReporter
from actors.session_store import STORE_PREFIX, RayStore, RayStores
from engine.errors import InvalidRequestError, SessionNotFound, StoreUnavailable
from engine.sampling import SamplingParams

INDEXER_NAME = "lsa-indexer"
DECODE, PREFILL = "decode", "prefill"  # a worker's role: sessions' turns and stateless requests, or sessions' prefill
log = logging.getLogger("ray.serve")


def place_stores(cfg: ServeConfig, layout, node_filter=lambda node: True) -> dict:
    """Handles of the KVStore actors of the alive nodes ``node_filter`` accepts, created where
    missing (actors/placement.py): the one call that places stores, for workers and the app."""
    from actors.kv_store_actor import KVStore
    from actors.placement import ensure_per_node

    return ensure_per_node(KVStore, STORE_PREFIX, cfg.cluster, cfg.kv_store_bytes, layout, cfg.kv_dir,
                           cfg.session_ttl_s, node_filter=node_filter, num_cpus=0)


def node_store(cfg: ServeConfig, node_id: str, layout):
    """The handle of node ``node_id``'s KVStore actor, created if it has none yet."""
    return place_stores(cfg, layout, node_filter=lambda n: n["NodeID"] == node_id)[node_id]


def indexer_handle():
    from actors.directory import HEAD
    from actors.indexer import Indexer

    # on the head node, which outlives worker nodes (as the session directory does); never in the
    # placement group of the replica that asks first (a tensor-parallel worker's captures its children)
    return Indexer.options(name=INDEXER_NAME, get_if_exists=True, lifetime="detached", num_cpus=0,
                           resources={HEAD: 0.001}, scheduling_strategy="DEFAULT").remote()


async def stream_request(start, answer):
    """Run ``start(on_text)`` (a core's request, a future): yield its text as it grows, then
    ``answer(result)``. A consumer that goes away (or the end) cancels the request.

    One queue carries the text and the end (the future's done callback), so a token costs the
    event loop one wake-up and one ``get``, not a ``wait`` over two futures; texts queued while
    the consumer was busy are yielded as one piece (each is the whole text so far). The loop
    shares the GIL with the replica's decode loop: what it does per token shows in the ITL."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    ended = object()
    sent = 0

    def on_text(text: str, done: bool) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    request = start(on_text)
    request.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, ended))
    try:
        while True:
            item = await pieces.get()
            while item is not ended and not pieces.empty():
                item = pieces.get_nowait()  # the newest text (or the end) supersedes the queued ones
            if item is ended:
                result = request.result()  # done: raises the request's error
                if len(result.text) > sent:
                    yield result.text[sent:]
                yield answer(result)
                return
            if len(item) > sent:
                yield item[sent:]
                sent = len(item)
    finally:  # the consumer went away (or the stream ended): a running request is aborted
        request.cancel()


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class DecodeWorker:
    role = DECODE  # or PREFILL (``__init__``'s ``role``)

    def __init__(self, cfg: ServeConfig, role: str = DECODE):
        from engine.factory import arena_layout, build_engine

        if role not in (DECODE, PREFILL):
            raise InvalidRequestError(f"a worker's role is {DECODE!r} or {PREFILL!r}, not {role!r}")
        self.role = role

        if cfg.torch_threads:
            import torch
            torch.set_num_threads(cfg.torch_threads)
        sys.setswitchinterval(lsa_env.gil_switch_s())  # the decode loop waits less for the GIL
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.owner = f"worker:{self.replica}" if role == DECODE else f"prefill:{self.replica}"
        self._actor_id = context.get_actor_id()
        self._cfg, self._layout = cfg, arena_layout(cfg.engine)
        self.indexer = indexer_handle()
        # per-cycle plans go to the Indexer in batches, fire-and-forget: the decode loop never waits
        plans = PlanReporter(self.indexer.report_plans.remote) if role == DECODE else None  # prefill: no cycles
        self.core = DecodeWorkerCore.build(lambda arena: build_engine(cfg.engine, arena), self._resolve_store(),
                                           self.owner, pin=cfg.engine.device_name.startswith("cuda"),
                                           stores=RayStores(context.namespace), prefetch=self._prefetch, plans=plans,
                                           prefix_reuse=cfg.prefix_reuse, resolve_store=self._resolve_store,
                                           context_of=self._context_of)
        for warning in self.core.warnings:
            log.warning("decode worker %s: %s", self.replica, warning)
        # kernels compiled and decode graphs captured now: Serve routes nothing here until __init__ returns
        self.warm_up = self.core.warm_up(decode=role == DECODE)
        self.held: set[str] = set()  # sessions created or served here (a prefill worker hands its sessions on)

    def _resolve_store(self) -> RayStore:
        """This node's store (a new one where the last one died), attached: its leases die with this worker."""
        handle = node_store(self._cfg, self.node_id, self._layout)
        ray.get(handle.attach.remote(self.owner, self._actor_id), timeout=30)
        return RayStore(handle)

    @property
    def store(self) -> RayStore:
        return self.core.store

    def _context_of(self, session_id: str) -> list[int] | None:
        """The session's context ids from the session directory (a turn does not carry them)."""
        from actors.directory import directory_handle

        entry = ray.get(directory_handle(self._cfg.session_ttl_s).get.remote(session_id))
        return entry.context_ids if entry is not None else None

    def _prefetch(self, session_id: str) -> int:
        """The Indexer stages the session's spilled blocks on this node (and counts them)."""
        return ray.get(self.indexer.prefetch.remote(session_id, self.node_id))

    # -- what Serve and the router call ---------------------------------------------------

    async def record_routing_stats(self) -> dict:
        return await asyncio.to_thread(self._routing_stats)

    def _routing_stats(self) -> dict:
        try:
            store = self.store.stats()
            checked = sorted(self.held)
            self.held.difference_update(set(checked) - set(self.store.holding(checked)))  # evicted, deleted
            prefixes = self.core.held_prefix_keys()
        except StoreUnavailable:
            self.core.healing.store_lost()
            raise
        self.indexer.report_worker.remote(self.replica, replace(self.core.stats(), sessions=len(self.held),
                                                                store=store))
        # room for sessions: blocks leased to engines for requests in flight come back soon; prefix
        # blocks are evicted before any session
        return {"sessions": sorted(self.held), "prefixes": prefixes,
                "free_kv_bytes": store.capacity_bytes - store.session_bytes}

    def record_replica_metadata(self) -> dict:
        return {"kv_capacity_bytes": self.core.sessions.arena_blocks * self._layout.block_bytes,
                "node_id": self.node_id, "block_size": self.core.sessions.block_size}

    async def check_health(self) -> None:
        """Fails while the decode loop is dead or no node store answers (a dead one is replaced)."""
        if not self.core._thread.is_alive():
            raise RuntimeError("the decode loop died")
        if not self.core.healing.ready:
            raise RuntimeError(f"this worker's node KV store is down; a new one is coming up "
                               f"({self.core.healing.last_error})")
        try:
            await asyncio.to_thread(self.store.ping, 5.0)
        except StoreUnavailable as exc:
            self.core.healing.store_lost()
            raise RuntimeError(f"this worker's node KV store does not answer ({exc}); healing") from None

    def stats(self) -> WorkerStats:
        """The worker's counters now (``running``, ``queue``: what is in flight)."""
        return replace(self.core.stats(), sessions=len(self.held))

    def _answer(self, result: TurnResult, held: bool = False) -> TurnResult:
        return replace(result, replica=self.replica, node_id=self.node_id, held=held)

    def _decode_only(self, what: str) -> None:
        if self.role == PREFILL:
            raise InvalidRequestError(f"{what} goes to a decode worker: this is a prefill worker, which only creates "
                                      f"sessions", code="prefill_worker")

    async def create_session(self, session_id: str, context_ids: list[int], kv_bytes: int = 0) -> TurnResult:
        """``kv_bytes``: the session's expected KV (read by the router to place it)."""
        result = await asyncio.wrap_future(self.core.create_session(session_id, context_ids))
        if self.role == DECODE:
            self.held.add(session_id)
        return self._answer(result, held=True)

    async def ask(self, session_id: str, question_ids: list[int], params: SamplingParams,
                  context_ids: list[int] | None = None, holder: str | None = None, kv_bytes: int = 0) -> TurnResult:
        """``holder``: the replica the session directory names (a routing hint, read by the router);
        ``kv_bytes``: the session's KV, reserved by the router where it places a turn of a
        session no decode worker holds yet (one a prefill worker created)."""
        self._decode_only("a session's turn")
        held = session_id in self.held
        try:
            result = await asyncio.wrap_future(self.core.ask(session_id, question_ids, params, context_ids))
        except SessionNotFound:
            self.held.discard(session_id)
            raise
        self.held.add(session_id)
        return self._answer(result, held=held)

    async def delete_session(self, session_id: str) -> bool:
        self.held.discard(session_id)
        if await asyncio.wrap_future(self.core.delete_session(session_id)):
            return True
        return await asyncio.to_thread(self._delete_elsewhere, session_id)

    def _delete_elsewhere(self, session_id: str) -> bool:
        """A session this node's store does not hold, held by another's (a prefill worker there
        created it and no turn brought it here yet): deleted there."""
        stores = self.core.stores
        node = stores.holder(session_id, self.node_id) if stores is not None else None
        return node is not None and stores.store(node).delete(session_id)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> TurnResult:
        self._decode_only("a stateless request")
        return self._answer(await asyncio.wrap_future(self.core.generate(prompt_ids, params)))

    async def stream(self, prompt_ids: list[int], params: SamplingParams):
        """Yields text pieces, then the ``TurnResult``."""
        self._decode_only("a stateless request")
        async for item in self._streamed(lambda on_text: self.core.generate(prompt_ids, params, on_text=on_text)):
            yield item

    async def ask_stream(self, session_id: str, question_ids: list[int], params: SamplingParams,
                         context_ids: list[int] | None = None, holder: str | None = None, kv_bytes: int = 0):
        """``ask``, streamed: yields text pieces as the turn decodes, then the ``TurnResult``."""
        self._decode_only("a session's turn")
        held = session_id in self.held
        try:
            async for item in self._streamed(lambda on_text: self.core.ask(session_id, question_ids, params,
                                                                           context_ids, on_text=on_text)):
                yield replace(item, held=held) if isinstance(item, TurnResult) else item
        except SessionNotFound:
            self.held.discard(session_id)
            raise
        self.held.add(session_id)

    def _streamed(self, start):
        return stream_request(start, self._answer)

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
