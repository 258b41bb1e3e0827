"""Blocks between node stores in batches (actors/kv_store.py, actors/session_store.py), without Ray:
a session spilled and staged back in many small batches answers as a local one and leaves no
block behind; two stages of one session fetch each block once; a spill that a turn overtakes
moves nothing; arena runs round-trip between arenas of any ids."""
import threading

import pytest
import torch

import actors.session_store as session_store
from actors.decode_worker import DecodeWorkerCore
from actors.kv_store import KVStoreCore, arena_path
from actors.messages import SPILLED
from actors.session_store import LocalStores
from engine.host_arena import ArenaLayout, HostArena
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
from tiny import TINY, engine_config, tokens  # noqa: E402

BLOCK = 8
LAYOUT = ArenaLayout.of(TINY, BLOCK, torch.float32)
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture()
def stores(tmp_path, monkeypatch):
    """Two stores that stage from each other (no spilling on their own); batches of 3 blocks."""
    monkeypatch.setattr(session_store, "BATCH_BYTES", 3 * LAYOUT.block_bytes)
    made = {}
    for node_id, blocks in (("a", 60), ("b", 200)):
        made[node_id] = KVStoreCore(node_id, LAYOUT, blocks * LAYOUT.block_bytes,
                                    arena_path("pool", node_id, str(tmp_path)), LocalStores(made, spill=False))
    return made


def held_session(store: KVStoreCore, session_id: str, num_blocks: int) -> list[int]:
    """A session of ``num_blocks`` blocks of random bytes (no model); returns its host ids."""
    ids = store.lease("maker", num_blocks)
    for region in store.arena._byte_regions():
        region[ids] = torch.randint(0, 255, (num_blocks, region.shape[1]), dtype=torch.uint8)
    store.put("maker", session_id, list(range(num_blocks * BLOCK)), ids)
    return ids


@pytest.mark.parametrize("host_dtype", [None, "fp8"])
def test_runs_of_any_ids_round_trip_between_arenas(host_dtype):
    layout = ArenaLayout(2, 2, 8, 4, "bfloat16", host_dtype)
    a, b = HostArena.private(layout, 20), HostArena.private(layout, 20)
    for region in a._byte_regions():
        region.copy_(torch.randint(0, 255, region.shape, dtype=torch.uint8))
    src, dst = [3, 4, 5, 9, 1, 2], [10, 11, 0, 1, 2, 7]
    assert len(a.read_runs(src)) == 3  # one piece per run of consecutive ids, views (no copy)
    for rows in (a.read_runs(src), a.read_bytes(src), a.read(src)):
        b.write(dst, rows)
        assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a.read(src), b.read(dst)))
    assert a.block_bytes == layout.block_bytes


def test_session_staged_back_in_batches_answers_as_a_local_one_and_leaves_no_block(stores, model):
    a, b = stores["a"], stores["b"]
    cfg = engine_config(BLOCK)
    worker = DecodeWorkerCore.build(lambda arena: LLMEngine(model, cfg, arena=arena), a, "wa", spare_blocks=0,
                                    prefetch=a.stage)
    context, question = tokens(200, 6), tokens(7, 8)
    try:
        free = {n: s.stats().free_blocks for n, s in stores.items()}
        worker.create_session("big", context).result(timeout=60)
        original = a.read_blocks(a.view("big").host_ids)
        logical = a.spill_plan("big", 20)  # 20 of 25 blocks, in 7 batches of 3
        assert a.spill("big", logical, "b")
        assert a.view("big").host_ids.count(SPILLED) == 20 and b.stats().foreign_blocks == 20
        r = worker.ask("big", question, GREEDY).result(timeout=60)
        want = LLMEngine(model, cfg).generate([context + question], GREEDY)[0].token_ids
        assert r.token_ids == want and r.prefill_tokens == 200 % BLOCK + len(question)  # staged, not re-prefilled
        stats = a.stats()
        assert stats.blocks_fetched_at_use == 20 and stats.staged_blocks == 20 and stats.stage_s > 0
        same = lambda: all((x == y).all() for x, y in zip(a.read_blocks(a.view("big").host_ids), original))  # noqa: E731
        assert same()  # the staged copies are the bytes spilled; they stay for the next turn...
        a.make_room(a.stats().free_blocks + 20)  # ... until the room is needed: dropped, not moved
        assert a.stats().staged_blocks == 0 and a.stats().blocks_spilled == 0
        assert a.stage("big") == 20 and same()
        worker.delete_session("big").result(timeout=60)
        assert {n: s.stats().free_blocks for n, s in stores.items()} == free  # every block back where it was
        assert b.stats().foreign_blocks == 0 and not any(a.table.leases.values()) and not any(b.table.leases.values())
    finally:
        worker.close()


def test_two_stages_of_one_session_fetch_each_block_once(stores):
    a, b = stores["a"], stores["b"]
    held_session(a, "s", 30)
    logical = a.spill_plan("s", 25)
    assert a.spill("s", logical, "b")
    fetched = []
    threads = [threading.Thread(target=lambda: fetched.append(a.stage("s"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(fetched) == [0, 25] and len(a.staged["s"]) == 25 and a.view("s").complete
    assert {k: len(v) for k, v in a.table.leases.items() if v} == {"stage:s": 25}  # none left landing
    a.delete("s")
    assert a.stats().free_blocks == a.num_blocks and b.stats().free_blocks == b.num_blocks


def test_a_spill_overtaken_by_a_turn_moves_nothing(stores):
    a, b = stores["a"], stores["b"]
    held_session(a, "s", 12)
    before = a.view("s").host_ids

    class PinnedMeanwhile:  # the peer store, and a turn pins the session while the batches travel
        def __getattr__(self, name):
            return getattr(b, name)

        def write_batches(self, owner, batches):
            ids = b.write_batches(owner, batches)
            a.pin("s")
            return ids

    a.stores = LocalStores({"a": a, "b": PinnedMeanwhile()}, spill=False)
    assert not a.spill("s", a.spill_plan("s", 10), "b")
    assert a.view("s").host_ids == before and not a.remote  # the turn reads the blocks it pinned
    assert b.stats().free_blocks == b.num_blocks and b.stats().foreign_blocks == 0  # the peer's copies dropped
