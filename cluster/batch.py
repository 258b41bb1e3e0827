"""Batch jobs through a running lsa-serve (``lsa batch``), in either of two formats, told apart
by the first line:

- OpenAI's Batch format (a line with ``custom_id``): each line a request ``{"custom_id",
  "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``; each result
  line ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` as
  OpenAI writes it (cluster/batch_openai.py), so existing batch files run unchanged. Requests
  that share a long prefix (one document, many questions) reuse its KV on the server.
- lsa-serve's long-context jobs, below: one session per document, every question a turn.

LSA jobs file, JSON Lines, one object a line::

    {"id": "doc-7", "context": "..." | "context_file": "docs/7.txt",
     "questions": ["q1", "q2"], "answers": ["a1", null], "max_tokens": 64}

Results file, one line per finished job, appended and flushed as each job finishes::

    {"id": "doc-7", "answers": ["...", "..."], "correct": [true, null], "seconds": 3.2, "error": null}

Each job becomes one session: the context is prefilled once, then every question is a
turn on it. A reply is correct when the expected answer appears in it (case-insensitive).
Only what can succeed later is retried (connection errors, 429, 503; never a 400), with
jittered exponential backoff honouring Retry-After; ``retries`` is the one knob (the client's
own retries are off inside a batch). An evicted session is created again. Re-running with the
same results file resumes: jobs that finished are skipped, failed ones are run again and their
old lines dropped, so each job ends up in the file exactly once.
"""
from __future__ import annotations

import copy
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from tqdm import tqdm

from cluster.client import LSAClient, LSAError, SessionNotFound, retry_delay

T = TypeVar("T")


class JobLineError(ValueError):
    """A line of the jobs file is not a valid job."""

    def __init__(self, path: str | os.PathLike, line_no: int, reason: str):
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path, self.line_no, self.reason = str(path), line_no, reason


@dataclass(frozen=True)
class Job:
    id: str
    questions: tuple[str, ...]
    answers: tuple[str | None, ...] | None = None
    context: str | None = None
    context_file: Path | None = None
    max_tokens: int | None = None

    def load_context(self) -> str:
        return self.context if self.context is not None else self.context_file.read_text()


@dataclass
class _Tally:
    succeeded: int = 0
    failed: int = 0
    num_correct: int = 0
    num_checked: int = 0

    def add(self, rec: dict) -> None:
        self.succeeded += rec["error"] is None
        self.failed += rec["error"] is not None
        checked = [c for c in rec["correct"] if c is not None]
        self.num_checked += len(checked)
        self.num_correct += sum(checked)


@dataclass(frozen=True)
class BatchSummary:
    total: int
    skipped: int
    succeeded: int
    failed: int
    num_correct: int
    num_checked: int

    @property
    def accuracy(self) -> float | None:
        return self.num_correct / self.num_checked if self.num_checked else None


def parse_job(obj: object, base_dir: Path) -> Job:
    """Validate one decoded jobs line; raises ``ValueError`` with the reason."""
    if not isinstance(obj, dict):
        raise ValueError("a job must be a JSON object")
    unknown = set(obj) - {"id", "context", "context_file", "questions", "answers", "max_tokens"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    job_id = obj.get("id")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError("'id' must be a non-empty string")
    if ("context" in obj) == ("context_file" in obj):
        raise ValueError("give exactly one of 'context' and 'context_file'")
    context, context_file = obj.get("context"), None
    if "context" in obj and not isinstance(context, str):
        raise ValueError("'context' must be a string")
    if "context_file" in obj:
        if not isinstance(obj["context_file"], str):
            raise ValueError("'context_file' must be a string path")
        context_file = base_dir / obj["context_file"]
        if not context_file.is_file():
            raise ValueError(f"context_file {str(context_file)!r} does not exist")
    questions = obj.get("questions")
    if (not isinstance(questions, list) or not questions
            or not all(isinstance(q, str) for q in questions)):
        raise ValueError("'questions' must be a non-empty list of strings")
    answers = obj.get("answers")
    if answers is not None:
        if (not isinstance(answers, list) or len(answers) != len(questions)
                or not all(a is None or isinstance(a, str) for a in answers)):
            raise ValueError("'answers' must be a list of strings or nulls, one per question")
        answers = tuple(answers)
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens <= 0):
        raise ValueError("'max_tokens' must be a positive integer")
    return Job(id=job_id, questions=tuple(questions), answers=answers, context=context,
               context_file=context_file, max_tokens=max_tokens)


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """Parse and validate the whole jobs file before anything is sent."""
    path = Path(path)
    jobs, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                job = parse_job(json.loads(line), path.parent)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise JobLineError(path, line_no, str(e)) from None
            if job.id in seen:
                raise JobLineError(path, line_no, f"duplicate id {job.id!r}")
            seen.add(job.id)
            jobs.append(job)
    return jobs


def load_done(out_path: str | os.PathLike, key: str = "id",
              finished: Callable[[dict], bool] = lambda rec: rec.get("error") is None) -> set[str]:
    """Ids (``rec[key]``) of the lines that ``finished``. Rewrites the file without the other
    lines and without a torn last line (a run killed mid-write), so a re-run adds each job once."""
    out_path = Path(out_path)
    if not out_path.exists():
        return set()
    kept, done = [], set()
    for line in out_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and finished(rec) and rec.get(key) not in done:
            done.add(rec[key])
            kept.append(line)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    os.replace(tmp, out_path)
    return done


