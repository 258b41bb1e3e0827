"""A tensor-parallel decode worker's core: requests and sessions over a group of ranks in lockstep.

The engine is a ``TensorParallelEngine`` (actors/tp_engine.py; anything with its lockstep calls
``add_request``, ``create_session``, ``ask``, ``delete_session``, ``store_report``, ``abort``,
``has_work``, ``step`` and ``failure``): one call reaches every rank, so only the loop thread makes
calls, and requests from any thread go to it as commands:

    caller --generate() / create_session() / ask()--> commands --> loop thread: add_request |
           create_session | ask | delete_session | abort | step --> every rank
           <-- Future (TurnResult); on_text(text_so_far, done) as the tokens arrive

Each rank keeps its ``1/P`` of every session's KV in a store of its own (actors/tp_sessions.py),
so a session is created, turned and deleted on all ranks by one lockstep call each. Cancelling
a request's future aborts it on every rank before the next step. When the group fails (a rank
died or hung), every request in flight fails with the group's error, and so does every later
one: ``failure`` says why, and the deployment's health check fails on it.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from actors.messages import TurnResult, WorkerStats
from actors.requests import complete, process_memory
from engine.errors import LSAError
from engine.sampling import SamplingParams


@dataclass
class Running:
    """A request the ranks are running: its caller's future and what has come back so far."""

    future: Future
    on_text: Callable[[str, bool], None] | None
    num_prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


