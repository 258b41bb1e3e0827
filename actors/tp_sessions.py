"""A tensor-parallel rank with sessions: its ``1/P`` of every session's KV in a store of its own.

    replica ──create_session / ask / delete_session / add_request / abort / step──▶ every rank
    rank r (SessionRank):
      LLMEngine (rank r's KV heads) ── host mirror: the arena of ──▶ KVStoreCore (rank r's, private)
      SessionManager (engine/sessions.py): the turns' leases, pins, puts and unpins on that store

Every rank gets the same calls in the same order (the lockstep path, actors/tp_engine.py) and
keeps the same books over a store of the same number of blocks (the rank's layout has ``1/P`` of
the KV heads, so its blocks are ``1/P`` of a one-GPU arena's). So the ranks lease the same host
ids, hold the same sessions and evict the same ones: one session id for the client, its P slices
leased, released, evicted and deleted together. The store calls are plain calls in the rank's
process (no Ray round trip inside a step). A rank's arena file is unlinked once mapped: the
sessions live as long as the replica's ranks, not in the node's store.

No prefix reuse: a stateless request's blocks go back to the store when it finishes.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from actors.kv_store import KVStoreCore, arena_path
from actors.messages import StoreStats
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, RequestCancelled
from engine.parallel.engine import build_tp_engine, rank_arena_layout
from engine.parallel.rank import RankWorker
from engine.sampling import SamplingParams
from engine.sequence import Sequence, Status
from engine.sessions import SessionManager, Turn


class SessionRank(RankWorker):
    """A ``RankWorker`` whose engine's host mirror is its own store's arena (``build`` with
    ``store_bytes``); without one it is a plain ``RankWorker`` (stateless requests only)."""

    owner = "engine"  # the name of this rank's leases in its store

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self.store: KVStoreCore | None = None
        self.sessions: SessionManager | None = None
        self._turns: dict[str, Turn] = {}  # request_id -> its turn, until its last update

    def build(self, make_model: Callable[[str, torch.dtype], torch.nn.Module], config: EngineConfig,
              tokenizer=None, store_bytes: int = 0) -> None:
        """``store_bytes``: this rank's store (its share of the replica's host KV); 0: none."""
        self.store, self.sessions = None, None
        self._turns.clear()
        if not store_bytes:
            super().build(make_model, config, tokenizer)
            return
        model = make_model(config.device_name, config.torch_dtype)
        layout = rank_arena_layout(model.config, config, self.tp)
        path = arena_path("tp", f"{os.getpid()}-r{self.tp.rank}")
        self.store = KVStoreCore(f"rank{self.tp.rank}", layout, store_bytes, path)
        self.store.close()  # unlinked, still mapped: nothing outlives the rank's process
        self._install(build_tp_engine(model, config, self.tp, tokenizer, arena=self.store.arena))
        self.sessions = SessionManager(self.engine, self.store.arena.allocator, spare_blocks=0,
                                       arena_blocks=self.store.num_blocks)

    # -- lockstep calls ---------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> str:
        if self.sessions is None:
            return super().add_request(prompt, params, request_id)
        self._check_id(request_id)
        if isinstance(prompt, str):
            prompt = self.engine.tokenizer.encode(prompt) if self.engine.tokenizer is not None and prompt.strip() \
                else []
        return self._start(request_id, self.sessions.admit_generate(list(prompt), params))

    def create_session(self, session_id: str, context_ids: list[int], request_id: str) -> str:
        """Prefill ``context_ids``; when the request finishes its blocks are the session."""
        self._require_store()
        self._check_id(request_id)
        if self.store.has(session_id):
            raise InvalidRequestError(f"session {session_id} exists already")
        return self._start(request_id, self.sessions.admit_create(session_id, context_ids))

    def ask(self, session_id: str, question_ids: list[int], params: SamplingParams, request_id: str) -> str:
        """A turn on the session (``SessionNotFound`` when this rank's store does not hold it):
        its context blocks are loaded from the arena, only the rest is prefilled."""
        self._require_store()
        self._check_id(request_id)
        view = self.store.pin(session_id)
        try:
            turn = self.sessions.admit_ask(session_id, view.context_ids, view.host_ids, question_ids, params)
        except BaseException:
            self.store.unpin(session_id)
            raise
        return self._start(request_id, turn)

    def delete_session(self, session_id: str) -> bool:
        """Cancel the session's running turns (their next update says so), then delete it."""
        self._require_store()
        for turn in list(self._turns.values()):
            if turn.session_id == session_id and turn.seq.status is not Status.FINISHED:
                self.engine.abort(turn.seq, RequestCancelled(f"session {session_id} was deleted"))
                self._settle(self.sessions.finished([turn.seq]))
        deleted = self.store.delete(session_id)
        self._give_back_idle()
        return deleted

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if not super().abort(request_id):
            return False
        if self.sessions is not None:
            self._settle(self.sessions.finished([seq]))
            self._turns.pop(request_id, None)
            self._give_back_idle()
        return True

    def store_report(self, session_ids: list[str]) -> tuple[StoreStats, list[str]]:
        """This rank's store counters, and which of ``session_ids`` it holds."""
        self._require_store()
        return self.store.stats(), self.store.holding(session_ids)

    # -- inside ---------------------------------------------------------------------------

    def _require_store(self) -> None:
        if self.store is None:
            raise InvalidRequestError("this rank has no KV store: build it with store_bytes > 0 for sessions")

    def _check_id(self, request_id: str) -> None:
        if self.engine is None:
            raise InvalidRequestError("this rank has no engine yet: call build first")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")

    def _start(self, request_id: str, turn: Turn) -> str:
        """Lease the turn's host blocks and start it (a failure gives back what it took)."""
        try:
            turn.leased = self.store.lease(self.owner, turn.to_lease) if turn.to_lease else []
        except BaseException:
            self.sessions.cancel(turn)
            if turn.pinned:
                self.store.unpin(turn.session_id)
            raise
        try:
            seq = self.sessions.start(turn)
        except BaseException:
            if turn.pinned:
                self.store.unpin(turn.session_id)
            self._give_back_idle()
            raise
        self._seqs[request_id], self._emitted[request_id], self._turns[request_id] = seq, (0, 0), turn
        return request_id

    def _advance(self) -> None:
        if self.sessions is None:
            super()._advance()
            return
        self._settle(self.sessions.step())
        self._give_back_idle()

    def _settle(self, turns: list[Turn]) -> None:
        """Finished turns' blocks to the store: a created session is put, a turn's session
        unpinned, a stateless request's blocks given back (a put that fails fails its request)."""
        for turn in turns:
            if turn.created is not None:
                try:
                    self.store.put(self.owner, turn.session_id, turn.context_ids, turn.created)
                except Exception as exc:  # noqa: BLE001 - alike on every rank: this request fails
                    self.store.give_back(self.owner, turn.created)
                    turn.seq.error = turn.seq.error or exc
            elif turn.pinned:
                self.store.unpin(turn.session_id)
            elif turn.kept:
                self.store.give_back(self.owner, turn.kept)

    def _give_back_idle(self) -> None:
        """While the engine is idle, its pool's free blocks go back to the store."""
        if not self.engine.has_work():
            surplus = self.sessions.surplus()
            if surplus:
                self.store.give_back(self.owner, surplus)

    def _prompt_tokens(self, request_id: str, seq: Sequence) -> tuple[int, int, int]:
        turn = self._turns.pop(request_id, None)
        if turn is None:
            return super()._prompt_tokens(request_id, seq)
        return seq.prompt_len, turn.prefill_tokens, len(turn.prefix) * self.sessions.block_size


__all__ = ["SessionRank"]
