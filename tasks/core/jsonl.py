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


def json_line(row: Any, sort_keys: bool = False) -> str:
    """One JSONL line, newline included (non-ASCII kept as is): for writers that stream."""
    return json.dumps(row, ensure_ascii=False, sort_keys=sort_keys) + "\n"


def write_jsonl(path: Path, rows: Iterable[Any], sort_keys: bool = False) -> int:
    """Writes one JSON object per line; returns how many."""
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json_line(row, sort_keys))
            n += 1
    return n
