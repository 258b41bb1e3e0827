"""Layer-by-layer prefill of a long prompt, within a device budget that does not hold its KV.

The ordinary prefill runs every layer over one segment, so the whole prompt's KV (all layers)
sits in the device pool until the first resident set is chosen. Here the loops are swapped:

    hidden [T, H]: the prompt's hidden states, on the device, updated in place layer by layer
    for layer l:
        scratch K/V [Hkv, n, D] of layer l only; a session turn first copies its prefix
        (positions [0, P), complete blocks) from the host mirror, this layer's rows alone
        for chunk [s, e) of the new tokens [P, n):
            hidden[s:e] = layer(hidden[s:e]): K/V of the chunk into scratch[:, s:e], flash
            attention of the chunk over scratch[:, :e] (kernels.prefill_attention, no mask)
        complete new blocks of layer l -> host mirror (+ summaries, index keys); the open
        block -> its device slot

Device memory: the hidden states (T x H), one layer's KV (n tokens), one chunk's activations
and the sequence's decode reserve (``device_bytes``). The hidden states stay on the device:
streaming them to pinned host memory would save T x H x 2 bytes (8 GB at 1M tokens of
Llama-3-8B, twice one layer's KV) but take that much host RAM, the wall of this system (the
host mirror), and two PCIe crossings of it per layer; the GPU has the room.

The policy observes the prompt's last queries at its layers as usual (every key of the
layer is in the scratch), and picks the first resident set afterwards (``after_prefill``),
which loads it from the host mirror.
"""
from __future__ import annotations

from typing import Iterator

import torch

import kernels
from engine.kv_cache import BlockKVCache
from engine.model import LlamaForCausalLM
from engine.policies import Policy


class _ChunkAttention:
    """Attention backend for one layer and one chunk [start, end), over the layer's scratch."""

    def __init__(self, seq_id: int, policy: Policy, k_all: torch.Tensor, v_all: torch.Tensor, scale: float):
        self.seq_id, self.policy, self.scale = seq_id, policy, scale
        self.k_all, self.v_all = k_all, v_all  # [Hkv, n, D]
        self.start = self.end = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, e = self.start, self.end
        self.k_all[:, s:e] = k.transpose(0, 1)  # [Hkv, T_chunk, D]
        self.v_all[:, s:e] = v.transpose(0, 1)
        if e == self.k_all.shape[1] and self.policy.observes_prefill(layer):
            w = min(self.policy.prefill_window, q.shape[0])
            self.policy.observe_prefill(self.seq_id, layer, q[-w:], self.k_all, self.scale)
        return kernels.prefill_attention(q, self.k_all, self.v_all, s, self.scale)  # [T_chunk, Hq, D]


