"""One bad request harms no one else; failures are typed FINAL or retryable; a cancelled request
frees its sequence before the next step (engine and decode worker, no Ray)."""
import time
from dataclasses import replace

import pytest
import torch

from actors.decode_worker import DecodeWorkerCore
from actors.kv_store import KVStoreCore, arena_path
from engine.errors import CacheFullError, PromptTooLongError, RequestCancelled, SessionNotFound, http_error
from engine.factory import ByteTokenizer
from engine.host_arena import ArenaLayout
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
import tiny
from tiny import BYTES, engine_config
from engine.sequence import Status

BLOCK = 8
LAYOUT = ArenaLayout.of(BYTES, BLOCK, torch.float32)
LONG = SamplingParams(max_tokens=120, ignore_eos=True)


MODEL, SEED = BYTES, 3  # the conftest's model fixture


def config(**scheduler):
    cfg = engine_config(BLOCK)
    return replace(cfg, scheduler=replace(cfg.scheduler, **scheduler))


def tokens(n, seed):
    return tiny.tokens(n, seed, BYTES.vocab_size, low=4)


def poisoned(**fields) -> SamplingParams:
    """Parameters that got past validation (a bug elsewhere): the engine must still contain them."""
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.7)
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def reference(model, ids, params):
    return LLMEngine(model, config(), ByteTokenizer()).generate([ids], params)[0].token_ids


def test_a_bad_sequence_fails_alone_and_the_others_complete(model):
    engine = LLMEngine(model, config(), ByteTokenizer())
    good = [engine.add_request(tokens(30, i), LONG) for i in range(2)]
    for _ in range(5):
        engine.step()
    bad = [engine.add_request(tokens(20, 9), poisoned(stop=(1,))),  # a stop string that is not a string
           engine.add_request(tokens(20, 10), poisoned(top_k=1.5))]  # sampling fails on its row
    while engine.has_work():
        engine.step()
    for seq in bad:
        assert seq.status is Status.FINISHED and seq.finish_reason == "error" and seq.error is not None
    assert [s.output_ids for s in good] == [reference(model, tokens(30, i), LONG) for i in range(2)]
    assert engine.cache.accounting().num_tokens == 0  # every sequence's KV was released


def test_a_failed_request_is_raised_by_generate(model):
    engine = LLMEngine(model, config(), ByteTokenizer())
    with pytest.raises(TypeError):
        engine.generate([tokens(10, 1)], poisoned(stop=(1,)))


@pytest.fixture()
def worker(tmp_path, model):
    store = KVStoreCore("n", LAYOUT, 80 * LAYOUT.block_bytes, arena_path("iso", "n", str(tmp_path)))
    core = DecodeWorkerCore.build(lambda arena: LLMEngine(model, config(), ByteTokenizer(), arena=arena), store, "w",
                                  spare_blocks=0)
    yield core
    core.close()


def test_two_long_generations_survive_a_bad_one_on_the_worker(worker, model):
    running = [worker.generate(tokens(30, i), LONG) for i in range(2)]
    time.sleep(0.3)
    bad = worker.generate(tokens(20, 9), poisoned(stop=(1,)))
    with pytest.raises(TypeError):
        bad.result(timeout=60)
    assert [f.result(timeout=60).token_ids for f in running] == [reference(model, tokens(30, i), LONG)
                                                                for i in range(2)]


def test_a_cancelled_request_frees_its_sequence_within_a_step(worker):
    long = worker.generate(tokens(30, 1), SamplingParams(max_tokens=500, ignore_eos=True))
    other = worker.generate(tokens(30, 2), SamplingParams(max_tokens=5, ignore_eos=True))
    deadline = time.monotonic() + 30
    while worker.stats().running < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.cancel(long)
    t0 = time.monotonic()
    while not worker.idle() and time.monotonic() - t0 < 5:
        time.sleep(0.005)
    assert worker.idle() and time.monotonic() - t0 < 1.0  # idle within a second
    assert other.result(timeout=10).finish_reason == "length"
    assert worker.stats().cancelled == 1 and worker.store.stats().leased_blocks == worker.sessions._held


