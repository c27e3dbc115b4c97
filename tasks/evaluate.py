"""eval: the fine-tuned model against the FAISS RAG baseline on the same questions, and the report.

Reads:   the qa artifact's eval.jsonl (or `eval.questions` / `eval.score_questions`), the dpo
         model (finetuned arms), the pretrain model (the rag arm's generator: the model
         fine-tuning started from), the index artifact, and every upstream artifact's record
         (wall times, lineage counts) and loss curve for the report.
Writes:  answers.jsonl (every question, every arm's answer, scores and retrieved chunk ids),
         summary.json, report.md, report.html (self-contained), f1.png, loss.png.
Metrics: {"retrieval": {"recall@1", "recall@5", "recall@k"}, "arms": {arm: {em, f1, f1_ci,
         rouge_l, contains, latency_p50_s, p_value_vs_rag, ...}}, "verdict": "..."}
Alone:   gristmill run SPEC --only eval; gristmill eval SPEC --questions FILE
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_specs.spec import RunSpec
from eval.arms import Answer, EvalQuestion, ExtractiveArm, GeneratorArm, retrieve, source_passage
from eval.questions import load_questions
from eval.rag import Chunk, load_embedder
from eval.report import TRAINING_STAGES, write_report
from eval.scoring import recall_at, score, summarize, verdict
from tasks.errors import InputError
from tasks.finetune import load_model
from tasks.stage import Inputs, Metrics, Stage, content_digest

NEEDS = ("ingest", "dedup", "tokenizer", "pretrain", "qa", "midtrain", "sft", "dpo", "index")
DISAGREEMENTS = 10


def questions(spec: RunSpec, inputs: Inputs) -> tuple[list[EvalQuestion], str]:
    """(questions, where they came from): a file given to `gristmill eval`, else qa's eval split."""
    if spec.eval.score_questions:
        path = spec.resolve(spec.eval.score_questions)
        qs = load_questions(path)
        source = f"question file {path.name}"
    else:
        with (inputs["qa"] / "eval.jsonl").open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        qs = [EvalQuestion(r["id"], r["question"], tuple(r.get("answers") or [r["answer"]]), r.get("doc_id"),
                           tuple(r["span"]) if r.get("span") else None) for r in rows]
        source = "the qa stage's held-out questions" if not spec.eval.questions else "the reviewer's question file"
    qs = sorted(qs, key=lambda q: q.id)[: spec.eval.max_questions]
    if not qs:
        raise InputError(f"{spec.spec_path}: eval: no questions to evaluate (qa held out none; raise qa.eval_fraction "
                         "or give eval.questions)")
    return qs, source


def load_index(folder: Path, trust_remote_code: bool):
    """(chunks, FAISS index, embedder) of the index artifact."""
    import faiss

    with (folder / "chunks.jsonl").open(encoding="utf-8") as f:
        chunks = [Chunk(**json.loads(line)) for line in f]
    meta = json.loads((folder / "embedder.json").read_text())
    return chunks, faiss.read_index(str(folder / "index.faiss")), load_embedder(Path(meta["path"]), trust_remote_code=trust_remote_code)


def run_arms(spec: RunSpec, inputs: Inputs, qs: list[EvalQuestion], chunks, index, embedder) -> tuple[dict, list]:
    """Every arm's answers, and the retrieved chunk ids per question."""
    cfg = spec.eval
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
            models[name] = load_model(inputs["dpo"] / "model" if name == "finetuned" else inputs["pretrain"],
                                      spec.trust_remote_code)
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


def stage_rows(inputs: Inputs) -> list[dict[str, Any]]:
    """Wall time, device and GPU-hours of every upstream stage, from its artifact.json."""
    rows = []
    for name in NEEDS:
        record = json.loads((inputs[name] / "artifact.json").read_text())
        device = record["metrics"].get("device", "cpu")
        gpus = record["metrics"].get("processes", 1) if str(device).startswith("cuda") else 0
        rows.append({"stage": name, "fingerprint": record["fingerprint"], "wall_s": record["wall_s"],
                     "device": device, "gpu_hours": round(gpus * record["wall_s"] / 3600, 4) if gpus else None})
    return rows


