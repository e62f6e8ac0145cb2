"""Bootstrap intervals and paired tests (vtc.eval.stats) against hand computations and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vtc.eval.stats import (
    bootstrap_ci,
    bootstrap_means,
    mcnemar_counts,
    mcnemar_p,
    paired_bootstrap_p,
    paired_test,
)


def _pairs(n01: int, n10: int, n11: int, n00: int) -> tuple[list[int], list[int]]:
    a = [0] * n01 + [1] * n10 + [1] * n11 + [0] * n00
    b = [1] * n01 + [0] * n10 + [1] * n11 + [0] * n00
    return a, b


def test_mcnemar_equals_hand_computation():
    # 3 questions only b gets right, 10 only a gets right, 20 both, 7 neither.
    a, b = _pairs(3, 10, 20, 7)
    assert mcnemar_counts(a, b) == (3, 10)
    # P[Bin(13, 1/2) <= 3] = (C(13,0) + C(13,1) + C(13,2) + C(13,3)) / 2^13 = (1 + 13 + 78 + 286) / 8192
    assert mcnemar_p(a, b) == pytest.approx(2 * 378 / 8192, abs=1e-15)
    assert mcnemar_p(b, a) == mcnemar_p(a, b)
    # 0 vs 6 discordant: 2 / 64
    assert mcnemar_p(*_pairs(0, 6, 4, 0)) == pytest.approx(2 / 64, abs=1e-15)
    # balanced discordant pairs: P[Bin(4, 1/2) <= 2] = 11/16 -> p = 1 (capped)
    assert mcnemar_p(*_pairs(2, 2, 5, 5)) == 1.0
    assert mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0


def test_mcnemar_matches_scipy_binomial_test():
    from scipy.stats import binomtest

    for n01, n10 in [(1, 9), (4, 17), (30, 12), (0, 1)]:
        a, b = _pairs(n01, n10, 5, 5)
        ref = binomtest(min(n01, n10), n01 + n10, 0.5).pvalue
        assert mcnemar_p(a, b) == pytest.approx(ref, rel=1e-12)


def test_one_question_difference_is_not_significant():
    a = [1] * 300 + [0] * 100
    b = list(a)
    b[0] = 0
    t = paired_test(a, b)
    assert t.test == "mcnemar" and t.p == 1.0 and not t.significant
    assert t.diff == pytest.approx(1 / 400)


def test_bootstrap_ci_equals_hand_computation():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    n_boot, seed = 9, 11
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):  # one resample at a time, a plain loop
        idx = rng.integers(0, len(values), size=len(values))
        means.append(sum(values[i] for i in idx) / len(values))
    means.sort()

    def quantile(q):  # linear interpolation between order statistics, written out
        h = (n_boot - 1) * q
        lo = math.floor(h)
        return means[lo] + (h - lo) * (means[min(lo + 1, n_boot - 1)] - means[lo])

    lo, hi = bootstrap_ci(values, level=0.9, n_boot=n_boot, seed=seed)
    assert lo == pytest.approx(quantile(0.05), abs=1e-12)
    assert hi == pytest.approx(quantile(0.95), abs=1e-12)
    assert np.allclose(sorted(bootstrap_means(values, n_boot, seed)), means)


def test_bootstrap_ci_of_a_proportion_matches_the_binomial():
    # For 0/1 scores the bootstrap mean is Binomial(n, p_hat) / n: its quantiles are the interval's limit.
    from scipy.stats import binom

    n, k = 80, 60
    values = [1] * k + [0] * (n - k)
    lo, hi = bootstrap_ci(values, n_boot=40000, seed=1)
    ref_lo, ref_hi = binom.ppf([0.025, 0.975], n, k / n) / n
    assert abs(lo - ref_lo) <= 1 / n + 1e-9 and abs(hi - ref_hi) <= 1 / n + 1e-9
    assert lo < k / n < hi


def test_paired_bootstrap_hand_computation_and_identity():
    a = [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1 / 3]
    b = [0.0, 0.0, 1.0, 1.0, 2 / 3, 0.0]
    n_boot, seed = 50, 4
    d = [x - y for x, y in zip(a, b)]
    obs = sum(d) / len(d)
    rng = np.random.default_rng(seed)
    extreme = 0
    for _ in range(n_boot):
        idx = rng.integers(0, len(d), size=len(d))
        m = sum(d[i] for i in idx) / len(d)
        extreme += abs(m - obs) >= abs(obs) - 1e-12
    assert paired_bootstrap_p(a, b, n_boot, seed) == pytest.approx((1 + extreme) / (1 + n_boot))
    assert paired_bootstrap_p(a, a, n_boot, seed) == 1.0
    t = paired_test(a, b, n_boot, seed)
    assert t.test == "paired_bootstrap" and t.diff == pytest.approx(obs)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same questions"):
        paired_test([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1 scores"):
        mcnemar_p([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1, 0], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1, 0], n_boot=0)
