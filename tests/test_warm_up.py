"""DecodeWorkerCore.warm_up: the requests a replica runs before it reports ready leave nothing
behind (no session, every leased host block given back) and the worker serves afterwards; on
CUDA they capture a decode graph per batch bucket up to max_num_seqs."""
import pytest
import torch

from actors.decode_worker import DecodeWorkerCore
from actors.kv_store import KVStoreCore, arena_path
from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.host_arena import ArenaLayout
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams
from tiny import TINY  # noqa: E402

BLOCK = 16
CUDA = torch.cuda.is_available()


def worker(tmp_path, device):
    model = random_model(TINY, device, torch.bfloat16 if device == "cuda" else torch.float32, seed=1)
    dtype = next(model.parameters()).dtype
    layout = ArenaLayout.of(TINY, BLOCK, dtype)
    store = KVStoreCore("n", layout, 300 * layout.block_bytes, arena_path("warm", "n", str(tmp_path)))
    config = EngineConfig(cache=CacheConfig(block_size=BLOCK, num_device_blocks=400),
                          scheduler=SchedulerConfig(max_num_seqs=4, prefill_chunk=64),
                          policy=PolicyConfig(name="lsa", cycle=4, min_resident_tokens=0))
    return store, DecodeWorkerCore.build(lambda arena: LLMEngine(model, config, arena=arena), store, "w",
                                         pin=device == "cuda")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_warm_up_leaves_nothing_behind_and_the_worker_serves(tmp_path, device):
    store, core = worker(tmp_path, device)
    try:
        done = core.warm_up()
        assert done["requests"] == (1 if device == "cpu" else 1 + 2 + 4) and done["seconds"] > 0
        if device == "cuda":
            assert done["graphs"] >= 3  # batch buckets 1, 2 and 4 at least
        if core.engine.cache.mirror.pinned:  # the arena's copy speeds to the GPU, in the stats /metrics reads
            assert set(done["host_copy_gbps"]) == {"arena", "arena_layer", "pinned"}
            assert all(v > 0.1 for v in done["host_copy_gbps"].values()) and core.stats().host_copy == core.host_copy
        else:  # the CPU, or an arena not on tmpfs (tmp_path): nothing measured
            assert done["host_copy_gbps"] == {} and core.stats().host_copy == {}
        stats = store.stats()
        assert stats.sessions == 0 and stats.session_blocks == 0
        # the warm-up prompts' blocks may stay as prefix blocks (engine/prefix.py), which the store evicts at need
        assert stats.free_blocks + stats.leased_blocks + stats.prefix_blocks == stats.capacity_blocks
        assert stats.leased_blocks <= 16  # at most the worker's spare blocks stay leased
        context = torch.randint(3, 64, (70,), generator=torch.Generator().manual_seed(2)).tolist()
        assert core.create_session("s", context).result(timeout=120).prefill_tokens == 70
        answer = core.ask("s", [5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True)).result(timeout=120)
        assert len(answer.token_ids) == 5 and answer.prefill_tokens < 70
    finally:
        core.close()


def test_warm_up_makes_every_batch_bucket_graph(tmp_path):
    """The static-buffer runner (on CPU without capture): after warm-up every batch bucket up to
    max_num_seqs has its graph at the one table width, and serving makes no other."""
    from engine.graphs import DecodeGraphRunner

    store, core = worker(tmp_path, "cpu")
    try:
        graphs = core.engine.runner.graphs = DecodeGraphRunner(core.engine.runner, capture=False)
        core.warm_up()
        assert set(graphs.steps) == {(b, graphs.max_width) for b in (1, 2, 4)}
        context = torch.randint(3, 64, (70,), generator=torch.Generator().manual_seed(2)).tolist()
        core.create_session("s", context).result(timeout=120)
        core.ask("s", [5, 6, 7], SamplingParams(max_tokens=9, ignore_eos=True)).result(timeout=120)
        assert set(graphs.steps) == {(b, graphs.max_width) for b in (1, 2, 4)}
    finally:
        core.close()


def test_the_step_trace_logs_every_batch(tmp_path, monkeypatch):
    """LSA_STEP_TRACE=DIR: the worker writes a line per batch the engine ran (engine/trace.py) once
    idle: the prompt's prefill segments up to its length, then one decode batch per token after
    the first."""
    import json

    monkeypatch.setenv("LSA_STEP_TRACE", str(tmp_path / "trace"))
    store, core = worker(tmp_path, "cpu")
    try:
        prompt = torch.randint(3, 64, (150,), generator=torch.Generator().manual_seed(3)).tolist()
        answer = core.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True)).result(timeout=120)
        assert len(answer.token_ids) == 6
        core.on_loop(lambda: None).result(timeout=30)  # the loop went idle after the request: flushed
        files = list((tmp_path / "trace").iterdir())
        assert len(files) == 1 and files[0].name.startswith("steps-w-")
        rows = [json.loads(line) for line in files[0].read_text().splitlines()]
        cycles = core.engine.policy.cycles
    finally:
        core.close()
    prefill = [r for r in rows if r[1] == "prefill"]
    decode = [r for r in rows if r[1] == "decode"]  # in the order they ran
    assert [r[2][1] for r in prefill] == [64, 128, 150]  # prefill_chunk 64: the position each segment reached
    assert len(decode) == 5 and all(r[2] == 1 for r in decode)
    # each decode batch with the LSA cycle boundaries it ran (cycle 4: one among the five)
    assert cycles == 1 and sum(r[4] for r in decode) == cycles and all(r[4] in (0, 1) for r in decode)
    # and its host parts: the plan applied, the launch, the policy's work after it (within the batch's time)
    assert all(len(r) == 8 and min(r[5:8]) >= 0 and r[5] + r[6] + r[7] <= r[3] and r[6] > 0 for r in decode)
    batches = prefill + decode
    assert all(r[3] > 0 for r in batches) and [r[0] for r in batches] == sorted(r[0] for r in batches)
    marks = {r[1]: r[0] for r in rows if r[1] in ("queued", "first_token")}  # the turn's, in the loop
    assert marks["queued"] <= prefill[0][0] and prefill[-1][0] <= marks["first_token"] <= decode[0][0]
    assert {r[1] for r in rows} <= {"prefill", "decode", "gc", "queued", "first_token", "schedule", "postprocess",
                                    "stream_updates", "finish"}  # the host work only where it took >= 1 ms


