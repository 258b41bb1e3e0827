"""A tensor-parallel rank's sessions (actors/tp_sessions.py) without Ray: one rank (P = 1, no
process group) driven as the replica drives every rank, against the one-GPU decode worker
(``DecodeWorkerCore`` over a node store) for the same session turns, LSA with Level-1 from the
indexer. The 2-rank case over Ray and Serve is in tests/test_tp_ray.py."""
from __future__ import annotations

import functools

import pytest
import torch

from actors.decode_worker import DecodeWorkerCore
from actors.kv_store import KVStoreCore, arena_path
from actors.tp_sessions import SessionRank
from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError, RequestCancelled, SessionNotFound
from engine.host_arena import ArenaLayout
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams

BLOCK = 16
LLAMA = ModelConfig(architecture="llama", vocab_size=67, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_ids=(2,))
CONFIG = EngineConfig(device="cpu", dtype="fp32", cache=CacheConfig(block_size=BLOCK, num_device_blocks=64),
                      scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=64),
                      policy=PolicyConfig(name="lsa", budget=0.4, cycle=4, tail_tokens=16, neighbors=0,
                                          first_plan="indexer", min_resident_tokens=0))
STORE_BYTES = 4 << 20
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
make_model = functools.partial(random_model, LLAMA, seed=3)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, LLAMA.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CONTEXT, QUESTIONS = tokens(200, 1), [tokens(7, 2), tokens(5, 3)]


def one_gpu_turns(tmp_path) -> list[tuple[list[int], int, int]]:
    """The one-GPU worker's answers to the session's questions: (tokens, prefilled, cached)."""
    layout = ArenaLayout.of(LLAMA, BLOCK, torch.float32)
    store = KVStoreCore("n", layout, STORE_BYTES, arena_path("ref", "n", str(tmp_path)))
    core = DecodeWorkerCore.build(lambda arena: LLMEngine(make_model("cpu", torch.float32), CONFIG, arena=arena),
                                  store, "w")
    try:
        core.create_session("doc", CONTEXT).result(timeout=120)
        answers = [core.ask("doc", q, PARAMS).result(timeout=120) for q in QUESTIONS]
        return [(a.token_ids, a.prefill_tokens, a.cached_tokens) for a in answers]
    finally:
        core.close()
        store.close()


def run(rank: SessionRank, request_id: str) -> dict:
    """Step until ``request_id`` finishes: its tokens and its last update."""
    out = []
    while True:
        for update in rank.step():
            if update.request_id == request_id:
                out += update.new_token_ids
                if update.finished is not None:
                    return {"tokens": out, "finished": update.finished}


@pytest.fixture()
def rank(tmp_path, monkeypatch):
    monkeypatch.setenv("LSA_KV_DIR", str(tmp_path))
    rank = SessionRank(0, 1)
    rank.build(make_model, CONFIG, store_bytes=STORE_BYTES)
    yield rank
    rank.close()


def test_session_turns_are_the_one_gpu_workers_and_load_the_context(rank, tmp_path):
    free = rank.store.stats().free_blocks
    assert not list(tmp_path.glob("*.arena"))  # unlinked once mapped
    rank.create_session("doc", CONTEXT, "c")
    created = run(rank, "c")["finished"]
    assert created.error is None and created.prefill_tokens == len(CONTEXT)
    assert rank.store.stats().session_blocks == len(CONTEXT) // BLOCK

    answers = []
    for i, question in enumerate(QUESTIONS):
        rank.ask("doc", question, PARAMS, f"a{i}")
        got = run(rank, f"a{i}")
        finished = got["finished"]
        answers.append((got["tokens"], finished.prefill_tokens, finished.cached_tokens))
        assert finished.prompt_tokens == len(CONTEXT) + len(question)
        # most of the context loaded, not prefilled (LSA prefills its first plan's window again)
        assert finished.prefill_tokens == finished.prompt_tokens - finished.cached_tokens < len(CONTEXT) // 2
    assert answers == one_gpu_turns(tmp_path)

    assert rank.store_report(["doc", "other"])[1] == ["doc"]
    assert rank.delete_session("doc") and not rank.delete_session("doc")
    assert rank.store.stats().free_blocks == free and rank.store.stats().leased_blocks == 0
    with pytest.raises(SessionNotFound):
        rank.ask("doc", QUESTIONS[0], PARAMS, "a9")


