"""The verdict: does fine-tuning beat retrieval on this team's questions? Data plus one sentence,
from per-question F1 of every arm and the source document of every question.

Why it is built this way:
- One primary question, the one reviewers ask: `finetuned` (closed book) vs `rag`. One
  secondary: `finetuned+rag` vs the better of the two by observed mean F1 (does combining them
  beat the best single approach?). A comparison is made only when both its arms are present.
  Picking the comparator by observed mean does not inflate false wins: the difference from
  the larger of two means is biased, but so is its spread; with Holm, 10,000 simulated null
  evals (40 documents, tests/eval/test_verdict.py's null_evaluation) named a false winner 4.45%
  of the time (Monte Carlo SE 0.21%); without it, 8.6%.
- Testing only the best of several arms against rag names a false winner too often (a null
  simulation of the old verdict: about 7% at alpha 0.05). Every comparison made is tested, and
  Holm's correction over them keeps the chance of naming any false winner at alpha or below
  (tests/eval/test_verdict.py simulates it).
- References never win and never enter a comparison: `gold` (given the source passage) is an
  upper bound, `rag-extractive` (a retrieved sentence, not a generated answer) a probe of
  retrieval. `reader` (rag's generator, closed book) is a control for reading rag's gain as
  retrieval rather than a better generator. All three are reported in `means`, nothing more.
- Questions of one document are correlated, so intervals and p-values come from a paired
  bootstrap-t over documents (`eval.stats.paired_cluster_bootstrap`); its interval and p-value
  come from one distribution and cannot disagree.
- "No significant difference" is not "equal": that sentence gives the interval and the minimum
  detectable difference. Under MIN_QUESTIONS questions no winner is named.
- An arm that answers empty (nothing left after normalisation) to DEGENERATE_EMPTY of the
  questions or more is failing to answer, not answering wrong: its F1 of ~0 says nothing of what it
  knows, and a comparison it enters says nothing of which approach is better. The sentence then
  opens with a caution naming it. The statistics and the winner rule do not change: a caution
  informs the reader, it cannot make or unmake a winner (so the null simulation holds as is).

The interval in the sentence is the unadjusted (1 - alpha) interval of the difference; the
p-values are given Holm-adjusted and unadjusted, each labelled. A winner needs the
Holm-adjusted p < alpha.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from eval.stats import PairedResult, holm, min_detectable_difference, paired_cluster_bootstrap

PRIMARY = ("finetuned", "rag")  # the comparison reviewers ask for: fine-tune vs retrieval
COMBINED = "finetuned+rag"  # secondary: against the better of PRIMARY
REFERENCES = frozenset({"gold", "rag-extractive"})  # never a winner, never compared
CONTROLS = frozenset({"reader"})  # reported, never compared
# Below 30 questions a bootstrap interval is unreliable (the resamples hold too few distinct
# values) and only huge differences would be detectable: no winner is named.
MIN_QUESTIONS = 30
POWER = 0.8  # of the minimum detectable difference
DEGENERATE_EMPTY = 0.5  # share of empty answers from which an arm is said not to answer
DIFF_RANGE = (-1.0, 1.0)  # a difference of two F1 means; intervals are clipped to it


class Outcome(str, Enum):
    """What a comparison could conclude."""

    SIGNIFICANT = "significant"  # Holm-adjusted p < alpha: a winner
    NOT_SIGNIFICANT = "not significant"
    TIE = "tie"  # identical scores on every question
    TOO_FEW = "too few questions"  # n < MIN_QUESTIONS
    NOT_COMPUTABLE = "not computable"  # no questions, or NaN scores
    ONE_DOCUMENT = "one document"  # every question from one document: nothing to resample


@dataclass(frozen=True)
class Comparison:
    """Arm a against arm b on F1 (points in [0, 1]), on the same questions."""

    a: str
    b: str
    mean_a: float
    mean_b: float
    diff: float  # mean of a - b over the questions
    ci: tuple[float, float]  # unadjusted (1 - alpha) bootstrap-t interval of diff, documents resampled
    p: float  # unadjusted two-sided p-value of "no difference", from the same resamples
    p_adjusted: float  # Holm over the comparisons of the verdict
    n: int  # questions
    n_clusters: int  # documents
    mdd: float  # minimum detectable difference (POWER, two-sided alpha, before Holm)
    n_invalid: int  # questions where a or b has a NaN score
    outcome: Outcome
    winner: str | None  # None unless the Holm-adjusted p < alpha

    def to_dict(self) -> dict[str, Any]:
        """A dict that json.dumps accepts with allow_nan=False: NaN becomes None."""
        return {k: _plain(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Verdict:
    """The comparisons made, every arm's mean F1, and one sentence that says what they show."""

    sentence: str
    comparisons: list[Comparison]
    means: dict[str, float]  # mean F1 of every arm given, references and controls included
    alpha: float
    resamples: int
    cautions: list[str] = field(default_factory=list)  # compared arms that do not answer (DEGENERATE_EMPTY)

    def to_dict(self) -> dict[str, Any]:
        """A dict that json.dumps accepts with allow_nan=False: NaN becomes None."""
        return {"sentence": self.sentence, "comparisons": [c.to_dict() for c in self.comparisons],
                "means": {k: _plain(v) for k, v in self.means.items()}, "alpha": self.alpha,
                "resamples": self.resamples, "cautions": list(self.cautions)}


