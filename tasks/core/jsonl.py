"""JSON Lines as stages write and read their own files (one object per line, UTF-8).

User-facing files (corpus sources, question files) have hardened readers of their own that
name the bad line; these two are for files gristmill wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every object of a JSONL file, blank lines skipped."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Writes one JSON object per line (non-ASCII kept as is); returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