class TensorParallelWorkerCore:
    def __init__(self, engine, node_id: str = "", vocab_size: int = 0):
        """``engine``: the lockstep driver of the ranks; ``vocab_size``: for the warm-up's prompt."""
        self.engine = engine
        self.node_id = node_id
        self.vocab_size = vocab_size
        self.generated_tokens = 0
        self.prefill_tokens = 0  # prompt tokens computed over all requests
        self.cached_tokens = 0  # ... loaded from the ranks' stores instead (session turns)
        self.busy_s = 0.0
        self.cancelled = 0
        self._ids = itertools.count()
        self._running: dict[str, Running] = {}  # request_id -> ...; touched by the loop thread only
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tp-decode-loop", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> str | None:
        """Why the group is gone (None while it serves)."""
        return self.engine.failure

    # -- requests (any thread) ------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text=None) -> Future:
        """A ``TurnResult`` future; ``on_text(text_so_far, done)`` is called as tokens arrive."""
        prompt_ids = list(prompt_ids)
        return self._submit(lambda request_id: self.engine.add_request(prompt_ids, params, request_id),
                            len(prompt_ids), on_text)

    def create_session(self, session_id: str, context_ids: list[int]) -> Future:
        """Prefill the context on every rank; the ``TurnResult`` future of that one-token request."""
        context_ids = list(context_ids)
        return self._submit(lambda request_id: self.engine.create_session(session_id, context_ids, request_id),
                            len(context_ids))

    def ask(self, session_id: str, question_ids: list[int], params: SamplingParams, on_text=None) -> Future:
        """A turn on the session (``SessionNotFound`` when the ranks do not hold it)."""
        question_ids = list(question_ids)
        return self._submit(lambda request_id: self.engine.ask(session_id, question_ids, params, request_id),
                            len(question_ids), on_text)

    def delete_session(self, session_id: str) -> Future:
        """Cancel the session's turns and delete it on every rank; resolves to whether it was held."""
        return self._call(lambda: self.engine.delete_session(session_id))

    def store_report(self, session_ids: list[str]) -> Future:
        """(the ranks' store counters, which of ``session_ids`` they hold)."""
        return self._call(lambda: self.engine.store_report(list(session_ids)))

    def check(self) -> Future:
        """A no-op lockstep call, made by the loop: a rank that died while the group was idle
        fails the group now rather than at the next request. Resolves to True, or the error."""
        return self._call(lambda: self.engine.has_work() or True)

    def _submit(self, add: Callable[[str], object], num_prompt_tokens: int, on_text=None) -> Future:
        """``add(request_id)`` (a lockstep call that starts a request) on the loop thread."""
        future: Future = Future()  # left pending (not running) until answered, so that cancel() works
        request_id = f"tp-{next(self._ids)}"
        future.add_done_callback(lambda f: f.cancelled() and self._cancelled(request_id))
        self._commands.put(lambda: self._add(request_id, add, num_prompt_tokens, future, on_text))
        return future

    def _call(self, call: Callable[[], object]) -> Future:
        """``call()`` (one lockstep call) on the loop thread; its result, or its error (a group
        that fails under it fails everything in flight too)."""
        done: Future = Future()

        def run() -> None:
            try:
                result = call()
            except Exception as exc:  # noqa: BLE001
                if self.failure is not None:
                    self._failed(exc)
                complete(done, exc=exc)
                return
            complete(done, result)

        self._commands.put(run)
        return done

    def warm_up(self) -> dict:
        """One short request through every rank before the replica reports ready (the group's
        first collectives, and on CUDA the kernels' compilation)."""
        t0 = time.perf_counter()
        prompt = torch.randint(self.vocab_size, (35,), generator=torch.Generator().manual_seed(0)).tolist()
        self.generate(prompt, SamplingParams(max_tokens=2, ignore_eos=True)).result()
        return {"seconds": time.perf_counter() - t0, "requests": 1, "graphs": 0}

    def close(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    # -- the loop (the only thread that calls the ranks) ----------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._running:
                self._commands.get()()  # idle: wait for a request
            while True:  # every command queued before this step
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
            if self._running:
                self._step()

    def _add(self, request_id: str, add: Callable[[str], object], num_prompt_tokens: int, future: Future,
             on_text) -> None:
        if future.cancelled():
            return
        try:
            add(request_id)
        except Exception as exc:  # noqa: BLE001 - a refusal fails the request; a dead group, everything
            self._failed(exc, future)
            return
        self._running[request_id] = Running(future, on_text, num_prompt_tokens)

    def _cancelled(self, request_id: str) -> None:
        self.cancelled += 1
        self._commands.put(lambda: self._abort(request_id))

    def _abort(self, request_id: str) -> None:
        if self._running.pop(request_id, None) is None:
            return  # finished meanwhile, or never added
        try:
            self.engine.abort(request_id)
        except Exception as exc:  # noqa: BLE001 - the group died: the others fail with it
            self._failed(exc)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            updates = self.engine.step()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        self.busy_s += time.perf_counter() - t0
        for update in updates:
            running = self._running.get(update.request_id)
            if running is None:
                continue  # aborted
            running.token_ids += update.new_token_ids
            running.text += update.text
            self.generated_tokens += len(update.new_token_ids)
            if update.finished is None:
                if running.on_text is not None and update.new_token_ids:
                    running.on_text(running.text, False)
                continue
            del self._running[update.request_id]
            self._answer(running, update.finish_reason, update.finished)

    def _answer(self, running: Running, finish_reason: str, finished) -> None:
        if finished.error is not None:
            complete(running.future, exc=finished.error)
            return
        if running.on_text is not None:
            running.on_text(finished.text, True)
        prompt, prefilled, cached = ((finished.prompt_tokens, finished.prefill_tokens, finished.cached_tokens)
                                     if finished.prompt_tokens else (running.num_prompt_tokens,) * 2 + (0,))
        self.prefill_tokens += prefilled
        self.cached_tokens += cached
        complete(running.future, TurnResult(
            finished.text, running.token_ids, finish_reason, prompt, prefill_tokens=prefilled,
            prefill_s=finished.prefill_s, decode_s=finished.decode_s, kv=finished.kv, cached_tokens=cached,
            logprobs=finished.logprobs))

    def _failed(self, exc: BaseException, future: Future | None = None) -> None:
        """A request refused alike by every rank fails alone (``future``); a failed group fails
        everything in flight."""
        if future is not None and self.failure is None and isinstance(exc, LSAError):
            complete(future, exc=exc)
            return
        for running in self._running.values():
            complete(running.future, exc=exc)
        self._running.clear()
        if future is not None:
            complete(future, exc=exc)

    # -- what the router and /metrics read ------------------------------------------------

    def stats(self) -> WorkerStats:
        """Counters of this replica (requests in flight as ``running``); the ranks' device KV is
        not reported (zeros); the deployment adds the ranks' store."""
        return WorkerStats(
            queue=self._commands.qsize(), running=len(self._running), device_kv_bytes=0,
            device_kv_capacity_bytes=0, full_kv_bytes=0, host_kv_bytes_in_flight=0, resident_fraction=0.0,
            blocks_copied=0, bytes_copied=0, misses=0, generated_tokens=self.generated_tokens, busy_s=self.busy_s,
            tokens_per_s=self.generated_tokens / self.busy_s if self.busy_s else 0.0,
            prefill_tokens=self.prefill_tokens, rebuilt={}, node_id=self.node_id, cached_tokens=self.cached_tokens,
            cancelled=self.cancelled, memory=process_memory(torch.device("cpu")))

    def idle(self) -> bool:
        return not self._running and self._commands.empty()


__all__ = ["TensorParallelWorkerCore"]
