"""eval: the fine-tuned model against the FAISS RAG baseline on the same questions, and the report.

Reads:   Q&A pairs (the held-out split; or `eval.score_questions`), the finetuned model, the
         base model (the rag arm's generator), the index, and every upstream artifact's record
         (wall times, lineage counts) and loss curve for the report.
Writes:  answers.jsonl (every question, every arm's answer, scores and retrieved chunk ids),
         summary.json, report.md, report.html (self-contained), f1.png, loss.png.
Metrics: {"retrieval": {"recall@1", "recall@5", "recall@k"}, "arms": {arm: {em, f1, f1_ci,
         rouge_l, contains, latency_p50_s, p_value_vs_rag, ...}}, "verdict": "..."}
Alone:   gristmill run SPEC --only eval; gristmill eval SPEC --questions FILE
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_specs.errors import InputError
from data_specs.schema import EvalSpec
from eval.arms import Answer, EvalQuestion, ExtractiveArm, GeneratorArm, retrieve, source_passage
from eval.questions import load_questions
from eval.rag import Chunk
from eval.report import charts, write_report
from eval.scoring import recall_at, score, summarize, verdict
from tasks.core.artifacts import Index, Model, Pairs, Report
from tasks.core.jsonl import read_jsonl, write_jsonl
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.train.loading import load_embedder

DISAGREEMENTS = 10


@dataclass(frozen=True)
class EvalInputs:
    finetuned: Model  # the closed-book arms' generator
    base: Model  # the rag arm's generator
    pairs: Pairs
    index: Index


def questions(cfg: EvalSpec, inputs: EvalInputs, where: Path) -> tuple[list[EvalQuestion], str]:
    """(questions, where they came from): a file given to `gristmill eval`, else qa's eval split."""
    if cfg.score_questions:
        qs = load_questions(cfg.score_questions)
        source = f"question file {cfg.score_questions.name}"
    else:
        rows = inputs.pairs.held_out()
        qs = [EvalQuestion(r["id"], r["question"], tuple(r.get("answers") or [r["answer"]]), r.get("doc_id"),
                           tuple(r["span"]) if r.get("span") else None) for r in rows]
        source = "the qa stage's held-out questions" if not cfg.questions else "the reviewer's question file"
    qs = sorted(qs, key=lambda q: q.id)[: cfg.max_questions]
    if not qs:
        raise InputError(f"{where}: eval: no questions to evaluate (qa held out none; raise qa.eval_fraction "
                         "or give eval.questions)")
    return qs, source


def load_index(index: Index, ctx: RunContext):
    """(chunks, FAISS index, embedder) of the index artifact; the embedder is the one it holds."""
    import faiss

    chunks = [Chunk(**row) for row in read_jsonl(index.path / Index.CHUNKS)]
    embedder = load_embedder(index.folder, ctx.device, trust_remote_code=ctx.trust_remote_code)
    return chunks, faiss.read_index(str(index.path / Index.FAISS)), embedder


def run_arms(cfg: EvalSpec, inputs: EvalInputs, ctx: RunContext, qs: list[EvalQuestion], chunks, index,
             embedder) -> tuple[dict, list]:
    """Every arm's answers, and the retrieved chunk ids per question."""
    # Retrieve at least 5 so recall@5 is measured; the arms read the top k.
    retrieval = retrieve(embedder, index, qs, max(cfg.k, 5))
    chunks_by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        chunks_by_doc.setdefault(c.doc_id, []).append(c)
    gold = [source_passage(q, chunks_by_doc) for q in qs]
    top = lambda i: [chunks[c].text for c in retrieval.ids[i][: cfg.k]]
    with_ids = lambda i: (tuple(retrieval.ids[i][: cfg.k]), retrieval.latency_s[i])
    no_ids = lambda i: ((), 0.0)
    models = {}

    def model(name: str):
        if name not in models:
            m, tok = (inputs.finetuned if name == "finetuned" else inputs.base).load(ctx.trust_remote_code)
            models[name] = (m.to(ctx.device), tok)
        return models[name]

    plans = {"finetuned": ("finetuned", lambda i: None, no_ids), "rag": ("base", top, with_ids),
             "finetuned+rag": ("finetuned", top, with_ids),
             "gold": ("finetuned", lambda i: [gold[i].text] if gold[i] else None, no_ids)}
    answers: dict[str, list[Answer]] = {}
    for arm in cfg.arms:
        if arm == "rag-extractive":
            answers[arm] = ExtractiveArm(embedder, chunks, retrieval, cfg.k).answer_many(qs)
            continue
        which, contexts, ids = plans[arm]
        m, tok = model(which)
        answers[arm] = GeneratorArm(arm, m, tok, contexts, ids, cfg.max_new_tokens, cfg.batch_size).answer_many(qs)
    return answers, retrieval.ids


