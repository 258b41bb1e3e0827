"""A prompt prefilled once and written into other engines (engine/prompt_state.py) gives every
policy the numbers of its own prefill, bit for bit; bad use is a typed error."""
import pytest
import torch

from engine.config import POLICIES, CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.prompt_state import PromptRecorder, capture_prompt
from engine.sampling import SamplingParams
from tiny import TINY  # noqa: E402



@pytest.fixture(scope="module")
def model():
    return random_model(TINY, "cpu", torch.float32, seed=5)


def engine_for(model, chunk=48, max_num_seqs=3, **policy):
    cfg = EngineConfig(device="cpu", cache=CacheConfig(block_size=16, num_device_blocks=256),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, prefill_chunk=chunk),
                       policy=PolicyConfig(**{"min_resident_tokens": 0, **policy}))
    return LLMEngine(model, cfg)


def recorder_engine(model, chunk=48, window=32):
    cfg = EngineConfig(device="cpu", cache=CacheConfig(block_size=16, num_device_blocks=64, host_mirror=False),
                       scheduler=SchedulerConfig(max_num_seqs=1, prefill_chunk=chunk),
                       policy=PolicyConfig(name="full"))
    return LLMEngine(model, cfg, policy=PromptRecorder(cfg.policy, TINY.num_layers, 16, window))


def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (300, 131, 206)]


def run(engine, ids=None, states=None, max_tokens=16):
    """Greedy tokens and the logits of every step, all prompts decoded together."""
    logits = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: logits.setdefault(seq.seq_id, []).append(row.clone())))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = ([engine.add_request(p, params) for p in ids] if states is None
            else [engine.add_request(None, params, prompt_state=s) for s in states])
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs], [torch.stack(logits[s.seq_id]) for s in seqs], [s.kv for s in seqs]


@pytest.mark.parametrize("name", POLICIES)
def test_a_captured_prompt_gives_the_numbers_of_the_engines_own_prefill(model, name):
    recorder = recorder_engine(model)
    states = [capture_prompt(recorder, p) for p in prompts()]
    assert recorder.cache.blocks.seqs == {}  # the capture engine keeps nothing
    policy = dict(name=name, budget=0.2, cycle=4, stagger_boundaries=False)
    # one sequence at a time: every decode step is the same batch in both runs, so bit for bit
    own_tokens, own_logits, own_kv = run(engine_for(model, max_num_seqs=1, **policy), prompts())
    tokens, logits, kv = run(engine_for(model, max_num_seqs=1, **policy), states=states)
    assert tokens == own_tokens
    for a, b in zip(logits, own_logits):
        assert torch.equal(a, b)
    for a, b in zip(kv, own_kv):
        assert a["device_kv_bytes"] == b["device_kv_bytes"] and a.get("blocks_copied") == b.get("blocks_copied")
    # decoded together, a written-in prompt joins the batch sooner than one prefilled in segments,
    # so the steps batch other rows (float sums in another order): the same tokens, logits within 1e-4
    batched_tokens, batched_logits, _ = run(engine_for(model, **policy), states=states)
    assert batched_tokens == own_tokens
    for a, b in zip(batched_logits, own_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_per_layer_groups_and_a_state_used_twice(model):
    states = [capture_prompt(recorder_engine(model), p) for p in prompts()[:2]]
    policy = dict(name="lsa", budget=0.25, cycle=4, per_layer=True)
    own_tokens, own_logits, _ = run(engine_for(model, max_num_seqs=1, **policy), prompts()[:2])
    engine = engine_for(model, max_num_seqs=1, **policy)
    for _ in range(2):  # a state is read, never consumed
        tokens, logits, _ = run(engine, states=states)
        assert tokens == own_tokens and all(torch.equal(a, b) for a, b in zip(logits, own_logits))


def failure(engine, state) -> Exception | None:
    """The error a request from ``state`` finished with (None if it finished well)."""
    seq = engine.add_request(None, SamplingParams(max_tokens=4, ignore_eos=True), prompt_state=state)
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == ("error" if seq.error is not None else seq.finish_reason)
    return seq.error


def test_bad_uses_are_typed_errors(model):
    state = capture_prompt(recorder_engine(model, window=4), prompts()[0])
    # a state that does not fit the engine fails its own sequence (the engine goes on), typed
    failed = failure(engine_for(model, name="snapkv", budget=0.2), state)
    assert isinstance(failed, InvalidRequestError)
    assert "observes the prompt's last 12 queries; the state holds 4" in str(failed)
    state = capture_prompt(recorder_engine(model), prompts()[0])
    failed = failure(engine_for(model, chunk=64, name="lsa", budget=0.2), state)
    assert isinstance(failed, InvalidRequestError) and "prefill_chunk" in str(failed)
    with pytest.raises(InvalidRequestError, match="differs from the prompt state"):
        engine_for(model, name="full").add_request([5, 6, 7], prompt_state=state)
    with pytest.raises(InvalidRequestError, match="PromptRecorder"):
        capture_prompt(engine_for(model, name="full"), prompts()[0])
    assert state.last_segment == 300 - 6 * 48 and state.queries.shape == (4, 12, 4, 16)
    assert state.keys.shape == (4, 2, 300, 16) and state.logits.shape == (64,)
