"""``lsa bench decode`` at tiny sizes on CPU: every policy row is measured and consistent."""
import json

import pytest
import torch

from benchmarks.synthetic import model_config
from cli import main
from engine.loader import random_model

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 2, 2, 64, 64  # the tiny config with --layers 2


def test_bench_decode_runs_on_cpu_and_reports_every_policy(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode", "--config", "tiny", "--layers", "2", "--contexts", "4096", "--device", "cpu",
               "--batch", "1", "max", "--max-batch", "2", "--steps", "6", "--rounds", "2", "--cycle", "4",
               "--warmup", "1", "--host-dtype", "fp8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "lsa@0.1" in printed.out and "prefill is skipped" in printed.err
    report = json.loads(out.read_text())
    assert report["meta"]["kv"] == "synthetic (prefill skipped)"
    rows = [r for r in report["rows"] if "skipped" not in r]
    one = {(r["policy"], r["rho"]): r for r in rows if r["batch"] == 1}
    assert set(one) == {("full", None), ("lsa", 0.1), ("lsa", 0.135)} and all(r["alternated"] for r in one.values())
    assert sorted(r["policy"] for r in rows if r["batch"] == 2) == ["full", "lsa", "lsa"]  # the max batch (capped)
    full, lo, hi = one[("full", None)], one[("lsa", 0.1)], one[("lsa", 0.135)]
    for r in rows:
        assert r["steps"] == 12 and 0 < r["token_ms_median"] <= r["token_ms_p99"]
        assert r["graph_captures"] == 0 and all(s["ms"] > 10 * r["token_ms_median"] for s in r["slow_steps"])
        assert abs(r["tokens_per_s"] * r["timed_s"] - r["batch"] * r["steps"]) < 1e-6  # every step, every sequence
        assert r["timed_s"] * 1e3 >= r["steps"] / 2 * r["token_ms_median"]
    # resident fraction follows the budget (plus tail, open block and index keys); full holds everything
    assert full["device_kv_fraction"] >= 1.0 and full["host_kv_bytes"] == 0
    # the index keys are paid for inside rho: the attended set is at most rho (plus the block opened since the boundary)
    blocks = 4096 // BLOCK
    assert 0.05 < lo["resident_kv_fraction"] <= 0.1 + 1 / blocks < hi["resident_kv_fraction"] <= 0.135 + 1 / blocks
    assert all(r["device_kv_fraction"] >= r["resident_kv_fraction"] for r in (lo, hi))  # plus staged slots
    for r in (lo, hi):
        assert r["cycles"] >= 2 and r["swap_wait_ms_per_cycle"] > 0 and r["boundary_steps"] >= r["cycles"] // r["batch"]
        anatomy = r["boundary_anatomy"]  # every timed step in one kind, the boundaries as counted
        assert anatomy["boundary"]["steps"] == r["boundary_steps"]
        assert sum(a["steps"] for a in anatomy.values()) == r["steps"]
        # FP8 mirror: one byte per element plus a float32 scale per (layer, K/V, head), complete blocks only
        tokens = r["full_kv_bytes"] // (LAYERS * 2 * KV_HEADS * HEAD_DIM * 4)
        per_block = LAYERS * 2 * KV_HEADS * (BLOCK * HEAD_DIM + 4)
        assert r["host_kv_bytes"] == (tokens // BLOCK) * per_block
        assert r["host_dtype"] == "fp8"
    # every row against the memory floor of its step, at the bandwidth measured in the run
    bw = report["meta"]["copy_bw_bytes_per_s"]
    for r in rows:
        assert r["copy_bw_bytes_per_s"] == bw > 0
        assert r["step_bytes"] == r["weights_bytes"] + r["attended_kv_bytes"] + r["index_bytes_per_step"]
        assert abs(r["floor_ms"] - r["step_bytes"] / bw * 1e3) < 1e-9
        assert abs(r["ratio_to_floor"] - r["token_ms_median"] / r["floor_ms"]) < 1e-9
    assert full["index_bytes_per_step"] == 0 and full["attended_kv_bytes"] >= full["full_kv_bytes"]
    assert lo["attended_kv_bytes"] < full["attended_kv_bytes"] / 4 and lo["index_bytes_per_step"] > 0
    # the weights a step reads: all but the embedding table (untied here), each storage once
    model = random_model(model_config("tiny", 2, 8192), "cpu", torch.float32)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert full["weights_bytes"] == lo["weights_bytes"] == params - model.model.embed_tokens.weight.numel() * 4


def test_bench_decode_int4_mirror_with_real_text_churn(tmp_path, capsys):
    """The int4 mirror's exact bytes, and plans that replace about a third of the set (``--churn``):
    the staging area (0.35 of the budget) holds them, so the peak stays within 1.35 x the budget."""
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--config", "tiny", "--layers", "2", "--contexts", "16384", "--device", "cpu",
                 "--batch", "1", "--rhos", "0.1", "--steps", "16", "--rounds", "1", "--cycle", "8", "--warmup", "1",
                 "--host-dtype", "int4", "--churn", "0.33", "--out", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    lsa = rows["lsa"]
    assert lsa["host_dtype"] == "int4" and lsa["churn"] == 0.33 and lsa["cycles"] >= 2
    tokens = lsa["full_kv_bytes"] // (LAYERS * 2 * KV_HEADS * HEAD_DIM * 4)
    per_block = LAYERS * (2 * KV_HEADS * BLOCK * HEAD_DIM // 2 + KV_HEADS * (2 * HEAD_DIM + 2 * BLOCK) * 2)
    assert lsa["host_kv_bytes"] == (tokens // BLOCK) * per_block
    assert lsa["resident_kv_fraction"] <= 0.1 + 1 / (tokens // BLOCK)  # one block opened since the boundary
    assert lsa["peak_device_kv_fraction"] <= 0.135 + 2 / (tokens // BLOCK)
    assert lsa["late_fraction"] == 0 and lsa["bytes_copied_per_cycle"] > 0  # every timed plan brings blocks in


@pytest.mark.parametrize("score", ["mean", "attention"])
def test_churned_plans_copy_the_blocks_they_change(score):
    """``--churn 0.33``: each plan replaces about a third of the resident set, and what the
    boundaries copy is exactly the blocks that entered the resident set x their bytes (random
    summaries alone never changed a plan: 0 bytes copied per cycle on the H200). The same with
    the ``attention`` score (``--index-score attention``): it keeps no device index keys and
    ranks logical blocks, read from the mirror at each boundary."""
    from benchmarks.synthetic import Setup, build

    cycle, cycles = 8, 4
    model = random_model(model_config("tiny", LAYERS, 20000), "cpu", torch.float32, seed=0)
    setup = Setup("lsa", (0.1,), 1, 16384, 6 * cycle, BLOCK, cycle, None, churn=0.33, index_score=score)
    engine, seqs = build(model, setup, torch.device("cpu"), torch.Generator().manual_seed(0))
    cache, policy = engine.cache, engine.policy
    assert policy.reads_keys == (score == "attention") and cache.keeps_index_keys == (score == "mean")
    blocks = cache.blocks.seqs[seqs[0].seq_id]
    for _ in range(cycle + 1):  # past the first boundary (the prefill's plan again) and its step
        engine.step()
    copied0, entered, budgets = cache.bytes_copied, 0, []
    for _ in range(cycles * cycle):  # staging for a boundary starts the step after the one before
        before, opened = set(blocks.resident[0]), blocks.num_tokens // BLOCK
        engine.step()
        came = set(blocks.resident[0]) - before - {opened}
        if came:
            entered += len(came)
            budgets.append(len(came) / len(blocks.resident[0]))
    assert len(budgets) == cycles and all(0.2 <= share <= 0.45 for share in budgets)  # about a third each
    assert cache.blocks_loaded_late == LAYERS * len(blocks.resident[0])  # only the first plan, at build
    per_block = LAYERS * cache.mirror.bytes_per_layer_block  # all layers of one block
    assert cache.bytes_copied - copied0 == entered * per_block > 0


def test_slow_steps_say_where_they_were_and_what_they_ran():
    from benchmarks.decode import slow_steps

    windows = [{"step_s": [0.01] * 5 + [0.5], "boundaries": [0] * 5 + [1], "captures": [0] * 6},
               {"step_s": [0.01, 0.25, 0.09], "boundaries": [0, 0, 1], "captures": [0, 1, 0]}]
    slow = slow_steps(windows, median=0.01)
    assert [(s["window"], s["step"], s["boundaries"], s["captures"]) for s in slow] == [(0, 5, 1, 0), (1, 1, 0, 1)]
    assert [round(s["ms"]) for s in slow] == [500, 250]


def test_boundary_anatomy_sorts_steps_by_kind_and_takes_medians():
    from benchmarks.decode import boundary_anatomy

    host = lambda b, w, a: (b / 1e3, w / 1e3, a / 1e3)  # noqa: E731 (ms -> s)
    windows = [{"step_s": [0.005, 0.009, 0.006, 0.005, 0.005], "boundaries": [0, 1, 0, 0, 0],
                "host_s": [host(0, 0, 0.1), host(1.0, 0.5, 0.2), host(0, 0, 2.0), host(0, 0, 0.3), host(0, 0, 0.1)]},
               {"step_s": [0.008, 0.007], "boundaries": [2, 0],  # a boundary first: the next step follows one
                "host_s": [host(3.0, 0.1, 0.4), host(0, 0, 1.0)]}]
    a = boundary_anatomy(windows)
    assert a["boundary"]["steps"] == 2 and a["after_boundary"]["steps"] == 2 and a["other"]["steps"] == 3
    assert abs(a["boundary"]["step_ms"] - 8.5) < 1e-9 and abs(a["boundary"]["before_ms"] - 2.0) < 1e-9
    assert abs(a["boundary"]["wait_ms"] - 0.3) < 1e-9 and abs(a["after_boundary"]["after_ms"] - 1.5) < 1e-9
    assert abs(a["other"]["step_ms"] - 5.0) < 1e-9 and abs(a["other"]["after_ms"] - 0.1) < 1e-9


def test_bench_decode_times_each_engine_with_and_without_overlap(tmp_path, capsys):
    """``--overlap both``: every (policy, rho) timed with overlapped decode and without, in
    alternation on the same engine, each compared with full attention in the same mode."""
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode", "--config", "tiny", "--layers", "2", "--contexts", "2048", "--device", "cpu",
               "--batch", "1", "--rhos", "0.1", "--steps", "5", "--rounds", "2", "--cycle", "4", "--warmup", "1",
               "--overlap", "both", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["policy"], r["overlap"]) for r in rows) == [("full", False), ("full", True),
                                                                 ("lsa", False), ("lsa", True)]
    for r in rows:  # each mode timed every step of its windows, nothing finished inside them
        assert r["steps"] == 10 and 0 < r["token_ms_median"] <= r["token_ms_p99"]
        steps = [t for w in r["windows"] for t in w["step_ms"]]  # every step kept, as summarised
        assert len(steps) == 10 and max(steps) >= r["token_ms_p99"] - 1e-3
        assert all(len(w["host_ms"]) == len(w["step_ms"]) == len(w["boundaries"]) for w in r["windows"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("2048")]
    assert sorted((line[2], line[4]) for line in lines) == [("full", "off"), ("full", "on"), ("lsa@0.1", "off"),
                                                            ("lsa@0.1", "on")]
    assert all(line[10].endswith("x") for line in lines if line[2] == "lsa@0.1")  # compared with full, same mode
