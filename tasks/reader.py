"""reader: the rag arms' generator, taught to read: answer a question from passages, nothing else.

Reads:   a model (the checkpoint the fine-tuned model started from), Q&A pairs (the train
         split) and the index (its chunks, and BM25 for hard negatives).
Writes:  model/ (merged, with adapter/ under LoRA), loss_curve.csv, examples_sample.jsonl.
Metrics: examples, no_source (pairs left out: no chunk covers their evidence, or the context
         cannot hold the answer's part of it), passages_per_prompt,
         reading_f1_before / _after (greedy answers to validation examples given only their
         source passage: what the gold arm will measure), trained_on, and the trainer's.
Alone:   gristmill run SPEC --only reader

The controlled comparison (ARCHITECTURE.md, "Evaluation"): the fine-tuned model and the reader
start from the same checkpoint and train with the same SFT recipe (the `sft` section: epochs,
learning rate, batch, LoRA, packing), differing only in their examples. Every reader example is
grounded: the question with its source chunk and the chunks BM25 ranks highest for the question
(hard negatives, like what retrieval returns), the source at a random position among those that
fit, in the template every eval arm uses; the answer is the gold span. So the reader learns to
find an answer in what it is shown, not the corpus's facts (its closed-book score, the `reader`
arm, says how far that held). Held-out documents are never shown (split_by: document).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from data_specs.errors import InputError
from data_specs.schema import ReaderSpec, SFTSpec
from eval.generate import generate, prompt_budget, prompt_token_counter
from eval.metrics import token_f1
from eval.prompts import PromptTooLong, as_chat, fit_message
from eval.rag import Chunk
from eval.retrieval import Bm25Index
from tasks.core.artifacts import Index, Model, Pairs
from tasks.core.jsonl import read_jsonl, write_jsonl
from tasks.core.stage import Metrics, RunContext, Stage, Where
from tasks.sft import readable_documents, resolve
from tasks.train.finetune import publish_supervised, supervised
from tasks.train.lm_data import is_validation

ANSWER_END = 2  # tokens after the answer in the chat template: <|im_end|> and a newline


@dataclass(frozen=True)
class ReaderInputs:
    model: Model
    pairs: Pairs
    index: Index


def source_of(pair: dict[str, Any], chunks_by_doc: dict[str, list[Chunk]]) -> Chunk | None:
    """The chunk covering most of a pair's evidence span (None when none covers any of it)."""
    if not pair.get("span"):
        return None
    start, end = pair["span"]
    best = max(chunks_by_doc.get(str(pair["doc_id"]), []), key=lambda c: min(c.end, end) - max(c.start, start),
               default=None)
    return best if best is not None and min(best.end, end) > max(best.start, start) else None


def grounded(pair: dict[str, Any], source: Chunk, negatives: list[Chunk], rng: random.Random, count, budget: int,
             passages: int) -> dict[str, Any] | None:
    """One training conversation: the source among hard negatives, fitted like an eval prompt,
    the source placed at a random position among the passages that fit; None when fitting cut
    the answer out of the source (a short context), since the example would teach guessing."""
    others = [c.text for c in negatives[: passages - 1]]
    fits = fit_message(pair["question"], [source.text, *others], count, budget).kept
    position = rng.randrange(max(1, fits))
    shown = others[:position] + [source.text] + others[position:]
    fitted = fit_message(pair["question"], shown[:fits], count, budget)
    if pair["answer"] not in fitted.text:
        return None
    return {"messages": as_chat(fitted.text) + [{"role": "assistant", "content": pair["answer"]}],
            "id": pair["id"], "question": pair["question"], "answer": pair["answer"], "source": source.text,
            "passages": fitted.kept}


