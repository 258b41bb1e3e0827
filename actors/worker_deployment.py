"""The DecodeWorker Serve deployment: a ``DecodeWorkerCore`` per replica (one per GPU), the
node's KVStore found (or created) with node affinity, the Indexer for prefetch plans (each
LSA cycle's plan is reported to it in batches by a background thread).

Replicas publish ``{"sessions", "free_kv_bytes"}`` through ``record_routing_stats`` so that
``KVLocalityRouter`` (cluster/router.py) sends a session's turns back here. Each answer
carries ``replica`` and ``held`` (this replica's own record: it created or served the
session before this turn), which the tests check for every follow-up.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict

import ray
from ray import serve

from actors.decode_worker import DecodeWorkerCore
from actors.plans import PlanReporter
from actors.config import ServeConfig
from engine.sampling import SamplingParams
from engine.errors import SessionNotFound

INDEXER_NAME = "lsa-indexer"


class StoreProxy:
    """``KVStoreCore``'s interface over the node's KVStore actor (blocking calls)."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, name):
        method = getattr(self.handle, name)
        return lambda *a, **kw: ray.get(method.remote(*a, **kw))


def node_store(cfg: ServeConfig, node_id: str, layout):
    from actors.kv_store import KVStore
    from actors.placement import ensure_per_node

    handles = ensure_per_node(KVStore, "kvstore", cfg.cluster, cfg.kv_store_bytes, layout, cfg.kv_dir,
                              node_filter=lambda n: n["NodeID"] == node_id, num_cpus=0)
    return handles[node_id]


def indexer_handle():
    from actors.indexer import Indexer

    from actors.directory import HEAD

    # on the head node, which outlives worker nodes (as the session directory does)
    return Indexer.options(name=INDEXER_NAME, get_if_exists=True, lifetime="detached", num_cpus=0,
                           resources={HEAD: 0.001}).remote()


def sampling(body: dict) -> SamplingParams:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    return SamplingParams(**{k: body[k] for k in keys if body.get(k) is not None})


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class DecodeWorker:
    def __init__(self, cfg: ServeConfig):
        from engine.factory import arena_layout, build_engine

        if cfg.torch_threads:
            import torch
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.owner = f"worker:{self.replica}"
        self.store_handle = node_store(cfg, self.node_id, arena_layout(cfg.engine))
        self.store = StoreProxy(self.store_handle)
        ray.get(self.store_handle.attach.remote(self.owner, ctx.get_actor_id()))
        self.indexer = indexer_handle()
        # per-cycle plans go to the Indexer in batches, fire-and-forget: the decode loop never waits
        plans = PlanReporter(lambda batch: self.indexer.report_plans.remote(batch))
        self.core = DecodeWorkerCore.build(lambda arena: build_engine(cfg.engine, arena), self.store,
                                           self.owner, pin=cfg.engine.device_name.startswith("cuda"),
                                           prefetch=self._prefetch, locate=self._locate, plans=plans,
                                           node=self.node_id)
        self.held: set[str] = set()

    # -- helpers of the core --------------------------------------------------------------

    def _prefetch(self, sid: str) -> int:
        return ray.get(self.indexer.prefetch.remote(sid, self.node_id))

    def _locate(self, sid: str):
        """A session held by another node's store: its tokens and blocks, and how to drop it there."""
        from actors.kv_store import SPILLED, store_name

        for node in ray.nodes():
            if not node["Alive"] or node["NodeID"] == self.node_id:
                continue
            try:
                store = ray.get_actor(store_name(node["NodeID"]), namespace=ctx_namespace())
                if not ray.get(store.has.remote(sid), timeout=10):
                    continue
                view = ray.get(store.pin.remote(sid))
                try:
                    if SPILLED in view.host_ids:
                        ray.get(store.stage_session.remote(sid))
                        view = ray.get(store.view.remote(sid))
                    data, summary = ray.get(store.read_blocks.remote(view.host_ids))
                finally:
                    ray.get(store.unpin.remote(sid))
            except Exception:
                continue
            return view.context_ids, data, summary, lambda s=store: ray.get(s.delete.remote(sid))
        return None

    # -- what Serve and the router call ---------------------------------------------------

    def record_routing_stats(self) -> dict:
        stats = self.store.stats()
        self.held = {s for s in self.held if self.store.has(s)}
        worker = {**self.core.stats(), "sessions": len(self.held), "node": self.node_id, "store": stats}
        self.indexer.report_worker.remote(self.replica, worker)
        # room for sessions: blocks leased to engines for requests in flight come back soon
        return {"sessions": sorted(self.held), "free_kv_bytes": stats["capacity_bytes"] - stats["session_bytes"]}

    def record_replica_metadata(self) -> dict:
        return {"kv_capacity_bytes": self.store.info()["num_blocks"] * self.store.info()["block_bytes"],
                "node_id": self.node_id}

    def check_health(self) -> None:
        if not self.core._thread.is_alive():
            raise RuntimeError("the decode loop died")

    async def _await(self, fut):
        return await asyncio.wrap_future(fut)

    def _answer(self, result, **extra) -> dict:
        return {**asdict(result), "replica": self.replica, "node": self.node_id, **extra}

    async def create_session(self, session_id: str, context_ids: list[int], kv_bytes: int = 0) -> dict:
        result = await self._await(self.core.create_session(session_id, context_ids))
        self.held.add(session_id)
        return self._answer(result, held=True)

    async def ask(self, session_id: str, question_ids: list[int], params: dict,
                  context_ids: list[int] | None = None, holder: str | None = None) -> dict:
        """``holder``: the replica the session directory names (a routing hint, read by the router)."""
        held = session_id in self.held
        try:
            result = await self._await(self.core.ask(session_id, question_ids, sampling(params), context_ids))
        except SessionNotFound:
            self.held.discard(session_id)
            raise
        self.held.add(session_id)
        return self._answer(result, held=held)

    async def delete_session(self, session_id: str) -> bool:
        self.held.discard(session_id)
        return await self._await(self.core.delete_session(session_id))

    async def generate(self, ids: list[int], params: dict, session_id: str | None = None) -> dict:
        return self._answer(await self._await(self.core.generate(ids, sampling(params))))

    async def stream(self, ids: list[int], params: dict, session_id: str | None = None):
        """Yields text pieces, then a final dict (the whole result)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        sent = 0

        def on_text(text: str, done: bool) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        fut = self.core.generate(ids, sampling(params), on_text=on_text)
        done = asyncio.ensure_future(asyncio.wrap_future(fut))
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


def ctx_namespace() -> str:
    return ray.get_runtime_context().namespace
