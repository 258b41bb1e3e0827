"""``lsa bench prefill`` on the CPU with a tiny shape: both paths run, the floor and the rates are
measured, the JSON report has what docs/perf.md reads."""
import json

from cli import parse_args


def test_bench_prefill_smoke(tmp_path):
    out = tmp_path / "prefill.json"
    args = parse_args(["bench", "prefill", "--model", "tiny", "--layers", "2", "--contexts", "300", "600",
                       "--ordinary-max", "300", "--chunk", "128", "--block-size", "16", "--rate-tokens", "256",
                       "--device", "cpu", "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["matmul_tflops"] > 0 and report["attention"]["sdpa_flash_tflops"] > 0
    assert report["attention"]["kernel_tflops"] > 0 and report["attention"]["kernel_segment_tflops"] > 0
    rows = {(r["path"], r["context"]): r for r in report["rows"]}
    assert set(rows) == {("layerwise", 300), ("layerwise", 600), ("ordinary", 300)}
    for row in rows.values():
        assert row["seconds"] > 0 and row["floor_s"] > 0 and row["over_floor"] == row["seconds"] / row["floor_s"]
        assert row["host_kv_bytes"] > 0  # the prompt's complete blocks went to the host mirror
    bound = rows[("layerwise", 600)]["layerwise_bound"]
    assert bound["scratch"] == 2 * rows[("layerwise", 300)]["layerwise_bound"]["scratch"]