def lineage_counts(inputs: Inputs) -> dict[str, Any]:
    metrics = {n: json.loads((inputs[n] / "artifact.json").read_text())["metrics"] for n in ("ingest", "dedup", "qa")}
    return {"documents into ingest": metrics["ingest"]["documents_in"], "documents kept by ingest": metrics["ingest"]["documents_out"],
            "documents after dedup": metrics["dedup"]["documents_out"],
            "duplicates removed (exact / near)": f"{metrics['dedup']['exact_duplicates']} / {metrics['dedup']['near_duplicates']}",
            "Q&A pairs kept": metrics["qa"]["pairs_kept"], "train pairs (with paraphrases)": metrics["qa"]["train"],
            "held-out eval pairs": metrics["qa"]["eval"]}


def disagreements(qs, answers, scores) -> list[dict[str, Any]]:
    """The questions where the arms' F1 spread most, with every arm's answer."""
    arms = list(answers)
    spread = sorted(range(len(qs)), key=lambda i: -(max(scores[a][i]["f1"] for a in arms) - min(scores[a][i]["f1"] for a in arms)))
    return [{"question": qs[i].question, "gold": qs[i].answers[0], "answers": {a: answers[a][i].text for a in arms}}
            for i in spread[:DISAGREEMENTS]]


def build(spec: RunSpec, inputs: Inputs, out: Path, work: Path) -> Metrics:
    """Answers every question with every arm, scores them, and writes the report."""
    qs, source = questions(spec, inputs)
    chunks, index, embedder = load_index(inputs["index"], spec.trust_remote_code)
    answers, retrieved = run_arms(spec, inputs, qs, chunks, index, embedder)
    scores = {arm: [score(q, a) for q, a in zip(qs, rows)] for arm, rows in answers.items()}
    arms = summarize(scores, answers, spec.eval.bootstrap, spec.eval.seed)
    retrieval = recall_at(qs, retrieved, chunks, spec.eval.k)
    summary = {"run_name": spec.name, "questions": len(qs), "question_source": source,
               "max_new_tokens": spec.eval.max_new_tokens, "arms": arms, "retrieval": retrieval,
               "verdict": verdict(arms), "stages": stage_rows(inputs), "lineage": lineage_counts(inputs),
               "disagreements": disagreements(qs, answers, scores)}
    if "previous" in inputs:
        summary["previous"] = previous_summary(inputs["previous"])
    with (out / "answers.jsonl").open("w", encoding="utf-8") as f:
        for i, q in enumerate(qs):
            f.write(json.dumps({"id": q.id, "question": q.question, "answers": list(q.answers), "doc_id": q.doc_id,
                                "retrieved": retrieved[i], "arms": {a: {"answer": answers[a][i].text, **scores[a][i],
                                                                        "latency_s": answers[a][i].latency_s}
                                                                    for a in answers}}, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    curves = {s: inputs[s] / "loss_curve.csv" for s in TRAINING_STAGES if (inputs[s] / "loss_curve.csv").exists()}
    write_report(out, summary, curves)
    publish_prefect_artifacts(summary, (out / "report.md").read_text())
    return {"retrieval": retrieval, "arms": arms, "verdict": summary["verdict"], "questions": len(qs)}


def previous_summary(folder: Path) -> dict[str, Any] | None:
    """The metrics of the previous eval of this run name, for the report's change table."""
    path = folder / "summary.json"
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    record = json.loads((folder / "artifact.json").read_text())
    return {"fingerprint": record["fingerprint"], "created_at": record["created_at"],
            "arms": {a: {m: s[m] for m in ("em", "f1", "rouge_l", "contains")} for a, s in earlier["arms"].items()},
            "retrieval": earlier["retrieval"]}


def publish_prefect_artifacts(summary: dict[str, Any], report_md: str) -> None:
    """The report and the arms table in the Prefect UI, when this runs inside a task run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return
    key = "gristmill-report-" + "".join(c if c.isalnum() else "-" for c in summary["run_name"].lower())
    create_markdown_artifact(report_md, key=key, description=summary["verdict"])
    create_table_artifact([{"arm": a, **{k: v for k, v in s.items() if not isinstance(v, list)}}
                           for a, s in summary["arms"].items()], key=key + "-arms", description="arms")


def external_inputs(spec: RunSpec) -> dict[str, str]:
    """A question file given to `gristmill eval --questions`, by content."""
    return content_digest(spec, "eval.score_questions", spec.eval.score_questions, kind="file")


STAGE = Stage(
    name="eval",
    needs=NEEDS,
    build=build,
    spec_view=lambda spec: {"eval": spec.eval.cache_view()},
    external_inputs=external_inputs,
    libs=("torch", "transformers", "sentence-transformers", "faiss-cpu"),
    module=__name__,
    wants_previous=True,
)
