"""Tensor parallelism (Megatron-style) for the plain engine, applied after the model is built.

    group.py   TensorParallel: this process's rank in a torch.distributed group, and its collectives
    layers.py  sharded linear / vocabulary layers and ``shard_model`` (swaps the plain model's modules)
    lsa.py     LSA whose Level-1 and Level-2 scores are max-reduced so every rank picks the same blocks
    engine.py  ``build_tp_engine``: a sharded model, a TP-aware policy, one LLMEngine per rank
               (``rank_arena_layout``: the rank's host arena, its KV heads only)

Each rank runs its own ``LLMEngine`` over the same requests; its KV cache, host mirror and index
keys hold only its KV heads (the engine sees a model config with the rank's heads). The logits
are all-gathered, so every rank samples the same token with the same generator. See docs/parallel.md.
"""
from engine.parallel.engine import build_tp_engine, rank_arena_layout, tp_policy
from engine.parallel.group import TensorParallel, TensorParallelError
from engine.parallel.layers import shard_config, shard_model
from engine.parallel.lsa import TensorParallelLSAPolicy

__all__ = ["TensorParallel", "TensorParallelError", "shard_config", "shard_model", "TensorParallelLSAPolicy",
           "build_tp_engine", "rank_arena_layout", "tp_policy"]
