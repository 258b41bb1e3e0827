"""Tensor parallelism on CPU: 2 ranks over gloo give one process's logits, and LSA keeps the same
blocks resident on every rank (and the same as one process).

Tolerance: fp32 logits within 1e-4 absolute of the single-process engine (the sharded sums add
the same products in another order; measured: at most 5e-6)."""
from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import socket
import traceback

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.parallel import TensorParallel, TensorParallelError, build_tp_engine, shard_config
from engine.sampling import SamplingParams

WORLD = 2
TIMEOUT_S = 150
ATOL = 1e-4
BLOCK = 16
DECODE_STEPS = 12

LLAMA = ModelConfig(architecture="llama", vocab_size=67, hidden_size=64, intermediate_size=96, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_ids=(2,))
QWEN2 = dataclasses.replace(LLAMA, architecture="qwen2", qkv_bias=True, tie_word_embeddings=True, num_heads=8,
                            num_kv_heads=2, head_dim=8, rope_theta=1e6)
MISTRAL = dataclasses.replace(LLAMA, architecture="mistral", num_heads=8, num_kv_heads=4, head_dim=8, o_bias=True,
                              mlp_bias=True)

# LSA with a short tail and no neighbours: most of the budget is chosen by the scores
SELECTIVE = dict(name="lsa", budget=0.4, cycle=4, tail_tokens=16, neighbors=0)
# (name, model, policy): full attention, LSA (Level-1), per-layer LSA, LSA with Level-2 top-k
CASES = [
    ("llama-full", LLAMA, dict(name="full")),
    ("llama-lsa", LLAMA, dict(SELECTIVE, first_plan="indexer")),
    ("qwen2-lsa-per-layer", QWEN2, dict(SELECTIVE, index_score="mean", per_layer=True)),
    ("mistral-lsa-l2", MISTRAL, dict(SELECTIVE, level2_topk=2)),
]


def engine_config(policy: dict) -> EngineConfig:
    return EngineConfig(device="cpu", dtype="fp32", cache=CacheConfig(block_size=BLOCK, num_device_blocks=128),
                        scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=64),
                        policy=PolicyConfig(**{"min_resident_tokens": 0, **policy}))


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 67, (n,), generator=gen).tolist() for n in (300, 201)]


def run(engine) -> dict:
    """Greedy decode of ``prompts()``: per request, the logits of every step [S, V] and the resident
    blocks (per group, sorted) when each token is sampled."""
    logits, resident = {}, {}

    def record(seq, row):
        logits.setdefault(seq.seq_id, []).append(row.clone())
        blocks = engine.cache.blocks.seqs.get(seq.seq_id)
        resident.setdefault(seq.seq_id, []).append([sorted(g) for g in blocks.resident] if blocks else None)

    engine.hooks.append(LogitsObserver(record))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=DECODE_STEPS, temperature=0.0, ignore_eos=True))
            for p in prompts()]
    while engine.has_work():
        engine.step()
    return {"logits": [torch.stack(logits[s.seq_id]) for s in seqs], "resident": [resident[s.seq_id] for s in seqs],
            "tokens": [list(s.output_ids) for s in seqs],
            "reductions": getattr(engine.policy, "reductions", 0)}


def rank_main(rank: int, port: int, out: str) -> None:
    """One rank: every case through a sharded engine; results (or the traceback) to ``out``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
        tp = TensorParallel.from_default_group()
        results = {}
        for name, model_config, policy in CASES:
            model = random_model(model_config, "cpu", torch.float32, seed=11)
            results[name] = run(build_tp_engine(model, engine_config(policy), tp))
        dist.destroy_process_group()
        torch.save(results, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of the 2-rank run, one dict per rank; a hang fails after TIMEOUT_S."""
    out = tmp_path_factory.mktemp("tp")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, str(out / f"rank{r}.pt")), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    results = []
    for r in range(WORLD):
        path = out / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote nothing (hung: {hung}, exit codes {[p.exitcode for p in procs]})"
        result = torch.load(path, weights_only=False)
        assert "error" not in result, f"rank {r} failed:\n{result.get('error')}"
        results.append(result)
    assert not hung, f"ranks {hung} did not finish within {TIMEOUT_S} s"
    return results


