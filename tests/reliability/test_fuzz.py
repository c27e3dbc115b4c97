"""Bad input, fuzzed: the corpus readers, the question file and the spec loader.

The property everywhere: no exception escapes but an `InputError` whose message names the
file (and the line, where there is one); a corpus record that cannot be read is a counted
reject with a reason, so records in = documents kept + rejects (nothing silently dropped).

The readers are driven through `tasks.ingest.build`, the function a run calls (~0.06 s an
example, in-process); a few cases go end to end through the `gristmill` CLI (its entry point
in-process for a run that starts Prefect; a subprocess for refusals made before it). Example
counts are modest (FUZZ_EXAMPLES) so the file runs in about a minute on 2 cores; raise
them with GRISTMILL_FUZZ_EXAMPLES=500 for a longer hunt.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from data_specs.errors import InputError
from data_specs.loader import load_spec
from eval.questions import MAX_LINE_BYTES, load_questions
from tasks.core.keys import stage_view
from tasks.core.runner import prepare_run
from tasks.core.stage import RunContext
from tasks.ingest import STAGE as INGEST
from tests.conftest import REPO, doc_text

FUZZ_EXAMPLES = int(os.environ.get("GRISTMILL_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
GOOD = {"id": "good", "text": doc_text(1)}  # one readable record, so a source never ends up empty
# Over every ingest this module runs, printed at its end (pytest -s): the figures in RELIABILITY.md.
TOTALS: Counter[str] = Counter()
REASONS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def print_totals() -> Iterator[None]:
    yield
    print(f"\nfuzzed ingest: {TOTALS['runs']} runs, {TOTALS['in']} records read, {TOTALS['kept']} kept, "
          f"{TOTALS['rejected']} rejected, {TOTALS['lost']} lost; reasons: {dict(REASONS.most_common())}")


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per hypothesis example (a function-scoped tmp_path is shared by all of them)."""
    with tempfile.TemporaryDirectory(prefix="gristmill-fuzz-") as d:
        yield Path(d)


def write_spec(root: Path, sources: list[dict[str, Any]], **sections: Any) -> Path:
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "fuzz", "corpus": {"sources": sources, **sections}}))
    return path


def read_jsonl_gz(folder: Path) -> list[dict[str, Any]]:
    """Every row the ingest artifact wrote, decoded strictly (bad UTF-8 would raise here)."""
    rows = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rb") as f:
            rows += [json.loads(line.decode("utf-8")) for line in f]
    return rows


def run_ingest(root: Path, sources: list[dict[str, Any]], **sections: Any) -> tuple[dict[str, Any], list, list]:
    """(metrics, kept documents, rejects) of the ingest stage over `sources`, checked for
    consistency: what was read is exactly what was kept plus what was rejected."""
    spec = load_spec(write_spec(root, sources, **sections))
    out, work = root / "out", root / "work"
    out.mkdir()
    cfg, runtime, fields = stage_view(INGEST, spec)
    ctx = RunContext(work=work, trust_remote_code=False, spec_path=spec.spec_path, runtime=runtime, fields=fields,
                     executor=spec.executor)
    metrics = INGEST.build(cfg, None, out, ctx)
    docs, rejects = read_jsonl_gz(out / "documents"), read_jsonl_gz(out / "rejects")
    assert metrics["documents_in"] == metrics["documents_out"] + metrics["rejected"], metrics
    assert len(docs) == metrics["documents_out"] and len(rejects) == metrics["rejected"], metrics
    assert sum(s["read"] for s in metrics["sources"]) == metrics["documents_in"]
    assert all(r["metadata"].get("filter_reason") for r in rejects)
    TOTALS.update(runs=1, kept=len(docs), rejected=len(rejects), **{"in": metrics["documents_in"]})
    REASONS.update(metrics["rejected_by_reason"])
    return metrics, docs, rejects


def records_in(data: bytes) -> int:
    """Records a JSONL file holds: its non-blank lines (the reader's own definition)."""
    return sum(1 for line in data.split(b"\n") if line.strip())


# ---------------------------------------------------------------- strategies

