"""toy: a data stage for the graph tests; drops the first document (by id) of the corpus.

Reads:   documents.
Writes:  documents/ (the rest, in datatrove's JSONL).
Metrics: documents_in, documents_out, dropped. (LINEAGE, below: a model reader reporting its ctx.lineage.)
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from tasks.core.artifacts import Documents, Model
from tasks.core.stage import Metrics, RunContext, Stage


@dataclass(frozen=True)
class ToyInputs:
    documents: Documents


def build(cfg: None, inputs: ToyInputs, out: Path, ctx: RunContext) -> Metrics:
    """Keeps every document but the one whose id sorts first."""
    docs = sorted(inputs.documents, key=lambda d: str(d["id"]))
    folder = Documents.folder_in(out)
    folder.mkdir()
    with gzip.open(folder / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in docs[1:]:
            f.write(json.dumps(doc) + "\n")
    return {"documents_in": len(docs), "documents_out": len(docs) - 1, "dropped": docs[0]["id"]}


STAGE = Stage("toy", build, output=Documents, inputs=ToyInputs)


def read_unkeyed(cfg, inputs: ToyInputs, out: Path, ctx: RunContext) -> Metrics:
    """A faulty build: depends on a runtime field its key does not hold."""
    return {"every": cfg.checkpoint_every}


UNKEYED = Stage("unkeyed", read_unkeyed, output=Documents, inputs=ToyInputs, section="pretrain")


@dataclass(frozen=True)
class LineageInputs:
    model: Model


def report_lineage(cfg: None, inputs: LineageInputs, out: Path, ctx: RunContext) -> Metrics:
    """What a stage below pretrain sees of its lineage: {name: "stage/fingerprint of run"}."""
    (out / "seen.txt").write_text("\n".join(ctx.lineage))
    return {"lineage": {name: f"{r.stage}/{r.fingerprint} of {r.run_name}" for name, r in ctx.lineage.items()}}


LINEAGE = Stage("lineage", report_lineage, output=Documents, inputs=LineageInputs)
