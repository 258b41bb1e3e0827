"""run_batch against the fake server of test_client.py: retries, resume, bad job lines."""
import json
import threading
from collections import Counter

import pytest

from cluster import protocol as p
from cluster.batch import JobLineError, read_jobs, run_batch
from cluster.batch_openai import BatchOutputLine
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
        summary = run_batch(LSAClient(server.url), jobs, out, retries=0, progress=False)  # the client's own retries
        # are off inside a batch: ``retries`` is the one knob
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


def openai_lines():
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}], "max_tokens": 8}
    return [
        {"custom_id": "c-1", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "c-2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "one two"}},
        {"custom_id": "c-3", "method": "POST", "url": "/v1/completions", "body": {"prompt": "[flaky] x"}},
        {"custom_id": "c-4", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat, "model": "gpt-4"}},  # refused for good: its 404 is the response
    ]


def test_openai_batch_format_in_and_out_with_resume(tmp_path):
    jobs, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in openai_lines()))
    with FakeLSAServer() as server:
        first = run_batch(LSAClient(server.url), jobs, out, retries=0, progress=False, backoff_s=0.01)
        lines = {r["custom_id"]: BatchOutputLine.model_validate(r) for r in read_results(out)}
        assert (first.succeeded, first.failed) == (2, 2)
        assert lines["c-1"].response.status_code == 200 and lines["c-1"].error is None
        assert p.ChatCompletion.model_validate(lines["c-1"].response.body).choices[0].message.content == \
            "you said hello"
        assert lines["c-1"].response.request_id == "chatcmpl-fake" and lines["c-1"].id.startswith("batch_req_")
        assert p.Completion.model_validate(lines["c-2"].response.body).choices[0].text == "echo one two"
        assert lines["c-3"].response is None and lines["c-3"].error.code == "503"  # no retries: run again later
        refused = lines["c-4"].response
        assert refused.status_code == 404 and refused.body["error"]["param"] == "model"
        second = run_batch(LSAClient(server.url), jobs, out, retries=3, progress=False, backoff_s=0.01)
        assert (second.skipped, second.succeeded, second.failed) == (3, 1, 0)  # only c-3 ran again
    results = read_results(out)
    assert sorted(r["custom_id"] for r in results) == ["c-1", "c-2", "c-3", "c-4"]  # each exactly once
    c3 = next(r for r in results if r["custom_id"] == "c-3")
    assert c3["error"] is None and c3["response"]["body"]["choices"][0]["text"] == "echo [flaky] x"


@pytest.mark.parametrize("change, reason", [
    (lambda line: line.update(method="GET"), "method"),
    (lambda line: line.update(url="/v1/embeddings"), "url"),
    (lambda line: line.pop("custom_id") and line.update(id="x"), "custom_id"),
    (lambda line: line["body"].update(tools=[{"type": "function"}]), "'tools' is not supported"),
    (lambda line: line["body"].update(temperature="hot"), "body: temperature"),
    (lambda line: line["body"].update(stream=True), "cannot stream"),
    (lambda line: line.update(custom_id="c-1"), "duplicate custom_id"),
])
def test_bad_openai_batch_line_names_its_line(tmp_path, change, reason):
    lines = openai_lines()
    change(lines[2])
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with FakeLSAServer() as server:
        with pytest.raises(JobLineError, match=reason) as info:
            run_batch(LSAClient(server.url), path, tmp_path / "out.jsonl", progress=False)
        assert server.posts == 0  # nothing is sent before the whole file is valid
    assert info.value.line_no == 3
