"""Where a worker finds a session's KV for a turn (on an admission thread):

    1. this node's store holds it: pin it (spilled blocks staged back first)   no prefill
    2. another node's store holds it: copy its blocks here, drop them there     no prefill
    3. nobody holds it (its node was lost, its store died): prefill the context the caller
       passes again (the answer counts those tokens as prefilled)

Two turns that find the same session missing at once rebuild it once: the second waits for
the first and then pins it.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import replace

from actors.messages import SessionView
from actors.session_store import SessionStore, batch_blocks, num_rows
from engine.errors import SessionEvicted, SessionNotFound


class SessionRecovery:
    def __init__(self, core):
        self.core = core
        self.rebuilt = {"remote": 0, "prefill": 0}
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def ask(self, request, session_id, question_ids, params, context_ids, on_text) -> Future:
        try:
            view = self.pin(request.store, session_id)
        except SessionEvicted:
            raise  # the caller creates it again
        except SessionNotFound as missing:
            with self._lock(session_id):
                try:  # rebuilt by another turn while this one waited
                    view = self.pin(request.store, session_id)
                except SessionEvicted:
                    raise
                except SessionNotFound:
                    return self._rebuild(request, session_id, question_ids, params, context_ids, on_text, missing)
        return self.start_turn(request, view, question_ids, params, on_text)

    def _lock(self, session_id: str) -> threading.Lock:
        with self._guard:
            if len(self._locks) > 10_000:  # forget idle ones
                for key in [k for k, lock in self._locks.items() if not lock.locked()]:
                    del self._locks[key]
            return self._locks[session_id]

    def pin(self, store: SessionStore, session_id: str) -> SessionView:
        """Pin the session in this node's store, with all its blocks here (spilled ones staged)."""
        view = store.pin(session_id)
        if view.complete:
            return view
        try:
            self.core.prefetch(session_id)
            view = store.view(session_id)
            if not view.complete:
                raise SessionNotFound(f"session {session_id} has blocks on other nodes that could not be staged")
        except BaseException:
            store.unpin(session_id)
            raise
        return view

    def start_turn(self, request, view: SessionView, question_ids, params, on_text) -> Future:
        core = self.core
        try:
            turn = core.sessions.admit_ask(view.session_id, view.context_ids, view.host_ids, question_ids, params)
            return core._start(turn, request, on_text)
        except BaseException:
            request.store.unpin(view.session_id)
            raise

    def _rebuild(self, request, session_id, question_ids, params, context_ids, on_text, missing) -> Future:
        """A session this node's store does not hold: copy it from another node's store, or
        prefill its context again (the answer counts those tokens as prefilled)."""
        core = self.core
        holder = core.stores.holder(session_id, core.node_id) if core.stores is not None else None
        if holder is not None and self._copy_session(request.store, core.stores.store(holder), session_id):
            self.rebuilt["remote"] += 1
            return self.start_turn(request, self.pin(request.store, session_id), question_ids, params, on_text)
        if context_ids is None and core.context_of is not None:
            context_ids = core.context_of(session_id)
        if not context_ids:
            raise missing
        self.rebuilt["prefill"] += 1
        # waits on this admission thread while the context is prefilled: rare (a lost node or store)
        created = core._start(core.sessions.admit_create(session_id, context_ids), request).result()
        answer = self.start_turn(request, self.pin(request.store, session_id), question_ids, params, on_text)
        return _then(answer, lambda r: replace(r, prefill_tokens=r.prefill_tokens + created.prefill_tokens))

    def _copy_session(self, store: SessionStore, peer: SessionStore, session_id: str) -> bool:
        """Copy a session from another node's store into this one, then drop it there."""
        try:
            view = peer.pin(session_id)
        except Exception:  # gone meanwhile, or its node is failing: prefill instead
            return False
        ids: list[int] = []
        try:
            if not view.complete:
                peer.stage(session_id)
                view = peer.view(session_id)
            ids = store.lease(self.core.owner, len(view.host_ids))
            for start, rows in peer.read_batches(view.host_ids, batch_blocks(self.core.arena.block_bytes)):
                self.core.arena.write(ids[start:start + num_rows(rows)], rows)
        except Exception:
            if ids:
                store.give_back(self.core.owner, ids)
            return False
        finally:
            try:
                peer.unpin(session_id)
            except Exception:
                pass
        store.put(self.core.owner, session_id, view.context_ids, ids)
        peer.delete(session_id)
        return True


def _then(fut: Future, fn) -> Future:
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
