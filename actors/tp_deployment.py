"""The decode-worker deployment when ``tensor_parallel_size = P > 1``: one Serve replica over P ranks.

    Serve replica (bundle 0: {CPU: worker_num_cpus, worker_resources})   placement group of the
      TensorParallelWorker -> TensorParallelWorkerCore (actors/tp_worker.py)    replica, STRICT_PACK,
        TensorParallelEngine (actors/tp_engine.py)                           made and removed by Serve
          RankActor 0 .. P-1 (bundles 1..P: {CPU: worker_num_cpus, GPU: worker_num_gpus})

Bound as the ``DecodeWorker`` deployment (same name, same methods as actors/worker_deployment.py),
so the ingress and the router need no change. It serves stateless completions and chats
(streamed too) and sessions: each rank keeps its ``1/P`` of every session's KV in a store of its
own (actors/tp_sessions.py, ``kv_store_bytes / P`` each), and every session call reaches all ranks
in lockstep. Like a one-GPU worker it publishes the sessions it holds and its free KV (the ranks'
stores, counted in whole-model bytes), so a session's turns go to it; no prefixes (no prefix
reuse on TP replicas). The health check fails once the group has failed (a rank died or hung):
Serve replaces the replica, and its placement group with its ranks.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import sys
from dataclasses import replace

import ray
from ray import serve

import lsa_env

from actors.config import ServeConfig
from actors.messages import TurnResult, WorkerStats
from actors.worker_deployment import indexer_handle, stream_request
from engine.errors import SessionNotFound
from engine.sampling import SamplingParams

log = logging.getLogger("ray.serve")


def check_tensor_parallel(cfg: ServeConfig) -> None:
    """Before any replica starts: the model's KV heads and MLP split over the ranks, and the
    policy is one that agrees across ranks (``TensorParallelError``, ``InvalidRequestError``)."""
    from engine.errors import InvalidRequestError
    from engine.factory import model_layout
    from engine.parallel import TensorParallel, shard_config
    from engine.parallel.engine import TP_POLICIES

    if cfg.tensor_parallel_size == 1:
        return
    shard_config(model_layout(cfg.engine)[0], TensorParallel(0, cfg.tensor_parallel_size))
    if cfg.engine.policy.name not in TP_POLICIES:
        raise InvalidRequestError(f"policy {cfg.engine.policy.name!r} is not supported with tensor parallelism "
                                  f"(tensor_parallel_size={cfg.tensor_parallel_size}); use one of "
                                  f"{', '.join(TP_POLICIES)}")


def rank_bundle(cfg: ServeConfig) -> dict:
    return {"CPU": cfg.worker_num_cpus, **({"GPU": cfg.worker_num_gpus} if cfg.worker_num_gpus else {})}


def deployment_options(cfg: ServeConfig) -> dict:
    """Serve options of the TP decode workers: each replica's placement group (its own bundle,
    then one per rank) and the replica's own resources (bundle 0's, no GPU)."""
    replica = {"CPU": cfg.worker_num_cpus, **cfg.worker_resources}
    return {"name": "DecodeWorker",
            "ray_actor_options": {"num_cpus": cfg.worker_num_cpus, "num_gpus": 0,
                                  **({"resources": cfg.worker_resources} if cfg.worker_resources else {})},
            "placement_group_bundles": [replica] + [rank_bundle(cfg)] * cfg.tensor_parallel_size,
            "placement_group_strategy": "STRICT_PACK"}


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class TensorParallelWorker:
    def __init__(self, cfg: ServeConfig, call_timeout_s: float = 120.0):
        from actors.tp_engine import RankResources, TensorParallelEngine
        from actors.tp_worker import TensorParallelWorkerCore
        from engine.factory import load_tokenizer, load_weights, model_layout

        sys.setswitchinterval(lsa_env.gil_switch_s())  # the loop thread waits less for the GIL (as DecodeWorker)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.indexer = indexer_handle()
        size, self.call_timeout_s = cfg.tensor_parallel_size, call_timeout_s
        engine = TensorParallelEngine(size, functools.partial(load_weights, cfg.engine), cfg.engine,
                                      load_tokenizer(cfg.engine),
                                      resources=RankResources(cfg.worker_num_cpus, cfg.worker_num_gpus),
                                      call_timeout_s=call_timeout_s,
                                      placement_group=ray.util.get_current_placement_group(), first_bundle=1,
                                      store_bytes=cfg.kv_store_bytes // size)
        self.core = TensorParallelWorkerCore(engine, self.node_id, vocab_size=model_layout(cfg.engine)[0].vocab_size)
        # the group's first collectives now: Serve routes nothing here until __init__ returns
        self.warm_up = self.core.warm_up()
        self.held: set[str] = set()  # sessions created or served here
        store, _ = self.core.store_report([]).result(timeout=call_timeout_s)
        self.kv_capacity_bytes = size * store.capacity_bytes  # the ranks' stores, in whole-model bytes
        log.info("tensor-parallel decode worker %s: %d ranks up, warm-up %.1f s", self.replica, size,
                 self.warm_up["seconds"])

    # -- what Serve and the router call ---------------------------------------------------

    async def record_routing_stats(self) -> dict:
        checked = sorted(self.held)
        store, holding = await asyncio.wait_for(asyncio.wrap_future(self.core.store_report(checked)),
                                                self.call_timeout_s)
        self.held.difference_update(set(checked) - set(holding))  # evicted, deleted
        self.indexer.report_worker.remote(self.replica, self.stats(store))
        size = self.core.engine.size  # a rank's block holds 1/P of the model's: the replica's room is P times
        return {"sessions": sorted(self.held), "prefixes": [],
                "free_kv_bytes": size * (store.capacity_bytes - store.session_bytes)}

    def record_replica_metadata(self) -> dict:
        return {"node_id": self.node_id, "tensor_parallel_size": self.core.engine.size,
                "kv_capacity_bytes": self.kv_capacity_bytes}

    async def check_health(self) -> None:
        """Fails once the group has failed (Serve then replaces the replica and its group); a
        no-op call to every rank finds one that died while the group was idle."""
        if not self.core._thread.is_alive():
            raise RuntimeError("the decode loop died")
        if self.core.failure is None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.core.check()), self.call_timeout_s)
            except Exception:  # noqa: BLE001 - the group's failure, said below
                pass
        if self.core.failure is not None:
            raise RuntimeError(self.core.failure)

    def stats(self, store=None) -> WorkerStats:
        """The replica's counters; ``store``: rank 0's store counters (every rank's, in blocks)."""
        return replace(self.core.stats(), sessions=len(self.held), store=store)

    def _answer(self, result: TurnResult, held: bool = False) -> TurnResult:
        return replace(result, replica=self.replica, node_id=self.node_id, held=held)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> TurnResult:
        return self._answer(await asyncio.wrap_future(self.core.generate(prompt_ids, params)))

    async def stream(self, prompt_ids: list[int], params: SamplingParams):
        """Yields text pieces, then the ``TurnResult``."""
        async for item in stream_request(lambda on_text: self.core.generate(prompt_ids, params, on_text=on_text),
                                         self._answer):
            yield item

    async def create_session(self, session_id: str, context_ids: list[int], kv_bytes: int = 0) -> TurnResult:
        """``kv_bytes``: the session's expected KV (read by the router to place it)."""
        result = await asyncio.wrap_future(self.core.create_session(session_id, context_ids))
        self.held.add(session_id)
        return self._answer(result, held=True)

    async def ask(self, session_id: str, question_ids: list[int], params: SamplingParams,
                  context_ids: list[int] | None = None, holder: str | None = None, kv_bytes: int = 0) -> TurnResult:
        """``holder``, ``kv_bytes``: routing hints (read by the router). ``context_ids`` is not
        used: a session the ranks do not hold (evicted, or its replica replaced) is
        ``SessionNotFound``, and the client creates it again."""
        held = session_id in self.held
        try:
            result = await asyncio.wrap_future(self.core.ask(session_id, question_ids, params))
        except SessionNotFound:
            self.held.discard(session_id)
            raise
        return self._answer(result, held=held)

    async def ask_stream(self, session_id: str, question_ids: list[int], params: SamplingParams,
                         context_ids: list[int] | None = None, holder: str | None = None, kv_bytes: int = 0):
        """``ask``, streamed: yields text pieces as the turn decodes, then the ``TurnResult``."""
        held = session_id in self.held
        answer = functools.partial(self._answer, held=held)
        try:
            async for item in stream_request(lambda on_text: self.core.ask(session_id, question_ids, params,
                                                                           on_text=on_text), answer):
                yield item
        except SessionNotFound:
            self.held.discard(session_id)
            raise

    async def delete_session(self, session_id: str) -> bool:
        self.held.discard(session_id)
        return await asyncio.wrap_future(self.core.delete_session(session_id))

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
            core.engine.shutdown()


__all__ = ["TensorParallelWorker", "check_tensor_parallel", "deployment_options"]
