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


def best_of_k_curve(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], n: int) -> list[dict]:
    """Best-of-k over prompts, each with n sampled answers' proxy and gold scores: for k = 1, 2, 4, ..., n
    (ending with n), KL(best-of-k || sampler) and the mean expected proxy and gold score of the pick."""
    curve = []
    for k in sorted({2**j for j in range(n.bit_length()) if 2**j <= n} | {n}):
        picks = [best_of_k(p, g, k) for p, g in zip(proxy, gold, strict=True)]
        curve.append(
            {"k": k, "kl": best_of_k_kl(k), "proxy": mean([x for x, _ in picks]), "gold": mean([y for _, y in picks])}
        )
    return curve


def best_of_k_kl(k: int) -> float:
    """KL(best-of-k || sampling policy) = log k - (k - 1) / k nats per answer (Stiennon et al. 2020;
    Gao et al. 2022): exact when no two answers are alike, an upper bound otherwise."""
    return math.log(k) - (k - 1) / k


# Student's t 97.5% quantiles by degrees of freedom: a 95% interval of a mean over a handful of worlds.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the mean of a few independent runs (one per world) with its 95% t interval,
    mean -+ t(n-1) s / sqrt(n). With one value the interval is unknown (None); beyond 10 runs the normal
    quantile stands in for t (within 4% of it)."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return None, None, None
    m = sum(x) / len(x)
    if len(x) == 1:
        return m, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))
    half = T_975.get(len(x) - 1, 1.96) * sd / math.sqrt(len(x))
    return m, m - half, m + half


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at x on the broken line through `points` (x, y) sorted by x; None outside their x range. A
    frontier read at a matched KL: between two settings of a method, the straight line between them."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point, at its own x
