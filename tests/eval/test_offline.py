"""Offline (numpy) paired statistics at their documented switch points, and how p-values print."""
import math

import numpy as np
import pytest

from ml.eval.offline import EXACT_BELOW, Z_95, exact_hit_interval, p_text, paired_ranks, sign_test


def _pre1(wins: int, losses: int, n: int = 1000) -> dict:
    """Pre@1 of a paired comparison over n users: ``wins`` users hit only by the model, ``losses`` only
    by the baseline, 100 hit by both, the rest by neither."""
    both = 100
    a = [1] * wins + [0] * losses + [1] * both + [0] * (n - wins - losses - both)
    b = [0] * wins + [1] * losses + [1] * both + [0] * (n - wins - losses - both)
    return paired_ranks(np.array(a), np.array(b), [1])["Pre@1"]


def test_hits_switch_from_the_exact_test_to_the_z_test_at_exact_below_disagreements():
    # README: McNemar's exact test "when fewer than 50 users disagree"; from 50 on, the z test and its
    # normal interval. Both sides are pinned, so moving the switch by one user shows.
    assert EXACT_BELOW == 50
    n = 1000
    below = _pre1(33, 16, n)  # 49 disagree: exact p and the exact (Clopper-Pearson) interval
    assert below["p_value"] == sign_test(33, 16)
    assert (below["ci_low"], below["ci_high"]) == exact_hit_interval(33, 16, n)
    at = _pre1(34, 16, n)  # 50 disagree: z = mean / (sd / sqrt(n)), interval mean +- 1.96 sd / sqrt(n)
    d = np.array([1.0] * 34 + [-1.0] * 16 + [0.0] * (n - 50))
    se = d.std(ddof=1) / math.sqrt(n)
    assert at["p_value"] == pytest.approx(math.erfc(abs(d.mean() / se) / math.sqrt(2)), rel=1e-9)
    assert (at["ci_low"], at["ci_high"]) == pytest.approx((d.mean() - Z_95 * se, d.mean() + Z_95 * se), rel=1e-9)
    # the two tests really differ here (0.011 vs 0.015), so the pins above cannot both hold by accident
    assert abs(at["p_value"] - sign_test(34, 16)) > 1e-3
    # either side, the interval agrees with the p-value (excludes 0 exactly when p < 0.05)
    for r in (below, at):
        assert (r["ci_low"] > 0) == (r["p_value"] < 0.05)


def test_p_text_prints_three_decimals_or_below_one_in_a_thousand():
    # a tiny p must not print as "0.000" (read as impossible); p = 0.001 itself is not "< 0.001"
    assert p_text(1e-12) == "<0.001" and p_text(0.000999) == "<0.001"
    assert p_text(0.001) == "0.001" and p_text(0.0123) == "0.012" and p_text(1.0) == "1.000"
    assert p_text(math.nan) == "nan"  # one user: no p-value