def test_refusals_leave_the_store_as_it_was(rank):
    rank.create_session("doc", CONTEXT, "c")
    run(rank, "c")
    before = rank.store.stats()
    with pytest.raises(InvalidRequestError):
        rank.ask("doc", [], PARAMS, "empty")  # pinned, then refused: unpinned again
    with pytest.raises(InvalidRequestError):
        rank.ask("doc", [LLAMA.vocab_size], PARAMS, "bad")  # out of the vocabulary: refused by the engine
    with pytest.raises(InvalidRequestError):
        rank.create_session("doc", CONTEXT, "again")
    assert rank.store.stats() == before and rank.store.table.records["doc"].pins == 0


def test_deleting_a_session_cancels_its_turn_and_frees_its_blocks(rank):
    free = rank.store.stats().free_blocks
    rank.create_session("doc", CONTEXT, "c")
    run(rank, "c")
    rank.ask("doc", QUESTIONS[0], SamplingParams(max_tokens=200, ignore_eos=True), "long")
    rank.step()
    assert rank.delete_session("doc")
    finished = run(rank, "long")["finished"]
    assert isinstance(finished.error, RequestCancelled)
    assert rank.store.stats().free_blocks == free and not rank.engine.has_work()


def test_stateless_requests_lease_and_give_back(rank):
    free = rank.store.stats().free_blocks
    rank.add_request(tokens(90, 5), PARAMS, "g")
    got = run(rank, "g")
    assert len(got["tokens"]) == PARAMS.max_tokens and got["finished"].cached_tokens == 0
    assert rank.store.stats().free_blocks == free


# ------------------------------------------------------ the replica's core and deployment over one rank

class OneRankGroup:
    """TensorParallelEngine's lockstep calls, on one in-process rank (refusals raised as themselves)."""

    size, failure = 1, None

    def __init__(self, rank: SessionRank):
        self.rank = rank

    def __getattr__(self, method: str):
        return getattr(self.rank, method)

    def shutdown(self) -> None:
        pass


class Indexer:
    class report_worker:  # noqa: N801 - a Ray actor method's shape
        reports: list = []

        @classmethod
        def remote(cls, replica, stats):
            cls.reports.append(stats)


def test_the_replica_serves_sessions_and_publishes_them(rank):
    import asyncio

    from actors.tp_deployment import TensorParallelWorker
    from actors.tp_worker import TensorParallelWorkerCore

    core = TensorParallelWorkerCore(OneRankGroup(rank), node_id="n1", vocab_size=LLAMA.vocab_size)
    worker = object.__new__(TensorParallelWorker.func_or_class)
    worker.core, worker.call_timeout_s, worker.held, worker.indexer = core, 60, set(), Indexer
    worker.replica, worker.node_id = "r1", "n1"
    try:
        empty = asyncio.run(worker.record_routing_stats())
        assert empty["sessions"] == [] and empty["free_kv_bytes"] > 0
        created = asyncio.run(worker.create_session("doc", CONTEXT))
        assert created.held and created.prefill_tokens == len(CONTEXT) and created.replica == "r1"
        first = asyncio.run(worker.ask("doc", QUESTIONS[0], PARAMS))
        assert first.held and first.cached_tokens > 0 and len(first.token_ids) == PARAMS.max_tokens
        async def streamed():
            return [item async for item in worker.ask_stream("doc", QUESTIONS[0], PARAMS)]

        *pieces, last = asyncio.run(streamed())
        assert "".join(pieces) == last.text == first.text and last.token_ids == first.token_ids and last.held
        stats = asyncio.run(worker.record_routing_stats())
        assert stats["sessions"] == ["doc"] and stats["free_kv_bytes"] < empty["free_kv_bytes"]
        report = Indexer.report_worker.reports[-1]
        assert report.sessions == 1 and report.cached_tokens == 2 * first.cached_tokens and report.store.sessions == 1
        assert asyncio.run(worker.delete_session("doc"))
        with pytest.raises(SessionNotFound):
            asyncio.run(worker.ask("doc", QUESTIONS[0], PARAMS))
        assert asyncio.run(worker.record_routing_stats()) == empty
    finally:
        core.close()
