"""Answer metrics: pure functions of (prediction, gold answers).

Exact match and token F1 use SQuAD's normalisation (lower case, no punctuation, no articles,
single spaces; Rajpurkar et al. 2016); with several gold answers, the best one counts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching gold answer."""
    return max(_f1(prediction, g) for g in golds)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, golds: Sequence[str]) -> float:
    """ROUGE-L F-measure (LCS of normalised tokens) against the best gold answer."""
    best = 0.0
    p = normalize_answer(prediction).split()
    for gold in golds:
        g = normalize_answer(gold).split()
        lcs = _lcs(p, g) if p and g else 0
        if lcs:
            precision, recall = lcs / len(p), lcs / len(g)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def words_in(needle: str, haystack: str) -> bool:
    """`needle` occurs in `haystack` as a run of whole tokens; both already normalised
    (single spaces), so "1" is not in "10" and "none" is not in "nonetheless"."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def contains(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when a normalised gold answer appears in the normalised prediction as whole tokens.

    Matching is on SQuAD-normalised text, where punctuation is deleted, not spaced: the
    gold "PriorityQueue" is not in "queue.PriorityQueue()" (normalised "queuepriorityqueue").
    """
    p = normalize_answer(prediction)
    return float(any(words_in(normalize_answer(g), p) for g in golds))


def empty_golds(golds: Sequence[str]) -> list[str]:
    """The gold answers SQuAD normalisation reduces to nothing ("The", "?!", "..."): no
    prediction can match them but an empty one, so they must be refused, not scored."""
    return [g for g in golds if not normalize_answer(g)]
