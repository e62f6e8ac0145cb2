"""Uncertainty of benchmark scores: bootstrap intervals over questions and paired tests between runs.

Every function takes per-question scores (one value per question, the same questions in the same order
for paired functions): 0/1 for exact-match tasks, any number otherwise, or the mean over seeds of a
stochastic method's 0/1 scores.

* :func:`bootstrap_ci` -- percentile bootstrap interval of the mean (questions resampled with
  replacement, seeded, so a report is reproducible).
* :func:`mcnemar_p` -- exact McNemar test for two runs with 0/1 scores on the same questions: under the
  null hypothesis the questions one run gets right and the other wrong (``n01``, ``n10``) split as a fair
  coin, so ``p = min(1, 2 * P[Binomial(n01 + n10, 1/2) <= min(n01, n10)])``.
* :func:`paired_bootstrap_p` -- paired bootstrap test for any scores: resample questions, recentre the
  mean difference at zero, ``p = (1 + #{|d* - mean(d)| >= |mean(d)|}) / (1 + n_boot)``.
* :func:`paired_test` -- McNemar when both runs are 0/1, the paired bootstrap otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALPHA",
    "N_BOOT",
    "PairedTest",
    "bootstrap_ci",
    "bootstrap_means",
    "is_binary",
    "mcnemar_counts",
    "mcnemar_p",
    "paired_bootstrap_p",
    "paired_test",
]

#: Significance level of the marks in reports (two-sided).
ALPHA = 0.05
#: Bootstrap resamples used by reports.
N_BOOT = 2000


def _vector(values: Sequence[float], name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of per-question scores, got shape {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{name} holds non-finite scores ({int((~np.isfinite(x)).sum())} of {x.size}); drop them"
        )
    return x


def _check_boot(n_boot: int, level: float | None = None) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a whole number >= 1, got {n_boot!r} (reports use {N_BOOT})")
    if level is not None and not (0.0 < level < 1.0):
        raise ValueError(f"level must lie in (0, 1), got {level!r} (e.g. 0.95 for a 95 % interval)")


def is_binary(values: Sequence[float]) -> bool:
    """True when every score is exactly 0 or 1."""
    x = np.asarray(values, dtype=np.float64)
    return bool(np.all((x == 0.0) | (x == 1.0)))


def bootstrap_means(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values``, shape ``(n_boot,)``.

    Resample ``i`` takes the question indices ``rng.integers(0, n, size=(n_boot, n))[i]`` of
    ``numpy.random.default_rng(seed)``.
    """
    x = _vector(values)
    _check_boot(n_boot)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the mean of ``values``.

    The bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's default linear
    interpolation) of :func:`bootstrap_means`.
    """
    _check_boot(n_boot, level)
    means = bootstrap_means(values, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"paired scores need the same questions: got {x.size} and {y.size} scores; align them by question id"
        )
    return x, y


def mcnemar_counts(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """``(n01, n10)``: questions ``a`` gets wrong and ``b`` right, and the reverse (0/1 scores)."""
    x, y = _paired(a, b)
    if not (is_binary(x) and is_binary(y)):
        raise ValueError("McNemar's test needs 0/1 scores; use paired_bootstrap_p for other scores")
    return int(((x == 0) & (y == 1)).sum()), int(((x == 1) & (y == 0)).sum())


def mcnemar_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value of two runs with 0/1 scores on the same questions (1.0 when they agree)."""
    n01, n10 = mcnemar_counts(a, b)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap_p(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value for ``mean(a) == mean(b)`` (any scores, same questions)."""
    x, y = _paired(a, b)
    d = x - y
    obs = d.mean()
    means = bootstrap_means(d, n_boot, seed)
    extreme = int((np.abs(means - obs) >= abs(obs) - 1e-12).sum())
    return (1 + extreme) / (1 + n_boot)


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_test`: ``diff = mean(a) - mean(b)``, its p-value and the test used."""

    diff: float
    p: float
    test: str  # "mcnemar" | "paired_bootstrap"
    n: int

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def paired_test(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> PairedTest:
    """McNemar's exact test when both runs have 0/1 scores, the paired bootstrap otherwise."""
    x, y = _paired(a, b)
    diff = float(x.mean() - y.mean())
    if is_binary(x) and is_binary(y):
        return PairedTest(diff, mcnemar_p(x, y), "mcnemar", x.size)
    return PairedTest(diff, paired_bootstrap_p(x, y, n_boot, seed), "paired_bootstrap", x.size)
