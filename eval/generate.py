"""Greedy answers from a chat model, in batches: the same decoding for every arm and stage."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generation:
    """One answer with what it cost."""

    text: str
    new_tokens: int
    latency_s: float  # wall time of its batch divided by the batch size


@torch.no_grad()
def generate(model, tokenizer, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int = 16) -> list[Generation]:
    """Greedy continuations of `conversations` through the tokenizer's chat template."""
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", 4096) - max_new_tokens
    stop = [tokenizer.eos_token_id] + [t for t in tokenizer.convert_tokens_to_ids(["<|im_end|>"]) if t is not None]
    out: list[Generation] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
        # Long prompts keep their end (the question), losing the start of the context.
        tokenizer.truncation_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=limit,
                        add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)
        elapsed = time.perf_counter() - t0
        new = ids[:, enc["input_ids"].shape[1]:]
        for row in new:
            n = int((row != tokenizer.pad_token_id).sum())
            out.append(Generation(tokenizer.decode(row, skip_special_tokens=True).strip(), n, elapsed / len(batch)))
    return out
