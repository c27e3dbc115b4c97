"""Benchmark: gristmill's quality stage vs the same datatrove filters run bare.

Why: the stage wraps datatrove's filters with bookkeeping (an exclusion writer per filter,
removed.jsonl, per-source tallies, the data card and its plot, PII counts) and machinery (spec
loading, planning, fingerprint, lock, temp folder, publish, checksums). This measures what all
of that costs, as bare seconds divided by our seconds (goal: >= 0.95).

Both variants read the same documents: the perturbed corpus of bench/dedup.py (the built-in
corpus repeated `--scale` times with seeded word edits) after ingest and dedup, built once
through the runner and not timed. Ours is `gristmill run --only quality` as the runner does it:
load the spec, plan every stage, build quality (the default filters, PII on, as the demo spec).
Bare is one LocalPipelineExecutor pipeline: JsonlReader, the same filter classes with the same
parameters (tasks/data/quality_filters.py: bare_filter), PIIFormatter, JsonlWriter; no exclusion
writers, tallies, removed.jsonl, card or plot. Both write the same documents: C4 gives its
verdict and the text stays, as in the stage (`--bare-c4 rewrite` lets datatrove's C4 rewrite
what it keeps instead, which shortens the text PII and the writer then handle). Both use the
local executor with one task in this process, run interleaved (ours, bare, ours, ...) so slow
phases of a shared machine hit both, and the best time of each counts. The last line is
`ratio=X.XX` (bare seconds / our seconds).

    PYTHONPATH=. python bench/quality.py [--scale 10] [--repeats 3] [--bare-c4 verdict|rewrite]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dedup import make_corpus, stderr_to  # bench/dedup.py: the perturbed corpus
from machine import describe  # bench/machine.py

SPEC = """name: bench-quality
corpus:
  sources: [{{kind: jsonl, path: '{corpus}/*.jsonl', text_field: text, id_field: id}}]
  filters: {{min_chars: 200, max_chars: 200000}}
dedup: {{exact: true, near: {{threshold: 0.8, ngrams: 5}}}}
quality: {{pii: {{emails: true, ips: true}}}}
"""


@dataclass(frozen=True)
class Result:
    """One timed run: documents read, documents kept, wall seconds."""

    documents_in: int
    documents_out: int
    seconds: float


def prepare(corpus: Path, work: Path) -> tuple[Path, Path]:
    """Builds ingest and dedup once (not timed); returns (spec file, dedup's documents folder)."""
    from data_specs.loader import load_spec
    from tasks.core.runner import execute, plan, select
    from tasks.core.store import ArtifactStore

    spec_path = work / "spec.yaml"
    spec_path.write_text(SPEC.format(corpus=corpus))
    spec = load_spec(spec_path)
    store = ArtifactStore(work / "store")
    for item in select(plan(spec, store), until="dedup"):
        result = execute(item, spec, store)
    return spec_path, Path(result.path) / "documents"


def run_ours(spec_path: Path) -> Result:
    """`gristmill run --only quality` through tasks/core/runner.py, the quality artifact removed first."""
    from data_specs.loader import load_spec
    from tasks.core.runner import execute, plan, select
    from tasks.core.store import ArtifactStore

    store_root = spec_path.parent / "store"
    for leftover in (store_root / "quality", store_root / ".work" / "quality"):
        shutil.rmtree(leftover, ignore_errors=True)
    # plan() hashes code, libraries and input files afresh every time (tasks/core/fingerprint.py: fresh),
    # as a new CLI process would.
    start = time.perf_counter()
    spec = load_spec(spec_path)
    store = ArtifactStore(store_root)
    [item] = select(plan(spec, store), only="quality")
    metrics = execute(item, spec, store).record.metrics
    seconds = time.perf_counter() - start
    return Result(metrics["documents_in"], metrics["documents_out"], seconds)


def run_bare(documents: Path, work: Path, c4_rewrites: bool) -> Result:
    """The same datatrove filters with the same parameters, in one bare pipeline."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from loguru import logger

    from data_specs.schema import QualitySpec
    from tasks.data.quality_filters import bare_filter

    cfg = QualitySpec()
    start = time.perf_counter()
    pipeline = [JsonlReader(str(documents), glob_pattern="*.jsonl*", add_file_path=False),
                *[bare_filter(f, cfg.language, c4_rewrites) for f in cfg.filters], PIIFormatter(),
                JsonlWriter(str(work / "kept"), output_filename="${rank}.jsonl.gz")]
    logs = work / "logs"
    logs.mkdir(parents=True)
    with (logs / "console.log").open("a") as console, contextlib.redirect_stderr(console):  # as tasks/data/engine.py
        stats = LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=str(logs)).run()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    seconds = time.perf_counter() - start
    kept = sum(1 for p in (work / "kept").glob("*.jsonl.gz") for _ in gzip.open(p, "rt"))
    return Result(int(stats.stats[0].stats["documents"].total), kept, seconds)


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=10, help="copies of the built-in corpus in the input")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (interleaved); best counts")
    parser.add_argument("--bare-c4", choices=("verdict", "rewrite"), default="verdict",
                        help="bare C4 keeps the text as the stage does (verdict), or rewrites what it keeps (rewrite)")
    args = parser.parse_args()
    print(describe(), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        root = Path(tmp)
        n_docs, n_bytes = make_corpus(root, args.scale)
        with stderr_to(root / "datatrove.log"):
            spec_path, documents = prepare(root / "corpus", root)
            mb = sum(p.stat().st_size for p in documents.glob("*")) / 1e6
            print(f"corpus: {n_docs} documents, {n_bytes / 1e6:.1f} MB (scale {args.scale}); after ingest and "
                  f"dedup: {mb:.1f} MB gzipped; executor: local, tasks=1, workers=1; bare C4: {args.bare_c4}",
                  flush=True)
            runs: dict[str, list[Result]] = {"ours": [], "bare": []}
            for i in range(args.repeats):
                for name in ("ours", "bare"):
                    work = root / f"bare-{i}"
                    result = run_ours(spec_path) if name == "ours" else \
                        run_bare(documents, work, args.bare_c4 == "rewrite")
                    shutil.rmtree(work, ignore_errors=True)
                    runs[name].append(result)
                    print(f"  run {i + 1} {name}: {result.seconds:.1f} s "
                          f"({result.documents_in} in, {result.documents_out} out)", flush=True)

    best = {name: min(rs, key=lambda r: r.seconds) for name, rs in runs.items()}
    print(f"{'variant':8} {'docs in':>8} {'docs out':>9} {'seconds':>8} {'docs/s':>8}")
    for name, r in best.items():
        print(f"{name:8} {r.documents_in:8d} {r.documents_out:9d} {r.seconds:8.1f} {r.documents_in / r.seconds:8.1f}")
    counts = {(r.documents_in, r.documents_out) for rs in runs.values() for r in rs}
    assert len(counts) == 1, f"document counts differ between runs: {runs}"
    print(describe())
    print(f"ratio={best['bare'].seconds / best['ours'].seconds:.2f}")


if __name__ == "__main__":
    main()
