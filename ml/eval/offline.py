"""In-process retrieval metrics (numpy) for validation during development and benchmarks.

Same definitions as :mod:`ml.eval.metrics` (Pre@K over all queries; a query whose target is not
in its list, or that has no list, is a miss; MRR over the whole list). The evaluation job remains
the reference: bench/ checks both agree.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


def hit_metrics(topk: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> Dict[str, float]:
    """topk (Q, K) candidate ids per query (-1 = none), targets (Q,) -> {"Pre@k": .., "MRR": ..}."""
    hit = topk == targets[:, None]  # (Q, K)
    found = hit.any(axis=1)
    rank = np.where(found, hit.argmax(axis=1) + 1, 0)
    out = {f"Pre@{k}": float(np.mean(found & (rank <= k))) for k in ks}
    out["MRR"] = float(np.mean(np.where(found, 1.0 / np.maximum(rank, 1), 0.0)))
    return out


EXACT_BELOW = 50  # hit metrics with fewer disagreeing queries get McNemar's exact p-value


def paired_stats(mean: float, sd: float, n: int, wins: int, losses: int,
                 hits: bool = False) -> Tuple[float, float, float]:
    """Per-query differences d (model - baseline) summarised as mean, sample sd, n, and the counts
    of d > 0 (wins) and d < 0 (losses) -> (ci_low, ci_high, p): the 95 % interval mean +- 1.96 sd /
    sqrt(n) and the two-sided p-value of z = mean / (sd / sqrt(n)) (the paired t-test at large n;
    for hits close to McNemar's test). For hits (``hits``: d in {-1, 0, 1}) with fewer than
    ``EXACT_BELOW`` disagreeing queries, McNemar's exact test (a two-sided sign test of wins against
    losses): there the normal approximation gave 1 win, 0 losses p = 0.32 instead of 1; the interval
    is then the exact one of :func:`exact_hit_interval`, which agrees with that test. Every d the
    same: the sign test. One query: NaN, unbounded."""
    se = sd / math.sqrt(n) if n > 1 else math.inf
    if math.isinf(se):
        p = math.nan
    elif hits and wins + losses < EXACT_BELOW:
        # the interval that goes with the exact test: the normal one excluded 0 at 4 wins, 0 losses
        # (n = 6,040) beside p = 0.125
        lo, hi = exact_hit_interval(wins, losses, n)
        return lo, hi, sign_test(wins, losses)
    elif se > 0:
        p = math.erfc(abs(mean / se) / math.sqrt(2))
    else:
        p = sign_test(wins, losses)
    return mean - Z_95 * se, mean + Z_95 * se, p


def exact_hit_interval(wins: int, losses: int, n: int, alpha: float = 0.05) -> Tuple[float, float]:
    """95 % interval of a hit-rate difference (wins - losses) / n from the exact (Clopper-Pearson)
    interval of the share of wins among the m = wins + losses disagreeing queries, scaled by m / n.
    It excludes 0 exactly when :func:`sign_test` gives p < ``alpha`` (both are the equal-tailed
    binomial test at 1/2)."""
    m = wins + losses
    if m == 0:
        return 0.0, 0.0

    def tail_ge(p: float) -> float:  # P(X >= wins), X ~ Bin(m, p)
        return sum(math.comb(m, i) * p ** i * (1 - p) ** (m - i) for i in range(wins, m + 1))

    def tail_le(p: float) -> float:  # P(X <= wins)
        return sum(math.comb(m, i) * p ** i * (1 - p) ** (m - i) for i in range(0, wins + 1))

    def solve(f, target: float, increasing: bool) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (f(mid) < target) == increasing:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    p_low = 0.0 if wins == 0 else solve(tail_ge, alpha / 2, increasing=True)
    p_high = 1.0 if wins == m else solve(tail_le, alpha / 2, increasing=False)
    return m / n * (2 * p_low - 1), m / n * (2 * p_high - 1)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` against ``losses`` under p = 1/2."""
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(wins, losses) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def paired_ranks(rank_a: np.ndarray, rank_b: np.ndarray, ks: Sequence[int]) -> Dict[str, dict]:
    """Two models' ranks of the same queries' targets ((Q,) each, 1 = first; 0 = not in the list, a
    miss; MRR counts every rank > 0, so cut ranks past the list length to 0 first) -> {"Pre@k" /
    "MRR": {value, baseline_value, diff, ci_low, ci_high, p_value, wins, losses}}, as the evaluation
    job's ``metrics_paired``."""
    out = {}
    ra, rb = np.asarray(rank_a), np.asarray(rank_b)
    cols = {f"Pre@{k}": (((ra > 0) & (ra <= k)).astype(float), ((rb > 0) & (rb <= k)).astype(float)) for k in ks}
    cols["MRR"] = (np.where(ra > 0, 1.0 / np.maximum(ra, 1), 0.0), np.where(rb > 0, 1.0 / np.maximum(rb, 1), 0.0))
    for name, (a, b) in cols.items():
        d = a - b
        wins, losses = int((d > 0).sum()), int((d < 0).sum())
        lo, hi, p = paired_stats(float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0, len(d), wins, losses,
                                 hits=name != "MRR")
        out[name] = {"value": float(a.mean()), "baseline_value": float(b.mean()), "diff": float(d.mean()),
                     "ci_low": lo, "ci_high": hi, "p_value": p, "wins": wins, "losses": losses}
    return out


def p_text(p: float) -> str:
    """A p-value for a printed table: three decimals, or "<0.001"."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"  # NaN prints as nan
