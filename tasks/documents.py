"""Reading the documents a data stage published (datatrove JSONL, plain or gzipped)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_documents(folder: Path) -> Iterator[dict[str, Any]]:
    """Every document of an artifact's documents/ folder, in file order: {"id", "text", "metadata"}."""
    for path in sorted(folder.glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