def examples(cfg: ReaderSpec, pairs: list[dict], chunks: list[Chunk], bm25: Bm25Index, readable: set[str],
             tokenizer, max_length: int) -> tuple[list[dict], int]:
    """(grounded examples, pairs left out: no chunk covers their evidence, or the context cannot
    hold the question with the part of the source that has the answer)."""
    rng = random.Random(cfg.seed)
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    count = prompt_token_counter(tokenizer)
    out, missing = [], 0
    for pair in pairs:
        source = source_of(pair, by_doc)
        if source is None:
            missing += 1
            continue
        # The prompt gets what the answer leaves of the context, as TRL will see the example.
        budget = max_length - len(tokenizer(pair["answer"], add_special_tokens=False)["input_ids"]) - ANSWER_END
        ranked = [chunks[i] for i in bm25.rank(pair["question"], 4 * cfg.passages + 8)]
        pool = [c for c in ranked if c.id != source.id and c.doc_id in readable]
        for n in range(cfg.examples_per_pair):
            negatives = pool if n == 0 else rng.sample(pool, len(pool))
            try:
                row = grounded(pair, source, negatives, rng, count, budget, cfg.passages)
            except PromptTooLong:  # a question too long for the context even alone
                row = None
            if row is None:
                missing += 1
                continue
            out.append({**row, "id": f"{pair['id']}-{n}" if n else pair["id"]})
    return out, missing


def reading_f1(model, tokenizer, sample: list[dict], max_new_tokens: int) -> float | None:
    """Mean token F1 of greedy answers given only the source passage, fitted as the gold arm fits
    it: what the gold arm measures."""
    if not sample:
        return None
    count, budget = prompt_token_counter(tokenizer), prompt_budget(model, max_new_tokens)
    prompts = [as_chat(fit_message(r["question"], [r["source"]], count, budget).text) for r in sample]
    answers = generate(model, tokenizer, prompts, max_new_tokens)
    return mean(token_f1(a.text, [r["answer"]]) for r, a in zip(sample, answers))


def build(cfg: ReaderSpec, inputs: ReaderInputs, out: Path, ctx: RunContext) -> Metrics:
    """Trains the reader on grounded examples with the sft recipe; writes the merged model."""
    recipe: SFTSpec = ctx.fields["sft"]
    model, tokenizer = inputs.model.load(ctx.trust_remote_code)
    max_length = recipe.max_length or model.config.max_position_embeddings
    pairs = inputs.pairs.train()
    chunks = [Chunk(**row) for row in read_jsonl(inputs.index.path / Index.CHUNKS)]
    readable = set(readable_documents({c.doc_id: "" for c in chunks}, pairs, inputs.pairs.held_out()))
    rows, missing = examples(cfg, pairs, chunks, Bm25Index.load(inputs.index.path / Index.BM25), readable,
                             tokenizer, max_length)
    if not rows:
        raise InputError(f"{ctx.spec_path}: reader: no grounded example: none of {len(pairs)} train pairs fits with "
                         f"the part of its source chunk that holds the answer in {max_length} tokens; use shorter "
                         "chunks (index.chunk_words) or a model with a longer context")
    train_rows = [r for r in rows if not is_validation(r["id"], recipe.val_fraction, cfg.seed)]
    val_rows = [r for r in rows if is_validation(r["id"], recipe.val_fraction, cfg.seed)] or train_rows[:1]
    write_jsonl(out / "examples_sample.jsonl", train_rows[:20])
    sample = val_rows[: cfg.reading_sample]
    before = reading_f1(model, tokenizer, sample, recipe.max_new_tokens)
    trainer, resumed = supervised(recipe, model, tokenizer, train_rows, val_rows, ctx, "reader", max_length,
                                  ctx.resolved["packing"])
    after = reading_f1(trainer.model, tokenizer, sample, recipe.max_new_tokens)
    m = publish_supervised(trainer, tokenizer, recipe, out, inputs.model)
    return {**m, "examples": len(train_rows), "val_examples": len(val_rows), "no_source": missing,
            "passages_per_prompt": mean(r["passages"] for r in rows) if rows else 0.0,
            "reading_f1_before": before, "reading_f1_after": after, "reading_sample": len(sample),
            "resumed_from_step": resumed,
            "trained_on": f"{len(train_rows)} grounded examples (question + source chunk + BM25 negatives) x "
                          f"{recipe.epochs:g} epochs, {m['tokens']:,.0f} tokens, from {inputs.model.stage} (sft recipe)"}


def resolve_recipe(cfg: ReaderSpec, where: Where) -> dict[str, Any]:
    """As the sft stage resolves its recipe (device, precision, packing): the same recipe."""
    return resolve(where.fields["sft"], where)


STAGE = Stage("reader", build, output=Model, inputs=ReaderInputs, section="reader", fields=("sft",), gpu=True,
              resolve=resolve_recipe, libs=("accelerate",))
