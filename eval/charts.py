"""The report's plots, as PNG bytes: F1 by arm with intervals, the training loss curves, and the
data card's document lengths."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

ROLE_COLOURS = {"answer": "#4477aa", "control": "#aaaaaa", "reference": "#ccbb44"}


def _pyplot():
    """matplotlib.pyplot, drawing to files only. Imported when a chart is drawn, not at the top:
    importing it is slow, and planning a run imports this module (the quality and eval stages
    import it) without drawing anything."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _finite(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else 0.0


def f1_chart(arms: dict[str, dict[str, Any]]) -> bytes:
    """F1 per arm with its 95% interval (documents resampled), coloured by role: the arms that
    answer, the control, the references."""
    names = list(arms)
    f1 = [_finite(arms[a]["f1"]) for a in names]
    lo = [_finite(arms[a]["f1_ci"][0]) if arms[a]["f1_ci"][0] is not None else f for a, f in zip(names, f1)]
    hi = [_finite(arms[a]["f1_ci"][1]) if arms[a]["f1_ci"][1] is not None else f for a, f in zip(names, f1)]
    fig, ax = _pyplot().subplots(figsize=(7, 3.2))
    ax.bar(names, f1, yerr=[[max(0.0, f - l) for f, l in zip(f1, lo)], [max(0.0, h - f) for f, h in zip(f1, hi)]],
           capsize=4, color=[ROLE_COLOURS.get(arms[a].get("role", "answer"), "#4477aa") for a in names])
    ax.set_ylabel("token F1 (95% CI)")
    ax.set_ylim(0, max(1e-3, max(hi, default=0.0)) * 1.15)
    ax.set_title("Answer F1 by arm (blue: answers; grey: control; yellow: references)")
    ax.tick_params(axis="x", rotation=20)
    return _png(fig)


def read_curve(path: Path) -> tuple[list[float], list[float], list[float], list[float]]:
    """(steps, train losses, val steps, val losses) from a stage's loss_curve.csv."""
    steps, train, vsteps, val = [], [], [], []
    with path.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("train_loss"):
                steps.append(float(row["step"] or 0))
                train.append(float(row["train_loss"]))
            if row.get("val_loss"):
                vsteps.append(float(row["step"] or 0))
                val.append(float(row["val_loss"]))
    return steps, train, vsteps, val


def loss_chart(curves: dict[str, Path]) -> bytes:
    """One panel per training stage: train and validation loss against optimizer steps."""
    fig, axes = _pyplot().subplots(1, max(1, len(curves)), figsize=(3.2 * max(1, len(curves)), 2.8), squeeze=False)
    for ax, (stage, path) in zip(axes[0], curves.items()):
        steps, train, vsteps, val = read_curve(path)
        ax.plot(steps, train, label="train", lw=1)
        if val:
            ax.plot(vsteps, val, "o-", label="validation", ms=3)
        ax.set_title(stage)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(fontsize=7)
    return _png(fig)


def _bin_label(lo: int, hi: int | None) -> str:
    short = lambda n: f"{n // 1000}k" if n >= 1000 else str(n)
    return f"≥{short(lo)}" if hi is None else f"{short(lo)}–{short(hi)}"


def length_chart(lengths: dict[str, Any]) -> bytes:
    """Documents per length bin (characters, roughly logarithmic bins), one bar per stage side by
    side: what each data stage kept, so a reviewer sees which lengths a filter took out.
    `lengths` is the data card's: {"edges": upper bin edges, "stages": {stage: counts per bin}}."""
    edges = lengths["edges"]
    labels = [_bin_label(lo, hi) for lo, hi in zip([0, *edges], [*edges, None])]
    stages = lengths["stages"]
    width = 0.8 / max(1, len(stages))
    fig, ax = _pyplot().subplots(figsize=(7, 3.2))
    for i, (stage, counts) in enumerate(stages.items()):
        ax.bar([x + i * width for x in range(len(labels))], counts, width=width, label=f"after {stage}")
    ax.set_xticks([x + width * (len(stages) - 1) / 2 for x in range(len(labels))], labels, rotation=30, fontsize=8)
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths")
    ax.legend(fontsize=8)
    return _png(fig)


def charts(summary: dict[str, Any], curves: dict[str, Path]) -> dict[str, bytes]:
    """{chart name: PNG bytes}: F1 by arm, the loss curves of the training stages, and the data
    card's lengths when the run has one."""
    pngs = {"f1": f1_chart(summary["arms"])}
    if curves:
        pngs["loss"] = loss_chart(curves)
    if summary.get("data_card"):
        pngs["lengths"] = length_chart(summary["data_card"]["lengths"])
    return pngs
