"""LSA's cycle mechanics (engine/policies/staging.py) on synthetic-KV engines built like ``lsa bench
decode`` builds them (random KV: every plan brings in most of its set, more than the staging area):
the index keys paid for inside the budget, staging sized from each plan, unstaged blocks deferred
instead of copied while a step waits, boundaries prepared ahead and spread over the cycle, and
copies ahead issued after the step's forward."""
import pytest
import torch

from benchmarks.synthetic import TINY as BENCH_TINY
from benchmarks.synthetic import Setup, build
from engine.config import ModelConfig, PolicyConfig
from engine.loader import random_model
from engine.policies import make_policy

CFG = ModelConfig(**{**BENCH_TINY, "num_layers": 2, "max_position_embeddings": 32768})
CYCLE = 8


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, "cpu", torch.float32, seed=0)


def bench_engine(model, batch=1, context=8192, **policy):
    torch.manual_seed(0)  # the first plan's random queries
    engine, seqs = build(model, Setup("lsa", (0.1,), batch, context, 200, 64, CYCLE, None), torch.device("cpu"),
                         torch.Generator().manual_seed(1))
    if policy:
        engine.policy.config = PolicyConfig(**{**engine.policy.config.__dict__, **policy})
    return engine, seqs


def churn_every_plan(policy):
    """Each plan ranks the blocks not resident first: it replaces the whole selected part."""
    def rank(s, per_layer=None):
        resident = policy.cache.blocks.seqs[s].resident[0]
        complete = len(policy.cache.blocks.seqs[s].host_ids)
        out = [j for j in range(complete - 1, -1, -1) if j not in resident] + sorted(resident)
        return [out for _ in policy.groups()]
    policy.rank = rank


