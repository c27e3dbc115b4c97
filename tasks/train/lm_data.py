"""Language-model data: documents split by document, tokenized, and packed into fixed blocks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from data_specs.errors import InputError

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (planning stays fast)
    import torch

TOKENIZE_BATCH = 256  # documents per call to the fast tokenizer (it parallelises within a call)


def hash_unit(seed: int, key: str) -> float:
    """A number in [0, 1) that depends only on (seed, key): seeded splits and samples that never
    depend on the order of the data."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def is_validation(doc_id: str, fraction: float, seed: int) -> bool:
    """A document's split depends only on its id and the seed, never on corpus order."""
    return hash_unit(seed, doc_id) < fraction


def holdout_fields(spec) -> tuple[str, ...]:
    """The qa fields pretrain and midtrain key when they leave qa's held-out documents out
    (`qa.holdout_from_training`); none otherwise, so qa's split settings rebuild no model."""
    return ("qa.holdout_from_training", "qa.eval_fraction", "qa.seed") if spec.qa.holdout_from_training else ()


def training_documents(docs: Iterable[dict], fields: Mapping[str, Any]) -> tuple[list[dict], int]:
    """(the documents a training stage reads, how many held-out ones it left out): every one, or
    with `qa.holdout_from_training` those qa's split_by: document does not hold out (the same
    hash of the document id, tasks/qa.py)."""
    docs = list(docs)
    if not fields.get("qa.holdout_from_training"):
        return docs, 0
    fraction, seed = fields["qa.eval_fraction"], fields["qa.seed"]
    kept = [d for d in docs if hash_unit(seed, str(d["id"])) >= fraction]
    return kept, len(docs) - len(kept)


def split_by_document(docs: Iterable[dict], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train texts, validation texts); at least one document in each when there are two or more."""
    train, val = [], []
    for doc in docs:
        (val if is_validation(str(doc["id"]), fraction, seed) else train).append(doc["text"])
    if not val and len(train) > 1:
        val.append(train.pop())
    if not train and len(val) > 1:
        train.append(val.pop())
    return train, val


def pack(texts: Sequence[str], tokenizer, block: int) -> torch.Tensor:
    """Token ids of every text, each followed by EOS, concatenated and cut into [n, block] rows
    (the tail shorter than one block is dropped)."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        for row in tokenizer(list(texts[start:start + TOKENIZE_BATCH]), add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def packed_splits(docs: Iterable[dict], tokenizer, block: int, val_fraction: float, seed: int,
                  what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation blocks; a corpus too small for one block of each is bad input."""
    train_texts, val_texts = split_by_document(docs, val_fraction, seed)
    train, val = pack(train_texts, tokenizer, block), pack(val_texts, tokenizer, block)
    if len(train) == 0 or len(val) == 0:
        n_train = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in train_texts)
        n_val = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in val_texts)
        raise InputError(
            f"{what}: corpus too small: {len(train_texts)} training documents ({n_train} tokens) and "
            f"{len(val_texts)} validation documents ({n_val} tokens), but one training block is {block} tokens; "
            f"use a shorter context or more documents")
    return train, val
