"""The attention backend: the step's metadata is planned once, then run per layer.

``plan_*`` builds tensors for the whole step (outside any CUDA graph); ``__call__`` is the
per-layer run: write the new K/V into their slots, let the policy narrow the block table
(Level-2, Quest, oracle), then attend with ``kernels.sparse_decode_attention``; a policy with
``attends`` (per-KV-head block sets: oracle_head) computes decode attention itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.kv_cache import BlockKVCache
from engine.policies import Policy


@dataclass
class GroupTables:
    slots: torch.Tensor  # [N] int32 slot of each new token
    offsets: torch.Tensor  # [N] int32 offset inside the block
    block_table: torch.Tensor  # [N, M] int32 resident slots, the current block last
    num_blocks: torch.Tensor  # [N] int32
    last_len: torch.Tensor  # [N] int32
    logical: list[list[int]]  # logical block ids of each row


@dataclass
class DecodePlan:
    seq_ids: list[int]
    groups: list[GroupTables]


@dataclass
class PrefillPlan:
    seq_id: int
    start: int  # first position of the segment
    end: int  # one past the last position
    observe: bool  # the segment ends the prompt: let the policy see the last queries
    slots: list[tuple[torch.Tensor, torch.Tensor]]  # per group: (slots [T], offsets [T])


class PagedAttention:
    """Prefill segments attend (flash attention, causal) over the whole prompt so far, kept on
    the device while it is prefilled; decode attends over each sequence's resident blocks through the kernel."""

    def __init__(self, cache: BlockKVCache, policy: Policy, head_dim: int):
        self.cache = cache
        self.policy = policy
        self.scale = head_dim ** -0.5
        self.plan: DecodePlan | PrefillPlan | None = None

    def plan_prefill(self, seq_id: int, start: int, end: int, observe: bool = False) -> None:
        slots = self.cache.append_slots([seq_id], [end - start])
        self.plan = PrefillPlan(seq_id, start, end, observe, slots)

    def plan_decode(self, seq_ids: list[int]) -> None:
        slots = self.cache.append_slots(seq_ids, [1] * len(seq_ids))
        groups = []
        for g, (s, o) in enumerate(slots):
            # the new token is written before attention runs, so the tables include it
            table, num_blocks, last_len, logical = self.cache.block_tables(seq_ids, g, pending=1)
            groups.append(GroupTables(s, o, table, num_blocks, last_len, logical))
        self.plan = DecodePlan(seq_ids, groups)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        group = self.cache.group_of[layer]
        if isinstance(plan, DecodePlan):
            t = plan.groups[group]
            self.cache.write(layer, k, v, t.slots, t.offsets)
            self.policy.observe_decode(layer, plan.seq_ids, q)
            k_cache, v_cache = self.cache.layer(layer)
            if self.policy.attends:  # per-KV-head block sets: the policy attends itself
                return self.policy.attend(layer, q, k_cache, v_cache, t.block_table, t.num_blocks, t.last_len,
                                          self.scale)
            narrowed = self.policy.select(layer, q, t.block_table, t.num_blocks, t.last_len, t.logical)
            table, num_blocks, last_len = narrowed or (t.block_table, t.num_blocks, t.last_len)
            return kernels.sparse_decode_attention(q, k_cache, v_cache, table, num_blocks, last_len, self.scale)
        slots, offsets = plan.slots[group]
        self.cache.write(layer, k, v, slots, offsets)
        keys, values = self.cache.gather(plan.seq_id, layer, plan.end)  # [Hkv, n, D]
        if plan.observe and self.policy.observes_prefill(layer):
            w = min(self.policy.prefill_window, q.shape[0])
            self.policy.observe_prefill(plan.seq_id, layer, q[-w:], keys, self.scale)
        return kernels.prefill_attention(q, keys, values, plan.start, self.scale)  # [T, Hq, D], causal
