"""Sessions: a long context prefilled once, then any number of turns on it.

    context   c0 ................................ c(n-1)
    blocks    | b0 | b1 | ... | b(k-1) | partial |         k = n // B complete blocks
    session   host ids h0 .. h(k-1), owned by the session (device slots released)
    turn      prompt = context + question; b0..b(k-1) are loaded from the host mirror,
              only the partial block (< B tokens) and the question are prefilled

After a turn the session keeps exactly its k context blocks; blocks holding question or
answer tokens are freed. Turns do not extend the context: every question is asked of the
same document.

``SessionManager`` drives an ``LLMEngine``: a pool of leased host ids for in-flight
sequences, session creation and turns, handing kept blocks to the node's session table
(actors/session_table.py, inside the KV store). The host arena behind the pool is
engine/host_arena.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError, SessionNotFound
from engine.host_arena import IdPool
from engine.sampling import SamplingParams
from engine.sequence import Sequence


@dataclass
class Turn:
    """A running request on the engine, and what to do with it when it finishes."""

    seq: Sequence
    session: str | None
    creates: bool  # prefills a new session (its blocks go to the table)
    context: list[int]
    prefill_tokens: int  # tokens this request prefills (the rest came from the host mirror)
    pool_need: int  # host blocks it may draw from the pool


class SessionManager:
    """Sessions and plain requests on one ``LLMEngine`` whose host allocator is ``pool``.

    ``table`` is a ``SessionTable`` or anything with its ``lease / give_back / put / pin /
    unpin / delete`` (the KV store actor's proxy). ``owner`` names this engine's lease."""

    def __init__(self, engine, table, pool: IdPool, owner: str = "engine", spare_blocks: int = 0):
        self.engine = engine
        self.table = table
        self.pool = pool
        self.owner = owner
        self.block_size = engine.cache.block_size
        self.spare_blocks = spare_blocks  # free pool blocks kept beyond what running requests need
        self.turns: dict[int, Turn] = {}
        self.prefill_tokens = 0  # tokens prefilled (not loaded) over all requests

    # -------------------------------------------------------- pool

    def _reserved(self) -> int:
        return sum(t.pool_need for t in self.turns.values())

    def _ensure_pool(self, need: int) -> None:
        # blocks the running requests may still draw, plus this one
        want = self._reserved() + need + self.spare_blocks
        drawn = sum(max(0, len(self.engine.cache.blocks.seqs[t.seq.seq_id].host_ids)
                        - len(t.seq.prefix_host_ids))
                    for t in self.turns.values() if t.seq.seq_id in self.engine.cache.blocks.seqs)
        missing = want - drawn - self.pool.num_free
        if missing > 0:
            self.pool.add(self.table.lease(self.owner, missing))

    def trim_pool(self) -> None:
        """Give idle free blocks back to the table when nothing runs."""
        if not self.turns and self.pool.num_free > self.spare_blocks:
            self.table.give_back(self.owner, self.pool.take(self.pool.num_free - self.spare_blocks))

    # -------------------------------------------------------- requests

    def _add(self, ids: list[int], params: SamplingParams, session: str | None, creates: bool,
             context: list[int], prefix: list[int], request_id: str = "") -> Sequence:
        need = self.engine.cache.blocks.blocks_for(len(ids) + params.max_tokens) - len(prefix)
        self._ensure_pool(need)
        seq = self.engine.add_request(ids, params, request_id=request_id)
        seq.prefix_host_ids = list(prefix)
        seq.keep_host_blocks = len(context) // self.block_size if creates else len(prefix)
        self.turns[seq.seq_id] = Turn(seq, session, creates, context, len(ids) - len(prefix) * self.block_size,
                                      need)
        return seq

    def generate(self, ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        return self._add(ids, params, None, False, [], [], request_id)

    def create(self, sid: str, context: list[int]) -> Sequence:
        """Prefill ``context`` once; when the sequence finishes the session exists."""
        if not context:
            raise InvalidRequestError("the session context is empty")
        return self._add(list(context), SamplingParams(max_tokens=1, ignore_eos=True), sid, True,
                         list(context), [])

    def ask(self, sid: str, question: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        """A turn: the session's context, then ``question``; only the partial context block and
        the question are prefilled."""
        if not question:
            raise InvalidRequestError("the question is empty")
        rec = self.table.pin(sid)
        try:
            if any(h < 0 for h in rec.host_ids):
                raise SessionNotFound(f"session {sid} has blocks on other nodes that were not staged")
            # a policy that observes the prompt's last queries (snapkv, lsa's first plan) sees
            # as many of them as a fresh request would: they are prefilled again
            window = max(1, self.engine.policy.prefill_window)
            prefix = list(rec.host_ids)[: max(0, len(rec.context_ids) + len(question) - window) // self.block_size]
            return self._add(list(rec.context_ids) + list(question), params, sid, False, list(rec.context_ids),
                             prefix, request_id)
        except BaseException:
            self.table.unpin(sid)
            raise

    def delete(self, sid: str) -> bool:
        return self.table.delete(sid)

    # -------------------------------------------------------- stepping

    def finished(self, seqs: list[Sequence]) -> list[Turn]:
        """Call with what ``engine.step()`` returned (or aborted sequences): settles their
        blocks with the table and returns their turns."""
        done = []
        for seq in seqs:
            turn = self.turns.pop(seq.seq_id, None)
            if turn is None:
                continue
            self.prefill_tokens += turn.prefill_tokens
            if turn.creates:
                self.pool.forget(len(seq.kept_host_ids))
                if seq.finish_reason != "abort" and len(seq.kept_host_ids) == len(turn.context) // self.block_size:
                    self.table.put(self.owner, turn.session, turn.context, seq.kept_host_ids)
                else:  # never became a session: the blocks return to the table as leased free ones
                    self.pool.add(seq.kept_host_ids)
            elif turn.session is not None:
                self.table.unpin(turn.session)
            done.append(turn)
        return done

    def step(self) -> list[Turn]:
        return self.finished(self.engine.step())

    def run(self, seq: Sequence) -> Turn:
        """Step until ``seq`` finishes (other requests advance too)."""
        while True:
            for turn in self.step():
                if turn.seq is seq:
                    return turn

