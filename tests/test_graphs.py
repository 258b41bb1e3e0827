"""Decode through static buffers (engine/graphs.py) vs the eager step: same tokens, same logits.

On CPU the runner runs its static-buffer forward without capturing (packing, padding rows,
the trash slot, table caching); on CUDA it captures and replays real graphs (fp32, so that
the comparison is tight)."""
import time

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.graphs import DecodeGraphRunner, batch_bucket, batch_buckets, width_bucket
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.sampling import SamplingParams
from tiny import TINY  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BLOCK = 16


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    return random_model(TINY, request.param, torch.float32, seed=5)


def engine_for(model, graphs: bool, **policy):
    device = next(model.parameters()).device
    cfg = EngineConfig(device=str(device), cache=CacheConfig(block_size=BLOCK, num_device_blocks=200),
                       scheduler=SchedulerConfig(max_num_seqs=4, prefill_chunk=64, cuda_graphs=False),
                       policy=PolicyConfig(**{"min_resident_tokens": 0, **policy}))
    engine = LLMEngine(model, cfg)
    if graphs:
        engine.runner.graphs = DecodeGraphRunner(engine.runner, capture=device.type == "cuda")
    return engine


def drive(engine, late_prompt):
    """Three requests of different lengths and max_tokens (the batch shrinks 3 -> 2 -> 1), and a
    fourth added while the others decode (the batch grows again)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (150, 97, 211)]
    logits = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: logits.setdefault(seq.seq_id, []).append(row.float().cpu())))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=m, ignore_eos=True))
            for p, m in zip(prompts, (40, 23, 57))]
    for _ in range(12):
        engine.step()
    seqs.append(engine.add_request(late_prompt, SamplingParams(max_tokens=30, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    return seqs, [torch.stack(logits[s.seq_id]) for s in seqs]


POLICIES = [dict(name="full"), dict(name="lsa", budget=0.3, cycle=4), dict(name="lsa", budget=0.3, cycle=4,
            per_layer=True), dict(name="streaming", budget=0.3), dict(name="snapkv", budget=0.3)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(str(v) for v in p.values()))
def test_static_decode_matches_eager(model, policy):
    late = torch.randint(3, 64, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    eager_seqs, eager_logits = drive(engine_for(model, False, **policy), late)
    engine = engine_for(model, True, **policy)
    graphs = engine.runner.graphs
    made = graphs.capture_batches(4)  # as at warm-up
    graph_seqs, graph_logits = drive(engine, late)
    for e, g, el, gl in zip(eager_seqs, graph_seqs, eager_logits, graph_logits):
        assert g.output_ids == e.output_ids
        torch.testing.assert_close(gl, el, atol=2e-4, rtol=2e-4)
    assert {b for b, _ in graphs.steps} >= {1, 2, 4}  # padded buckets were used
    if engine.policy.offloads:  # one width, every batch bucket made at warm-up: none while decoding
        assert graphs.max_width == engine.policy.decode_reserve(engine.max_model_len)
        assert made == 3 and set(graphs.steps) == {(b, graphs.max_width) for b in (1, 2, 4)}
    else:
        assert made == 0 and graphs.max_width is None
    if model.lm_head.weight.is_cuda:
        assert engine.runner.graphs.captures == len(engine.runner.graphs.steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch: CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_programmatic_dependent_launch_decodes_the_same_bits(monkeypatch, dtype):
    """LSA_PDL=1 (kernels/pdl.py: the step's Triton kernels launched before their predecessor ends,
    each waiting inside before it touches memory) gives the same tokens and the same logits, bit
    for bit, through captured graphs (fp32; bf16, where the projections are Triton GEMVs too)."""
    from dataclasses import replace
    wide = replace(TINY, hidden_size=512, intermediate_size=512, head_dim=128)  # shapes the GEMV tiles divide
    model = random_model(wide, "cuda", dtype, seed=5)
    late = torch.randint(3, 64, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    runs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("LSA_PDL", pdl)
        engine = engine_for(model, True, name="lsa", budget=0.3, cycle=4)
        engine.runner.graphs.capture_batches(4)
        runs.append(drive(engine, late))
    (seqs0, logits0), (seqs1, logits1) = runs
    assert [s.output_ids for s in seqs0] == [s.output_ids for s in seqs1]
    assert all(torch.equal(a, b) for a, b in zip(logits0, logits1))


def test_tables_rebuilt_only_when_residency_changes(model):
    engine = engine_for(model, True, name="full")
    calls = []
    table = engine.cache.blocks.table_slots
    engine.cache.blocks.table_slots = lambda *a, **k: calls.append(a) or table(*a, **k)
    prompt = torch.randint(3, 64, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert len(seq.output_ids) == 40
    # decode positions 100..138: blocks open at 112 and 128, so rows are rebuilt at the first
    # step and twice more; a rebuild every step would be 39 calls
    assert len(calls) == 3


def test_padding_rows_leave_real_blocks_alone(model):
    engine = engine_for(model, True, name="full")
    prompt = torch.randint(3, 64, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    a = engine.add_request(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    b = engine.add_request(prompt[:33], SamplingParams(max_tokens=9, ignore_eos=True))
    c = engine.add_request(prompt[:25], SamplingParams(max_tokens=5, ignore_eos=True))
    while engine.has_work():
        engine.step()
    # a ran alone in a bucket of 1 at the end and in a bucket of 4 (3 rows + 1 padding) before
    assert {1, 2, 4} <= {bb for bb, _ in engine.runner.graphs.steps}
    ref = engine_for(model, False, name="full")
    ra = ref.add_request(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    while ref.has_work():
        ref.step()
    assert a.output_ids == ra.output_ids and len(b.output_ids) == 9 and len(c.output_ids) == 5


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
    assert batch_buckets(17) == [1, 2, 4, 8, 16, 24] and len(batch_buckets(64)) == 11 and len(batch_buckets(256)) == 35
    assert width_bucket(1) == 16 and width_bucket(100) == 112 and width_bucket(8192) == 8192
    assert all(w <= width_bucket(w) <= w * 1.25 + 16 for w in range(1, 5000, 37))


def test_cuda_graph_errors():
    model = random_model(TINY, "cpu", torch.float32, seed=5)
    with pytest.raises(InvalidRequestError, match="CUDA"):
        LLMEngine(model, EngineConfig(scheduler=SchedulerConfig(cuda_graphs=True)))
    with pytest.raises(InvalidRequestError, match="eagerly"):
        LLMEngine(model, EngineConfig(scheduler=SchedulerConfig(cuda_graphs=True), policy=PolicyConfig(name="quest")))


def test_policies_declare_per_step_work():
    """A policy whose select() or observe_decode() does work says so: that decides whether its
    steps can be CUDA graphs and which queries the graph hands back."""
    from engine.policies.lsa import LSAPolicy
    from engine.policies import OraclePolicy, Policy, QuestPolicy, SnapKVPolicy, StreamingPolicy
    from lab.traces import TracePolicy

    for cls in (Policy, StreamingPolicy, SnapKVPolicy, QuestPolicy, OraclePolicy, LSAPolicy, TracePolicy):
        selects = cls.select is not Policy.select
        assert cls is LSAPolicy or cls.selects_each_step == selects, cls
        assert cls.observes_decode == (cls.observe_decode is not Policy.observe_decode), cls
    model = random_model(TINY, "cpu", torch.float32, seed=5)
    for topk, want in ((None, False), (2, True)):
        assert engine_for(model, False, name="lsa", level2_topk=topk).policy.selects_each_step is want


def session_turn(model, pinned: bool, graphs: bool, rank_delay: float | None = None, inline: bool = False,
                 overlap: bool | None = None):
    """A session turn (prefix from a host arena, the question prefilled layer by layer, LSA plans
    crossing boundaries every 4 steps): (its 16 tokens, their logits [16, V], the policy).
    ``rank_delay``: Level-1 ordered on the worker thread (the CUDA default), each ordering held up
    that many seconds; ``inline``: ordered in the step; neither: the device's default."""
    from actors.session_table import SessionTable
    from engine.host_arena import ArenaLayout, HostArena
    from test_sessions import Sessions

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    context = torch.randint(3, 64, (700,), generator=gen).tolist()
    question = torch.randint(3, 64, (20,), generator=gen).tolist()
    layout = ArenaLayout.of(TINY, BLOCK, torch.float32)
    arena = HostArena.private(layout, 256, pin=pinned)
    engine = LLMEngine(model, EngineConfig(
        device=str(device), cache=CacheConfig(block_size=BLOCK, num_device_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=2, prefill_chunk=48, cuda_graphs=False, overlap_decode=overlap),
        policy=PolicyConfig(name="lsa", budget=0.2, cycle=4, observation_window=16, min_resident_tokens=0)),
        arena=arena)
    if graphs:
        engine.runner.graphs = DecodeGraphRunner(engine.runner, capture=device.type == "cuda")
    policy = engine.policy
    if inline:
        policy.background_rank = False
    elif rank_delay is not None:
        policy.background_rank = True
        pages = policy._pages
        policy._pages = lambda score: time.sleep(rank_delay) or pages(score)
    sessions = Sessions(engine, SessionTable(256, layout.block_bytes), arena.allocator)
    sessions.run(sessions.create("doc", context))
    logits = []
    engine.hooks.append(LogitsObserver(lambda seq, row: logits.append(row.float().cpu())))
    turn = sessions.run(sessions.ask("doc", question, SamplingParams(max_tokens=16, ignore_eos=True)))
    assert len(turn.seq.output_ids) == 16
    return turn.seq.output_ids, torch.stack(logits), policy


