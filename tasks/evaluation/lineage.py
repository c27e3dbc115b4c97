"""The report's provenance from upstream records: wall time per stage, documents and pairs
through the data stages, the data card, and the leakage between the train pairs and the eval
questions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tasks.core.artifacts import Documents, Pairs
from tasks.core.graph import critical_path
from tasks.core.stage import RunContext
from tasks.core.store import ArtifactRecord

NOT_HELD_OUT = "SFT, the reader and the train pairs never read a held-out document (split_by: document)."


def stage_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """Wall time, device and GPU-hours of every upstream stage, from its record, and of the other
    run's artifact a warm start began from (under its spec field, e.g. pretrain.from)."""
    rows = []
    for name, record in ctx.lineage.items():
        device = record.key.get("resolved", {}).get("device", "cpu")
        gpus = record.metrics.get("processes", 1) if device == "cuda" else 0
        label = name if name == record.stage else f"{name}: {record.stage} of run {record.run_name}"
        rows.append({"stage": label, "fingerprint": record.fingerprint, "wall_s": record.wall_s,
                     "device": device, "gpu_hours": round(gpus * record.wall_s / 3600, 4) if gpus else None})
    return rows


def critical(ctx: RunContext) -> dict[str, Any]:
    """The chain of upstream stages whose wall times add up most: the least time a build of them
    all from scratch can take, however many run at once (the others ran beside it), against the
    sum of every stage's wall time (one after another)."""
    records = {n: r for n, r in ctx.lineage.items() if n == r.stage}  # not the other runs' artifacts
    # Oldest first is an order in which every stage comes after what it read (it existed first).
    ordered = sorted(records, key=lambda n: records[n].created_at)
    path, seconds = critical_path({n: records[n].wall_s for n in ordered},
                                  {n: list(records[n].key.get("upstream", {})) for n in ordered})
    return {"stages": path, "wall_s": round(seconds, 1), "total_s": round(sum(r.wall_s for r in records.values()), 1)}


def counts(ctx: RunContext) -> dict[str, Any]:
    """Documents through every data stage, and the Q&A pairs, from the upstream records."""
    out: dict[str, Any] = {}
    for name, record in ctx.lineage.items():
        m = record.metrics
        if "documents_in" in m and not out:
            out[f"documents into {name}"] = m["documents_in"]
        if "documents_out" in m:
            out[f"documents after {name}"] = m["documents_out"]
        if "exact_duplicates" in m:
            out[f"duplicates removed by {name} (exact / near)"] = f"{m['exact_duplicates']} / {m['near_duplicates']}"
        if "rejected_by_filter" in m:
            out[f"documents removed by {name} ({' / '.join(m['rejected_by_filter'])})"] = \
                " / ".join(str(n) for n in m["rejected_by_filter"].values()) or "0"
        if "pairs_kept" in m:
            out.update({"Q&A pairs kept": m["pairs_kept"], "train pairs (with paraphrases)": m["train"],
                        "held-out eval pairs": m["eval"]})
    return out


def data_card(ctx: RunContext) -> dict[str, Any] | None:
    """The data card of the last upstream stage that wrote one (the quality stage), or None when
    the run has none (`quality: null`)."""
    for name, record in reversed(list(ctx.lineage.items())):
        if Documents.CARD in record.files:
            path = ctx.fetch(name, Documents.CARD)
            if path is not None:
                return json.loads(path.read_text(encoding="utf-8"))
    return None


def pretraining(split_by: str, lineage: Mapping[str, ArtifactRecord]) -> str:
    """Which documents pretrain and midtrain read, from their records (qa.holdout_from_training)."""
    if split_by != "document":
        return ("Pretraining, mid-training and SFT read every document (split_by: question holds out questions, "
                "not documents).")
    trained = [lineage[name] for name in ("pretrain", "midtrain") if name in lineage]
    left_out = {r.stage: r.metrics.get("held_out_documents_left_out", 0) for r in trained}
    if trained and all(r.key.get("spec", {}).get("qa", {}).get("holdout_from_training") for r in trained):
        return ("Pretraining and mid-training left the held-out documents out (qa.holdout_from_training: "
                + ", ".join(f"{name} {n}" for name, n in left_out.items()) + " documents); the tokenizer "
                "and the RAG index read every document. " + NOT_HELD_OUT)
    return ("Pretraining and mid-training read every document of the corpus, held-out ones included "
            "(qa.holdout_from_training: false): injecting the corpus's knowledge is what they are for. "
            + NOT_HELD_OUT)


def leakage(pairs: Pairs, lineage: Mapping[str, ArtifactRecord]) -> dict[str, Any] | None:
    """What the eval questions share with the train pairs, the decontamination applied, and which
    documents the training stages read."""
    m = pairs.metrics
    if "leakage" not in m:
        return None
    spec = pairs.record.key.get("spec", {}).get("qa", {})
    split_by = spec.get("split_by", "question")
    return {"shared": m["leakage"], "decontaminate": spec.get("decontaminate", []),
            "decontaminated": m.get("decontaminated", 0), "split_by": split_by,
            "pretraining": pretraining(split_by, lineage)}
