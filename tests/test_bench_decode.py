"""``lsa bench decode`` at tiny sizes on CPU: every policy row is measured and consistent."""
import json

from cli import main

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
        assert abs(r["tokens_per_s"] * r["timed_s"] - r["batch"] * r["steps"]) < 1e-6  # every step, every sequence
        assert r["timed_s"] * 1e3 >= r["steps"] / 2 * r["token_ms_median"]
    # resident fraction follows the budget (plus tail, open block and index keys); full holds everything
    assert full["device_kv_fraction"] >= 1.0 and full["host_kv_bytes"] == 0
    assert 0.1 <= lo["resident_kv_fraction"] < hi["resident_kv_fraction"] < 0.3
    assert all(r["device_kv_fraction"] >= r["resident_kv_fraction"] for r in (lo, hi))  # plus staged slots
    for r in (lo, hi):
        assert r["cycles"] >= 2 and r["swap_wait_ms_per_cycle"] > 0
        # FP8 mirror: one byte per element plus a float32 scale per (layer, K/V, head), complete blocks only
        tokens = r["full_kv_bytes"] // (LAYERS * 2 * KV_HEADS * HEAD_DIM * 4)
        per_block = LAYERS * 2 * KV_HEADS * (BLOCK * HEAD_DIM + 4)
        assert r["host_kv_bytes"] == (tokens // BLOCK) * per_block
        assert r["host_dtype"] == "fp8"
