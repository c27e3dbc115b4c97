"""ingest: every source kind, normalisation, and bad input counted with its reason, never lost."""

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from data_specs.errors import InputError
from tasks.core.runner import execute, plan
from tasks.ingest import normalize_text
from tasks.train.lm_data import hash_unit
from tests.conftest import SpecFactory, doc_text, write_jsonl


def run_ingest(factory: SpecFactory, **sections):
    spec = factory.load(**sections)
    row = plan(spec, factory.store)[0]
    return execute(row, spec, factory.store)


def read_docs(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


def test_bad_records_are_counted_and_kept_with_their_reason(project):
    write_jsonl(project.root / "data" / "bad.jsonl", [
        '{"id": "broken", "text": ',          # malformed JSON
        {"id": "notext", "body": doc_text(1)},  # no text field
        b'{"id": "latin1", "text": "caf\xe9 ' + doc_text(2).encode() + b'"}',  # not UTF-8
        {"id": "empty", "text": "   "},       # empty after normalisation
        {"id": "short", "text": "too short"},
        {"id": "number", "text": 42},
        "[1, 2, 3]",
    ])
    result = run_ingest(project)
    m = result.record.metrics
    assert m["documents_out"] == 10
    assert m["rejected"] == 7 and m["documents_in"] == 17
    assert m["rejected_by_reason"] == {
        "malformed_json": 1, "missing_text_field": 1, "invalid_utf8": 1, "empty_text": 1,
        "too_short": 1, "text_not_a_string": 1, "not_an_object": 1,
    }
    rejects = read_docs(Path(result.path) / "rejects")
    assert len(rejects) == 7
    by_reason = {r["metadata"]["filter_reason"]: r for r in rejects}
    assert by_reason["invalid_utf8"]["metadata"]["where"] == "line 3"
    assert "caf\\xe9" in by_reason["invalid_utf8"]["text"]  # the raw bytes are kept, escaped
    assert by_reason["malformed_json"]["metadata"]["source"] == "0:bad.jsonl"
    assert by_reason["missing_text_field"]["text"].startswith('{"id": "notext"')


def test_glob_matching_nothing_names_the_source(project):
    with pytest.raises(InputError, match=r"corpus.sources.0 \(jsonl\): no file matches 'nothing/\*.jsonl'"):
        run_ingest(project, corpus={"sources": [{"kind": "jsonl", "path": "nothing/*.jsonl"}]})


def test_source_whose_records_are_all_rejected_names_the_source(project):
    write_jsonl(project.root / "other" / "x.jsonl", ["not json", {"text": ""}])
    sources = [{"kind": "jsonl", "path": "data/*.jsonl"}, {"kind": "jsonl", "path": "other/*.jsonl"}]
    with pytest.raises(InputError, match=r"corpus.sources.1 \(jsonl\): no documents kept: all 2 records were rejected"):
        run_ingest(project, corpus={"sources": sources})


def test_empty_file_is_no_documents(project):
    (project.root / "empty").mkdir()
    (project.root / "empty" / "e.jsonl").write_text("")
    with pytest.raises(InputError, match="it holds no records"):
        run_ingest(project, corpus={"sources": [{"kind": "jsonl", "path": "empty/*.jsonl"}]})


def test_ids_from_content_when_absent(project):
    result = run_ingest(project, corpus={"sources": [{"kind": "jsonl", "path": "data/*.jsonl"}]})
    ids = [d["id"] for d in read_docs(Path(result.path) / "documents")]
    assert len(ids) == 10 and len(set(ids)) == 10 and all(len(i) == 16 for i in ids)


def test_text_folder_parquet_and_hf_dataset_sources(project, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (project.root / "notes" / "sub").mkdir(parents=True)
    (project.root / "notes" / "a.md").write_text(doc_text(20))
    (project.root / "notes" / "sub" / "b.txt").write_text(doc_text(21))
    (project.root / "notes" / "skip.bin").write_text(doc_text(22))
    (project.root / "notes" / "bad.txt").write_bytes(b"\xff\xfe" + doc_text(23).encode())
    outside = tmp_path / "outside.txt"
    outside.write_text(doc_text(24))
    os.symlink(outside, project.root / "notes" / "link.txt")
    (project.root / "pq").mkdir()
    pq.write_table(pa.table({"body": [doc_text(30), doc_text(31)], "key": ["p0", "p1"]}), project.root / "pq" / "x.parquet")
    datasets.Dataset.from_dict({"text": [doc_text(40), doc_text(41), doc_text(42)]}).save_to_disk(str(project.root / "hf"))

    result = run_ingest(project, corpus={"sources": [
        {"kind": "text", "path": "notes"},
        {"kind": "parquet", "path": "pq/*.parquet", "text_field": "body", "id_field": "key"},
        {"kind": "hf_dataset", "path": "hf"},
    ]})
    m = result.record.metrics
    assert [s["kept"] for s in m["sources"]] == [2, 2, 3]
    assert m["rejected_by_reason"] == {"invalid_utf8": 1, "symlink_outside_source": 1}
    ids = {d["id"] for d in read_docs(Path(result.path) / "documents")}
    assert {"a.md", "sub/b.txt", "p0", "p1"} <= ids


def test_normalize_text():
    assert normalize_text("  caf\u0065\u0301\r\nline\u00a0two  \n\n\n\nend\x00 ") == "caf\u00e9\nline two\n\nend"
    assert normalize_text("keeps\n    indentation") == "keeps\n    indentation"


def test_a_sample_keeps_the_same_documents_in_any_order_and_rejects_the_rest_with_a_reason(project):
    """`filters.sample` keeps a document when the hash of its id and the seed falls under the
    share: the kept set is exactly that, does not depend on the order of the corpus, changes with
    the seed, and every other document is in the rejects as `not_sampled`."""
    rows = [{"id": f"d{i}", "text": doc_text(i)} for i in range(60)]
    data = project.root / "data" / "docs.jsonl"

    def kept(order: list[dict], **filters) -> tuple[set[str], dict]:
        write_jsonl(data, order)
        result = run_ingest(project, corpus={"sources": [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"}],
                                             "filters": {"min_chars": 10, **filters}})
        ids = {d["id"] for d in read_docs(Path(result.path) / "documents")}
        rejects = read_docs(Path(result.path) / "rejects")
        assert {r["metadata"]["filter_reason"] for r in rejects} <= {"not_sampled"}
        assert ids | {r["id"] for r in rejects} == {r["id"] for r in rows} and not ids & {r["id"] for r in rejects}
        return ids, result.record.metrics

    expected = {r["id"] for r in rows if hash_unit(0, r["id"]) < 0.4}
    ids, metrics = kept(rows, sample=0.4)
    assert ids == expected and 10 < len(ids) < 40
    assert metrics["rejected_by_reason"] == {"not_sampled": 60 - len(ids)}
    assert kept(rows[::-1], sample=0.4)[0] == expected
    other = kept(rows, sample=0.4, sample_seed=1)[0]
    assert other != expected and other == {r["id"] for r in rows if hash_unit(1, r["id"]) < 0.4}
    assert kept(rows)[0] == {r["id"] for r in rows}  # the default keeps every document


@pytest.mark.parametrize("share", [0, -0.1, 1.5])
def test_a_sample_outside_0_to_1_names_the_field(project, share):
    with pytest.raises(InputError, match=r"corpus.filters.sample"):
        project.load(corpus={"sources": [{"kind": "jsonl", "path": "data/*.jsonl"}], "filters": {"sample": share}})


@pytest.mark.parametrize("length, ok", [(75, True), (76, False)])
def test_a_tmpdir_too_long_for_the_local_executors_socket_is_bad_input_naming_it(project, monkeypatch, length, ok):
    """datatrove's local executor needs a Unix socket under TMPDIR (at most 107 characters with its
    32-character suffix): 75 characters still build; 76 are bad input naming TMPDIR, where
    multiprocessing's Manager would die and leave a bare EOFError."""
    folder = Path("/tmp") / f"gm-{os.getpid()}-".ljust(length - len("/tmp/"), "d")
    assert len(str(folder)) == length
    folder.mkdir()
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(folder))
        if ok:
            assert run_ingest(project).state == "built"
        else:
            with pytest.raises(InputError, match=rf"TMPDIR: {folder} is 76 characters; .* at most 75 characters"):
                run_ingest(project)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
