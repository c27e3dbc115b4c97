"""eval: the fine-tuned model against the RAG baseline on the same questions, and the report.

Reads:   Q&A pairs (the held-out split, or `eval.score_questions`), the fine-tuned model, the
         reader (the rag generator unless `eval.rag_generator` names another), the index, and
         every upstream artifact's record (wall times, lineage, leakage) and loss curve.
Writes:  answers.jsonl (every question, every arm's answer, scores, retrieved chunk ids),
         summary.json (everything the report shows), report.md, report.html, f1.png, loss.png,
         lengths.png (the data card's document lengths).
Metrics: {"verdict": "...", "cautions": [compared arms that answered empty to half the questions
         or more], "comparisons": [{a, b, diff, ci, p, p_adjusted, n, n_clusters,
         winner, ...}], "arms": {arm: {n, em, f1, f1_ci, ...}}, "retrieval": {strict recall@1, @5,
         @k, @seen}, "retrieval_lenient": {...}, "questions", "refused_questions"}
Alone:   gristmill run SPEC --only eval; gristmill eval SPEC --questions FILE

summary.json keys (what eval/report.py reads): questions, question_source, k, max_new_tokens,
refused, design, arms, verdict, cautions, comparisons, by_retrieval, retrieval, leakage, stages,
lineage, data_card (the quality stage's data_card.json, or null), disagreements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_specs.errors import InputError
from data_specs.schema import EvalSpec, RunSpec
from eval.arms import ARMS, Answer, EvalQuestion, ExtractiveArm, GeneratorArm
from eval.charts import charts
from eval.embedding import Embedder, EmbeddingSettings
from eval.hits import first_hit, recall
from eval.metrics import empty_golds, words_in
from eval.questions import load_questions
from eval.rag import Chunk
from eval.report import write_report
from eval.retrieval import Bm25Index, Retrieval, Retriever
from eval.scoring import by_retrieval, disagreements, score, summarize
from eval.sentences import SentenceIndex, build_sentence_index, load_sentence_index
from eval.verdict import decide
from tasks.core.artifacts import Index, Model, Pairs, Report
from tasks.core.jsonl import read_jsonl, write_jsonl
from tasks.core.keys import content_digest
from tasks.core.progress import Progress
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.evaluation import generators, lineage
from tasks.train.loading import load_embedder

SENTENCE_BATCH = 16  # texts per encoder call for the extractive arm's sentences (never cached); sorted by
# length, 16 beat 64 and 128 on 2 cores (BENCHMARKS.md: the demo)


@dataclass(frozen=True)
class EvalInputs:
    finetuned: Model  # the closed-book arms' generator (after dpo)
    reader: Model  # the rag arms' generator by default
    pairs: Pairs
    index: Index


@dataclass(frozen=True)
class LoadedIndex:
    """What eval reads of the index artifact."""

    chunks: list[Chunk]
    faiss: Any
    embedder: Embedder  # the index's own embedder and settings, from its artifact
    bm25: Bm25Index | None
    sentences: SentenceIndex | None


def questions(cfg: EvalSpec, inputs: EvalInputs, where: Path) -> tuple[list[EvalQuestion], str, list[str]]:
    """(questions, where they came from, ids refused): a file given to `gristmill eval`, else
    qa's eval split. A question whose every gold answer normalises to nothing cannot be scored:
    it is refused, counted and named in the report."""
    if cfg.score_questions:
        qs = load_questions(cfg.score_questions)
        source = f"question file {cfg.score_questions.name}"
    else:
        qs = [EvalQuestion(r["id"], r["question"], tuple(r.get("answers") or [r["answer"]]), r.get("doc_id"),
                           tuple(r["span"]) if r.get("span") else None) for r in inputs.pairs.held_out()]
        source = "the qa stage's held-out questions" if not cfg.questions else "the reviewer's question file"
    qs = sorted(qs, key=lambda q: q.id)[: cfg.max_questions]
    refused = [q.id for q in qs if len(empty_golds(q.answers)) == len(q.answers)]
    qs = [q for q in qs if q.id not in set(refused)]
    if not qs:
        raise InputError(f"{where}: eval: no questions to evaluate (qa held out none; raise qa.eval_fraction "
                         "or give eval.questions)")
    return qs, source, refused


def load_index(index: Index, device: str, trust_remote_code: bool) -> LoadedIndex:
    """The chunks, FAISS index, BM25 index, sentence vectors, and the embedder the index holds."""
    import faiss

    chunks = [Chunk(**row) for row in read_jsonl(index.path / Index.CHUNKS)]
    model = load_embedder(index.folder, device, trust_remote_code=trust_remote_code)
    embedder = Embedder(model, EmbeddingSettings.load(index.path))  # as the chunks were embedded
    bm25 = Bm25Index.load(index.path / Index.BM25) if (index.path / Index.BM25).exists() else None
    sentences = load_sentence_index(index.path, len(chunks)) if (index.path / Index.SENTENCES).exists() else None
    return LoadedIndex(chunks, faiss.read_index(str(index.path / Index.FAISS)), embedder, bm25, sentences)


def retrieve(cfg: EvalSpec, idx: LoadedIndex, qs: list[EvalQuestion]) -> Retrieval:
    """Top max(k, 5) chunks per question (recall@5 is always measured); the arms read the top k."""
    retriever = Retriever(cfg.retrieval, dense_index=idx.faiss, encode=idx.embedder.encode,
                          bm25=idx.bm25, candidates=cfg.candidates, rrf_k=cfg.rrf_k, weights=(cfg.dense_weight, 1.0))
    return retriever.retrieve([q.question for q in qs], max(cfg.k, 5))


def source_chunk(q: EvalQuestion, chunks_by_doc: dict[str, list[Chunk]]) -> Chunk | None:
    """The question's source passage: the chunk covering most of its evidence span; without a
    span, the first chunk of its document holding a gold answer; None when unknown."""
    chunks = chunks_by_doc.get(q.doc_id or "", [])
    if q.span is not None:
        start, end = q.span
        best = max(chunks, key=lambda c: min(c.end, end) - max(c.start, start), default=None)
        return best if best is not None and min(best.end, end) > max(best.start, start) else None
    return next((c for c in chunks if any(words_in(a, c.text) for a in q.answers)), None)


def run_arms(cfg: EvalSpec, qs: list[EvalQuestion], idx: LoadedIndex, found: Retrieval,
             models: generators.Generators) -> dict[str, list[Answer | None]]:
    """Every arm's answers, aligned with `qs` (None where an arm does not apply)."""
    by_doc: dict[str, list[Chunk]] = {}
    for c in idx.chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    sources = [source_chunk(q, by_doc) for q in qs]
    answers: dict[str, list[Answer | None]] = {}
    for name in cfg.arms:
        arm = ARMS[name]
        if arm.generator is None:
            sentences = idx.sentences or retrieved_sentences(idx, found, cfg.k)
            answers[name] = ExtractiveArm(idx.embedder, idx.chunks, found, cfg.k, sentences).answer_many(qs)
            continue
        asked = [i for i in range(len(qs)) if arm.context != "source" or sources[i] is not None]
        contexts = {"none": lambda i: None, "source": lambda i: [sources[i].text],
                    "retrieved": lambda i: [idx.chunks[c].text for c in found.ids[i][: cfg.k]]}[arm.context]
        ids = (lambda i: (tuple(found.ids[i][: cfg.k]), found.latency_s[i])) if arm.context == "retrieved" \
            else (lambda i: ((), 0.0))
        model, tokenizer = models.get(arm.generator)
        generator = GeneratorArm(name, model, tokenizer, lambda j: contexts(asked[j]), lambda j: ids(asked[j]),
                                 cfg.max_new_tokens, cfg.batch_size)
        progress = Progress(f"eval {name}", len(asked), unit="question")
        given = generator.answer_many([qs[i] for i in asked], on_batch=progress.update)
        progress.close()
        by_index = dict(zip(asked, given))
        answers[name] = [by_index.get(i) for i in range(len(qs))]
    return answers


