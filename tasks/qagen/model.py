"""The `model` Q&A generator: a local causal LM writes a question and answer for each chunk.

Batched greedy generation with left padding. A reply that does not parse as
"<question>?\\nAnswer: <answer>" yields no pair and is counted. Quality depends on the model:
a small model trained here mostly writes unparseable text, which the counts show.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from data_specs.errors import InputError
from data_specs.schema import ModelGeneratorSpec
from tasks.qagen.common import Pair, locate, split_chunks
from tasks.train.loading import load_causal_lm, load_tokenizer

PROMPT = ("Read the passage, then write one question it answers and the answer copied from it.\n\n"
          "Passage:\n{chunk}\n\nQuestion:")
_REPLY = re.compile(r"^\s*(?P<q>[^\n]{5,300}\?)\s*\n+\s*Answer:\s*(?P<a>[^\n]{1,300})", re.S)


def parse_reply(reply: str) -> tuple[str, str] | None:
    """(question, answer) from a generated continuation, or None."""
    m = _REPLY.match(reply)
    return (m.group("q").strip(), m.group("a").strip()) if m else None


def load_generator(path: Path, trust_remote_code: bool):
    """(tokenizer, model) from a local folder, safetensors only."""
    if not path.is_dir():
        raise InputError(f"qa.model.path: {path} is not a folder")
    model = load_causal_lm(path, trust_remote_code=trust_remote_code, field="qa.model.path")
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code, field="qa.model.path", padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model.eval()


@torch.no_grad()
def generate_pairs(docs: Iterable[dict], path: Path, spec: ModelGeneratorSpec, per_doc: int,
                   stats: dict[str, int], trust_remote_code: bool = False) -> Iterator[Pair]:
    """One prompt per chunk (at most `per_doc` chunks per document), generated in batches."""
    tok, model = load_generator(path, trust_remote_code)
    jobs = [(d, c) for d in docs for c in split_chunks(d["text"], spec.chunk_chars)[:per_doc]]
    for start in range(0, len(jobs), spec.batch_size):
        batch = jobs[start:start + spec.batch_size]
        enc = tok([PROMPT.format(chunk=c) for _, c in batch], return_tensors="pt", padding=True,
                  truncation=True, max_length=getattr(model.config, "max_position_embeddings", 2048) - spec.max_new_tokens)
        out = model.generate(**enc, max_new_tokens=spec.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        replies = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for (doc, _), reply in zip(batch, replies):
            parsed = parse_reply(reply)
            if parsed is None:
                stats["unparseable"] = stats.get("unparseable", 0) + 1
                continue
            yield Pair(parsed[0], parsed[1], str(doc["id"]), locate(parsed[1], doc["text"]), "model")
