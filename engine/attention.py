"""Attention backends: the step's metadata is planned once, then run per layer.

``plan_*`` builds tensors for the whole step (outside any CUDA graph); ``__call__`` is the
per-layer run: write the new K/V into their slots, then attend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from engine.kv_cache import BlockKVCache


@dataclass
class DecodePlan:
    slots: torch.Tensor  # [N] int32 slot of each new token
    offsets: torch.Tensor  # [N] int32 offset inside the block
    block_table: torch.Tensor  # [N, M] int32
    num_blocks: torch.Tensor  # [N] int32
    last_len: torch.Tensor  # [N] int32


@dataclass
class PrefillPlan:
    seq_id: int
    start: int  # first position of the segment
    end: int  # one past the last position
    slots: torch.Tensor  # [T] int32
    offsets: torch.Tensor  # [T] int32
    mask: torch.Tensor  # [T, end] bool, True where a query may attend


class PagedAttention:
    """Full attention over the paged cache: prefill segments with SDPA, decode through
    ``kernels.sparse_decode_attention`` listing every block of each sequence."""

    def __init__(self, cache: BlockKVCache, head_dim: int):
        self.cache = cache
        self.scale = head_dim ** -0.5
        self.plan: DecodePlan | PrefillPlan | None = None

    def plan_prefill(self, seq_id: int, start: int, end: int) -> None:
        slots, offsets = self.cache.append_slots([seq_id], [end - start])
        dev = self.cache.device
        q_pos = torch.arange(start, end, device=dev)[:, None]
        k_pos = torch.arange(end, device=dev)[None, :]
        self.plan = PrefillPlan(seq_id, start, end, slots, offsets, k_pos <= q_pos)

    def plan_decode(self, seq_ids: list[int]) -> None:
        slots, offsets = self.cache.append_slots(seq_ids, [1] * len(seq_ids))
        # The new token is written before attention runs, so the tables include it.
        table, num_blocks, last_len = self.cache.block_tables(seq_ids, pending=1)
        self.plan = DecodePlan(slots, offsets, table, num_blocks, last_len)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        self.cache.write(layer, k, v, plan.slots, plan.offsets)
        if isinstance(plan, DecodePlan):
            k_cache, v_cache = self.cache.layer(layer)
            return kernels.sparse_decode_attention(q, k_cache, v_cache, plan.block_table, plan.num_blocks,
                                                   plan.last_len, self.scale)
        keys, values = self.cache.gather(plan.seq_id, layer, plan.end)  # [Hkv, n, D]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None],  # [1, Hq, T, D], [1, Hkv, n, D]
            attn_mask=plan.mask, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)  # [T, Hq, D]
