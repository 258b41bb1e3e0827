"""Attention policies on a tiny random model: budgets, residency invariants, copies, accounting."""
import time

import pytest
import torch

from engine.config import POLICIES, CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.policies import POLICY_CLASSES
from engine.loader import random_model
from engine.sampling import SamplingParams
from tiny import TINY  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BLOCK = 16  # the smallest block the Triton kernels take


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    dtype = torch.float32 if request.param == "cpu" else torch.bfloat16
    return random_model(TINY, request.param, dtype, seed=3)


def engine_for(model, **policy):
    device = str(next(model.parameters()).device)
    cfg = EngineConfig(device=device, cache=CacheConfig(block_size=BLOCK, num_device_blocks=256),
                       scheduler=SchedulerConfig(max_num_seqs=3, prefill_chunk=48),
                       policy=PolicyConfig(**{"min_resident_tokens": 0, **policy}))
    return LLMEngine(model, cfg)


def prompts(n=3, lengths=(300, 197, 406), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (length,), generator=gen).tolist() for length in lengths[:n]]


def run(engine, ids, max_tokens=40, hook=None):
    logits = {}

    def record(seq, row):
        logits.setdefault(seq.seq_id, []).append(row.float().cpu())
        if hook:
            hook(engine, seq)

    engine.hooks.append(LogitsObserver(record))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in ids]
    while engine.has_work():
        engine.step()
    return seqs, [torch.stack(logits[s.seq_id]) for s in seqs]


@pytest.mark.parametrize("per_layer,index_score,bonus", [(False, "quest", 0.0), (True, "quest", 0.0),
                                                          (False, "mass", 0.0), (False, "attention", 0.0),
                                                          (True, "attention", 0.0), (False, "mean", 3.0),
                                                          (False, "attention", 3.0)])
def test_lsa_with_full_budget_equals_full_attention(model, per_layer, index_score, bonus):
    ids = prompts()
    full_seqs, full_logits = run(engine_for(model, name="full"), ids)
    lsa_seqs, lsa_logits = run(engine_for(model, name="lsa", budget=1.0, cycle=4, per_layer=per_layer,
                                          index_score=index_score, recency_bonus=bonus), ids)
    for f, s, fl, sl in zip(full_seqs, lsa_seqs, full_logits, lsa_logits):
        assert s.output_ids == f.output_ids
        assert torch.equal(sl, fl)  # same blocks, same order, same kernel: bit-identical


@pytest.mark.parametrize("name", ["lsa", "streaming", "snapkv"])
def test_contexts_under_the_resident_floor_keep_every_block_and_equal_full_attention(model, name):
    ids = prompts(lengths=(300, 197, 406))  # all under the floor of 512 tokens (+ 40 generated)
    full_seqs, full_logits = run(engine_for(model, name="full"), ids)
    engine = engine_for(model, name=name, budget=0.1, cycle=4, min_resident_tokens=512)
    fractions = []
    seqs, logits = run(engine, ids, hook=lambda e, s: fractions.append(e.cache.accounting(s.seq_id).device_fraction)
                       if s.seq_id in e.cache.blocks.seqs else None)
    for f, s, fl, sl in zip(full_seqs, seqs, full_logits, logits):
        assert s.output_ids == f.output_ids and torch.equal(sl, fl)
        assert s.kv["device_kv_fraction"] >= 0.99  # reported as what it is: the whole context resident
    assert engine.policy.misses == 0


def test_the_floor_binds_only_below_it():
    from engine.policies import OffloadPolicy

    policy = OffloadPolicy(PolicyConfig(name="lsa", budget=0.1, min_resident_tokens=512), 4, block_size=16)
    assert policy.budget_blocks(20) == 20  # 320 tokens: all of them
    assert policy.budget_blocks(128) == 32  # 2K tokens: the floor's 512 tokens, not 10%
    assert policy.budget_blocks(1024) == 102  # 16K tokens: 10%
    assert OffloadPolicy(PolicyConfig(name="lsa", budget=0.1, min_resident_tokens=0), 4, 16).budget_blocks(128) == 12


