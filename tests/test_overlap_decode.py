"""Overlapped decode (engine/llm.py): a decode step launched with the step before's tokens still
on the device gives the same tokens, stops and finish reasons as the synchronous engine; what
it cannot overlap (hooks, sampled rows, a batch that changes) runs synchronously; a failure in
a launched step fails its rows after the step in flight has landed; nothing leaks."""
from dataclasses import replace

import pytest
import torch

from engine.config import PolicyConfig
from engine.graphs import DecodeGraphRunner
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
from engine.scheduler import DecodeBatch
from engine.sequence import Status
from tiny import engine_config, tokens

SEED = 5  # the conftest's model fixture (TINY)
# LSA with every first boundary a cycle away: its plans do not depend on the batch (which overlap
# changes: a finishing sequence stays one step more), so that the answers can be compared exactly
POLICIES = [dict(name="full"), dict(name="lsa", budget=0.3, cycle=4, stagger_boundaries=False),
            dict(name="streaming", budget=0.3)]


def make_engine(model, overlap: bool, policy: dict, graphs: bool = False) -> LLMEngine:
    cfg = engine_config(policy=PolicyConfig(**policy, min_resident_tokens=0))
    cfg = replace(cfg, scheduler=replace(cfg.scheduler, overlap_decode=overlap))
    engine = LLMEngine(model, cfg)
    if graphs:  # the static-buffer forward of the CUDA graphs, run eagerly on the CPU
        engine.runner.graphs = DecodeGraphRunner(engine.runner, capture=False)
    engine.fed_steps = 0  # decode steps launched with the tokens in flight as their input
    engine.decode_steps = 0
    run = engine.runner.run

    def counting(batch, fed=None):
        engine.fed_steps += fed is not None
        engine.decode_steps += isinstance(batch, DecodeBatch)
        return run(batch, fed)

    engine.runner.run = counting
    return engine


def assert_nothing_held(engine: LLMEngine) -> None:
    assert not engine.cache.blocks.seqs and not engine.scheduler.running
    for group in engine.cache.blocks.device:
        assert group.num_free == engine.cache.blocks.num_device_blocks


def drive(engine: LLMEngine, eos_prompt: list[int]):
    """Requests of several lengths and max_tokens, one stopped by EOS, one arriving while the
    others decode, one aborted mid-answer."""
    specs = [(tokens(50, 1), 30), (tokens(70, 2), 12), (eos_prompt, 40), (tokens(33, 3), 25)]
    seqs = [engine.add_request(p, SamplingParams(max_tokens=m)) for p, m in specs]
    for _ in range(6):
        engine.step()
    seqs.append(engine.add_request(tokens(90, 9), SamplingParams(max_tokens=21)))
    for _ in range(4):
        engine.step()
    engine.abort(seqs[3])
    while engine.has_work():
        engine.step()
    engine.step()  # nothing left: a step in flight (if any) lands
    return seqs


@pytest.fixture()
def eos_model(model):
    """The model, its EOS id set by the test (restored after)."""
    yield model
    model.config = replace(model.config, eos_token_ids=(2,))


def set_eos_reached(model, policy: dict, graphs: bool) -> None:
    """Give ``model`` an EOS id that the answer to ``tokens(40, 7)`` in ``drive`` reaches at
    its 9th token or later (found without an EOS)."""
    model.config = replace(model.config, eos_token_ids=())
    out = drive(make_engine(model, False, policy, graphs), tokens(40, 7))[2].output_ids
    model.config = replace(model.config, eos_token_ids=(next(t for t in out[8:] if t not in out[:8]),))


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("policy", POLICIES, ids=[p["name"] for p in POLICIES])
def test_overlapped_decode_answers_as_the_synchronous_engine(eos_model, policy, graphs):
    set_eos_reached(eos_model, policy, graphs)
    sync, overlapped = make_engine(eos_model, False, policy, graphs), make_engine(eos_model, True, policy, graphs)
    want, got = drive(sync, tokens(40, 7)), drive(overlapped, tokens(40, 7))
    kept = [0, 1, 2, 4]  # the aborted one (3) stops a token earlier: the tokens land a step later
    assert [got[i].output_ids for i in kept] == [want[i].output_ids for i in kept]
    cut = got[3].output_ids
    assert cut == want[3].output_ids[: len(cut)] and len(want[3].output_ids) - 1 <= len(cut) <= len(want[3].output_ids)
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    assert want[2].finish_reason == "stop" and want[3].finish_reason == "abort"  # (others may meet the EOS too)
    assert len(got[2].output_ids) < 12  # EOS ended it early
    assert sync.fed_steps == 0
    # every decode step whose batch was the step before's ran overlapped: most of them
    assert overlapped.fed_steps >= overlapped.decode_steps // 2
    assert_nothing_held(sync)
    assert_nothing_held(overlapped)


