"""The reviewers' report: report.md and a self-contained report.html (plots inlined as PNG).

Everything in it comes from one summary dict the eval stage builds, so the Markdown, the
HTML and the Prefect artifacts can never disagree.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def f1_chart(arms: dict[str, dict[str, Any]]) -> bytes:
    """Bar chart of F1 per arm with 95% bootstrap error bars."""
    names = list(arms)
    f1 = [arms[a]["f1"] for a in names]
    err = [[arms[a]["f1"] - arms[a]["f1_ci"][0] for a in names], [arms[a]["f1_ci"][1] - arms[a]["f1"] for a in names]]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.bar(names, f1, yerr=err, capsize=4, color=["#4477aa" if a != "rag" else "#ee6677" for a in names])
    ax.set_ylabel("token F1 (95% CI)")
    ax.set_ylim(0, max(1e-3, max(hi for hi in (arms[a]["f1_ci"][1] for a in names))) * 1.15)
    ax.set_title("Answer F1 by arm")
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
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(3.2 * max(1, len(curves)), 2.8), squeeze=False)
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


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines


def markdown(summary: dict[str, Any], images: dict[str, str], run: dict[str, Any] | None = None) -> str:
    """The report as Markdown; `images` maps an image name to its link target. `run` (a run's own
    report: its name and the previous eval of that name) adds the title and the change table."""
    arms, n = summary["arms"], summary["questions"]
    title = f"gristmill report: {run['name']}" if run else "gristmill report"
    out = [f"# {title}", "", f"**Verdict:** {summary['verdict']}", "",
           f"{n} questions ({summary['question_source']}); every arm gets the same prompt template, greedy decoding "
           f"with at most {summary['max_new_tokens']} new tokens, and the same scorer (SQuAD-normalised).", "",
           "## Arms", ""]
    out += _table(["arm", "EM", "F1 [95% CI]", "ROUGE-L", "contains", "latency p50 / p95 (s)", "tokens",
                   "ΔF1 vs rag [95% CI]", "p (F1, paired bootstrap)", "p (EM, McNemar)"],
                  [[a, s["em"], f"{s['f1']:.3f} [{s['f1_ci'][0]:.3f}, {s['f1_ci'][1]:.3f}]", s["rouge_l"], s["contains"],
                    f"{s['latency_p50_s']:.3f} / {s['latency_p95_s']:.3f}", f"{s['generated_tokens']:.1f}",
                    "–" if s["f1_diff_vs_rag"] is None else
                    f"{s['f1_diff_vs_rag']:+.3f} [{s['f1_diff_ci_vs_rag'][0]:+.3f}, {s['f1_diff_ci_vs_rag'][1]:+.3f}]",
                    s["p_value_vs_rag"], s["p_value_em_vs_rag"]] for a, s in arms.items()])
    out += ["", f"![F1 by arm]({images['f1']})", "", "## Retrieval", ""]
    out += _table(list(summary["retrieval"]), [list(summary["retrieval"].values())])
    out += ["", "A hit: a retrieved chunk contains a gold answer, or is the question's source passage.", ""]
    if "loss" in images:
        out += ["## Training", "", f"![Loss curves]({images['loss']})", ""]
    out += ["## Stages", ""]
    out += _table(["stage", "fingerprint", "wall time (s)", "device", "GPU-hours"],
                  [[s["stage"], s["fingerprint"], s["wall_s"], s["device"], s["gpu_hours"]] for s in summary["stages"]])
    out += ["", "## Lineage", ""]
    out += _table(["what", "count"], [[k, v] for k, v in summary["lineage"].items()])
    out += ["", "## Where the arms disagree", ""]
    names = list(arms)
    out += _table(["question", "gold", *names],
                  [[d["question"], d["gold"], *[d["answers"][a] for a in names]] for d in summary["disagreements"]])
    prev = (run or {}).get("previous")
    if prev:
        out += ["", f"## Change since the previous eval of {run['name']}", "",
                f"Against eval {prev['fingerprint']} ({prev['created_at']}); each cell is now (change).", ""]
        metrics = ("em", "f1", "rouge_l", "contains")
        out += _table(["arm", *metrics], [[a, *[f"{arms[a][m]:.3f} ({arms[a][m] - then[m]:+.3f})" for m in metrics]]
                                          for a, then in prev["arms"].items() if a in arms])
        out += ["", "Retrieval: " + ", ".join(f"{k} {v:.3f} ({v - prev['retrieval'].get(k, v):+.3f})"
                                              for k, v in summary["retrieval"].items())]
    return "\n".join(out) + "\n"


CHARTS = ("f1", "loss")  # the PNG files a report has (loss only when a stage left a curve)


def charts(summary: dict[str, Any], curves: dict[str, Path]) -> dict[str, bytes]:
    """{chart name: PNG bytes}: F1 by arm, and the loss curves of the training stages."""
    pngs = {"f1": f1_chart(summary["arms"])}
    if curves:
        pngs["loss"] = loss_chart(curves)
    return pngs


def write_report(out: Path, summary: dict[str, Any], pngs: dict[str, bytes], run: dict[str, Any] | None = None) -> None:
    """report.md (with the PNG files beside it) and report.html (one file, images inlined)."""
    import markdown as md_lib

    for name, data in pngs.items():
        (out / f"{name}.png").write_bytes(data)
    (out / "report.md").write_text(markdown(summary, {k: f"{k}.png" for k in pngs}, run), encoding="utf-8")
    inline = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in pngs.items()}
    body = md_lib.markdown(markdown(summary, inline, run), extensions=["tables"])
    title = html.escape(run["name"] if run else "report")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title} — gristmill</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
            "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"
            f"{body}</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