def retrieved_sentences(idx: LoadedIndex, found: Retrieval, k: int) -> SentenceIndex:
    """Sentence vectors of the chunks retrieved for these questions only, each distinct sentence
    embedded once (an index built with `index.sentences` has them all already). They are never
    cached, so they are encoded in batches: sentences are short, and one at a time the model's
    per-call overhead dominates (the demo's ~11,000 sentences: 112 s alone, BENCHMARKS.md)."""
    used = {c for ids in found.ids for c in ids[:k]}
    texts = [c.text if c.id in used else "" for c in idx.chunks]  # "" holds no sentence: not embedded
    return build_sentence_index(texts, lambda batch: idx.embedder.encode(batch, batch_size=SENTENCE_BATCH))


def seen_source(qs: list[EvalQuestion], found: Retrieval, chunks: list[Chunk],
                answers: dict[str, list[Answer | None]], k: int) -> tuple[list[bool], list[int]]:
    """(whether the source passage was among the passages the rag generator saw, how many it
    saw) per question; without a rag arm, the top k."""
    seen = [a.passages_kept if a is not None else k for a in answers.get("rag", [None] * len(qs))]
    hit = [first_hit(q, found.ids[i], chunks) for i, q in enumerate(qs)]
    return [h is not None and h <= s for h, s in zip(hit, seen)], seen


