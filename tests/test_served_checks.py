"""The device script's checks (benchmarks/device/served_checks.py), rehearsed on the CPU with
tiny-random: the demo's questions through the app, a worker restart without re-prefill, the
leak check, and pooled host RAM over two Ray nodes (sessions spilled and staged back)."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("ray")
from cluster.local import free_port  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "served_checks.py"
APP = ["model=tiny-random", "block_size=16", "torch_threads=1", "worker_num_cpus=0.5", "max_num_seqs=4"]


def checks():
    spec = importlib.util.spec_from_file_location("served_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_app_checks_demo_restart_leaks(tmp_path):
    out = tmp_path / "checks.json"
    assert checks().main(["app", str(out), "--checks", "demo,restart,leaks", "--context-tokens", "250",
                          "--port", str(free_port()),
                          "--num-cpus", "4", *APP, "kv_store_bytes=67108864", f"kv_dir={tmp_path}"]) == 0
    report = json.loads(out.read_text())
    assert report["demo"]["succeeded"] == 2 and report["demo"]["failed"] == 0  # answers from a random model
    restart = report["restart"]
    assert restart["new_replica"] and restart["no_reprefill"] and restart["same_text"], restart
    leaks = report["leaks"]
    assert len(leaks["snapshots"]) == 4 and leaks["flat_all"], leaks["flat"]
    assert not list(tmp_path.glob("*.arena"))


@pytest.mark.slow
def test_pooled_host_ram_over_two_nodes_fp8(tmp_path, monkeypatch):
    monkeypatch.setenv("LSA_KV_DIR", str(tmp_path))
    out = tmp_path / "pooled.json"
    assert checks().main(["pooled", str(out), "--context", "600", "--sessions", "2", "--extra", "1",
                          "--max-tokens", "8", "--num-cpus", "4", *APP, "host_dtype=fp8"]) == 0  # FP8 blocks via Ray
    report = json.loads(out.read_text())
    assert len(report["stores"]) == 2  # the GPU-less node has its own store
    assert report["spill"]["stores_after"] != report["spill"]["stores_before"]
    assert report["spilled_sessions"] >= 1
    for turn in report["all_local"] + report["spilled_turns"]:
        assert turn["num_tokens"] == 8 and turn["prefill_tokens"] < 600  # never re-prefilled
    assert all(t["cross_node_bytes"] == 0 for t in report["all_local"])
    assert all(t["cross_node_bytes"] > 0 for t in report["spilled_turns"])  # staged back from the peer
    assert report["spilled_vs_local_tokens_per_s"] > 0
    assert not list(tmp_path.glob("*.arena"))
