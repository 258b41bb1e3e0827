"""Attention policies, by name: ``make_policy(config, num_layers, block_size)``.

    base.py        the interface (Policy: full attention), OffloadPolicy, shared helpers
    baselines.py   streaming, snapkv, quest, oracle, oracle_head
    lsa.py         Lookahead Sparse Attention and its zero-training indexer
    layer_plan.py  LSA with a layer plan: per-group budgets for local and retrieving layers
    indexer.py     the learned Level-1 indexer LSA loads (trained in the lab)
"""
from __future__ import annotations

from engine.config import PolicyConfig
from engine.policies.base import OffloadPolicy, Policy
from engine.policies.baselines import (OracleHeadPolicy, OraclePolicy, QuestPolicy, SnapKVPolicy,
                                      StreamingPolicy)
from engine.policies.layer_plan import LayerPlanPolicy
from engine.policies.lsa import LSAPolicy

POLICY_CLASSES: dict[str, type[Policy]] = {"full": Policy, "lsa": LSAPolicy, "quest": QuestPolicy,
                                           "streaming": StreamingPolicy, "snapkv": SnapKVPolicy,
                                           "oracle": OraclePolicy, "oracle_head": OracleHeadPolicy}


def make_policy(config: PolicyConfig, num_layers: int, block_size: int) -> Policy:
    """The policy ``config.name`` names (``PolicyConfig`` admits only the registered names), for a
    model of ``num_layers`` layers and blocks of ``block_size`` tokens; ``lsa`` with a
    ``layer_plan`` is LSA under that plan."""
    if config.name == "lsa" and config.layer_plan:
        return LayerPlanPolicy(config, num_layers, block_size)
    return POLICY_CLASSES[config.name](config, num_layers, block_size)


__all__ = ["POLICY_CLASSES", "make_policy", "Policy", "LayerPlanPolicy", "OffloadPolicy", "LSAPolicy", "OraclePolicy",
           "OracleHeadPolicy", "QuestPolicy", "SnapKVPolicy", "StreamingPolicy"]
