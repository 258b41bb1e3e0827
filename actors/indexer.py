"""The Indexer: turns workers' plans into prefetch plans for the KV stores, and keeps the
workers' last published stats (for /metrics).

A worker reports, per session turn and per LSA cycle, which blocks its plan needs; the
Indexer asks the worker's node store to *stage* every block of the session that lives on
another node (spilled when this node's arena was full), so that it is in local shared
memory before the engine loads it. ``IndexerCore`` is plain; ``Indexer`` is the Ray actor.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

from actors import lazy_attr


class IndexerCore:
    """``stage(node, sid) -> blocks fetched`` runs a prefetch plan on ``node``'s store."""

    def __init__(self, stage: Callable[[str, str], int] | None = None,
                 stage_plan: Callable[[str, str, list[int]], int] | None = None):
        self.stage = stage
        self.stage_plan = stage_plan  # (node, session, logical blocks) -> blocks fetched there
        self.plans: dict[str, dict] = {}  # session -> last reported plan
        self.prefetched = defaultdict(int)  # node -> blocks staged there
        self.num_plans = 0
        self.workers: dict[str, dict] = {}  # worker -> its last published stats

    def report_worker(self, worker: str, stats: dict | None) -> None:
        """Workers publish their counters here (for /metrics); None: the worker is gone."""
        if stats is None:
            self.workers.pop(worker, None)
        else:
            self.workers[worker] = stats

    def worker_stats(self) -> dict[str, dict]:
        return dict(self.workers)

    def report_plans(self, batch: list[dict]) -> int:
        """Workers' per-cycle plans (``actors.plans.PlanReport`` dicts, batched): each becomes a
        prefetch plan for the worker's node store, which stages the planned blocks held by
        another node. Returns the blocks fetched."""
        fetched = 0
        for plan in batch:
            self.plans[plan["session"]] = plan
            self.num_plans += 1
            if self.stage_plan is not None and plan["blocks"]:
                try:
                    n = self.stage_plan(plan["node"], plan["session"], plan["blocks"])
                except Exception:  # the session went away meanwhile
                    continue
                self.prefetched[plan["node"]] += n
                fetched += n
        return fetched

    def prefetch(self, sid: str, node: str) -> int:
        """Stage on ``node`` every block of ``sid`` held elsewhere; returns blocks fetched."""
        if self.stage is None:
            return 0
        fetched = self.stage(node, sid)
        self.prefetched[node] += fetched
        return fetched

    def stats(self) -> dict:
        return {"plans": self.num_plans, "prefetched_blocks": dict(self.prefetched)}


def _make_actor():
    import ray

    from actors.kv_store import store_name

    @ray.remote(max_concurrency=16)
    class Indexer(IndexerCore):
        def __init__(self):
            namespace = ray.get_runtime_context().namespace

            def stage(node: str, sid: str) -> int:
                store = ray.get_actor(store_name(node), namespace=namespace)
                return ray.get(store.stage_session.remote(sid))

            def stage_plan(node: str, sid: str, blocks: list[int]) -> int:
                store = ray.get_actor(store_name(node), namespace=namespace)
                return ray.get(store.stage_plan.remote(sid, blocks))

            super().__init__(stage, stage_plan)

    return Indexer


__getattr__ = lazy_attr("Indexer", _make_actor)
