"""Small statistics for evaluation: win rates with ties, bootstrap confidence intervals, best-of-n.

A win rate compares two systems prompt by prompt on the same held-out prompts (InstructGPT reports
preference win rates against a baseline the same way); a tie counts half, so two identical systems
score exactly 0.5. The interval is a percentile bootstrap over prompts (Efron & Tibshirani 1993):
resample the prompts with replacement, recompute the mean, take the 2.5% and 97.5% quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pairwise_outcomes(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per prompt: 1 if system a scored higher than b, 0.5 on a tie, 0 if lower."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=False)]


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of prompts where a beats b, ties counting half (nan when there are no prompts)."""
    outcomes = pairwise_outcomes(a, b)
    return sum(outcomes) / len(outcomes) if outcomes else math.nan


def win_rate_ceiling(b: Sequence[float], top: float) -> float:
    """The win rate over b of an answer scoring `top` (the best possible) on every prompt: what b
    leaves to win, the bound any system's win rate over b stays under."""
    return win_rate([top] * len(b), b)


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`; the same seed gives the same interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if n_resamples <= 0:
        return float(x.mean()), float(x.mean())
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def share(labels: Sequence[str], wanted: set[str] | str) -> float | None:
    """Share of `labels` in `wanted`; None when there is nothing to count (a family not evaluated)."""
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    return sum(label in wanted for label in labels) / len(labels) if labels else None


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def best_of_k(proxy: Sequence[float], gold: Sequence[float], k: int) -> tuple[float, float]:
    """Expected (proxy, gold) score of best-of-k: the answer the reward model scores highest among k
    drawn without replacement from the n >= k answers sampled for one prompt. Averaging over every
    k-subset uses all n samples for each k, an unbiased estimate as Gao et al. (2022) make: with the
    answers sorted by proxy score, the one of rank r (0 = lowest) is the pick of C(r, k-1) of the
    C(n, k) subsets. Equal proxy scores rank in sample order."""
    n = len(proxy)
    if len(gold) != n:
        raise ValueError(f"proxy and gold scores differ in length: {n} vs {len(gold)}")
    if not 1 <= k <= n:
        raise ValueError(f"best-of-{k} needs 1 <= k <= {n} samples")
    subsets = math.comb(n, k)
    order = sorted(range(n), key=lambda i: proxy[i])
    weights = [math.comb(rank, k - 1) / subsets for rank in range(n)]
    return (
        sum(w * proxy[i] for w, i in zip(weights, order, strict=False)),
        sum(w * gold[i] for w, i in zip(weights, order, strict=False)),
    )


def best_of_k_kl(k: int) -> float:
    """KL(best-of-k || sampling policy) = log k - (k - 1) / k nats per answer (Stiennon et al. 2020;
    Gao et al. 2022): exact when no two answers are alike, an upper bound otherwise."""
    return math.log(k) - (k - 1) / k