def test_delete_cancels_the_running_turn_then_deletes(worker):
    worker.create_session("doc", tokens(100, 3)).result(timeout=60)
    turn = worker.ask("doc", tokens(5, 4), SamplingParams(max_tokens=500, ignore_eos=True))
    while worker.stats().running < 1:
        time.sleep(0.01)
    assert worker.delete_session("doc").result(timeout=10)
    with pytest.raises(RequestCancelled):
        turn.result(timeout=5)
    assert worker.idle()
    time.sleep(0.2)  # the spare blocks go back on the settling thread
    assert worker.store.stats().sessions == 0 and worker.store.stats().free_blocks == 80
    with pytest.raises(SessionNotFound):
        worker.ask("doc", [5], LONG).result(timeout=10)


def test_never_fits_is_final_and_a_full_arena_is_overloaded(worker):
    arena_tokens = 80 * BLOCK
    with pytest.raises(PromptTooLongError) as long:  # over the arena: can never succeed
        worker.generate(tokens(arena_tokens + 5, 1), LONG).result(timeout=10)
    assert http_error(long.value).status == 400 and "host KV arena" in long.value.message
    with pytest.raises(PromptTooLongError) as huge:  # max_tokens over the context: never
        worker.generate(tokens(10, 1), SamplingParams(max_tokens=10**6)).result(timeout=10)
    assert huge.value.param == "max_tokens"
    # max_tokens above the room the prompt leaves is capped, not refused
    capped = worker.generate(tokens(arena_tokens - 12, 2), SamplingParams(max_tokens=500, ignore_eos=True))
    assert len(capped.result(timeout=120).token_ids) == 12
    # load that passes: a session in use fills the arena, another request must wait and retry
    worker.create_session("big", tokens(60 * BLOCK, 5)).result(timeout=60)
    turn = worker.ask("big", tokens(5, 6), SamplingParams(max_tokens=600, ignore_eos=True))
    with pytest.raises(CacheFullError) as full:
        worker.generate(tokens(30 * BLOCK, 7), SamplingParams(max_tokens=8)).result(timeout=10)
    answer = http_error(full.value)
    assert answer.status == 429 and "Retry-After" in answer.headers
    worker.cancel(turn)
    deadline = time.monotonic() + 10  # the turn unpins its session and gives its blocks back, then it fits
    while (not worker.idle() or worker.store.stats().leased_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.generate(tokens(30 * BLOCK, 7), SamplingParams(max_tokens=8)).result(timeout=60)


def test_an_arena_smaller_than_the_context_warns_at_start(tmp_path, model):
    store = KVStoreCore("n", LAYOUT, 20 * LAYOUT.block_bytes, arena_path("warn", "n", str(tmp_path)))
    core = DecodeWorkerCore.build(lambda arena: LLMEngine(model, config(), ByteTokenizer(), arena=arena), store, "w")
    try:
        assert core.warnings and "160 tokens" in core.warnings[0] and core.stats().warnings == core.warnings
    finally:
        core.close()


def test_a_cuda_worker_over_an_arena_it_could_not_page_lock_warns_at_start(tmp_path, model):
    """Copies from a pageable arena are gathered on the host and far below PCIe speed: the
    operator reads why in /health. (A CPU worker never page-locks: no warning.)"""
    store = KVStoreCore("n", LAYOUT, 400 * LAYOUT.block_bytes, arena_path("pin", "n", str(tmp_path)))
    core = DecodeWorkerCore.build(lambda arena: LLMEngine(model, config(), ByteTokenizer(), arena=arena), store, "w")
    try:
        assert not any("page-locked" in w for w in core.warnings)
        core.engine.cache.device = torch.device("cuda", 0)  # as a CUDA engine whose registration was refused
        assert core.engine.cache.mirror.pinned is False
        assert any("not page-locked" in w and "/dev/shm" in w for w in core._capacity_warnings())
    finally:
        core.close()
