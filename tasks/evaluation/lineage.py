"""The report's provenance from upstream records: wall time per stage, documents and pairs
through the data stages, and the leakage between the train pairs and the eval questions."""

from __future__ import annotations

from typing import Any

from tasks.core.artifacts import Pairs
from tasks.core.stage import RunContext

PRETRAINING = ("Pretraining and mid-training read every document of the corpus, held-out ones included: "
               "injecting the corpus's knowledge is what they are for. SFT, the reader and the train pairs never "
               "read a held-out document (split_by: document).")


def stage_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """Wall time, device and GPU-hours of every upstream stage, from its record."""
    rows = []
    for name, record in ctx.lineage.items():
        device = record.key.get("resolved", {}).get("device", "cpu")
        gpus = record.metrics.get("processes", 1) if device == "cuda" else 0
        rows.append({"stage": name, "fingerprint": record.fingerprint, "wall_s": record.wall_s,
                     "device": device, "gpu_hours": round(gpus * record.wall_s / 3600, 4) if gpus else None})
    return rows


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
        if "pairs_kept" in m:
            out.update({"Q&A pairs kept": m["pairs_kept"], "train pairs (with paraphrases)": m["train"],
                        "held-out eval pairs": m["eval"]})
    return out


def leakage(pairs: Pairs) -> dict[str, Any] | None:
    """What the eval questions share with the train pairs, and the decontamination applied."""
    m = pairs.metrics
    if "leakage" not in m:
        return None
    spec = pairs.record.key.get("spec", {}).get("qa", {})
    return {"shared": m["leakage"], "decontaminate": spec.get("decontaminate", []),
            "decontaminated": m.get("decontaminated", 0), "split_by": spec.get("split_by", "question"),
            "pretraining": PRETRAINING if spec.get("split_by") == "document" else
            "Pretraining, mid-training and SFT read every document (split_by: question holds out questions, "
            "not documents)."}