@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_a_session_turn_decodes_the_same_through_graphs(model, pinned):
    """A session turn decodes the same tokens and logits through the graph runner as eagerly. On
    the H200 (2026-12-02) this failed while test_static_decode_matches_eager passed: the next plan
    was adopted whenever the background ranker finished, and graph launches return sooner than
    eager ones, so fewer of its blocks were staged by the boundary and more were deferred (the CPU
    case below reproduces it with a slow ranker). Plans are now adopted in the step after their
    boundary, always. ``pinned``: the served arena is page-locked (CUDA only)."""
    if pinned and next(model.parameters()).device.type != "cuda":
        pytest.skip("page-locked host memory needs CUDA")
    eager_ids, eager_logits, _ = session_turn(model, pinned, graphs=False)
    graph_ids, graph_logits, _ = session_turn(model, pinned, graphs=True)
    assert graph_ids == eager_ids
    torch.testing.assert_close(graph_logits, eager_logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_a_slow_background_ranker_decodes_a_session_turn_the_same(model, overlap, request):
    """The same turn with Level-1 ordered inline and on a worker thread that takes 50 ms per plan:
    the same plans are staged (the turn's plans bring in blocks), the same blocks deferred, the
    same logits. Before plans were adopted at a fixed step, the slow ranker's plans arrived at
    their boundary unstaged and the tokens differed from the 11th on. With and without overlapped
    decode (on the H200, 2026-12-03, the CUDA case with overlap on, the default there, deferred 4
    blocks inline and none with the slow ranker, with overlap on and off; the CPU defers 4 in both: an open
    difference on the device, docs/perf.md eleventh session; expected to fail there until found)."""
    if next(model.parameters()).device.type == "cuda":
        request.applymarker(pytest.mark.xfail(reason="CUDA: the worker-thread ranker defers fewer blocks than the "
                                              "inline one (docs/perf.md, eleventh session)", strict=False))
    inline_ids, inline_logits, inline = session_turn(model, False, graphs=False, inline=True, overlap=overlap)
    slow_ids, slow_logits, slow = session_turn(model, False, graphs=False, rank_delay=0.05, overlap=overlap)
    assert sum(inline.churn) > 0 and slow.churn == inline.churn and slow.deferred == inline.deferred
    assert slow_ids == inline_ids
    torch.testing.assert_close(slow_logits, inline_logits, atol=0, rtol=0)
