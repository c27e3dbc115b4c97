"""The one prompt template every arm and every fine-tuning example uses.

SFT trains on exactly these user messages, and every eval arm asks with them, so the
comparison never hinges on prompt wording: closed book is the bare question; with context,
the passages come first, numbered, then the question.
"""

from __future__ import annotations

from collections.abc import Sequence


def user_message(question: str, passages: Sequence[str] | None = None) -> str:
    """The user turn for a question, with retrieved or given passages when there are any."""
    if not passages:
        return question
    context = "\n\n".join(f"[{i + 1}] {p.strip()}" for i, p in enumerate(passages))
    return f"Answer from the passages.\n\n{context}\n\nQuestion: {question}"


def chat(question: str, passages: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The conversation a model is asked to continue."""
    return [{"role": "user", "content": user_message(question, passages)}]