class LayerwisePrefill:
    """``run(seq_id, ids)`` prefills an admitted sequence from its cached length on (0, or a
    session turn's prefix of mirrored blocks) to ``len(ids)``; returns the final hidden state
    of the last prompt token [1, H]. ``layers(seq_id, ids)`` does the same a few layers at a time:
    a generator that yields between layers and returns the hidden state, so that decode steps run
    between the layers of a long prompt. Each piece is about one ordinary prefill step's work
    (``chunk`` tokens through every layer, counting a layer of a prompt of ``n`` tokens as ``n``:
    its new tokens computed, its prefix streamed from the mirror), and at least one layer: a
    128K-token prompt yields every layer or two, a session turn of a few thousand tokens every
    several layers (one layer a step made a SmolLM2 turn wait 30 engine steps for its first
    token). ``peak_scratch_bytes``: the largest scratch K/V so far."""

    def __init__(self, model: LlamaForCausalLM, cache: BlockKVCache, policy: Policy, chunk: int,
                 mirror_chunk_blocks: int = 1024):
        self.model, self.cache, self.policy, self.chunk = model, cache, policy, chunk
        self.mirror_chunk_blocks = mirror_chunk_blocks  # bounds the temporary of one mirror copy
        self.peak_scratch_bytes = 0
        self.prefix_bytes_loaded = 0  # prefix KV copied from the host mirror (session turns)

    def device_bytes(self, num_tokens: int, num_new: int | None = None) -> dict[str, int]:
        """What a prefill of ``num_tokens`` (``num_new`` of them computed; all by default) holds on
        the device besides the weights and the pool, at most: hidden states, one layer's KV (the
        scratch), one chunk's activations, the mirror copies' temporary, and the policy's view of
        the prompt's last queries (exact attention of W queries, one KV head at a time)."""
        mc, item = self.model.config, self.cache.pool.element_size()
        num_new = num_tokens if num_new is None else num_new
        chunk = min(self.chunk, num_new)
        per_token = 6 * mc.hidden_size + 2 * (mc.num_heads + mc.num_kv_heads) * mc.head_dim \
            + 4 * mc.intermediate_size  # norms, q/k/v, attention out, o_proj, gate/up/silu/product, down
        layer_kv = 2 * mc.num_kv_heads * mc.head_dim * item
        copy_blocks = min(self.mirror_chunk_blocks, -(-num_tokens // self.cache.block_size))
        window = self.policy.prefill_window
        observe = (2 * mc.group_size * window * 4 + mc.head_dim * 4 + window) * num_tokens if window else 0
        return {"hidden": num_new * (mc.hidden_size * item + 8), "scratch": num_tokens * layer_kv,  # + token ids
                "chunk": chunk * per_token * item, "mirror_copy": 2 * copy_blocks * self.cache.block_size * layer_kv,
                "observe": observe}

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
        start = cache.num_tokens(seq_id)  # a session's prefix (whole blocks), or 0
        prefix_hosts = list(cache.blocks.seqs[seq_id].host_ids)
        assert start == len(prefix_hosts) * bs and start < n, "prefill starts after whole mirrored blocks"
        complete = n // bs
        new_hosts = [h for _, h in cache.blocks.commit(seq_id, complete * bs - start)]  # rows of new complete blocks
        tail = cache.append_slots([seq_id], [n - complete * bs]) if n % bs else None  # the open block's slots
        dev = cache.device
        x = self.model.model.embed_tokens(torch.tensor(ids[start:], device=dev))  # [T, H], updated in place
        k_all = torch.empty(mc.num_kv_heads, n, mc.head_dim, dtype=cache.dtype, device=dev)  # one layer's K
        v_all = torch.empty_like(k_all)
        self.peak_scratch_bytes = max(self.peak_scratch_bytes, 2 * k_all.numel() * k_all.element_size())
        backend = _ChunkAttention(seq_id, self.policy, k_all, v_all, mc.head_dim ** -0.5)
        num_layers = len(self.model.model.layers)
        step_budget, done = self.chunk * num_layers, 0  # token-layers of one ordinary prefill step
        for layer_idx, layer in enumerate(self.model.model.layers):
            if prefix_hosts:
                self._load_prefix(layer_idx, prefix_hosts, k_all, v_all)
            for s in range(start, n, self.chunk):
                e = min(n, s + self.chunk)
                cos, sin = self.model.model.rotary(torch.arange(s, e, device=dev), x.dtype)  # [T_chunk, D]
                backend.start, backend.end = s, e
                x[s - start: e - start] = layer(x[s - start: e - start], cos, sin, backend)
            self._offload(layer_idx, new_hosts, k_all[:, start:], v_all[:, start:], tail)
            done += n
            if layer_idx < num_layers - 1 and done + n > step_budget:
                done = 0
                yield
        if tail is not None:
            cache.blocks.commit(seq_id, n - complete * bs)
        return self.model.model.norm(x[-1:])

    def _load_prefix(self, layer: int, hosts: list[int], k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        """This layer's K/V of the prefix blocks, host mirror -> scratch[:, :P]."""
        bs = self.cache.block_size
        for a in range(0, len(hosts), self.mirror_chunk_blocks):
            b = min(len(hosts), a + self.mirror_chunk_blocks)
            data = self.cache.mirror.fetch_layer(hosts[a:b], layer)  # [m, 2, H, B, D]
            k_all[:, a * bs: b * bs] = data[:, 0].transpose(0, 1).flatten(1, 2)  # [H, m*B, D]
            v_all[:, a * bs: b * bs] = data[:, 1].transpose(0, 1).flatten(1, 2)
            self.prefix_bytes_loaded += (b - a) * self.cache.mirror.bytes_per_layer_block

    def _offload(self, layer: int, host_ids: list[int], k_new: torch.Tensor, v_new: torch.Tensor, tail) -> None:
        """Complete new blocks of one layer -> host mirror; the partial last block -> its device
        slot. k_new / v_new [H, T, D]: the layer's keys from the first new (block-aligned) token."""
        bs, heads, _, dim = self.cache.block_size, *k_new.shape
        for a in range(0, len(host_ids), self.mirror_chunk_blocks):
            b = min(len(host_ids), a + self.mirror_chunk_blocks)
            k = k_new[:, a * bs: b * bs].view(heads, b - a, bs, dim)
            v = v_new[:, a * bs: b * bs].view(heads, b - a, bs, dim)
            self.cache.mirror_layer(host_ids[a:b], layer, torch.stack([k, v], 1).transpose(0, 2))  # [n, 2, H, B, D]
        if tail is not None:
            slots, offsets = tail[self.cache.group_of[layer]]
            first = len(host_ids) * bs
            self.cache.write(layer, k_new[:, first:].transpose(0, 1), v_new[:, first:].transpose(0, 1), slots, offsets)
