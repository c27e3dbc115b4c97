"""A reviewer's question file: JSONL with `question`, `answers` (list) or `answer` (string), and
an optional `doc_id`. Any bad line stops the run with its line number (exit 2)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from data_specs.errors import InputError

MAX_LINE_BYTES = 1_000_000  # a question line is a few hundred bytes; anything this big is a mistake


@dataclass(frozen=True)
class Question:
    """One evaluation question with its accepted answers."""

    id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str | None = None
    span: tuple[int, int] | None = None  # the evidence in the document, when known


def _text(value: object) -> bool:
    """A non-empty string that has a UTF-8 form (JSON's "\\ud800", a lone surrogate, has none)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_line(raw: bytes, where: str) -> Question:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an int beyond 4300 digits
        raise InputError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with `question` and `answers` or `answer`")
    question = row.get("question")
    if not _text(question):
        raise InputError(f"{where}: `question` must be a non-empty string (of valid Unicode: no lone surrogate)")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(_text(a) for a in answers):
        raise InputError(f"{where}: needs `answers` (a list of non-empty strings) or `answer` (a non-empty "
                         "string), of valid Unicode (no lone surrogate)")
    doc_id, qid = row.get("doc_id"), row.get("id")
    if doc_id is not None and not _text(doc_id):
        raise InputError(f"{where}: `doc_id` must be a non-empty string")
    if qid is not None and not (_text(qid) or (isinstance(qid, int) and not isinstance(qid, bool))):
        raise InputError(f"{where}: `id` must be a non-empty string or an integer")
    return Question(id=str(qid) if qid is not None else "", question=question.strip(),
                    answers=tuple(a.strip() for a in answers), doc_id=doc_id)


def _lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every non-blank line; a line over MAX_LINE_BYTES is refused
    after reading that many bytes, never held whole."""
    n = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        n += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise InputError(f"{path}:{n}: line is longer than {MAX_LINE_BYTES} bytes")
        if raw.strip():
            yield n, raw.strip()


def load_questions(path: Path) -> list[Question]:
    """Every question of the file, ids defaulting to `q<line>`; an empty file is bad input too."""
    if not path.is_file():
        raise InputError(f"{path}: question file not found" if not path.exists() else f"{path}: not a file")
    questions = []
    try:
        with path.open("rb") as f:
            for n, raw in _lines(f, path):
                q = _parse_line(raw, f"{path}:{n}")
                questions.append(q if q.id else Question(f"q{n}", q.question, q.answers, q.doc_id))
    except OSError as e:
        raise InputError(f"{path}: question file cannot be read ({e.strerror or e})") from None
    if not questions:
        raise InputError(f"{path}: no questions in the file")
    dup = next((i for i, count in Counter(q.id for q in questions).items() if count > 1), None)
    if dup is not None:
        raise InputError(f"{path}: question id {dup!r} appears more than once")
    return questions
