"""Prefix KV reuse: block hash chains (engine/prefix.py), prefix blocks in a node store beside
sessions, a stateless chat whose turns prefill only their new tokens (decode worker, no Ray),
and the router sending a prompt to the replica that holds its longest prefix."""
import asyncio
import time
from dataclasses import replace

import pytest
import torch
from ray.serve._private.request_router.common import RequestRoutingContext

from actors.decode_worker import DecodeWorkerCore
from actors.kv_store import KVStoreCore, arena_path
from actors.session_table import SessionTable
from cluster.router import KVLocalityRouter
from engine.factory import ByteTokenizer
from engine.host_arena import ArenaLayout
from engine.llm import LLMEngine
from engine.prefix import block_hashes, routing_depths, routing_keys
from engine.sampling import SamplingParams
import tiny
from tiny import BYTES, engine_config

BLOCK = 8
MODEL, SEED = replace(BYTES, max_position_embeddings=2048), 5  # the conftest's model fixture
LAYOUT = ArenaLayout.of(MODEL, BLOCK, torch.float32)
ANSWER = SamplingParams(max_tokens=6, ignore_eos=True)


def config(overlap: bool = False):
    cfg = engine_config(BLOCK, 400, prefill_chunk=256)
    return replace(cfg, scheduler=replace(cfg.scheduler, overlap_decode=overlap))


def tokens(n, seed):
    return tiny.tokens(n, seed, BYTES.vocab_size, low=4)


def test_block_hash_chains_name_a_block_and_everything_before_it():
    a, b = tokens(40, 1), tokens(40, 1)
    b[20] += 1  # differs in block 2
    ha, hb = block_hashes(a, BLOCK), block_hashes(b, BLOCK)
    assert len(ha) == 5 and ha[:2] == hb[:2] and all(x != y for x, y in zip(ha[2:], hb[2:]))
    assert block_hashes(a + [7, 7], BLOCK) == ha  # a partial block has no key
    assert routing_depths(9) == [1, 2, 4, 8] and routing_keys(ha) == [ha[0], ha[1], ha[3]]


def test_prefix_blocks_are_evicted_before_sessions_and_never_while_pinned():
    table = SessionTable(10, 1)
    ids = table.lease("w", 6)
    table.put("w", "s", list(range(16)), ids[:2])
    keys = block_hashes(tokens(32, 2), BLOCK)
    assert table.put_prefix("w", keys, ids[2:6]) == 4
    assert table.match_prefix(keys[:2] + ["other"]) == ids[2:4]  # pinned: the first two
    table.lease("x", 6)  # needs 2 more than are free: idle prefix blocks go, pinned ones and the session stay
    assert "s" in table.records and keys[0] in table.prefix and keys[1] in table.prefix
    table.unpin_prefix(keys[:2])
    table.lease("x", 2)
    assert not table.prefix and "s" in table.records


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def worker(tmp_path, model, request):
    store = KVStoreCore("n", LAYOUT, 400 * LAYOUT.block_bytes, arena_path("prefix", "n", str(tmp_path)))
    core = DecodeWorkerCore.build(lambda arena: LLMEngine(model, config(request.param), ByteTokenizer(), arena=arena),
                                  store, "w", spare_blocks=0)
    core.overlap = request.param
    yield core
    core.close()


