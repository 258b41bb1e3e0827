"""LSA over tensor-parallel ranks: every rank selects the same blocks.

Each rank scores blocks from its own KV heads (its queries, its index keys). Every LSA score is a
maximum over KV heads (Quest bound and mean-key dot: ``amax`` over heads; the learned indexer:
max over heads before a per-block offset and a monotone log-sigmoid; the exact first plan:
``amax`` over heads of log-mass), then over target layers. The maximum over ranks of the ranks'
maxima is therefore the single-process score, and one all-reduce (max) per sequence and KV
group at each boundary makes every rank's ranking, plan, swaps and prefetches identical.

Level-2 (``level2_topk``) is reduced the same way once per layer and step.
"""
from __future__ import annotations

import torch

import kernels
from engine.parallel.group import TensorParallel
from engine.policies.base import narrow
from engine.policies.lsa import LSAPolicy


class TensorParallelLSAPolicy(LSAPolicy):
    """``LSAPolicy`` whose block scores are max-reduced over the ranks of ``tp``."""

    def __init__(self, config, num_layers: int, block_size: int, tp: TensorParallel):
        super().__init__(config, num_layers, block_size)
        self.tp = tp
        self.reductions = 0  # Level-1 all-reduces done (one per sequence and boundary)

    def _scores(self, seq_id: int, per_layer: dict[int, torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], int]:
        scores, limit = super()._scores(seq_id, per_layer)
        if not scores or scores[0].numel() == 0:
            return scores, limit
        sizes = [s.numel() for s in scores]
        joined = torch.cat([s.float() for s in scores])  # [groups * M]: one collective for all groups
        self.tp.all_reduce_max(joined)
        self.reductions += 1
        return list(joined.split(sizes)), limit

    def select(self, layer, q, table, num_blocks, last_len, logical):
        if self.config.level2_topk is None:
            return None
        summary = self.cache.slot_summary[layer]
        quest, _ = kernels.block_scores(q, summary[0], summary[1], summary[2], table, num_blocks - 1)
        scores = self.tp.all_reduce_max(quest.amax(1).float().contiguous())  # [N, M]
        return narrow(scores, table, num_blocks, last_len, lambda c: self.config.level2_topk + 1)
