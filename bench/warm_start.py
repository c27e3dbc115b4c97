"""Benchmark: a warm-started nightly against the same nightly from scratch, timed in one run.

Why: a nightly whose corpus gained a few documents retrained its tokenizer and model from
scratch. With `pretrain.from: {run: NAME}` it copies the previous tokenizer and continues the
previous model for a smaller token budget. This measures the wall time that saves, and prints
both final validation losses, so the speed is not bought with quality.

Day 1 (built, not timed): the demo spec (data_specs/python_docs.yaml: the built-in corpus, its
pretrain settings) through pretrain, as run `nightly`. Day 2: five documents are added (a JSONL
source beside the built-in corpus: the docstrings of five torch.nn classes, technical text the
corpus lacks). The data stages the change rebuilds (ingest, dedup, quality) are built once and
timed once: both variants read them. Then, through tasks.core.runner as `gristmill run` does it
(plan, fingerprint, lock, build, publish), timed:

    warm     run `nightly`, pretrain.from: {run: nightly}: the tokenizer stage copies day 1's
             tokenizer, pretrain continues day 1's model for --warm-fraction of the demo's token
             budget at learning rate --warm-lr (a nightly's smaller budget; the model is not new);
    scratch  run `scratch`, the demo's settings: a tokenizer trained on the day-2 corpus and a new
             model trained for the full budget.

The stages after pretrain (qa, midtrain, sft, dpo, index, reader, eval) rebuild in both cases at
the same cost (same model size, same data) and are not run. `--scale` multiplies every token
budget (day 1, warm, scratch alike) for a shorter run; `--batch-tokens` keeps it several steps long. Validation losses are per token on each
run's own validation blocks: the same held-out documents (split by document id), tokenized by
day 1's tokenizer (warm) or by one trained on the day-2 corpus (scratch), five documents apart.
Last line: ratio=X.XX (warm seconds / scratch seconds, the data stages counted in both).

    PYTHONPATH=. .venv/bin/python bench/warm_start.py      # the demo's budgets: three pretrain runs, two full
    PYTHONPATH=. .venv/bin/python bench/warm_start.py --scale 0.1 --batch-tokens 4096   # a tenth, 37 steps

The second took 15.5 minutes on 2 cores shared with other jobs (load average 10-17, OMP_NUM_THREADS=1,
~600 tokens/s against the demo's 5-12k on an idle machine); day 1's build is about 40% of it.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import yaml
from machine import describe  # bench/machine.py

from data_specs.loader import load_spec
from tasks.core.jsonl import write_jsonl
from tasks.core.runner import execute, plan
from tasks.core.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
DATA = ("ingest", "dedup", "quality")
MODEL = ("tokenizer", "pretrain")
ADDED = ("Transformer", "MultiheadAttention", "LSTM", "Conv2d", "Embedding")  # torch.nn classes


def added_documents(folder: Path) -> Path:
    """The night's five new documents: docstrings of torch.nn classes, as JSONL."""
    import torch.nn

    rows = [{"id": f"torch.nn.{name}", "text": getattr(torch.nn, name).__doc__} for name in ADDED]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "added.jsonl", rows)
    return folder


def write_spec(folder: Path, name: str, day: int, args: argparse.Namespace, warm: bool) -> Path:
    """The demo spec as run `name` on day 1 or 2, scaled; a warm start when `warm`."""
    spec = yaml.safe_load((REPO / "data_specs" / "python_docs.yaml").read_text())
    spec["name"] = name
    if day == 2:
        spec["corpus"]["sources"].append({"kind": "jsonl", "path": "added/*.jsonl", "text_field": "text",
                                          "id_field": "id"})
    pretrain = spec["pretrain"]
    pretrain["tokens"] = round(pretrain["tokens"] * args.scale)
    if args.batch_tokens:
        pretrain["batch_tokens"] = args.batch_tokens
    if warm:
        pretrain.update({"tokens": round(pretrain["tokens"] * args.warm_fraction), "lr": args.warm_lr,
                         "from": {"run": "nightly"}})
    path = folder / f"{name}-day{day}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def build(spec_path: Path, store: ArtifactStore, stages: tuple[str, ...]) -> dict[str, float]:
    """Plans the spec and builds `stages` (every one must be built, not cached); {stage: seconds}."""
    spec = load_spec(spec_path)
    rows = {r.name: r for r in plan(spec, store)}
    seconds = {}
    for name in stages:
        start = time.perf_counter()
        result = execute(rows[name], spec, store)
        seconds[name] = time.perf_counter() - start
        assert result.state == "built", f"{spec.name}: {name} was cached: the comparison needs it built"
    return seconds


