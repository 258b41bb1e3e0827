"""Megatron-style sharding of the plain model, applied after it is built (as gpt-fast does).

    attention   q_proj, k_proj, v_proj  column split by heads: rank r keeps q heads
                                        [r*Hq/P, (r+1)*Hq/P) and KV heads [r*Hkv/P, (r+1)*Hkv/P),
                                        so each q head keeps its own KV head (GQA groups stay whole)
                o_proj                  row split by heads, then all-reduce (sum), then the bias
    MLP         gate_proj, up_proj      column split: I/P intermediate features per rank
                down_proj               row split, then all-reduce (sum), then the bias
    vocabulary  embed_tokens            rows [r*Vp, (r+1)*Vp) (Vp = ceil(V/P), zero-padded);
                                        other ranks' tokens embed to 0, then all-reduce (sum)
                lm_head                 the same rows; local logits [T, Vp] all-gathered, cut to V

The model keeps its module names; ``model.config`` becomes this rank's view (Hq/P, Hkv/P, I/P
heads and features; vocabulary and hidden size whole), so the engine sizes its KV cache, host
mirror and index keys for this rank's KV heads only.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model import LlamaForCausalLM
from engine.parallel.group import TensorParallel, TensorParallelError


def shard_config(config: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """This rank's view of ``config``; a typed error when the heads or the MLP do not split evenly."""
    if config.num_kv_heads % tp.size:
        raise TensorParallelError(
            f"num_key_value_heads={config.num_kv_heads} is not divisible by the tensor-parallel size {tp.size}: "
            f"each rank must hold whole KV heads (replicating KV heads is not supported); use a TP size that "
            f"divides {config.num_kv_heads}")
    if config.intermediate_size % tp.size:
        raise TensorParallelError(
            f"intermediate_size={config.intermediate_size} is not divisible by the tensor-parallel size {tp.size}")
    return dataclasses.replace(config, num_heads=config.num_heads // tp.size,
                               num_kv_heads=config.num_kv_heads // tp.size,
                               intermediate_size=config.intermediate_size // tp.size)


def _keep_rows(linear: nn.Linear, start: int, stop: int) -> None:
    """Column parallel: keep output features [start, stop) of ``linear`` (in place)."""
    linear.weight = nn.Parameter(linear.weight[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[start:stop].clone(), requires_grad=False)
    linear.out_features = stop - start


def _rows_of(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """A new Linear of output features [start, stop) of ``linear``."""
    part = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None, device="meta",
                     dtype=linear.weight.dtype)
    part.weight = nn.Parameter(linear.weight[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias[start:stop].clone(), requires_grad=False)
    return part


def _unfuse(layer, full) -> bool:
    """Split a layer's fused q|k|v and gate|up Linears (engine.model.fuse_projections) back into
    their parts, so that each is sharded by its own heads or features; True if it was fused."""
    attn, mlp = layer.self_attn, layer.mlp
    fused = getattr(attn, "qkv_proj", None) is not None
    if fused:
        q, kv = full.num_heads * full.head_dim, full.num_kv_heads * full.head_dim
        attn.q_proj, attn.k_proj, attn.v_proj = (_rows_of(attn.qkv_proj, 0, q), _rows_of(attn.qkv_proj, q, q + kv),
                                                 _rows_of(attn.qkv_proj, q + kv, q + 2 * kv))
        attn.qkv_proj = None
    if getattr(mlp, "gate_up_proj", None) is not None:
        i = full.intermediate_size
        mlp.gate_proj, mlp.up_proj = _rows_of(mlp.gate_up_proj, 0, i), _rows_of(mlp.gate_up_proj, i, 2 * i)
        mlp.gate_up_proj = None
        fused = True
    return fused


class RowParallelLinear(nn.Module):
    """Input features [start, stop) of a linear layer; the partial products are summed over ranks,
    then the (whole) bias is added once. x [T, (stop-start)] -> [T, out]."""

    def __init__(self, linear: nn.Linear, start: int, stop: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(linear.weight[:, start:stop].clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce_sum(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def _vocab_rows(weight: torch.Tensor, tp: TensorParallel) -> tuple[nn.Parameter, int]:
    """This rank's rows of a [V, H] vocabulary matrix, zero-padded to ceil(V/P) rows, and the first row's id."""
    vocab = weight.shape[0]
    per_rank = -(-vocab // tp.size)
    start = tp.rank * per_rank
    rows = weight.new_zeros(per_rank, weight.shape[1])
    take = weight[start:start + per_rank]
    rows[:take.shape[0]] = take
    return nn.Parameter(rows, requires_grad=False), start


class VocabParallelEmbedding(nn.Module):
    """ids [T] -> [T, H]: the rank's rows embed its tokens, the others give 0; summed over ranks."""

    def __init__(self, weight: nn.Parameter, start: int, tp: TensorParallel):
        super().__init__()
        self.weight, self.start, self.tp = weight, start, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(torch.where(mine, local, 0), self.weight)  # [T, H]
        x = x * mine[:, None].to(x.dtype)
        return self.tp.all_reduce_sum(x)


class VocabParallelLMHead(nn.Module):
    """hidden [T, H] -> logits [T, V]: the rank's vocabulary rows, all-gathered over ranks."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, tp: TensorParallel):
        super().__init__()
        self.weight, self.vocab_size, self.tp = weight, vocab_size, tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)  # [T, ceil(V/P)]
        return self.tp.all_gather_last(local)[..., :self.vocab_size]


@torch.no_grad()
def shard_model(model: LlamaForCausalLM, tp: TensorParallel) -> LlamaForCausalLM:
    """Shard ``model`` (whole weights, on every rank) in place for rank ``tp.rank``; returns it.
    With ``tp.size == 1`` the modules are still swapped (the collectives are then identities)."""
    full = model.config
    local = shard_config(full, tp)
    r = tp.rank
    for layer in model.model.layers:
        fused = _unfuse(layer, full)  # sharded part by part, fused again after (4 GEMMs a layer, not 7)
        attn = layer.self_attn
        d = full.head_dim
        _keep_rows(attn.q_proj, r * local.num_heads * d, (r + 1) * local.num_heads * d)
        _keep_rows(attn.k_proj, r * local.num_kv_heads * d, (r + 1) * local.num_kv_heads * d)
        _keep_rows(attn.v_proj, r * local.num_kv_heads * d, (r + 1) * local.num_kv_heads * d)
        attn.o_proj = RowParallelLinear(attn.o_proj, r * local.num_heads * d, (r + 1) * local.num_heads * d, tp)
        attn.num_heads, attn.num_kv_heads = local.num_heads, local.num_kv_heads
        mlp, i = layer.mlp, local.intermediate_size
        _keep_rows(mlp.gate_proj, r * i, (r + 1) * i)
        _keep_rows(mlp.up_proj, r * i, (r + 1) * i)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, r * i, (r + 1) * i, tp)
        if fused:
            attn.fuse()
            mlp.fuse()
    embed_rows, start = _vocab_rows(model.model.embed_tokens.weight, tp)
    head_rows = embed_rows if full.tie_word_embeddings else _vocab_rows(model.lm_head.weight, tp)[0]
    model.model.embed_tokens = VocabParallelEmbedding(embed_rows, start, tp)
    model.lm_head = VocabParallelLMHead(head_rows, full.vocab_size, tp)
    model.config = local
    return model
