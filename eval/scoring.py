"""From answers to numbers: per-question scores, per-arm summaries, tests against rag, the verdict."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean
from typing import Any

import numpy as np

from eval.arms import Answer, EvalQuestion
from eval.hits import recall
from eval.metrics import contains, exact_match, rouge_l, token_f1
from eval.rag import Chunk
from eval.stats import cluster_bootstrap_ci, mcnemar, paired_cluster_bootstrap

ALPHA = 0.05  # significance level of the verdict


def score(question: EvalQuestion, answer: Answer) -> dict[str, float]:
    """Every metric of one answer."""
    golds = question.answers
    return {"em": exact_match(answer.text, golds), "f1": token_f1(answer.text, golds),
            "rouge_l": rouge_l(answer.text, golds), "contains": contains(answer.text, golds)}


def summarize(scores: dict[str, list[dict[str, float]]], answers: dict[str, list[Answer]],
              resamples: int, seed: int, clusters: Sequence[str | None] | None = None) -> dict[str, dict[str, Any]]:
    """Per arm: means, F1 interval, latency, tokens, and paired tests against rag. `clusters[i]`
    is question i's source document (intervals and tests resample documents); None treats every
    question as its own document, which overstates precision when documents hold several."""
    out = {}
    rag = scores.get("rag")
    docs = list(clusters) if clusters is not None else [None] * len(next(iter(scores.values()), []))
    for arm, rows in scores.items():
        f1 = [r["f1"] for r in rows]
        latency = [a.latency_s for a in answers[arm]]
        summary = {"n": len(rows), "em": mean(r["em"] for r in rows), "f1": mean(f1),
                   "f1_ci": list(cluster_bootstrap_ci(f1, docs, resamples, seed, bounds=(0.0, 1.0))),
                   "rouge_l": mean(r["rouge_l"] for r in rows),
                   "contains": mean(r["contains"] for r in rows),
                   "latency_p50_s": float(np.percentile(latency, 50)), "latency_p95_s": float(np.percentile(latency, 95)),
                   "generated_tokens": mean(a.new_tokens for a in answers[arm]),
                   **prompt_fitting(answers[arm]),
                   "p_value_vs_rag": None, "p_value_em_vs_rag": None, "f1_diff_vs_rag": None, "f1_diff_ci_vs_rag": None}
        if rag is not None and arm != "rag":
            paired = paired_cluster_bootstrap(f1, [r["f1"] for r in rag], docs, resamples, seed,
                                              bounds=(-1.0, 1.0))
            summary.update({"p_value_vs_rag": paired.p_value, "f1_diff_vs_rag": paired.diff,
                            "f1_diff_ci_vs_rag": list(paired.ci),
                            "p_value_em_vs_rag": mcnemar([r["em"] == 1 for r in rows], [r["em"] == 1 for r in rag])})
        out[arm] = summary
    return out


def prompt_fitting(answers: Sequence[Answer]) -> dict[str, float | int]:
    """What fitting prompts to the context cost an arm: mean passages kept, passages dropped
    (in all), answers whose passage [1] was cut (eval.prompts.fit_message)."""
    return {"passages_kept": mean(a.passages_kept for a in answers) if answers else 0.0,
            "passages_dropped": sum(a.passages_dropped for a in answers),
            "first_passage_cut": sum(a.first_cut for a in answers)}


def recall_at(questions: Sequence[EvalQuestion], retrieved: Sequence[Sequence[int]], chunks: Sequence[Chunk],
              k: int) -> dict[str, float]:
    """recall@1, @5 and @k by the lenient rule (eval.hits.lenient_hit), the metric eval reported
    before strict hits; eval.hits.recall gives strict and lenient, and recall at the depth seen."""
    return recall(questions, retrieved, chunks, k).lenient


def verdict(arms: dict[str, dict[str, Any]]) -> str:
    """One line: which arm wins on F1 against rag, by how much, with its interval and p-value."""
    if "rag" not in arms:
        best = max((a for a in arms if a != "gold"), key=lambda a: arms[a]["f1"], default=None)
        return f"{best} has the best F1 ({arms[best]['f1']:.3f}); no rag arm to test against" if best else "no arms"
    contenders = [a for a in arms if a not in ("rag", "gold")]
    if not contenders:
        return f"rag F1 {arms['rag']['f1']:.3f}; no other arm to compare"
    best = max(contenders, key=lambda a: arms[a]["f1"])
    s = arms[best]
    diff, (lo, hi), p = s["f1_diff_vs_rag"], s["f1_diff_ci_vs_rag"], s["p_value_vs_rag"]
    detail = f"F1 {s['f1']:.3f} vs {arms['rag']['f1']:.3f}, difference {diff:+.3f} (95% CI [{lo:+.3f}, {hi:+.3f}], p={p:.3g})"
    if p >= ALPHA:
        return f"no significant difference between {best} (the best other arm) and rag: {detail}"
    if diff > 0:
        return f"{best} beats rag on F1: {detail}"
    return f"rag beats every other arm on F1; against the closest, {best}: {detail}"
