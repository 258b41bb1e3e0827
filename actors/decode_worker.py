"""A decode worker: one engine on one device, continuous batching, sessions, prefix reuse.

The engine never waits on the store (in the cluster every store call is a Ray round trip):

    caller --ask()--> admission thread ------> decode loop -----------> settling thread --> Future
                      pin the session (or      the only thread that     put a created session or
                      match prefix blocks),    touches the engine:      the prefix blocks, unpin,
                      lease host blocks        engine.step()            give back spare blocks

Requests return ``concurrent.futures.Future`` objects (the Serve deployment awaits them with
``asyncio.wrap_future``), so any number of callers share the batch. Cancelling a request's
future (``cancel``; awaiting it in a task that is cancelled does it too) aborts its sequence
before the next engine step. The engine's host mirror is the node store's arena, mapped
without a copy; when that store dies, the worker maps its successor's arena
(actors/store_healing.py) and runs the turns it lost once more.
"""
from __future__ import annotations

import queue
from collections import OrderedDict
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from actors.messages import ArenaInfo, PlanReport, TurnResult, WorkerStats
from actors.plans import PlanReporter
from actors.requests import Request, copy_outcome, process_memory, relay
from actors.session_recovery import SessionRecovery
from actors.session_store import SessionStore, Stores
from actors.store_healing import StoreHealing
from actors.warm_up import warm_up
from engine.errors import RequestCancelled, StoreUnavailable
from engine.host_arena import HostArena
from engine.logprobs import LogprobsRecorder
from engine.prefix import block_hashes, routing_keys
from engine.sampling import SamplingParams
from engine.sessions import SessionManager, Turn
from engine.trace import StepTrace


