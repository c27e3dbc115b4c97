"""sft: supervised fine-tuning of the midtrained model on the train Q&A pairs in chat form.

Reads:   a model (with its tokenizer), Q&A pairs (the train split) and documents (the
         passages of grounded examples).
Writes:  adapter/ (with LoRA), model/ (merged, loadable with plain transformers), and
         examples_sample.jsonl (the first examples as trained, to read).
Metrics: train_loss_final, val_loss_final, tokens_per_s, answer_f1_before, answer_f1_after,
         examples, grounded, grounded_too_long, resumed_from_step.
Alone:   gristmill run SPEC --only sft

TRL's SFTTrainer with the tokenizer's chat template, loss on assistant tokens only, and
best-fit packing. A `context_fraction` of the examples show the question with its source
passage and `distractors` passages from other documents, answered from the source (RAFT),
so the model also learns to use retrieved context; one that would not fit the context
window is trained closed book instead (counted as grounded_too_long). answer_f1_before /
_after: token F1 of greedy answers to a fixed sample of train questions, before and after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from data_specs.schema import SFTSpec
from eval.generate import generate
from eval.metrics import token_f1
from eval.prompts import chat
from tasks.core.artifacts import Documents, Model, Pairs
from tasks.core.jsonl import write_jsonl
from tasks.core.stage import Metrics, RunContext, Stage, Where
from tasks.train.finetune import finetune_resolution, publish_supervised, supervised
from tasks.train.lm_data import hash_unit, is_validation


def passage(text: str, span: list[int] | None, chars: int, rng: random.Random) -> str:
    """About `chars` characters of a document around the evidence (or at random without one)."""
    if span is None:
        start = rng.randrange(max(1, len(text) - chars))
    else:
        middle = (span[0] + span[1]) // 2
        start = max(0, min(middle - chars // 2, len(text) - chars))
    return text[start:start + chars]


def examples(cfg: SFTSpec, pairs: list[dict], docs: dict[str, str], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Chat examples; a context_fraction of them grounded in passages (RAFT)."""
    rng = random.Random(cfg.seed)
    ids = sorted(docs)
    out, counts = [], {"grounded": 0, "grounded_too_long": 0}
    answer = lambda pair, passages: chat(pair["question"], passages) + [{"role": "assistant", "content": pair["answer"]}]
    for pair in pairs:
        messages = None
        if pair["doc_id"] in docs and rng.random() < cfg.context_fraction:
            others = [d for d in rng.sample(ids, min(len(ids), cfg.distractors + 1)) if d != pair["doc_id"]][: cfg.distractors]
            passages = [passage(docs[pair["doc_id"]], pair.get("span"), cfg.passage_chars, rng)]
            passages += [passage(docs[d], None, cfg.passage_chars, rng) for d in others]
            rng.shuffle(passages)
            messages = answer(pair, passages)
            if len(tokenizer.apply_chat_template(messages, tokenize=True)) > max_length:
                counts["grounded_too_long"] += 1
                messages = None
            else:
                counts["grounded"] += 1
        messages = messages or answer(pair, None)
        out.append({"messages": messages, "id": pair["id"], "question": pair["question"]})
    return out, counts


def answer_f1(model, tokenizer, sample: list[dict], max_new_tokens: int) -> float:
    """Mean token F1 of greedy closed-book answers to the sample's questions."""
    answers = generate(model, tokenizer, [chat(p["question"]) for p in sample], max_new_tokens)
    return mean(token_f1(a.text, [p["answer"]]) for p, a in zip(sample, answers))


def readable_documents(docs: dict[str, str], train: list[dict], held_out: list[dict]) -> dict[str, str]:
    """The documents grounded examples may show: all but held-out ones (documents with eval
    questions and no train pair, as split_by: document makes them), so an unseen document stays
    unseen by SFT, even as a distractor."""
    held = {str(r["doc_id"]) for r in held_out if r.get("doc_id") is not None} - {str(p["doc_id"]) for p in train}
    return {d: text for d, text in docs.items() if d not in held}


def fixed_sample(pairs: list[dict], n: int, seed: int) -> list[dict]:
    """The same train questions before and after, chosen by a hash of their id and the seed."""
    return sorted(pairs, key=lambda p: hash_unit(seed, p["id"]))[:n]


@dataclass(frozen=True)
class SFTInputs:
    model: Model
    pairs: Pairs
    documents: Documents


def build(cfg: SFTSpec, inputs: SFTInputs, out: Path, ctx: RunContext) -> Metrics:
    """Fine-tunes with TRL and writes the adapter and the merged model."""
    model, tokenizer = inputs.model.load(ctx.trust_remote_code)
    max_length = cfg.max_length or model.config.max_position_embeddings
    pairs = inputs.pairs.train()
    docs = readable_documents(inputs.documents.texts_by_id(), pairs, inputs.pairs.held_out())
    sample = fixed_sample([p for p in pairs if "paraphrase_of" not in p], cfg.answer_sample, cfg.seed)
    f1_before = answer_f1(model, tokenizer, sample, cfg.max_new_tokens)

    rows, counts = examples(cfg, pairs, docs, tokenizer, max_length)
    train_rows = [r for r in rows if not is_validation(r["id"], cfg.val_fraction, cfg.seed)]
    val_rows = [r for r in rows if is_validation(r["id"], cfg.val_fraction, cfg.seed)] or train_rows[:1]
    grounded = [r for r in train_rows if len(r["messages"][0]["content"]) > len(r["question"])]
    write_jsonl(out / "examples_sample.jsonl", grounded[:10] + [r for r in train_rows if r not in grounded][:10])

    packing = ctx.resolved["packing"]
    trainer, resumed = supervised(cfg, model, tokenizer, train_rows, val_rows, ctx, "sft", max_length, packing)
    f1_after = answer_f1(trainer.model, tokenizer, sample, cfg.max_new_tokens)
    m = publish_supervised(trainer, tokenizer, cfg, out, inputs.model)
    return {**m, "answer_f1_before": f1_before, "answer_f1_after": f1_after, "answer_sample": len(sample),
            "examples": len(train_rows), "val_examples": len(val_rows), **counts, "resumed_from_step": resumed,
            "lora": cfg.lora is not None, "packing": packing,
            "trained_on": f"{len(train_rows)} Q&A examples ({counts['grounded']} grounded in passages, the rest "
                          f"closed book) x {cfg.epochs:g} epochs, {m['tokens']:,.0f} tokens, from {inputs.model.stage}"}


def resolve(cfg: SFTSpec, where: Where) -> dict[str, Any]:
    """The trainer's device and precision, and packing as it resolves there (`auto`: on with CUDA)."""
    return {**finetune_resolution(cfg, where),
            "packing": cfg.packing == "on" or (cfg.packing == "auto" and where.device == "cuda")}


STAGE = Stage("sft", build, output=Model, inputs=SFTInputs, section="sft", gpu=True, resolve=resolve,
              libs=("accelerate",))
