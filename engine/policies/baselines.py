"""The baselines LSA is measured against, at the same budget (docs/lsa.md):

    streaming   sinks plus a recent window (StreamingLLM)
    snapkv      blocks fixed after prefill by the prompt's last queries (SnapKV)
    quest       all KV on the device, per step and layer the top blocks by Quest bounds
    oracle      per step and layer the blocks holding the most true attention mass
    oracle_head the oracle per KV head: each KV head its own best blocks, as many as the oracle's
"""
from __future__ import annotations

import torch

import kernels
from engine.policies.base import OffloadPolicy, Policy, narrow, window_block_mass


class StreamingPolicy(OffloadPolicy):
    """StreamingLLM: attention sinks plus a recent window, the window filling the budget."""

    def _update(self, seq_id: int) -> None:
        n = self.cache.num_tokens(seq_id)
        recent = list(range(n // self.block_size, -1, -1))
        for g in range(len(self.groups())):
            self.apply(seq_id, g, self.target_set(seq_id, recent))

    def after_prefill(self, seq_id: int) -> None:
        self._update(seq_id)

    def before_decode(self, seq_ids: list[int]) -> None:
        for s in seq_ids:  # the window slides once per block: evictions only, never a copy
            if self.cache.num_tokens(s) % self.block_size == 0:
                self._update(s)


class SnapKVPolicy(OffloadPolicy):
    """SnapKV: blocks chosen once from the attention of the prompt's last queries (the
    observation window), fixed after prefill; generated tokens are kept as they come."""

    def __init__(self, config, num_layers, block_size):
        super().__init__(config, num_layers, block_size)
        self.prefill_window = config.observation_window
        self._votes: dict[int, dict[int, torch.Tensor]] = {}  # seq -> layer -> block mass [M]
        self._ranked: dict[int, list[list[int]]] = {}  # seq -> per group: prompt blocks, best first

    def observes_prefill(self, layer: int) -> bool:
        return True

    def observe_prefill(self, seq_id, layer, q, keys, scale):
        mass = window_block_mass(q, keys, scale, self.block_size)  # [Hkv, M]
        self._votes.setdefault(seq_id, {})[layer] = mass.amax(0)  # a block counts if any head needs it

    def after_prefill(self, seq_id: int) -> None:
        votes = self._votes.pop(seq_id)
        self._ranked[seq_id] = []
        for g, members in enumerate(self.groups()):
            score = torch.stack([votes[layer] for layer in members]).amax(0)
            self._ranked[seq_id].append(torch.argsort(score, descending=True).tolist())
        self._update(seq_id)

    def _update(self, seq_id: int) -> None:
        for g, ranked in enumerate(self._ranked[seq_id]):
            self.apply(seq_id, g, self.target_set(seq_id, ranked))

    def before_decode(self, seq_ids: list[int]) -> None:
        for s in seq_ids:  # the ranking is fixed; generated blocks leave once out of the tail
            if self.cache.num_tokens(s) % self.block_size == 0:
                self._update(s)

    def forget(self, seq_id: int) -> None:
        self._votes.pop(seq_id, None)
        self._ranked.pop(seq_id, None)


class QuestPolicy(Policy):
    """Quest: all KV on the device; per step and layer, the top blocks by the query-aware upper
    bound sum_d max(q_d min_d, q_d max_d), the current block always in."""

    slot_summaries = True
    selects_each_step = True

    def select(self, layer, q, table, num_blocks, last_len, logical):
        quest, _ = kernels.block_scores(q, self.cache.slot_summary[layer, 0], self.cache.slot_summary[layer, 1],
                                        self.cache.slot_summary[layer, 2], table, num_blocks - 1)
        return narrow(quest.amax(1), table, num_blocks, last_len, self.budget_blocks)


class OraclePolicy(Policy):
    """Oracle: per step and layer, the blocks holding the most true attention mass (computed
    by full attention first); an upper bound for any selection at this budget."""

    selects_each_step = True

    def select(self, layer, q, table, num_blocks, last_len, logical):
        k_cache, v_cache = self.cache.layer(layer)
        _, mass = kernels.sparse_decode_attention(q, k_cache, v_cache, table, num_blocks, last_len,
                                                  q.shape[-1] ** -0.5, return_block_mass=True)
        return narrow(mass.sum(1), table, num_blocks, last_len, self.budget_blocks)


class OracleHeadPolicy(Policy):
    """Oracle per KV head: per step and layer, each KV head attends to the blocks holding most of
    its own query heads' true attention mass, as many blocks as the oracle's set (same budget);
    an upper bound for per-KV-head selection. Attends itself (``attends``): one kernel call per
    KV head over that head's blocks, of which only the head's query heads are kept."""

    selects_each_step = True
    attends = True

    def attend(self, layer, q, k_cache, v_cache, table, num_blocks, last_len, scale):
        _, mass = kernels.sparse_decode_attention(q, k_cache, v_cache, table, num_blocks, last_len, scale,
                                                  return_block_mass=True)  # [N, Hq, M]
        n, hq, width = mass.shape
        hkv = k_cache.shape[1]
        g = hq // hkv
        per_head = mass.view(n, hkv, g, width).sum(2)  # [N, Hkv, M]: query head i uses KV head i // g
        out = torch.empty_like(q)
        for h in range(hkv):
            t, nb, ll = narrow(per_head[:, h], table, num_blocks, last_len, self.budget_blocks)
            out[:, h * g:(h + 1) * g] = kernels.sparse_decode_attention(q, k_cache, v_cache, t, nb, ll,
                                                                        scale)[:, h * g:(h + 1) * g]
        return out
