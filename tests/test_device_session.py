"""benchmarks/device/session.sh served1 / served2 (= prefill serve / checks pooled) rehearsed on
the CPU (LSA_REHEARSE=1: tiny model shapes, tiny-random for SmolLM2): every step of the lead's two
device calls runs, within its timeout, and writes its JSON; on the GPU only the shapes and the device change.

It is also the end-to-end test of what those steps run (one app each, the slowest tests of the
suite, so not run twice): ``lsa bench serve`` (the app started, the workload over HTTP, stopped,
the same workload on the engine alone, both reported with their ratio) and
benchmarks/device/served_checks.py (the demo's questions through the app, a worker restart
without re-prefill, the leak check; pooled host RAM over two Ray nodes, sessions spilled and
staged back)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
from cluster.local import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_served_phases_rehearsed_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "LSA_REHEARSE": "1", "OUT": str(out), "TMPDIR": str(tmp_path), "LSA_KV_DIR": str(tmp_path),
           "LSA_PORT": str(free_port()), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    # the two calls' phases in one run of the script (its phase loop; on the device, a call each)
    done = subprocess.run(["bash", "benchmarks/device/session.sh", "served1", "served2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = dict(line.split()[:2] for line in (out / "steps.txt").read_text().splitlines())
    assert steps == {"make_model": "rc=0", "prefill": "rc=0", "serve": "rc=0", "checks": "rc=0", "pooled": "rc=0"}
    prefill = json.loads((out / "prefill.json").read_text())
    assert {(r["path"], r["context"]) for r in prefill["rows"]} == {("layerwise", 512), ("layerwise", 1024),
                                                                   ("ordinary", 512)}
    vocab = json.loads((tmp_path / "lsa-rehearse-model" / "config.json").read_text())["vocab_size"]
    check_serve(json.loads((out / "serve.json").read_text()), vocab)
    check_checks(json.loads((out / "checks.json").read_text()))
    check_pooled(json.loads((out / "pooled.json").read_text()))
    assert not list(tmp_path.glob("*.arena"))  # every arena removed (the apps', the engine alone's)


TURN_TOKENS = 72  # session.sh's rehearsal: tokens a turn generates


def check_serve(serve: dict, vocab: int, max_tokens: int = TURN_TOKENS) -> None:
    """``lsa bench serve`` at contexts 512 and 1024, 2 follow-ups each, 2 sessions of 1024 at once."""
    assert serve["workload"]["sessions"] == 2  # SESSIONS=2, the store sized for them
    assert serve["workload"]["vocab"] == [4, min(vocab, 32000)]  # token ids from the model's vocabulary
    for side in ("served", "engine"):
        for single in serve[side]["single"]:
            assert single["ttft_s"] > 0 and single["prefill_tokens"] == single["context"], single
            for turn in single["followups"]:
                assert turn["num_tokens"] == max_tokens and turn["prefill_tokens"] < single["context"]  # from the store
                assert turn["itl"]["n"] >= 3  # pieces arrived one by one
        assert serve[side]["first_reused"]  # the single 1024-token session is the first concurrent one
        c = serve[side]["concurrent"]
        assert c["sessions"] == 2 and c["tokens"] == 2 * max_tokens and c["tokens_per_s"] > 0 and c["itl"]["n"] > 0
    # the same workload: the same tokens prefilled per turn on both sides
    assert serve["served"]["concurrent"]["prefill_tokens"] == serve["engine"]["concurrent"]["prefill_tokens"]
    assert serve["ratio"] == pytest.approx(serve["served"]["concurrent"]["tokens_per_s"]
                                           / serve["engine"]["concurrent"]["tokens_per_s"]) and serve["ratio"] > 0


def check_checks(checks: dict) -> None:
    """served_checks.py app: demo, restart, leaks on tiny-random."""
    assert checks["demo"]["succeeded"] == 2 and checks["demo"]["failed"] == 0  # answers from a random model
    restart = checks["restart"]
    assert restart["new_replica"] and restart["no_reprefill"] and restart["same_text"], restart
    leaks = checks["leaks"]
    assert len(leaks["snapshots"]) == 4 and leaks["flat_all"], leaks["flat"]


def check_pooled(pooled: dict, context: int = 1024, max_tokens: int = TURN_TOKENS) -> None:
    """served_checks.py pooled: FP8 blocks between two nodes' stores through Ray."""
    assert len(pooled["stores"]) == 2  # the GPU-less node has its own store
    assert pooled["spill"]["stores_after"] != pooled["spill"]["stores_before"]
    assert pooled["spilled_sessions"] >= 1
    for turn in pooled["all_local"] + pooled["spilled_turns"]:
        assert turn["num_tokens"] == max_tokens and turn["prefill_tokens"] < context  # never re-prefilled
    assert all(t["cross_node_bytes"] == 0 for t in pooled["all_local"])
    assert all(t["cross_node_bytes"] > 0 and t["stage_s"] > 0 for t in pooled["spilled_turns"])  # staged back
    assert all(t["cross_node_bytes"] == 0 for t in pooled["spilled_again"])  # its staged copies stayed
    assert pooled["spilled_vs_local_tokens_per_s"] > 0
