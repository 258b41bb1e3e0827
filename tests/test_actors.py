"""actors/ without Ray: KV stores over shared-memory arenas, a decode worker (background loop,
concurrent requests, no store call on the loop), spilling a session to another store and
staging it back (Indexer), a worker restart that resumes sessions without prefill."""
import concurrent.futures as cf
import threading
from collections import Counter

import pytest
import torch

from actors.decode_worker import DecodeWorkerCore
from actors.indexer import IndexerCore
from actors.kv_store import KVStoreCore, arena_path
from actors.messages import SPILLED
from actors.session_store import LocalStores
from engine.config import CacheConfig, EngineConfig, PolicyConfig, SchedulerConfig
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
from engine.errors import SessionEvicted, SessionNotFound
from engine.host_arena import ArenaLayout
from tiny import TINY, engine_config, tokens  # noqa: E402

BLOCK = 8
LAYOUT = ArenaLayout.of(TINY, BLOCK, torch.float32)
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


SEED = 7  # the conftest's model fixture


def make_engine(model):
    cfg = engine_config(BLOCK)
    return lambda arena: LLMEngine(model, cfg, arena=arena)


@pytest.fixture()
def stores(tmp_path):
    """Two node stores that stage from each other but do not spill on their own."""
    made = {}
    for node_id, blocks in (("node-a", 60), ("node-b", 200)):
        made[node_id] = KVStoreCore(node_id, LAYOUT, blocks * LAYOUT.block_bytes,
                                    arena_path("test", node_id, str(tmp_path)), LocalStores(made, spill=False))
    return made


def reference(model, ids):
    engine = make_engine(model)(None)
    return engine.generate([ids], GREEDY)[0].token_ids


def test_arena_is_shared_memory_mapped_without_copy(stores, model):
    store = stores["node-a"]
    worker = DecodeWorkerCore.build(make_engine(model), store, "w0")
    try:
        assert store.info().path.startswith(str(store.path.rsplit("/", 1)[0]))
        worker.create_session("s", tokens(50, 1)).result(timeout=60)
        ids = store.view("s").host_ids
        # the worker wrote the blocks through its own mapping; the store reads the same bytes
        assert torch.equal(worker.engine.cache.mirror.host[ids], store.arena.host[ids])
        assert store.arena.host[ids].abs().sum() > 0
    finally:
        worker.close()


def test_concurrent_requests_and_sessions(stores, model):
    worker = DecodeWorkerCore.build(make_engine(model), stores["node-b"], "w0")
    try:
        context = tokens(90, 2)
        created = worker.create_session("doc", context).result(timeout=60)
        assert created.prefill_tokens == 90
        questions = [tokens(5 + i, 10 + i) for i in range(4)]
        futures = [worker.ask("doc", q, GREEDY) for q in questions]
        futures.append(worker.generate(tokens(30, 3), GREEDY))
        results = [f.result(timeout=60) for f in futures]
        for q, r in zip(questions, results):
            assert r.token_ids == reference(model, context + q)
            assert r.prefill_tokens == 90 % BLOCK + len(q)
        assert results[-1].token_ids == reference(model, tokens(30, 3))
        assert worker.stats().generated_tokens >= 50
        assert worker.delete_session("doc").result(timeout=10)
        with pytest.raises(SessionNotFound) as deleted:
            worker.ask("doc", [5], GREEDY).result(timeout=10)
        assert not isinstance(deleted.value, SessionEvicted)
    finally:
        worker.close()


def test_worker_restart_resumes_sessions_from_the_store(stores, model):
    store = stores["node-b"]
    context, question = tokens(120, 4), tokens(6, 5)
    first = DecodeWorkerCore.build(make_engine(model), store, "w-old")
    first.create_session("s", context).result(timeout=60)
    first.close()
    store.drop_owner("w-old")  # what the actor's reap does for a dead worker
    second = DecodeWorkerCore.build(make_engine(model), store, "w-new")
    try:
        r = second.ask("s", question, GREEDY).result(timeout=60)
        assert r.prefill_tokens == 120 % BLOCK + len(question)  # no prefix re-prefill
        assert r.token_ids == reference(model, context + question)
    finally:
        second.close()