def build(cfg: EvalSpec, inputs: EvalInputs, out: Path, ctx: RunContext) -> Metrics:
    """Answers every question with every arm, scores them, decides, and writes the report."""
    qs, source, refused = questions(cfg, inputs, ctx.spec_path)
    idx = load_index(inputs.index, ctx.device, ctx.trust_remote_code)
    found = retrieve(cfg, idx, qs)
    models = generators.Generators(cfg, inputs.finetuned, inputs.reader, ctx)
    answers = run_arms(cfg, qs, idx, found, models)
    scores = {arm: [score(q, a) for q, a in zip(qs, rows)] for arm, rows in answers.items()}
    arms = summarize(qs, answers, scores, cfg.bootstrap, cfg.seed, cfg.max_new_tokens)
    in_front, seen = seen_source(qs, found, idx.chunks, answers, cfg.k)
    retrieval = recall(qs, found.ids, idx.chunks, cfg.k, seen=seen)
    contenders = {a: [s["f1"] for s in rows] for a, rows in scores.items() if ARMS[a].role != "reference"}
    verdict = decide(contenders, [q.doc_id for q in qs], cfg.bootstrap, cfg.seed,
                     empty_rates={a: arms[a]["empty_rate"] for a in contenders})
    summary = {"questions": len(qs), "question_source": source, "k": cfg.k, "max_new_tokens": cfg.max_new_tokens,
               "refused": {"count": len(refused), "ids": refused}, "design": models.design(cfg),
               "arms": arms, "verdict": verdict.sentence, "cautions": verdict.cautions,
               "comparisons": [c.to_dict() for c in verdict.comparisons],
               "by_retrieval": by_retrieval(scores, in_front),
               "retrieval": {"retriever": cfg.retrieval, "strict": retrieval.strict, "lenient": retrieval.lenient},
               "leakage": lineage.leakage(inputs.pairs, ctx.lineage), "stages": lineage.stage_rows(ctx),
               "critical_path": lineage.critical(ctx),
               "lineage": lineage.counts(ctx), "data_card": lineage.data_card(ctx),
               "disagreements": disagreements(qs, answers, scores)}
    write_jsonl(out / "answers.jsonl", _answer_rows(qs, found, answers, scores))
    (out / Report.SUMMARY).write_text(json.dumps(_plain(summary), indent=2, ensure_ascii=False, allow_nan=False))
    curves = {name: path for name in ctx.lineage if (path := ctx.fetch(name, Model.CURVE)) is not None}
    write_report(out, _plain(summary), charts(_plain(summary), curves))
    return _plain({"verdict": verdict.sentence, "cautions": verdict.cautions, "comparisons": summary["comparisons"],
                   "arms": arms,
                   "retrieval": retrieval.strict, "retrieval_lenient": retrieval.lenient,
                   "questions": len(qs), "refused_questions": len(refused)})


def _answer_rows(qs, found: Retrieval, answers, scores) -> list[dict[str, Any]]:
    return [_plain({"id": q.id, "question": q.question, "answers": list(q.answers), "doc_id": q.doc_id,
                    "retrieved": found.ids[i],
                    "arms": {a: None if answers[a][i] is None else {"answer": answers[a][i].text, **scores[a][i],
                                                                     "latency_s": answers[a][i].latency_s,
                                                                     "passages_kept": answers[a][i].passages_kept}
                             for a in answers}})
            for i, q in enumerate(qs)]


def _plain(value: Any) -> Any:
    """JSON without NaN (None instead), so summary.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def external_inputs(spec: RunSpec) -> dict[str, str]:
    """A model folder named by eval.rag_generator, by content."""
    if spec.eval.rag_generator in ("reader", "base"):
        return {}
    return content_digest(spec, "eval.rag_generator", spec.eval.rag_generator, "folder")


STAGE = Stage("eval", build, output=Report, inputs=EvalInputs, section="eval", fields=("pretrain.from",),
              external_inputs=external_inputs, gpu=True)
