"""A decode worker: one engine on one device, continuous batching, sessions.

The engine never waits on the store (in the cluster every store call is a Ray round trip):

    caller --ask()--> admission thread ------> decode loop -----------> settling thread --> Future
                      pin the session,         the only thread that     put a created session,
                      stage spilled blocks,    touches the engine:      unpin, give back spare
                      lease host blocks        engine.step()            blocks; then answer

Requests return ``concurrent.futures.Future`` objects (the Serve deployment awaits them with
``asyncio.wrap_future``), so any number of callers share the batch. The engine's host mirror
is the node store's arena, mapped without a copy. A turn on a session this worker does not
hold is served anyway: from this node's store (no prefill), else from another node's store
(its blocks are copied here), else re-prefilled from the context the caller passes along.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Callable

import torch

from actors.messages import PlanReport, SessionView, TurnResult, WorkerStats
from actors.plans import PlanReporter
from actors.session_store import SessionStore, Stores
from engine.errors import SessionEvicted, SessionNotFound
from engine.host_arena import HostArena
from engine.logprobs import LogprobsRecorder
from engine.sampling import SamplingParams
from engine.sessions import SessionManager, Turn


class DecodeWorkerCore:
    def __init__(self, engine, arena: HostArena, store: SessionStore, owner: str, node_id: str = "",
                 stores: Stores | None = None, prefetch: Callable[[str], int] | None = None,
                 plans: PlanReporter | None = None, spare_blocks: int = 16, admission_threads: int = 8):
        """``store``: this node's store, whose arena ``arena`` maps; ``owner`` names this
        worker's leases there. ``stores``: every node's store, to find a session held by
        another node. ``prefetch(session_id)``: stage a session's spilled blocks on this node
        (the Indexer; default the store itself). ``plans``: per-cycle plans to the Indexer."""
        self.engine = engine
        self.arena = arena
        self.store = store
        self.owner = owner
        self.node_id = node_id
        self.stores = stores
        self.prefetch = prefetch or store.stage
        self.plans = plans
        self.sessions = SessionManager(engine, arena.allocator, spare_blocks=spare_blocks)
        self.logprobs = LogprobsRecorder()  # for requests that ask (SamplingParams.logprobs)
        engine.hooks.append(self.logprobs)
        self._reported: dict[int, object] = {}  # seq_id -> the plan object last reported
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._pending: dict[int, tuple[Future, Callable | None]] = {}  # seq_id -> (future, on_text)
        self._stop = threading.Event()
        self.generated_tokens = 0
        self.busy_s = 0.0
        self.rebuilt = {"remote": 0, "prefill": 0}
        self._admission = ThreadPoolExecutor(admission_threads, thread_name_prefix="admission")
        self._settling = ThreadPoolExecutor(1, thread_name_prefix="settling")
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()

    @classmethod
    def build(cls, make_engine: Callable, store: SessionStore, owner: str, pin: bool = False,
              **kw) -> DecodeWorkerCore:
        """``make_engine(arena)`` builds the engine over the store's arena, mapped here."""
        info = store.info()
        arena = HostArena.from_file(info.path, info.layout, info.num_blocks, pin=pin)
        return cls(make_engine(arena), arena, store, owner, info.node_id, **kw)

    # -- requests (any thread) ------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text=None) -> Future:
        """``on_text(text_so_far, done)`` is called as tokens arrive."""
        return self._admit(lambda: self._start(self.sessions.admit_generate(prompt_ids, params), on_text))

    def create_session(self, session_id: str, context_ids: list[int]) -> Future:
        return self._admit(lambda: self._start(self.sessions.admit_create(session_id, context_ids)))

    def ask(self, session_id: str, question_ids: list[int], params: SamplingParams,
            context_ids: list[int] | None = None, on_text=None) -> Future:
        """A turn on ``session_id``; ``context_ids`` (the session's context) lets the worker
        re-prefill a session no store holds any more."""
        return self._admit(lambda: self._ask(session_id, question_ids, params, context_ids, on_text))

    def delete_session(self, session_id: str) -> Future:
        return self._admission.submit(self.store.delete, session_id)

    def warm_up(self, seed: int = 0) -> dict:
        """Compile the kernels and capture the decode graphs before the first user request (the
        replica calls this before it reports ready): on CUDA, plain requests of random tokens,
        first one whose prompt takes two prefill segments and whose decode crosses an LSA cycle
        boundary (Level-1 scoring), then 2, 4, 8, ... at once up to ``max_num_seqs`` (each
        decode batch bucket's graph). Elsewhere one tiny request. Returns what ran."""
        engine = self.engine
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        vocab = engine.model.config.vocab_size
        short = 2 * engine.cache.block_size + 3
        scheduler = engine.config.scheduler
        if engine.device.type == "cuda":
            long = min(2 * scheduler.prefill_chunk, engine.max_model_len // 2)
            cycle = getattr(engine.config.policy, "cycle", 1)
            batches = [(1, long, cycle + 2)] + [(b, short, b + 4) for b in (2, 4, 8, 16, 32, 64)
                                                 if b <= scheduler.max_num_seqs]
        else:
            batches = [(1, short, 2)]
        for count, length, max_tokens in batches:
            params = SamplingParams(max_tokens=min(max_tokens, engine.max_model_len - length), ignore_eos=True)
            futures = [self.generate(torch.randint(vocab, (length,), generator=gen).tolist(), params)
                       for _ in range(count)]
            for future in futures:
                future.result()
        graphs = engine.runner.graphs
        return {"seconds": time.perf_counter() - t0, "requests": sum(b[0] for b in batches),
                "graphs": graphs.captures if graphs is not None else 0}

    def close(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)
        self._admission.shutdown(wait=False, cancel_futures=True)
        self._settling.shutdown(wait=True)
        if self.plans is not None:
            self.plans.close()

    # -- admission (its own threads: store calls may wait) ---------------------------------

    def _admit(self, admit: Callable[[], Future]) -> Future:
        """Run ``admit`` on an admission thread; the returned future follows the one it returns."""
        outer: Future = Future()
        outer.set_running_or_notify_cancel()
        self._admission.submit(admit).add_done_callback(lambda f: _relay(f, outer))
        return outer

    def _start(self, turn: Turn, on_text=None) -> Future:
        """Lease the turn's host blocks, then hand it to the loop; returns its result's future."""
        try:
            turn.leased = self.store.lease(self.owner, turn.to_lease) if turn.to_lease else []
        except BaseException:
            self.sessions.cancel(turn)
            raise
        result: Future = Future()
        result.set_running_or_notify_cancel()
        self._commands.put(lambda: self._begin(turn, result, on_text))
        return result

    def _ask(self, session_id, question_ids, params, context_ids, on_text) -> Future:
        try:
            view = self._pin(session_id)
        except SessionEvicted:
            raise  # the caller creates it again
        except SessionNotFound as missing:
            return self._rebuild(session_id, question_ids, params, context_ids, on_text, missing)
        return self._start_turn(view, question_ids, params, on_text)

    def _pin(self, session_id: str) -> SessionView:
        """Pin the session in this node's store, with all its blocks here (spilled ones staged)."""
        view = self.store.pin(session_id)
        if view.complete:
            return view
        try:
            self.prefetch(session_id)
            view = self.store.view(session_id)
            if not view.complete:
                raise SessionNotFound(f"session {session_id} has blocks on other nodes that could not be staged")
        except BaseException:
            self.store.unpin(session_id)
            raise
        return view

    def _start_turn(self, view: SessionView, question_ids, params, on_text) -> Future:
        try:
            turn = self.sessions.admit_ask(view.session_id, view.context_ids, view.host_ids, question_ids, params)
            return self._start(turn, on_text)
        except BaseException:
            self.store.unpin(view.session_id)
            raise

    def _rebuild(self, session_id, question_ids, params, context_ids, on_text, missing) -> Future:
        """A session this node's store does not hold: copy it from another node's store, or
        prefill its context again (the answer counts those tokens as prefilled)."""
        holder = self.stores.holder(session_id, self.node_id) if self.stores is not None else None
        if holder is not None and self._copy_session(self.stores.store(holder), session_id):
            self.rebuilt["remote"] += 1
            return self._start_turn(self._pin(session_id), question_ids, params, on_text)
        if context_ids is None:
            raise missing
        self.rebuilt["prefill"] += 1
        # waits on this admission thread while the context is prefilled: rare (a lost node)
        created = self._start(self.sessions.admit_create(session_id, context_ids)).result()
        answer = self._start_turn(self._pin(session_id), question_ids, params, on_text)
        return _then(answer, lambda r: replace(r, prefill_tokens=r.prefill_tokens + created.prefill_tokens))

    def _copy_session(self, peer: SessionStore, session_id: str) -> bool:
        """Copy a session from another node's store into this one, then drop it there."""
        try:
            view = peer.pin(session_id)
            try:
                if not view.complete:
                    peer.stage(session_id)
                    view = peer.view(session_id)
                rows = peer.read_blocks(view.host_ids)
            finally:
                peer.unpin(session_id)
        except Exception:  # gone meanwhile, or its node is failing: prefill instead
            return False
        ids = self.store.lease(self.owner, len(view.host_ids))
        self.arena.write(ids, rows)
        self.store.put(self.owner, session_id, view.context_ids, ids)
        peer.delete(session_id)
        return True

    # -- the loop (the only thread that touches the engine) --------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            command = None
            if self.engine.has_work():
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    pass
            else:
                command = self._commands.get()
            if command is not None:
                command()
                continue
            self._step()

    def _begin(self, turn: Turn, result: Future, on_text) -> None:
        try:
            seq = self.sessions.start(turn)
        except BaseException as exc:  # a bad request fails its future, not the worker
            self._settling.submit(self._settle, turn, result, None, exc)
            return
        self._pending[seq.seq_id] = (result, on_text)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            finished = self.sessions.step()
        except BaseException as exc:  # a broken step fails everything in flight, not the worker
            self._fail_all(exc)
            return
        self.busy_s += time.perf_counter() - t0
        if self.plans is not None:
            self._report_plans()
        self._stream_updates()
        for turn in finished:
            self.generated_tokens += len(turn.seq.output_ids)
            result, on_text = self._pending.pop(turn.seq.seq_id)
            self._settling.submit(self._settle, turn, result, on_text, None)
        if not self.engine.has_work():
            surplus = self.sessions.surplus()
            if surplus:
                self._settling.submit(self.store.give_back, self.owner, surplus)

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(seq)
        for turn in self.sessions.finished([t.seq for t in list(self.sessions.turns.values())]):
            result, _ = self._pending.pop(turn.seq.seq_id)
            self._settling.submit(self._settle, turn, result, None, exc)

    def _stream_updates(self) -> None:
        for seq_id, turn in self.sessions.turns.items():  # running: the finished ones left
            on_text = self._pending[seq_id][1]
            if on_text is not None and turn.seq.output_ids:
                on_text(turn.seq.text, False)

    def _report_plans(self) -> None:
        """Offer each session turn's new Level-1 plan (context blocks only) to the reporter."""
        next_plan = getattr(self.engine.policy, "next_plan", None)
        if next_plan is None:
            return
        for seq_id, turn in self.sessions.turns.items():
            plan = next_plan(seq_id)
            if turn.session_id is None or plan is None or self._reported.get(seq_id) is plan:
                continue
            self._reported[seq_id] = plan
            num_context = len(turn.context_ids) // self.sessions.block_size
            target = self.engine.policy.target_set  # the budget's worth of each group's ranking
            blocks = sorted({b for group in plan for b in target(seq_id, group) if b < num_context})
            self.plans.offer(PlanReport(self.owner, self.node_id, turn.session_id, blocks))
        for seq_id in [s for s in self._reported if s not in self.sessions.turns]:
            del self._reported[seq_id]

    # -- settling (its own thread: store calls may wait) -----------------------------------

    def _settle(self, turn: Turn, result: Future, on_text, error: BaseException | None) -> None:
        """Hand a finished (or failed) turn's blocks to the store, then answer."""
        logprobs = self.logprobs.pop(turn.seq) if turn.seq is not None else None  # no seq: failed before admission
        try:
            if turn.created is not None:
                try:
                    self.store.put(self.owner, turn.session_id, turn.context_ids, turn.created)
                except BaseException:
                    self.store.give_back(self.owner, turn.created)
                    raise
            elif turn.pinned:
                self.store.unpin(turn.session_id)
        except BaseException as exc:
            error = error or exc
        if error is not None:
            result.set_exception(error)
            return
        seq = turn.seq
        if on_text is not None:
            on_text(seq.text, True)
        result.set_result(TurnResult(seq.text, list(seq.output_ids), seq.finish_reason, seq.prompt_len,
                                     turn.prefill_tokens, seq.prefill_s, seq.decode_s, dict(seq.kv),
                                     logprobs=logprobs))

    # -- what the router and /metrics read ------------------------------------------------

    def stats(self) -> WorkerStats:
        eng = self.engine
        acc = eng.cache.accounting()
        policy = eng.policy.stats() if hasattr(eng.policy, "stats") else {}
        return WorkerStats(
            queue=len(eng.scheduler.waiting), running=len(eng.scheduler.running),
            device_kv_bytes=acc.device_bytes, device_kv_capacity_bytes=acc.device_capacity_bytes,
            full_kv_bytes=acc.full_bytes, host_kv_bytes_in_flight=acc.host_bytes,
            resident_fraction=acc.device_fraction, blocks_copied=eng.cache.blocks_copied,
            bytes_copied=eng.cache.bytes_copied, misses=policy.get("misses", 0),
            generated_tokens=self.generated_tokens, busy_s=self.busy_s,
            tokens_per_s=self.generated_tokens / self.busy_s if self.busy_s else 0.0,
            prefill_tokens=self.sessions.prefill_tokens, rebuilt=dict(self.rebuilt), node_id=self.node_id,
            memory=process_memory(eng.device))


def process_memory(device: torch.device) -> dict[str, int]:
    """This process's memory: what a leak would grow (host RSS, GPU memory, torch's pinned pool)."""
    import os

    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    out = {"pid": os.getpid(), "rss_bytes": rss}
    if device.type == "cuda":
        out["gpu_allocated_bytes"] = torch.cuda.memory_allocated(device)
        out["gpu_reserved_bytes"] = torch.cuda.memory_reserved(device)
        try:
            out["pinned_host_bytes"] = int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
        except (RuntimeError, AttributeError):
            pass
    return out


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


def _then(fut: Future, fn: Callable) -> Future:
    """A future of ``fn(fut.result())``."""
    out: Future = Future()
    out.set_running_or_notify_cancel()

    def done(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(fn(f.result()))

    fut.add_done_callback(done)
    return out


__all__ = ["DecodeWorkerCore"]
