"""The data card: what the corpus looked like through the data stages, for the quality artifact
(data_card.json) and the report's lineage section.

It holds documents and characters per source after each data stage, the share each filter
removed and why, a length histogram, the first lines of the longest documents each filter
removed (so a reviewer can judge the filter), and the personal data replaced. Everything
comes from counts datatrove kept, the removed documents, and the upstream records.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import iter_documents
from tasks.core.store import ArtifactRecord

EXAMPLES = 10  # removed documents shown per filter: the longest (their loss costs the most text)
FIRST_LINE_CHARS = 120


@dataclass(frozen=True)
class Tallied:
    """What passed one `Tally` step: documents and characters, per source and in all, and lengths."""

    documents: int
    chars: int
    sources: dict[str, dict[str, int]]  # source index -> {"documents", "chars"}
    lengths: list[int]  # documents per bin of LENGTH_EDGES (the last bin open-ended)

    @classmethod
    def from_counts(cls, counts: Mapping[str, float]) -> Tallied:
        """From the merged counters of one Tally step (tasks/data/quality_filters.py)."""
        # Imported here, not at the top: quality_filters imports datatrove's filters (slow), and
        # planning a run imports this module (through tasks/quality.py) without building a card.
        from tasks.data.quality_filters import LENGTH_EDGES

        sources: dict[str, dict[str, int]] = {}
        for key, value in counts.items():
            for what in ("documents", "chars"):
                if key.startswith(f"{what}_source_"):
                    sources.setdefault(key.removeprefix(f"{what}_source_"), {"documents": 0, "chars": 0})[what] = int(value)
        lengths = [int(counts.get(f"length_bin_{i}", 0)) for i in range(len(LENGTH_EDGES) + 1)]
        return cls(int(counts.get("documents", 0)), int(counts.get("chars", 0)), dict(sorted(sources.items())), lengths)


_HEADING = re.compile(r"#{1,6}\s.*|[=*\-~^#]{3,}")  # a Markdown heading, or an underline or rule


def first_line(text: str) -> str:
    """A document's first line of text, cut to FIRST_LINE_CHARS: the first non-blank line that is
    not a Markdown heading or rule (a title such as "# bisect" says little about why a filter
    removed it; the id is shown beside it), else the first non-blank line."""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    line = next((s for s in lines if not _HEADING.fullmatch(s)), lines[0] if lines else "")
    return line if len(line) <= FIRST_LINE_CHARS else line[: FIRST_LINE_CHARS - 1] + "…"


def removed_rows(folder: Path, labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per removed document, filter by filter, from the exclusion writers' files under
    `folder/<label>/`: id, filter, reason, source, chars and first line."""
    rows = []
    for label in labels:
        for doc in iter_documents(folder / label):
            meta = doc.get("metadata") or {}
            rows.append({"id": str(doc["id"]), "filter": label, "reason": meta.get("filter_reason", label),
                         "source": str(meta.get("source", "?")).split(":", 1)[0], "chars": len(doc["text"]),
                         "first_line": first_line(doc["text"])})
    return rows


@dataclass(frozen=True)
class FilterRun:
    """One filter of the run: its label, its spec entry (for the parameters behind its reasons) and
    how many documents reached it."""

    label: str
    index: int  # position in quality.filters
    parameters: dict[str, str]  # reason -> the parameter that decided it
    reached: int


def filter_table(runs: Sequence[FilterRun], rows: Sequence[dict[str, Any]], documents_in: int) -> list[dict[str, Any]]:
    """Per filter: documents removed, their share of the stage's input and of what reached the
    filter, characters removed, the reasons, and the longest removed documents' first lines."""
    table = []
    for run in runs:
        mine = [r for r in rows if r["filter"] == run.label]
        longest = sorted(mine, key=lambda r: (-r["chars"], r["id"]))[:EXAMPLES]
        table.append({
            "filter": run.label, "index": run.index, "reached": run.reached, "removed": len(mine),
            "share_removed": round(len(mine) / documents_in, 4) if documents_in else 0.0,
            "chars_removed": sum(r["chars"] for r in mine),
            "reasons": dict(sorted(Counter(r["reason"] for r in mine).items())),
            "parameters": {reason: run.parameters[reason] for reason in sorted({r["reason"] for r in mine})
                           if reason in run.parameters},
            "examples": [{k: r[k] for k in ("id", "reason", "chars", "first_line")} for r in longest],
        })
    return table


def _ingest_sources(lineage: Mapping[str, ArtifactRecord]) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(the stage that read the sources, {source index: {kind, documents, chars}}) from the first
    upstream record that counts per source (ingest's `sources` metric)."""
    for name, record in lineage.items():
        if "sources" in record.metrics:
            return name, {str(s["source"]): {"kind": s.get("kind", "?"), "documents": s.get("kept", 0),
                                             "chars": s.get("chars")} for s in record.metrics["sources"]}
    return None, {}


def data_card(stage: str, input_stage: str, lineage: Mapping[str, ArtifactRecord], tin: Tallied, tout: Tallied,
              filters: list[dict[str, Any]], pii: dict[str, int] | None) -> dict[str, Any]:
    """The card (data_card.json): stages, sources, filters, lengths and PII, as plain JSON data."""
    from tasks.data.quality_filters import LENGTH_EDGES  # imported here: see Tallied.from_counts

    stages = [{"stage": name, "documents": r.metrics["documents_out"], "chars": r.metrics.get("chars_out")}
              for name, r in lineage.items() if "documents_out" in r.metrics and name != input_stage]
    stages += [{"stage": input_stage, "documents": tin.documents, "chars": tin.chars},
               {"stage": stage, "documents": tout.documents, "chars": tout.chars}]
    reader, first = _ingest_sources(lineage)
    sources = []
    for source in sorted(set(first) | set(tin.sources) | set(tout.sources), key=lambda s: (len(s), s)):
        after = {reader: first[source]} if reader and source in first else {}
        after[input_stage] = tin.sources.get(source, {"documents": 0, "chars": 0})
        after[stage] = tout.sources.get(source, {"documents": 0, "chars": 0})
        sources.append({"source": source, "kind": first.get(source, {}).get("kind", "?"),
                        "documents": {s: a["documents"] for s, a in after.items()},
                        "chars": {s: a["chars"] for s, a in after.items()}})
    return {"stages": stages, "sources": sources, "filters": filters, "pii": pii,
            "lengths": {"edges": list(LENGTH_EDGES), "stages": {input_stage: tin.lengths, stage: tout.lengths}}}
