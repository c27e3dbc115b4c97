"""The run's report on a finished tiny.yaml store: gates checked against the real eval summary and
the previous eval of the run name, shown in report.md's Gates table and recorded in run.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_specs.errors import GateFailed
from data_specs.schema import GateSpec
from tasks.core.artifacts import Report
from tasks.core.files import checksum_tree
from tasks.core.store import RECORD, ArtifactStore
from tasks.run_report import publish_run_report
from tests.conftest import TINY_STORE_TIMEOUT_S

# The finished tiny store is built once per session (tests/conftest.py), maybe by the first test here.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(TINY_STORE_TIMEOUT_S)]


@pytest.fixture
def store(tiny_store: Path, tmp_path: Path) -> ArtifactStore:
    """A copy of the session's finished tiny store (one eval, built by run `tiny`)."""
    shutil.copytree(tiny_store, tmp_path / "store")
    return ArtifactStore(tmp_path / "store")


def only_eval(store: ArtifactStore) -> Report:
    (record,) = store.history("eval")
    return Report.at(Path(store.root) / "eval" / record.fingerprint)


def gates(*fields: dict) -> tuple[GateSpec, ...]:
    return tuple(GateSpec.model_validate(f) for f in fields)


def add_previous_eval(store: ArtifactStore, source: Report, finetuned_f1: float) -> str:
    """Publishes an earlier eval of run `tiny` (the same payload, its finetuned F1 replaced) through
    the store's own publish, so the store holds it as an intact artifact; returns its fingerprint."""
    fingerprint = "0" * 20
    build = store.new_build_dir("eval", fingerprint)
    shutil.copytree(source.path, build, dirs_exist_ok=True, ignore=shutil.ignore_patterns(RECORD))
    summary = source.summary()
    summary["arms"]["finetuned"]["f1"] = finetuned_f1
    (build / Report.SUMMARY).write_text(json.dumps(summary))
    record = source.record.model_copy(update={"fingerprint": fingerprint, "files": checksum_tree(build),
                                              "created_at": "2000-01-01T00:00:00+00:00"})
    store.publish(build, record)
    return fingerprint


def test_gates_against_the_real_summary_fail_at_the_edge_and_the_report_shows_them(store):
    report = only_eval(store)
    f1 = report.summary()["arms"]["finetuned"]["f1"]
    checked = gates({"arm": "finetuned", "metric": "f1", "min": f1},  # equal: passes
                    {"arm": "finetuned", "metric": "f1", "min": f1 + 0.001},  # just above: fails
                    {"arm": "finetuned", "metric": "f1", "max_drop_vs_previous": 0.0},  # first run: passes
                    {"metric": "retrieval.recall@5", "min": 0.0})
    run = publish_run_report(store, "tiny", report.fingerprint, checked)
    assert [g.passed for g in run.gates] == [True, False, True, True]
    assert run.gates[2].message.startswith("no previous run")
    assert isinstance(run.failure, GateFailed)
    assert str(run.failure).startswith(f"1 of 4 regression gate(s) failed (eval.gates): finetuned f1 >= {f1 + 0.001:.4g}: "
                                       f"value {f1:.4g}, threshold {f1 + 0.001:.4g}")

    folder = Path(run.location)
    recorded = json.loads((folder / "run.json").read_text())["gates"]
    assert [(g["gate"], g["passed"], g["value"], g["threshold"]) for g in recorded] == [
        (g.gate, g.passed, g.value, g.threshold) for g in run.gates]
    md = (folder / "report.md").read_text()
    assert "## Gates\n\n3 of 4 passed; 1 failed, so the run failed (exit code 3)." in md
    assert md.index("## Gates") < md.index("## What was compared")
    assert f"| finetuned f1 >= {f1 + 0.001:.4g} | **FAIL** |" in md
    assert "<h2>Gates</h2>" in (folder / "report.html").read_text()


def test_a_drop_gate_compares_with_the_previous_eval_of_the_run_name(store):
    report = only_eval(store)
    f1 = report.summary()["arms"]["finetuned"]["f1"]
    previous = add_previous_eval(store, report, finetuned_f1=f1 + 0.05)
    drop = gates({"arm": "finetuned", "metric": "f1", "max_drop_vs_previous": 0.02})
    (result,) = publish_run_report(store, "tiny", report.fingerprint, drop).gates
    assert not result.passed and result.threshold == pytest.approx(f1 + 0.03)
    assert "more than the allowed drop of 0.02" in result.message
    md = (Path(publish_run_report(store, "tiny", report.fingerprint, drop).location) / "report.md").read_text()
    assert f"Against eval {previous}" in md  # the change table and the gate read the same previous eval
    # Another run name has no previous eval: its drop gate passes, saying so.
    (other,) = publish_run_report(store, "team-b", report.fingerprint, drop).gates
    assert other.passed and other.message.startswith("no previous run")
    loose = gates({"arm": "finetuned", "metric": "f1", "max_drop_vs_previous": 0.05})
    assert publish_run_report(store, "tiny", report.fingerprint, loose).failure is None


def test_without_gates_the_report_has_no_gates_table(store):
    report = only_eval(store)
    run = publish_run_report(store, "tiny", report.fingerprint)
    assert run.gates == () and run.failure is None
    assert "## Gates" not in (Path(run.location) / "report.md").read_text()
    assert json.loads((Path(run.location) / "run.json").read_text())["gates"] == []
