"""A run's own report: the eval artifact's report under the run's name, with what changed and
how its regression gates came out.

The eval artifact holds only what its fingerprint determines, so two runs of different names
(or a rerun after other evals) share it byte for byte. What depends on the run (its name, the
change since the previous eval of that name, and `eval.gates` checked against both, eval/gates.py)
is written after eval, beside the artifacts:

    <store>/runs/<run name>/report.md, report.html, f1.png, loss.png, run.json

and published as Prefect artifacts (a Markdown report and the arms table) when it runs inside
a flow. `gristmill report SPEC` prints where it is. A failed gate does not stop the report from
being written: `RunReport.failure` is what the flow and the CLI fail the run with, afterwards.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_specs.errors import GateFailed
from data_specs.schema import GateSpec
from eval.gates import GateResult, check_gates, failure_message
from eval.report import CHARTS, write_report
from tasks.core.artifacts import Report
from tasks.core.store import ArtifactRecord, ArtifactStore

RUNS = "runs"
CHANGE_METRICS = ("em", "f1", "rouge_l", "contains")
log = logging.getLogger("gristmill")


@dataclass(frozen=True)
class RunReport:
    """Where a run's report was written, and its gates as checked."""

    location: str
    gates: tuple[GateResult, ...] = ()

    @property
    def failure(self) -> GateFailed | None:
        """The failure naming every failed gate, its value and threshold; None when all passed (or none)."""
        message = failure_message(self.gates)
        return GateFailed(message) if message else None


def previous_eval(store: ArtifactStore, run_name: str, fingerprint: str) -> ArtifactRecord | None:
    """The latest intact eval of this run name other than `fingerprint`, if any."""
    earlier = [r for r in store.history("eval") if r.run_name == run_name and r.fingerprint != fingerprint]
    return next((r for r in reversed(earlier) if store.find("eval", r.fingerprint).record is not None), None)


def _change_basis(record: ArtifactRecord, earlier: dict[str, Any]) -> dict[str, Any]:
    """The previous eval's figures the change table compares against."""
    return {"fingerprint": record.fingerprint, "created_at": record.created_at,
            "arms": {a: {m: s[m] for m in CHANGE_METRICS} for a, s in earlier["arms"].items()},
            "retrieval": earlier["retrieval"]}


def publish_run_report(store: ArtifactStore, run_name: str, fingerprint: str,
                       gates: Sequence[GateSpec] = ()) -> RunReport:
    """Writes the run's report from eval artifact `fingerprint`, with `gates` checked against it and the
    previous eval of this run name; returns where it is and the gate results (failed or not)."""
    report = Report.at(store.materialize("eval", fingerprint))
    summary = report.summary()
    previous = previous_eval(store, run_name, fingerprint)
    earlier = Report.at(store.materialize("eval", previous.fingerprint)).summary() if previous is not None else None
    results = tuple(check_gates(gates, summary, earlier))
    for r in results:
        log.log(logging.INFO if r.passed else logging.WARNING, "gate %s: %s (%s)", r.gate,
                "passed" if r.passed else "FAILED", r.message)
    run = {"name": run_name, "eval": fingerprint,
           "previous": _change_basis(previous, earlier) if previous is not None else None,
           "gates": [r.to_dict() for r in results]}
    pngs = {name: (report.path / f"{name}.png").read_bytes() for name in CHARTS if (report.path / f"{name}.png").exists()}
    with tempfile.TemporaryDirectory(prefix="gristmill-report-") as tmp:
        folder = Path(tmp)
        write_report(folder, summary, pngs, run)
        (folder / "run.json").write_text(json.dumps(run, indent=2))
        where = store.publish_view(f"{RUNS}/{run_name}", folder)
        _publish_prefect_artifacts(run_name, summary, (folder / "report.md").read_text(encoding="utf-8"))
    return RunReport(where, results)


def run_report_location(store: ArtifactStore, run_name: str) -> str | None:
    """Where a run's report is, when one was written."""
    return store.view_location(f"{RUNS}/{run_name}", "report.html")


def _publish_prefect_artifacts(run_name: str, summary: dict[str, Any], report_md: str) -> None:
    """The report and the arms table in the Prefect UI, when this runs inside a flow or task run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return
    key = "gristmill-report-" + "".join(c if c.isalnum() else "-" for c in run_name.lower())
    create_markdown_artifact(report_md, key=key, description=summary["verdict"])
    create_table_artifact([{"arm": a, **{k: v for k, v in s.items() if not isinstance(v, (list, dict))}}
                           for a, s in summary["arms"].items()], key=key + "-arms", description="arms")