json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(json_leaves, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10)
good_text = st.integers(0, 10_000).map(lambda i: doc_text(i, words=12))
records = st.fixed_dictionaries(
    {"text": st.one_of(good_text, st.text(max_size=200), json_values)},
    optional={"id": json_values | st.text(max_size=20), "extra": json_values},
)


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# Lines no well-behaved producer writes; each must become one counted reject (or a document).
HOSTILE = [
    nested(100_000),                                     # 100k levels: RecursionError in json
    b'{"text": "' + doc_text(2).encode() + b'", "x": ' + nested(5_000) + b"}",
    nested(900, b'{"text": "deep"}'),                   # parses, then must be dumped for the reject
    b'{"text": "' + doc_text(3).encode() + b'", "id": ' + b"9" * 5000 + b"}",  # > int digit limit
    b'{"text": "lone \\ud800 surrogate ' + doc_text(4).encode() + b'"}',  # not encodable as UTF-8
    b'{"text": "' + doc_text(5).encode() + b'", "id": "\\udfff"}',
    b'{"text": "' + doc_text(6).encode() + b'", "id": {"a": [1, 2]}}',
    b'{"text": "nul\x00inside ' + doc_text(7).encode() + b'"}',  # raw NUL: invalid JSON
    b'{"text": "nul \\u0000 escaped ' + doc_text(8).encode() + b'"}',
    b'{"text": "caf\xe9 latin-1 ' + doc_text(9).encode() + b'"}',
    b"\xef\xbb\xbf" + json.dumps({"text": doc_text(10)}).encode(),  # a UTF-8 BOM
    json.dumps({"text": doc_text(11)}).encode() + b"\r",
    b"\x00" * 64, b"\xff\xfe\xfd", b"NaN", b"[]", b"{}", b'"text"', b"1e999999",
]
hostile_lines = st.sampled_from(HOSTILE)