class DecodeWorkerCore:
    def __init__(self, engine, arena: HostArena, store: SessionStore, owner: str, node_id: str = "",
                 stores: Stores | None = None, prefetch: Callable[[str], int] | None = None,
                 plans: PlanReporter | None = None, spare_blocks: int = 16, admission_threads: int = 8,
                 prefix_reuse: bool = True, resolve_store: Callable[[], SessionStore] | None = None,
                 arena_info: ArenaInfo | None = None, pin: bool = False,
                 context_of: Callable[[str], list[int] | None] | None = None):
        """``store``: this node's store, whose arena ``arena`` maps; ``owner`` names this
        worker's leases there. ``stores``: every node's store, to find a session held by
        another node. ``prefetch(session_id)``: stage a session's spilled blocks on this node
        (the Indexer; default the store itself). ``plans``: per-cycle plans to the Indexer.
        ``prefix_reuse``: keep finished requests' blocks as prefix blocks and reuse them.
        ``resolve_store()``: this node's store after the current one died (None: no healing);
        ``arena_info`` what the store said of ``arena``; ``pin``: page-lock arenas for DMA.
        ``context_of(session_id)``: the context ids of a session no store holds (the session
        directory's), to prefill it again when a turn's caller passes none."""
        self.engine = engine
        self.arena = arena
        self.store = store
        self.owner = owner
        self.node_id = node_id
        self.stores = stores
        self.prefetch = prefetch or (lambda session_id: self.store.stage(session_id))
        self.plans = plans
        self.prefix_reuse = prefix_reuse
        self.spare_blocks = spare_blocks
        self.arena_info = arena_info
        self.context_of = context_of
        self.sessions = SessionManager(engine, arena.allocator, spare_blocks, arena.num_blocks)
        self.recovery = SessionRecovery(self)
        self.healing = StoreHealing(self, resolve_store, pin=pin)
        self.warnings = self._capacity_warnings()
        self.logprobs = LogprobsRecorder()  # for requests that ask (SamplingParams.logprobs)
        engine.hooks.append(self.logprobs)
        self._reported: dict[int, object] = {}  # seq_id -> the plan object last reported
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._pending: dict[int, tuple[Future, Callable | None, Request]] = {}  # seq_id -> ...
        self._stop = threading.Event()
        self.generated_tokens = 0
        self.busy_s = 0.0
        self.cancelled = 0
        self.host_copy: dict[str, float] = {}  # GB/s to the GPU, measured at warm-up (actors/warm_up.py)
        self._trace = StepTrace.from_env(engine, owner)
        self.prefix_keys: OrderedDict[str, None] = OrderedDict()  # routing keys of prefix blocks put, newest last
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
        return cls(make_engine(arena), arena, store, owner, info.node_id, arena_info=info, pin=pin, **kw)

    def _capacity_warnings(self) -> list[str]:
        """What the operator should know at start: an arena that cannot hold one request of the
        model's full context (longer prompts are refused as too long), or that CUDA could not
        page-lock (copies from it are slow)."""
        limit, held = self.engine.max_model_len, self.sessions.max_context
        out = []
        if held < limit:
            out.append(f"the host KV arena holds {held} tokens, less than one request of the model's context "
                       f"({limit} tokens): longer requests are refused; raise kv_store_bytes")
        mirror = self.engine.cache.mirror
        if self.engine.cache.device.type == "cuda" and not mirror.pinned:
            out.append("the host KV arena is not page-locked (cudaHostRegister refused it: not on tmpfs, or more "
                       "than the system lets one process lock): every copy to the GPU is gathered on the host "
                       "and pageable, far below PCIe speed; put kv_dir on /dev/shm")
        return out

    # -- requests (any thread) ------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text=None) -> Future:
        """``on_text(text_so_far, done)`` is called as tokens arrive. The answer's
        ``cached_tokens`` are the prompt tokens loaded from prefix blocks."""
        return self._submit(Request(lambda r: self._generate(r, prompt_ids, params, on_text)))

    def create_session(self, session_id: str, context_ids: list[int]) -> Future:
        return self._submit(Request(lambda r: self._start(self.sessions.admit_create(session_id, context_ids),
                                                          r)))

    def ask(self, session_id: str, question_ids: list[int], params: SamplingParams,
            context_ids: list[int] | None = None, on_text=None) -> Future:
        """A turn on ``session_id``; ``context_ids`` (the session's context; else ``context_of``
        is asked, only then) lets the worker re-prefill a session no store holds any more."""
        return self._submit(Request(lambda r: self.recovery.ask(r, session_id, question_ids, params, context_ids,
                                                                on_text)))

    def cancel(self, future: Future) -> bool:
        """Cancel the request of ``future``: its sequence is aborted before the next step."""
        return future.cancel()

    def delete_session(self, session_id: str) -> Future:
        """Cancel the session's running turns, then delete it from the store."""
        done: Future = Future()
        self._commands.put(lambda: self._delete(session_id, done))
        return done

    def warm_up(self, seed: int = 0, decode: bool = True) -> dict:
        """Compile the kernels and capture the decode graphs before the first user request
        (actors/warm_up.py). Returns what ran."""
        return warm_up(self, seed, decode)

    def on_loop(self, fn: Callable) -> Future:
        """Run ``fn()`` on the decode loop thread (the only one that touches the engine): its result."""
        done: Future = Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # reported to the caller; the loop goes on
                done.set_exception(exc)
        self._commands.put(call)
        return done

    def close(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)
        self._admission.shutdown(wait=False, cancel_futures=True)
        self._settling.shutdown(wait=True)
        self.healing.close()
        if self.plans is not None:
            self.plans.close()

    # -- admission (its own threads: store calls may wait) ---------------------------------

    def _submit(self, request: Request) -> Future:
        """Run the request's admission on an admission thread; its future follows the result."""
        if request.attempt == 0:
            request.future.add_done_callback(lambda f: f.cancelled() and self._cancelled(request))
        attempt = request.attempt
        self._admission.submit(self._run_admission, request).add_done_callback(
            lambda f: relay(f, request, attempt))
        return request.future

    def _run_admission(self, request: Request) -> Future:
        request.generation, request.store = self.healing.wait_ready()
        try:
            return request.admit(request)
        except StoreUnavailable:
            if not self._retry_later(request):
                raise
            request.generation, request.store = self.healing.wait_ready()
            return request.admit(request)

    def _retry_later(self, request: Request) -> bool:
        """The store died under ``request``: heal (once for everyone); True if it may run again."""
        self.healing.store_lost()
        if request.retries <= 0 or request.cancelled:
            return False
        request.retries -= 1
        return True

    def _generate(self, request: Request, prompt_ids, params, on_text) -> Future:
        hashes = block_hashes(prompt_ids, self.sessions.block_size) if self.prefix_reuse else []
        matched = request.store.match_prefix(hashes) if hashes else []
        request.prompt_hashes, request.prefix_hashes = hashes, hashes[: len(matched)]
        try:
            return self._start(self.sessions.admit_generate(prompt_ids, params, matched), request, on_text)
        except BaseException:
            if request.prefix_hashes:
                request.store.unpin_prefix(request.prefix_hashes)
            raise

    def _start(self, turn: Turn, request: Request, on_text=None) -> Future:
        """Lease the turn's host blocks, then hand it to the loop; returns its result's future."""
        try:
            turn.leased = request.store.lease(self.owner, turn.to_lease) if turn.to_lease else []
        except BaseException:
            self.sessions.cancel(turn)
            raise
        result: Future = Future()
        result.set_running_or_notify_cancel()
        request.mark("admission")
        self._commands.put(lambda: self._begin(turn, result, on_text, request))
        return result

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
            else:
                self._step()
            if not self.engine.has_work():
                self._give_back_surplus()
                if self._trace is not None:
                    self._trace.flush()

    def _begin(self, turn: Turn, result: Future, on_text, request: Request) -> None:
        if request.generation != self.healing.generation:  # admitted against a store that died since
            self._settling.submit(self._settle, turn, result, None, StoreUnavailable("the node's KV store was "
                                                                                     "replaced"), request)
            return
        try:
            seq = self.sessions.start(turn)
        except BaseException as exc:  # a bad request fails its future, not the worker
            self._settling.submit(self._settle, turn, result, None, exc, request)
            return
        self._pending[seq.seq_id] = (result, on_text, request)
        request.seq_id = seq.seq_id
        request.mark("queued")
        self._traced("queued", seq.seq_id, time.perf_counter(), least=0.0)
        if request.cancelled:
            self._abort(request)

    def _cancelled(self, request: Request) -> None:
        request.cancelled = True
        self.cancelled += 1
        self._commands.put(lambda: self._abort(request))

    def _abort(self, request: Request, error: Exception | None = None) -> None:
        turn = self.sessions.turns.get(request.seq_id)
        if turn is None or self._pending.get(request.seq_id, (None, None, None))[2] is not request:
            return  # not started yet (``_begin`` aborts it), or done
        self.engine.abort(turn.seq, error or RequestCancelled("the request was cancelled"))
        self._finish(self.sessions.finished([turn.seq]))

    def _delete(self, session_id: str, done: Future) -> None:
        for seq_id, turn in list(self.sessions.turns.items()):
            if turn.session_id == session_id and seq_id in self._pending:
                self._abort(self._pending[seq_id][2], RequestCancelled(f"session {session_id} was deleted"))
        # the settling thread is one thread: the aborted turns unpin before the store deletes
        self._settling.submit(self.store.delete, session_id).add_done_callback(lambda f: copy_outcome(f, done))

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            finished = self.sessions.step()
        except BaseException as exc:  # a broken step fails everything in flight, not the worker
            self.abort_all(exc)
            return
        self.busy_s += time.perf_counter() - t0
        if self.plans is not None:
            t = time.perf_counter()
            self._report_plans()
            self._traced("report_plans", len(self.sessions.turns), t)
        t = time.perf_counter()
        self._stream_updates()
        self._traced("stream_updates", len(self.sessions.turns), t)
        t = time.perf_counter()
        self._finish(finished)
        self._traced("finish", len(finished), t)

    def _traced(self, kind: str, what, t0: float, least: float = 1e-3) -> None:
        """Host work of the loop into the step trace (engine/trace.py), when one is kept."""
        if self._trace is not None:
            self._trace.note(kind, what, t0, least)

    def _give_back_surplus(self) -> None:
        """(The loop, idle) Pool blocks beyond the spare ones go back to the store."""
        surplus = self.sessions.surplus()
        if surplus:
            self._settling.submit(self.store.give_back, self.owner, surplus)

    def _finish(self, turns: list[Turn]) -> None:
        for turn in turns:
            self.generated_tokens += len(turn.seq.output_ids)
            result, on_text, request = self._pending.pop(turn.seq.seq_id)
            request.mark("first_token")
            request.mark("decode")
            self._settling.submit(self._settle, turn, result, on_text, turn.seq.error, request)

    def abort_all(self, exc: Exception) -> None:
        """(The loop) Abort every sequence in flight with ``exc``."""
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(seq, exc)
        self._finish(self.sessions.finished([t.seq for t in list(self.sessions.turns.values())]))

    def _stream_updates(self) -> None:
        for seq_id, turn in self.sessions.turns.items():  # running: the finished ones left
            _, on_text, request = self._pending[seq_id]
            if turn.seq.output_ids:
                if self._trace is not None and "first_token" not in request.marks:
                    self._traced("first_token", seq_id, time.perf_counter(), least=0.0)
                request.mark("first_token")
                if on_text is not None:
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

    def _settle(self, turn: Turn, result: Future, on_text, error: BaseException | None, request: Request) -> None:
        """Hand a finished (or failed) turn's blocks to the store, then answer."""
        logprobs = self.logprobs.pop(turn.seq) if turn.seq is not None else None  # no seq: failed before admission
        try:
            if request.store is not None:
                self._settle_blocks(turn, request)
        except StoreUnavailable as exc:
            error = error or (exc if turn.creates else None)  # an answer stands; a session not stored does not
        except BaseException as exc:
            error = error or exc
        if isinstance(error, StoreUnavailable) and self._retry_later(request):
            request.attempt += 1  # what this attempt answers is dropped: the next one answers
            self._submit(request)
        if error is not None:
            result.set_exception(error)
            return
        seq = turn.seq
        if on_text is not None:
            on_text(seq.text, True)
        request.mark("settle")
        result.set_result(TurnResult(seq.text, list(seq.output_ids), seq.finish_reason, seq.prompt_len,
                                     turn.prefill_tokens, seq.prefill_s, seq.decode_s, dict(seq.kv),
                                     cached_tokens=len(turn.prefix) * self.sessions.block_size, logprobs=logprobs,
                                     timings=request.timings()))

    def _settle_blocks(self, turn: Turn, request: Request) -> None:
        """With the store the request was admitted against (a dead one raises StoreUnavailable)."""
        store = request.store
        if turn.created is not None:
            try:
                store.put(self.owner, turn.session_id, turn.context_ids, turn.created)
            except StoreUnavailable:
                raise
            except BaseException:
                store.give_back(self.owner, turn.created)
                raise
        elif turn.pinned:
            store.unpin(turn.session_id)
        elif turn.kept:
            hashes = block_hashes(turn.all_ids, self.sessions.block_size, len(turn.kept), request.prompt_hashes)
            store.put_prefix(self.owner, hashes, turn.kept, pinned=len(request.prefix_hashes))
            self._note_prefix(hashes)
        elif request.prefix_hashes:
            store.unpin_prefix(request.prefix_hashes)

    def _note_prefix(self, hashes: list[str], keep: int = 4096) -> None:
        """Remember the routing keys (engine/prefix.py) of prefix blocks this worker put."""
        for key in routing_keys(hashes):
            self.prefix_keys[key] = None
            self.prefix_keys.move_to_end(key)
        while len(self.prefix_keys) > keep:
            self.prefix_keys.popitem(last=False)

    def held_prefix_keys(self) -> list[str]:
        """The routing keys of prefix blocks this worker put that its store still holds."""
        keys = list(self.prefix_keys)
        held = set(self.store.holding_prefixes(keys)) if keys else set()
        for key in keys:
            if key not in held:
                self.prefix_keys.pop(key, None)
        return [k for k in keys if k in held]

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
            prefill_tokens=self.sessions.prefill_tokens, rebuilt=dict(self.recovery.rebuilt), node_id=self.node_id,
            cached_tokens=self.sessions.cached_tokens, cancelled=self.cancelled,
            store_generation=self.healing.generation, warnings=list(self.warnings),
            memory=process_memory(eng.device), host_copy=dict(self.host_copy))

    def idle(self) -> bool:
        """Nothing admitted, running or waiting."""
        return not self.engine.has_work() and not self._pending


__all__ = ["DecodeWorkerCore", "Request"]
