"""The `openai` Q&A generator: any OpenAI-compatible chat endpoint writes the pairs.

Used by the qa stage through `generate_pairs` and `paraphrase_questions`, with a `ChatClient`
(tasks/qagen/openai_client.py) that caches every reply, so a rerun pays only for what it has
not asked yet.

Alone:   gristmill run SPEC --only qa   (with `qa.generator: openai`)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from tasks.qagen.common import Pair, locate, normalize_question, split_chunks
from tasks.qagen.openai_client import ChatClient, Messages

# Conversations sent to `complete_many` at once by `generate_pairs`: enough to keep every
# worker busy, few enough that a large corpus is never held in memory whole.
BATCH_CONVERSATIONS = 256

PAIRS_SYSTEM = ("You write question-answer pairs for reading-comprehension training data. "
                "You reply with JSON only.")
PAIRS_PROMPT = (
    "Write up to {n} question-answer pairs about the passage below. Each answer must be a short "
    "span copied VERBATIM (character for character) from the passage. Each question must make sense "
    "on its own, without the passage: name the subject instead of saying 'the passage'. "
    'Reply with a JSON list only: [{{"question": "...", "answer": "..."}}]\n\n'
    "<passage>\n{passage}\n</passage>"
)
PARAPHRASE_PROMPT = (
    "Write {k} rewordings of the question below: the same meaning and the same answer, in "
    "different words. Reply with a JSON list of {k} strings only.\n\n"
    "<question>\n{question}\n</question>"
)


_FENCED = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.S)


def parse_json_list(reply: str) -> list[Any] | None:
    """The JSON list in a model's reply, or None. Tolerates ``` fences, prose around the list,
    and an object wrapping exactly one list (e.g. {"pairs": [...]}), which models often add."""
    fenced = _FENCED.search(reply)
    text = (fenced.group(1) if fenced else reply).strip()
    try:
        value = json.loads(text)
    except ValueError:
        start, end = text.find("["), text.rfind("]")
        if start < 0 or end <= start:
            return None
        try:
            value = json.loads(text[start:end + 1])
        except ValueError:
            return None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else None
    return value if isinstance(value, list) else None


def _qa_items(items: list[Any]) -> list[tuple[str, str]]:
    """(question, answer) of the well-formed items; others are skipped."""
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        q, a = item.get("question"), item.get("answer")
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            out.append((q.strip(), a.strip()))
    return out


# ---------------------------------------------------------------- chunks and pairs


def _quotas(n_chunks: int, per_doc: int) -> list[int]:
    """Pairs asked of each chunk: `per_doc` spread evenly over the chunks; with fewer pairs
    than chunks, one pair each from evenly spaced chunks (the rest are not sent at all)."""
    if per_doc >= n_chunks:
        return [per_doc // n_chunks + (i < per_doc % n_chunks) for i in range(n_chunks)]
    quotas = [0] * n_chunks
    for i in range(per_doc):
        quotas[i * n_chunks // per_doc] = 1
    return quotas


def pairs_conversation(passage: str, n: int) -> Messages:
    """The request for up to `n` pairs about one passage."""
    return [{"role": "system", "content": PAIRS_SYSTEM},
            {"role": "user", "content": PAIRS_PROMPT.format(n=n, passage=passage)}]


def generate_pairs(docs: Iterable[dict[str, Any]], client: ChatClient, per_doc: int,
                   chunk_chars: int) -> Iterator[Pair]:
    """Up to `per_doc` pairs per document {"id", "text"}, with the answer's span in the text
    (None when the model did not copy it verbatim). Documents are read in batches of about
    BATCH_CONVERSATIONS chunks so the endpoint sees `concurrency` requests in flight."""
    batch: list[tuple[dict[str, Any], list[tuple[str, int]]]] = []
    size = 0
    for doc in docs:
        chunks = split_chunks(doc["text"], chunk_chars)
        asks = [(c, q) for c, q in zip(chunks, _quotas(len(chunks), per_doc)) if q] if chunks else []
        batch.append((doc, asks))
        size += len(asks)
        if size >= BATCH_CONVERSATIONS:
            yield from _pairs_of_batch(batch, client)
            batch, size = [], 0
    if batch:
        yield from _pairs_of_batch(batch, client)


def _pairs_of_batch(batch: list[tuple[dict[str, Any], list[tuple[str, int]]]],
                    client: ChatClient) -> Iterator[Pair]:
    conversations = [pairs_conversation(chunk, n) for _, asks in batch for chunk, n in asks]
    replies = iter(client.complete_many(conversations))
    for doc, asks in batch:
        text, doc_id = doc["text"], str(doc["id"])
        for _, n in asks:
            items = parse_json_list(next(replies))
            if items is None:
                client.count("unparseable")
                continue
            for question, answer in _qa_items(items)[:n]:
                yield Pair(question=question, answer=answer, doc_id=doc_id,
                           span=locate(answer, text), generator="openai")


# ---------------------------------------------------------------- paraphrases


def paraphrase_conversation(question: str, k: int) -> Messages:
    """The request for `k` rewordings of one question."""
    return [{"role": "user", "content": PARAPHRASE_PROMPT.format(k=k, question=question)}]


def paraphrase_questions(questions: list[str], client: ChatClient, k: int) -> list[list[str]]:
    """Up to `k` rewordings per question, in order: fewer when the reply has fewer (or repeats
    the question), [] when the reply cannot be read (counted in stats["unparseable"])."""
    if k <= 0 or not questions:
        return [[] for _ in questions]
    replies = client.complete_many([paraphrase_conversation(q, k) for q in questions])
    out: list[list[str]] = []
    for question, reply in zip(questions, replies):
        items = parse_json_list(reply)
        if items is None:
            client.count("unparseable")
        seen, kept = {normalize_question(question)}, []
        for item in items or []:
            norm = normalize_question(item) if isinstance(item, str) else ""
            if norm and norm not in seen:
                seen.add(norm)
                kept.append(item.strip())
        out.append(kept[:k])
    return out
