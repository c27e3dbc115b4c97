"""From answers to numbers: per-question scores, per-arm summaries, failure rates, the split by
whether retrieval found the source, and the questions where the arms disagree.

An arm that does not apply to a question (`gold` without a known source passage) has None for
its answer there; its scores are NaN and its summary counts only the questions it answered.
The verdict itself is eval/verdict.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import mean
from typing import Any

import numpy as np

from eval.arms import ARMS, Answer, EvalQuestion
from eval.metrics import contains, exact_match, normalize_answer, rouge_l, token_f1
from eval.stats import cluster_bootstrap_ci

METRICS = ("em", "f1", "rouge_l", "contains")
# An answer of at least this many words whose distinct words are under REPETITIVE_SHARE of
# them loops ("theself, theself, theself"): a degenerate generation, not a wrong fact.
REPETITIVE_MIN_WORDS, REPETITIVE_SHARE = 6, 0.5
DISAGREEMENTS = 10


def score(question: EvalQuestion, answer: Answer | None) -> dict[str, float]:
    """Every metric of one answer (NaN where the arm does not apply to the question)."""
    if answer is None:
        return {m: math.nan for m in METRICS}
    golds = question.answers
    return {"em": exact_match(answer.text, golds), "f1": token_f1(answer.text, golds),
            "rouge_l": rouge_l(answer.text, golds), "contains": contains(answer.text, golds)}


def is_repetitive(text: str) -> bool:
    """True for a long answer made of few distinct words (a generation stuck in a loop)."""
    words = normalize_answer(text).split()
    return len(words) >= REPETITIVE_MIN_WORDS and len(set(words)) < REPETITIVE_SHARE * len(words)


def failure_rates(answers: Sequence[Answer], max_new_tokens: int, generated: bool) -> dict[str, float]:
    """Shares of answers that are empty (nothing left after normalisation), unfinished (the
    generation hit max_new_tokens without ending) or repetitive: formatting failures, which a
    reviewer must not read as missing knowledge."""
    n = max(1, len(answers))
    return {"empty_rate": sum(not normalize_answer(a.text) for a in answers) / n,
            "unfinished_rate": sum(a.new_tokens >= max_new_tokens for a in answers) / n if generated else 0.0,
            "repetitive_rate": sum(is_repetitive(a.text) for a in answers) / n}


def prompt_fitting(answers: Sequence[Answer]) -> dict[str, float | int]:
    """What fitting prompts to the context cost an arm: mean passages kept, passages dropped
    (in all), answers whose passage [1] was cut (eval.prompts.fit_message)."""
    return {"passages_kept": mean(a.passages_kept for a in answers) if answers else 0.0,
            "passages_dropped": sum(a.passages_dropped for a in answers),
            "first_passage_cut": sum(a.first_cut for a in answers)}


def summarize(qs: Sequence[EvalQuestion], answers: Mapping[str, Sequence[Answer | None]],
              scores: Mapping[str, Sequence[dict[str, float]]], resamples: int, seed: int,
              max_new_tokens: int) -> dict[str, dict[str, Any]]:
    """Per arm, over the questions it answered: mean EM, F1 (95% interval, documents resampled),
    ROUGE-L, contains, failure rates, prompt fitting, latency and generated tokens."""
    out = {}
    for arm, rows in scores.items():
        done = [i for i, a in enumerate(answers[arm]) if a is not None]
        given = [answers[arm][i] for i in done]
        f1 = [rows[i]["f1"] for i in done]
        latency = [a.latency_s for a in given] or [math.nan]
        out[arm] = {
            "role": ARMS[arm].role, "n": len(done), "not_applicable": len(qs) - len(done),
            **{m: mean(rows[i][m] for i in done) if done else math.nan for m in METRICS},
            "f1_ci": list(cluster_bootstrap_ci(f1, [qs[i].doc_id for i in done], resamples, seed, bounds=(0.0, 1.0))),
            **failure_rates(given, max_new_tokens, ARMS[arm].generator is not None), **prompt_fitting(given),
            "latency_p50_s": float(np.percentile(latency, 50)), "latency_p95_s": float(np.percentile(latency, 95)),
            "generated_tokens": mean(a.new_tokens for a in given) if given else math.nan,
        }
    return out


def by_retrieval(scores: Mapping[str, Sequence[dict[str, float]]], found: Sequence[bool]) -> list[dict[str, Any]]:
    """Mean F1 of every arm on the questions whose source passage retrieval put in front of the
    generator, and on the rest (each arm over the questions it answered)."""
    rows = []
    for subset, want in (("source retrieved", True), ("source missed", False)):
        idx = [i for i, f in enumerate(found) if f == want]
        f1 = {}
        for arm, rows_ in scores.items():
            values = [rows_[i]["f1"] for i in idx if not math.isnan(rows_[i]["f1"])]
            f1[arm] = mean(values) if values else None
        rows.append({"subset": subset, "n": len(idx), "f1": f1})
    return rows


def disagreements(qs: Sequence[EvalQuestion], answers: Mapping[str, Sequence[Answer | None]],
                  scores: Mapping[str, Sequence[dict[str, float]]]) -> list[dict[str, Any]]:
    """The questions where the arms' F1 spread most, with every arm's answer beside the reference."""
    def spread(i: int) -> float:
        values = [scores[a][i]["f1"] for a in scores if not math.isnan(scores[a][i]["f1"])]
        return max(values) - min(values) if values else 0.0

    order = sorted(range(len(qs)), key=lambda i: (-spread(i), qs[i].id))
    return [{"question": qs[i].question, "reference": qs[i].answers[0],
             "answers": {a: (answers[a][i].text if answers[a][i] is not None else None) for a in answers}}
            for i in order[:DISAGREEMENTS]]