def record(store: ArtifactStore, spec_path: Path, stage: str):
    """The artifact record of a stage for a spec, as now planned."""
    row = next(r for r in plan(load_spec(spec_path), store) if r.name == stage)
    return store.load(stage, row.fingerprint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every token budget (1: the demo's)")
    parser.add_argument("--warm-fraction", type=float, default=0.2, help="the warm start's token budget, as a "
                        "share of the demo's")
    parser.add_argument("--warm-lr", type=float, default=1e-3, help="the warm start's peak learning rate")
    parser.add_argument("--batch-tokens", type=int, help="tokens per optimizer step in every variant (default: the "
                        "demo's 16384; a smaller --scale keeps more steps with a smaller batch)")
    parser.add_argument("--work", help="folder for specs and the store (default: a temp folder, removed)")
    args = parser.parse_args()
    logging.getLogger("gristmill").setLevel(logging.WARNING)
    print(describe())
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        work = Path(args.work or tmp)
        store = ArtifactStore(work / "store")
        added_documents(work / "added")
        day1 = write_spec(work, "nightly", 1, args, warm=False)
        warm = write_spec(work, "nightly", 2, args, warm=True)
        scratch = write_spec(work, "scratch", 2, args, warm=False)
        budget = {name: yaml.safe_load(path.read_text())["pretrain"] for name, path in
                  (("day 1", day1), ("warm", warm), ("scratch", scratch))}
        print("pretrain: " + "; ".join(f"{name} {p['tokens']:,} tokens, lr {p['lr']:g}, {p['batch_tokens']:,} per step"
                                       for name, p in budget.items()))

        start = time.perf_counter()
        build(day1, store, DATA + MODEL)
        print(f"day 1 (not timed): {time.perf_counter() - start:.0f} s; "
              f"day 2 adds {len(ADDED)} documents ({', '.join(ADDED)})")
        shared = build(warm, store, DATA)  # both variants read these
        timed = {"warm": build(warm, store, MODEL), "scratch": build(scratch, store, MODEL)}
        report(store, shared, timed, {"warm": warm, "scratch": scratch}, day1)


def report(store: ArtifactStore, shared: dict[str, float], timed: dict[str, dict[str, float]],
           specs: dict[str, Path], day1: Path) -> None:
    """The table, the losses and the ratio."""
    kept = record(store, specs["warm"], "quality").metrics["documents_out"]
    print(f"documents after quality: day 1 {record(store, day1, 'quality').metrics['documents_out']}, day 2 {kept}")
    print("shared data stages: " + ", ".join(f"{n} {s:.1f} s" for n, s in shared.items()))
    totals = {}
    print(f"{'variant':<9}{'tokenizer s':>12}{'pretrain s':>12}{'total s':>10}{'tokens':>11}{'val loss':>10}"
          f"{'(initial)':>11}")
    for variant, seconds in timed.items():
        m = record(store, specs[variant], "pretrain").metrics
        totals[variant] = sum(shared.values()) + sum(seconds.values())
        print(f"{variant:<9}{seconds['tokenizer']:>12.1f}{seconds['pretrain']:>12.1f}{totals[variant]:>10.1f}"
              f"{m['tokens_seen']:>11,}{m['val_loss_final']:>10.3f}{m['val_loss_initial']:>11.3f}")
    model_only = sum(timed["warm"].values()) / sum(timed["scratch"].values())
    print(f"tokenizer + pretrain only: warm / scratch = {model_only:.2f}")
    print(f"ratio={totals['warm'] / totals['scratch']:.2f}")


if __name__ == "__main__":
    main()
