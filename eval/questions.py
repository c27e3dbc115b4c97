"""A reviewer's question file: JSONL with `question`, `answers` (list) or `answer` (string), and
an optional `doc_id`. Any bad line stops the run with its line number (exit 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import InputError

MAX_LINE_BYTES = 1_000_000  # a question line is a few hundred bytes; anything this big is a mistake


@dataclass(frozen=True)
class Question:
    """One evaluation question with its accepted answers."""

    id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str | None = None
    span: tuple[int, int] | None = None  # the evidence in the document, when known


def _parse_line(raw: bytes, where: str) -> Question:
    if len(raw) > MAX_LINE_BYTES:
        raise InputError(f"{where}: line is {len(raw)} bytes (at most {MAX_LINE_BYTES})")
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 (byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with `question` and `answers` or `answer`")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: `question` must be a non-empty string")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise InputError(f"{where}: needs `answers` (a list of non-empty strings) or `answer` (a non-empty string)")
    doc_id = row.get("doc_id")
    if doc_id is not None and not isinstance(doc_id, str):
        raise InputError(f"{where}: `doc_id` must be a string")
    qid = row.get("id")
    return Question(id=str(qid) if qid is not None else "", question=question.strip(),
                    answers=tuple(a.strip() for a in answers), doc_id=doc_id)


def load_questions(path: Path) -> list[Question]:
    """Every question of the file, ids defaulting to `q<line>`; an empty file is bad input too."""
    if not path.is_file():
        raise InputError(f"{path}: question file not found")
    questions = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            q = _parse_line(raw.strip(), f"{path}:{n}")
            questions.append(q if q.id else Question(f"q{n}", q.question, q.answers, q.doc_id))
    if not questions:
        raise InputError(f"{path}: no questions in the file")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: question id {dup!r} appears more than once")
    return questions
