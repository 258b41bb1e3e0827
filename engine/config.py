"""Frozen configs, parsed once at the edge (CLI, Serve args) and passed down as fields."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import InvalidRequestError, ModelFormatError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling: ``linear`` (positions / factor) or ``llama3`` (Llama 3.1 frequency bands)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder (Llama 2/3/3.1, Qwen2/2.5, Mistral)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _itemsize(dtype)

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary."""
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            if model_type in ("llama", "mistral", "qwen2"):
                arch = model_type
            else:
                raise UnsupportedModelError(
                    f"architecture {archs or model_type!r} is not supported; lsa-serve runs "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)} (dense GQA Llama family)"
                )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            max_pos = int(cfg.get("max_position_embeddings", 4096))
            # transformers >= 5 writes rope_parameters (theta inside); older configs rope_scaling.
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            if arch == "mistral" and cfg.get("sliding_window"):
                # We do not implement sliding-window attention: serve only what fits inside it.
                max_pos = min(max_pos, int(cfg["sliding_window"]))
            if arch == "qwen2" and cfg.get("use_sliding_window"):
                raise UnsupportedModelError("Qwen2 with use_sliding_window=true is not supported")
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            config = cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5)),
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=_parse_rope_scaling(rope),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UnsupportedModelError):
                raise
            raise ModelFormatError(f"config.json is missing or has a bad field: {exc!r}") from exc
        config.validate()
        return config

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim={self.head_dim} must be even for rotary embeddings")


def _parse_rope_scaling(raw: dict | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported (use default, linear or llama3)")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """``auto`` (or None) is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def option(default, help: str, flag: str | None = None, choices: tuple | None = None):
    """A config field with its command-line help (engine/options.py turns fields into flags
    and ``key=value`` arguments). ``flag``: the flat name when the field name is not one."""
    meta = {"help": help, **({"flag": flag} if flag else {}), **({"choices": choices} if choices else {})}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def auto_block_size(max_model_len: int) -> int:
    """Tokens per block when none is given: small blocks select finely where contexts are
    short (16 up to 16K tokens), larger ones copy and attend efficiently where they are long
    (32 up to 64K, 64 beyond)."""
    if max_model_len <= 16384:
        return 16
    return 32 if max_model_len <= 65536 else 64


@dataclass(frozen=True)
class CacheConfig:
    """Block KV cache: device reserve and host mirror."""

    block_size: int | None = option(None, "tokens per KV block, a power of two (default: 16 for contexts "
                                    "up to 16K tokens, 32 up to 64K, 64 beyond)")
    num_device_blocks: int | None = option(None, "device pool slots (default: sized from max_num_seqs x "
                                           "max_model_len, capped by device_kv_bytes)")
    device_kv_bytes: int | None = option(None, "cap on the device pool when sized automatically (default: 85% "
                                         "of free GPU memory on CUDA, 4 GiB on CPU)")
    host_mirror: bool = option(True, "mirror complete blocks to host RAM (offloading policies need it)")
    num_host_blocks: int | None = option(None, "host mirror blocks (default: as many as the contexts need)")
    host_dtype: str | None = option(None, "host mirror format: the model dtype (default), fp8 (e4m3 blocks, "
                                    "one scale per block, layer, K/V and head) or int4 (4-bit, keys per channel "
                                    "and values per token with float16 scales: 0.55x fp8's bytes at B=64, D=128)",
                                    choices=("fp8", "int4"))

    def __post_init__(self):
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}")
        if self.host_dtype not in (None, "fp8", "int4"):
            raise InvalidRequestError(f"host_dtype must be None (the model dtype), 'fp8' or 'int4', "
                                      f"got {self.host_dtype!r}")

    def block_size_for(self, max_model_len: int) -> int:
        return self.block_size or auto_block_size(max_model_len)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = option(8, "sequences decoded together")
    max_model_len: int | None = option(None, "longest sequence, prompt and output (default: the model's context)")
    prefill_chunk: int = option(1024, "prompt tokens prefilled per step, over the sequences prefilling")
    max_prefill_seqs: int = option(4, "sequences prefilled side by side, the fewest tokens left first (1: one at "
                                      "a time, in arrival order)")
    layerwise_prefill: bool | None = option(None, "offloading policies: prefill layer by layer, the device holding "
                                            "one layer's prompt KV (default: when the prompt does not fit the "
                                            "device pool)")
    cuda_graphs: bool | None = option(None, "decode steps as CUDA graphs (default: on CUDA for policies "
                                      "without per-step selection)")
    overlap_decode: bool | None = option(None, "launch a decode step before reading the step before's tokens "
                                         "(greedy rows no hook acts on, the batch unchanged): the GPU does not "
                                         "wait for the host between steps; a finishing sequence costs one step "
                                         "more (default: on CUDA)")

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.prefill_chunk < 1 or self.max_prefill_seqs < 1:
            raise InvalidRequestError("max_num_seqs, prefill_chunk and max_prefill_seqs must be positive")


