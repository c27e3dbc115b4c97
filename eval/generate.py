"""Greedy answers from a chat model, in batches: the same decoding for every arm and stage.

Prompts are never truncated here. Truncating from the left, as this module once did, silently
cut the instruction and the top-ranked passage first; truncating from the right would cut the
question and the assistant turn's opening. Callers fit prompts beforehand
(eval.prompts.fit_message with `prompt_budget` and `prompt_token_counter`), and a prompt still
over the limit stops the batch with PromptTooLong naming it: a wrong answer from a mangled
prompt would be scored as the model's, which is worse than no answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from eval.prompts import PromptTooLong, as_chat


@dataclass(frozen=True)
class Generation:
    """One answer with what it cost."""

    text: str
    new_tokens: int
    latency_s: float  # wall time of its batch divided by the batch size


def prompt_budget(model, max_new_tokens: int) -> int:
    """Prompt tokens a model can read and still generate `max_new_tokens` (its context minus them)."""
    return getattr(model.config, "max_position_embeddings", 4096) - max_new_tokens


def _render(tokenizer, conversation: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def prompt_token_counter(tokenizer) -> Callable[[str], int]:
    """Counts a user message's tokens as `generate` will feed them: inside the chat template."""
    def count(message: str) -> int:
        rendered = _render(tokenizer, as_chat(message))
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return count


def _check_lengths(tokenizer, prompts: Sequence[str], first: int, limit: int) -> None:
    """PromptTooLong naming every prompt of the batch over `limit` tokens (never truncates)."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    over = [(first + i, n) for i, n in enumerate(lengths) if n > limit]
    if over:
        shown = ", ".join(f"#{i} ({n} tokens)" for i, n in over[:5])
        raise PromptTooLong(f"{len(over)} prompt(s) over the {limit}-token limit (context minus max_new_tokens): "
                            f"{shown}; fit them first with eval.prompts.fit_message")


def generate(model, tokenizer, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[Generation]:
    """Greedy continuations of `conversations` through the tokenizer's chat template; `on_batch`
    hears how many are done after each batch (progress).

    Raises PromptTooLong when a prompt exceeds `prompt_budget(model, max_new_tokens)`.
    """
    import torch

    with torch.no_grad():  # no autograd graph: nothing here is trained
        tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        device = next(model.parameters()).device
        limit = prompt_budget(model, max_new_tokens)
        stop = [tokenizer.eos_token_id] + [t for t in tokenizer.convert_tokens_to_ids(["<|im_end|>"]) if t is not None]
        out: list[Generation] = []
        for start in range(0, len(conversations), batch_size):
            prompts = [_render(tokenizer, c) for c in conversations[start:start + batch_size]]
            _check_lengths(tokenizer, prompts, start, limit)
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            t0 = time.perf_counter()
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
            elapsed = time.perf_counter() - t0
            new = ids[:, enc["input_ids"].shape[1]:]
            for row in new:
                n = int((row != tokenizer.pad_token_id).sum())
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                out.append(Generation(text, n, elapsed / len(prompts)))
            if on_batch is not None:
                on_batch(len(out))
        return out
