"""The DecodeWorker Serve deployment: a ``DecodeWorkerCore`` per replica (one per GPU), the
node's KVStore found (or created) with node affinity, the Indexer for prefetch plans (each
LSA cycle's plan is reported to it in batches by a background thread).

Replicas publish ``{"sessions", "free_kv_bytes"}`` through ``record_routing_stats`` so that
``KVLocalityRouter`` (cluster/router.py) sends a session's turns back here. Each answer, a
``TurnResult``, carries ``replica`` and ``held`` (this replica's own record: it created or
served the session before this turn), which the tests check for every follow-up.
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

import ray
from ray import serve

from actors.config import ServeConfig
from actors.decode_worker import DecodeWorkerCore
from actors.messages import TurnResult
from actors.plans import PlanReporter
from actors.session_store import STORE_PREFIX, RayStore, RayStores
from engine.errors import SessionNotFound
from engine.sampling import SamplingParams

INDEXER_NAME = "lsa-indexer"


def node_store(cfg: ServeConfig, node_id: str, layout):
    """The handle of node ``node_id``'s KVStore actor, created if it has none yet."""
    from actors.kv_store import KVStore
    from actors.placement import ensure_per_node

    handles = ensure_per_node(KVStore, STORE_PREFIX, cfg.cluster, cfg.kv_store_bytes, layout, cfg.kv_dir,
                              node_filter=lambda n: n["NodeID"] == node_id, num_cpus=0)
    return handles[node_id]


def indexer_handle():
    from actors.directory import HEAD
    from actors.indexer import Indexer

    # on the head node, which outlives worker nodes (as the session directory does)
    return Indexer.options(name=INDEXER_NAME, get_if_exists=True, lifetime="detached", num_cpus=0,
                           resources={HEAD: 0.001}).remote()


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class DecodeWorker:
    def __init__(self, cfg: ServeConfig):
        from engine.factory import arena_layout, build_engine

        if cfg.torch_threads:
            import torch
            torch.set_num_threads(cfg.torch_threads)
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.owner = f"worker:{self.replica}"
        handle = node_store(cfg, self.node_id, arena_layout(cfg.engine))
        ray.get(handle.attach.remote(self.owner, context.get_actor_id()))  # its leases die with it
        self.store = RayStore(handle)
        self.indexer = indexer_handle()
        # per-cycle plans go to the Indexer in batches, fire-and-forget: the decode loop never waits
        plans = PlanReporter(self.indexer.report_plans.remote)
        self.core = DecodeWorkerCore.build(lambda arena: build_engine(cfg.engine, arena), self.store, self.owner,
                                           pin=cfg.engine.device_name.startswith("cuda"),
                                           stores=RayStores(context.namespace), prefetch=self._prefetch, plans=plans)
        # kernels compiled and decode graphs captured now: Serve routes nothing here until __init__ returns
        self.warm_up = self.core.warm_up()
        self.held: set[str] = set()  # sessions created or served here

    def _prefetch(self, session_id: str) -> int:
        """The Indexer stages the session's spilled blocks on this node (and counts them)."""
        return ray.get(self.indexer.prefetch.remote(session_id, self.node_id))

    # -- what Serve and the router call ---------------------------------------------------

    async def record_routing_stats(self) -> dict:
        return await asyncio.to_thread(self._routing_stats)

    def _routing_stats(self) -> dict:
        store = self.store.stats()
        checked = sorted(self.held)
        self.held.difference_update(set(checked) - set(self.store.holding(checked)))  # evicted, deleted
        self.indexer.report_worker.remote(self.replica, replace(self.core.stats(), sessions=len(self.held),
                                                                store=store))
        # room for sessions: blocks leased to engines for requests in flight come back soon
        return {"sessions": sorted(self.held), "free_kv_bytes": store.capacity_bytes - store.session_bytes}

    def record_replica_metadata(self) -> dict:
        return {"kv_capacity_bytes": self.store.info().capacity_bytes, "node_id": self.node_id}

    def check_health(self) -> None:
        if not self.core._thread.is_alive():
            raise RuntimeError("the decode loop died")

    def _answer(self, result: TurnResult, held: bool = False) -> TurnResult:
        return replace(result, replica=self.replica, node_id=self.node_id, held=held)

    async def create_session(self, session_id: str, context_ids: list[int], kv_bytes: int = 0) -> TurnResult:
        """``kv_bytes``: the session's expected KV (read by the router to place it)."""
        result = await asyncio.wrap_future(self.core.create_session(session_id, context_ids))
        self.held.add(session_id)
        return self._answer(result, held=True)

    async def ask(self, session_id: str, question_ids: list[int], params: SamplingParams,
                  context_ids: list[int] | None = None, holder: str | None = None) -> TurnResult:
        """``holder``: the replica the session directory names (a routing hint, read by the router)."""
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
        return await asyncio.wrap_future(self.core.delete_session(session_id))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> TurnResult:
        return self._answer(await asyncio.wrap_future(self.core.generate(prompt_ids, params)))

    async def stream(self, prompt_ids: list[int], params: SamplingParams):
        """Yields text pieces, then the ``TurnResult``."""
        async for item in self._streamed(lambda on_text: self.core.generate(prompt_ids, params, on_text=on_text)):
            yield item

    async def ask_stream(self, session_id: str, question_ids: list[int], params: SamplingParams,
                         context_ids: list[int] | None = None, holder: str | None = None):
        """``ask``, streamed: yields text pieces as the turn decodes, then the ``TurnResult``."""
        held = session_id in self.held
        try:
            async for item in self._streamed(lambda on_text: self.core.ask(session_id, question_ids, params,
                                                                           context_ids, on_text=on_text)):
                yield replace(item, held=held) if isinstance(item, TurnResult) else item
        except SessionNotFound:
            self.held.discard(session_id)
            raise
        self.held.add(session_id)

    async def _streamed(self, start):
        """Run ``start(on_text)`` (a core request): yield the text as it grows, then the result."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        sent = 0

        def on_text(text: str, done: bool) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        done = asyncio.ensure_future(asyncio.wrap_future(start(on_text)))
        while True:
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                text = getter.result()
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                continue
            getter.cancel()
            result = done.result()  # raises the request's error
            if len(result.text) > sent:
                yield result.text[sent:]
            yield self._answer(result)
            return

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
