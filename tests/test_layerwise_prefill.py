"""Layer-by-layer prefill: same logits and tokens as the ordinary prefill, within the device budget."""
import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048, eos_token_ids=(2,))
BLOCK = 16


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, "cpu", torch.float32, seed=3)


def engine_for(model, num_device_blocks, layerwise, **policy):
    return LLMEngine(model, EngineConfig(
        cache=CacheConfig(block_size=BLOCK, num_device_blocks=num_device_blocks, num_host_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=48, layerwise_prefill=layerwise),
        policy=PolicyConfig(**{"min_resident_tokens": 0, **policy})))


def track_peak_slots(engine):
    """Record the most device slots in use at once (per group allocator)."""
    peak = [0]
    for alloc in engine.cache.blocks.device:
        original = alloc.allocate

        def allocate(n, alloc=alloc, original=original):
            out = original(n)
            peak[0] = max(peak[0], alloc.num_used)
            return out

        alloc.allocate = allocate
    return peak


def run(engine, ids, max_tokens=24):
    logits = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: logits.setdefault(seq.seq_id, []).append(row.float().clone())))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in ids]
    while engine.has_work():
        engine.step()
    return seqs, [torch.stack(logits[s.seq_id]) for s in seqs]


def prompts(lengths):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 64, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("per_layer", [False, True])
def test_layerwise_prefill_matches_ordinary_prefill_at_full_budget(model, per_layer):
    ids = prompts([301, 224])  # one ends inside a block, one on a boundary
    ref_seqs, ref_logits = run(engine_for(model, 128, False, name="lsa", budget=1.0, cycle=4, per_layer=per_layer),
                               ids)
    engine = engine_for(model, 128, True, name="lsa", budget=1.0, cycle=4, per_layer=per_layer)
    seqs, logits = run(engine, ids)
    assert engine.runner.layerwise.peak_scratch_bytes > 0  # the layerwise path ran
    for r, s, rl, sl in zip(ref_seqs, seqs, ref_logits, logits):
        assert s.output_ids == r.output_ids
        torch.testing.assert_close(sl, rl, atol=1e-4, rtol=1e-4)


def test_long_prompt_runs_in_a_pool_smaller_than_the_prompt(model):
    """A prompt of 44 blocks through a 12-slot pool (chosen automatically): the device holds at
    most one layer's prompt KV (the scratch) plus the decode reserve, and the tokens equal those
    of the ordinary prefill with a pool that holds the whole prompt."""
    ids = prompts([700])
    policy = dict(name="lsa", budget=0.1, cycle=4, observation_window=16, index_score="mean")
    ref = engine_for(model, 128, None, **policy)
    ref_peak = track_peak_slots(ref)
    ref_seqs, ref_logits = run(ref, ids)
    small = engine_for(model, 12, None, **policy)
    peak = track_peak_slots(small)
    seqs, logits = run(small, ids)
    assert seqs[0].output_ids == ref_seqs[0].output_ids
    torch.testing.assert_close(logits[0], ref_logits[0], atol=1e-4, rtol=1e-4)

    cache = small.cache
    prompt_blocks = -(-700 // BLOCK)
    reserve = small.policy.decode_reserve(700 + 23)
    one_layer_prompt_kv = 700 * cache.bytes_per_token // TINY.num_layers
    assert ref_peak[0] >= prompt_blocks  # the ordinary prefill holds the whole prompt, all layers
    assert peak[0] <= reserve < prompt_blocks
    assert small.runner.layerwise.peak_scratch_bytes == one_layer_prompt_kv
    peak_device_kv = peak[0] * cache.bytes_per_block + small.runner.layerwise.peak_scratch_bytes
    assert peak_device_kv <= one_layer_prompt_kv + reserve * cache.bytes_per_block
    assert peak_device_kv < ref_peak[0] * ref.cache.bytes_per_block / 2
    kv = seqs[0].kv
    assert kv["host_kv_bytes"] == (722 // BLOCK) * cache.mirror.bytes_per_block  # every complete block mirrored
    assert kv["device_kv_fraction"] < 0.25


def test_ordinary_prefill_is_kept_when_the_prompt_fits(model):
    engine = engine_for(model, 128, None, name="lsa", budget=0.1, cycle=4)
    run(engine, prompts([200]))
    assert engine.runner.layerwise.peak_scratch_bytes == 0
    full = engine_for(model, 128, True, name="full")  # full attention keeps every block: never layerwise
    run(full, prompts([200]))
    assert full.runner.layerwise.peak_scratch_bytes == 0
