"""The one prompt template every arm and every fine-tuning example uses, and fitting it to a budget.

SFT trains on exactly these user messages, and every eval arm asks with them, so the
comparison never hinges on prompt wording: closed book is the bare question; with context,
the passages come first, numbered, then the question.

A model's context is short (256 tokens for the built-in nano model) and k retrieved chunks do
not always fit. `fit_message` makes them fit before generation, from the bottom of the ranking:
the lowest-ranked passages go first, then the end of passage [1]; the instruction, passage [1]
and the question always stay, and what was dropped is counted so the arm's metrics show it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

INSTRUCTION = "Answer from the passages."
_WORD_END = re.compile(r"\S+")


def user_message(question: str, passages: Sequence[str] | None = None) -> str:
    """The user turn for a question, with retrieved or given passages when there are any."""
    if not passages:
        return question
    context = "\n\n".join(f"[{i + 1}] {p.strip()}" for i, p in enumerate(passages))
    return f"{INSTRUCTION}\n\n{context}\n\nQuestion: {question}"


def as_chat(message: str) -> list[dict[str, str]]:
    """A user message as the one-turn conversation a model is asked to continue."""
    return [{"role": "user", "content": message}]


def chat(question: str, passages: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The conversation a model is asked to continue."""
    return as_chat(user_message(question, passages))


class PromptTooLong(ValueError):
    """Even the instruction, the question and an empty passage [1] exceed the token budget."""


@dataclass(frozen=True)
class FittedMessage:
    """A user message that fits its budget, and what fitting took out of it."""

    text: str
    tokens: int  # as counted by the caller's count_tokens
    kept: int  # passages in the message: [1]..[kept], in rank order
    dropped: int  # lowest-ranked passages left out
    first_cut: bool  # passage [1] lost its end to fit


def _prefix_that_fits(question: str, first: str, count_tokens: Callable[[str], int], budget: int) -> str | None:
    """A word prefix of `first` whose message fits, None when not even an empty one does.

    Binary search on the word count (log2(words) token counts): the longest prefix when the
    count grows with the text; when a tokenizer's count does not (BPE merges), a shorter
    one, but always one that was counted and fits.
    """
    ends = [m.end() for m in _WORD_END.finditer(first)]
    lo, hi = 0, len(ends)  # invariant: a prefix of lo words was counted and fits
    fits = lambda n: count_tokens(user_message(question, [first[:ends[n - 1]] if n else ""])) <= budget
    if not fits(0):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return first[:ends[lo - 1]] if lo else ""


def fit_message(question: str, passages: Sequence[str], count_tokens: Callable[[str], int],
                budget: int) -> FittedMessage:
    """The user message with as many of the top-ranked passages as fit in `budget` tokens.

    `count_tokens` counts a user message as the model will see it (chat template included:
    eval.generate.prompt_token_counter); `budget` is the context minus the tokens to generate.
    Passages are dropped from the lowest rank up; passage [1] alone too long is cut at its
    end. Raises PromptTooLong when nothing of passage [1] fits (the question is too long).
    """
    passages = [p.strip() for p in passages]
    for kept in range(len(passages), 0, -1):
        text = user_message(question, passages[:kept])
        tokens = count_tokens(text)
        if tokens <= budget:
            return FittedMessage(text, tokens, kept, len(passages) - kept, False)
    if not passages:
        tokens = count_tokens(question)
        if tokens > budget:
            raise PromptTooLong(f"the question alone is {tokens} tokens, over the budget of {budget}")
        return FittedMessage(question, tokens, 0, 0, False)
    prefix = _prefix_that_fits(question, passages[0], count_tokens, budget)
    if prefix is None:
        raise PromptTooLong(f"the instruction and question take {count_tokens(user_message(question, ['']))} "
                            f"tokens, over the budget of {budget}: no room for passage [1]")
    text = user_message(question, [prefix])
    return FittedMessage(text, count_tokens(text), 1, len(passages) - 1, True)
