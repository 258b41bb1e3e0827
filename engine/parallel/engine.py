"""One tensor-parallel rank's engine: the sharded model and a policy that agrees across ranks."""
from __future__ import annotations

from engine.config import EngineConfig, ModelConfig
from engine.errors import InvalidRequestError
from engine.host_arena import ArenaLayout
from engine.model import LlamaForCausalLM
from engine.parallel.group import TensorParallel
from engine.parallel.layers import shard_config, shard_model
from engine.parallel.lsa import TensorParallelLSAPolicy
from engine.policies import Policy

TP_POLICIES = ("full", "lsa")


def tp_policy(config: EngineConfig, num_layers: int, block_size: int, tp: TensorParallel) -> Policy:
    """The policy ``config.policy`` names, made consistent across ranks (full attention needs
    nothing; LSA max-reduces its scores). Other policies would select per rank: refused."""
    name = config.policy.name
    if name == "full":
        return Policy(config.policy, num_layers, block_size)
    if name == "lsa":
        return TensorParallelLSAPolicy(config.policy, num_layers, block_size, tp)
    raise InvalidRequestError(f"policy {name!r} is not supported with tensor parallelism; use one of "
                              f"{', '.join(TP_POLICIES)}")


def rank_arena_layout(model_config: ModelConfig, config: EngineConfig, tp: TensorParallel) -> ArenaLayout:
    """The host arena layout of one rank's engine: the block size the engine resolves, the
    rank's ``1/P`` of the KV heads (a block is ``1/P`` of a one-GPU arena's block)."""
    max_len = min(config.scheduler.max_model_len or model_config.max_position_embeddings,
                  model_config.max_position_embeddings)
    return ArenaLayout.of(shard_config(model_config, tp), config.cache.block_size_for(max_len), config.torch_dtype,
                          config.cache.host_dtype)


def build_tp_engine(model: LlamaForCausalLM, config: EngineConfig, tp: TensorParallel, tokenizer=None, arena=None):
    """Shard ``model`` (whole weights) for ``tp.rank`` and wrap it in an ``LLMEngine``. Every rank
    must get the same requests in the same order and step together (the collectives pair up).
    ``arena``: the rank's host mirror (a HostArena of ``rank_arena_layout``: its KV heads only)."""
    from engine.llm import LLMEngine

    full = model.config
    max_model_len = min(config.scheduler.max_model_len or full.max_position_embeddings,
                        full.max_position_embeddings)
    policy = tp_policy(config, full.num_layers, config.cache.block_size_for(max_model_len), tp)
    return LLMEngine(shard_model(model, tp), config, tokenizer, policy=policy, arena=arena)
