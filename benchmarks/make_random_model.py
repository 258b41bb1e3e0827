"""Write a random-weight Llama model as a Hugging Face directory that the normal loader reads.

    python -m benchmarks.make_random_model /tmp/llama3-8b-random --shape llama3-8b
    lsa serve model=/tmp/llama3-8b-random device=cuda ...

The directory holds ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
shards and ``model.safetensors.index.json`` past ``--shard-bytes``) and the tokenizer files of
the embedded SmolLM2 model (its GGUF tokenizer, saved with transformers' ``save_pretrained``, chat
template included). ``vocab_size`` is that tokenizer's size (49152), not the shape's own (Llama-3:
128256), so that every id the tokenizer makes has an embedding row. Of the work only the LM head
changes: a decode step reads 0.65 GB less of Llama-3-8B's 16 GB (4%); the prefill computes the
LM head for one token only.

Weights are drawn as ``engine.loader.random_model`` draws them (fixed seed; norms 1, matrices
N(0, 1/fan_in)), one tensor at a time on ``--device`` (a GPU draws 8B parameters in a second),
and written a shard at a time, so host memory holds one shard at most.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from engine.config import ModelConfig, parse_dtype

SHAPES = {  # Hugging Face config fields of each shape (vocab_size comes from the tokenizer)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      max_position_embeddings=1048576 + 8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                         rope_scaling=None, max_position_embeddings=8192),  # the embedded model's shape
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                 max_position_embeddings=16384),
}


def save_tokenizer(out: Path, source: str | None = None):
    """The embedded SmolLM2 tokenizer (from its GGUF), or the tokenizer files in directory
    ``source`` (the same, exported beforehand: benchmarks/device/prepare.sh), saved in ``out``."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from engine.weights import resolve_model

    hf_logging.set_verbosity_error()
    if source:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        gguf = resolve_model("smollm2-135m").path
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def hf_config(shape: str, vocab_size: int, bos: int | None, eos: int | None, dtype: torch.dtype,
              layers: int | None = None, max_position: int | None = None) -> dict:
    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    if max_position:
        fields["max_position_embeddings"] = max_position
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields, "vocab_size": vocab_size,
            "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "hidden_act": "silu", "torch_dtype": name}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, device, dtype) -> torch.Tensor:
    """As ``engine.loader.random_model``: norms ones, everything else N(0, 1 / fan_in)."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype) * (shape[-1] ** -0.5)


def write_weights(out: Path, config: ModelConfig, dtype: torch.dtype, seed: int, device: str,
                  shard_bytes: int) -> list[str]:
    """Draw every weight in state-dict order and write the shards; returns the file names."""
    from safetensors.torch import save_file

    from engine.model import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups, group, size = [], [], 0  # tensor names per shard
    for name, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if group and size + nbytes > shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += nbytes
    groups.append(group)
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for file, names in zip(files, groups):
        shard = {n: random_tensor(n, shapes[n], gen, device, dtype).cpu() for n in names}
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update((n, file) for n in names)
        del shard
    if len(files) > 1:
        total = sum(itemsize * torch.Size(s).numel() for s in shapes.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return files


def make_random_model(out: str | Path, shape: str = "llama3-8b", seed: int = 0, dtype: str = "bf16",
                      device: str = "auto", layers: int | None = None, max_position: int | None = None,
                      shard_bytes: int = 4 << 30, tokenizer: str | None = None) -> dict:
    """Write the model directory; returns a summary (shape, vocab size, files, seconds)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch_dtype = parse_dtype(dtype, "cuda")  # "auto" -> bf16, as on a GPU
    tok = save_tokenizer(out, tokenizer)
    raw = hf_config(shape, len(tok), tok.bos_token_id, tok.eos_token_id, torch_dtype, layers, max_position)
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    config = ModelConfig.from_hf(raw)
    files = write_weights(out, config, torch_dtype, seed, device, shard_bytes)
    return {"dir": str(out), "shape": shape, "config": dataclasses.asdict(config), "vocab_size": len(tok),
            "files": files, "bytes": sum((out / f).stat().st_size for f in files), "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="model directory to write")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--device", default="auto", help="where the weights are drawn (auto: cuda if present)")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--max-position", type=int, default=None, help="override max_position_embeddings")
    p.add_argument("--shard-bytes", type=float, default=4 << 30, help="largest safetensors file")
    p.add_argument("--tokenizer", default=None, help="a directory of the SmolLM2 tokenizer's files (default: "
                   "from the embedded GGUF)")
    args = p.parse_args(argv)
    summary = make_random_model(args.out, args.shape, args.seed, args.dtype, args.device, args.layers,
                                args.max_position, int(args.shard_bytes), args.tokenizer)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
