"""Layer plans: LSA's budget split between layers that attend locally and layers that retrieve.

On running text most layers of a model attend to the recent tokens, a few retrieve far back
(SmolLM2-135M: layers 3-10 retrieve, 0-2 and 11-29 stay local; docs/accuracy.md). One resident
set shared by all layers serves neither well. A layer plan splits the layers into groups, each
with its own resident set (engine/block_manager.py keeps one per group):

    group      layers          per-layer budget        of it, recent (sinks + open + tail)
    local      0-2, 11-29      weight 1.0 x the budget  recent 1.0: a window, no selection
    retrieve   3-10            weight 1.0 x the budget  the default tail; the rest selected

``weight`` scales a group's budget; the weights are normalised so that the layer-blocks of all
groups stay within ``L x budget_blocks`` (every group is counted with its layers, as the
device KV is). ``recent`` is the share of a group's budget given to the sinks, the open block
and the recent tail (None: LSA's tail rule). A group ranks blocks by the Level-1 scores of the
index layers among its members (all index layers when it has none).

The plan is made once per model by ``lsa calibrate`` (lab/calibrate.py), from the attention of
the model on text, and stored as JSON beside the model: a format name and version, the model's
identity (shapes and a weight fingerprint), the groups and index layers, and the measurements.
A file that cannot be read, is corrupt, of another version or of another model is a
:class:`LayerPlanError`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.errors import InvalidRequestError
from engine.policies.lsa import LSAPolicy

PLAN_FORMAT = "lsa-layer-plan"
PLAN_VERSION = 1
FINGERPRINT_RTOL = 0.05  # the same weights in another dtype or quantisation stay well inside this


class LayerPlanError(InvalidRequestError):
    """A layer plan file that cannot be used: unreadable, corrupt, of another version, or made
    for another model."""


@dataclass(frozen=True)
class GroupPlan:
    layers: tuple[int, ...]
    weight: float = 1.0  # budget per layer, relative to the other groups'
    recent: float | None = None  # share of the group's budget kept recent (None: LSA's tail rule)
    name: str = ""


@dataclass(frozen=True)
class LayerPlan:
    model: dict  # model_identity() of the model it was made for
    groups: tuple[GroupPlan, ...]
    target_layers: tuple[int, ...]  # Level-1 index layers
    calibration: dict = field(default_factory=dict)  # how it was made, and what was measured

    def __post_init__(self):
        layers = sorted(i for g in self.groups for i in g.layers)
        num_layers = self.model.get("num_layers")
        if layers != list(range(num_layers or 0)):
            raise LayerPlanError(f"the groups must cover layers 0..{num_layers - 1 if num_layers else '?'} once "
                                 f"each, got {layers}")
        if any(g.weight <= 0 or (g.recent is not None and not 0.0 <= g.recent <= 1.0) for g in self.groups):
            raise LayerPlanError("group weights must be > 0 and recent shares in [0, 1]")
        if not self.target_layers or any(not 0 <= i < num_layers for i in self.target_layers):
            raise LayerPlanError(f"target layers {self.target_layers} outside 0..{num_layers - 1}")

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model,
                "groups": [asdict(g) for g in self.groups], "target_layers": list(self.target_layers),
                "calibration": self.calibration}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, raw, where: str = "layer plan") -> LayerPlan:
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise LayerPlanError(f"{where} is not an {PLAN_FORMAT} file (lsa calibrate writes them)")
        if raw.get("version") != PLAN_VERSION:
            raise LayerPlanError(f"{where} has version {raw.get('version')!r}; this lsa reads version "
                                 f"{PLAN_VERSION}: run lsa calibrate again")
        try:
            groups = tuple(GroupPlan(tuple(int(i) for i in g["layers"]), float(g.get("weight", 1.0)),
                                     None if g.get("recent") is None else float(g["recent"]), str(g.get("name", "")))
                           for g in raw["groups"])
            return cls(dict(raw["model"]), groups, tuple(int(i) for i in raw["target_layers"]),
                       dict(raw.get("calibration") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerPlanError(f"{where} is corrupt: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> LayerPlan:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise LayerPlanError(f"cannot read layer plan {path}: {exc.strerror or exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LayerPlanError(f"layer plan {path} is corrupt: not JSON ({exc})") from exc
        return cls.from_json(raw, f"layer plan {path}")

    def check_model(self, identity: dict, where: str = "the layer plan") -> None:
        """Raise LayerPlanError unless ``identity`` (model_identity of the model in use) is the
        model this plan was made for."""
        shapes = {k: v for k, v in self.model.items() if k != "fingerprint"}
        theirs = {k: identity.get(k) for k in shapes}
        if shapes != theirs:
            raise LayerPlanError(f"{where} was made for another model: {shapes}, this one is {theirs}")
        mine, now = self.model.get("fingerprint"), identity.get("fingerprint")
        if mine and now and (len(mine) != len(now) or any(abs(a - b) > FINGERPRINT_RTOL * abs(a)
                                                          for a, b in zip(mine, now))):
            raise LayerPlanError(f"{where} was made for a model of the same shapes but other weights "
                                 f"(fingerprint {mine[:3]}... vs {now[:3]}...): run lsa calibrate for this one")


def model_identity(model) -> dict:
    """Shapes of a model, and a fingerprint of its weights: the norms of a few weight rows, which
    stay within a few per cent across dtypes and quantisations of the same weights."""
    mc = model.config
    inner = model.model
    attn = inner.layers[0].self_attn
    q_rows = (attn.q_proj if attn.qkv_proj is None else attn.qkv_proj).weight[:4]  # fused: q's rows come first
    rows = [inner.embed_tokens.weight[:4], q_rows,
            inner.layers[-1].mlp.down_proj.weight[:4], inner.norm.weight[None]]
    fingerprint = [round(float(r.float().norm()), 5) for t in rows for r in t]
    return {"architecture": mc.architecture, "num_layers": mc.num_layers, "num_heads": mc.num_heads,
            "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "hidden_size": mc.hidden_size,
            "vocab_size": mc.vocab_size, "fingerprint": fingerprint}


class LayerPlanPolicy(LSAPolicy):
    """LSA with the resident sets and budgets of a layer plan (``PolicyConfig.layer_plan``)."""

    def __init__(self, config, num_layers, block_size, plan: LayerPlan | None = None):
        self.plan = plan or LayerPlan.load(config.layer_plan)
        if self.plan.model.get("num_layers") != num_layers:
            raise LayerPlanError(f"the layer plan is for {self.plan.model.get('num_layers')} layers, the model has "
                                 f"{num_layers}")
        if config.per_layer:
            raise InvalidRequestError("per_layer and a layer plan both set the groups: give one of them")
        if config.target_layers is None:
            config = _with_targets(config, self.plan.target_layers)
        super().__init__(config, num_layers, block_size)
        total = sum(g.weight * len(g.layers) for g in self.plan.groups)
        self.weights = [g.weight * num_layers / total for g in self.plan.groups]  # sum |g| w = L

    def check_model(self, model) -> None:
        self.plan.check_model(model_identity(model))

    def groups(self) -> list[list[int]]:
        return [list(g.layers) for g in self.plan.groups]

    def group_budgets(self, num_blocks: int) -> list[int]:
        """Blocks each group may hold: the budget scaled by the group's weight, never fewer than
        the sinks, the minimal tail and the open block, and in all (counted per layer) never
        more than ``L x budget_blocks``."""
        budget = self.budget_blocks(num_blocks)
        if budget >= num_blocks:
            return [num_blocks] * len(self.weights)
        low = self.config.sink_blocks + self.config.tail_blocks + 1
        sizes = [len(g.layers) for g in self.plan.groups]
        ks = [max(low, math.floor(w * budget + 1e-9)) for w in self.weights]
        excess = sum(s * k for s, k in zip(sizes, ks)) - self.num_layers * budget
        while excess > 0 and max(ks) > low:  # the minimums of small groups taken from the largest
            g = max(range(len(ks)), key=lambda i: ks[i])
            ks[g] -= 1
            excess -= sizes[g]
        return [min(num_blocks, k) for k in ks]

    def group_budget(self, group: int, num_blocks: int) -> int:
        return self.group_budgets(num_blocks)[group]

    def max_group_budget(self, num_blocks: int) -> int:
        return max(self.group_budgets(num_blocks))

    def group_tail(self, group: int, num_blocks: int) -> int:
        recent = self.plan.groups[group].recent
        budget = self.group_budget(group, num_blocks)
        if recent is None:
            return self.tail_size_within(budget)
        return max(self.config.tail_blocks, math.floor(recent * budget + 1e-9) - self.config.sink_blocks - 1)


def _with_targets(config, targets):
    from dataclasses import replace

    return replace(config, target_layers=tuple(targets))