def test_hooks_and_sampled_rows_run_synchronously(model):
    engine = make_engine(model, True, POLICIES[0])
    seen = []
    engine.hooks.append(LogitsObserver(lambda seq, row: seen.append(seq.seq_id)))
    engine.generate([tokens(30, 4)], SamplingParams(max_tokens=10, ignore_eos=True))
    assert engine.fed_steps == 0 and len(seen) == 10  # the hook saw every token
    engine.hooks.clear()
    sampled = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=3)
    penalized = SamplingParams(max_tokens=10, ignore_eos=True, presence_penalty=0.5)
    for params in (sampled, penalized):
        out = engine.generate([tokens(30, 4)], params)[0].token_ids
        assert engine.fed_steps == 0
        assert out == make_engine(model, False, POLICIES[0]).generate([tokens(30, 4)], params)[0].token_ids
    # a greedy row alone overlaps; beside a sampled row the batch runs synchronously
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    engine.generate([tokens(30, 4)], greedy)
    assert engine.fed_steps > 0
    engine.fed_steps = 0
    a, b = engine.add_request(tokens(30, 4), greedy), engine.add_request(tokens(20, 5), sampled)
    while engine.has_work():
        engine.step()
    assert engine.fed_steps == 0 and len(a.output_ids) == len(b.output_ids) == 10
    assert_nothing_held(engine)


def test_a_failed_launch_fails_its_rows_after_the_step_in_flight_lands(model):
    engine = make_engine(model, True, POLICIES[1])
    want = make_engine(model, False, POLICIES[1]).generate(
        [tokens(60, 6)], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    run = engine.runner.run

    def failing(batch, fed=None):
        if fed is not None and engine.fed_steps >= 5:
            raise RuntimeError("device lost")
        return run(batch, fed)

    engine.runner.run = failing
    seq = engine.add_request(tokens(60, 6), SamplingParams(max_tokens=20, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "error" and "device lost" in str(seq.error)
    assert seq.output_ids == want[: len(seq.output_ids)] and 5 < len(seq.output_ids) < 20  # the landed tokens kept
    engine.runner.run = run
    assert engine.generate([tokens(60, 6)], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids == want
    assert_nothing_held(engine)


def test_the_step_in_flight_is_read_before_a_new_request_joins(model):
    """A request that arrives while a step is in flight: that step lands first (its tokens are
    streamed), the newcomer prefills, and the batch overlaps again once it is stable."""
    engine = make_engine(model, True, POLICIES[0])
    first = engine.add_request(tokens(40, 8), SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(8):
        engine.step()
    assert engine._in_flight is not None and first.status is Status.DECODE
    had = len(first.output_ids)
    second = engine.add_request(tokens(25, 9), SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    assert engine._in_flight is None and second.status is Status.DECODE
    assert len(first.output_ids) == had + 2  # the step in flight landed, then this step's decode ran
    fed = engine.fed_steps
    while engine.has_work():
        engine.step()
    assert engine.fed_steps > fed
    ref = make_engine(model, False, POLICIES[0])
    r1 = ref.add_request(tokens(40, 8), SamplingParams(max_tokens=30, ignore_eos=True))
    r2 = ref.add_request(tokens(25, 9), SamplingParams(max_tokens=30, ignore_eos=True))
    while ref.has_work():
        ref.step()
    assert first.output_ids == r1.output_ids and second.output_ids == r2.output_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the default there: graphs and overlap on)")
@pytest.mark.parametrize("policy", POLICIES[:2], ids=[p["name"] for p in POLICIES[:2]])
def test_overlap_on_cuda_with_graphs_answers_as_without(policy):
    """On CUDA the engine's defaults (captured decode graphs, overlapped decode) against the
    same engine with overlap off: the same answers, fp32."""
    from tiny import tiny_model

    model = tiny_model(device="cuda")
    sync, overlapped = make_engine(model, False, policy), make_engine(model, None, policy)
    assert overlapped.overlap_decode and overlapped.runner.graphs is not None and overlapped.runner.graphs.capture
    want, got = drive(sync, tokens(40, 7)), drive(overlapped, tokens(40, 7))
    kept = [0, 1, 2, 4]
    assert [got[i].output_ids for i in kept] == [want[i].output_ids for i in kept]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    assert overlapped.fed_steps >= overlapped.decode_steps // 2 and sync.fed_steps == 0
    assert_nothing_held(sync)
    assert_nothing_held(overlapped)


def test_a_sequence_finishing_under_a_step_in_flight_waits_for_its_host_rows(model):
    """A sequence that finishes while the next step is in flight hands its blocks on (a session's,
    prefix blocks, the pool) only after that step's writes into their host rows have landed:
    its release waits for the mirror's writes; without a step in flight it does not."""
    waits = {}
    for overlap in (False, True):
        engine = make_engine(model, overlap, POLICIES[1])
        calls = []
        wait = engine.cache.mirror.wait_writes
        engine.cache.mirror.wait_writes = lambda: calls.append(engine._in_flight is not None) or wait()
        engine.generate([tokens(60, 6)], SamplingParams(max_tokens=20, ignore_eos=True))
        waits[overlap] = calls
        assert_nothing_held(engine)
    assert True not in waits[False]
    assert waits[True].count(True) == 1  # the one sequence, finishing with its extra step in flight
