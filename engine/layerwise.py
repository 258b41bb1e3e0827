"""Layer-by-layer prefill of a long prompt, within the device budget.

The ordinary prefill runs every layer over one segment, so the whole prompt's KV (all layers)
sits in the device pool until the first resident set is chosen. Here the loops are swapped:

    for layer l:                               hidden [T, H] of every prompt token stays on the device
        for segment [s, e) of the prompt:      scratch K/V [Hkv, T, D] holds layer l only
            write K/V of the segment, attend (SDPA, causal) over scratch[:, :e]
        complete blocks of layer l -> host mirror (+ summaries, + index keys); partial block -> its slot

so the device holds at most one layer's full KV (the scratch) plus the sequence's decode
reserve. The policy observes the prompt's last queries at each layer as usual, and picks the
first resident set afterwards (``after_prefill``), which loads it from the host mirror.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from engine.kv_cache import BlockKVCache
from engine.model import LlamaForCausalLM
from engine.policies import Policy


class _SegmentAttention:
    """Attention backend for one layer and one segment, over the layer's scratch K/V."""

    def __init__(self, seq_id: int, policy: Policy, k_all: torch.Tensor, v_all: torch.Tensor, scale: float):
        self.seq_id, self.policy, self.scale = seq_id, policy, scale
        self.k_all, self.v_all = k_all, v_all  # [Hkv, T, D]
        self.start = self.end = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, e = self.start, self.end
        self.k_all[:, s:e] = k.transpose(0, 1)  # [Hkv, T_seg, D]
        self.v_all[:, s:e] = v.transpose(0, 1)
        keys, values = self.k_all[:, :e], self.v_all[:, :e]
        if e == self.k_all.shape[1] and self.policy.observes_prefill(layer):
            w = min(self.policy.prefill_window, q.shape[0])
            self.policy.observe_prefill(self.seq_id, layer, q[-w:], keys, self.scale)
        mask = torch.arange(e, device=q.device)[None, :] <= torch.arange(s, e, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None],  # [1, Hq, T, D], [1, Hkv, e, D]
            attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)  # [T_seg, Hq, D]


class LayerwisePrefill:
    """``run(seq_id, ids)`` prefills an admitted, empty sequence; returns the final hidden state
    of the last prompt token [1, H]. ``layers(seq_id, ids)`` does the same a layer at a time: a
    generator that yields after each layer but the last and returns the hidden state, so that
    decode steps run between the layers of a long prompt. ``peak_scratch_bytes``: the largest
    scratch K/V so far."""

    def __init__(self, model: LlamaForCausalLM, cache: BlockKVCache, policy: Policy, chunk: int,
                 mirror_chunk_blocks: int = 1024):
        self.model, self.cache, self.policy, self.chunk = model, cache, policy, chunk
        self.mirror_chunk_blocks = mirror_chunk_blocks  # bounds the temporary of one mirror copy
        self.peak_scratch_bytes = 0

    def run(self, seq_id: int, ids: list[int]) -> torch.Tensor:
        layers = self.layers(seq_id, ids)
        while True:
            try:
                next(layers)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()
    def layers(self, seq_id: int, ids: list[int]) -> Iterator[None]:
        cache, mc = self.cache, self.model.config
        n, bs = len(ids), cache.block_size
        complete = n // bs
        host_ids = [h for _, h in cache.blocks.commit(seq_id, complete * bs)]  # host rows of the complete blocks
        tail = cache.append_slots([seq_id], [n - complete * bs]) if n % bs else None  # the open block's slots
        dev = cache.device
        positions = torch.arange(n, device=dev)
        x = self.model.model.embed_tokens(torch.tensor(ids, device=dev))  # [T, H]
        cos, sin = self.model.model.rotary(positions, x.dtype)  # [T, D]
        k_all = torch.empty(mc.num_kv_heads, n, mc.head_dim, dtype=cache.dtype, device=dev)  # one layer's K
        v_all = torch.empty_like(k_all)
        self.peak_scratch_bytes = max(self.peak_scratch_bytes, 2 * k_all.numel() * k_all.element_size())
        backend = _SegmentAttention(seq_id, self.policy, k_all, v_all, mc.head_dim ** -0.5)
        for layer_idx, layer in enumerate(self.model.model.layers):
            out = torch.empty_like(x)
            for start in range(0, n, self.chunk):
                backend.start, backend.end = start, min(n, start + self.chunk)
                out[start:backend.end] = layer(x[start:backend.end], cos[start:backend.end],
                                               sin[start:backend.end], backend)
            x = out
            self._offload(layer_idx, host_ids, k_all, v_all, tail)
            if layer_idx < len(self.model.model.layers) - 1:
                yield
        if tail is not None:
            cache.blocks.commit(seq_id, n - complete * bs)
        return self.model.model.norm(x[-1:])

    def _offload(self, layer: int, host_ids: list[int], k_all: torch.Tensor, v_all: torch.Tensor, tail) -> None:
        """Complete blocks of one layer -> host mirror; the partial last block -> its device slot."""
        bs, heads, _, dim = self.cache.block_size, *k_all.shape
        for a in range(0, len(host_ids), self.mirror_chunk_blocks):
            b = min(len(host_ids), a + self.mirror_chunk_blocks)
            k = k_all[:, a * bs: b * bs].view(heads, b - a, bs, dim)
            v = v_all[:, a * bs: b * bs].view(heads, b - a, bs, dim)
            self.cache.mirror_layer(host_ids[a:b], layer, torch.stack([k, v], 1).transpose(0, 2))  # [n, 2, H, B, D]
        if tail is not None:
            slots, offsets = tail[self.cache.group_of[layer]]
            first = len(host_ids) * bs
            self.cache.write(layer, k_all[:, first:].transpose(0, 1), v_all[:, first:].transpose(0, 1), slots, offsets)
