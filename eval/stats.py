"""Confidence intervals and paired tests: pure functions of per-question scores.

- bootstrap_ci: percentile bootstrap of a mean (Efron & Tibshirani 1993).
- paired_bootstrap: the mean difference of two arms on the same questions, its percentile
  interval, and a two-sided p-value from the bootstrap distribution shifted to the null
  (Berg-Kirkpatrick et al. 2012 use the paired bootstrap for exactly this in NLP).
- mcnemar: exact McNemar test on paired binary outcomes (exact match), a two-sided binomial
  test on the discordant pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class PairedResult:
    """The difference of two arms (a - b) on the same questions."""

    diff: float
    ci: tuple[float, float]
    p_value: float


def bootstrap_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> PairedResult:
    """Mean of a - b, its interval, and the two-sided p-value of "no difference"."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return PairedResult(float("nan"), (float("nan"), float("nan")), float("nan"))
    observed = d.mean()
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    alpha = (1 - level) / 2
    # Shift the bootstrap distribution to mean 0 (the null) and ask how often it is as extreme.
    extreme = np.abs(means - observed) >= abs(observed) - 1e-12
    p = (extreme.sum() + 1) / (resamples + 1)
    return PairedResult(float(observed), (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))),
                        float(min(1.0, p)) if observed != 0 else 1.0)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value; 1.0 when the arms never disagree."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
