"""The reviewers' report: report.md and a self-contained report.html (plots inlined as PNG).

Everything in it comes from one summary dict the eval stage builds (its keys are documented in
tasks/evaluate.py), so the Markdown, the HTML and the Prefect artifacts can never disagree.
Sections, in the order a reviewer reads them: the verdict; a run's regression gates (its own
report only); what was compared (each arm's model, training data and context); the 2x2 of
generator x retrieval with the references beside it; the comparisons as data; the split by
whether retrieval found the source; every arm's scores and failure rates; retrieval; leakage;
training; stages; lineage with the data card (the quality stage's: documents per stage and
source, what each filter removed and why, lengths, PII); disagreements.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

# The PNG files a report has (loss only when a stage left a curve, lengths only with a data card).
CHARTS = ("f1", "loss", "lengths")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:  # NaN
            return "–"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _ci(value: Any, ci: Any, signed: bool = False) -> str:
    """"0.412 [0.351, 0.470]"; "–" when there is no value."""
    if value is None or not ci or ci[0] is None:
        return _fmt(value)
    f = "+.3f" if signed else ".3f"
    return f"{value:{f}} [{ci[0]:{f}}, {ci[1]:{f}}]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines


def _design(summary: dict[str, Any]) -> list[str]:
    out = ["## What was compared", "",
           f"{summary['questions']} questions ({summary['question_source']}); every arm gets the same prompt template, "
           f"greedy decoding with at most {summary['max_new_tokens']} new tokens, and the same scorer "
           "(SQuAD-normalised token F1). Retrieved context: the top "
           f"{summary['k']} passages ({summary['retrieval']['retriever']} retrieval).", ""]
    out += _table(["arm", "role", "generator", "trained on", "context"],
                  [[d["arm"], d["role"], d["model"], d["trained_on"], d["context"]] for d in summary["design"]])
    refused = summary.get("refused") or {}
    if refused.get("count"):
        out += ["", f"{refused['count']} question(s) were not scored: every gold answer normalises to nothing "
                f"({', '.join(refused['ids'][:10])})."]
    return out + [""]


def _two_by_two(summary: dict[str, Any]) -> list[str]:
    arms = summary["arms"]
    cell = lambda a: _ci(arms[a]["f1"], arms[a]["f1_ci"]) if a in arms else "not run"
    out = ["## Generator × retrieval (F1, 95% CI)", ""]
    out += _table(["generator", "closed book", f"top-{summary['k']} retrieved"],
                  [["fine-tuned", cell("finetuned"), cell("finetuned+rag")],
                   ["rag generator", cell("reader"), cell("rag")]])
    refs = [f"`{a}` {cell(a)} (n={arms[a]['n']})" for a in ("gold", "rag-extractive") if a in arms]
    if refs:
        out += ["", "References, never a winner: " + "; ".join(refs) + ". `gold` is the reading ceiling (the rag "
                "generator given the question's source passage); `rag-extractive` answers with the retrieved "
                "sentence closest to the question, without a generator."]
    return out + [""]


def _comparisons(summary: dict[str, Any]) -> list[str]:
    if not summary["comparisons"]:
        return []
    out = ["## The comparisons", "",
           "Paired on the same questions; intervals and p-values from one bootstrap over documents (questions of "
           "a document move together); Holm's correction across the comparisons made. MDD: the smallest F1 "
           "difference this design detects with 80% power.", ""]
    out += _table(["comparison", "ΔF1 [95% CI]", "p", "p (Holm)", "questions", "documents", "MDD", "winner"],
                  [[f"{c['a']} − {c['b']}", _ci(c["diff"], c["ci"], signed=True), c["p"], c["p_adjusted"], c["n"],
                    c["n_clusters"], c["mdd"], c["winner"] or "none"] for c in summary["comparisons"]])
    return out + [""]


def _by_retrieval(summary: dict[str, Any]) -> list[str]:
    rows = summary.get("by_retrieval") or []
    if not rows:
        return []
    names = [a for a in summary["arms"] if any(a in r["f1"] for r in rows)]
    out = ["## When retrieval found the source, and when it did not", "",
           "Mean F1 of each arm on the questions whose source passage was among the passages the generator saw, "
           "and on the rest. A fine-tuned model that wins only where retrieval missed is compensating for the "
           "retriever, not reading better.", ""]
    out += _table(["subset", "questions", *names], [[r["subset"], r["n"], *[r["f1"].get(a) for a in names]] for r in rows])
    return out + [""]


def _arms(summary: dict[str, Any], images: dict[str, str]) -> list[str]:
    out = ["## Every arm", "",
           "Failure rates first: an empty answer, one cut at the token limit, or one that repeats itself is a "
           "formatting failure, not missing knowledge.", ""]
    out += _table(["arm", "n", "EM", "F1 [95% CI]", "ROUGE-L", "contains", "empty", "unfinished", "repetitive",
                   "passages dropped", "latency p50 / p95 (s)", "tokens"],
                  [[a, s["n"], s["em"], _ci(s["f1"], s["f1_ci"]), s["rouge_l"], s["contains"], s["empty_rate"],
                    s["unfinished_rate"], s["repetitive_rate"], s.get("passages_dropped"),
                    f"{_fmt(s['latency_p50_s'])} / {_fmt(s['latency_p95_s'])}", _fmt(s["generated_tokens"], 1)]
                   for a, s in summary["arms"].items()])
    return out + ["", f"![F1 by arm]({images['f1']})", ""]


def _retrieval(summary: dict[str, Any]) -> list[str]:
    r = summary["retrieval"]
    out = ["## Retrieval", ""]
    out += _table(["hits", *r["strict"]], [["strict", *r["strict"].values()], ["lenient", *r["lenient"].values()]])
    return out + ["", "Strict: a chunk overlapping the question's source span when it is known; else a chunk of its "
                  "source document holding a gold answer on word boundaries; else a word-boundary match of a gold "
                  "answer of at least two tokens. Lenient (the old rule): any chunk containing a gold answer as a "
                  "substring. recall@seen: at the depth the generator actually saw after prompt fitting.", ""]


def _leakage(summary: dict[str, Any]) -> list[str]:
    leak = summary.get("leakage")
    if not leak:
        return []
    shared = leak["shared"]
    n = shared["eval_questions"] or 1
    out = ["## Leakage between training and evaluation", ""]
    out += _table(["eval questions that share with the train pairs", "count", "share"],
                  [[what, shared[key], shared[key] / n] for key, what in
                   (("sharing_document", "their source document"), ("sharing_span", "their evidence span"),
                    ("sharing_answer", "their answer (normalised)"))])
    out += ["", f"Split: {leak['split_by']}. Decontamination removed train pairs matching an eval question by "
            f"{', '.join(leak['decontaminate']) or 'nothing'}: {leak['decontaminated']}. "
            f"{leak['pretraining']}", ""]
    return out


def _provenance(summary: dict[str, Any], images: dict[str, str]) -> list[str]:
    out = []
    if "loss" in images:
        out += ["## Training", "", f"![Loss curves]({images['loss']})", ""]
    out += ["## Stages", ""]
    out += _table(["stage", "fingerprint", "wall time (s)", "device", "GPU-hours"],
                  [[s["stage"], s["fingerprint"], s["wall_s"], s["device"], s["gpu_hours"]] for s in summary["stages"]])
    path = summary.get("critical_path")
    if path and path["stages"]:
        out += ["", f"Critical path: {' → '.join(path['stages'])}, {path['wall_s']} s of the {path['total_s']} s "
                "these stages took one after another: the least time a build of them from scratch can take, "
                "however many stages run at once (`gristmill run --max-parallel`)."]
    out += ["", "## Lineage", ""]
    out += _table(["what", "count"], [[k, v] for k, v in summary["lineage"].items()])
    out += _data_card(summary.get("data_card"), images)
    names = list(summary["arms"])
    out += ["", "## Where the arms disagree", ""]
    out += _table(["question", "reference answer", *[f"arm: {a}" for a in names]],
                  [[d["question"], d["reference"], *[d["answers"].get(a) for a in names]] for d in summary["disagreements"]])
    return out


def _data_card(card: dict[str, Any] | None, images: dict[str, str]) -> list[str]:
    """What the training data looked like: per stage and source, what each filter removed and why
    (with the first lines of the longest documents it removed, to judge it), lengths and PII."""
    if not card:
        return ["", "### Data card", "", "None: the run skipped the quality stage (`quality: null`).", ""]
    stages = [s["stage"] for s in card["stages"]]
    out = ["", "### Data card", "", "Documents and characters after each data stage:", ""]
    out += _table(["", *stages], [["documents", *[s["documents"] for s in card["stages"]]],
                                  ["characters", *[s["chars"] for s in card["stages"]]]])
    if len(card["sources"]) > 1:
        out += ["", "Per source (documents after " + " / ".join(stages) + "):", ""]
        out += _table(["source", "kind", "documents", "characters"],
                      [[s["source"], s["kind"], " / ".join(str(s["documents"].get(t, "–")) for t in stages),
                        " / ".join(str(s["chars"].get(t, "–")) for t in stages)] for s in card["sources"]])
    out += ["", "What each quality filter removed (a document leaves at the first filter that removes it; "
            "share: of the documents entering the stage):", ""]
    out += _table(["filter", "reached", "removed", "share", "characters removed", "reasons (parameter)"],
                  [[f["filter"], f["reached"], f["removed"], f["share_removed"], f["chars_removed"],
                    ", ".join(f"{r} {n}" + (f" ({f['parameters'][r]})" if r in f["parameters"] else "")
                              for r, n in f["reasons"].items()) or "–"] for f in card["filters"]])
    pii = card.get("pii")
    out += ["", "Personal data replaced: " + (f"{pii['emails']} e-mail address(es), {pii['ips']} IP address(es)."
                                               if pii else "none (PII replacement off: `quality.pii` is null).")]
    if "lengths" in images:
        out += ["", f"![Document lengths]({images['lengths']})"]
    examples = [[f["filter"], e["id"], e["reason"], e["chars"], e["first_line"]]
                for f in card["filters"] for e in f["examples"]]
    if examples:
        out += ["", "The longest documents each filter removed (up to 10 per filter), by first line:", ""]
        out += _table(["filter", "document", "reason", "characters", "first line"], examples)
    return out + [""]


def _change(summary: dict[str, Any], run: dict[str, Any]) -> list[str]:
    prev = run.get("previous")
    if not prev:
        return []
    arms = summary["arms"]
    metrics = ("em", "f1", "rouge_l", "contains")
    out = ["", f"## Change since the previous eval of {run['name']}", "",
           f"Against eval {prev['fingerprint']} ({prev['created_at']}); each cell is now (change).", ""]
    out += _table(["arm", *metrics], [[a, *[f"{arms[a][m]:.3f} ({arms[a][m] - then[m]:+.3f})"
                                            if arms[a][m] is not None and then.get(m) is not None else "–"
                                            for m in metrics]]
                                      for a, then in prev["arms"].items() if a in arms])
    now, then = summary["retrieval"]["strict"], prev["retrieval"].get("strict", {})
    out += ["", "Retrieval (strict): " + ", ".join(f"{k} {v:.3f} ({v - then.get(k, v):+.3f})" for k, v in now.items())]
    return out


def _gates(run: dict[str, Any]) -> list[str]:
    """The run's regression gates (eval/gates.py results, as run.json holds them), failed or not."""
    gates = run.get("gates") or []
    if not gates:
        return []
    failed = sum(not g["passed"] for g in gates)
    out = ["## Gates", "", f"{len(gates) - failed} of {len(gates)} passed" + (f"; {failed} failed, so the run "
           "failed (exit code 3)." if failed else "."), ""]
    out += _table(["gate", "result", "value", "threshold", "why"],
                  [[g["gate"], "pass" if g["passed"] else "**FAIL**", g["value"], g["threshold"], g["message"]]
                   for g in gates])
    return out + [""]


def markdown(summary: dict[str, Any], images: dict[str, str], run: dict[str, Any] | None = None) -> str:
    """The report as Markdown; `images` maps an image name to its link target. `run` (a run's own
    report: its name, the previous eval of that name and its gates) adds the title, the gates
    table and the change table."""
    title = f"gristmill report: {run['name']}" if run else "gristmill report"
    out = [f"# {title}", "", f"**Verdict:** {summary['verdict']}", ""]
    out += _gates(run) if run else []
    out += _design(summary) + _two_by_two(summary) + _comparisons(summary) + _by_retrieval(summary)
    out += _arms(summary, images) + _retrieval(summary) + _leakage(summary) + _provenance(summary, images)
    out += _change(summary, run) if run else []
    return "\n".join(out) + "\n"


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
