"""Engines for ``lsa bench decode`` whose sequences are already at a long context: synthetic KV
(random blocks and summaries) in the device pool (full attention) or the host mirror (LSA),
prefill skipped; model shapes (Llama-3-8B, a tiny one for CPU runs, or a config.json)."""
from __future__ import annotations

import dataclasses
import json

import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.host_mirror import row_bytes
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import Status

LLAMA3_8B = dict(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=131072, eos_token_ids=(128001,))
TINY = dict(architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
            num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=8192, eos_token_ids=(1,))
GiB = 2 ** 30


def model_config(name: str, layers: int | None, max_len: int) -> ModelConfig:
    """``llama3-8b`` (default), ``tiny`` (for CPU smoke runs), or a Hugging Face config.json path."""
    if name == "llama3-8b":
        from engine.config import RopeScaling

        cfg = ModelConfig(**LLAMA3_8B, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    elif name == "tiny":
        cfg = ModelConfig(**TINY)
    else:
        with open(name) as f:
            cfg = ModelConfig.from_hf(json.load(f))
    return dataclasses.replace(cfg, num_layers=layers or cfg.num_layers,
                               max_position_embeddings=max(max_len, cfg.max_position_embeddings))


def _sync(device: torch.device) -> None:
    """Wait for the compute stream only: copies staged on the copy stream go on in the background,
    as they do in serving (where the host waits only for each step's sampled tokens)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclasses.dataclass
class Setup:
    """How one engine is built: policy, batch, context, steps it must be able to decode."""

    policy: str  # full | lsa
    rhos: tuple[float, ...]
    batch: int
    context: int
    max_tokens: int
    block_size: int
    cycle: int
    host_dtype: str | None
    graphs: bool | None = None  # CUDA-graph decode (None: the engine's auto)
    churn: float | None = None  # plans replace about this share of the resident set (None: random KV, most of it)
    max_batch: bool = False  # the largest batch the policy fits (lsa bench decode --batch max)
    index_score: str = "mean"  # lsa's Level-1 score: mean (device index keys) or attention (keys from the mirror)

    @property
    def max_len(self) -> int:
        return self.context + self.max_tokens - 1


def per_seq_bytes(cfg: ModelConfig, s: Setup, dtype: torch.dtype) -> tuple[int, int]:
    """(device, host) bytes of KV one sequence needs under setup ``s``."""
    bs = s.block_size
    block = cfg.kv_bytes_per_token(dtype) * bs
    blocks = -(-s.max_len // bs)
    if s.policy == "full":
        return blocks * block, 0
    probe = probe_policy(cfg, s)
    host_block = row_bytes(cfg, bs, dtype, s.host_dtype)
    index = len(probe.index_layers()) * 3 * blocks * cfg.num_kv_heads * cfg.head_dim * 2 if probe.index_keys else 0
    return probe.decode_reserve(s.max_len) * block + index, blocks * host_block


def probe_policy(cfg: ModelConfig, s: Setup):
    from engine.policies import make_policy

    return make_policy(policy_config(s), cfg.num_layers, s.block_size)


def policy_config(s: Setup) -> PolicyConfig:
    if s.policy == "full":
        return PolicyConfig(name="full")
    # rho itself is measured: no resident floor (at the benchmark's 32K+ contexts it never binds). No recency
    # bonus: ``--churn`` sets how much each plan replaces (a third: real text's with the bonus off; the bonus
    # lowers it, 28% fewer blocks copied at 8K on essays, docs/accuracy.md), and random KV would not churn anyway
    return PolicyConfig(name="lsa", budget=max(s.rhos), cycle=s.cycle, first_plan="indexer", min_resident_tokens=0,
                        recency_bonus=0.0, index_score=s.index_score)


def build(model, s: Setup, device: torch.device, gen: torch.Generator) -> tuple[LLMEngine, list]:
    """An engine whose ``batch`` sequences are decoding at ``context`` tokens, prefill skipped."""
    cfg, bs = model.config, s.block_size
    lsa = s.policy == "lsa"
    probe = probe_policy(cfg, s)
    reserve = probe.decode_reserve(s.max_len) if lsa else -(-s.max_len // bs)
    engine = LLMEngine(model, EngineConfig(
        device=str(device),
        cache=CacheConfig(block_size=bs, num_device_blocks=s.batch * reserve, host_mirror=lsa,
                          num_host_blocks=s.batch * -(-s.max_len // bs) if lsa else 0, host_dtype=s.host_dtype),
        scheduler=SchedulerConfig(max_num_seqs=s.batch, max_model_len=s.max_len + 1, cuda_graphs=s.graphs),
        policy=policy_config(s)))
    cache, policy = engine.cache, engine.policy
    churn = lsa and s.churn is not None
    if churn:
        policy.indexer = SyntheticChurn(policy.indexer, cache.mirror.summary.shape[0], -(-s.max_len // bs), device,
                                        int(torch.randint(2 ** 31, (1,), generator=gen)))
        # an indexer that reads the keys ranks logical blocks: one set kept for every sequence
        shared_hot = hot_blocks(probe, s, gen) if policy.reads_keys else None
    params = SamplingParams(max_tokens=s.max_tokens, ignore_eos=True)
    seqs = []
    for _ in range(s.batch):
        seq = engine.add_request(torch.randint(10, cfg.vocab_size, (s.context,), generator=gen).tolist(), params)
        engine.scheduler.waiting.remove(seq)
        cache.admit(seq.seq_id, reserve)
        if lsa:
            ids = [h for _, h in cache.blocks.commit(seq.seq_id, s.context)]
            fill_host(cache, ids, gen)
            if churn:
                hot = shared_hot if shared_hot is not None else hot_blocks(probe, s, gen)
                policy.indexer.keep([ids[j] for j in hot], hot)
        else:
            cache.append_slots([seq.seq_id], [s.context])
            cache.blocks.commit(seq.seq_id, s.context)
        seqs.append(seq)
    if not lsa:
        cache.pool.normal_(generator=None)
    for seq in seqs:
        if lsa:  # the indexer's query window, then the first plan, loaded from the host mirror
            for layer in policy.index_layers():
                q = torch.randn(policy.config.query_window, cfg.num_heads, cfg.head_dim, device=device,
                                dtype=cache.dtype)
                policy.observe_prefill(seq.seq_id, layer, q, None, cfg.head_dim ** -0.5)
            policy.after_prefill(seq.seq_id)
        seq.num_cached = s.context
        seq.output_ids.append(int(torch.randint(10, cfg.vocab_size, (1,), generator=gen)))
        seq.status = Status.DECODE
        engine.scheduler.running.append(seq)
    _sync(device)
    return engine, seqs


def hot_blocks(policy, s: Setup, gen: torch.Generator) -> list[int]:
    """Logical blocks that every plan should keep, so that a plan replaces about ``s.churn`` of
    the resident set (the rest of its selection is random): (1 - churn) of the blocks selected at
    the smallest rho, best first, away from the sinks and the tail (a ranked block brings its
    ``neighbors`` with it, so a kept block stands for 1 + neighbors of them)."""
    blocks = s.context // s.block_size
    small = dataclasses.replace(policy.config, budget=min(s.rhos))
    probe = type(policy)(small, policy.num_layers, policy.block_size)
    keep = probe.config.sink_blocks + probe.tail_size(blocks + 1) + 1
    count = max(0, round((1 - s.churn) * probe.budget_blocks(blocks + 1)) - keep) // (1 + small.neighbors)
    candidates = torch.arange(probe.config.sink_blocks, blocks - keep)
    return candidates[torch.randperm(len(candidates), generator=gen)[:count]].tolist()


class SyntheticChurn:
    """The indexer of a churned run (``--churn``): it scores as the real one does (the cost of
    Level-1 stays in the run), then ranks the blocks every plan keeps (``keep``, best first)
    above all others and the others in a fresh random order at each call, so that each plan
    replaces about ``churn`` of the resident set.

    Random KV alone does not churn: its summaries are a bank of 64 blocks tiled over the
    context (ties, broken by position), and the Quest bound of random summaries hardly depends
    on the query, so successive plans were the same and boundaries copied nothing. An indexer
    that reads the keys (``reads_keys``: the ``attention`` score) is given logical blocks, not
    host rows: its kept blocks are logical ones, the same for every sequence."""

    def __init__(self, indexer, num_host_blocks: int, num_logical_blocks: int, device: torch.device, seed: int):
        self.indexer = indexer
        self.reads_keys = getattr(indexer, "reads_keys", False)
        rows = num_logical_blocks if self.reads_keys else num_host_blocks
        self.rank = torch.zeros(rows, device=device)  # per host row (or logical block): > 1 for kept blocks
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def keep(self, host_ids: list[int], logical: list[int]) -> None:
        """Blocks every plan keeps, best first (host rows and their logical blocks)."""
        ids = logical if self.reads_keys else host_ids
        self.rank[torch.tensor(ids, dtype=torch.long, device=self.rank.device)] = \
            2.0 + torch.arange(len(ids), 0, -1, device=self.rank.device, dtype=torch.float32)

    def score(self, queries, *args) -> torch.Tensor:
        real = self.indexer.score(queries, *args)
        kept = self.rank[: real.numel()] if self.reads_keys else self.rank[args[-1]]  # args[-1]: host_ids
        noise = torch.rand(kept.shape, generator=self.gen, device=kept.device)  # in [0, 1): below every kept block
        return torch.where(kept > 0, kept, noise)


def fill_host(cache, host_ids: list[int], gen: torch.Generator, bank_blocks: int = 64) -> None:
    """Synthetic complete blocks in the host mirror: a bank of random blocks tiled over the
    rows, summaries (min <= mean <= max) around a random mean key, and the device index keys."""
    mirror = cache.mirror
    host = mirror.host
    layers, _, _, heads, block, dim = cache.pool.shape
    shape = (layers, 2, heads, block, dim)  # a row in the model dtype, before any quantization
    bank = torch.randn(bank_blocks, *shape, generator=gen)
    mean = torch.randn(bank_blocks, shape[0], shape[2], shape[4], generator=gen) * 0.1  # [n, L, H, D]
    spread = torch.rand(bank_blocks, shape[0], shape[2], shape[4], generator=gen) + 0.5
    summary = torch.stack([mean - spread, mean + spread, mean], 2).to(cache.dtype)  # [n, L, 3, H, D]
    if mirror.format == "fp8":
        from engine.host_memory import quantize_fp8

        data, scale = quantize_fp8(bank)
    elif mirror.format == "int4":
        import kernels

        data, scale = kernels.quantize_int4(bank)
    else:
        data, scale = bank.to(cache.dtype), None
    ids = torch.tensor(host_ids)
    contiguous = host_ids == list(range(host_ids[0], host_ids[0] + len(host_ids))) if host_ids else True
    for a in range(0, len(host_ids), bank_blocks):
        n = min(bank_blocks, len(host_ids) - a)
        rows = slice(host_ids[a], host_ids[a] + n) if contiguous else ids[a: a + n]  # slices copy fastest
        host[rows] = data[:n]
        mirror.summary[rows] = summary[:n]
        if scale is not None:
            mirror.scale[rows] = scale[:n]
    cache.index_keys_from_mirror(host_ids)
