"""qa: documents become question-answer pairs with provenance, split into train and eval.

Reads:   the dedup artifact's documents/ (and `eval.questions`, a reviewer's file, when set;
         `qa.model.path` for the model generator).
Writes:  train.jsonl and eval.jsonl (id, question, answer, doc_id, span, generator, split; eval
         lines also carry `answers`, paraphrases `paraphrase_of`) and rejects.jsonl (every
         candidate pair not kept, with its reason).
Metrics: documents, pairs_generated, pairs_kept, rejected_by_reason, train, eval,
         decontaminated, paraphrases, unparseable.
Alone:   gristmill run SPEC --only qa

The split is deterministic by seed: a hash of the question (split_by: question) or of the
document id (split_by: document) against eval_fraction. Decontamination: no train question
(paraphrases included) equals an eval question after normalisation. A generated answer that
is not found verbatim in its document is rejected (answer_not_in_document): every kept
answer is grounded in the corpus, which keeps the RAG-vs-fine-tune comparison fair. With `eval.questions`
every generated pair is train, less those matching one of the reviewer's questions.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from data_specs.spec import RunSpec
from eval.questions import load_questions
from tasks.documents import iter_documents
from tasks.lm_data import hash_unit
from tasks.errors import InputError
from tasks.qa_common import Pair, normalize_question, reject_reason
from tasks.stage import Inputs, Metrics, Stage, content_digest, shared_cache


def pair_id(pair: Pair) -> str:
    return hashlib.sha1(f"{pair.doc_id}\0{pair.question}".encode()).hexdigest()[:12]


def _candidates(spec: RunSpec, docs: list[dict], work: Path, stats: dict[str, int]):
    """(candidate pairs, paraphrase function) of the spec's generator."""
    cfg = spec.qa
    if cfg.generator == "rule":
        from tasks.qa_rules import paraphrases, rule_pairs

        return [p for d in docs for p in rule_pairs(str(d["id"]), d["text"])], paraphrases
    if cfg.generator == "model":
        from tasks.qa_model import generate_pairs

        pairs = list(generate_pairs(docs, spec.resolve(cfg.model.path), cfg.model, cfg.per_doc, stats,
                                    spec.trust_remote_code))
        return pairs, lambda pair, k: []  # a small local model cannot reword reliably
    from tasks.qa_openai import ChatClient, generate_pairs, paraphrase_questions, resolve_api_key

    client = ChatClient(cfg.openai, resolve_api_key(cfg.openai), shared_cache(work) / "openai")
    pairs = list(generate_pairs(docs, client, cfg.per_doc, cfg.openai.chunk_chars))
    stats.update({f"openai_{k}": v for k, v in client.stats.items()})
    return pairs, lambda pair, k: paraphrase_questions([pair.question], client, k)[0]


def _filter(pairs: list[Pair], spec: RunSpec, rejects: list[dict]) -> list[Pair]:
    """Quality filters, one pair per (document, question), at most per_doc pairs per document."""
    kept, per_doc, seen = [], Counter(), set()
    for pair in pairs:
        reason = reject_reason(pair, spec.qa.min_answer_chars, spec.qa.max_answer_chars)
        if reason is None and pair.span is None:
            reason = "answer_not_in_document"  # generated, not copied: nothing grounds it
        key = (pair.doc_id, normalize_question(pair.question))
        if reason is None and key in seen:
            reason = "duplicate_question"
        if reason is None and per_doc[pair.doc_id] >= spec.qa.per_doc:
            reason = "over_per_doc_cap"
        if reason:
            rejects.append({**_row(pair, "rejected"), "reason": reason})
            continue
        seen.add(key)
        per_doc[pair.doc_id] += 1
        kept.append(pair)
    return kept


def _row(pair: Pair, split: str, **extra: Any) -> dict[str, Any]:
    return {"id": pair_id(pair), "question": pair.question, "answer": pair.answer, "doc_id": pair.doc_id,
            "span": list(pair.span) if pair.span else None, "generator": pair.generator, "split": split, **extra}


def _split(pairs: list[Pair], spec: RunSpec) -> tuple[list[Pair], list[dict[str, Any]]]:
    """(train pairs, eval rows): held out by the spec, or the reviewer's questions."""
    if spec.eval.questions:
        questions = load_questions(spec.resolve(spec.eval.questions))
        return pairs, [{"id": q.id, "question": q.question, "answer": q.answers[0], "answers": list(q.answers),
                        "doc_id": q.doc_id, "span": None, "generator": "reviewer", "split": "eval"} for q in questions]
    train, held = [], []
    for pair in pairs:
        key = normalize_question(pair.question) if spec.qa.split_by == "question" else pair.doc_id
        (held if hash_unit(spec.qa.seed, key) < spec.qa.eval_fraction else train).append(pair)
    return train, [_row(p, "eval", answers=[p.answer]) for p in held]


def build(spec: RunSpec, inputs: Inputs, out: Path, work: Path) -> Metrics:
    """Generates, filters, splits, decontaminates and paraphrases; writes the three files."""
    docs = list(iter_documents(inputs["dedup"] / "documents"))
    stats: dict[str, int] = {}
    candidates, paraphrase = _candidates(spec, docs, work, stats)
    rejects: list[dict[str, Any]] = []
    kept = _filter(candidates, spec, rejects)
    train_pairs, eval_rows = _split(kept, spec)

    eval_questions = {normalize_question(r["question"]) for r in eval_rows}
    train_rows, decontaminated = [], 0
    for pair in train_pairs:
        if normalize_question(pair.question) in eval_questions:
            decontaminated += 1
            rejects.append({**_row(pair, "rejected"), "reason": "matches_eval_question"})
            continue
        train_rows.append(_row(pair, "train"))
        for i, question in enumerate(paraphrase(pair, spec.qa.paraphrases) if spec.qa.paraphrases else []):
            if normalize_question(question) in eval_questions:
                decontaminated += 1
                continue
            row = _row(Pair(question, pair.answer, pair.doc_id, pair.span, pair.generator), "train")
            train_rows.append({**row, "id": f"{pair_id(pair)}-p{i + 1}", "paraphrase_of": pair_id(pair)})
    if not train_rows:
        reasons = Counter(r["reason"] for r in rejects)
        raise InputError(f"{spec.spec_path}: qa ({spec.qa.generator}): no training pairs kept from "
                         f"{len(docs)} documents (rejected: {dict(reasons) or 'none'})")
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows), ("rejects.jsonl", rejects)):
        with (out / name).open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "documents": len(docs), "pairs_generated": len(candidates), "pairs_kept": len(kept),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "train": len(train_rows), "eval": len(eval_rows), "decontaminated": decontaminated,
        "paraphrases": sum(1 for r in train_rows if "paraphrase_of" in r),
        "by_generator": dict(sorted(Counter(p.generator for p in kept).items())), **stats,
    }


def external_inputs(spec: RunSpec) -> dict[str, str]:
    """The reviewer's question file and the generator model folder, by content."""
    model = spec.qa.model.path if spec.qa.generator == "model" else None
    return {**content_digest(spec, "eval.questions", spec.eval.questions, kind="file"),
            **content_digest(spec, "qa.model.path", model)}


STAGE = Stage(
    name="qa",
    needs=("dedup",),
    build=build,
    spec_view=lambda spec: {"qa": spec.qa.cache_view()},
    external_inputs=external_inputs,
    libs=("transformers",),
    module=__name__,
)
