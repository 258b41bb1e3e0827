"""Build a ``LlamaForCausalLM`` from a model source, or with random weights for benchmarks."""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.errors import ModelFormatError
from engine.model import LlamaForCausalLM, fuse_projections, rope_inv_freq
from engine.weights import ModelSource, load_weights


def _finish(model: LlamaForCausalLM, device: torch.device | str, dtype: torch.dtype,
            fuse: bool) -> LlamaForCausalLM:
    cfg = model.config
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model = model.to(device=device, dtype=dtype)
    model.model.rotary.inv_freq = model.model.rotary.inv_freq.float()  # rotary stays fp32
    if fuse:
        fuse_projections(model)
    return model.eval().requires_grad_(False)


def load_model(source: ModelSource, device: torch.device | str, dtype: torch.dtype,
               config: ModelConfig | None = None, fuse: bool = True) -> LlamaForCausalLM:
    """``fuse``: q|k|v and gate|up as one Linear each once loaded (``engine.model.fuse_projections``)."""
    config, state = load_weights(source, config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelFormatError(f"{source.path} lacks {len(missing)} weights the config needs, e.g. {missing[:3]}")
    for name, tensor in state.items():
        want = model.state_dict().get(name)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            raise ModelFormatError(f"weight {name} has shape {tuple(tensor.shape)}, the config says {tuple(want.shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    return _finish(model, device, dtype, fuse)


def random_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0, fuse: bool = True) -> LlamaForCausalLM:
    """Random weights with a fixed seed, scaled so activations stay O(1) through many layers
    (drawn per separate projection, so fusing changes no weight)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = {}
    for name, p in model.state_dict().items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = torch.ones(p.shape, device=device, dtype=dtype)
        elif name.endswith(".bias"):
            t = torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 0.02
        else:
            t = torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * (p.shape[-1] ** -0.5)
        params[name] = t
    model.load_state_dict(params, strict=False, assign=True)
    return _finish(model, device, dtype, fuse)
