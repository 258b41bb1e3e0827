"""The Indexer: holds the trained indexer weights and turns workers' plans into prefetch
plans for the KV stores.

A worker reports, per session turn and per LSA cycle, which blocks its plan needs; the
Indexer asks the worker's node store to *stage* every block of the session that lives on
another node (spilled when this node's arena was full), so that it is in local shared
memory before the engine loads it. ``IndexerCore`` is plain; ``Indexer`` is the Ray actor.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

from actors import lazy_attr


class IndexerCore:
    """``stage(node, sid) -> blocks fetched`` runs a prefetch plan on ``node``'s store."""

    def __init__(self, weights_path: str | None = None, stage: Callable[[str, str], int] | None = None,
                 stage_plan: Callable[[str, str, list[int]], int] | None = None):
        self.weights_path = weights_path
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

    def weights(self) -> dict[str, bytes] | None:
        """The indexer's files (name -> bytes), or None for the zero-training indexer."""
        if not self.weights_path:
            return None
        path = Path(self.weights_path)
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        return {p.name: p.read_bytes() for p in files}

    def report(self, worker: str, sid: str, plan: dict) -> None:
        """A worker's plan for a session's next cycle(s): ``{"node": ..., "blocks": [...], ...}``."""
        self.plans[sid] = {"worker": worker, **plan}
        self.num_plans += 1

    def report_plans(self, batch: list[dict]) -> int:
        """Workers' per-cycle plans (``actors.plans.PlanReport`` dicts, batched): each becomes a
        prefetch plan for the worker's node store, which stages the planned blocks held by
        another node. Returns the blocks fetched."""
        fetched = 0
        for plan in batch:
            self.report(plan["worker"], plan["session"], plan)
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
        def __init__(self, weights_path: str | None = None):
            namespace = ray.get_runtime_context().namespace

            def stage(node: str, sid: str) -> int:
                store = ray.get_actor(store_name(node), namespace=namespace)
                return ray.get(store.stage_session.remote(sid))

            def stage_plan(node: str, sid: str, blocks: list[int]) -> int:
                store = ray.get_actor(store_name(node), namespace=namespace)
                return ray.get(store.stage_plan.remote(sid, blocks))

            super().__init__(weights_path, stage, stage_plan)

    return Indexer


__getattr__ = lazy_attr("Indexer", _make_actor)
