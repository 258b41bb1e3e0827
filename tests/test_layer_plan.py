"""Layer plans (engine/policies/layer_plan.py): the file round-trips and a bad one is a clear
error; LSA under a plan equals full attention at budget 1.0 bit for bit, and never holds more
than its budget, per group and in all, at any step."""
import json

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.loader import random_model
from engine.policies.layer_plan import GroupPlan, LayerPlan, LayerPlanError, LayerPlanPolicy, model_identity
from engine.sampling import SamplingParams
from tiny import TINY  # noqa: E402

BLOCK = 16


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, "cpu", torch.float32, seed=3)


def make_plan(model, local_weight=0.5, local_recent=1.0):
    return LayerPlan(model_identity(model), (GroupPlan((1, 2), 1.0, None, "retrieve"),
                                             GroupPlan((0, 3), local_weight, local_recent, "local")),
                     (1, 2), {"texts": ["test"]})


def engine_for(model, plan_path, max_num_seqs=3, **policy):
    cfg = EngineConfig(device="cpu", cache=CacheConfig(block_size=BLOCK, num_device_blocks=256),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, prefill_chunk=48),
                       policy=PolicyConfig(**{"min_resident_tokens": 0, "layer_plan": str(plan_path), **policy}))
    return LLMEngine(model, cfg)


def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (300, 197, 406)]


def run(engine, max_tokens=40, hook=None):
    logits = {}

    def record(seq, row):
        logits.setdefault(seq.seq_id, []).append(row.clone())
        if hook:
            hook(engine, seq)

    engine.hooks.append(LogitsObserver(record))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts()]
    while engine.has_work():
        engine.step()
    return seqs, [torch.stack(logits[s.seq_id]) for s in seqs]


def test_plan_file_round_trip(model, tmp_path):
    plan = make_plan(model)
    path = plan.save(tmp_path / "plan.json")
    again = LayerPlan.load(path)
    assert again == plan
    raw = json.loads(path.read_text())
    assert (raw["format"], raw["version"]) == ("lsa-layer-plan", 1) and raw["model"]["num_layers"] == 4
    again.check_model(model_identity(model))  # the model it was made for