def _plain(value: Any) -> Any:
    """JSON-safe: NaN -> None, tuples -> lists, enums -> their value."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _mean(x: np.ndarray) -> float:
    """Mean score; NaN when there are no questions or any score is NaN."""
    return float(x.mean()) if len(x) else float("nan")


def plan(means: Mapping[str, float]) -> list[tuple[str, str]]:
    """The comparisons to make, given the arms present and their mean F1: the primary if both
    its arms are there; the secondary if COMBINED and at least one of PRIMARY are. The better
    of PRIMARY is the one with the higher mean (NaN counts as lowest; a tie goes to rag)."""
    pairs = [PRIMARY] if all(arm in means for arm in PRIMARY) else []
    singles = [arm for arm in PRIMARY if arm in means]
    if COMBINED in means and singles:
        def rank(arm: str) -> tuple[float, bool]:
            return (-math.inf if math.isnan(means[arm]) else means[arm], arm == "rag")
        pairs.append((COMBINED, max(singles, key=rank)))
    return pairs


def _outcome(d: np.ndarray, r: PairedResult, p_adjusted: float, alpha: float) -> tuple[Outcome, int]:
    """The outcome of one comparison, and its winner's side: +1 for a, -1 for b, 0 for none.
    A winner needs the Holm-adjusted p < alpha (then the raw p < alpha too, so the interval, which
    is centred on the difference, excludes 0 on the difference's side)."""
    if not np.isfinite(r.diff):
        return Outcome.NOT_COMPUTABLE, 0
    if r.n < MIN_QUESTIONS:
        return Outcome.TOO_FEW, 0
    if not d.any():
        return Outcome.TIE, 0
    if r.n_clusters < 2:
        return Outcome.ONE_DOCUMENT, 0
    if p_adjusted < alpha and r.ci[0] > 0:
        return Outcome.SIGNIFICANT, 1
    if p_adjusted < alpha and r.ci[1] < 0:
        return Outcome.SIGNIFICANT, -1
    return Outcome.NOT_SIGNIFICANT, 0


def decide(scores: Mapping[str, Sequence[float]], clusters: Sequence[str | None], resamples: int, seed: int,
           alpha: float = 0.05, empty_rates: Mapping[str, float] | None = None) -> Verdict:
    """The verdict on per-question F1 in [0, 1] of each arm (`scores[arm][i]`: question i, every
    arm on the same questions in the same order; NaN is reported, not dropped) with
    `clusters[i]` the source document of question i (None: a question of its own). `resamples`
    bootstrap resamples (2000 is usual; at least 1 / alpha), `seed` makes them reproducible;
    `alpha` is the family-wise error rate: the chance of naming any winner when no arm is
    better. Holm runs over every comparison made that has a p-value. `empty_rates[arm]`: the
    share of the arm's answers that were empty; a compared arm at DEGENERATE_EMPTY or above gets
    a caution at the head of the sentence."""
    arms = {arm: np.asarray(v, dtype=float).reshape(-1) for arm, v in scores.items()}
    for arm, x in arms.items():
        if len(x) != len(clusters):
            raise ValueError(f"arm {arm!r} has {len(x)} scores but there are {len(clusters)} questions")
        if np.any((x < 0.0) | (x > 1.0)):  # NaN passes: it is reported, not refused
            raise ValueError(f"arm {arm!r} has F1 scores outside [0, 1]")
    means = {arm: _mean(x) for arm, x in arms.items()}
    pairs = plan(means)
    results = [paired_cluster_bootstrap(arms[a], arms[b], clusters, resamples, seed, 1.0 - alpha, DIFF_RANGE)
               for a, b in pairs]
    adjusted = holm([r.p_value for r in results])
    comparisons = []
    for (a, b), r, p_adjusted in zip(pairs, results, adjusted):
        d = arms[a] - arms[b]
        outcome, side = _outcome(d, r, p_adjusted, alpha)
        comparisons.append(Comparison(
            a=a, b=b, mean_a=means[a], mean_b=means[b], diff=r.diff, ci=r.ci, p=r.p_value, p_adjusted=p_adjusted,
            n=r.n, n_clusters=r.n_clusters, mdd=min_detectable_difference(d, clusters, alpha, POWER),
            n_invalid=int(np.count_nonzero(~np.isfinite(d))), outcome=outcome,
            winner={1: a, -1: b}.get(side)))
    tested = sum(not math.isnan(c.p) for c in comparisons)
    cautions = _cautions(comparisons, empty_rates or {})
    sentence = _sentence(comparisons, means, alpha, tested)
    if cautions:
        sentence = (f"caution: {'; '.join(cautions)}, so a comparison with such an arm says nothing about "
                    f"what its model knows; {sentence}")
    return Verdict(sentence, comparisons, means, alpha, resamples, cautions)


def _cautions(comparisons: list[Comparison], empty_rates: Mapping[str, float]) -> list[str]:
    """One phrase per compared arm that answered empty at DEGENERATE_EMPTY or more, in order of
    appearance."""
    arms = dict.fromkeys(arm for c in comparisons for arm in (c.a, c.b))
    return [f"{arm} gave an empty answer to {empty_rates[arm]:.0%} of the questions" for arm in arms
            if empty_rates.get(arm, 0.0) >= DEGENERATE_EMPTY]


def _p(p: float) -> str:
    return f"{p:.2g}"


def _numbers(c: Comparison, alpha: float, tested: int, flip: bool) -> str:
    """The parenthesis: interval (of b - a when `flip`), both p-values, questions and documents."""
    lo, hi = (-c.ci[1], -c.ci[0]) if flip else c.ci
    return (f"({1 - alpha:.0%} CI [{lo:+.3f}, {hi:+.3f}], unadjusted; Holm-adjusted p={_p(c.p_adjusted)} over "
            f"{tested} comparison{'s' if tested != 1 else ''}, unadjusted p={_p(c.p)}; "
            f"{c.n} questions in {c.n_clusters} documents)")


def _clause(c: Comparison, alpha: float, tested: int) -> str:
    """What one comparison shows, in words, for every outcome."""
    scores = f"{c.mean_a:.3f} vs {c.mean_b:.3f}"
    if c.outcome is Outcome.SIGNIFICANT:
        loser = c.b if c.winner == c.a else c.a
        flip = c.winner == c.b
        won, lost, diff = (c.mean_b, c.mean_a, -c.diff) if flip else (c.mean_a, c.mean_b, c.diff)
        return (f"{c.winner} beats {loser} on F1: {won:.3f} vs {lost:.3f}, difference {diff:+.3f} "
                f"{_numbers(c, alpha, tested, flip)}")
    if c.outcome is Outcome.NOT_SIGNIFICANT:
        holm_note = ("; the unadjusted interval excludes 0, but the difference does not survive Holm's correction"
                     if c.p < alpha else "")
        return (f"no significant difference between {c.a} and {c.b} on F1: {scores}, difference {c.a} - {c.b} "
                f"{c.diff:+.3f} {_numbers(c, alpha, tested, False)}{holm_note}; the minimum detectable difference "
                f"is {c.mdd:.3f} ({POWER:.0%} power, two-sided alpha {alpha:g}, before Holm), so a smaller true "
                "difference is not ruled out")
    if c.outcome is Outcome.TIE:
        return f"{c.a} and {c.b} tie on F1: identical scores on all {c.n} questions ({c.mean_a:.3f})"
    if c.outcome is Outcome.TOO_FEW:
        return (f"too few questions to compare {c.a} and {c.b}: {c.n} (fewer than {MIN_QUESTIONS}); F1 {scores}, "
                "no winner named")
    if c.outcome is Outcome.ONE_DOCUMENT:
        return (f"{c.a} vs {c.b}: all {c.n} questions come from one document, so resampling documents cannot "
                f"estimate the uncertainty; F1 {scores}, difference {c.diff:+.3f}, no winner named")
    why = "no questions" if c.n == 0 else f"{c.n_invalid} of {c.n} questions have a NaN score"
    return f"{c.a} vs {c.b} cannot be computed: {why}; no winner named"


def _sentence(comparisons: list[Comparison], means: Mapping[str, float], alpha: float, tested: int) -> str:
    """One line: the primary comparison (or why it was not made), then the secondary."""
    present = ", ".join(sorted(means)) or "none"
    if not comparisons:
        return f"nothing to compare: the verdict needs {PRIMARY[0]} and {PRIMARY[1]} (arms here: {present})"
    clauses = [_clause(c, alpha, tested) for c in comparisons]
    if (comparisons[0].a, comparisons[0].b) != PRIMARY:
        missing = " and ".join(arm for arm in PRIMARY if arm not in means)
        clauses.insert(0, f"{PRIMARY[0]} vs {PRIMARY[1]} not compared: no {missing} arm")
    return clauses[0] + "".join(f"; secondary: {c}" for c in clauses[1:])
