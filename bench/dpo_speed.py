"""TRL's DPO step against a plain PyTorch DPO loop on the same model, batches and loss.

The examples look like the dpo stage's: a closed-book prompt (the question in the chat template,
6-12 words), a chosen answer and a rejected one (2-12 words each). The model is the demo's nano
Llama with the demo's 8,192-token vocabulary (fresh seeded init, fp32); the reference model is a
frozen copy of it, as the dpo stage has without LoRA.

Rows, each timed over the same number of steps of the same batches (batch 16 pairs, padded):
- trl default: DPOTrainer as TRL configures it (gradient checkpointing on; on CPU its fused LM
  head scores every position, prompt included).
- trl, no checkpointing: gradient_checkpointing=False (the dpo stage on CPU before it switched
  the head, 2026-12-01).
- trl as gristmill runs it: no checkpointing on CPU (tasks/train/finetune.py: trainer_kwargs) and
  the fused head scoring only the completion positions (score_labelled_positions_only).
- plain loop: the trainer's own collated batches; policy forward and backward, reference forward
  without gradients, both through the LM head on the completion positions only; the sigmoid DPO
  loss on the summed log-probabilities; clip, AdamW step. The baseline the ratio is taken against.

A DPO step costs about 4/3 of an SFT step on the same tokens (a policy forward and backward, ~3
forward passes, plus the reference's forward), so the plain loop's tokens/s is the FLOP-matched
yardstick: the ratio says what TRL adds on top of the arithmetic DPO needs.

    .venv/bin/python bench/dpo_speed.py          # CPU, ~2 minutes on 2 cores

Last line: ratio=X.XX (trl as gristmill runs it, tokens/s / the plain loop's).
"""

from __future__ import annotations

import copy
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe  # bench/machine.py
from trl_speed import (  # bench/trl_speed.py: the demo's model, a tokenizer, the options and the table
    WORDS,
    arguments,
    best_rates,
    fused_head,
    plain_loop,
    print_rates,
    setup,
    train_seconds,
)

from eval.prompts import chat
from tasks.core.allocator import keep_freed_memory
from tasks.core.keys import native_bf16

BETA = 0.1  # DPOSpec's default


def preferences(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": chat(words(6, 12) + "?"), "chosen": [{"role": "assistant", "content": words(2, 12) + "."}],
             "rejected": [{"role": "assistant", "content": words(2, 12) + "."}]} for _ in range(n)]


def trainer(tokenizer, model, rows: list[dict], work: Path, batch: int, steps: int, checkpointing: bool, bf16: bool):
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(work), per_device_train_batch_size=batch, learning_rate=2e-4, report_to="none",
                     save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(), bf16=bf16,
                     disable_tqdm=True, max_length=model.config.max_position_embeddings, seed=0, max_steps=steps,
                     beta=BETA, loss_type=["sigmoid"], gradient_checkpointing=checkpointing,
                     dataloader_num_workers=0)
    # The reference: a frozen copy (TRL would load one from the policy's folder; this model has none).
    t = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=tokenizer)
    t.remove_callback(PrinterCallback)
    return t


def batches(tokenizer, make_model, rows: list[dict], batch: int, steps: int) -> list[dict]:
    """The collated batches TRL trains on (one epoch of exactly `steps` batches)."""
    with tempfile.TemporaryDirectory() as work:
        t = trainer(tokenizer, make_model(), rows, Path(work), batch, steps, False, False)
        return [b for _, b in zip(range(steps), t.get_train_dataloader())]


def trl_run(tokenizer, make_model, rows, batch: int, steps: int, checkpointing: bool, compact: bool, bf16: bool,
            tokens: int) -> float:
    """Real (non-padding) tokens/s of `steps` TRL steps over `tokens` tokens."""
    with fused_head(compact), tempfile.TemporaryDirectory() as work:
        t = trainer(tokenizer, make_model(), rows, Path(work), batch, steps, checkpointing, bf16)
        return tokens / train_seconds(t)


def sequence_logps(model, b: dict) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens, the LM head on those positions only."""
    ids = b["input_ids"]
    keep = b["completion_mask"][:, 1:].bool()
    hidden = model.model(input_ids=ids, attention_mask=b["attention_mask"]).last_hidden_state[:, :-1]
    logits = model.lm_head(hidden[keep]).float()
    per_token = logits.log_softmax(-1).gather(-1, ids[:, 1:][keep][:, None])[:, 0]
    rows = torch.arange(ids.size(0), device=ids.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(ids.size(0), device=ids.device).index_add(0, rows, per_token)


def plain_run(make_model, collated: list[dict], bf16: bool) -> float:
    """Real tokens/s of a plain DPO loop over the batches TRL's collator makes."""
    policy = make_model().train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)

    def loss(b: dict) -> torch.Tensor:
        chosen, rejected = sequence_logps(policy, b).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = sequence_logps(reference, b).chunk(2)
        return -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    return plain_loop(policy, collated, loss, 2e-4, bf16)


def main() -> None:
    args = arguments(__doc__, "pairs per step (the demo's dpo.batch_size)")
    tokenizer, make_model, _ = setup(args.preset, 200, args.vocab)
    rows = preferences(args.batch * args.steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keep_freed_memory()  # as every stage build does (tasks/core/runner.py)
    bf16 = native_bf16(device)
    collated = batches(tokenizer, make_model, rows, args.batch, args.steps)
    tokens = sum(int(b["attention_mask"].sum()) for b in collated)  # one epoch: every row once
    print(describe())
    print(f"device={device} preset={args.preset} vocab={args.vocab} batch={args.batch} pairs steps={args.steps} "
          f"real tokens={tokens:,} ({tokens / args.steps:,.0f}/step) precision={'bf16' if bf16 else 'fp32'}")
    n, b = args.steps, args.batch
    runs = {
        "plain loop": lambda: plain_run(make_model, collated, bf16),
        "trl default": lambda: trl_run(tokenizer, make_model, rows, b, n, True, False, device == "cuda", tokens),
        "trl, no checkpointing": lambda: trl_run(tokenizer, make_model, rows, b, n, False, False, bf16, tokens),
        "trl as gristmill runs it": lambda: trl_run(tokenizer, make_model, rows, b, n, device == "cuda", True, bf16,
                                                    tokens),
    }
    print_rates(best_rates(runs, args.repeats), "plain loop", "the plain loop")


if __name__ == "__main__":
    main()
