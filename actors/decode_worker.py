"""A decode worker: one engine on one device, continuous batching, sessions.

A background thread owns the engine: it runs submitted commands, then one ``engine.step()``
while anything is in flight. Requests are ``concurrent.futures.Future`` objects (the Serve
deployment awaits them with ``asyncio.wrap_future``), so any number of requests from any
number of threads share the batch.

The session table lives in the node's KV store (``store``: a ``KVStoreCore`` or a proxy of
the actor); the engine's host mirror is the store's arena, mapped without a copy. A turn
on a session this worker does not hold (its holder died, or the router moved it) is
served anyway: from this node's store if the session is there (no prefill), else from
another node's store (``locate``: its blocks are copied here), else re-prefilled from the
context the caller passes along.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Callable

import torch

from actors.plans import PlanReport
from engine.errors import LSAError, SessionEvicted, SessionNotFound
from engine.sampling import SamplingParams
from engine.host_arena import HostArena
from engine.sessions import SessionManager


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    prefill_tokens: int  # prompt tokens computed by this request (the rest came from the KV store)
    prefill_s: float
    decode_s: float
    kv: dict


class DecodeWorkerCore:
    """``prefetch(sid)``: stage a session's spilled blocks here (the Indexer); ``locate(sid)``:
    ``(fetch, drop)`` for a session held by another node's store, or None."""

    def __init__(self, engine, store, owner: str,
                 prefetch: Callable[[str], int] | None = None, locate=None, spare_blocks: int = 16,
                 plans=None, node: str = ""):
        self.engine = engine
        self.store = store
        self.owner = owner
        self.sessions = SessionManager(engine, store, engine.cache.blocks.host, owner, spare_blocks=spare_blocks)
        self.prefetch = prefetch
        self.locate = locate
        self.plans = plans  # a PlanReporter (actors/plans.py): per-cycle plans to the Indexer
        self.node = node
        self._reported: dict[int, object] = {}  # seq_id -> the plan object last reported
        self._commands: queue.Queue = queue.Queue()
        self._pending: dict[int, tuple[Future, Callable | None]] = {}  # seq_id -> (future, on_text)
        self._stop = threading.Event()
        self.generated_tokens = 0
        self.busy_s = 0.0
        self.rebuilt = {"store": 0, "remote": 0, "prefill": 0}
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()

    @classmethod
    def build(cls, make_engine: Callable, store, owner: str, pin: bool = False, **kw) -> DecodeWorkerCore:
        """``make_engine(arena)`` builds the engine over the store's arena, mapped here."""
        info = store.info()
        arena = HostArena.from_file(info["path"], info["layout"], info["num_blocks"], pin=pin)
        return cls(make_engine(arena), store, owner, **kw)

    # -- the loop (the only thread that touches the engine) --------------------------------

    def _call(self, fn: Callable) -> Future:
        fut: Future = Future()
        self._commands.put((fn, fut))
        return fut

    def _loop(self) -> None:
        while not self._stop.is_set():
            fn = None
            if self.engine.has_work():
                try:
                    fn, fut = self._commands.get_nowait()
                except queue.Empty:
                    pass
            else:
                fn, fut = self._commands.get()
            if fn is not None:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        fut.set_exception(exc)
                continue
            t0 = time.perf_counter()
            try:
                turns = self.sessions.step()
            except BaseException as exc:  # a broken step fails everything in flight, not the worker
                self._fail_all(exc)
                continue
            self.busy_s += time.perf_counter() - t0
            if self.plans is not None:
                self._report_plans()
            self._stream_updates()
            for turn in turns:
                self._resolve(turn)
            if not self.engine.has_work():
                self.sessions.trim_pool()

    def _report_plans(self) -> None:
        """Offer each session turn's new Level-1 plan (context blocks only) to the reporter."""
        next_plan = getattr(self.engine.policy, "next_plan", None)
        if next_plan is None:
            return
        live = set()
        for seq_id, turn in self.sessions.turns.items():
            live.add(seq_id)
            plan = next_plan(seq_id)
            if turn.session is None or plan is None or self._reported.get(seq_id) is plan:
                continue
            self._reported[seq_id] = plan
            num_context = len(turn.context) // self.sessions.block_size
            target = self.engine.policy.target_set  # the budget's worth of each group's ranking
            blocks = sorted({b for group in plan for b in target(seq_id, group) if b < num_context})
            self.plans.offer(PlanReport(self.owner, self.node, turn.session, blocks))
        for seq_id in [s for s in self._reported if s not in live]:
            del self._reported[seq_id]

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(seq)
            self.sessions.finished([seq])
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def _stream_updates(self) -> None:
        for seq_id, (fut, on_text) in self._pending.items():
            if on_text is None:
                continue
            seq = next((s for s in self.engine.scheduler.running if s.seq_id == seq_id), None)
            if seq is not None and seq.output_ids:
                on_text(seq.text, False)

    def _resolve(self, turn) -> None:
        entry = self._pending.pop(turn.seq.seq_id, None)
        seq = turn.seq
        self.generated_tokens += len(seq.output_ids)
        if entry is None:
            return
        fut, on_text = entry
        result = Result(seq.text, list(seq.output_ids), seq.finish_reason, seq.prompt_len, turn.prefill_tokens,
                        seq.prefill_s, seq.decode_s, seq.kv)
        if on_text is not None:
            on_text(seq.text, True)
        fut.set_result(result)

    def _track(self, seq, on_text=None) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        self._pending[seq.seq_id] = (fut, on_text)
        return fut

    def close(self) -> None:
        self._stop.set()
        self._commands.put((lambda: None, Future()))
        self._thread.join(timeout=10)
        if self.plans is not None:
            self.plans.close()

    # -- requests (any thread) ------------------------------------------------------------

    def generate(self, ids: list[int], params: SamplingParams, on_text=None) -> Future:
        """``on_text(text_so_far, done)`` is called from the loop thread as tokens arrive."""
        return self._chain(lambda: self._track(self.sessions.generate(ids, params), on_text))

    def create_session(self, sid: str, context: list[int]) -> Future:
        return self._chain(lambda: self._track(self.sessions.create(sid, context)))

    def ask(self, sid: str, question: list[int], params: SamplingParams, context: list[int] | None = None,
            on_text=None) -> Future:
        """A turn on ``sid``; ``context`` (the session's tokens) lets the worker re-prefill a
        session no store holds any more."""
        if self.prefetch is not None and self._held_here(sid):
            self.prefetch(sid)  # stage blocks spilled to other nodes before the turn needs them
        return self._chain(lambda: self._ask(sid, question, params, context, on_text))

    def _held_here(self, sid: str) -> bool:
        try:
            return bool(self.store.has(sid))
        except Exception:
            return False

    def _ask(self, sid, question, params, context, on_text):
        try:
            return self._track(self.sessions.ask(sid, question, params), on_text)
        except SessionEvicted:
            raise  # the caller creates it again
        except SessionNotFound as missing:
            return self._rebuild(sid, question, params, context, on_text, missing)

    def _rebuild(self, sid, question, params, context, on_text, missing):
        found = self.locate(sid) if self.locate is not None else None
        if found is not None:  # another node's store holds it: copy its blocks here
            tokens, data, summary, drop = found
            ids = self.store.lease(self.owner, data.shape[0])
            idx = torch.tensor(ids, dtype=torch.long)
            self.engine.cache.mirror.host[idx] = data
            self.engine.cache.mirror.summary[idx] = summary
            self.store.put(self.owner, sid, tokens, ids)
            drop()
            self.rebuilt["remote"] += 1
            return self._track(self.sessions.ask(sid, question, params), on_text)
        if context is None:
            raise missing
        # no store holds it: prefill the context again, then the turn
        self.rebuilt["prefill"] += 1
        create = self.sessions.create(sid, context)
        outer: Future = Future()
        outer.set_running_or_notify_cancel()

        def after_create(created: Future):
            rebuilt = created.result().prefill_tokens  # counted in the answer: this request computed it

            def answered(f: Future) -> None:
                if f.exception() is not None:
                    outer.set_exception(f.exception())
                else:
                    r = f.result()
                    outer.set_result(replace(r, prefill_tokens=r.prefill_tokens + rebuilt))

            try:
                turn: Future = Future()
                turn.add_done_callback(answered)
                self._call(lambda: self._track(self.sessions.ask(sid, question, params), on_text)) \
                    .add_done_callback(lambda f: _relay(f, turn))
            except BaseException as exc:
                outer.set_exception(exc)

        self._track(create).add_done_callback(lambda f: after_create(f) if f.exception() is None
                                              else outer.set_exception(f.exception()))
        return outer

    def delete_session(self, sid: str) -> Future:
        return self._call(lambda: self.store.delete(sid))

    def _chain(self, make: Callable[[], Future]) -> Future:
        """Run ``make`` on the loop thread; the returned future is the one it makes."""
        outer: Future = Future()
        outer.set_running_or_notify_cancel()
        self._call(make).add_done_callback(lambda f: _relay(f, outer))
        return outer

    # -- what the router and /metrics read ------------------------------------------------

    def stats(self) -> dict:
        eng = self.engine
        acc = eng.cache.accounting()
        policy = eng.policy.stats() if hasattr(eng.policy, "stats") else {}
        return {"queue": len(eng.scheduler.waiting), "running": len(eng.scheduler.running),
                "device_kv_bytes": acc.device_bytes, "device_kv_capacity_bytes": acc.device_capacity_bytes,
                "full_kv_bytes": acc.full_bytes, "host_kv_bytes_in_flight": acc.host_bytes,
                "resident_fraction": acc.device_fraction, "blocks_copied": eng.cache.blocks_copied,
                "bytes_copied": eng.cache.bytes_copied, "misses": policy.get("misses", 0),
                "generated_tokens": self.generated_tokens, "busy_s": self.busy_s,
                "tokens_per_s": self.generated_tokens / self.busy_s if self.busy_s else 0.0,
                "prefill_tokens": self.sessions.prefill_tokens, "rebuilt": dict(self.rebuilt)}


def _relay(inner: Future, outer: Future) -> None:
    """Complete ``outer`` from ``inner``, following a future that resolves to a future."""
    if outer.done():
        return
    exc = inner.exception()
    if exc is not None:
        outer.set_exception(exc)
        return
    value = inner.result()
    if isinstance(value, Future):
        value.add_done_callback(lambda f: _relay(f, outer))
    else:
        outer.set_result(value)


__all__ = ["DecodeWorkerCore", "Result", "LSAError"]
