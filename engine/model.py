"""Llama-family decoder (Llama 2/3/3.1, Qwen2/2.5, Mistral) in plain torch.

Tokens of all sequences in a step are flattened into one list of T tokens (no padding);
attention is delegated to a backend that owns the KV cache, so the model stays plain.
Module names follow Hugging Face, so a safetensors state dict loads as it is.

After loading, ``fuse_projections`` concatenates q|k|v and gate|up into one Linear each: a
decode step then runs 4 GEMMs per layer instead of 7 (each a few microseconds of fixed cost on
the GPU, and small ones such as k and v read the weights below the memory rate). A decode batch
(at most 32 tokens, where the Triton kernels run) then goes through ``DecoderLayer.forward_decode``:
the same 4 projections as ``kernels.decode_linear`` GEMVs with the norms, SiLU and residual adds
inside them, 4 kernels a layer fewer (``LSA_FUSED_DECODE=1``; off by default: slower on the H200, docs/perf.md).
Without it, ``LSA_DECODE_GEMV=1`` (the default) runs only the plain projections of a small decode batch (o,
gate|up, down, the LM head) as Triton GEMVs where their tiles beat cuBLAS (``kernels.decode_gemv``; on the
H200 the 128K step 4.95 ms against 5.09, docs/perf.md eleventh session); gate|up's ends with the SwiGLU
(``kernels.decode_gemv_glu``) and q|k|v's with the rotary of q and k (``kernels.decode_gemv_rope``), so
that the SiLU and rotary kernels go too (twelfth session).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

import kernels
import lsa_env

from engine.config import ModelConfig, RopeScaling


class AttentionBackend(Protocol):
    """Stores K/V of the step's tokens and returns their attention output."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (rotary applied) -> [T, Hq, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual_in: torch.Tensor | None = None) -> torch.Tensor:
        """``residual_in``: add it to ``x`` in place first (the residual stream), then normalise."""
        return kernels.rms_norm(x, self.weight, self.eps, residual_in)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [D/2], float32, with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between smoothed.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def project(linear: nn.Module, x: torch.Tensor, gemv: bool) -> torch.Tensor:
    """``linear(x)``; with ``gemv``, through ``kernels.decode_gemv`` (a small decode batch on CUDA)."""
    return kernels.decode_gemv(linear, x) if gemv else linear(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=config.o_bias)
        self.qkv_proj: nn.Linear | None = None  # q|k|v in one Linear, once fused
        self.gemv = False  # q|k|v (rotary inside) and o through Triton GEMVs at decode (LSA_DECODE_GEMV)

    def fuse(self) -> None:
        """Replace q_proj, k_proj and v_proj by ``qkv_proj``, their rows concatenated."""
        self.qkv_proj = concat_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            kernels.rotary(q.view(t, hq, d), cos, sin)  # in place
            kernels.rotary(k.view(t, hkv, d), cos, sin)
            out = backend(self.layer, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d))  # [T, Hq, D]
        elif self.gemv:  # a small decode batch: one kernel for q|k|v with q and k rotated (or cuBLAS, rotary)
            qkv = kernels.decode_gemv_rope(self.qkv_proj, x, cos, sin, d, (hq + hkv) * d)
            out = self.attend(qkv, cos, sin, backend, rotated=True)
        else:
            out = self.attend(self.qkv_proj(x), cos, sin, backend)
        return project(self.o_proj, out.reshape(t, self.num_heads * self.head_dim), self.gemv)

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: AttentionBackend, rotated: bool = False) -> torch.Tensor:
        """Attention from the fused projection's output [T, (Hq + 2 Hkv) D] (q and k rotated in one
        launch, in place, unless ``rotated`` already; q, k, v are views of it) -> [T, Hq, D], before o_proj."""
        t, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if not rotated:
            kernels.rotary(qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d), cos, sin)
        q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        return backend(self.layer, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up_proj: nn.Linear | None = None  # gate|up in one Linear, once fused
        self.gemv = False  # gate|up and down through kernels.decode_gemv at decode (LSA_DECODE_GEMV)

    def fuse(self) -> None:
        """Replace gate_proj and up_proj by ``gate_up_proj``, their rows concatenated."""
        self.gate_up_proj = concat_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            h = kernels.silu_mul(self.gate_proj(x), self.up_proj(x))
        elif self.gemv:  # one kernel: the GEMV ending with the SwiGLU (or the Linear, then silu_mul)
            h = kernels.decode_gemv_glu(self.gate_up_proj, x)
        else:
            h = kernels.silu_mul(*self.gate_up_proj(x).chunk(2, dim=-1))  # views of one [T, 2I] output
        return project(self.down_proj, h, self.gemv)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, backend):
        x, mlp = self.forward_deferred(x, None, cos, sin, backend)
        return x.add_(mlp)

    def forward_decode(self, x, cos, sin, backend):
        """A decode batch (at most ``kernels.decode_linear``'s rows) through the layer in 4
        projections with the norms, SiLU and residual adds inside them (kernels.decode_linear):
        x, the residual stream, is updated in place and returned. Needs the fused projections
        without biases (``LlamaForCausalLM.decode_fusable``)."""
        attn, mlp, ln1, ln2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        qkv = kernels.decode_linear(x, attn.qkv_proj.weight, norm_weight=ln1.weight, eps=ln1.eps)
        out = attn.attend(qkv, cos, sin, backend)
        kernels.decode_linear(out.reshape(x.shape[0], -1), attn.o_proj.weight, residual=x)  # x += o_proj(out)
        gate_up = kernels.decode_linear(x, mlp.gate_up_proj.weight, norm_weight=ln2.weight, eps=ln2.eps)
        return kernels.decode_linear(gate_up, mlp.down_proj.weight, silu_input=True, residual=x)  # x += mlp

    def forward_deferred(self, x, pending, cos, sin, backend):
        """The layer with the residual adds folded into its norms: ``pending`` (the previous layer's
        MLP output, or None) is added to ``x`` in place by the input norm, the attention output by
        the post-attention norm; returns ``(x, mlp)``, the MLP output still to add (by the next
        layer's input norm, or the final norm). One elementwise launch a layer fewer."""
        attn = self.self_attn(self.input_layernorm(x, residual_in=pending), cos, sin, backend)
        h = self.post_attention_layernorm(x, residual_in=attn)  # x += attn, in place
        return x, self.mlp(h)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T], backend) -> hidden [T, H]``; ``logits(hidden)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fused_decode = False  # fuse_projections sets it (LSA_FUSED_DECODE)
        self.decode_gemv = False  # fuse_projections sets it (LSA_DECODE_GEMV): see set_decode_gemv
        self._decode_fusable: bool | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.model.rotary(positions, x.dtype)
        if self.decode_fused_for(x):
            for layer in self.model.layers:
                x = layer.forward_decode(x, cos, sin, backend)
            return self.model.norm(x)
        pending = None
        for layer in self.model.layers:
            x, pending = layer.forward_deferred(x, pending, cos, sin, backend)
        return self.model.norm(x, residual_in=pending)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decode_fused_for(hidden):
            return kernels.decode_linear(hidden, self.lm_head.weight).float()
        return project(self.lm_head, hidden, self.decode_gemv).float()  # [T, V]

    def set_decode_gemv(self, on: bool) -> None:
        """A decode batch's projections through the plain Triton GEMV (``kernels.decode_gemv``: where
        its tiles beat cuBLAS on the H200, on CUDA, at most 4 rows; cuBLAS elsewhere) instead of
        cuBLAS: no split-K reduce kernels, fewer microseconds per call at decode shapes; q|k|v's
        ends with the rotary of q and k, gate|up's with the SwiGLU (one kernel each, not two)."""
        self.decode_gemv = on
        for layer in self.model.layers:
            layer.self_attn.gemv = layer.mlp.gemv = on

    def decode_fused_for(self, x: torch.Tensor) -> bool:
        """Whether ``x`` ([T, H] activations) goes through the fused decode path: a decode batch
        (T <= 32) where the Triton kernels run, ``fused_decode`` on and the model fusable."""
        if not self.fused_decode or x.shape[0] > kernels.DECODE_LINEAR_MAX_ROWS or not kernels.use_triton(x):
            return False
        if self._decode_fusable is None:
            self._decode_fusable = self.decode_fusable()
        return self._decode_fusable

    def decode_fusable(self) -> bool:
        """Fused q|k|v and gate|up, no biases, plain Linears (not a tensor-parallel shard's, whose
        o and down sum over ranks before the residual add), norm weights in the weights' dtype."""
        dtype = self.lm_head.weight.dtype
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
            if any(type(lin) is not nn.Linear or lin.bias is not None for lin in linears):
                return False
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(t.dtype != dtype for t in norms + tuple(lin.weight for lin in linears)):
                return False
        return type(self.lm_head) is nn.Linear and self.model.norm.weight.dtype == dtype


def concat_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the outputs of ``linears`` side by side (rows concatenated)."""
    weight = torch.cat([m.weight for m in linears])  # [sum(out), in]
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=linears[0].weight.requires_grad)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=linears[0].bias.requires_grad)
    return fused


def fuse_projections(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """q|k|v and gate|up of every layer as one Linear each (in place; after the weights are loaded,
    so a loader's renames and permutations apply to the separate weights first). The logits are
    those of the unfused model: each output row is the same dot product."""
    for layer in model.model.layers:
        if layer.self_attn.qkv_proj is None:
            layer.self_attn.fuse()
        if layer.mlp.gate_up_proj is None:
            layer.mlp.fuse()
    model.fused_decode = lsa_env.fused_decode()
    model.set_decode_gemv(lsa_env.decode_gemv())
    model._decode_fusable = None
    return model
