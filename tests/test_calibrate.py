"""``lsa calibrate``: the attention profile against a brute-force reference, the plan derived
from it, and the command end to end on SmolLM2 (a tiny context)."""
import json

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.policies.layer_plan import LayerPlan
from lab.attention_profile import LayerProfile, layer_profile
from lab.calibrate import derive_plan


def _reference(q, keys, block_size, max_blocks, observe):
    """The three curves by loops over heads, queries and k, from float64 softmax rows."""
    w, hq, d = q.shape
    hkv, n, _ = keys.shape
    group = hq // hkv
    m = -(-n // block_size)
    out = {name: torch.zeros(hkv, max_blocks + 1, dtype=torch.float64) for name in ("recent", "selected", "oracle")}
    for h in range(hkv):
        masses = []
        for i in range(w):
            t = n - w + i
            row = torch.zeros(m, dtype=torch.float64)
            for g in range(group):
                s = (q[i, h * group + g].double() @ keys[h, : t + 1].double().T) * d ** -0.5
                p = torch.softmax(s, -1)
                for j in range(t + 1):
                    row[j // block_size] += p[j] / group
            masses.append((t // block_size, row))
        votes = torch.stack([r for _, r in masses[:observe]]).mean(0)
        votes[0] = float("inf")
        ranked = torch.argsort(votes, descending=True).tolist()
        for k in range(1, max_blocks + 1):
            rec, sel, ora = [], [], []
            for open_block, row in masses[observe:]:
                recent = {0} | {b for b in range(m) if 0 <= open_block - b < k - 1}
                chosen = set(ranked[: max(1, k - 1)]) | {open_block}
                rec.append(sum(row[b] for b in recent))
                sel.append(sum(row[b] for b in chosen))
                ora.append(row.sort(descending=True).values[:k].sum())
            for name, vals in (("recent", rec), ("selected", sel), ("oracle", ora)):
                out[name][h, k] = sum(vals) / len(vals)
    return out


def test_layer_profile_matches_a_brute_force_reference():
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(20, 4, 8, generator=gen) * 2
    keys = torch.randn(2, 70, 8, generator=gen) * 2
    got = layer_profile(q, keys, block_size=8, max_blocks=6, observe=8)
    want = _reference(q, keys, 8, 6, 8)
    for name in ("recent", "selected", "oracle"):
        torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-9, atol=1e-9)
    assert torch.all(got.oracle >= got.recent - 1e-12) and torch.all(got.oracle >= got.selected - 1e-12)
    with pytest.raises(ValueError, match="observe"):
        layer_profile(q[:8], keys, 8, 6, observe=8)


def _profile(recent, selected):
    k = torch.tensor
    return LayerProfile(k([[0.0, recent, recent]] * 2, dtype=torch.float64),
                        k([[0.0, selected, selected]] * 2, dtype=torch.float64),
                        k([[0.0, 1.0, 1.0]] * 2, dtype=torch.float64))


def test_derive_plan_splits_local_and_retrieving_layers():
    profiles = [_profile(0.9, 0.7), _profile(0.4, 0.8), _profile(0.5, 0.6), _profile(0.95, 0.9)]
    identity = {"architecture": "llama", "num_layers": 4}
    plan = derive_plan(profiles, identity, k=2, margin=0.0, local_recent=1.0, local_weight=0.5, targets=1,
                       calibration={"texts": ["x"]})
    (retrieve, local) = plan.groups
    assert (retrieve.layers, retrieve.recent, retrieve.weight) == ((1, 2), None, 1.0)
    assert (local.layers, local.recent, local.weight) == ((0, 3), 1.0, 0.5)
    assert plan.target_layers == (1,)  # asked for by gain: the layer the fixed set helps most
    default = derive_plan(profiles, identity, k=2, margin=0.0, local_recent=1.0, local_weight=0.5, targets=0,
                          calibration={})
    assert default.target_layers == (1, 2)  # LSA's default index layers for 4 layers: 4 * (3, 4, 5) // 8
    assert plan.calibration["selection_gain"] == pytest.approx([-0.2, 0.4, 0.1, -0.05])
    with pytest.raises(InvalidRequestError, match="no layer"):
        derive_plan(profiles, identity, 2, margin=0.5, local_recent=1.0, local_weight=1.0, targets=1, calibration={})


def test_calibrate_command_writes_a_plan_the_engine_takes(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from cli import main
    from engine.config import CacheConfig, EngineConfig, PolicyConfig, SchedulerConfig
    from engine.llm import LLMEngine
    from engine.policies import LayerPlanPolicy
    from engine.sampling import SamplingParams
    from lab import evaluation

    model, tokenizer = evaluation.load("smollm2-135m", "cpu", "auto")
    monkeypatch.setattr(evaluation, "load", lambda *a: (model, tokenizer))  # the command's, loaded once
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--texts", "pydoc", "--context", "256", "--windows", "1", "--queries", "40",
                 "--observe", "16", "--budget", "0.25", "--device", "cpu", "--out", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert raw["calibration"]["texts"] == ["pydoc"] and len(raw["calibration"]["per_layer"]) == 30
    plan = LayerPlan.load(out)
    assert sorted(i for g in plan.groups for i in g.layers) == list(range(30))
    cfg = EngineConfig(device="cpu", cache=CacheConfig(block_size=16),
                       scheduler=SchedulerConfig(max_num_seqs=1, max_model_len=512),
                       policy=PolicyConfig(name="lsa", layer_plan=str(out), min_resident_tokens=0))
    engine = LLMEngine(model, cfg, tokenizer)
    assert isinstance(engine.policy, LayerPlanPolicy)
    (done,) = engine.generate([tokenizer.encode("The quick brown fox " * 60)], SamplingParams(max_tokens=8))
    assert len(done.token_ids) == 8
    assert main(["calibrate", "--observe", "50", "--queries", "40", "--out", str(out)]) == 2  # a bad argument