def test_the_step_trace_summary_sets_boundary_steps_apart():
    """benchmarks/step_trace.py: per burst, the decode steps that ran a cycle boundary apart from
    the others (median, p99, max in ms); rows without the boundary field (older logs) count as others."""
    from benchmarks.step_trace import bursts

    rows = [[0.0, "prefill", [1, 64], 0.050]]
    rows += [[0.1 + 0.01 * i, "decode", 2, 0.007, int(i % 8 == 7)] for i in range(32)]
    rows += [[0.5, "decode", 2, 0.020]]  # an older log's row: no boundary field
    rows[8][3] = 0.012  # the first boundary step (i = 7) is the slow one
    (b,) = bursts(rows, gap=0.5)
    at, rest, every = b["boundary_steps"], b["other_steps"], b["decode_steps"]
    assert at["n"] == 4 and rest["n"] == 29 and every["n"] == 33
    assert abs(at["max_ms"] - 12.0) < 1e-9 and abs(at["median_ms"] - 7.0) < 1e-9
    assert abs(rest["max_ms"] - 20.0) < 1e-9 and abs(rest["median_ms"] - 7.0) < 1e-9
    assert abs(every["max_ms"] - 20.0) < 1e-9 and abs(every["p99_ms"] - 20.0) < 1e-9


def test_the_step_trace_summary_gives_the_cadence_at_the_full_batch():
    """The cadence: start to start of consecutive decode batches at the burst's largest batch, and
    the time outside them; a smaller batch or a prefill between two breaks the pair."""
    from benchmarks.step_trace import bursts

    rows = [[0.0, "decode", 1, 0.005]]  # one sequence alone: not the full batch
    rows += [[0.010 + 0.008 * i, "decode", 3, 0.006] for i in range(10)]  # period 8 ms, 2 ms outside
    rows += [[0.095, "prefill", [7, 64], 0.010], [0.110, "decode", 3, 0.006], [0.130, "decode", 3, 0.006]]
    (b,) = bursts(rows, gap=0.5)
    c = b["cadence"]
    assert c["n"] == 10 and c["batch"] == 3  # 9 pairs in the run, 1 after the prefill
    assert abs(c["period"]["median_ms"] - 8.0) < 1e-6 and abs(c["period"]["max_ms"] - 20.0) < 1e-6
    assert abs(c["outside"]["median_ms"] - 2.0) < 1e-6 and abs(c["outside"]["max_ms"] - 14.0) < 1e-6
    slowest = c["slowest"][0]  # the pair around the prefill
    assert abs(slowest["period_ms"] - 20.0) < 1e-6 and abs(slowest["step_ms"] - 6.0) < 1e-6 and slowest["boundary"] == 0
    assert "before_ms" not in slowest  # rows without host parts (older logs)


def test_the_step_trace_summary_splits_the_steps_host_parts():
    """Decode rows with their host parts (plan applied, launch, work after it): the slowest periods
    show them, the rest of the step being the device wait and sampling; boundary and other steps
    give each part's median."""
    from benchmarks.step_trace import bursts

    rows = [[0.010 * i, "decode", 2, 0.006, 0, 0.0001, 0.0005, 0.0002] for i in range(9)]
    rows[4] = [0.040, "decode", 2, 0.009, 1, 0.0021, 0.0005, 0.0004]  # a boundary: 2 ms of plan before it
    rows[5][0] = 0.052  # the period after the boundary step: 12 ms
    (b,) = bursts(rows, gap=0.5)
    top = b["cadence"]["slowest"][0]
    assert abs(top["period_ms"] - 12.0) < 1e-6 and top["boundary"] == 1
    assert abs(top["before_ms"] - 2.1) < 1e-6 and abs(top["launch_ms"] - 0.5) < 1e-6
    assert abs(top["after_ms"] - 0.4) < 1e-6 and abs(top["rest_ms"] - 6.0) < 1e-6
    at, rest = b["boundary_steps"], b["other_steps"]
    assert abs(at["median_before_ms"] - 2.1) < 1e-6 and abs(rest["median_before_ms"] - 0.1) < 1e-6
    assert abs(rest["median_rest_ms"] - 5.2) < 1e-6
