"""benchmarks/device/session.sh served1 / served2 (= prefill serve / checks pooled) rehearsed on
the CPU (LSA_REHEARSE=1: tiny model shapes, tiny-random for SmolLM2): every step of the lead's two
device calls runs, within its timeout, and writes its JSON; on the GPU only the shapes and the device change."""
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
    for phase in ("served1", "served2"):
        done = subprocess.run(["bash", "benchmarks/device/session.sh", phase], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = dict(line.split()[:2] for line in (out / "steps.txt").read_text().splitlines())
    assert steps == {"make_model": "rc=0", "prefill": "rc=0", "serve": "rc=0", "checks": "rc=0", "pooled": "rc=0"}
    prefill = json.loads((out / "prefill.json").read_text())
    assert {(r["path"], r["context"]) for r in prefill["rows"]} == {("layerwise", 512), ("layerwise", 1024),
                                                                   ("ordinary", 512)}
    serve = json.loads((out / "serve.json").read_text())
    assert serve["ratio"] > 0 and serve["workload"]["sessions"] == 2  # SESSIONS=2, the store sized for them
    assert serve["served"]["first_reused"] and serve["engine"]["first_reused"]  # the single 1024-token session
    checks = json.loads((out / "checks.json").read_text())
    assert checks["restart"]["no_reprefill"] and checks["leaks"]["flat_all"]
    pooled = json.loads((out / "pooled.json").read_text())
    assert pooled["spilled_sessions"] >= 1
    assert not list(tmp_path.glob("*.arena"))