def test_index_keys_are_paid_for_inside_the_budget(model):
    engine, (seq,) = bench_engine(model)
    policy, cache = engine.policy, engine.cache
    fraction = policy.index_fraction()
    assert fraction == 3 * 2 / (2 * 2 * 64)  # 2 Level-1 layers of 2, 64-token blocks
    for n in (128, 1000, 16384):
        assert policy.budget_blocks(n) == int((0.1 - fraction) * n + 1e-9)
    for _ in range(3 * CYCLE):
        engine.step()
        if policy._step[seq.seq_id] % CYCLE == 1 and policy.cycles:  # a boundary cut the set to the budget
            acc = cache.accounting(seq.seq_id)
            blocks = -(-acc.num_tokens // 64)
            attended = acc.device_bytes - acc.staged_bytes  # resident slots + index keys
            assert attended <= 0.1 * blocks * cache.bytes_per_block
            assert acc.index_bytes == (acc.num_tokens // 64) * 2 * cache.summary_bytes_per_layer_block
    full = make_policy(PolicyConfig(name="lsa", budget=1.0, min_resident_tokens=0), 2, 64)
    assert full.budget_blocks(300) == 300  # budget 1.0: every block (full attention, the index on top)


def test_staging_follows_each_plan_within_the_cap_and_the_peak_stays_within_it(model):
    engine, (seq,) = bench_engine(model)
    policy, cache, blocks = engine.policy, engine.cache, engine.cache.blocks
    churn_every_plan(policy)
    queued, original = [], policy._queue_prefetch

    def record(s):
        sb = blocks.seqs[s]
        missing = [j for j in policy.target_set(s, policy._plan[s][0]) if j not in sb.resident[0]]
        original(s)
        cap = policy.stage_cap(policy.blocks_for(cache.num_tokens(s) + 1))
        queued.append((len(missing), cap, len(policy._prefetch[s][1][0]), sb.reserve, policy._cycle_reserve(
            cache.num_tokens(s))))

    policy._queue_prefetch = record
    peak = 0
    for _ in range(4 * CYCLE):
        engine.step()
        sb = blocks.seqs[seq.seq_id]
        peak = max(peak, sb.held(0))
        n_blocks = policy.blocks_for(cache.num_tokens(seq.seq_id) + 1)
        assert len(sb.staged[0]) <= policy.stage_cap(n_blocks)
    assert len(queued) >= 3
    growth = -(-CYCLE // 64) + 1
    for missing, cap, queue, reserve, base in queued:
        assert missing > 0 and queue == min(missing, cap)  # random KV: more churn than the cap
        assert reserve == base + min(cap, missing)  # the reserve follows the plan (the pool has room here)
    n_blocks = policy.blocks_for(cache.num_tokens(seq.seq_id) + 1)
    assert peak <= policy.budget_blocks(n_blocks) + growth + policy.stage_cap(n_blocks)


@pytest.mark.parametrize("late", ["defer", "load"])
def test_unstaged_plan_blocks_are_deferred_not_copied_at_the_boundary(model, late):
    engine, (seq,) = bench_engine(model, late=late, prefetch=0.1)  # a staging area far below the churn
    policy, cache = engine.policy, engine.cache
    churn_every_plan(policy)
    late0, deferred0 = cache.blocks_loaded_late, policy.deferred  # the first plan's loads, at "prefill"
    sizes = []
    for _ in range(4 * CYCLE):
        engine.step()
        if policy._step[seq.seq_id] % CYCLE == 1 and policy.cycles:  # the step of a boundary
            resident = cache.blocks.seqs[seq.seq_id].resident[0]
            n = cache.num_tokens(seq.seq_id)
            sizes.append((len(resident), policy.budget_blocks(policy.blocks_for(n + 1))))
            assert set(policy.must_keep(seq.seq_id)) <= set(resident)
    assert policy.cycles >= 3
    if late == "defer":
        assert cache.blocks_loaded_late == late0 and policy.deferred > deferred0
        assert all(size == budget for size, budget in sizes)  # the blocks they would replace stayed
    else:
        assert cache.blocks_loaded_late > late0 and policy.deferred == deferred0


def test_boundaries_apply_sets_prepared_ahead(model):
    engine, (seq,) = bench_engine(model)
    policy = engine.policy
    checked, original_apply, original_wanted = [], policy._apply_plan, policy._wanted
    inside = [False]

    def apply_plan(s):
        ready = policy._ready.get(s)
        if ready is not None:  # what the boundary would compute now is what was prepared
            policy._take_plan(s, stage=False)
            assert ready.num_tokens == engine.cache.num_tokens(s)
            assert original_wanted(s, ready.num_tokens) == ready.wanted
            checked.append(s)
        inside[0] = True
        original_apply(s)
        inside[0] = False

    def wanted(s, n):
        assert not inside[0], "a prepared boundary computed its sets on the step"
        return original_wanted(s, n)

    policy._apply_plan, policy._wanted = apply_plan, wanted
    for _ in range(4 * CYCLE + 1):
        engine.step()
    assert len(checked) >= 3


def test_copies_ahead_are_issued_after_the_steps_forward(model):
    engine, _ = bench_engine(model)
    events, forward, stage = [], engine.model.forward, engine.cache.stage
    engine.model.forward = lambda *a, **k: (events.append("forward"), forward(*a, **k))[1]
    engine.cache.stage = lambda *a, **k: (events.append("stage"), stage(*a, **k))[1]
    for _ in range(2 * CYCLE):
        engine.step()
    assert "stage" in events
    assert all(events[i - 1] in ("forward", "stage") for i, e in enumerate(events) if e == "stage")
    assert events[0] == "forward"


def test_first_phase_is_the_farthest_from_the_others_boundaries():
    policy = make_policy(PolicyConfig(name="lsa", cycle=64), 4, 16)
    assert policy.first_phase(1) == 0  # alone: its first boundary a whole cycle away
    policy._step = {1: 0}  # one sequence about to start: its boundary 64 steps away
    assert policy.first_phase(2) == 32
    policy._step = {1: 0, 2: 32}
    assert policy.first_phase(3) in (16, 48)
    policy._step = {1: 5, 2: 37}  # boundaries in 59 and 27 steps: the farthest point is 11 or 43 steps
    assert (-policy.first_phase(3)) % 64 in (11, 43)


@pytest.mark.parametrize("batch", [4, 11])
def test_boundaries_of_a_batch_spread_over_the_cycle(model, batch):
    engine, seqs = bench_engine(model, batch=batch, context=2048)
    at, original, clock = {}, engine.policy._apply_plan, [0]
    engine.policy._apply_plan = lambda s: (at.setdefault(clock[0], []).append(s), original(s))
    for clock[0] in range(3 * CYCLE):
        engine.step()
    steps = {}
    for clock_step, ids in at.items():
        for s in ids:
            steps.setdefault(s, []).append(clock_step)
    assert sorted(steps) == sorted(s.seq_id for s in seqs)
    assert all(len(v) >= 2 and all(b - a == CYCLE for a, b in zip(v, v[1:])) for v in steps.values())
    assert max(map(len, at.values())) == -(-batch // CYCLE)  # at most ceil(batch / cycle) in one step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host waits for the GPU stream need CUDA")
def test_level1_launch_after_a_boundary_does_not_wait_for_the_step():
    """Level-1 is launched right after the step's launch (``after_launch``): a copy from pageable
    memory there (the block ids, the count) made the host wait for the whole step, the GPU then
    idle while the host went on (the boundary steps' p99 at 128K). With CUDA's sync debug mode
    set to "error", any synchronizing call inside the launch raises."""
    model = random_model(CFG, "cuda", torch.float16, seed=0)
    torch.manual_seed(0)
    engine, (seq,) = build(model, Setup("lsa", (0.1,), 1, 8192, 200, 64, CYCLE, None), torch.device("cuda"),
                           torch.Generator().manual_seed(1))
    for _ in range(CYCLE + 2):  # past the first boundary: decode queries observed
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        future = engine.policy._rank_in_background(seq.seq_id)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    plan = future.result()
    complete = len(engine.cache.blocks.seqs[seq.seq_id].host_ids)
    assert plan and all(0 <= j < complete for ranked in plan for j in ranked) and len(plan[0]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host waits for the GPU stream need CUDA")
def test_overlapped_decode_steps_never_wait_for_the_stream():
    """With overlapped decode (the default on CUDA) the host must not wait for the step it has just
    launched anywhere in a step, boundaries and block completions included: a copy from pageable
    memory there (the slots of a block completed, mirrored to the host) waited for the step, the GPU
    then idle once a block (the batch-1 p99 of 2026-12-03 at 2.1x the median). CUDA's sync debug
    mode "error" makes any synchronizing call raise; the landing's event wait is not one."""
    model = random_model(CFG, "cuda", torch.float16, seed=0)
    torch.manual_seed(0)
    engine, (seq,) = build(model, Setup("lsa", (0.1,), 1, 8192, 400, 64, CYCLE, None), torch.device("cuda"),
                           torch.Generator().manual_seed(1))
    assert engine.overlap_decode and engine.runner.graphs is not None
    for _ in range(2 * CYCLE + 2):  # past the first boundaries, graphs captured
        engine.step()
    blocks, cycles = len(engine.cache.blocks.seqs[seq.seq_id].host_ids), engine.policy.cycles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 * 64 + 1):  # two blocks of 64 tokens completed, 16 boundaries
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(engine.cache.blocks.seqs[seq.seq_id].host_ids) >= blocks + 2
    assert engine.policy.cycles >= cycles + 15 and engine._in_flight is not None


def test_the_churn_record_is_bounded(model, monkeypatch):
    """A long-running server adopts plans for days: the churn kept for reporting is the last
    ``CHURN_KEPT`` plans', not every plan's."""
    from engine.policies.staging import CycleStaging
    monkeypatch.setattr(CycleStaging, "CHURN_KEPT", 2)
    engine, (seq,) = bench_engine(model)
    policy = engine.policy
    for _ in range(5 * CYCLE):
        engine.step()
    assert policy.cycles >= 4 and len(policy.churn) == 2


def test_a_plan_is_adopted_at_the_second_step_after_its_boundary(model):
    """Level-1 ranks at a boundary; the plan is adopted (and its blocks queued for copying) at the
    launch of the second step after it, never the first: with overlapped decode the host has
    read the boundary step's tokens only by then (adopting at the first step waited for that
    step and Level-1 with the GPU idle). The same step with and without overlap."""
    from engine.policies.staging import CycleStaging

    engine, (seq,) = bench_engine(model)
    policy, s = engine.policy, seq.seq_id
    policy.background_rank = True  # as on CUDA: ranked on the worker thread, adopted later
    adopted = []  # the policy's step counter at each adoption
    take = policy._take_plan

    def recording(seq_id, stage):
        if policy._next.get(seq_id) is not None and stage:
            adopted.append(policy._step[seq_id])
        take(seq_id, stage)

    policy._take_plan = recording
    boundaries = []
    for _ in range(3 * CYCLE):
        cycles = policy.cycles
        engine.step()
        if policy.cycles > cycles:
            boundaries.append(policy._step[s])
    assert len(boundaries) >= 2 and len(adopted) >= 2
    assert CycleStaging.ADOPT_AFTER == 2
    assert adopted[: len(boundaries)] == [b + 2 for b in boundaries][: len(adopted)]
