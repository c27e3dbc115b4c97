"""Typed handles to the artifacts stages pass each other; each handle owns its file layout.

A producer writes through its output type (`Model.save(out, model, tokenizer)`,
`Pairs.write(out, ...)`), a consumer reads through the same type (`inputs.model.load(...)`),
so no stage names another stage's files. Every model artifact keeps its model in `model/`.

    Documents  documents/*.jsonl.gz (datatrove JSONL: id, text, metadata)   ingest, dedup, quality
               (+ data_card.json, lengths.png from quality)
    Tokenizer  tokenizer/ (save_pretrained)                                 tokenizer
    Model      model/ (safetensors + config + tokenizer), loss_curve.csv    pretrain ... dpo
    Pairs      train.jsonl, eval.jsonl, rejects.jsonl                       qa
    Index      chunks.jsonl, index.faiss, embedder/ (the embedder itself)   index
    Report     summary.json, answers.jsonl, report.md / .html               eval
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tasks.core.jsonl import read_jsonl
from tasks.core.store import RECORD, ArtifactRecord


@dataclass(frozen=True)
class Artifact:
    """A finished artifact a stage reads: its local folder and its record. A kind whose payload is
    one folder names it in FOLDER; producers write there (`folder_in(out)`), consumers read
    `.folder`."""

    path: Path
    record: ArtifactRecord
    FOLDER: ClassVar[str] = ""

    @classmethod
    def folder_in(cls, out: Path) -> Path:
        """Where a producer writes this kind's payload folder."""
        return out / cls.FOLDER

    @property
    def folder(self) -> Path:
        return self.path / self.FOLDER

    @classmethod
    def at(cls, path: Path) -> Artifact:
        """The handle of a published artifact folder (its record read from artifact.json)."""
        return cls(path, ArtifactRecord.model_validate_json((path / RECORD).read_text(encoding="utf-8")))

    @property
    def stage(self) -> str:
        return self.record.stage

    @property
    def fingerprint(self) -> str:
        return self.record.fingerprint

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.metrics


class Documents(Artifact):
    """A corpus: datatrove JSONL files (plain or gzipped) of {id, text, metadata}."""

    FOLDER: ClassVar[str] = "documents"
    # The data card a filtering stage writes beside its documents (tasks/data/card.py) and its plot.
    CARD: ClassVar[str] = "data_card.json"
    LENGTHS: ClassVar[str] = "lengths.png"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every document, in file order."""
        return iter_documents(self.folder)

    def texts_by_id(self) -> dict[str, str]:
        """{document id: text}."""
        return {str(d["id"]): d["text"] for d in self}


def iter_documents(folder: Path) -> Iterator[dict[str, Any]]:
    """Every document of a documents/ folder, in file order: {"id", "text", "metadata"}."""
    for path in sorted(folder.glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


class Tokenizer(Artifact):
    """A tokenizer folder, loadable with plain `AutoTokenizer.from_pretrained`."""

    FOLDER: ClassVar[str] = "tokenizer"

    def load(self, trust_remote_code: bool):
        from tasks.train.loading import load_tokenizer

        return load_tokenizer(self.folder, trust_remote_code=trust_remote_code)


class Model(Artifact):
    """A causal LM with its tokenizer in model/ (plain transformers loads it), plus its loss curve."""

    FOLDER: ClassVar[str] = "model"
    CURVE: ClassVar[str] = "loss_curve.csv"

    @property
    def loss_curve(self) -> Path | None:
        path = self.path / self.CURVE
        return path if path.exists() else None

    def load(self, trust_remote_code: bool, dtype=None):
        """(model, tokenizer), fp32 unless `dtype` says otherwise, safetensors only."""
        import torch

        from tasks.train.loading import load_causal_lm, load_tokenizer

        model = load_causal_lm(self.folder, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32)
        return model, load_tokenizer(self.folder, trust_remote_code=trust_remote_code)

    @classmethod
    def save(cls, out: Path, model, tokenizer) -> Path:
        """Writes a model and its tokenizer where consumers look for them; returns the folder."""
        folder = cls.folder_in(out)
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        return folder


class Pairs(Artifact):
    """Question-answer pairs with provenance: train.jsonl, eval.jsonl and rejects.jsonl.

    Rows: id, question, answer, doc_id, span ([start, end) in the document or null), generator,
    split; eval rows also carry `answers`, paraphrases `paraphrase_of`."""

    TRAIN: ClassVar[str] = "train.jsonl"
    EVAL: ClassVar[str] = "eval.jsonl"
    REJECTS: ClassVar[str] = "rejects.jsonl"

    def train(self, originals_only: bool = False) -> list[dict[str, Any]]:
        """The train pairs (without paraphrases when `originals_only`)."""
        rows = read_jsonl(self.path / self.TRAIN)
        return [r for r in rows if "paraphrase_of" not in r] if originals_only else rows

    def held_out(self) -> list[dict[str, Any]]:
        """The eval pairs (the qa stage's held-out split, or a reviewer's questions)."""
        return read_jsonl(self.path / self.EVAL)


class Index(Artifact):
    """The RAG baseline's index: chunks, the FAISS index, and the embedder that made it."""

    CHUNKS: ClassVar[str] = "chunks.jsonl"
    FAISS: ClassVar[str] = "index.faiss"
    BM25: ClassVar[str] = "bm25"  # eval.retrieval.Bm25Index.save's folder
    SENTENCES: ClassVar[str] = "sentences.json"  # written last by eval.sentences.save_sentence_index
    FOLDER: ClassVar[str] = "embedder"  # the embedder that embedded the chunks (and embeds questions)
    EMBEDDING: ClassVar[str] = "embedding.json"  # how it embedded them (eval.embedding.EmbeddingSettings)


class Report(Artifact):
    """The eval stage's answers, summary and report."""

    SUMMARY: ClassVar[str] = "summary.json"

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / self.SUMMARY).read_text(encoding="utf-8"))