POLICIES = ("full", "lsa", "quest", "streaming", "snapkv", "oracle", "oracle_head")
INDEX_SCORES = ("quest", "mean", "mass", "attention")  # LSA's zero-training Level-1 scores


@dataclass(frozen=True)
class PolicyConfig:
    """Which KV blocks decode attends to, and which live on the device.

    ``budget`` is the resident fraction of a sequence's blocks, sinks and tail included; every
    policy but ``full`` is held to it, and to ``min_resident_tokens`` below it. See docs/lsa.md
    for each policy.
    """

    name: str = option("lsa", "attention policy (docs/lsa.md)", flag="policy", choices=POLICIES)
    budget: float = option(0.10, "resident fraction of a sequence's blocks, sinks and tail included")
    min_resident_tokens: int = option(512, "resident tokens a sequence keeps at least, whatever the budget "
                                      "(a context shorter than this keeps every block)")
    cycle: int = option(64, "lsa: decode steps between Level-1 refreshes")
    sink_blocks: int = option(1, "first blocks always resident")
    tail_blocks: int = option(1, "complete recent blocks always resident, besides the open one (a minimum)")
    tail_tokens: int = option(128, "recent tokens always resident, in whole blocks; at most half of the budget "
                              "left after the sinks and the open block")
    target_layers: tuple[int, ...] | None = option(None, "lsa: Level-1 scoring layers (default: 3 over the middle)")
    query_window: int = option(8, "lsa: recent decode queries the zero-training indexer scores with")
    threshold: float | None = option(None, "lsa: select blocks by score >= threshold, the budget as the cap")
    level2_topk: int | None = option(None, "lsa: per step and layer, attend to the top-k resident blocks")
    per_layer: bool = option(False, "one resident set per layer instead of one shared by all layers")
    page_blocks: int = option(1, "lsa: recall whole pages of this many blocks")
    neighbors: int = option(1, "lsa: with each selected block, also the next this many (a fact spans blocks)")
    lookahead: int = option(1, "lsa: cycles between computing a plan and applying it (1: the paper's, 0: at once)",
                            choices=(0, 1))
    prefetch: float = option(0.35, "lsa: copy the next plan's blocks during the cycle before it applies, into "
                             "spare slots of at most this fraction of the budget (real text brings in about a "
                             "third of the set per cycle; 0: all at the boundary)")
    late: str = option("defer", "lsa: a plan's blocks not copied ahead by its boundary: defer (the blocks they "
                       "replace stay a cycle more; no step waits for a copy) or load (copied at the boundary)",
                       choices=("defer", "load"))
    stagger_boundaries: bool = option(True, "lsa: sequences that start decoding together reach their Level-1 "
                                      "boundaries in different steps, each at the phase farthest from the "
                                      "others' (False: every first boundary after a full cycle, so a "
                                      "sequence's plans do not depend on its batch)")
    observation_window: int = option(32, "snapkv, and lsa's first plan: prompt queries that vote")
    first_plan: str = option("attention", "lsa's plan at the end of prefill: exact attention of the observation "
                             "window, or the indexer", choices=("attention", "indexer"))
    indexer: str | None = option(None, "lsa: learned indexer directory (lsa train-indexer); default: zero-training")
    layer_plan: str | None = option(None, "lsa: layer plan file (lsa calibrate): the layers in groups, each with its "
                                    "own resident set and share of the budget; default: one set for all layers")
    recency_bonus: float = option(2.0, "lsa: a complete block among the newest budget's worth (StreamingLLM's "
                                  "window) ranks as if the indexer gave it (1 + this) times the attention "
                                  "mass: a far block replaces one of them only where it outweighs it that "
                                  "much (0: off; large: the window, plus only the far blocks that dominate; "
                                  "2: the best measured with the mean-key score, docs/accuracy.md)")
    index_score: str = option("mean", "zero-training indexer score: mean (mean-key dot; the default), quest "
                                  "(min/max bounds), mass (attention mass with the mean key as the block's keys), "
                                  "attention (exact attention mass of the recent queries on every complete block's "
                                  "keys, read from the host mirror: the best perplexity measured, docs/accuracy.md, "
                                  "at 5% of batch-1 and 32% of batch-24 decode throughput at 128K, docs/perf.md)",
                                  choices=INDEX_SCORES)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise InvalidRequestError(f"unknown policy {self.name!r}; use one of {', '.join(POLICIES)}")
        if not 0.0 < self.budget <= 1.0:
            raise InvalidRequestError(f"budget must be in (0, 1], got {self.budget}")
        if self.cycle < 1 or self.sink_blocks < 0 or self.tail_blocks < 0 or self.tail_tokens < 0 \
                or self.page_blocks < 1 or self.neighbors < 0 or self.min_resident_tokens < 0:
            raise InvalidRequestError("cycle and page_blocks must be >= 1; sink_blocks, tail_blocks, tail_tokens, "
                                      "neighbors and min_resident_tokens >= 0")
        if not self.recency_bonus >= 0.0:
            raise InvalidRequestError(f"recency_bonus must be >= 0, got {self.recency_bonus}")
        if self.index_score not in INDEX_SCORES:
            raise InvalidRequestError(f"index_score must be one of {', '.join(INDEX_SCORES)}")
        if self.first_plan not in ("attention", "indexer"):
            raise InvalidRequestError("first_plan must be 'attention' or 'indexer'")
        if not 0.0 <= self.prefetch <= 1.0:
            raise InvalidRequestError(f"prefetch must be in [0, 1] (a fraction of the budget), got {self.prefetch}")
        if self.late not in ("defer", "load"):
            raise InvalidRequestError(f"late must be 'defer' or 'load', got {self.late!r}")
        if self.lookahead not in (0, 1):
            raise InvalidRequestError("lookahead must be 0 (plan applied at once) or 1 (next cycle)")
        if self.target_layers is not None and not isinstance(self.target_layers, tuple):
            object.__setattr__(self, "target_layers", tuple(self.target_layers))

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """Level-1 target layers: the configured ones, or three spread over the middle."""
        if self.target_layers is not None:
            bad = [i for i in self.target_layers if not 0 <= i < num_layers]
            if bad:
                raise InvalidRequestError(f"target layers {bad} outside 0..{num_layers - 1}")
            return self.target_layers
        return tuple(sorted({num_layers * k // 8 for k in (3, 4, 5)}))


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine process needs; built once at the edge (engine/options.py)."""

    model: str = option("smollm2-135m", "embedded name (smollm2-135m, tiny-random), Hugging Face model "
                        "directory, or .gguf file")
    device: str = option("auto", "cpu, cuda[:N], or auto (cuda where this process sees a GPU, else cpu)")
    dtype: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    weights_seed: int = option(0, "seed for random weights (tiny-random) and anything else drawn at load")
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    @property
    def device_name(self) -> str:
        """The device this process runs on: ``auto`` is resolved where the engine is built."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.device_name)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ModelConfig", "RopeScaling", "CacheConfig", "SchedulerConfig", "PolicyConfig", "EngineConfig",
           "parse_dtype", "ceil_div", "auto_block_size", "option"]
