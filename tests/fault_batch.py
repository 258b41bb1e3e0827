"""A batch of jobs with a fault injected while it runs, and the decode workers' stats: the fault
tests of tests/test_serve_app.py (a decode worker killed, the node's KV store killed)."""
import json
import threading
import time
from pathlib import Path

import ray
from ray import serve

from cluster.batch import run_batch


def batch_with_a_fault(client, tmp_path: Path, name: str, fault) -> None:
    """Six jobs (a ~1K-token document and three questions each), two at a time; ``fault()``
    runs once the first result is written. Every job must be answered exactly once."""
    jobs, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-out.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"{name}{i}", "context": f"Document {i}: " + "lorem ipsum dolor " * 60,
                                        "questions": ["First?", "Second?", "Third?"], "max_tokens": 24}) + "\n"
                            for i in range(6)))
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(summary=run_batch(client, jobs, out, concurrency=2, retries=5,
                                                                           progress=False)))
    runner.start()
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    written_before = len(out.read_text().splitlines()) if out.exists() else 0
    assert 0 < written_before < 6, f"the fault must come during the batch ({written_before} of 6 written)"
    fault()
    runner.join(timeout=600)
    assert not runner.is_alive(), "the batch did not finish"
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == [f"{name}{i}" for i in range(6)]  # each exactly once
    assert done["summary"].failed == 0 and done["summary"].succeeded == 6, done["summary"]
    assert all(len(r["answers"]) == 3 for r in results), results[:1]  # every question answered


def named(prefix: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
            or prefix in a["name"]]


def worker_stats_by_process() -> dict[int, object]:
    """``stats`` of each decode worker replica (keyed by its process id), asked through the
    deployment's handle until both replicas have answered (or 3 minutes went by)."""
    handle = serve.get_deployment_handle("DecodeWorker", app_name="lsa").options(method_name="stats")
    seen: dict[int, object] = {}
    deadline = time.monotonic() + 180  # a killed replica's successor may still be starting
    while len(seen) < 2 and time.monotonic() < deadline:
        stats = handle.remote().result(timeout_s=30)
        seen[stats.memory["pid"]] = stats
        time.sleep(0.2)
    return seen
