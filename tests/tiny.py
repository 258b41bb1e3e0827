"""The tiny model configurations and engine builders the tests share (random weights; a few KB).

``TINY``: 4 layers, GQA 4 query / 2 KV heads of 16, a 64-token vocabulary (eos 2): the engine,
policies, sessions and actors tests. ``BYTES``: TINY with 2 layers and a byte tokenizer's
vocabulary (260, eos 0), for the tests that go through ``ByteTokenizer`` (isolation, prefix
reuse, store healing). ``CFG``: 3 layers, heads of 8, vocabulary 32: the block and host-mirror
bookkeeping tests. conftest.py builds a module's ``model`` fixture from its ``MODEL`` and
``SEED`` (default TINY, 3)."""
from dataclasses import replace

import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.loader import random_model

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_ids=(2,))
BYTES = replace(TINY, vocab_size=260, num_layers=2, eos_token_ids=(0,))
CFG = ModelConfig(architecture="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def tiny_model(config: ModelConfig = TINY, seed: int = 3, device: str = "cpu", dtype=torch.float32, **kw):
    """A random model of ``config`` (fp32 on the CPU unless asked)."""
    return random_model(config, device, dtype, seed=seed, **kw)


def engine_config(block_size: int = 8, device_blocks: int = 256, max_num_seqs: int = 4, prefill_chunk: int = 64,
                  policy: PolicyConfig | str = "full", device: str = "auto", **cache) -> EngineConfig:
    """The engine configuration most tests use: small blocks, a pool of ``device_blocks``, a
    batch of 4, 64-token prefill chunks, full attention; ``cache``: more CacheConfig fields."""
    if isinstance(policy, str):
        policy = PolicyConfig(policy)
    return EngineConfig(device=device, cache=CacheConfig(block_size=block_size, num_device_blocks=device_blocks, **cache),
                        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk), policy=policy)


def tokens(n: int, seed: int, vocab: int = TINY.vocab_size, low: int = 3) -> list[int]:
    """``n`` random token ids in [low, vocab): no special token (bos 1, eos 2; 0 for BYTES)."""
    return torch.randint(low, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
