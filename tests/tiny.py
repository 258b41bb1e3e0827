"""The tiny model configurations the tests share (random weights; a few KB).

``TINY``: 4 layers, GQA 4 query / 2 KV heads of 16, a 64-token vocabulary (eos 2): the engine,
policies, sessions and actors tests. ``CFG``: 3 layers, heads of 8, vocabulary 32: the block
and host-mirror bookkeeping tests. Builders of engines over them are in conftest.py."""
from engine.config import ModelConfig

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_ids=(2,))
CFG = ModelConfig(architecture="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8)
