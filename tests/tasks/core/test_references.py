"""Run references resolved at plan time (tasks/core/references.py), on stores holding hand-made
artifacts: no training, so each case is a plan or two. The run itself is tests/tasks/test_warm_start.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_specs.errors import InputError
from flows.cli import main
from tasks.core.files import checksum_tree
from tasks.core.graph import Graph
from tasks.core.runner import plan
from tasks.core.store import ArtifactRecord, ArtifactStore, now_iso
from tasks.registry import PIPELINE
from tests.conftest import SpecFactory, doc_text, write_jsonl

NIGHTLY = {"run": "nightly"}
STARTED = {"tokenizer", "pretrain"}  # the stages keyed by what pretrain.from resolved to
# The pipeline down to midtrain: what a run reference touches, planned in a third less time.
SHORT = Graph(*(w for w in PIPELINE.wires if w.stage.name in ("ingest", "dedup", "quality", "tokenizer", "pretrain",
                                                               "qa", "midtrain")))


def publish(store: ArtifactStore, stage: str, fp: str, run: str, key: dict | None = None) -> ArtifactRecord:
    """A finished artifact with a one-file payload, published now (later than every earlier one)."""
    build = store.new_build_dir(stage, fp)
    (build / "payload.txt").write_text(f"{stage} {fp}")
    record = ArtifactRecord(stage=stage, fingerprint=fp, run_name=run, key=key or {}, metrics={},
                            files=checksum_tree(build), wall_s=0.0, versions={}, created_at=now_iso())
    store.publish(build, record)
    return record


def rows(factory: SpecFactory, name: str = "t", graph: Graph = SHORT, **pretrain) -> dict:
    return {r.name: r for r in plan(factory.load(name=name, pretrain=pretrain), factory.store, graph=graph)}


def fingerprints(factory: SpecFactory, graph: Graph = SHORT, **pretrain) -> dict[str, str]:
    return {n: r.fingerprint for n, r in rows(factory, graph=graph, **pretrain).items()}


def test_the_newest_intact_artifact_of_that_run_and_stage(project):
    store = project.store
    publish(store, "pretrain", "a" * 20, "nightly")
    newest = publish(store, "pretrain", "b" * 20, "nightly")
    publish(store, "pretrain", "c" * 20, "other")  # newer, but another run's
    publish(store, "midtrain", "d" * 20, "nightly")  # that run's, but another stage
    planned = rows(project, **{"from": NIGHTLY})
    assert planned["pretrain"].start.fingerprint == newest.fingerprint
    for name in STARTED:
        assert planned[name].key["resolved"]["pretrain.from"] == {"stage": "pretrain", "fingerprint": "b" * 20}
    assert planned["tokenizer"].key["upstream"] == {}  # the previous tokenizer, not one trained on the corpus
    assert "pretrain.from" not in planned["midtrain"].key["resolved"]  # keyed through pretrain's fingerprint
    assert planned["midtrain"].references == {"pretrain.from": ("pretrain", "b" * 20)}  # its lineage
    assert planned["qa"].references == {} and planned["qa"].start is None
    midtrain = rows(project, **{"from": {"run": "nightly", "stage": "midtrain"}})["pretrain"]
    assert midtrain.key["resolved"]["pretrain.from"] == {"stage": "midtrain", "fingerprint": "d" * 20}


def test_damaged_and_quarantined_artifacts_are_passed_over(project):
    store = project.store
    oldest = publish(store, "pretrain", "a" * 20, "nightly")
    middle = publish(store, "pretrain", "b" * 20, "nightly")
    newest = publish(store, "pretrain", "c" * 20, "nightly")
    (Path(store.location("pretrain", newest.fingerprint)) / "payload.txt").write_text("cut")  # another size
    assert rows(project, **{"from": NIGHTLY})["pretrain"].start.fingerprint == middle.fingerprint
    store.quarantine("pretrain", middle.fingerprint)
    assert rows(project, **{"from": NIGHTLY})["pretrain"].start.fingerprint == oldest.fingerprint
    store.quarantine("pretrain", oldest.fingerprint)
    with pytest.raises(InputError, match=r"pretrain.from: run 'nightly' has no intact pretrain artifact .*"
                                         r"\(1 damaged one skipped\)"):
        rows(project, **{"from": NIGHTLY})


def test_a_newer_artifact_of_that_run_changes_the_started_stages_and_what_reads_them(project):
    publish(project.store, "pretrain", "a" * 20, "nightly")
    before = fingerprints(project, PIPELINE, **{"from": NIGHTLY})
    publish(project.store, "pretrain", "b" * 20, "nightly")
    after = fingerprints(project, PIPELINE, **{"from": NIGHTLY})
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"tokenizer", "pretrain", "midtrain", "sft", "dpo", "reader", "eval"}
    publish(project.store, "pretrain", "c" * 20, "other")
    assert fingerprints(project, **{"from": NIGHTLY}) == {n: after[n] for n in SHORT.names() if n != "quality"}


def test_a_warm_tokenizer_is_keyed_by_the_reference_not_the_corpus(project):
    publish(project.store, "pretrain", "a" * 20, "nightly")
    before = fingerprints(project, **{"from": NIGHTLY})
    write_jsonl(project.root / "data" / "more.jsonl", [{"id": "n", "text": doc_text(77)}])
    after = fingerprints(project, **{"from": NIGHTLY})
    assert after["tokenizer"] == before["tokenizer"]
    assert after["ingest"] != before["ingest"] and after["pretrain"] != before["pretrain"]


def test_fallback_scratch_plans_exactly_as_without_from(project):
    publish(project.store, "pretrain", "a" * 20, "other")
    planned = rows(project, **{"from": {"run": "nightly", "fallback": "scratch"}})
    assert {n: r.fingerprint for n, r in planned.items()} == fingerprints(project)
    start = planned["pretrain"].start
    assert start.fingerprint is None and planned["pretrain"].as_json()["from"]["scratch"] is True
    assert "from scratch" in start.describe() and "no intact pretrain artifact" in start.describe()
    assert planned["tokenizer"].key["upstream"]  # trained on the corpus, as always


def test_a_missing_run_is_bad_input_naming_field_and_run(project, capsys):
    publish(project.store, "pretrain", "a" * 20, "other")
    with pytest.raises(InputError, match=r"spec.yaml: pretrain.from: run 'nightly' has no intact pretrain "
                                         r"artifact in .*fallback: scratch"):
        rows(project, **{"from": NIGHTLY})
    path = project.write(pretrain={"from": NIGHTLY})
    assert main(["plan", str(path), "--store", project.store.url]) == 2
    assert "pretrain.from: run 'nightly' has no intact pretrain artifact" in capsys.readouterr().err


def test_plan_shows_what_it_resolved_to(project, capsys):
    publish(project.store, "pretrain", "a" * 20, "nightly")
    path = project.write(pretrain={"from": NIGHTLY})
    assert main(["plan", str(path), "--store", project.store.url]) == 0
    out = capsys.readouterr().out
    assert out.count(f"from pretrain.from: run 'nightly' -> pretrain {'a' * 20}, published ") == 1
    assert main(["plan", str(path), "--store", project.store.url, "--json"]) == 0
    by_stage = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert by_stage["pretrain"]["from"]["fingerprint"] == "a" * 20 and by_stage["pretrain"]["from"]["run"] == "nightly"
    assert by_stage["pretrain"]["resolved"]["pretrain.from"] == {"stage": "pretrain", "fingerprint": "a" * 20}
    assert by_stage["qa"]["from"] is None


def test_a_nightly_naming_its_own_run_is_cached_after_its_run(project):
    """Its newest artifact is the one its last run built: planning again must find it cached, not
    start from it and train once more. Once the corpus changes, it is what the next night starts from."""
    publish(project.store, "pretrain", "a" * 20, "nightly")
    first = rows(project, "nightly", **{"from": NIGHTLY})["pretrain"]
    assert first.start.fingerprint == "a" * 20 and not first.cached
    publish(project.store, "pretrain", first.fingerprint, "nightly", key=first.key)  # what the run builds
    again = rows(project, "nightly", **{"from": NIGHTLY})["pretrain"]
    assert again.cached and again.fingerprint == first.fingerprint
    assert again.start.fingerprint == "a" * 20 and "is what this plan builds" in again.start.note
    write_jsonl(project.root / "data" / "more.jsonl", [{"id": "n", "text": doc_text(77)}])
    tomorrow = rows(project, "nightly", **{"from": NIGHTLY})["pretrain"]
    assert tomorrow.start.fingerprint == first.fingerprint and not tomorrow.cached


def test_a_nightly_whose_first_night_trained_from_scratch_is_cached_too(project):
    scratch = {"from": {"run": "nightly", "fallback": "scratch"}}
    first = rows(project, "nightly", **scratch)["pretrain"]
    assert first.start.fingerprint is None
    publish(project.store, "pretrain", first.fingerprint, "nightly", key=first.key)
    again = rows(project, "nightly", **scratch)["pretrain"]
    assert again.cached and again.start.fingerprint is None and "trained from scratch" in again.start.note