def test_a_chat_prefills_only_its_new_tokens_each_turn(worker, model):
    """Each turn's prompt is the last turn's prompt, its answer and a new message; the answer
    equals a fresh engine's, and only the tokens after the held blocks are prefilled. With
    overlapped decode the answer's last token was fed too (the step past the end): its KV is
    kept as well."""
    fresh = LLMEngine(model, config(), ByteTokenizer())
    prompt = tokens(600, 3)
    held = 0  # tokens of complete blocks the store holds for this conversation
    for turn in range(10):
        out = worker.generate(prompt, ANSWER).result(timeout=120)
        assert out.token_ids == fresh.generate([prompt], ANSWER)[0].token_ids
        cached = min(held, (len(prompt) - 1) // BLOCK * BLOCK)
        assert out.cached_tokens == cached and out.prefill_tokens == len(prompt) - cached
        if turn:
            assert out.prefill_tokens < BLOCK + 6 + 11  # the partial block, the last answer, the new message
        # its KV: the answer but its last token (overlapped decode: all of it)
        held = (len(prompt) + len(out.token_ids) - (not worker.overlap)) // BLOCK * BLOCK
        prompt = prompt + out.token_ids + tokens(5 + turn, 100 + turn)
    deadline = time.monotonic() + 5
    while worker.store.stats().leased_blocks and time.monotonic() < deadline:  # given back after the answer
        time.sleep(0.01)
    stats = worker.store.stats()
    assert stats.prefix_hits == 9 and stats.leased_blocks == 0 and worker.idle()
    assert worker.held_prefix_keys()  # what the router is told


def test_a_turn_hashes_each_block_of_its_prompt_and_answer_once(worker, monkeypatch):
    """The worker hashes a prompt's blocks at admission (to match held prefix blocks) and, when
    the request ends, only the answer's blocks after them (to keep them): never the prompt again,
    which at 128K tokens was milliseconds a turn."""
    import actors.decode_worker as decode_worker

    hashed = []

    def counting(token_ids, block_size, max_blocks=None, known=()):
        keys = block_hashes(token_ids, block_size, max_blocks, known)
        hashed.append(len(keys) - len(known[: len(keys)]))
        return keys

    monkeypatch.setattr(decode_worker, "block_hashes", counting)
    prompt = tokens(600, 4)
    worker.generate(prompt, ANSWER).result(timeout=120)
    out = worker.generate(prompt + tokens(20, 5), ANSWER).result(timeout=120)
    kept = (len(prompt) + 20 + len(out.token_ids) - (not worker.overlap)) // BLOCK
    assert out.cached_tokens and sum(hashed[2:]) == kept  # the second turn: each of its blocks once


def test_the_router_hashes_a_prompt_once_per_request(monkeypatch):
    import cluster.router as router_module

    calls = []
    monkeypatch.setattr(router_module, "block_hashes", lambda *a, **k: calls.append(1) or block_hashes(*a, **k))
    router = KVLocalityRouter.__new__(KVLocalityRouter)
    router.initialize_state()
    a = _Replica("a", {"sessions": [], "prefixes": [], "free_kv_bytes": 100})
    router._replicas, router._replicas_list = {a.replica_id: a}, [a]
    pending = _Pending(tokens(400, 1))
    for _ in range(3):  # Serve asks again while every replica is busy
        asyncio.run(router.choose_replicas([a], pending))
    router.on_request_routed(pending, a.replica_id, None)
    assert len(calls) == 1 and not router._prompt_keys


class _Meta:
    def __init__(self, session_id=""):
        self.session_id = session_id


class _Pending:
    def __init__(self, prompt_ids):
        self.metadata, self.kwargs, self.args = _Meta(), {"prompt_ids": prompt_ids}, ()
        self.routing_context = RequestRoutingContext()


class _Replica:
    def __init__(self, uid, stats):
        self.replica_id = type("RID", (), {"unique_id": uid})()
        self.routing_stats, self.replica_metadata = stats, {"block_size": BLOCK, "kv_capacity_bytes": 10_000}


def test_the_router_sends_a_prompt_to_the_holder_of_its_longest_prefix():
    router = KVLocalityRouter.__new__(KVLocalityRouter)  # the ranking logic alone
    router.initialize_state()
    doc_a, doc_b = tokens(200, 1), tokens(200, 2)
    a = _Replica("a", {"sessions": [], "prefixes": routing_keys(block_hashes(doc_a, BLOCK)), "free_kv_bytes": 100})
    b = _Replica("b", {"sessions": [], "prefixes": [], "free_kv_bytes": 900})
    router._replicas = {r.replica_id: r for r in (a, b)}
    router._replicas_list = [a, b]
    choose = lambda prompt: asyncio.run(router.choose_replicas([a, b], _Pending(prompt)))  # noqa: E731
    assert choose(doc_a + tokens(30, 9)) == [[a], [b]]  # a holds its prefix, though b has more room
    assert choose(doc_b) == [[b], [a]]  # no holder: a has less than half b's room
    router.on_request_routed(_Pending(doc_b), b.replica_id, None)
    assert choose(doc_b + tokens(10, 8)) == [[b], [a]]  # the router's own record, before any stats
    # two interleaved conversations each stay with their holder
    for turn in range(3):
        assert choose(doc_a + tokens(8 * turn, 20))[0] == [a] and choose(doc_b + tokens(8 * turn, 30))[0] == [b]
    assert choose(doc_a[:8] + tokens(192, 4))[0] == [b]  # one shared block of 25: too little to attract
    # no holder and room on both: one rank, in which Serve picks the shorter queue; the replica this
    # router placed fewer prompts on first (b holds doc_b's conversation, c nothing yet)
    c = _Replica("c", {"sessions": [], "prefixes": [], "free_kv_bytes": 700})
    router._replicas[c.replica_id] = c
    router._replicas_list.append(c)
    choose3 = lambda prompt: asyncio.run(router.choose_replicas([a, b, c], _Pending(prompt)))  # noqa: E731
    ranks = choose3(tokens(50, 6))
    assert [r.replica_id.unique_id for r in ranks[0]] == ["c", "b"] and ranks[1:] == [[a]]
    router.on_request_routed(_Pending(tokens(50, 6)), c.replica_id, None)  # a new conversation lands on c
    doc_c = tokens(200, 3)
    router.on_request_routed(_Pending(doc_c), c.replica_id, None)  # and another: c now holds more than b
    assert [r.replica_id.unique_id for r in choose3(tokens(50, 7))[0]] == ["b", "c"]
    assert choose3(doc_c + tokens(10, 8))[0] == [c]  # c's own conversation still goes to c


def test_new_conversations_on_equal_replicas_are_spread_at_random():
    """Replicas with room and no prompts placed by this router: one rank in random order (Serve
    takes the first of equal queues, so a fixed order would always give the same replica)."""
    router = KVLocalityRouter.__new__(KVLocalityRouter)
    router.initialize_state()
    b = _Replica("b", {"sessions": [], "prefixes": [], "free_kv_bytes": 900})
    c = _Replica("c", {"sessions": [], "prefixes": [], "free_kv_bytes": 700})
    router._replicas = {r.replica_id: r for r in (b, c)}
    router._replicas_list = [b, c]
    firsts = set()
    for _ in range(40):
        ranks = asyncio.run(router.choose_replicas([b, c], _Pending(tokens(50, 6))))
        assert sorted(r.replica_id.unique_id for r in ranks[0]) == ["b", "c"] and len(ranks) == 1
        firsts.add(ranks[0][0].replica_id.unique_id)
    assert firsts == {"b", "c"}