def with_retries(fn: Callable[[], T], retries: int, backoff_s: float) -> T:
    """Call ``fn``; on a transient ``LSAError`` wait (exponential, jittered, or the
    server's Retry-After) and try again, at most ``retries`` more times."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except LSAError as e:
            if not e.transient or attempt == retries:
                raise
            time.sleep(retry_delay(e, attempt, backoff_s))
    raise AssertionError("unreachable")


def is_correct(expected: str | None, reply: str) -> bool | None:
    return None if expected is None else expected.strip().lower() in reply.lower()


def run_job(client: LSAClient, job: Job, retries: int, backoff_s: float,
            temperature: float = 0.0) -> dict:
    """One job: create the session, ask every question, close it. Never raises
    ``LSAError``: a job that fails after its retries comes back with ``error`` set."""
    start = time.perf_counter()
    sampling = {"temperature": temperature}
    if job.max_tokens is not None:
        sampling["max_tokens"] = job.max_tokens
    replies: list[str] = []
    session = None
    try:
        context = job.load_context()
        session = with_retries(lambda: client.session(context), retries, backoff_s)
        for question in job.questions:
            for rebuilds in range(retries + 1):
                try:
                    answer = with_retries(lambda: session.ask(question, **sampling),
                                          retries, backoff_s)
                    break
                except SessionNotFound:  # evicted: prefill again, then ask again
                    if rebuilds == retries:
                        raise
                    session = with_retries(lambda: client.session(context), retries, backoff_s)
            replies.append(answer.text)
        error = None
    except (LSAError, OSError) as e:
        error = str(e)
    finally:
        if session is not None:
            try:
                session.close()
            except LSAError:
                pass  # the server frees idle sessions on its own
    expected = job.answers or (None,) * len(job.questions)
    return {
        "id": job.id,
        "answers": replies,
        "correct": [is_correct(e, r) for e, r in zip(expected, replies)],
        "seconds": round(time.perf_counter() - start, 4),
        "error": error,
    }


def run_batch(client: LSAClient, jobs_path, out_path, *, concurrency: int = 4,
              retries: int = 3, backoff_s: float = 0.5, temperature: float = 0.0,
              progress: bool = True, stop: threading.Event | None = None) -> BatchSummary:
    """Run every job of ``jobs_path`` (either format) not yet done in ``out_path``,
    ``concurrency`` at a time; append each result as it finishes. Setting ``stop`` ends the run
    gracefully: no new job starts, running ones finish and are written. Raises ``JobLineError``
    for a bad jobs file, before anything is sent. ``temperature`` applies to LSA jobs (an OpenAI
    line's body says its own)."""
    from cluster import batch_openai

    if concurrency < 1 or retries < 0:
        raise ValueError("concurrency must be >= 1 and retries >= 0")
    client = copy.copy(client)
    client.max_retries = 0  # ``retries`` is the batch's one knob
    if batch_openai.is_openai_batch(jobs_path):
        requests = batch_openai.read_requests(jobs_path)
        done = load_done(out_path, "custom_id", batch_openai.finished)
        todo = [(r.custom_id, lambda r=r: batch_openai.run_request(client, r, retries, backoff_s))
                for r in requests if r.custom_id not in done]
        return _run_all(todo, len(requests), out_path, concurrency, progress, stop, batch_openai.tally)
    jobs = read_jobs(jobs_path)
    done = load_done(out_path)
    todo = [(job.id, lambda job=job: run_job(client, job, retries, backoff_s, temperature))
            for job in jobs if job.id not in done]
    return _run_all(todo, len(jobs), out_path, concurrency, progress, stop, _Tally.add)


def _run_all(todo: list[tuple[str, Callable[[], dict]]], total: int, out_path, concurrency: int, progress: bool,
             stop: threading.Event | None, count: Callable[["_Tally", dict], None]) -> BatchSummary:
    """Run the ``todo`` calls ``concurrency`` at a time, appending each result line as it comes."""
    tally = _Tally()
    bar = tqdm(total=total, initial=total - len(todo), unit="job", disable=not progress, desc="lsa batch")
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lsa-batch")
    interrupted = True
    try:
        with open(out_path, "a", encoding="utf-8") as out:
            pending: set[Future] = set()

            def collect(keep: int) -> None:
                nonlocal pending
                while len(pending) > keep:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        rec = fut.result()
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        count(tally, rec)
                        bar.update(1)

            for _, call in todo:
                collect(keep=concurrency - 1)
                if stop is not None and stop.is_set():
                    break
                pending.add(pool.submit(call))
            collect(keep=0)
        interrupted = False
    finally:
        # On an interrupt, jobs still running are dropped: they have no line yet, so a
        # re-run does them again.
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        bar.close()
    return BatchSummary(total=total, skipped=total - len(todo), succeeded=tally.succeeded,
                        failed=tally.failed, num_correct=tally.num_correct,
                        num_checked=tally.num_checked)
