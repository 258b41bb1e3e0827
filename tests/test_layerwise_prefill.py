"""Layer-by-layer prefill: same logits and tokens as the ordinary prefill, within the device budget."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any Triton kernel is defined
# where the engines run: on a CUDA machine the Triton kernels take CUDA tensors (no interpreter there)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
    return random_model(TINY, DEVICE, torch.float32, seed=3)


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


def flash_kernel_everywhere(monkeypatch, flash=True):
    """Prefill attention through the Triton flash kernel (interpreted on CPU), as on the GPU
    (``flash=False``: the torch reference, which builds a [T, n] mask); returns the list of
    the bytes each call allocated at its peak."""
    from tracked_memory import TrackedMemory

    import kernels
    from kernels.flash_prefill import prefill_attention_triton
    impl = prefill_attention_triton if flash else kernels.reference.prefill_attention
    peaks = []

    def attention(q, k, v, start, scale, out=None):
        with TrackedMemory() as mem:
            out = impl(q, k, v, start, scale, out=out)
        peaks.append(mem.peak)
        return out

    monkeypatch.setattr(kernels, "prefill_attention", attention)
    return peaks


@pytest.mark.parametrize("policy", [dict(name="lsa", observation_window=16), dict(name="streaming")])
def test_device_memory_of_the_layerwise_prefill_is_bounded(model, monkeypatch, policy):
    """A tracked allocator around the prefill of 400 and of 800 tokens: the peak stays under the
    bound the prefill states (hidden states + one layer's KV + one chunk's activations + the
    mirror copy + the policy's window), and doubling the prompt adds only the terms that are
    linear in it (hidden states, scratch, window): no chunk x prompt term (a mask), no second
    copy of the hidden states. Streaming observes no window: there the growth is exactly the
    hidden states and the scratch."""
    from tracked_memory import TrackedMemory

    attention_peaks = flash_kernel_everywhere(monkeypatch)
    peaks, bounds = {}, {}
    for n in (400, 800):
        engine = engine_for(model, 12, True, budget=0.1, cycle=4, **policy)
        layerwise = engine.runner.layerwise
        layerwise.mirror_chunk_blocks = 4
        run_layers = layerwise.layers  # the runner steps it a layer at a time (one prompt: nothing runs between)

        def tracked(seq_id, ids, n=n, run_layers=run_layers):
            with TrackedMemory() as mem:
                out = yield from run_layers(seq_id, ids)
            peaks[n] = mem.peak
            return out

        layerwise.layers = tracked
        run(engine, prompts([n]), max_tokens=2)
        bounds[n] = layerwise.device_bytes(n)
        held = bounds[n]["hidden"] + bounds[n]["scratch"]
        assert held <= peaks[n] <= sum(bounds[n].values()), (n, peaks[n], bounds[n])
    linear = sum(bounds[800][k] - bounds[400][k] for k in ("hidden", "scratch", "observe"))
    assert peaks[800] - peaks[400] <= linear, (peaks, bounds)
    chunk_out = 48 * TINY.num_heads * TINY.head_dim * 4
    assert max(attention_peaks) == chunk_out  # a chunk's attention allocates its output, nothing over the prompt


def test_the_reference_attention_is_what_a_mask_costs(model, monkeypatch):
    """The check above sees a mask: the torch reference's attention of the last whole chunk of
    800 tokens ([720, 768)) allocates its [48, 768] mask besides the output."""
    attention_peaks = flash_kernel_everywhere(monkeypatch, flash=False)
    run(engine_for(model, 12, True, name="streaming", budget=0.1, cycle=4), prompts([800]), max_tokens=2)
    assert max(attention_peaks) >= 48 * TINY.num_heads * TINY.head_dim * 4 + 48 * 768


def session_manager(model, layerwise):
    """Sessions on an engine over a private arena, driven in this thread (tests/test_sessions.py)."""
    from test_sessions import Sessions

    from actors.session_table import SessionTable
    from engine.host_arena import ArenaLayout, HostArena

    layout = ArenaLayout.of(TINY, BLOCK, torch.float32)
    arena = HostArena.private(layout, 256)
    policy = dict(name="lsa", budget=0.2, cycle=4, observation_window=16, index_score="mean")
    engine = LLMEngine(model, EngineConfig(
        cache=CacheConfig(block_size=BLOCK, num_device_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=48, layerwise_prefill=layerwise),
        policy=PolicyConfig(**{"min_resident_tokens": 0, **policy})), arena=arena)
    return Sessions(engine, SessionTable(256, layout.block_bytes), arena.allocator)


def test_a_turn_streams_its_prefix_one_layer_at_a_time(model):
    """A session turn does not load its prefix onto the device: each layer's prefix KV comes from
    the host mirror into the one-layer scratch, the question is prefilled against it, and the
    first plan comes from the question's queries. Same tokens and logits as loading the whole
    prefix (``layerwise_prefill=False``, the path before), with the device holding at most the
    decode reserve instead of every prefix block."""
    context, question = prompts([700])[0], prompts([720])[0][700:]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    results = {}
    for layerwise in (False, None):
        mgr = session_manager(model, layerwise)
        mgr.run(mgr.create("doc", context))
        logits = []
        mgr.engine.hooks.append(LogitsObserver(lambda seq, row: logits.append(row.clone())))
        peak = track_peak_slots(mgr.engine)
        turn = mgr.run(mgr.ask("doc", question, params))
        results[layerwise] = (turn, torch.stack(logits), peak[0], mgr.engine)
    (old, old_logits, old_peak, _), (new, new_logits, new_peak, engine) = results[False], results[None]
    assert new.seq.output_ids == old.seq.output_ids and len(new.seq.output_ids) == 16
    torch.testing.assert_close(new_logits, old_logits, atol=1e-4, rtol=1e-4)
    assert new.prefill_tokens == old.prefill_tokens < 48 + BLOCK  # the window and the partial block

    n = 720
    prefix_blocks = len(new.seq.prefix_host_ids)
    assert prefix_blocks == min(700, n - engine.policy.prefill_window) // BLOCK
    reserve = engine.policy.decode_reserve(n + params.max_tokens - 1)
    assert old_peak >= prefix_blocks > reserve >= new_peak  # before: every prefix block on the device
    layerwise = engine.runner.layerwise
    assert layerwise.peak_scratch_bytes == n * engine.cache.bytes_per_token // TINY.num_layers  # one layer
    assert layerwise.prefix_bytes_loaded == TINY.num_layers * prefix_blocks * engine.cache.mirror.bytes_per_layer_block


def test_a_short_prompt_runs_several_layers_a_step(model):
    """A layer-by-layer prefill yields about one ordinary step's work at a time (``prefill_chunk``
    tokens through every layer, a layer of an n-token prompt counting n), at least a layer: over
    4 layers at chunk 48, 64 tokens take 2 steps to their first token (3 layers, then 1), 400
    tokens 4 (one layer a step)."""
    for n, steps in ((64, 2), (400, 4)):
        engine = engine_for(model, 64, True, name="streaming", budget=0.5, cycle=4)
        seq = engine.add_request(prompts([n])[0], SamplingParams(max_tokens=2, ignore_eos=True))
        count = 0
        while not seq.output_ids:
            engine.step()
            count += 1
        assert count == steps, (n, count)
