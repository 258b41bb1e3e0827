"""Sessions: a long context prefilled once, then any number of turns on it.

    context   c0 ................................ c(n-1)
    blocks    | b0 | b1 | ... | b(k-1) | partial |         k = n // B complete blocks
    session   host ids h0 .. h(k-1), owned by the session (device slots released)
    turn      prompt = context + question; b0..b(k-1) are loaded from the host mirror,
              only the partial block (< B tokens) and the question are prefilled

After a turn the session keeps exactly its k context blocks; blocks holding question or
answer tokens are freed. Turns do not extend the context: every question is asked of the
same document. A stateless request (``admit_generate``) may start the same way from *prefix
blocks* (the blocks of an earlier request whose tokens its prompt starts with, engine/prefix.py),
and keeps all of its complete blocks when it finishes (``turn.kept``), for the store to hold
as prefix blocks.

``SessionManager`` runs turns on an ``LLMEngine`` whose host allocator is its pool, and
talks to no store. Whoever drives it pins the session and leases host blocks before a turn
starts, and settles the finished turn with the store (put a new session's blocks, unpin);
actors/decode_worker.py does so on threads of its own, so that the decode loop never waits
on a store:

    admit_generate / admit_create / admit_ask   any thread   a Turn: its pool blocks reserved,
                                                             ``to_lease`` of them to lease now
    start(turn)                                 the loop     leased ids join the pool, the
                                                             request joins the engine
    step()                                      the loop     one engine step: finished turns
    surplus()                                   the loop     pool ids to give back
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.host_arena import IdPool
from engine.sampling import SamplingParams
from engine.sequence import Sequence


@dataclass
class Turn:
    """A request on the engine, from its admission to its settlement with the store."""

    prompt_ids: list[int]
    params: SamplingParams
    session_id: str | None  # None: a plain request
    creates: bool  # prefills a new session
    context_ids: list[int]  # the session's context
    prefix: list[int]  # host ids loaded from the host mirror (a session's, or prefix blocks), not prefilled
    keeps_all: bool = False  # keeps every complete block when done (a stateless request: prefix blocks)
    pool_need: int = 0  # host blocks it may draw from the pool
    prefill_tokens: int = 0  # prompt tokens it computes (the rest come from the host mirror)
    to_lease: int = 0  # blocks to lease into the pool before it starts
    leased: list[int] = field(default_factory=list)  # ... the ids leased
    seq: Sequence | None = None  # once started
    created: list[int] | None = None  # once finished: the host ids of the session it created
    kept: list[int] = field(default_factory=list)  # once finished (``keeps_all``): its complete blocks' host ids

    @property
    def pinned(self) -> bool:
        """A turn on an existing session, which the store holds pinned until it is settled."""
        return self.session_id is not None and not self.creates

    @property
    def all_ids(self) -> list[int]:
        """Every token id whose KV the turn's sequence holds: the prompt, then the answer but its
        last token (all of it when overlapped decode ran one step past the end, engine/llm.py)."""
        if self.seq is None:
            return list(self.prompt_ids)
        return (self.prompt_ids + self.seq.output_ids)[: self.seq.num_cached]


class SessionManager:
    """Sessions and plain requests on one ``LLMEngine`` whose host allocator is ``pool``.

    The pool's ledger is the one piece several threads touch (admission on the callers',
    everything else on the loop): ``reserved``, the blocks admitted turns may still draw, and
    ``held``, the ids in the pool or leased for it. A turn leases only what ``held`` lacks;
    when the engine is idle the pool keeps ``spare_blocks`` and gives back the rest."""

    def __init__(self, engine, pool: IdPool, spare_blocks: int = 0, arena_blocks: int | None = None):
        """``arena_blocks``: the host arena's size, the most host blocks one request can ever hold."""
        self.engine = engine
        self.pool = pool
        self.block_size = engine.cache.block_size
        self.arena_blocks = arena_blocks
        self.spare_blocks = spare_blocks
        self.turns: dict[int, Turn] = {}  # seq_id -> started, not finished
        self.prefill_tokens = 0  # tokens prefilled (not loaded) over all requests
        self.cached_tokens = 0  # tokens loaded from the host mirror instead (sessions, prefix blocks)
        self._ledger = threading.Lock()
        self._reserved = 0
        self._held = 0

    # -------------------------------------------------------- admission (any thread)

    @property
    def max_context(self) -> int:
        """The most tokens one request can hold: the model's context, or the host arena's if smaller."""
        limit = self.engine.max_model_len
        if self.arena_blocks is not None:
            limit = min(limit, self.arena_blocks * self.block_size)
        return limit

    def admit_generate(self, prompt_ids: list[int], params: SamplingParams, prefix: list[int] = ()) -> Turn:
        """A stateless request; ``prefix``: host ids of prefix blocks its prompt starts with
        (pinned by the caller): loaded, not prefilled. It keeps its complete blocks when done."""
        prefix = list(prefix)[: self._reusable_blocks(len(prompt_ids))]
        return self._admit(Turn(list(prompt_ids), params, None, False, [], prefix, keeps_all=True))

    def _reusable_blocks(self, prompt_len: int) -> int:
        """Leading blocks of a prompt that may be loaded instead of prefilled: a policy that
        observes the prompt's last queries (snapkv, lsa's first plan) sees as many of them as a
        fresh request would, so those are prefilled again; at least one token always is."""
        window = max(1, self.engine.policy.prefill_window)
        return max(0, prompt_len - window) // self.block_size

    def admit_create(self, session_id: str, context_ids: list[int]) -> Turn:
        """Prefill ``context_ids`` once; when the turn finishes its blocks make the session."""
        if not context_ids:
            raise InvalidRequestError("the session context is empty")
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        return self._admit(Turn(list(context_ids), params, session_id, True, list(context_ids), []))

    def admit_ask(self, session_id: str, context_ids: list[int], host_ids: list[int], question_ids: list[int],
                  params: SamplingParams) -> Turn:
        """A turn on a pinned session (its context and host ids): only the partial context
        block and the question are prefilled."""
        if not question_ids:
            raise InvalidRequestError("the question is empty", param="question")
        prefix = list(host_ids)[: self._reusable_blocks(len(context_ids) + len(question_ids))]
        prompt_ids = list(context_ids) + list(question_ids)
        return self._admit(Turn(prompt_ids, params, session_id, False, list(context_ids), prefix))

    def _admit(self, turn: Turn) -> Turn:
        turn.params = self._fit(len(turn.prompt_ids), turn.params)
        turn.prefill_tokens = len(turn.prompt_ids) - len(turn.prefix) * self.block_size
        turn.pool_need = self.engine.cache.blocks.blocks_for(len(turn.prompt_ids) + turn.params.max_tokens) \
            - len(turn.prefix)
        with self._ledger:
            self._reserved += turn.pool_need
            turn.to_lease = max(0, self._reserved - self._held)
            self._held += turn.to_lease
        return turn

    def _fit(self, prompt_len: int, params: SamplingParams) -> SamplingParams:
        """``params`` with ``max_tokens`` capped at the room the prompt leaves; a request that can
        never fit (the prompt, or ``max_tokens`` alone, over ``max_context``) is a FINAL error."""
        limit = self.max_context
        what = "model's context" if limit == self.engine.max_model_len else "host KV arena"
        if prompt_len >= limit:
            raise PromptTooLongError(f"the prompt has {prompt_len} tokens; the {what} holds {limit} tokens including "
                                     f"at least one generated token: shorten the prompt")
        if params.max_tokens > limit:
            raise PromptTooLongError(f"max_tokens is {params.max_tokens}; the {what} holds {limit} tokens in all: "
                                     f"lower it (or leave it out)", param="max_tokens")
        room = limit - prompt_len
        return replace(params, max_tokens=room) if params.max_tokens > room else params

    def cancel(self, turn: Turn) -> None:
        """A turn admitted that will not start (its lease failed): its reservation goes; the
        caller gives back ``turn.leased`` if the lease succeeded."""
        with self._ledger:
            self._reserved -= turn.pool_need
            self._held -= turn.to_lease

    # -------------------------------------------------------- the loop thread

    def start(self, turn: Turn) -> Sequence:
        """The turn joins the engine (its leased ids join the pool)."""
        self.pool.add(turn.leased)
        try:
            seq = self.engine.add_request(turn.prompt_ids, turn.params, prefix_host_ids=turn.prefix)
        except BaseException:
            with self._ledger:
                self._reserved -= turn.pool_need  # its leased ids stay in the pool
            raise
        if turn.keeps_all:
            seq.keep_host_blocks = -(-seq.max_len // self.block_size)
        else:
            seq.keep_host_blocks = len(turn.context_ids) // self.block_size if turn.creates else len(turn.prefix)
        turn.seq = seq
        self.turns[seq.seq_id] = turn
        return seq

    def finished(self, seqs: list[Sequence]) -> list[Turn]:
        """Call with what ``engine.step()`` returned (or aborted sequences): a created session's
        blocks leave the pool (``turn.created``), and the finished turns are returned."""
        done = []
        for seq in seqs:
            turn = self.turns.pop(seq.seq_id, None)
            if turn is None:
                continue
            self.prefill_tokens += turn.prefill_tokens
            self.cached_tokens += len(turn.prefix) * self.block_size
            kept = 0
            if turn.keeps_all:
                new = seq.kept_host_ids[len(turn.prefix):]  # drawn from the pool; the prefix's were not
                if seq.finish_reason in ("stop", "length"):
                    self.pool.forget(len(new))
                    turn.kept, kept = list(seq.kept_host_ids), len(new)
                else:  # cancelled or failed: its blocks return to the pool
                    self.pool.free(new)
            elif turn.creates:
                self.pool.forget(len(seq.kept_host_ids))
                complete = len(seq.kept_host_ids) == len(turn.context_ids) // self.block_size
                if seq.finish_reason in ("stop", "length") and complete:
                    turn.created, kept = list(seq.kept_host_ids), len(seq.kept_host_ids)
                else:  # never became a session: the blocks return to the pool
                    self.pool.add(seq.kept_host_ids)
            with self._ledger:
                self._reserved -= turn.pool_need
                self._held -= kept
            done.append(turn)
        return done

    def step(self) -> list[Turn]:
        return self.finished(self.engine.step())

    def surplus(self) -> list[int]:
        """Free pool ids beyond what admitted turns may draw and the spare blocks: the caller
        gives them back to the store."""
        with self._ledger:
            n = min(self.pool.num_free, self._held - max(self._reserved, self.spare_blocks))
            if n <= 0:
                return []
            self._held -= n
        return self.pool.take(n)