def test_a_turn_reads_the_context_of_a_session_only_to_rebuild_it(stores, model):
    """A turn carries no context: a held session's comes from its store; one no store holds any
    more (its node was lost) is prefilled again from what ``context_of`` (the session directory)
    says, asked then only."""
    store = stores["node-b"]
    context, question = tokens(120, 4), tokens(6, 5)
    asked = []
    worker = DecodeWorkerCore.build(make_engine(model), store, "w",
                                    context_of=lambda session_id: asked.append(session_id) or context)
    try:
        worker.create_session("s", context).result(timeout=60)
        held = worker.ask("s", question, GREEDY).result(timeout=60)
        assert asked == [] and held.prefill_tokens == 120 % BLOCK + len(question)
        store.delete("s")  # gone with its node
        rebuilt = worker.ask("s", question, GREEDY).result(timeout=60)
        assert asked == ["s"] and rebuilt.prefill_tokens == len(context) + held.prefill_tokens
        assert rebuilt.token_ids == held.token_ids == reference(model, context + question)
    finally:
        worker.close()


def test_spilled_session_staged_by_the_indexer_decodes_like_a_local_one(stores, model):
    a, b = stores["node-a"], stores["node-b"]
    context, question = tokens(200, 6), tokens(7, 8)
    worker = DecodeWorkerCore.build(make_engine(model), a, "wa",
                                    prefetch=lambda session_id: indexer.prefetch(session_id, "node-a"))
    indexer = IndexerCore(LocalStores(stores))
    try:
        worker.create_session("big", context).result(timeout=60)
        before = a.view("big").host_ids
        original = a.read_blocks(before)
        logical = a.spill_plan("big", 15)  # the last 15 of 25 blocks go to node-b
        a.spill("big", logical, "node-b")
        view = a.view("big")
        assert view.host_ids.count(SPILLED) == 15 and b.stats().foreign_blocks == 15
        # blocks fetched across nodes are byte-identical
        remote = [rid for _, rid in a.missing("big")["node-b"]]
        data, summary = b.read_blocks(remote)
        assert (data == original[0][logical]).all() and (summary == original[1][logical]).all()
        r = worker.ask("big", question, GREEDY).result(timeout=60)
        assert indexer.stats()["prefetched_blocks"] == {"node-a": 15}
        assert r.token_ids == reference(model, context + question)
        assert r.prefill_tokens == 200 % BLOCK + len(question)
        assert a.stats().staged_blocks == 15  # staged copies stay for the next turn (dropped first under pressure)
        again = worker.ask("big", question, GREEDY).result(timeout=60)
        assert again.token_ids == r.token_ids and a.stats().blocks_fetched_at_use == 15  # nothing fetched again
    finally:
        worker.close()


def test_store_evicts_idle_sessions_lru_with_a_clear_error(stores, model):
    a = stores["node-a"]  # 60 blocks
    worker = DecodeWorkerCore.build(make_engine(model), a, "wa", spare_blocks=0)
    try:
        for i in range(4):  # 16 blocks each: the fourth evicts the first
            worker.create_session(f"s{i}", tokens(128, 20 + i)).result(timeout=60)
        with pytest.raises(SessionEvicted, match="least recently used"):
            worker.ask("s0", [3, 4], GREEDY).result(timeout=10)
        assert worker.ask("s3", [3, 4], GREEDY).result(timeout=60).prefill_tokens == 2
    finally:
        worker.close()


class Recorded:
    """A store that records each call with the thread it came from; while ``hold`` is clear,
    ``pin`` waits (a slow store)."""

    def __init__(self, store):
        self.store, self.calls, self.hold = store, [], threading.Event()
        self.hold.set()

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def call(*args, **kwargs):
            self.calls.append((name, threading.current_thread().name))
            if name == "pin":
                self.hold.wait(60)
            return method(*args, **kwargs)

        return call


def test_store_calls_stay_off_the_decode_loop(stores, model):
    store = Recorded(stores["node-b"])
    worker = DecodeWorkerCore.build(make_engine(model), store, "w0")
    try:
        context = tokens(90, 2)
        worker.create_session("doc", context).result(timeout=60)
        worker.ask("doc", tokens(5, 3), GREEDY).result(timeout=60)  # the pool now holds what a turn draws
        calls_before = len(store.calls)
        for i in range(5):
            question = tokens(5, 10 + i)
            answer = worker.ask("doc", question, GREEDY).result(timeout=60)
            assert answer.token_ids == reference(model, context + question)
        # a turn is two store calls: pin (admission) and unpin (settling, before the answer)
        assert Counter(name for name, _ in store.calls[calls_before:]) == {"pin": 5, "unpin": 5}
        assert {thread.split("_")[0] for _, thread in store.calls} == {"MainThread", "admission", "settling"}
        assert worker._thread.name == "decode-loop"  # ... which never called the store
    finally:
        worker.close()