@st.composite
def jsonl_lines(draw: st.DrawFn) -> bytes:
    """One line: a record (maybe damaged), any JSON value, raw junk, or a hostile classic."""
    kind = draw(st.sampled_from(["record", "value", "junk", "text", "hostile", "damaged"]))
    if kind == "record":
        return json.dumps(draw(records), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "value":
        return json.dumps(draw(json_values)).encode()
    if kind == "junk":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "hostile":
        return draw(hostile_lines)
    line = bytearray(json.dumps(draw(records)).encode())
    pos = draw(st.integers(0, len(line)))
    line[pos:pos] = draw(st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\n", b'"', b"\\"]))
    return bytes(line)


# ---------------------------------------------------------------- JSONL


@FUZZ
@given(lines=st.lists(jsonl_lines(), max_size=12), compress=st.sampled_from(["plain", "gzip", "truncated-gzip"]))
def test_jsonl_reader_counts_every_record(lines: list[bytes], compress: str) -> None:
    data = b"\n".join(lines)
    with scratch() as root:
        (root / "data").mkdir()
        (root / "data" / "a-good.jsonl").write_text(json.dumps(GOOD) + "\n")
        if compress == "plain":
            (root / "data" / "b-fuzz.jsonl").write_bytes(data)
        else:
            packed = gzip.compress(data)
            (root / "data" / "b-fuzz.jsonl.gz").write_bytes(packed[: len(packed) // 2] if compress != "gzip" else packed)
        metrics, docs, rejects = run_ingest(root, [{"kind": "jsonl", "path": "data/*.jsonl*", "id_field": "id"}],
                                            filters={"min_chars": 1})
    for reason in metrics["rejected_by_reason"]:
        event(f"reject: {reason}")
    if compress != "truncated-gzip":
        TOTALS["lost"] += 1 + records_in(data) - metrics["documents_in"]
        assert metrics["documents_in"] == 1 + records_in(data), metrics
    else:  # what precedes the cut is read; the cut itself is one counted reject
        assert metrics["rejected_by_reason"].get("unreadable_file", 0) <= 1
    assert "good" in {d["id"] for d in docs}
    for r in rejects:
        assert r["metadata"]["source"].startswith("0:b-fuzz.jsonl") and r["metadata"]["where"].startswith("line ")


def test_jsonl_hostile_classics_each_become_one_reject_or_document() -> None:
    """Every hostile line at once, each on its own line: exact counts and reasons."""
    lines = list(HOSTILE)
    with scratch() as root:
        (root / "data").mkdir()
        (root / "data" / "a.jsonl").write_bytes(b"\n".join([json.dumps(GOOD).encode(), *lines]))
        metrics, docs, _ = run_ingest(root, [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"}],
                                            filters={"min_chars": 1})
    assert metrics["documents_in"] == 1 + len(lines)
    reasons = metrics["rejected_by_reason"]
    assert reasons.get("malformed_json", 0) >= 4 and reasons.get("invalid_unicode", 0) == 2, reasons
    assert reasons.get("invalid_utf8", 0) == 2 and reasons.get("id_not_a_scalar", 0) == 1, reasons
    texts = {d["text"] for d in docs}
    assert any("escaped" in t and "\x00" not in t for t in texts)  # \u0000 is removed by normalisation
    assert any(t.startswith(doc_text(10)[:20]) for t in texts)  # the BOM is not a reason to lose a record


def test_a_100_mb_line_is_one_counted_reject_read_in_bounded_memory() -> None:
    """A 100 MB line is refused after the record limit (16 x max_chars + 8 MiB), without
    holding the line in memory; the records around it are read."""
    with scratch() as root:
        (root / "data").mkdir()
        with (root / "data" / "big.jsonl").open("wb") as f:
            f.write(json.dumps(GOOD).encode() + b"\n")
            f.write(b'{"text": "')
            chunk = b"x" * (1 << 20)
            for _ in range(100):
                f.write(chunk)
            f.write(b'"}\n' + json.dumps({"id": "after", "text": doc_text(2)}).encode() + b"\n")
        assert (root / "data" / "big.jsonl").stat().st_size > 100 * (1 << 20)
        tracemalloc.start()
        start = time.perf_counter()
        metrics, docs, rejects = run_ingest(root, [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"}])
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert metrics["documents_in"] == 3 and {d["id"] for d in docs} == {"good", "after"}
    assert metrics["rejected_by_reason"] == {"record_too_large": 1}
    assert rejects[0]["metadata"]["where"] == "line 2" and len(rejects[0]["text"]) <= 100_000 + 200
    print(f"100 MB line: {seconds:.2f} s, peak traced memory {peak / 2**20:.1f} MiB")
    assert peak < 64 * 2**20, peak  # the line is 100 MiB; the reader holds at most the limit (11.2 MB)


# ---------------------------------------------------------------- text folders


def fs_names() -> st.SearchStrategy[bytes]:
    """File names as the kernel sees them: any bytes but '/' and NUL (so: also not UTF-8)."""
    return st.binary(min_size=1, max_size=24).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")).filter(
        lambda b: b not in (b".", b".."))


ODD_ENTRIES = ["link_outside", "link_inside", "link_dangling", "link_to_dir", "dir_named_txt",
               "dir_link_outside", "subdir_file", "empty", "fifo"]


@FUZZ
@given(files=st.dictionaries(fs_names(), st.binary(max_size=300) | good_text.map(str.encode), max_size=6),
       odd=st.lists(st.sampled_from(ODD_ENTRIES), unique=True))
def test_text_folder_reader_counts_every_file(files: dict[bytes, bytes], odd: list[str]) -> None:
    with scratch() as root:
        notes, outside = root / "notes", root / "outside"
        notes.mkdir()
        outside.mkdir()
        secret = outside / "secret.txt"
        secret.write_text("SECRET-OUTSIDE " + doc_text(99))
        (notes / "good.txt").write_text(GOOD["text"])
        expected = 1
        for name, content in files.items():
            path = os.path.join(os.fsencode(notes), name + b".txt")
            with open(path, "wb") as f:
                f.write(content)
            expected += 1
        expected += make_odd_entries(notes, outside, secret, odd)
        metrics, docs, rejects = run_ingest(root, [{"kind": "text", "path": "notes"}], filters={"min_chars": 1})
    assert metrics["documents_in"] == expected, (metrics, odd)
    assert not any("SECRET-OUTSIDE" in d.get("text", "") for d in docs + rejects)  # datatrove omits empty text
    reasons = metrics["rejected_by_reason"]
    outside_links = {"link_outside", "link_dangling", "link_to_dir"} & set(odd)
    assert reasons.get("symlink_outside_source", 0) == len(outside_links)


def make_odd_entries(notes: Path, outside: Path, secret: Path, odd: list[str]) -> int:
    """Creates the odd entries; returns how many of them the source lists (links and files)."""
    listed = 0
    for entry in odd:
        if entry == "link_outside":
            os.symlink(secret, notes / "escape.txt")
        elif entry == "link_inside":
            os.symlink(notes / "good.txt", notes / "alias.txt")
        elif entry == "link_dangling":
            os.symlink(outside / "missing.txt", notes / "dangling.txt")
        elif entry == "link_to_dir":
            os.symlink(outside, notes / "dirlink.txt")
        elif entry == "dir_named_txt":
            (notes / "folder.txt").mkdir()
            listed -= 1  # a folder is not a file: not listed
        elif entry == "dir_link_outside":  # files below a linked folder are never listed (rglob stays inside)
            os.symlink(outside, notes / "linked")
            listed -= 1
        elif entry == "subdir_file":
            (notes / "sub").mkdir()
            (notes / "sub" / "deep.md").write_text(doc_text(50))
        elif entry == "empty":
            (notes / "empty.txt").write_bytes(b"")
        elif entry == "fifo":
            os.mkfifo(notes / "pipe.txt")
            listed -= 1  # not a regular file: not listed, and never opened (it would block)
        listed += 1
    return listed


def test_jsonl_glob_through_a_linked_folder_outside_is_refused() -> None:
    """`data/**/*.jsonl` reaching a folder outside through a symlink: those files are rejects."""
    with scratch() as root:
        (root / "data").mkdir()
        (root / "outside").mkdir()
        (root / "data" / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
        (root / "outside" / "x.jsonl").write_text(json.dumps({"text": "SECRET-OUTSIDE " + doc_text(3)}) + "\n")
        os.symlink(root / "outside", root / "data" / "linked")
        os.symlink(root / "outside" / "x.jsonl", root / "data" / "direct.jsonl")
        metrics, docs, rejects = run_ingest(root, [{"kind": "jsonl", "path": "data/**/*.jsonl"}])
    assert not any("SECRET-OUTSIDE" in d["text"] for d in docs + rejects)
    assert metrics["rejected_by_reason"].get("symlink_outside_source", 0) >= 1
    assert [d["text"] for d in docs] == [GOOD["text"]]


# ---------------------------------------------------------------- parquet


@st.composite
def parquet_files(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """(file bytes, rows) of a parquet file with odd column types, or a damaged one (rows None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 6))
    kind = draw(st.sampled_from(["string", "large_string", "binary", "int", "null", "list", "struct", "missing"]))
    values = {
        "string": lambda: pa.array(draw(st.lists(st.none() | st.text(max_size=60) | good_text, min_size=n, max_size=n)),
                                   pa.string()),
        "large_string": lambda: pa.array([doc_text(i) for i in range(n)], pa.large_string()),
        "binary": lambda: pa.array(draw(st.lists(st.binary(max_size=40), min_size=n, max_size=n)), pa.binary()),
        "int": lambda: pa.array(list(range(n)), pa.int64()),
        "null": lambda: pa.nulls(n),
        "list": lambda: pa.array([["a", "b"]] * n, pa.list_(pa.string())),
        "struct": lambda: pa.array([{"x": i} for i in range(n)], pa.struct([("x", pa.int64())])),
        "missing": lambda: pa.array([doc_text(i) for i in range(n)], pa.string()),
    }[kind]()
    ids = pa.array(draw(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=10)).map(
        lambda v: None if v is None else str(v)), min_size=n, max_size=n)), pa.string())
    table = pa.table({"text" if kind != "missing" else "body": values, "id": ids})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "junk", "empty"]))
    if damage == "none":
        return data, n if kind != "missing" else None
    if damage == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))], None
    if damage == "flip":
        pos = draw(st.integers(0, len(data) - 1))
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:], None
    return (draw(st.binary(max_size=200)) if damage == "junk" else b""), None


@FUZZ
@given(files=st.lists(parquet_files(), min_size=1, max_size=3))
def test_parquet_reader_counts_every_row(files: list[tuple[bytes, int | None]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with scratch() as root:
        (root / "pq").mkdir()
        pq.write_table(pa.table({"text": [GOOD["text"]], "id": ["good"]}), root / "pq" / "a-good.parquet")
        for i, (data, _) in enumerate(files):
            (root / "pq" / f"f{i}.parquet").write_bytes(data)
        metrics, docs, _ = run_ingest(root, [{"kind": "parquet", "path": "pq/*.parquet", "id_field": "id"}],
                                            filters={"min_chars": 1})
    if all(rows is not None for _, rows in files):
        assert metrics["documents_in"] == 1 + sum(rows for _, rows in files), metrics
    # A damaged file may still read (a flipped byte in the leading magic, or in a value) or
    # be one reject where it breaks; either way run_ingest checked in = kept + rejected.
    assert "good" in {d["id"] for d in docs}


# ---------------------------------------------------------------- the question file


@st.composite
def question_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["good", "record", "junk", "hostile"]))
    if kind == "good":
        return json.dumps({"question": draw(st.text(min_size=1, max_size=40)) + "?",
                           "answers": draw(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3))}).encode()
    if kind == "record":
        row = draw(st.dictionaries(st.sampled_from(["question", "answers", "answer", "doc_id", "id"]), json_values))
        return json.dumps(row).encode()
    if kind == "junk":
        return draw(st.binary(max_size=120))
    return draw(hostile_lines | st.sampled_from([
        b'{"question": "q\\ud800?", "answer": "a"}', b'{"question": "q?", "answers": ["\\udc80"]}',
        b'{"question": "q?", "answer": "a", "id": ' + b"1" * 5000 + b"}",
        b'{"question": "q?", "answer": "a", "id": [[[1]]]}', b'{"question": "q?", "answer": "a", "doc_id": 3}',
    ]))


@FUZZ
@given(lines=st.lists(question_lines(), max_size=8))
def test_question_file_is_loaded_or_refused_with_file_and_line(lines: list[bytes]) -> None:
    with scratch() as root:
        path = root / "questions.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            questions = load_questions(path)
            event("loaded")
        except InputError as e:
            message = str(e)
            event("refused: " + message.removeprefix(str(path)).split("(")[0][:40])
            assert message.startswith(f"{path}"), message
            if "no questions" not in message and "appears more than once" not in message:
                assert message.startswith(f"{path}:") and message.split(":")[1].strip().isdigit(), message
            return
    for q in questions:  # whatever is accepted can be written back as UTF-8 JSON
        json.dumps([q.id, q.question, q.answers, q.doc_id], ensure_ascii=False).encode("utf-8")


def test_question_file_100_mb_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    with path.open("wb") as f:
        f.write(b'{"question": "q?", "answer": "a"}\n{"question": "')
        for _ in range(100):
            f.write(b"x" * (1 << 20))
        f.write(b'", "answer": "a"}\n')
    tracemalloc.start()
    with pytest.raises(InputError, match=rf"{path}:2: line is longer than {MAX_LINE_BYTES} bytes"):
        load_questions(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak


@pytest.mark.parametrize("content, message", [
    (b"", "no questions"),
    (b"\n  \n", "no questions"),
    (nested(100_000), ":1: not valid JSON"),
    (b'{"question": "q?", "answer": "a"}\n\xff\xfe', ":2: not UTF-8"),
    (b'{"question": "q\\ud800?", "answer": "a"}', ":1: .*surrogate"),
    (b'{"question": "q?", "answer": "a", "id": ' + b"1" * 5000 + b"}", ":1: not valid JSON"),
])
def test_question_file_classics(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_questions(path)


def denied(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a read of a file we may not read: the tests run as root, where chmod 0 would not stop it."""
    raise PermissionError(13, "Permission denied")


def test_question_file_that_is_a_folder_or_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="not a file"):
        load_questions(tmp_path)
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "q?", "answer": "a"}\n')

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(InputError, match=f"{path}: question file cannot be read .Permission denied"):
        load_questions(path)


# ---------------------------------------------------------------- the spec loader


def laughs(levels: int = 9, width: int = 10) -> str:
    """A YAML "billion laughs": `width ** levels` leaves from a few hundred bytes of aliases."""
    lines = ['l0: &l0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


BOMB_PLACES = [
    "name: x\ncorpus:\n  sources: *l9\n",
    "name: x\ncorpus:\n  sources: [{kind: python_docs}]\ntokenizer:\n  from: *l9\n",
    "name: x\ncorpus:\n  sources: [{kind: python_docs}]\nsft:\n  lora:\n    target_modules: *l9\n",
    "name: x\ncorpus:\n  sources: [{kind: python_docs}]\nextra_field: *l9\n",
]


@pytest.mark.parametrize("place", BOMB_PLACES)
def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, place: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(laughs() + place)
    start = time.perf_counter()
    tracemalloc.start()
    with pytest.raises(InputError, match=rf"{path}: .*alias"):
        load_spec(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 2.0 and peak < 32 * 2**20


@pytest.mark.parametrize("content, message", [
    ("a: &a [*a]\nname: x\n", "alias"),                                   # a recursive alias
    ("[" * 100_000, "nested too deeply"),
    ("name: x\ncorpus: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested too deeply"),
    ("!!python/object/apply:os.system ['touch /tmp/gristmill-pwned']\n", "invalid YAML"),
    ("name: !!python/name:os.system x\n", "invalid YAML"),
    ("name: x\nwhen: 2001-13-45\n", "invalid YAML"),                      # datetime raises ValueError
    ("name: x\nn: " + "1" * 5000 + "\n", "invalid YAML"),                 # int() digit limit
    ("name: x\nb: !!binary 'a'\n", "invalid YAML"),
    ("name: x\nb: !!bool maybe\n", "invalid YAML"),                      # KeyError inside PyYAML
    ("name: x\nb: !!timestamp soon\n", "invalid YAML"),                  # AttributeError inside PyYAML
    ("name: x\nb: !!float x\n", "invalid YAML"),
    ("name: x\x00\n", "invalid YAML"),
    ("", "YAML mapping"),
    ("null\n", "YAML mapping"),
    ("name: x\ncorpus:\n  sources: [{kind: python_docs}]\ntrust_remote_code: true\n", "--trust-remote-code"),
    ("name: x\ncorpus:\n  sources: [{kind: python_docs}]\npretrain:\n  trust_remote_code: true\n", "--trust-remote-code"),
    ("name: x\ncorpus:\n  sources: [{kind: jsonl, path: \"a\\0b\"}]\n", "corpus.sources.0.jsonl.path"),
    ("name: x\ncorpus:\n  sources: [{kind: text, path: " + "a" * 300 + "}]\n", "corpus.sources.0.text.path"),
    ("name: " + "a" * 500 + "\ncorpus:\n  sources: [{kind: python_docs}]\n", "name"),
    ("name: x\ncorpus:\n  sources: [{kind: python_docs}]\ndedup: {language: ../../klingon}\n", "dedup.language: Value "
     "error, datatrove has no word tokenizer for '../../klingon'"),
])
def test_spec_classics(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)
    assert not Path("/tmp/gristmill-pwned").exists()


def test_spec_that_is_a_folder_or_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="not a file"):
        load_spec(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\n")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(InputError, match=f"{path}: spec file cannot be read .Permission denied"):
        load_spec(path)


BASE_SPEC: dict[str, Any] = {
    "name": "fuzz",
    "corpus": {"sources": [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"},
                           {"kind": "text", "path": "notes"}]},
}
# Where mutations land: every section, some nested fields, and every path-like field.
SPEC_FIELDS = [
    ("name",), ("store",), ("corpus",), ("corpus", "sources"), ("corpus", "sources", 0), ("corpus", "sources", 0, "path"),
    ("corpus", "sources", 1, "path"), ("corpus", "sources", 1, "extensions"), ("corpus", "sources", 0, "kind"),
    ("corpus", "sources", 0, "text_field"), ("corpus", "filters"), ("corpus", "filters", "max_chars"),
    ("dedup",), ("dedup", "near"), ("dedup", "language"), ("quality",), ("quality", "filters"), ("quality", "pii"),
    ("tokenizer", "from"), ("tokenizer", "vocab_size"),
    ("pretrain", "from"), ("pretrain", "model"), ("pretrain", "model", "preset"), ("qa", "generator"),
    ("qa", "model", "path"), ("qa", "openai"), ("index", "embedder"), ("eval", "questions"), ("eval", "arms"),
    ("executor", "kind"), ("resources",), ("trust_remote_code",), ("unknown",),
]
# Strings that exercise path handling; no "~" or "/" prefixes that would walk real folders.
hostile_strings = st.sampled_from([
    "", ".", "..", "../..", "../outside/*.jsonl", "data/../../../etc", "/nonexistent/x", "a\0b", "a" * 300,
    "/".join(["a" * 200] * 30), "data/*.jsonl", "**/*.jsonl", "notes", "[", "*", "\udcff", "con:", "a:b",
    "spec.yaml", "data", "x" * 5000, "models", "models/", "../../project/models",
])
PATH_FIELDS = {"path", "from", "store", "questions", "embedder"}
leaf_values = json_values | hostile_strings | st.integers(-2**70, 2**70)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """BASE_SPEC with 1-3 fields set to odd values (path fields mostly to hostile paths, so
    that most examples get past validation to the planning that lists and reads them)."""
    spec = json.loads(json.dumps(BASE_SPEC))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(SPEC_FIELDS) | st.sampled_from([f for f in SPEC_FIELDS if f[-1] in PATH_FIELDS]))
        node: Any = spec
        for key in where[:-1]:
            if isinstance(node, dict):
                node = node.setdefault(key, {})
            elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                break
        else:
            if isinstance(node, dict) or (isinstance(node, list) and isinstance(where[-1], int) and where[-1] < len(node)):
                node[where[-1]] = draw(hostile_strings if where[-1] in PATH_FIELDS else leaf_values)
    return spec


@FUZZ
@given(raw=mutated_specs())
def test_spec_loader_and_plan_refuse_with_file_and_field(raw: dict[str, Any]) -> None:
    """A mutated spec loads, or is refused naming the file; a loaded one plans, or is refused
    naming the file and field (plan reads every source and `from` folder it names)."""
    with scratch() as top:
        root = top / "a" / "b" / "project"  # "..", "../.." and "data/../../../etc" stay inside `top`
        for folder in ("data", "notes", "models"):
            (root / folder).mkdir(parents=True)
        (root / "data" / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
        (root / "notes" / "a.txt").write_text(doc_text(3))
        (root / "models" / "config.json").write_text("{}")
        with open(os.path.join(os.fsencode(root / "models"), b"weights-\xff.bin"), "wb") as f:
            f.write(b"a file name that is not UTF-8")
        path = root / "spec.yaml"
        try:
            path.write_text(yaml.safe_dump(raw, allow_unicode=False))
        except (yaml.YAMLError, UnicodeEncodeError):
            return  # not writable as YAML: nothing to load
        try:
            prepare_run(path, store=str(root / "store"), until="ingest")
            event("planned")
        except InputError as e:
            assert str(path) in str(e), str(e)
            event("refused: " + str(e).removeprefix(str(path)).split("\n")[-1].strip()[:50])


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_spec_loader_on_arbitrary_text(text: str) -> None:
    with scratch() as root:
        path = root / "spec.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_spec(path)
        except InputError as e:
            assert str(path) in str(e), str(e)


# ---------------------------------------------------------------- end to end through the CLI

GRISTMILL = [sys.executable, "-m", "flows.cli"]


def gristmill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GRISTMILL, *args], check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})


@pytest.mark.slow
def test_cli_ingest_of_hostile_jsonl_counts_rejects(tmp_path: Path) -> None:
    """`gristmill run SPEC --until ingest` by the CLI's entry point in this process (the same
    parsing, plan and Prefect flow; no interpreter and Prefect server to start): exit 0."""
    from tests.reliability.test_security import cli_in_process

    (tmp_path / "data").mkdir()
    lines = [json.dumps({"id": f"d{i}", "text": doc_text(i)}).encode() for i in range(3)] + list(HOSTILE)
    (tmp_path / "data" / "a.jsonl").write_bytes(b"\n".join(lines))
    spec = write_spec(tmp_path, [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"}])
    code, err = cli_in_process(["run", str(spec), "--store", str(tmp_path / "store"), "--until", "ingest"])
    assert code == 0, err[-3000:]
    record = json.loads(next((tmp_path / "store" / "ingest").glob("*/artifact.json")).read_text())
    m = record["metrics"]
    assert m["documents_in"] == len(lines) == m["documents_out"] + m["rejected"], m
    assert m["rejected"] >= len(HOSTILE) - 3  # at most the BOM, \u0000 and \r lines are kept


@pytest.mark.slow
def test_cli_alias_bomb_spec_and_bad_question_file_are_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "bomb.yaml"
    spec.write_text(laughs() + BOMB_PLACES[0])
    start = time.perf_counter()
    proc = gristmill("run", str(spec), "--store", str(tmp_path / "store"))
    assert proc.returncode == 2 and f"{spec}: " in proc.stderr and "alias" in proc.stderr, proc.stderr[-3000:]
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b'{"question": "q?", "answer": "a"}\n' + nested(100_000) + b"\n")
    proc = gristmill("eval", str(spec), "--questions", str(questions), "--store", str(tmp_path / "store"))
    assert proc.returncode == 2 and f"{questions}:2: not valid JSON" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    print(f"two CLI refusals: {time.perf_counter() - start:.1f} s")
