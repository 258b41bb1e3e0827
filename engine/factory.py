"""Building the engine a worker runs: a real model by name, or ``tiny-random`` (random
weights and a byte tokenizer) for tests and smoke runs that must not load a model."""
from __future__ import annotations

import torch

from engine.config import EngineConfig, ModelConfig

TINY_RANDOM = "tiny-random"
TINY = ModelConfig(architecture="llama", vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096, eos_token_ids=(0,))


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 4..259); 0 is end of sequence. A chat prompt is the last
    message's role and content on lines."""

    eos_token_id = 0
    has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", "replace")

    def chat_prompt(self, messages: list[dict]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.chat_prompt(messages))


def model_layout(config: EngineConfig):
    """(ModelConfig, torch dtype) without loading weights, to size a KV store's arena."""
    dtype = config.torch_dtype
    if config.model == TINY_RANDOM:
        return TINY, dtype
    from engine.weights import load_config, resolve_model

    return load_config(resolve_model(config.model)), dtype


def arena_layout(config: EngineConfig):
    """The host arena's block layout for this config (the block size resolved as the engine does)."""
    from engine.host_arena import ArenaLayout

    mc, dtype = model_layout(config)
    max_len = min(config.scheduler.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return ArenaLayout.of(mc, config.cache.block_size_for(max_len), dtype, config.cache.host_dtype)


def load_weights(config: EngineConfig, device: str, dtype: torch.dtype):
    """The whole model ``config.model`` names, on ``device`` (``tiny-random``: random weights
    of ``weights_seed``). ``partial(load_weights, config)`` is what tensor-parallel ranks build
    their shards from (engine/parallel/rank.py)."""
    if config.model == TINY_RANDOM:
        from engine.loader import random_model

        return random_model(TINY, device, dtype, seed=config.weights_seed)
    from engine.loader import load_model
    from engine.weights import resolve_model

    torch.manual_seed(config.weights_seed)
    return load_model(resolve_model(config.model), device, dtype)


def load_tokenizer(config: EngineConfig):
    if config.model == TINY_RANDOM:
        return ByteTokenizer()
    from engine.tokenizer import Tokenizer
    from engine.weights import resolve_model

    return Tokenizer(resolve_model(config.model))


def build_engine(config: EngineConfig, arena=None):
    from engine.llm import LLMEngine

    model = load_weights(config, config.device_name, config.torch_dtype)
    return LLMEngine(model, config, load_tokenizer(config), arena=arena)
