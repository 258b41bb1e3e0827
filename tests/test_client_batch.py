"""run_batch against the fake server of test_client.py: retries, resume, bad job lines."""
import json
import threading
from collections import Counter

import pytest

from cluster.batch import JobLineError, read_jobs, run_batch
from cluster.client import LSAClient
from test_client import FakeLSAServer


def make_jobs(tmp_path, n, tags=("",)):
    """n jobs; job i knows 'color' => c<i> and 'size' => s<i>; expected answers: one
    right, one wrong, one unknown (null)."""
    lines = []
    for i in range(n):
        tag = tags[i % len(tags)]
        lines.append(json.dumps({
            "id": f"job-{i}",
            "context": f"{tag}\ncolor => c{i}\nsize => s{i}\n" + "filler " * 50,
            "questions": ["color", "size", "color"],
            "answers": [f"C{i}", "wrong", None],
            "max_tokens": 16,
        }))
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_transient_errors_are_retried_and_answers_checked(tmp_path):
    jobs = make_jobs(tmp_path, 6, tags=("[flaky-create]", "[flaky-ask]", "[evict]"))
    out = tmp_path / "results.jsonl"
    with FakeLSAServer() as server:
        summary = run_batch(LSAClient(server.url), jobs, out, concurrency=3, retries=3,
                                                  backoff_s=0.01, progress=False)
        injected = Counter(kind for kind, _ in server.faults.elements())
        leaked = dict(server.sessions)
    # 2 of the jobs had their creation fail twice; 2 had 2 asks fail on each session
    # (evicted jobs re-create their session, so asks go to a fresh one).
    assert injected == {"create": 4, "ask": 4}
    assert leaked == {}
    results = read_results(out)
    assert sorted(r["id"] for r in results) == [f"job-{i}" for i in range(6)]
    for r in results:
        i = r["id"].split("-")[1]
        assert r["error"] is None
        assert r["answers"] == [f"The answer is c{i}.", f"The answer is s{i}.",
                                f"The answer is c{i}."]
        assert r["correct"] == [True, False, None]
        assert r["seconds"] >= 0
    assert (summary.succeeded, summary.failed, summary.num_checked) == (6, 0, 12)
    assert summary.accuracy == 0.5


def test_no_retries_means_transient_error_is_reported(tmp_path):
    jobs = make_jobs(tmp_path, 2, tags=("[flaky-create]",))
    out = tmp_path / "results.jsonl"
    with FakeLSAServer() as server:
        summary = run_batch(LSAClient(server.url), jobs, out, retries=0, progress=False)
    results = read_results(out)
    assert summary.failed == 2 and all("503" in r["error"] for r in results)
    assert all(r["answers"] == [] for r in results)


def test_resume_after_server_failure_gives_each_job_once(tmp_path):
    n = 10
    jobs = make_jobs(tmp_path, n)
    out = tmp_path / "results.jsonl"
    with FakeLSAServer() as server:
        server.broken_after = 4  # the server dies after 4 sessions
        first = run_batch(LSAClient(server.url), jobs, out, concurrency=2, retries=1,
                                                backoff_s=0.01, progress=False)
        assert first.succeeded + first.failed == n
        assert 0 < first.failed < n
        done_first = {r["id"] for r in read_results(out) if r["error"] is None}

        server.broken_after = None  # restarted
        server.created.clear()
        second = run_batch(LSAClient(server.url), jobs, out, concurrency=2, progress=False)
        assert second.skipped == len(done_first)
        # only the failed jobs were sent again
        assert server.num_created == n - len(done_first)
    ids = [r["id"] for r in read_results(out)]
    assert sorted(ids) == sorted(f"job-{i}" for i in range(n))  # each exactly once
    assert all(r["error"] is None for r in read_results(out))


def test_stop_mid_run_then_torn_line_then_resume(tmp_path):
    n = 12
    jobs = make_jobs(tmp_path, n, tags=("[slow]",))
    out = tmp_path / "results.jsonl"
    stop = threading.Event()
    with FakeLSAServer() as server:
        server.on_create = lambda num: num >= 3 and stop.set()
        first = run_batch(LSAClient(server.url), jobs, out, concurrency=2, stop=stop,
                                                progress=False)
        assert 3 <= first.succeeded < n and first.failed == 0
        # a run killed while writing leaves half a line behind
        with open(out, "a") as f:
            f.write('{"id": "job-11", "answers": ["The ans')
        server.on_create = None
        second = run_batch(LSAClient(server.url), jobs, out, concurrency=4, progress=False)
        assert second.skipped == first.succeeded
        assert server.max_inflight <= 4
    results = read_results(out)
    assert sorted(r["id"] for r in results) == sorted(f"job-{i}" for i in range(n))
    assert all(r["error"] is None for r in results)


def test_concurrency_limit_is_used_and_respected(tmp_path):
    jobs = make_jobs(tmp_path, 8, tags=("[slow]",))
    with FakeLSAServer() as server:
        run_batch(LSAClient(server.url), jobs, tmp_path / "r.jsonl", concurrency=3,
                                        progress=False)
        assert 2 <= server.max_inflight <= 3


GOOD = {"id": "a", "context": "x", "questions": ["q"]}


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "Expecting"),
    ("[1, 2]", "JSON object"),
    (json.dumps({**GOOD, "id": 3}), "'id'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "context"}), "exactly one"),
    (json.dumps({**GOOD, "context_file": "x.txt"}), "exactly one"),
    (json.dumps({"id": "a", "context_file": "missing.txt", "questions": ["q"]}), "does not exist"),
    (json.dumps({**GOOD, "questions": []}), "'questions'"),
    (json.dumps({**GOOD, "answers": ["a", "b"]}), "'answers'"),
    (json.dumps({**GOOD, "max_tokens": "8"}), "'max_tokens'"),
    (json.dumps({**GOOD, "qestions": ["q"]}), "unknown fields"),
    (json.dumps(GOOD), "duplicate id"),
])
def test_bad_job_line_names_its_line(tmp_path, bad, reason):
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n")
    with FakeLSAServer() as server:
        with pytest.raises(JobLineError, match=reason) as info:
            run_batch(LSAClient(server.url), path, tmp_path / "out.jsonl", progress=False)
        assert server.num_created == 0  # nothing is sent before the file is valid
    assert info.value.line_no == 3 and str(path) in str(info.value)


def test_context_file_is_relative_to_jobs_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d.txt").write_text("author => Woolf\n")
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"id": "f", "context_file": "docs/d.txt",
                                "questions": ["author"], "answers": ["woolf"]}) + "\n")
    assert read_jobs(path)[0].load_context() == "author => Woolf\n"
    with FakeLSAServer() as server:
        summary = run_batch(LSAClient(server.url), path, tmp_path / "o.jsonl", progress=False)
    assert summary.accuracy == 1.0


def test_lsa_batch_cli(tmp_path, capsys):
    from cli import main

    jobs = make_jobs(tmp_path, 3)
    out = tmp_path / "cli.jsonl"
    with FakeLSAServer() as server:
        argv = ["batch", str(jobs), "--url", server.url, "--out", str(out), "--no-progress", "--msgpack"]
        assert main(argv) == 0
        assert "3 done, 0 failed, 0 already done; accuracy 50.0% of 6" in capsys.readouterr().out
        assert main(argv) == 0
        assert "0 done, 0 failed, 3 already done" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    assert main(["batch", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