_REFERENCES: dict[str, dict] = {}


def single_process(name: str, model_config: ModelConfig, policy: dict) -> dict:
    """The same case on one process, with the plain model and policy (computed once per case)."""
    if name not in _REFERENCES:
        model = random_model(model_config, "cpu", torch.float32, seed=11)
        _REFERENCES[name] = run(LLMEngine(model, engine_config(policy)))
    return _REFERENCES[name]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_match_one_process(ranks, case):
    name, model_config, policy = case
    reference = single_process(name, model_config, policy)
    for rank, result in enumerate(ranks):
        got = result[name]
        assert got["tokens"] == reference["tokens"], f"rank {rank} sampled other tokens"
        for mine, want in zip(got["logits"], reference["logits"]):
            assert mine.shape == want.shape == (DECODE_STEPS, model_config.vocab_size)
            assert (mine - want).abs().max().item() < ATOL, f"rank {rank}: logits differ from one process"
    # the logits are all-gathered: every rank holds the very same tensor
    for mine, other in zip(ranks[0][name]["logits"], ranks[1][name]["logits"]):
        assert torch.equal(mine, other)


@pytest.mark.parametrize("case", [c for c in CASES if c[2]["name"] == "lsa"], ids=lambda c: c[0])
def test_lsa_selects_the_same_blocks_on_every_rank(ranks, case):
    name, model_config, policy = case
    reference = single_process(name, model_config, policy)
    first, second = ranks[0][name], ranks[1][name]
    assert first["resident"] == second["resident"]
    assert first["resident"] == reference["resident"]
    # sparse indeed: at the last step fewer blocks are resident than the sequence has
    for steps, prompt in zip(first["resident"], prompts()):
        total = -(-(len(prompt) + DECODE_STEPS) // BLOCK)
        assert 0 < len(steps[-1][0]) < total
    # one reduction per sequence for the first plan, and at least one more at a boundary
    assert first["reductions"] == second["reductions"] >= 2 * len(prompts())


def test_one_rank_sharding_is_the_plain_model():
    """TP size 1 swaps every module yet computes exactly what the plain model does."""
    config = engine_config(dict(name="full"))
    plain = run(LLMEngine(random_model(QWEN2, "cpu", torch.float32, seed=5), config))
    sharded = run(build_tp_engine(random_model(QWEN2, "cpu", torch.float32, seed=5), config, TensorParallel(0, 1)))
    assert plain["tokens"] == sharded["tokens"]
    for a, b in zip(plain["logits"], sharded["logits"]):
        assert (a - b).abs().max().item() < ATOL


def test_shard_config_splits_heads_and_features():
    local = shard_config(MISTRAL, TensorParallel(1, 2))
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (4, 2, 48)
    assert (local.vocab_size, local.hidden_size, local.head_dim) == (MISTRAL.vocab_size, 64, 8)


def test_kv_heads_must_divide_by_the_tp_size():
    with pytest.raises(TensorParallelError, match=r"num_key_value_heads=2 .* tensor-parallel size 4"):
        shard_config(LLAMA, TensorParallel(0, 4))
    with pytest.raises(TensorParallelError, match=r"intermediate_size=96 .* size 5"):
        shard_config(dataclasses.replace(LLAMA, num_kv_heads=5, num_heads=10), TensorParallel(0, 5))


def test_policies_that_would_select_per_rank_are_refused():
    with pytest.raises(InvalidRequestError, match="quest"):
        build_tp_engine(random_model(LLAMA, "cpu", torch.float32), engine_config(dict(name="quest")),
                        TensorParallel(0, 1))
    with pytest.raises(ValueError, match="rank 2"):
        TensorParallel(2, 2)
