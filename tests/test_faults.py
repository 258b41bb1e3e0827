"""Faults on a real Ray cluster (``cluster:app``, tiny random model, 2 decode workers): a decode
worker killed during a 6-job batch, and separately the node's KV store killed during another,
lose no job: 6 of 6 answered exactly once (the client retries what the server calls
retryable); and after the store's death no worker is left serving with the dead store (each
moves to the new one: its store generation goes up, and it answers)."""
import json
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.own_process  # starts Ray Serve: see conftest.py
from ray import serve  # noqa: E402
from ray_cluster import ray_cluster  # noqa: E402

from cluster.batch import run_batch  # noqa: E402
from cluster.client import LSAClient  # noqa: E402
from cluster.local import free_port  # noqa: E402

NAMESPACE = "lsa-faults"


@pytest.fixture(scope="module")
def url():
    with ray_cluster(NAMESPACE, head_cpus=4, serve_app=True):
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from cluster import app

        args = {"model": "tiny-random", "num_workers": 2, "block_size": 16, "kv_store_bytes": 64 << 20,
                "worker_num_cpus": 0.5, "torch_threads": 1, "max_num_seqs": 4, "cluster": "faults"}
        serve.run(app(args), name="lsa", route_prefix="/")
        yield f"http://127.0.0.1:{port}"


def batch_with_a_fault(url: str, tmp_path: Path, name: str, fault) -> None:
    """Six jobs (a ~1K-token document and three questions each), two at a time; ``fault()``
    runs once the first result is written. Every job must be answered exactly once."""
    jobs, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-out.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"{name}{i}", "context": f"Document {i}: " + "lorem ipsum dolor " * 60,
                                        "questions": ["First?", "Second?", "Third?"], "max_tokens": 24}) + "\n"
                            for i in range(6)))
    client = LSAClient(url, timeout_s=120)
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


def test_a_decode_worker_killed_during_a_batch_loses_no_job(url, tmp_path):
    def kill_a_worker():
        worker = next(a for a in named("DecodeWorker"))
        ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]), no_restart=True)

    batch_with_a_fault(url, tmp_path, "w", kill_a_worker)


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


def test_a_store_killed_during_a_batch_loses_no_job_and_every_worker_moves_to_the_new_store(url, tmp_path):
    before = worker_stats_by_process()
    assert len(before) == 2
    store = named("kvstore:")
    assert len(store) == 1  # one node, one store

    def kill_the_store():
        ray.kill(ray.get_actor(store[0]["name"], namespace=store[0]["namespace"]), no_restart=True)

    batch_with_a_fault(url, tmp_path, "s", kill_the_store)
    # no worker left with the dead store: both move to its successor (the one that took no turn
    # since learns of it from its routing stats or its health check)
    deadline = time.monotonic() + 60
    while True:
        after = worker_stats_by_process()
        moved = {pid: after[pid].store_generation > before[pid].store_generation for pid in before if pid in after}
        if len(moved) == 2 and all(moved.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert len(moved) == 2 and all(moved.values()), {pid: s.store_generation for pid, s in after.items()}
    assert named("kvstore:") and named("kvstore:")[0]["name"] == store[0]["name"]  # a new store, same name
    client = LSAClient(url, timeout_s=120)
    for i in range(4):  # and the app still serves sessions
        s = client.session(f"After the fault {i}. " * 20)
        assert client.ask(s.session_id, "Still there?", max_tokens=3).text is not None