def test_a_slow_store_never_stalls_decode_steps(stores, model):
    store = Recorded(stores["node-b"])
    worker = DecodeWorkerCore.build(make_engine(model), store, "w0")
    try:
        context, question = tokens(90, 2), tokens(5, 3)
        worker.create_session("doc", context).result(timeout=60)
        store.hold.clear()  # from now on the store takes its time to pin
        turn = worker.ask("doc", question, GREEDY)
        long = worker.generate(tokens(20, 4), SamplingParams(max_tokens=150, ignore_eos=True))
        assert len(long.result(timeout=120).token_ids) == 150  # decoded while the turn's pin waited
        assert not turn.done()
        store.hold.set()
        assert turn.result(timeout=60).token_ids == reference(model, context + question)
    finally:
        store.hold.set()
        worker.close()


def test_messages_between_actors_pack_with_msgpack(stores, model):
    import dataclasses

    import msgpack

    from actors.messages import PlanReport

    store = stores["node-b"]
    worker = DecodeWorkerCore.build(make_engine(model), store, "w0")
    try:
        worker.create_session("doc", tokens(40, 1)).result(timeout=60)
        result = worker.ask("doc", tokens(4, 2), GREEDY).result(timeout=60)
        messages = [store.info(), store.view("doc"), store.stats(), PlanReport("w0", "node-b", "doc", [0, 2]),
                    dataclasses.replace(worker.stats(), store=store.stats()), result]
    finally:
        worker.close()
    for message in messages:
        fields = dataclasses.asdict(message)
        assert msgpack.unpackb(msgpack.packb(fields)) == fields, type(message).__name__


def test_bad_requests_fail_their_future_not_the_worker(stores, model):
    worker = DecodeWorkerCore.build(make_engine(model), stores["node-b"], "w0")
    try:
        with pytest.raises(Exception, match="token ids"):
            worker.generate([999], GREEDY).result(timeout=10)
        with pytest.raises(Exception, match="empty"):
            worker.create_session("e", []).result(timeout=10)
        assert worker.generate([3, 4, 5], GREEDY).result(timeout=60).finish_reason == "length"
    finally:
        worker.close()


def test_many_concurrent_callers(stores, model):
    worker = DecodeWorkerCore.build(make_engine(model), stores["node-b"], "w0")
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: worker.generate(tokens(20, 40 + i), GREEDY).result(timeout=120),
                                 range(8)))
        assert [o.token_ids for o in outs] == [reference(model, tokens(20, 40 + i)) for i in range(8)]
    finally:
        worker.close()


def test_full_store_spills_to_the_peer_with_most_room_before_evicting(tmp_path, model):
    made = {}
    for node_id, blocks in (("a", 60), ("b", 40), ("c", 120)):
        made[node_id] = KVStoreCore(node_id, LAYOUT, blocks * LAYOUT.block_bytes,
                                    arena_path("spill", node_id, str(tmp_path)), LocalStores(made))
    a = made["a"]
    worker = DecodeWorkerCore.build(make_engine(model), a, "wa", spare_blocks=0, prefetch=a.stage)
    try:
        contexts = {f"s{i}": tokens(128, 60 + i) for i in range(4)}  # 16 blocks each; the arena holds 60
        for session_id, ctx in contexts.items():
            worker.create_session(session_id, ctx).result(timeout=60)
        stats = a.stats()
        assert stats.evictions == 0 and stats.sessions == 4  # nothing evicted...
        assert stats.blocks_spilled > 0 and stats.spilled_blocks == stats.blocks_spilled
        # ... the oldest idle session's tail went to the peer with the most room (c, not b)
        assert SPILLED in a.view("s0").host_ids and a.view("s0").host_ids[0] != SPILLED  # sinks stay home
        assert made["c"].stats().foreign_blocks == stats.blocks_spilled
        assert made["b"].stats().foreign_blocks == 0
        for session_id, ctx in contexts.items():  # every session still answers exactly, without re-prefill
            question = tokens(5, 70)
            r = worker.ask(session_id, question, GREEDY).result(timeout=60)
            assert r.token_ids == reference(model, ctx + question)
            assert r.prefill_tokens == len(question)
        assert a.stats().evictions == 0
    finally:
        worker.close()


