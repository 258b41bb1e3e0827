"""95% intervals for the tables of ``lsa eval``.

- accuracies (niah, multikey, session): the Wilson score interval of k correct out of n,
  which stays inside [0, 1] and is sound at small n and at 0 or n correct;
- perplexity and agreement: the percentile bootstrap over the samples (text windows), the
  unit the text was drawn in; a fixed seed, so a report is reproducible;
- a policy against full attention on the same windows (ppl ratio): the paired bootstrap,
  resampling windows and keeping each window's pair together.
"""
from __future__ import annotations

import math
import random

Z95 = 1.959963984540054
RESAMPLES = 2000


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: (low, high), (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(statistic, items: list, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``statistic(resampled items)`` over resamples with replacement."""
    if not items:
        return math.nan, math.nan
    if len(items) == 1:
        value = statistic(items)
        return value, value
    rng = random.Random(seed)
    values = sorted(statistic([items[rng.randrange(len(items))] for _ in items]) for _ in range(resamples))
    return values[int(0.025 * (resamples - 1))], values[int(math.ceil(0.975 * (resamples - 1)))]


def pooled_ppl(windows: list[tuple[float, int]]) -> float:
    """exp(total NLL / total scored tokens) of (nll, tokens) windows."""
    return math.exp(sum(nll for nll, _ in windows) / sum(tokens for _, tokens in windows))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def ppl_ratio(pairs: list[tuple[tuple[float, int], tuple[float, int]]]) -> float:
    """Pooled perplexity of the policy over full attention's, on the same windows: pairs of
    ((nll, tokens) policy, (nll, tokens) full)."""
    return pooled_ppl([p for p, _ in pairs]) / pooled_ppl([f for _, f in pairs])