def _check_residency(engine, seq):
    """Called on every sampled token: sinks and tail resident, budget respected."""
    policy, cache = engine.policy, engine.cache
    if seq.seq_id not in cache.blocks.seqs or seq.num_cached < seq.prompt_len:
        return
    n = cache.num_tokens(seq.seq_id)
    blocks = -(-n // BLOCK)
    cycle_growth = -(-policy.config.cycle // BLOCK) + 1
    for resident in cache.blocks.seqs[seq.seq_id].resident:
        held = set(resident)
        assert set(range(min(policy.config.sink_blocks, n // BLOCK))) <= held, "a sink block is not resident"
        tail = set(range(max(0, blocks - 1 - policy.tail_size(blocks)), blocks))
        assert tail <= held, "the recent tail is not resident"
        # at a boundary the set is cut to the budget; it grows only by blocks opened since
        assert len(held) <= policy.budget_blocks(blocks) + cycle_growth


@pytest.mark.parametrize("name", ["lsa", "streaming", "snapkv"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_resident_sets_hold_sinks_and_tail_within_budget(model, name, per_layer):
    engine = engine_for(model, name=name, budget=0.2, cycle=8, per_layer=per_layer)
    seqs, _ = run(engine, prompts(), max_tokens=50, hook=_check_residency)
    assert all(len(s.output_ids) == 50 for s in seqs)
    for s in seqs:  # physical device KV well under full once prefill is done
        assert s.kv["device_kv_fraction"] < 0.45


@pytest.mark.parametrize("per_layer", [False, True])
def test_attention_score_keeps_sinks_and_tail_within_budget(model, per_layer):
    engine = engine_for(model, name="lsa", budget=0.2, cycle=8, per_layer=per_layer, index_score="attention",
                        target_layers=(0, 2))
    seqs, _ = run(engine, prompts(), max_tokens=50, hook=_check_residency)
    assert all(len(s.output_ids) == 50 for s in seqs)
    assert engine.policy.cycles > 0  # boundaries scored from the mirror's keys
    assert engine.policy.index_fraction() == 0.0  # no device index keys to pay for


@pytest.mark.parametrize("index_score", ["mean", "attention"])
def test_recency_bonus_keeps_sinks_and_tail_within_budget(model, index_score):
    engine = engine_for(model, name="lsa", budget=0.2, cycle=8, recency_bonus=2.0, index_score=index_score)
    seqs, _ = run(engine, prompts(), max_tokens=50, hook=_check_residency)
    assert all(len(s.output_ids) == 50 for s in seqs)
    assert engine.policy.cycles > 0


def test_recency_bonus_favours_the_window_by_its_ratio(model):
    """The newest (budget - sinks - open block) complete blocks gain log(1 + bonus); a far block
    displaces one of them only where its score is higher by more than that."""
    policy = engine_for(model, name="lsa", recency_bonus=1.0, neighbors=0).policy
    gen = torch.Generator().manual_seed(5)
    score = torch.randn(40, generator=gen, dtype=torch.float64)
    budget = 9  # 1 sink + 1 open block: a window of the newest 7 complete blocks
    favoured = policy.favour_recent(score, budget)
    want = score.clone()
    want[33:] += torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert torch.equal(favoured, want) and torch.equal(score, torch.randn(40, generator=torch.Generator().manual_seed(5),
                                                                          dtype=torch.float64))  # not in place
    # a far block just above the weakest window block's boosted score outranks it; just below, not
    weakest = int(torch.argmin(favoured[33:])) + 33
    for delta, ahead in ((1e-3, True), (-1e-3, False)):
        s = score.clone()
        s[:33] = -10.0
        s[3] = favoured[weakest] + delta
        order = policy._pages(policy.favour_recent(s, budget)).tolist()
        assert (order.index(3) < order.index(weakest)) == ahead
    # 0 or a budget with no room for a window: the scores unchanged
    assert torch.equal(policy.favour_recent(score, 2), score)
    with pytest.raises(InvalidRequestError, match="recency_bonus"):
        PolicyConfig(name="lsa", recency_bonus=-1.0)
    with pytest.raises(InvalidRequestError, match="recency_bonus"):
        PolicyConfig(name="lsa", recency_bonus=float("nan"))


def test_a_large_recency_bonus_plans_the_streaming_window(model):
    """With a bonus no score overcomes, every plan is StreamingLLM's window (sinks, then the newest
    blocks), so LSA resides exactly where StreamingLLM does at the same budget at its boundaries."""
    engine = engine_for(model, name="lsa", budget=0.2, cycle=8, recency_bonus=1e30, neighbors=0, tail_tokens=0,
                        lookahead=0)
    checked = []

    def check(engine, seq):
        policy, cache = engine.policy, engine.cache
        if seq.seq_id not in cache.blocks.seqs or policy._step.get(seq.seq_id, 0) % 8 != 1:
            return
        n = cache.num_tokens(seq.seq_id)
        budget = policy.budget_blocks(-(-n // BLOCK))
        complete = (n - 1) // BLOCK  # complete when the boundary ranked (one token ago)
        window = set(range(complete - (budget - 2), complete)) | {0}
        assert window <= set(cache.blocks.seqs[seq.seq_id].resident[0])
        checked.append(n)

    run(engine, prompts(), max_tokens=40, hook=check)
    assert checked


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # one KV head at a time; all of them at once
@pytest.mark.parametrize("last_position", [None, 70])  # the prompt's last queries; a decode boundary's
def test_window_block_mass_matches_float64_attention(chunk_bytes, last_position):
    """The exact attention mass of the last W queries per KV head and block (the first plan's and
    the ``attention`` score's statistic), against a float64 softmax over the causal keys, on
    random queries and keys; the same whether the KV heads go one at a time or together."""
    from engine.policies.base import window_block_mass

    gen = torch.Generator().manual_seed(7)
    w, hkv, g, d, n, block = 6, 3, 3, 32, 67, 16  # n not a multiple of the block: a partial last block
    q = torch.randn(w, hkv * g, d, generator=gen)
    keys = torch.randn(hkv, n, d, generator=gen)
    scale = d ** -0.5
    got = window_block_mass(q, keys, scale, block, last_position, chunk_bytes=chunk_bytes)
    last = n - 1 if last_position is None else last_position
    want = torch.zeros(hkv, -(-n // block), dtype=torch.float64)
    for h in range(hkv):
        for i in range(w):
            visible = min(n, last - w + 1 + i + 1)  # keys at positions <= this query's
            for j in range(g):
                logits = keys[h, :visible].double() @ q[i, h * g + j].double() * scale
                p = torch.softmax(logits, 0)
                for b in range(want.shape[1]):
                    want[h, b] += p[b * block: (b + 1) * block].sum() / (w * g)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.sum(1).double(), torch.ones(hkv, dtype=torch.float64))  # a distribution per head


@pytest.mark.parametrize("name", ["lsa", "snapkv"])
def test_tail_in_tokens_is_resident_within_budget(model, name):
    # 0.45: LSA counts its index keys inside the budget (2 of 4 layers' summaries: 4.7% at 16-token blocks)
    engine = engine_for(model, name=name, budget=0.45, cycle=8, tail_tokens=64)
    sizes = []

    def check(engine, seq):
        _check_residency(engine, seq)
        sizes.append(engine.policy.tail_size(-(-engine.cache.num_tokens(seq.seq_id) // BLOCK)))

    run(engine, prompts(), max_tokens=40, hook=check)
    assert max(sizes) == 4  # 64 tokens in 16-token blocks, once the budget has room for it


def test_tail_tokens_leave_half_the_budget_to_the_selection(model):
    # the base rule (LSA's budget also pays for its index keys: tests/test_staging.py)
    policy = engine_for(model, name="streaming", budget=0.1, tail_tokens=256).policy  # 16 blocks of 16
    for blocks in range(1, 600):
        budget, tail = policy.budget_blocks(blocks), policy.tail_size(blocks)
        assert 1 <= tail <= 16 and 1 + tail + 1 <= budget or blocks < 3
        assert tail == max(1, min(16, (budget - 2) // 2))
    assert policy.tail_size(128) == 5 and policy.tail_size(512) == 16  # 2K and 8K tokens
    wide = engine_for(model, name="streaming", budget=0.1, tail_tokens=2, tail_blocks=3).policy
    assert wide.tail_size(100) == 3  # tail_blocks is a minimum
    with pytest.raises(InvalidRequestError, match="tail_tokens"):
        PolicyConfig(name="lsa", tail_tokens=-1)


def test_default_tail_at_64_token_blocks_leaves_room_for_selection():
    from engine.policies import OffloadPolicy

    policy = OffloadPolicy(PolicyConfig(name="lsa", min_resident_tokens=0), num_layers=4, block_size=64)  # tail 128: 2 blocks
    assert [policy.tail_size(-(-ctx // 64)) for ctx in (2048, 3072, 4096, 8192)] == [1, 1, 2, 2]
    for blocks in range(3, 2000):  # past the 1-block minimum, at least as many selected blocks as tail blocks
        tail = policy.tail_size(blocks)
        assert policy.budget_blocks(blocks) - 2 - tail >= tail or tail == 1


@pytest.mark.parametrize("prefetch", [0.0, 0.5])
def test_only_changed_blocks_are_copied(model, prefetch):
    """Every block entering the resident set is copied exactly once: at the boundary, or ahead of
    it into a spare slot (prefetch) and then promoted without a copy."""
    # no recency bonus: on random KV it keeps the window, and this test needs plans that change
    engine = engine_for(model, name="lsa", budget=0.25, cycle=4, prefetch=prefetch, recency_bonus=0.0)
    cache = engine.cache
    events = []
    original = engine.policy.apply

    def apply(seq_id, group, wanted):
        seq = cache.blocks.seqs[seq_id]
        before, staged, late = set(seq.resident[group]), set(seq.staged[group]), cache.blocks_loaded_late
        original(seq_id, group, wanted)
        events.append((before, set(seq.resident[group]), staged,
                       (cache.blocks_loaded_late - late) // len(cache.groups[group])))

    engine.policy.apply = apply
    run(engine, prompts(1), max_tokens=60)
    assert len(events) > 10
    moved = promoted = 0
    for before, after, staged, late in events:
        entered = after - before
        assert late == len(entered - staged)  # a block already resident or staged is never copied again
        moved += len(entered)
        promoted += len(entered & staged)
    assert moved > 0  # the plan did change the resident set at some boundary
    assert cache.blocks_copied == cache.blocks_prefetched + cache.blocks_loaded_late
    if prefetch:
        assert promoted > 0 and cache.blocks_prefetched > 0  # copied ahead, then used
    else:
        assert promoted == 0 and cache.blocks_prefetched == 0
    assert engine.policy.misses == 0


def test_device_bytes_match_accounting(model):
    engine = engine_for(model, name="lsa", budget=0.2, cycle=8)
    checked = []

    def check(engine, seq):
        cache = engine.cache
        if seq.seq_id not in cache.blocks.seqs or seq.num_cached < seq.prompt_len:
            return
        acc = cache.accounting(seq.seq_id)
        blocks = cache.blocks.seqs[seq.seq_id]
        resident = sum(blocks.held(g) for g in range(len(blocks.resident)))  # staged slots hold data too
        layers = TINY.num_layers
        per_layer_block = 2 * TINY.num_kv_heads * TINY.head_dim * BLOCK * cache.pool.element_size()
        index = len(cache.host_blocks(seq.seq_id)) * len(cache.index_layers) * 3 * TINY.num_kv_heads \
            * TINY.head_dim * cache.pool.element_size()
        assert acc.device_bytes == resident * layers * per_layer_block + index
        assert acc.full_bytes == cache.num_tokens(seq.seq_id) * layers * per_layer_block // BLOCK
        checked.append(acc.device_fraction)

    run(engine, prompts(1), max_tokens=30, hook=check)
    assert len(checked) >= 29 and max(checked) < 0.4


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_generates(model, name):
    engine = engine_for(model, name=name, budget=0.15, cycle=8)
    seqs, logits = run(engine, prompts(), max_tokens=20)
    for s, lg in zip(seqs, logits):
        assert len(s.output_ids) == 20 and torch.isfinite(lg).all()
        assert s.kv["policy"] == name
    assert engine.cache.blocks.device[0].num_used == 0  # everything released


def test_page_recall_and_threshold_and_level2_run(model):
    for policy in (dict(page_blocks=2), dict(threshold=0.01), dict(level2_topk=3), dict(lookahead=0),
                   dict(first_plan="indexer"), dict(first_plan="indexer", index_score="mean"), dict(neighbors=0),
                   dict(index_score="mass"), dict(first_plan="indexer", index_score="mass"),
                   dict(index_score="quest"), dict(index_score="attention"),
                   dict(first_plan="indexer", index_score="attention")):
        engine = engine_for(model, name="lsa", budget=0.25, cycle=4, **policy)
        seqs, logits = run(engine, prompts(2), max_tokens=24)
        assert all(len(s.output_ids) == 24 for s in seqs), policy
        assert all(torch.isfinite(lg).all() for lg in logits)


def test_policy_config_errors():
    with pytest.raises(InvalidRequestError, match="unknown policy"):
        PolicyConfig(name="magic")
    assert set(POLICY_CLASSES) == set(POLICIES)  # every name a config admits has a class
    with pytest.raises(InvalidRequestError, match="budget"):
        PolicyConfig(name="lsa", budget=0.0)
    with pytest.raises(InvalidRequestError, match="target layers"):
        PolicyConfig(name="lsa", target_layers=(99,)).layers(4)


def test_neighbors_follow_each_selected_block(model):
    engine = engine_for(model, name="lsa", budget=0.3, neighbors=1)
    score = torch.tensor([0.1, 5.0, 0.2, 0.3, 4.0, 0.0])
    assert engine.policy._pages(score).tolist() == [1, 2, 4, 5, 3, 0]


@pytest.mark.parametrize("neighbors,page", [(0, 1), (1, 1), (2, 1), (1, 3)])
def test_vectorised_ranking_matches_the_plain_loop(model, neighbors, page):
    policy = engine_for(model, name="lsa", neighbors=neighbors, page_blocks=page).policy
    gen = torch.Generator().manual_seed(neighbors * 10 + page)
    for m in (1, 7, 50, 301):
        score = torch.randn(m, generator=gen)
        score[torch.rand(m, generator=gen) < 0.2] = float("-inf")
        pages = torch.full((-(-m // page),), float("-inf"))
        for p in range(len(pages)):
            pages[p] = score[p * page:(p + 1) * page].max()
        order = sorted((p for p in range(len(pages)) if pages[p] > float("-inf")), key=lambda p: -pages[p].item())
        base = [j for p in order for j in range(p * page, min(m, (p + 1) * page))]
        want, seen = [], set()
        for j in base:
            for k in range(j, min(m, j + neighbors + 1)):
                if k not in seen:
                    seen.add(k)
                    want.append(k)
        assert policy._pages(score).tolist() == want


@pytest.mark.parametrize("slow", [0.0, 0.2])
def test_ranking_in_the_background_applies_the_same_plans(model, slow):
    """Level-1 ordered on a worker thread (the CUDA default) gives the same resident sets at every
    boundary, hence the same logits, as ordering inline; also when the ordering is slow (``slow``:
    the step after the boundary waits for it). A session turn, whose plans bring in more blocks:
    test_graphs.test_a_slow_background_ranker_decodes_a_session_turn_the_same."""
    ids = prompts(2)
    results = []
    for background in (False, True):
        engine = engine_for(model, name="lsa", budget=0.2, cycle=4)
        engine.policy.background_rank = background
        pages = engine.policy._pages
        engine.policy._pages = lambda score: time.sleep(slow) or pages(score)
        results.append(run(engine, ids, max_tokens=30))
        assert engine.policy.cycles > 4 and (engine.policy._ranker is not None) == background
    (seqs_a, logits_a), (seqs_b, logits_b) = results
    for a, b, la, lb in zip(seqs_a, seqs_b, logits_a, logits_b):
        assert a.output_ids == b.output_ids
        assert torch.equal(la, lb)


def test_boundaries_of_sequences_started_together_are_staggered():
    """Sequences that start decoding in the same step (here built like ``lsa bench decode`` builds
    them) reach their Level-1 boundaries in different steps, each still every ``cycle`` steps."""
    from benchmarks.decode import TINY as BENCH_TINY
    from benchmarks.decode import Setup, build

    cfg = ModelConfig(**{**BENCH_TINY, "num_layers": 2})
    model = random_model(cfg, "cpu", torch.float32, seed=0)
    engine, _ = build(model, Setup("lsa", (0.1,), 3, 2048, 64, 64, 8, None), torch.device("cpu"),
                      torch.Generator().manual_seed(0))
    at = {}  # sequence -> engine steps with a boundary
    original, clock = engine.policy._apply_plan, [0]
    engine.policy._apply_plan = lambda seq_id: (at.setdefault(seq_id, []).append(clock[0]), original(seq_id))
    for clock[0] in range(33):
        engine.step()
    assert len(at) == 3 and all(len(v) >= 3 for v in at.values())
    assert all(b - a == 8 for v in at.values() for a, b in zip(v, v[1:]))
    assert len({v[0] % 8 for v in at.values()}) == 3  # three phases: never all in one step


def test_per_sequence_counters_are_the_sequences_own(model):
    """kv stats of a finished sequence count its own boundaries and copies, not the engine's totals."""
    engine = engine_for(model, name="lsa", budget=0.2, cycle=4)
    ids = prompts(1)
    kvs = []
    for _ in range(2):  # the same request twice, one after the other
        seqs, _ = run(engine, ids, max_tokens=20)
        kvs.append(seqs[0].kv)
    assert kvs[0]["cycles"] > 0  # 4: the engine's totals would say 8 for the second
    if next(model.parameters()).device.type == "cpu":  # on the GPU (bf16 scores) this prompt's plans bring in
        assert kvs[0]["blocks_copied"] > 0  # nothing new (H200, 2026-12-02): the copy counters stay 0 there
    for key in ("cycles", "misses", "blocks_copied", "bytes_copied", "blocks_prefetched", "blocks_loaded_late"):
        assert kvs[1][key] == kvs[0][key], key


def _narrow_by_rows(scores, table, num_blocks, last_len, budget_fn):
    """The per-row loop ``narrow`` replaced: the reference it must equal."""
    n, width = table.shape
    counts = num_blocks.tolist()
    keep = [budget_fn(c) for c in counts]
    valid = torch.arange(width)[None, :] < (num_blocks - 1)[:, None]
    order = torch.argsort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True)
    out = torch.zeros(n, max(min(k, c) for k, c in zip(keep, counts)), dtype=table.dtype)
    out_n = torch.empty_like(num_blocks)
    for i in range(n):
        others = order[i, : min(keep[i], counts[i]) - 1]
        row = torch.cat([table[i, others.sort().values], table[i, counts[i] - 1: counts[i]]])
        out[i, : len(row)] = row
        out_n[i] = len(row)
    return out, out_n, last_len


def test_batched_narrow_equals_the_per_row_loop():
    from engine.policies.base import narrow

    gen = torch.Generator().manual_seed(7)
    for trial in range(40):
        n, width = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 70, (1,), generator=gen))
        counts = torch.randint(1, width + 1, (n,), generator=gen).to(torch.int32)
        table = torch.randint(0, 500, (n, width), generator=gen).to(torch.int32)
        scores = torch.randn(n, width, generator=gen)
        if trial % 3 == 0:
            scores = scores.round()  # ties
        last = torch.randint(1, 17, (n,), generator=gen).to(torch.int32)
        budget = int(torch.randint(1, 30, (1,), generator=gen))
        got = narrow(scores, table, counts, last, lambda c: budget)
        want = _narrow_by_rows(scores, table, counts, last, lambda c: budget)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0][:, : got[0].shape[1]])


def test_mass_score_matches_a_float64_softmax_over_mean_keys():
    """QuestIndexer("mass") against a per-head, per-query float64 recomputation on fresh random
    inputs: softmax over the listed blocks of q . kmean / sqrt(D), mean over the window's queries
    and the group's heads, log, max over KV heads."""
    from engine.policies.lsa import QuestIndexer
    g = torch.Generator().manual_seed(7)
    w, hkv, group, d, rows = 5, 3, 3, 16, 40
    queries = torch.randn(w, hkv * group, d, generator=g)
    kmean = torch.randn(rows, hkv, d, generator=g) * 2
    ids = torch.randperm(rows, generator=g)[:17]
    got = QuestIndexer("mass").score(queries, kmean - 1, kmean + 1, kmean, ids)
    want = torch.full((len(ids),), -float("inf"), dtype=torch.float64)
    for h in range(hkv):
        mass = torch.zeros(len(ids), dtype=torch.float64)
        for qi in range(w):
            for j in range(group):
                q = queries[qi, h * group + j].double()
                logits = torch.stack([q @ kmean[r, h].double() for r in ids]) / d ** 0.5
                mass += torch.softmax(logits, 0) / (w * group)
        want = torch.maximum(want, mass.log())
    assert got.shape == (len(ids),)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quest, mean, mass"):
        QuestIndexer("magic")
    with pytest.raises(InvalidRequestError, match="index_score"):
        PolicyConfig(name="lsa", index_score="magic")


def test_attention_score_matches_a_float64_causal_softmax_over_the_keys():
    """AttentionIndexer against a per-head, per-query float64 recomputation on fresh random
    inputs: softmax of q . k / sqrt(D) over the keys at or before the query's position, summed
    per block, mean over the window's queries and all query heads, log."""
    from engine.policies.lsa import AttentionIndexer
    g = torch.Generator().manual_seed(11)
    w, hkv, group, d, block, m = 6, 2, 3, 16, 4, 9
    queries = torch.randn(w, hkv * group, d, generator=g)
    keys = torch.randn(hkv, m * block, d, generator=g) * 2
    for last in (m * block - 1, m * block + 5, m * block - 3):  # window ends at, past, inside the last block
        got = AttentionIndexer().score(queries, keys, last, block)
        mass = torch.zeros(m, dtype=torch.float64)
        for qi in range(w):
            position = last - w + 1 + qi
            seen = min(position + 1, m * block)
            for h in range(hkv * group):
                logits = keys[h // group, :seen].double() @ queries[qi, h].double() / d ** 0.5
                p = torch.nn.functional.pad(torch.softmax(logits, 0), (0, m * block - seen))
                mass += p.view(m, block).sum(1) / (w * hkv * group)
        assert got.shape == (m,)
        torch.testing.assert_close(got.double(), mass.clamp_min(1e-30).log(), rtol=1e-5, atol=1e-5)


def test_host_keys_are_the_prompt_keys(model):
    """The keys the attention score reads from the host mirror equal the device pool's; it keeps no
    device index keys (nor counts them), which the Quest score does."""
    quest = engine_for(model, name="lsa", budget=1.0, index_score="quest").cache
    assert quest.keeps_index_keys and quest.index_keys.shape[0] == len(quest.index_layers) > 0
    engine = engine_for(model, name="lsa", budget=1.0, index_score="attention")
    assert not engine.cache.keeps_index_keys and engine.cache.index_keys.numel() == 0
    assert engine.policy.index_fraction() == 0.0 and engine.cache.index_layers  # its queries are still observed
    seq = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=20, ignore_eos=True))
    while seq.num_cached < seq.prompt_len:  # prefill chunks of 48 tokens
        engine.step()
    cache = engine.cache
    host_ids = cache.host_blocks(seq.seq_id)
    for layer in range(TINY.num_layers):
        keys, _ = cache.gather(seq.seq_id, layer, len(host_ids) * BLOCK)
        torch.testing.assert_close(cache.host_keys(host_ids, layer).float(), keys.float())
    assert host_ids and cache.accounting(seq.seq_id).index_bytes == 0


# ------------------------------------------------------------------ oracle_head: the oracle per KV head

def test_oracle_head_with_full_budget_equals_full_attention(model):
    """At budget 1.0 every KV head keeps every block, in table order: each per-head kernel call is
    the full call on the same table, so the kept query heads' outputs are bit-identical."""
    ids = prompts()
    full_seqs, full_logits = run(engine_for(model, name="full"), ids)
    seqs, logits = run(engine_for(model, name="oracle_head", budget=1.0), ids)
    for f, s, fl, sl in zip(full_seqs, seqs, full_logits, logits):
        assert s.output_ids == f.output_ids
        assert torch.equal(sl, fl)


def _head_oracle_reference(policy, q, k_cache, v_cache, table, num_blocks, last_len, scale):
    """Float64, one query head at a time: KV head h's block mass (softmax over every listed token,
    summed per block and over h's query heads), its top blocks up to the budget besides the last
    listed one, then each of h's query heads attends to those blocks' tokens only. Returns
    (out [N, Hq, D] float64, per row and KV head the listed positions kept)."""
    n, hq, d = q.shape
    hkv, block = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    kept = []
    for i in range(n):
        count, last = int(num_blocks[i]), int(last_len[i])
        lengths = [block] * (count - 1) + [last]
        slots = [int(s) for s in table[i, :count]]
        keys = [torch.cat([k_cache[s, h, :ln].double() for s, ln in zip(slots, lengths)]) for h in range(hkv)]
        values = [torch.cat([v_cache[s, h, :ln].double() for s, ln in zip(slots, lengths)]) for h in range(hkv)]
        owner = torch.cat([torch.full((ln,), j) for j, ln in enumerate(lengths)])  # listed position of each token
        budget = min(policy.budget_blocks(count), count)
        row = []
        for h in range(hkv):
            mass = torch.zeros(count, dtype=torch.float64)
            for j in range(h * g, (h + 1) * g):
                p = torch.softmax(keys[h] @ q[i, j].double() * scale, 0)
                mass += torch.zeros(count, dtype=torch.float64).index_add_(0, owner, p)
            chosen = sorted(torch.argsort(mass[:-1], descending=True)[: budget - 1].tolist()) + [count - 1]
            row.append(chosen)
            mask = torch.isin(owner, torch.tensor(chosen))
            for j in range(h * g, (h + 1) * g):
                p = torch.softmax(keys[h][mask] @ q[i, j].double() * scale, 0)
                out[i, j] = p @ values[h][mask]
        kept.append(row)
    return out, kept


def _random_paged_case(seed, n=3, hkv=3, g=3, d=16, block=4, slots=64, max_blocks=14):
    """Fresh random decode inputs over a paged cache: tables of distinct random slots, padding
    entries past each row's count holding arbitrary slot ids."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hkv * g, d, generator=gen)
    k_cache = torch.randn(slots, hkv, block, d, generator=gen) * 1.5
    v_cache = torch.randn(slots, hkv, block, d, generator=gen)
    counts = torch.randint(2, max_blocks + 1, (n,), generator=gen)
    counts[0] = max_blocks
    table = torch.stack([torch.randperm(slots, generator=gen)[:max_blocks] for _ in range(n)]).to(torch.int32)
    last_len = torch.randint(1, block + 1, (n,), generator=gen).to(torch.int32)
    return q, k_cache, v_cache, table, counts.to(torch.int32), last_len


def _head_policy(budget, block=4):
    from engine.policies.baselines import OracleHeadPolicy
    return OracleHeadPolicy(PolicyConfig(name="oracle_head", budget=budget, min_resident_tokens=0,
                                         sink_blocks=1, tail_blocks=1), 2, block)


@pytest.mark.parametrize("seed,budget", [(0, 0.3), (1, 0.5), (2, 0.2)])
def test_oracle_head_matches_a_float64_per_head_reference(seed, budget):
    """OracleHeadPolicy.attend on fresh random inputs against a float64 recomputation: each KV
    head's query heads attend only to that head's top-mass blocks plus the last listed one."""
    policy = _head_policy(budget)
    q, k_cache, v_cache, table, counts, last_len = _random_paged_case(seed)
    scale = q.shape[-1] ** -0.5
    got = policy.attend(0, q, k_cache, v_cache, table, counts, last_len, scale)
    want, kept = _head_oracle_reference(policy, q, k_cache, v_cache, table, counts, last_len, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert any(len({tuple(s) for s in row}) > 1 for row in kept)  # the heads' sets differ: a real test
    shared = _head_policy(budget)  # the one-set oracle attends differently here
    assert not torch.allclose(got, _shared_oracle(shared, q, k_cache, v_cache, table, counts, last_len, scale))


def _shared_oracle(policy, q, k_cache, v_cache, table, counts, last_len, scale):
    import kernels
    from engine.policies.base import narrow
    _, mass = kernels.sparse_decode_attention(q, k_cache, v_cache, table, counts, last_len, scale,
                                              return_block_mass=True)
    narrowed = narrow(mass.sum(1), table, counts, last_len, policy.budget_blocks)
    return kernels.sparse_decode_attention(q, k_cache, v_cache, *narrowed, scale)


def test_oracle_head_attends_at_most_the_budget_per_head(model, monkeypatch):
    """In an engine run at budget 0.25, every per-head kernel call lists at most the budget of its
    row's blocks (exactly min(budget, blocks)), a subset of the row in table order with the last
    block last; the heads' sets differ at some step."""
    import kernels
    real = kernels.sparse_decode_attention
    state = {"rows": None, "calls": 0, "differ": 0, "sets": []}
    engine = engine_for(model, name="oracle_head", budget=0.25)
    budget_fn = engine.policy.budget_blocks

    def spy(q, k_cache, v_cache, table, num_blocks, last_len, scale, return_block_mass=False, **kw):
        if return_block_mass:  # the mass pass over the full table starts a layer's calls
            if state["sets"] and len(set(state["sets"])) > 1:
                state["differ"] += 1
            state["rows"], state["sets"] = (table.clone(), num_blocks.clone()), []
        else:
            full, counts = state["rows"]
            for i in range(table.shape[0]):
                c, nb = int(counts[i]), int(num_blocks[i])
                assert nb == min(budget_fn(c), c)  # never more than the budget
                row, listed = table[i, :nb].tolist(), full[i, :c].tolist()
                assert row[-1] == listed[-1] and row == [s for s in listed if s in set(row)]
            state["sets"].append(tuple(map(tuple, table.tolist())))
            state["calls"] += 1
        return real(q, k_cache, v_cache, table, num_blocks, last_len, scale, return_block_mass, **kw)

    monkeypatch.setattr(kernels, "sparse_decode_attention", spy)
    seqs, logits = run(engine, prompts(), max_tokens=12)
    assert all(len(s.output_ids) == 12 for s in seqs) and all(torch.isfinite(lg).all() for lg in logits)
    assert state["calls"] >= 11 * TINY.num_layers * TINY.num_kv_heads and state["differ"] > 0
