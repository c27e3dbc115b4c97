"""Text embeddings for retrieval: one model, one precision, and a cache of vectors by content.

On CPU each text is encoded alone (a batch of one). A text's vector then depends only on the
text and the model, never on its batch-mates: batched encoding pads to the longest text of the
batch, which changes the last bits in fp32 and the fourth decimal in bf16. So a cached vector is
the vector a cold build would compute, and an index built incrementally (only the changed
chunks embedded) is byte-identical to one built from scratch. Batches of one cost ~11% against
batches of 8 on 2 cores, and are faster than the batches of 64 used before (bench/rag_eval.py, BENCHMARKS.md).

bf16 autocast, where the CPU computes bf16 natively (AVX512-BF16 or AMX): 1.8x fp32 on the demo's
chunks, cosine to the fp32 vector >= 0.9999. On CUDA texts are batched (GPU kernels are not
bit-reproducible across batch shapes anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SETTINGS = "embedding.json"  # in an index artifact (tasks.core.artifacts.Index.EMBEDDING)
CUDA_BATCH = 64
MAX_SHARDS = 16  # the cache merges its shards into one past this many
# Texts per shard a build writes as it goes: 64 chunks are ~3 s of the default embedder on one
# core; a build killed midway loses at most that much.
SAVE_EVERY = 64


@dataclass(frozen=True)
class EmbeddingSettings:
    """How vectors were computed; queries are embedded the same way as the chunks they search."""

    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    batch_size: int = 1

    @classmethod
    def for_device(cls, precision: str, device: str) -> EmbeddingSettings:
        return cls(precision, CUDA_BATCH if device == "cuda" else 1)

    def save(self, folder: Path) -> None:
        (folder / SETTINGS).write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> EmbeddingSettings:
        path = folder / SETTINGS
        return cls(**json.loads(path.read_text(encoding="utf-8"))) if path.exists() else cls("fp32", 64)


class Embedder:
    """A sentence-transformers model with fixed settings: L2-normalised float32 rows."""

    def __init__(self, model, settings: EmbeddingSettings):
        self.model, self.settings = model, settings

    def encode(self, texts: Sequence[str], on_done: Callable[[int], None] | None = None,
               batch_size: int | None = None) -> np.ndarray:
        """One row per text; `on_done(n)` after each piece of work (for progress). `batch_size`
        overrides the settings' for vectors that are never cached (their bits may then depend
        on their batch-mates, deterministically for the same texts in the same order)."""
        import torch

        texts = list(texts)
        dim = self.model.get_embedding_dimension()
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        device = str(self.model.device).split(":")[0]
        autocast = (torch.autocast(device, dtype=torch.bfloat16) if self.settings.precision == "bf16"
                    else nullcontext())
        batch = batch_size or self.settings.batch_size
        step = max(batch, 64)  # calls of this many texts, for progress
        # Batches of texts of like length pad least: sorted by length across the whole call, not
        # only within each model.encode call (the eval's retrieved sentences: 0.79x the time).
        order = np.argsort([len(t) for t in texts], kind="stable") if batch > 1 else np.arange(len(texts))
        rows = []
        with autocast:
            for first in range(0, len(texts), step):
                piece = [texts[i] for i in order[first:first + step]]
                rows.append(self.model.encode(piece, batch_size=batch, normalize_embeddings=True,
                                              convert_to_numpy=True, show_progress_bar=False).astype(np.float32))
                if on_done is not None:
                    on_done(first + len(piece))
        vectors = np.empty((len(texts), dim), dtype=np.float32)
        vectors[order] = np.concatenate(rows)
        return vectors


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


class EmbeddingCache:
    """Vectors by the sha256 of their text, in `.npz` shards of one folder. The folder's name must
    say everything else a vector depends on (embedder content, settings, device, library
    versions, threads): `EmbeddingCache.folder_name`. A shard is written whole (temporary name,
    then rename), so a killed build leaves no partial shard; unreadable shards are ignored."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._cached: dict[bytes, np.ndarray] | None = None

    def _known(self) -> dict[bytes, np.ndarray]:
        if self._cached is None:
            self._cached = self.load()
        return self._cached

    @staticmethod
    def folder_name(embedder_digest: str, settings: EmbeddingSettings, device: str) -> str:
        import sentence_transformers
        import torch
        import transformers

        parts = [embedder_digest, settings.precision, str(settings.batch_size), device, torch.__version__,
                 transformers.__version__, sentence_transformers.__version__, str(torch.get_num_threads())]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []

    def load(self) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        for shard in self._shards():
            try:
                with np.load(shard) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError):
                continue
            found.update(zip((k.tobytes() for k in keys), vectors, strict=True))
        return found

    def save(self, vectors: dict[bytes, np.ndarray]) -> None:
        """Adds `vectors` as a shard; past MAX_SHARDS, merges every shard into one."""
        if not vectors:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shards = self._shards()
        merge = len(shards) + 1 > MAX_SHARDS
        if merge:
            vectors = {**self._known(), **vectors}
        self._write(vectors)
        if merge:
            for shard in shards:
                shard.unlink(missing_ok=True)

    def _write(self, vectors: dict[bytes, np.ndarray]) -> None:
        # Raw bytes, not numpy's "S16": that strips trailing NUL bytes, so 1 key in 256 never matched.
        keys = np.frombuffer(b"".join(vectors), dtype=np.uint8).reshape(-1, 16)
        name = uuid.uuid4().hex
        tmp = self.folder / f".{name}.tmp.npz"
        np.savez(tmp, keys=keys, vectors=np.stack(list(vectors.values())))
        os.replace(tmp, self.folder / f"{name}.npz")

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct texts with no cached vector, in first-seen order."""
        known = self._known()
        return list(dict.fromkeys(t for t in texts if text_key(t) not in known))

    def embed(self, embedder: Embedder, texts: Sequence[str],
              on_done: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
        """(vectors, how many texts were encoded): only `missing(texts)` are, and they are cached
        a shard per SAVE_EVERY texts as they are encoded, so a build killed midway keeps what it
        embedded and its rerun encodes only the rest."""
        todo = self.missing(texts)
        known = self._known()
        for first in range(0, len(todo), SAVE_EVERY):
            piece = todo[first:first + SAVE_EVERY]
            done = None if on_done is None else (lambda n, first=first: on_done(first + n))
            new = dict(zip((text_key(t) for t in piece), embedder.encode(piece, done), strict=True))
            self.save(new)
            known.update(new)  # before the next save: a merge writes every known vector
        dim = embedder.model.get_embedding_dimension()
        rows = [known[text_key(t)] for t in texts]
        vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), dtype=np.float32)
        return np.ascontiguousarray(vectors), len(todo)
