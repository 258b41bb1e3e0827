"""Engine sessions: a follow-up turn equals a fresh request over the whole prompt and skips the
prefix prefill; LRU eviction of idle sessions; host blocks accounted."""
from dataclasses import replace

import pytest
import torch

from engine.config import PolicyConfig
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
from engine.errors import SessionEvicted, SessionNotFound
from actors.session_table import SessionTable
from engine.host_arena import ArenaLayout, HostArena
from engine.sessions import SessionManager
from tiny import TINY, engine_config  # noqa: E402

BLOCK = 8
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


SEED = 5  # the conftest's model fixture


def config(policy="full", chunk=40, overlap=False, **kw):
    cfg = engine_config(BLOCK, prefill_chunk=chunk, policy=PolicyConfig(name=policy, **{"min_resident_tokens": 0, **kw}))
    return replace(cfg, scheduler=replace(cfg.scheduler, overlap_decode=overlap))


class Sessions:
    """A ``SessionManager`` and a ``SessionTable`` of its own, driven in this thread: the
    store calls that actors/decode_worker.py makes on its admission and settling threads."""

    def __init__(self, engine, table: SessionTable, pool):
        self.engine, self.table = engine, table
        self.manager = SessionManager(engine, pool)

    def _start(self, turn):
        turn.leased = self.table.lease("engine", turn.to_lease)
        return self.manager.start(turn)

    def create(self, session_id, context_ids):
        return self._start(self.manager.admit_create(session_id, context_ids))

    def ask(self, session_id, question_ids, params):
        rec = self.table.pin(session_id)
        return self._start(self.manager.admit_ask(session_id, rec.context_ids, rec.host_ids, question_ids, params))

    def step(self):
        turns = self.manager.step()
        for turn in turns:
            if turn.created is not None:
                self.table.put("engine", turn.session_id, turn.context_ids, turn.created)
            elif turn.pinned:
                self.table.unpin(turn.session_id)
        return turns

    def run(self, seq):
        """Step until ``seq`` finishes (other requests advance too)."""
        while True:
            for turn in self.step():
                if turn.seq is seq:
                    return turn

    def trim_pool(self):
        self.table.give_back("engine", self.manager.surplus())


def manager(model, policy="full", host_blocks=200, **kw):
    """An engine over a private arena, its sessions in a table of its own (one process)."""
    layout = ArenaLayout.of(TINY, BLOCK, torch.float32)
    arena = HostArena.private(layout, host_blocks)
    engine = LLMEngine(model, config(policy, **kw), arena=arena)
    return Sessions(engine, SessionTable(host_blocks, layout.block_bytes), arena.allocator)


def tokens(n, seed):
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def with_logits(mgr):
    rows = {}
    mgr.engine.hooks.append(LogitsObserver(lambda seq, row: rows.setdefault(seq.seq_id, []).append(row.clone())))
    return rows


def fresh(model, ids, policy="full", **kw):
    engine = LLMEngine(model, config(policy, **kw))
    rows = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: rows.setdefault(seq.seq_id, []).append(row.clone())))
    seq = engine.add_request(ids, GREEDY)
    while engine.has_work():
        engine.step()
    return seq.output_ids, torch.stack(rows[seq.seq_id])


@pytest.mark.parametrize("context_len", [157, 160])  # a partial tail block, and none
def test_turn_equals_fresh_request_and_skips_prefix(model, context_len):
    mgr = manager(model)
    rows = with_logits(mgr)
    context = tokens(context_len, 1)
    created = mgr.run(mgr.create("doc", context))
    assert created.prefill_tokens == context_len
    assert mgr.table.session_bytes("doc") == (context_len // BLOCK) * mgr.table.block_bytes
    for i, q_len in enumerate((9, 23, 4)):
        question = tokens(q_len, 10 + i)
        turn = mgr.run(mgr.ask("doc", question, GREEDY))
        want_ids, want_logits = fresh(model, context + question)
        assert turn.seq.output_ids == want_ids
        torch.testing.assert_close(torch.stack(rows[turn.seq.seq_id]), want_logits, rtol=1e-5, atol=1e-5)
        # only the partial context block (< B tokens) and the question were prefilled
        assert turn.prefill_tokens == context_len % BLOCK + q_len
    # the session still holds exactly its complete context blocks; nothing else leaked
    assert mgr.table.session_blocks == context_len // BLOCK
    assert not mgr.engine.cache.blocks.seqs
    assert mgr.table.delete("doc")
    with pytest.raises(SessionNotFound) as deleted:
        mgr.ask("doc", [5], GREEDY)
    assert not isinstance(deleted.value, SessionEvicted)
    mgr.trim_pool()
    assert mgr.table.num_free == mgr.table.num_blocks


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_concurrent_turns_on_one_and_several_sessions(model, overlap):
    mgr = manager(model, overlap=overlap)
    contexts = {"a": tokens(130, 2), "b": tokens(75, 3)}
    for session_id, ctx in contexts.items():
        mgr.run(mgr.create(session_id, ctx))
    asks = [("a", tokens(7, 20)), ("b", tokens(11, 21)), ("a", tokens(5, 22))]
    seqs = [(session_id, q, mgr.ask(session_id, q, GREEDY)) for session_id, q in asks]
    while mgr.engine.has_work():
        mgr.step()
    for session_id, q, seq in seqs:
        assert seq.output_ids == fresh(model, contexts[session_id] + q)[0]
    assert mgr.table.records["a"].pins == 0
    # the sessions hold their context blocks only; the turns' blocks went back
    assert mgr.table.session_blocks == 130 // BLOCK + 75 // BLOCK and not mgr.engine.cache.blocks.seqs


def test_lsa_turn_matches_fresh_lsa(model):
    # one prefill segment each, so both observe the same last 32 prompt queries
    mgr = manager(model, "lsa", budget=0.3, cycle=4, chunk=512)
    context, question = tokens(300, 4), tokens(10, 5)
    mgr.run(mgr.create("s", context))
    turn = mgr.run(mgr.ask("s", question, GREEDY))
    assert turn.seq.output_ids == fresh(model, context + question, "lsa", budget=0.3, cycle=4, chunk=512)[0]
    window = mgr.engine.policy.prefill_window  # the observation window is prefilled again
    assert window <= turn.prefill_tokens < window + BLOCK


def test_idle_sessions_evicted_lru_with_a_clear_error(model):
    mgr = manager(model, host_blocks=40)  # 40 blocks: room for about two 14-block sessions
    for i, session_id in enumerate(("old", "mid", "new")):
        mgr.run(mgr.create(session_id, tokens(112, 30 + i)))
        mgr.trim_pool()
        if session_id == "mid":
            mgr.run(mgr.ask("old", [4, 5], SamplingParams(max_tokens=2)))  # "old" is now more recent
            mgr.trim_pool()
    assert set(mgr.table.records) == {"old", "new"}
    with pytest.raises(SessionEvicted, match="least recently used"):
        mgr.ask("mid", [4], GREEDY)
