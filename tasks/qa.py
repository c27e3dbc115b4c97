"""qa: documents become question-answer pairs with provenance, split into train and eval.

Reads:   documents (the corpus), and `eval.questions` (a reviewer's file) when set;
         `qa.model.path` for the model generator.
Writes:  train.jsonl and eval.jsonl (id, question, answer, doc_id, span, generator, split; eval
         lines also carry `answers`, paraphrases `paraphrase_of`) and rejects.jsonl (every
         candidate pair not kept, with its reason).
Metrics: documents, pairs_generated, pairs_kept, rejected_by_reason, train, eval,
         decontaminated, decontaminated_by_key, leakage (eval questions sharing a document, a
         span or an answer with the train pairs), paraphrases, unparseable.
Alone:   gristmill run SPEC --only qa

The split is deterministic by seed: a hash of the question (split_by: question) or of the
document id (split_by: document) against eval_fraction. Decontamination (`qa.decontaminate`,
tasks/qagen/leakage.py) removes train pairs matching an eval question by normalised question,
normalised answer or overlapping span; what is still shared is counted. A generated answer that
is not found verbatim in its document is rejected (answer_not_in_document): every kept
answer is grounded in the corpus, which keeps the RAG-vs-fine-tune comparison fair. With `eval.questions`
every generated pair is train, less those matching one of the reviewer's questions.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_specs.errors import InputError
from data_specs.schema import QASpec
from eval.questions import load_questions
from tasks.core.artifacts import Documents, Pairs
from tasks.core.jsonl import write_jsonl
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.qagen.common import Pair, normalize_question, reject_reason
from tasks.qagen.leakage import PairIndex, shared_counts
from tasks.train.lm_data import hash_unit


def pair_id(pair: Pair) -> str:
    return hashlib.sha1(f"{pair.doc_id}\0{pair.question}".encode()).hexdigest()[:12]


def _candidates(cfg: QASpec, docs: list[dict], ctx: RunContext, stats: dict[str, int]):
    """(candidate pairs, paraphrase function) of the spec's generator."""
    if cfg.generator == "rule":
        from tasks.qagen.rules import paraphrases, rule_pairs

        return [p for d in docs for p in rule_pairs(str(d["id"]), d["text"])], paraphrases
    if cfg.generator == "model":
        from tasks.qagen.model import generate_pairs

        pairs = list(generate_pairs(docs, cfg.model.path, cfg.model, cfg.per_doc, stats, ctx.trust_remote_code))
        return pairs, lambda pair, k: []  # a small local model cannot reword reliably
    from tasks.qagen.openai_client import ChatClient, resolve_api_key
    from tasks.qagen.openai_generator import generate_pairs, paraphrase_questions

    client = ChatClient(cfg.openai, resolve_api_key(ctx.runtime.openai), ctx.shared_cache() / "openai",
                        runtime=ctx.runtime.openai)
    pairs = list(generate_pairs(docs, client, cfg.per_doc, cfg.openai.chunk_chars))
    stats.update({f"openai_{k}": v for k, v in client.stats.items()})
    return pairs, lambda pair, k: paraphrase_questions([pair.question], client, k)[0]


def _filter(pairs: list[Pair], cfg: QASpec, rejects: list[dict]) -> list[Pair]:
    """Quality filters, one pair per (document, question), at most per_doc pairs per document."""
    kept, per_doc, seen = [], Counter(), set()
    for pair in pairs:
        reason = reject_reason(pair, cfg.min_answer_chars, cfg.max_answer_chars)
        if reason is None and pair.span is None:
            reason = "answer_not_in_document"  # generated, not copied: nothing grounds it
        key = (pair.doc_id, normalize_question(pair.question))
        if reason is None and key in seen:
            reason = "duplicate_question"
        if reason is None and per_doc[pair.doc_id] >= cfg.per_doc:
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


def _split(pairs: list[Pair], cfg: QASpec, reviewer: Path | None) -> tuple[list[Pair], list[dict[str, Any]]]:
    """(train pairs, eval rows): held out by the spec, or the reviewer's questions."""
    if reviewer:
        questions = load_questions(reviewer)
        return pairs, [{"id": q.id, "question": q.question, "answer": q.answers[0], "answers": list(q.answers),
                        "doc_id": q.doc_id, "span": None, "generator": "reviewer", "split": "eval"} for q in questions]
    train, held = [], []
    for pair in pairs:
        key = normalize_question(pair.question) if cfg.split_by == "question" else pair.doc_id
        (held if hash_unit(cfg.seed, key) < cfg.eval_fraction else train).append(pair)
    return train, [_row(p, "eval", answers=[p.answer]) for p in held]


@dataclass(frozen=True)
class QAInputs:
    documents: Documents


def build(cfg: QASpec, inputs: QAInputs, out: Path, ctx: RunContext) -> Metrics:
    """Generates, filters, splits, decontaminates and paraphrases; writes the three files."""
    docs = list(inputs.documents)
    stats: dict[str, int] = {}
    candidates, paraphrase = _candidates(cfg, docs, ctx, stats)
    rejects: list[dict[str, Any]] = []
    kept = _filter(candidates, cfg, rejects)
    train_pairs, eval_rows = _split(kept, cfg, ctx.fields["eval.questions"])

    held = PairIndex.of(eval_rows)
    train_rows, decontaminated = [], Counter()
    for pair in train_pairs:
        key = held.match(pair.question, pair.answer, pair.doc_id, pair.span, cfg.decontaminate)
        if key:
            decontaminated[key] += 1
            rejects.append({**_row(pair, "rejected"), "reason": f"matches_eval_{key}"})
            continue
        train_rows.append(_row(pair, "train"))
        for i, question in enumerate(paraphrase(pair, cfg.paraphrases) if cfg.paraphrases else []):
            if held.match(question, pair.answer, pair.doc_id, pair.span, ("question",)):
                decontaminated["question"] += 1  # a rewording that says an eval question word for word
                continue
            row = _row(Pair(question, pair.answer, pair.doc_id, pair.span, pair.generator), "train")
            train_rows.append({**row, "id": f"{pair_id(pair)}-p{i + 1}", "paraphrase_of": pair_id(pair)})
    if not train_rows:
        reasons = Counter(r["reason"] for r in rejects)
        raise InputError(f"{ctx.spec_path}: qa ({cfg.generator}): no training pairs kept from "
                         f"{len(docs)} documents (rejected: {dict(reasons) or 'none'})")
    for name, rows in ((Pairs.TRAIN, train_rows), (Pairs.EVAL, eval_rows), (Pairs.REJECTS, rejects)):
        write_jsonl(out / name, rows)
    return {
        "documents": len(docs), "pairs_generated": len(candidates), "pairs_kept": len(kept),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "train": len(train_rows), "eval": len(eval_rows), "decontaminated": sum(decontaminated.values()),
        "decontaminated_by_key": {k: decontaminated[k] for k in cfg.decontaminate},
        "leakage": shared_counts(eval_rows, train_rows),
        "paraphrases": sum(1 for r in train_rows if "paraphrase_of" in r),
        "by_generator": dict(sorted(Counter(p.generator for p in kept).items())), **stats,
    }


STAGE = Stage("qa", build, output=Pairs, inputs=QAInputs, section="qa", fields=("eval.questions",))
