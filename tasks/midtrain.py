"""midtrain: the pretrained model trains further on documents mixed with Q&A pairs as text.

Reads:   a model (with its tokenizer), documents (the corpus) and Q&A pairs (the train split).
Writes:  model/ (safetensors and tokenizer), loss_curve.csv, and mixture.json (the weights,
         the blocks drawn from each source, and how many each source had).
Metrics: those of the training loop (tasks/training.py), as for pretrain, plus the mixture.
Alone:   gristmill run SPEC --only midtrain

Both sources are packed into blocks of the model's context; the training set draws blocks
from each in proportion to `mix` (a seeded sample, with replacement when a source is smaller
than its share). Validation holds out documents and Q&A pairs by id. The learning rate
decays to zero, so mid-training ends annealed. The loop, checkpoints and resume are
pretrain's (tasks/training.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_specs.errors import InputError
from data_specs.schema import MidtrainSpec
from tasks.core.artifacts import Documents, Model, Pairs
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.train.distributed import run_or_launch
from tasks.train.lm_data import holdout_fields, is_validation, pack, split_by_document, training_documents
from tasks.train.loop import Dist, check_time_limit, loop_resolution, pick_device, save_trained, train_loop

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (planning stays fast)
    import torch


def qa_text(question: str, answer: str) -> str:
    """How a Q&A pair reads in the mid-training mixture."""
    return f"Question: {question}\nAnswer: {answer}"


def draw(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` blocks from a source: a seeded permutation, repeated or cut to length."""
    import torch

    if n == 0 or len(blocks) == 0:
        return blocks[:0]
    g = torch.Generator().manual_seed(seed)
    reps = -(-n // len(blocks))
    order = torch.cat([torch.randperm(len(blocks), generator=g) for _ in range(reps)])[:n]
    return blocks[order]


@dataclass(frozen=True)
class MidtrainInputs:
    model: Model
    documents: Documents
    pairs: Pairs


def mixture(cfg: MidtrainSpec, inputs: MidtrainInputs, tokenizer, block: int, where: str,
            fields: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train blocks, validation blocks, manifest) of the documents + Q&A mixture."""
    import torch

    docs, held_out = training_documents(inputs.documents, fields)
    doc_train, doc_val = split_by_document(docs, cfg.val_fraction, cfg.seed)
    pairs = inputs.pairs.train()
    qa_train = [qa_text(p["question"], p["answer"]) for p in pairs if not is_validation(p["id"], cfg.val_fraction, cfg.seed)]
    qa_val = [qa_text(p["question"], p["answer"]) for p in pairs if is_validation(p["id"], cfg.val_fraction, cfg.seed)]
    sources = {"docs": (pack(doc_train, tokenizer, block), pack(doc_val, tokenizer, block)),
               "qa": (pack(qa_train, tokenizer, block), pack(qa_val, tokenizer, block))}
    weights = {"docs": cfg.mix.docs, "qa": cfg.mix.qa}
    for name, (train, _) in sources.items():
        if weights[name] > 0 and len(train) == 0:
            raise InputError(f"{where}: midtrain.mix.{name} is {weights[name]} but the {name} source "
                             f"has no full block of {block} tokens; lower its weight to 0 or add data")
    total = sum(len(train) for train, _ in sources.values())
    share = {k: w / sum(weights.values()) for k, w in weights.items()}
    drawn = {k: round(share[k] * total) for k in sources}
    train = torch.cat([draw(sources[k][0], drawn[k], cfg.seed + i) for i, k in enumerate(sources)])
    val = torch.cat([sources[k][1] for k in sources if weights[k] > 0])
    if len(val) == 0:
        raise InputError(f"{where}: midtrain: no validation block of {block} tokens; raise val_fraction")
    manifest = {"weights": weights, "blocks_drawn": drawn, "blocks_available": {k: len(v[0]) for k, v in sources.items()},
                "validation_blocks": {k: len(v[1]) for k, v in sources.items()}, "block_tokens": block,
                "qa_format": qa_text("{question}", "{answer}"), "documents": len(docs),
                "held_out_documents_left_out": held_out}
    return train, val, manifest


def run(cfg: MidtrainSpec, inputs: MidtrainInputs, out: Path, ctx: RunContext, dist: Dist) -> Metrics:
    """The work of one process: the mixture, the loop; the main process saves the artifact."""
    model, tokenizer = inputs.model.load(ctx.trust_remote_code)
    train, val, manifest = mixture(cfg, inputs, tokenizer, model.config.max_position_embeddings, str(ctx.spec_path),
                                   ctx.fields)
    result = train_loop(model, train, val, cfg, ctx.work, pick_device(ctx.device, dist), dist, label="midtrain",
                        time_limit=ctx.resources.time_limit, checkpoint_every=ctx.runtime.checkpoint_every,
                        compile_model=ctx.resolved["compile"], bf16=ctx.resolved["precision"] == "bf16-autocast")
    if save_trained(model, tokenizer, result, out, dist):
        (out / "mixture.json").write_text(json.dumps(manifest, indent=2))
    return {**result.metrics, "mixture": manifest["blocks_drawn"],
            "held_out_documents_left_out": manifest["held_out_documents_left_out"]}


def build(cfg: MidtrainSpec, inputs: MidtrainInputs, out: Path, ctx: RunContext) -> Metrics:
    """Mid-trains the model on the mixture."""
    return check_time_limit("midtrain", run_or_launch("midtrain", run, cfg, inputs, out, ctx))


STAGE = Stage("midtrain", build, output=Model, inputs=MidtrainInputs, section="midtrain", gpu=True,
              resolve=loop_resolution, fields_when=holdout_fields)
