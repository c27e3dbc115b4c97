"""`make demo`'s stages, timed: the demo spec on a fresh store, a per-stage table, and a fully
cached rerun.

Not a ratio against a baseline: the demo's budget is a wall time on a 2-core machine, and this
prints it with the machine it ran on (nproc, CPU model, load average before and after).

    .venv/bin/python bench/demo.py                          # python_docs.yaml, a fresh temp store
    .venv/bin/python bench/demo.py --store DIR --rerun-only # only the cached rerun of a built store

Per stage: wall time from its artifact.json, and the throughput its metrics give (tokens/s of
training stages, chunks/s of the index). Last lines: the run's wall time, the cached rerun's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = {"pretrain": "tokens_per_s", "midtrain": "tokens_per_s", "sft": "tokens_per_s",
              "reader": "tokens_per_s", "dpo": "tokens_per_s", "index": "chunks_per_s"}


def run(spec: Path, store: Path) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec), "--store", str(store)], cwd=REPO,
                          env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"gristmill run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def table(store: Path) -> list[str]:
    """One row per stage of the newest artifact in `store`, in the order they were built."""
    records = []
    for path in store.glob("*/*/artifact.json"):
        records.append(json.loads(path.read_text()))
    newest = {}
    for r in sorted(records, key=lambda r: r["created_at"]):
        newest[r["stage"]] = r
    rows = [f"{'stage':<10} {'wall s':>8}  throughput"]
    for r in sorted(newest.values(), key=lambda r: r["created_at"]):
        metric = THROUGHPUT.get(r["stage"])
        value = r["metrics"].get(metric) if metric else None
        rate = f"{value:,.0f} {metric.replace('_per_s', '/s')}" if isinstance(value, int | float) else ""
        rows.append(f"{r['stage']:<10} {r['wall_s']:>8.1f}  {rate}")
    rows.append(f"{'stages':<10} {sum(r['wall_s'] for r in newest.values()):>8.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=REPO / "data_specs" / "python_docs.yaml")
    parser.add_argument("--store", type=Path, help="store folder (default: a fresh temp folder)")
    parser.add_argument("--rerun-only", action="store_true", help="only time a cached rerun of --store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gristmill-demo-") as tmp:
        store = args.store or Path(tmp) / "store"
        print(f"before: {describe()}")
        if not args.rerun_only:
            wall, _ = run(args.spec, store)
            print("\n".join(table(store)))
            print(f"after: {describe()}")
            print(f"run from an empty store: {wall:.1f} s")
        rerun, out = run(args.spec, store)
        if " build " in out.split("done:")[0]:  # the plan's rows say "cached" or "build"
            print("warning: the rerun was not fully cached:\n" + out)
        print(f"fully cached rerun: {rerun:.1f} s")


if __name__ == "__main__":
    main()
