"""quality: datatrove's heuristic filters (Gopher, C4, FineWeb, regex) and PII replacement, after dedup.

Reads:   the corpus's documents/ (dedup's), and the upstream records (for the data card).
Writes:  documents/*.jsonl.gz (the kept documents, e-mails and IPs replaced when `pii` is set),
         removed/<filter>/*.jsonl.gz (every removed document, whole, with metadata.filter_reason:
         datatrove's exclusion writers), removed.jsonl (one line per removed document: id,
         filter, reason, source, chars, first line of text), data_card.json and lengths.png (see
         tasks/data/card.py), logs/ (datatrove's stats and task logs).
Metrics: documents_in, documents_out, chars_in, chars_out, rejected_by_filter {filter: n},
         rejected_by_reason {filter: {reason: n}}, pii {emails, ips} (null without `pii`).
Alone:   gristmill run SPEC --only quality

One datatrove pipeline: read, tally, each filter in spec order (a document leaves at the first
that removes it, into that filter's exclusion writer), PII replacement, tally, write. Its task
logs stay in the per-fingerprint work folder, so a killed run resumes with the ranks it
finished. `quality: null` skips the stage: its consumers then read dedup's documents
(tasks/core/graph.py). A filter that leaves no document is bad input (exit 2) naming the filter
and the threshold that did it, not an empty corpus for the stages below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_specs.errors import InputError
from data_specs.schema import QualitySpec, Section, filter_label, filter_parameter
from eval.charts import length_chart
from tasks.core.artifacts import Documents
from tasks.core.files import link_tree
from tasks.core.jsonl import write_jsonl
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.data.card import FilterRun, Tallied, data_card, filter_table, removed_rows
from tasks.data.engine import StepCounts, run_pipeline, step_counts

# datatrove's readers, writers and filters (and tasks/data/quality_filters.py, built on them) are
# imported where the pipeline is built: they are slow to import, and planning a run imports this
# module without running it.
if TYPE_CHECKING:
    from datatrove.pipeline.writers import JsonlWriter

NAME = "quality"


@dataclass(frozen=True)
class QualityInputs:
    documents: Documents


def _writer(folder: Path) -> JsonlWriter:
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")


def steps(cfg: QualitySpec, specs: list[Section], source: Path, work: Path) -> list:
    """read, tally, the filters (each with its exclusion writer), PII, tally, write. The filters
    are steps 2 .. 2 + len(specs) - 1, PII the next; the tallies are steps 1 and -2."""
    from datatrove.pipeline.readers import JsonlReader

    from tasks.data.quality_filters import CountingPII, Tally, make_filter

    out: list = [JsonlReader(str(source), glob_pattern="*.jsonl*", add_file_path=False), Tally()]
    for spec in specs:
        out.append(make_filter(spec, cfg.language, _writer(work / "removed" / filter_label(spec))))
    if cfg.pii is not None:
        out.append(CountingPII(cfg.pii.unwrap()))
    return out + [Tally(), _writer(work / Documents.FOLDER)]


def _filter_runs(specs: list[Section], stats: StepCounts, rows: list[dict[str, Any]]) -> list[FilterRun]:
    """Each filter with the documents that reached it (its step's `total`) and its reason -> parameter map."""
    runs = []
    for i, spec in enumerate(specs):
        label = filter_label(spec)
        reasons = {r["reason"] for r in rows if r["filter"] == label}
        parameters = {reason: p for reason in reasons if (p := filter_parameter(spec, reason))}
        runs.append(FilterRun(label, i, parameters, int(step_counts(stats, 2 + i).get("total", 0))))
    return runs


def check_not_empty(specs: list[Section], runs: list[FilterRun], table: list[dict[str, Any]], documents_in: int,
                    where: Path) -> None:
    """Bad input when the filters removed every document: names the last filter that removed any
    (every document that reached it), its main reason and the parameter behind it with its value."""
    last = next((i for i in reversed(range(len(runs))) if table[i]["removed"]), None)
    if last is None:
        return
    run, spec, reasons = runs[last], specs[last], table[last]["reasons"]
    reason = max(reasons, key=lambda r: (reasons[r], r))
    parameter = run.parameters.get(reason)
    setting = f".{parameter} ({getattr(spec, parameter)!r})" if parameter else ""
    raise InputError(
        f"{where}: quality.filters.{run.index} ({run.label}){setting} removed {run.reached} of {run.reached} "
        f"documents ({', '.join(f'{r}: {n}' for r, n in reasons.items())}; {documents_in} entered the stage), "
        "leaving no corpus: relax the threshold, remove the filter, or set `quality: null`")


def publish(work: Path, out: Path, labels: list[str], rows: list[dict[str, Any]], card: dict[str, Any]) -> None:
    """The kept documents, the removed ones (whole, and as rows), the data card and its plot, the logs."""
    for folder in (Documents.FOLDER, "logs"):
        (out / folder).mkdir()
        link_tree(work / folder, out / folder)
    for label in labels:
        (out / "removed" / label).mkdir(parents=True)
        if (work / "removed" / label).exists():  # datatrove writes no file for a filter that removed nothing
            link_tree(work / "removed" / label, out / "removed" / label)
    write_jsonl(out / "removed.jsonl", rows)
    (out / Documents.CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / Documents.LENGTHS).write_bytes(length_chart(card["lengths"]))


def build(cfg: QualitySpec, inputs: QualityInputs, out: Path, ctx: RunContext) -> Metrics:
    """Filters the corpus, replaces PII, and writes the survivors, the removed and the data card."""
    specs = [f.unwrap() for f in cfg.filters]
    labels = [filter_label(s) for s in specs]
    pipeline = steps(cfg, specs, inputs.documents.folder, ctx.work)
    stats = run_pipeline(pipeline, NAME, ctx.work, ctx.executor)
    tin = Tallied.from_counts(step_counts(stats, 1))
    tout = Tallied.from_counts(step_counts(stats, len(pipeline) - 2))
    rows = removed_rows(ctx.work / "removed", labels)
    runs = _filter_runs(specs, stats, rows)
    table = filter_table(runs, rows, tin.documents)
    if tout.documents == 0:
        check_not_empty(specs, runs, table, tin.documents, ctx.spec_path)
    pii = None
    if cfg.pii is not None:
        counts = step_counts(stats, 2 + len(specs))
        pii = {kind: int(counts.get(f"pii_{kind}", 0)) for kind in ("emails", "ips")}
    card = data_card(NAME, inputs.documents.stage, ctx.lineage, tin, tout, table, pii)
    publish(ctx.work, out, labels, rows, card)
    return {"documents_in": tin.documents, "documents_out": tout.documents, "chars_in": tin.chars,
            "chars_out": tout.chars, "rejected_by_filter": {t["filter"]: t["removed"] for t in table},
            "rejected_by_reason": {t["filter"]: t["reasons"] for t in table}, "pii": pii}


STAGE = Stage(NAME, build, output=Documents, inputs=QualityInputs, section="quality", uses_executor=True,
              optional=True, libs=("spacy",))
