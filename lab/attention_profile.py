"""How each layer and KV head of a model attends on running text: the measurements a layer
plan (engine/policies/layer_plan.py) is derived from.

From a prompt prefilled once (engine/prompt_state.py: K of every layer, the last queries),
the exact attention of the last ``queries`` positions, each causal over the text before it,
summed per KV head over its query heads' rows and per block of ``block_size`` tokens:

    recent[k]     mass on the first block (the sink) and the k most recent blocks (the open
                  one counted) at each query: what a sinks + recent window set of k + 1 blocks holds
    selected[k]   mass on the sink, the open block, and the k - 2 blocks the first ``observe``
                  queries attend to most, held for the later queries (a lookahead set fixed in
                  advance, as a Level-1 plan is) -- the selection's side of the same budget
    oracle[k]     the k blocks with the most mass, per query: the bound of any set of k blocks

Each curve is [Hkv, K + 1] for k = 0..K, averaged over the queries scored (the later
``queries - observe``), in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerProfile:
    recent: torch.Tensor  # [Hkv, K + 1] float64
    selected: torch.Tensor  # [Hkv, K + 1]
    oracle: torch.Tensor  # [Hkv, K + 1]

    def at(self, k: int) -> dict:
        """The three curves at k blocks, meaned over the heads."""
        return {name: float(getattr(self, name)[:, k].mean()) for name in ("recent", "selected", "oracle")}


def block_mass(q: torch.Tensor, keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention mass per KV head, query and block of the last W positions of a prompt.

    q [W, Hq, D] (positions n-W..n-1), keys [Hkv, n, D] -> [Hkv, W, num_blocks] float64, each
    row summing to G (the query heads of the group)."""
    w, hq, d = q.shape
    hkv, n, _ = keys.shape
    qg = q.double().view(w, hkv, hq // hkv, d)
    s = torch.einsum("whgd,hnd->hwgn", qg, keys.double()) * d ** -0.5  # [Hkv, W, G, n]
    causal = torch.arange(n)[None, :] <= torch.arange(n - w, n)[:, None]  # [W, n]
    p = torch.softmax(s.masked_fill(~causal[None, :, None, :], float("-inf")), dim=-1).sum(2)  # [Hkv, W, n]
    pad = (-n) % block_size
    return torch.nn.functional.pad(p, (0, pad)).view(hkv, w, -1, block_size).sum(-1)


def layer_profile(q: torch.Tensor, keys: torch.Tensor, block_size: int, max_blocks: int,
                  observe: int = 32) -> LayerProfile:
    """The three curves of one layer (see the module docstring); q [W, Hq, D], keys [Hkv, n, D]."""
    w, hq, _ = q.shape
    hkv, n, _ = keys.shape
    if w <= observe:
        raise ValueError(f"need more than observe={observe} queries, got {w}")
    group = hq // hkv
    mass = block_mass(q, keys, block_size) / group  # [Hkv, W, M] rows sum to 1
    m = mass.shape[-1]
    ks = torch.arange(max_blocks + 1)
    scored = mass[:, observe:]  # [Hkv, S, M]
    positions = torch.arange(n - w + observe, n)  # absolute positions of the scored queries
    open_block = positions // block_size  # [S]
    block_ids = torch.arange(m)
    # recent: the sink, then blocks open, open-1, ... : age 0 = the open block
    age = open_block[:, None] - block_ids[None, :]  # [S, M]
    recent = torch.stack([_held(scored, (age >= 0) & ((age < k - 1) | (block_ids[None, :] == 0))) if k else
                          torch.zeros(hkv, dtype=torch.float64) for k in ks.tolist()], 1)
    # selected: sink + open block + the k - 2 best by the observation window's mean mass
    votes = mass[:, :observe].mean(1).clone()  # [Hkv, M]
    votes[:, 0] = float("inf")  # the sink first
    ranked = torch.argsort(votes, dim=1, descending=True)  # [Hkv, M]
    selected = []
    for k in ks.tolist():
        keep = torch.zeros(hkv, scored.shape[1], m, dtype=torch.bool)
        if k:
            chosen = torch.zeros(hkv, m, dtype=torch.bool).scatter_(1, ranked[:, : max(1, k - 1)], True)
            keep = chosen[:, None, :] | (age == 0)[None]
        selected.append((scored * keep).sum(-1).mean(1))
    oracle_sorted = scored.sort(-1, descending=True).values.cumsum(-1).mean(1)  # [Hkv, M]
    oracle = torch.cat([torch.zeros(hkv, 1, dtype=torch.float64), oracle_sorted], 1)[:, : max_blocks + 1]
    if oracle.shape[1] < max_blocks + 1:
        oracle = torch.nn.functional.pad(oracle, (0, max_blocks + 1 - oracle.shape[1]), value=1.0)
    return LayerProfile(recent, torch.stack(selected, 1), oracle)


def _held(scored: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean mass per head of the scored queries on the blocks ``keep`` [S, M] marks."""
    return (scored * keep[None]).sum(-1).mean(1)


def profile_states(states, block_size: int, max_blocks: int, observe: int = 32) -> list[LayerProfile]:
    """Per layer, the curves averaged over several prompts' states (PromptState)."""
    per_layer = []
    for layer in range(states[0].keys.shape[0]):
        profiles = [layer_profile(s.queries[layer].cpu(), s.keys[layer].cpu(), block_size, max_blocks, observe)
                    for s in states]
        per_layer.append(LayerProfile(*(torch.stack([getattr(p, f) for p in profiles]).mean(0)
                                        for f in ("recent", "selected", "oracle"))))
    return per_layer
