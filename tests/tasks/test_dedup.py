"""dedup: exact and MinHash near duplicates removed, each naming the document it duplicates."""

import json
from pathlib import Path

import pytest

from tasks.core.runner import execute, plan
from tasks.dedup import lsh_bands
from tests.conftest import doc_text, write_jsonl
from tests.tasks.test_ingest import read_docs


def run_all(factory, **sections):
    spec = factory.load(**sections)
    return [execute(row, spec, factory.store) for row in plan(spec, factory.store)[:2]]  # ingest, dedup


@pytest.fixture
def with_duplicates(project):
    base = doc_text(3, words=80)
    words = base.split()
    words[10] = "changed"
    write_jsonl(project.root / "data" / "dups.jsonl", [
        {"id": "exact-of-d3", "text": doc_text(3)},
        {"id": "near-of-big", "text": " ".join(words)},
        {"id": "big", "text": base},
    ])
    return project


def test_exact_and_near_duplicates(with_duplicates):
    _, dedup = run_all(with_duplicates)
    m = dedup.record.metrics
    assert (m["documents_in"], m["documents_out"], m["exact_duplicates"], m["near_duplicates"]) == (13, 11, 1, 1)
    removed = [json.loads(l) for l in (Path(dedup.path) / "removed.jsonl").read_text().splitlines()]
    pairs = {(r["kind"], frozenset((r["id"], r["duplicate_of"]))) for r in removed}
    assert pairs == {("exact", frozenset({"d3", "exact-of-d3"})), ("near", frozenset({"big", "near-of-big"}))}
    kept = {d["id"] for d in read_docs(Path(dedup.path) / "documents")}
    assert len(kept) == 11 and not kept & {r["id"] for r in removed}


def test_passes_can_be_switched_off(with_duplicates):
    _, dedup = run_all(with_duplicates, dedup={"exact": True, "near": None})
    assert (dedup.record.metrics["exact_duplicates"], dedup.record.metrics["near_duplicates"]) == (1, 0)
    _, dedup = run_all(with_duplicates, dedup={"exact": False, "near": None})
    assert dedup.record.metrics["documents_out"] == 13


def test_near_threshold_is_respected(with_duplicates):
    # At 0.98 a one-word edit in 80 words (Jaccard of 5-gram sets ~0.88) is no longer a duplicate.
    _, dedup = run_all(with_duplicates, dedup={"near": {"threshold": 0.98}})
    assert dedup.record.metrics["near_duplicates"] == 0


def test_several_tasks_remove_the_same_duplicate_sets(with_duplicates):
    """Sharding may change which member of a duplicate set survives (so `tasks` is in the
    key), never how many documents survive or which sets are collapsed."""
    _, one = run_all(with_duplicates)
    _, two = run_all(with_duplicates, executor={"tasks": 2, "workers": 2})
    assert len(list((Path(two.path) / "documents").glob("*.jsonl.gz"))) == 2

    def summary(result):
        removed = [json.loads(l) for l in (Path(result.path) / "removed.jsonl").read_text().splitlines()]
        kept = {d["id"] for d in read_docs(Path(result.path) / "documents")}
        return len(kept), {frozenset((r["id"], r["duplicate_of"])) for r in removed}

    assert summary(one) == summary(two)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_lsh_bands_midpoint_matches_threshold(threshold):
    bands, rows = lsh_bands(threshold)
    assert abs((1 / bands) ** (1 / rows) - threshold) < 0.02
    assert bands * rows <= 128