@pytest.mark.parametrize("edit, message", [
    (lambda raw: "{not json", "not JSON"),
    (lambda raw: {**raw, "format": "other"}, "not an lsa-layer-plan file"),
    (lambda raw: {**raw, "version": 99}, "version 99"),
    (lambda raw: {k: v for k, v in raw.items() if k != "groups"}, "corrupt: KeyError"),
    (lambda raw: {**raw, "groups": [{"layers": [0, 1]}]}, "cover layers 0..3"),
    (lambda raw: {**raw, "groups": [{"layers": [0, 1, 2, 3], "weight": "x"}]}, "corrupt: ValueError"),
    (lambda raw: {**raw, "target_layers": [7]}, "target layers"),
])
def test_a_corrupt_plan_file_is_a_clear_error(model, tmp_path, edit, message):
    path = make_plan(model).save(tmp_path / "plan.json")
    edited = edit(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(LayerPlanError, match=message):
        LayerPlan.load(path)
    with pytest.raises(LayerPlanError):  # also through the engine, before anything runs
        engine_for(model, path, name="lsa")
    with pytest.raises(LayerPlanError, match="cannot read"):
        LayerPlan.load(tmp_path / "missing.json")


def test_a_plan_for_another_model_is_refused(model, tmp_path):
    path = make_plan(model).save(tmp_path / "plan.json")
    other_weights = random_model(TINY, "cpu", torch.float32, seed=4)
    with pytest.raises(LayerPlanError, match="other weights"):
        engine_for(other_weights, path, name="lsa")
    wider = random_model(ModelConfig(**{**TINY.__dict__, "hidden_size": 128}), "cpu", torch.float32, seed=3)
    with pytest.raises(LayerPlanError, match="another model"):
        engine_for(wider, path, name="lsa")
    deeper = random_model(ModelConfig(**{**TINY.__dict__, "num_layers": 6}), "cpu", torch.float32, seed=3)
    with pytest.raises(LayerPlanError, match="4 layers"):
        engine_for(deeper, path, name="lsa")
    bf16 = random_model(TINY, "cpu", torch.bfloat16, seed=3)  # the same weights in another dtype: accepted
    LayerPlan.load(path).check_model(model_identity(bf16))


def test_full_budget_under_a_plan_equals_full_attention(model, tmp_path):
    path = make_plan(model).save(tmp_path / "plan.json")
    full_cfg = EngineConfig(device="cpu", cache=CacheConfig(block_size=BLOCK, num_device_blocks=256),
                            scheduler=SchedulerConfig(max_num_seqs=3, prefill_chunk=48), policy=PolicyConfig(name="full"))
    full_seqs, full_logits = run(LLMEngine(model, full_cfg))
    seqs, logits = run(engine_for(model, path, name="lsa", budget=1.0, cycle=4))
    for f, s, fl, sl in zip(full_seqs, seqs, full_logits, logits):
        assert s.output_ids == f.output_ids
        assert torch.equal(sl, fl)


@pytest.mark.parametrize("local_weight, local_recent", [(0.5, 1.0), (1.0, 0.75), (2.0, None)])
def test_budget_is_never_exceeded(model, tmp_path, local_weight, local_recent):
    path = make_plan(model, local_weight, local_recent).save(tmp_path / "plan.json")
    engine = engine_for(model, path, name="lsa", budget=0.2, cycle=8)
    policy = engine.policy
    assert isinstance(policy, LayerPlanPolicy) and policy.groups() == [[1, 2], [0, 3]]
    growth = -(-policy.config.cycle // BLOCK) + 1
    checked, staged = [], [0, 0]

    def check(engine, seq):
        cache = engine.cache
        if seq.seq_id not in cache.blocks.seqs or seq.num_cached < seq.prompt_len:
            return
        n = cache.num_tokens(seq.seq_id)
        blocks = -(-n // BLOCK)
        budgets = policy.group_budgets(blocks)
        state = cache.blocks.seqs[seq.seq_id]
        layer_blocks = 0
        for g, resident in enumerate(state.resident):
            held = set(resident)
            assert len(held) <= budgets[g] + growth, (g, len(held), budgets[g])  # cut to it at each boundary
            assert 0 in held and blocks - 1 in held  # the sink and the open block
            tail = policy.group_tail(g, blocks)
            assert set(range(max(0, blocks - 1 - tail), blocks)) <= held
            layer_blocks += len(held) * len(cache.groups[g])
            staged[g] = max(staged[g], len(state.staged[g]))  # copies ahead: within prefetch x the group's budget
            assert len(state.staged[g]) <= policy.stage_cap(policy.blocks_for(n + 1), g)
        assert sum(b * len(cache.groups[g]) for g, b in enumerate(budgets)) <= 4 * policy.budget_blocks(blocks)
        assert layer_blocks <= 4 * (policy.budget_blocks(blocks) + growth)
        checked.append(blocks)

    seqs, logits = run(engine, max_tokens=50, hook=check)
    assert len(checked) > 100 and all(torch.isfinite(lg).all() for lg in logits)
    assert policy.misses == 0 and engine.cache.blocks.device[0].num_used == 0
    assert sum(staged) > 0  # plans were copied ahead (into the group whose plans change)
    if local_recent == 1.0:  # the local group keeps a window: sinks + the most recent blocks, nothing selected
        assert policy.group_tail(1, 26) == policy.group_budgets(26)[1] - 2


def test_group_budgets_hold_the_total():
    identity = {"architecture": "llama", "num_layers": 30}
    plan = LayerPlan(identity, (GroupPlan(tuple(range(3, 11)), 2.0), GroupPlan(tuple(range(3)) + tuple(range(11, 30)),
                                                                                 1.0, 1.0)), (4, 6, 8))
    policy = LayerPlanPolicy(PolicyConfig(name="lsa", min_resident_tokens=0, budget=0.1), 30, 16, plan=plan)
    for blocks in range(1, 2000, 7):
        budgets = policy.group_budgets(blocks)
        total = 8 * budgets[0] + 22 * budgets[1]
        assert total <= 30 * policy.budget_blocks(blocks) or policy.budget_blocks(blocks) < 6
        if policy.budget_blocks(blocks) >= blocks:
            assert budgets == [blocks, blocks]
    # 8K tokens at rho 0.1, the index keys inside it (3 key rows per index layer per block, of 2 x 30 x 16 KV rows)
    budget = int((0.1 - 3 * 3 / (2 * 30 * 16)) * 512)
    assert budget == policy.budget_blocks(512) == 46
    assert policy.group_budgets(512) == [int(2 * 30 / 38 * budget), int(30 / 38 * budget)]
    assert policy.config.target_layers == (4, 6, 8)  # the plan's index layers
