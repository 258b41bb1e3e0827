"""The Indexer: turns workers' plans into prefetch plans for the KV stores, and keeps the
workers' last published stats (for /metrics).

A worker reports, per session turn and per LSA cycle, which blocks its plan needs; the
Indexer asks the worker's node store to *stage* every block of the session that lives on
another node (spilled when this node's arena was full), so that it is in local shared
memory before the engine loads it. ``IndexerCore`` is plain; ``Indexer`` is the Ray actor.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict

from actors import lazy_attr
from actors.messages import PlanReport, WorkerStats
from actors.session_store import Stores


class IndexerCore:
    """``stores``: every node's store, where prefetch plans run."""

    PLANS_KEPT = 4096  # sessions whose last plan is kept (for inspection): the most recently reported

    def __init__(self, stores: Stores | None = None):
        self.stores = stores
        # session_id -> last reported plan, the PLANS_KEPT latest sessions': stateless requests and
        # deleted sessions report once and never again, so an unbounded map grows with the traffic
        self.plans: OrderedDict[str, PlanReport] = OrderedDict()
        self.prefetched = defaultdict(int)  # node_id -> blocks staged there
        self.num_plans = 0
        self.workers: dict[str, WorkerStats] = {}  # worker -> its last published stats

    def report_worker(self, worker: str, stats: WorkerStats | None) -> None:
        """Workers publish their counters here (for /metrics); None: the worker is gone."""
        if stats is None:
            self.workers.pop(worker, None)
        else:
            self.workers[worker] = stats

    def worker_stats(self) -> dict[str, WorkerStats]:
        return dict(self.workers)

    def report_plans(self, batch: list[PlanReport]) -> int:
        """Workers' per-cycle plans (batched by ``actors.plans.PlanReporter``): each becomes a
        prefetch plan for the worker's node store, which stages the planned blocks held by
        another node. Returns the blocks fetched."""
        fetched = 0
        for plan in batch:
            self.plans[plan.session_id] = plan
            self.plans.move_to_end(plan.session_id)
            while len(self.plans) > self.PLANS_KEPT:
                self.plans.popitem(last=False)
            self.num_plans += 1
            if self.stores is not None and plan.blocks:
                try:
                    n = self.stores.store(plan.node_id).stage(plan.session_id, plan.blocks, plan=True)
                except Exception:  # the session went away meanwhile
                    continue
                self.prefetched[plan.node_id] += n
                fetched += n
        return fetched

    def prefetch(self, session_id: str, node_id: str) -> int:
        """Stage on ``node_id`` every block of the session held elsewhere; returns blocks fetched."""
        if self.stores is None:
            return 0
        fetched = self.stores.store(node_id).stage(session_id)
        self.prefetched[node_id] += fetched
        return fetched

    def stats(self) -> dict:
        return {"plans": self.num_plans, "prefetched_blocks": dict(self.prefetched)}


def _make_actor():
    import ray

    from actors.session_store import RayStores

    @ray.remote(max_concurrency=16)
    class Indexer(IndexerCore):
        def __init__(self):
            super().__init__(RayStores(ray.get_runtime_context().namespace))

    return Indexer


__getattr__ = lazy_attr("Indexer", _make_actor)