def test_plan_reporter_never_blocks_and_batches():
    import threading
    import time

    from actors.messages import PlanReport
    from actors.plans import PlanReporter

    gate, batches = threading.Event(), []
    reporter = PlanReporter(lambda b: (gate.wait(10), batches.append(b)), capacity=8, batch=4, period_s=0.01)
    try:
        t0 = time.perf_counter()
        for i in range(100):  # the sender is stuck: offers still return at once
            reporter.offer(PlanReport("w", "n", f"s{i}", [i]))
        assert time.perf_counter() - t0 < 0.5
        gate.set()
        assert reporter.flush(10)
        sent = [r.session_id for b in batches for r in b]
        assert reporter.num_dropped == 100 - len(sent) > 0  # bounded: the oldest went
        assert sent[-8:] == [f"s{i}" for i in range(92, 100)]  # the newest were all sent
    finally:
        reporter.close()


def test_the_indexer_keeps_the_last_plans_of_the_latest_sessions_only(monkeypatch):
    """Stateless requests and deleted sessions report plans once: the Indexer keeps the last plan of
    the ``PLANS_KEPT`` most recently reported sessions, so its memory does not grow with traffic."""
    from actors.messages import PlanReport
    monkeypatch.setattr(IndexerCore, "PLANS_KEPT", 3)
    indexer = IndexerCore()
    for i in range(6):
        indexer.report_plans([PlanReport("w", "n", f"s{i}", [i])])
    indexer.report_plans([PlanReport("w", "n", "s3", [9])])  # s3 reported again: the most recent
    assert list(indexer.plans) == ["s4", "s5", "s3"] and indexer.plans["s3"].blocks == [9]
    assert indexer.stats()["plans"] == 7


def test_per_cycle_plans_stage_spilled_blocks_before_the_turn_needs_them(stores, model):
    from actors.plans import PlanReporter

    a, b = stores["node-a"], stores["node-b"]
    indexer = IndexerCore(LocalStores(stores))
    reporter = PlanReporter(indexer.report_plans, period_s=0.01)
    cfg = EngineConfig(cache=CacheConfig(block_size=BLOCK, num_device_blocks=256),
                       scheduler=SchedulerConfig(max_num_seqs=4, prefill_chunk=512),
                       policy=PolicyConfig("lsa", budget=0.3, cycle=4))
    worker = DecodeWorkerCore.build(lambda arena: LLMEngine(model, cfg, arena=arena), a, "wa", spare_blocks=0,
                                    prefetch=a.stage, plans=reporter)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    try:
        context = tokens(200, 80)
        worker.create_session("big", context).result(timeout=60)
        first = worker.ask("big", tokens(6, 81), params).result(timeout=60)  # held locally: plans reported
        assert reporter.flush(10) and indexer.stats()["plans"] >= 3  # one per cycle of 4 steps, and more
        planned = set(indexer.plans["big"].blocks)
        spilled = a.spill_plan("big", 15)  # now the arena is short: the last 15 of 25 blocks go to node-b
        a.spill("big", spilled, "node-b")
        # this turn fetches the spilled blocks at use; the plans of its cycles keep (or stage
        # again) those the next cycles want, on the worker's node
        second = worker.ask("big", tokens(6, 81), params).result(timeout=60)
        assert second.token_ids == first.token_ids
        assert reporter.flush(10)
        wanted = set(indexer.plans["big"].blocks) & set(spilled)
        assert wanted  # the plan wants spilled blocks (sinks are local; the recent tail was spilled)
        staged = set(a.staged.get("big", {}))
        assert wanted <= staged  # staged on the worker's node after the plan was reported
        use_before = a.stats().blocks_fetched_at_use
        third = worker.ask("big", tokens(6, 81), params).result(timeout=60)
        assert third.token_ids == first.token_ids == reference_lsa(model, cfg, context + tokens(6, 81), params)
        fetched_at_use = a.stats().blocks_fetched_at_use - use_before
        assert fetched_at_use == len(set(spilled) - staged) < len(spilled)  # planned blocks: zero at use
        assert planned and staged <= set(spilled)  # only spilled blocks are staged copies
        # under pressure, the idle session's staged copies go first: nothing spilled or evicted
        before = a.stats()
        kept = before.staged_blocks
        assert kept > 0
        ids = a.lease("probe", before.free_blocks + kept)
        after = a.stats()
        assert after.staged_blocks == 0 and after.blocks_spilled == before.blocks_spilled
        assert after.evictions == before.evictions == 0
        a.give_back("probe", ids)
    finally:
        worker.close()


def reference_lsa(model, cfg, ids, params):
    engine = LLMEngine(model, cfg)
    return engine.generate([ids], params)[0].token_ids