def stage_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """Wall time, device and GPU-hours of every upstream stage, from its record."""
    rows = []
    for name, record in ctx.lineage.items():
        device = record.key.get("resolved", {}).get("device", "cpu")
        gpus = record.metrics.get("processes", 1) if device == "cuda" else 0
        rows.append({"stage": name, "fingerprint": record.fingerprint, "wall_s": record.wall_s,
                     "device": device, "gpu_hours": round(gpus * record.wall_s / 3600, 4) if gpus else None})
    return rows


def lineage_counts(ctx: RunContext) -> dict[str, Any]:
    """Documents through every data stage, and the Q&A pairs, from the upstream records."""
    out: dict[str, Any] = {}
    for name, record in ctx.lineage.items():
        m = record.metrics
        if "documents_in" in m and not out:
            out[f"documents into {name}"] = m["documents_in"]
        if "documents_out" in m:
            out[f"documents after {name}"] = m["documents_out"]
        if "exact_duplicates" in m:
            out[f"duplicates removed by {name} (exact / near)"] = f"{m['exact_duplicates']} / {m['near_duplicates']}"
        if "pairs_kept" in m:
            out.update({"Q&A pairs kept": m["pairs_kept"], "train pairs (with paraphrases)": m["train"],
                        "held-out eval pairs": m["eval"]})
    return out


def disagreements(qs, answers, scores) -> list[dict[str, Any]]:
    """The questions where the arms' F1 spread most, with every arm's answer."""
    arms = list(answers)
    spread = sorted(range(len(qs)), key=lambda i: -(max(scores[a][i]["f1"] for a in arms) - min(scores[a][i]["f1"] for a in arms)))
    return [{"question": qs[i].question, "gold": qs[i].answers[0], "answers": {a: answers[a][i].text for a in arms}}
            for i in spread[:DISAGREEMENTS]]


def build(cfg: EvalSpec, inputs: EvalInputs, out: Path, ctx: RunContext) -> Metrics:
    """Answers every question with every arm, scores them, and writes the report."""
    qs, source = questions(cfg, inputs, ctx.spec_path)
    chunks, index, embedder = load_index(inputs.index, ctx)
    answers, retrieved = run_arms(cfg, inputs, ctx, qs, chunks, index, embedder)
    scores = {arm: [score(q, a) for q, a in zip(qs, rows)] for arm, rows in answers.items()}
    arms = summarize(scores, answers, cfg.bootstrap, cfg.seed)
    retrieval = recall_at(qs, retrieved, chunks, cfg.k)
    summary = {"questions": len(qs), "question_source": source,
               "max_new_tokens": cfg.max_new_tokens, "arms": arms, "retrieval": retrieval,
               "verdict": verdict(arms), "stages": stage_rows(ctx), "lineage": lineage_counts(ctx),
               "disagreements": disagreements(qs, answers, scores)}
    write_jsonl(out / "answers.jsonl", ({"id": q.id, "question": q.question, "answers": list(q.answers),
                                         "doc_id": q.doc_id, "retrieved": retrieved[i],
                                         "arms": {a: {"answer": answers[a][i].text, **scores[a][i],
                                                      "latency_s": answers[a][i].latency_s} for a in answers}}
                                        for i, q in enumerate(qs)))
    (out / Report.SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    curves = {name: path for name in ctx.lineage if (path := ctx.fetch(name, Model.CURVE)) is not None}
    write_report(out, summary, charts(summary, curves))
    return {"retrieval": retrieval, "arms": arms, "verdict": summary["verdict"], "questions": len(qs)}


STAGE = Stage("eval", build, output=Report, inputs=EvalInputs, section="eval", gpu=True)
