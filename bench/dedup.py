"""Benchmark: gristmill's ingest + dedup stages vs the same datatrove pipeline run bare.

Why: the stages wrap datatrove with bookkeeping (rejects, removed.jsonl, key indexes) and
machinery (fingerprints, locks, atomic publish, checksums). This measures what all of that
costs, as documents/s of ours divided by documents/s of bare datatrove (goal: >= 0.9).

Both variants read the same corpus (the built-in python_docs corpus repeated `--scale` times,
with seeded perturbations so exact and near dedup both have work), use the same datatrove
steps and parameters and the same executor (local, `--tasks` tasks and as many workers; the
default 1 is the spec default and runs in this process), run interleaved in one process (ours,
bare, ours, bare, ...) so slow phases of a shared machine hit both, and the best time of each
counts. The last line printed is `ratio=X.XX`.

    python bench/dedup.py [--scale 20] [--repeats 3] [--tasks 1]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import LambdaFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.stats import PipelineStats
from loguru import logger

MIN_CHARS, MAX_CHARS = 200, 200_000  # as data_specs/python_docs.yaml
THRESHOLD, NGRAMS, LANGUAGE = 0.8, 5, "eng"
SHARDS = 4  # corpus files; both readers give file i to rank i % tasks
EXACT_SHARE = 0.15  # share of repeated documents copied verbatim (exact duplicates)


@dataclass(frozen=True)
class Result:
    """One timed run: documents read, documents kept after dedup, wall seconds."""

    documents_in: int
    documents_out: int
    seconds: float


# ---------------------------------------------------------------- corpus


def perturb(text: str, rng: random.Random, vocab: list[str], rate: float) -> str:
    """Substitutes or deletes about `rate` of the words: a low rate gives a near duplicate,
    a high one a document MinHash should keep."""
    words = text.split(" ")
    for pos in rng.sample(range(len(words)), int(len(words) * rate)):
        words[pos] = rng.choice(vocab) if rng.random() < 0.5 else ""
    return " ".join(w for w in words if w)


def make_corpus(folder: Path, scale: int, seed: int = 0) -> tuple[int, int]:
    """Writes `scale` copies of python_docs (copy 0 verbatim, later copies exact or perturbed at
    0.5-8 %, all with new ids) into SHARDS JSONL files; returns (documents, bytes)."""
    from tasks.data.python_docs import write_python_docs  # only to generate the input

    write_python_docs(folder / "python_docs.jsonl")
    docs = [json.loads(line) for line in (folder / "python_docs.jsonl").read_text().splitlines() if line.strip()]
    vocab = sorted({w for d in docs for w in d["text"].split() if w.isalpha()})
    rng = random.Random(seed)
    (folder / "corpus").mkdir()
    outs = [(folder / "corpus" / f"{i:02d}.jsonl").open("w", encoding="utf-8") for i in range(SHARDS)]
    n = 0
    for k in range(scale):
        for d in docs:
            text = d["text"]
            if k > 0 and rng.random() >= EXACT_SHARE:
                text = perturb(text, rng, vocab, rng.uniform(0.005, 0.08))
            outs[n % SHARDS].write(json.dumps({"id": f"{d['id']}#{k}", "text": text}) + "\n")
            n += 1
    for f in outs:
        f.close()
    return n, sum(p.stat().st_size for p in (folder / "corpus").iterdir())


# ---------------------------------------------------------------- ours


SPEC = """name: bench-dedup
corpus:
  sources: [{{kind: jsonl, path: '{corpus}/*.jsonl', text_field: text, id_field: id}}]
  filters: {{min_chars: {min}, max_chars: {max}}}
dedup: {{exact: true, near: {{threshold: {threshold}, ngrams: {ngrams}}}, language: {language}}}
executor: {{kind: local, tasks: {tasks}, workers: {tasks}}}
"""


def run_ours(corpus: Path, work: Path, tasks: int) -> Result:
    """plan + execute of ingest and dedup through tasks/runner.py into a fresh store, as
    `gristmill run` does (input fingerprint, lock, temp folder, publish, checksums)."""
    from data_specs.loader import load_spec
    from tasks.core.runner import execute, plan, select
    from tasks.core.store import ArtifactStore

    spec_path = work / "spec.yaml"
    spec_path.write_text(SPEC.format(min=MIN_CHARS, max=MAX_CHARS, threshold=THRESHOLD, ngrams=NGRAMS,
                                     language=LANGUAGE, tasks=tasks, corpus=corpus))
    # Each plan reads code, input files and library metadata afresh (tasks/core/fingerprint.py:
    # fresh), as a CLI run does: no memo of an earlier repeat carries over.
    start = time.perf_counter()
    spec = load_spec(spec_path)
    store = ArtifactStore(work / "store")
    # As `gristmill run --until dedup`: plan every stage, build ingest and dedup.
    stages = select(plan(spec, store), until="dedup")
    metrics = {item.name: execute(item, spec, store).record.metrics for item in stages}
    seconds = time.perf_counter() - start
    return Result(metrics["ingest"]["documents_in"], metrics["dedup"]["documents_out"], seconds)


# ---------------------------------------------------------------- bare datatrove

_SPACES, _CONTROL = re.compile(r"[^\S\n\t]"), re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING, _BLANK_RUNS = re.compile(r"[ \t]+\n"), re.compile(r"\n{3,}")


class Normalize(BaseFormatter):
    """The same text normalisation as ours (NFC, newlines, spaces, controls, blank runs), so
    the bare run does equal work; no ids, rejects or per-source counts."""

    name = "bare normalize"

    def format(self, text: str) -> str:
        text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
        text = _SPACES.sub(" ", _CONTROL.sub("", text))
        return _BLANK_RUNS.sub("\n\n", _TRAILING.sub("\n", text)).strip()


def in_bounds(doc: Document) -> bool:
    return MIN_CHARS <= len(doc.text) <= MAX_CHARS


def text_of(doc: Document) -> str:
    return doc.text


def run_bare(corpus: Path, work: Path, tasks: int) -> Result:
    """The same datatrove steps, parameters and task counts as tasks/ingest.py and
    tasks/dedup.py, written directly (no exclusion writers, key indexes or cluster ids)."""
    from data_specs.schema import NearDedupSpec
    from tasks.dedup import minhash_config  # the config only, so both use the same bands/rows

    def run(pipeline: list, name: str, n: int = tasks) -> PipelineStats:
        logs = work / "logs" / name
        logs.mkdir(parents=True)
        # As tasks/engine.py does: datatrove's console output to a file, loguru reset after.
        with (logs / "console.log").open("a") as console, contextlib.redirect_stderr(console):
            stats = LocalPipelineExecutor(pipeline, tasks=n, workers=min(tasks, n), logging_dir=str(logs)).run()
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
        return stats

    def reader(folder: Path, pattern: str = "*.jsonl.gz") -> JsonlReader:
        return JsonlReader(str(folder), glob_pattern=pattern, add_file_path=False)

    def writer(folder: Path) -> JsonlWriter:
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")

    exact = ExactDedupConfig(content_getter=text_of)
    near = minhash_config(NearDedupSpec(threshold=THRESHOLD, ngrams=NGRAMS))
    start = time.perf_counter()
    stats = run([reader(corpus, "*.jsonl"), Normalize(), LambdaFilter(in_bounds), writer(work / "docs")], "ingest")
    run([reader(work / "docs"), ExactDedupSignature(str(work / "e-sigs"), exact)], "exact-1")
    run([ExactFindDedups(str(work / "e-sigs"), str(work / "e-dups"), exact)], "exact-2", 1)
    run([reader(work / "docs"), ExactDedupFilter(str(work / "e-dups"), exact), writer(work / "exact")], "exact-3")
    run([reader(work / "exact"), MinhashDedupSignature(str(work / "m-sigs"), near, language=LANGUAGE)], "minhash-1")
    run([MinhashDedupBuckets(str(work / "m-sigs"), str(work / "m-buckets"), config=near)], "minhash-2",
        near.num_buckets)
    run([MinhashDedupCluster(str(work / "m-buckets"), str(work / "m-clusters"), config=near)], "minhash-3", 1)
    run([reader(work / "exact"), MinhashDedupFilter(str(work / "m-clusters")), writer(work / "final")], "minhash-4")
    seconds = time.perf_counter() - start
    kept = sum(1 for p in (work / "final").glob("*.jsonl.gz") for _ in gzip.open(p, "rt"))
    return Result(int(stats.stats[0].stats["documents"].total), kept, seconds)


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Sends fd 2 to `path` for both variants alike: datatrove's worker processes log every task
    there, which would bury the table. A failing run shows the log's tail."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    except BaseException:
        os.dup2(saved, 2)
        print(path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="copies of the built-in corpus in the input")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (interleaved); best counts")
    parser.add_argument("--tasks", type=int, default=1,
                        help="datatrove tasks (and workers) for both variants; 1 (the spec default) runs in this "
                             "process and was far steadier on a shared 2-core machine than 2 workers")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        root = Path(tmp)
        n_docs, n_bytes = make_corpus(root, args.scale)
        mb = n_bytes / 1e6
        print(f"corpus: {n_docs} documents, {mb:.1f} MB in {SHARDS} JSONL files (scale {args.scale}); "
              f"executor: local, tasks={args.tasks}, workers={args.tasks}", flush=True)
        runs: dict[str, list[Result]] = {"ours": [], "bare": []}
        with stderr_to(root / "datatrove.log"):
            for i in range(args.repeats):
                for name, fn in (("ours", run_ours), ("bare", run_bare)):
                    work = root / f"{name}-{i}"
                    work.mkdir()
                    result = fn(root / "corpus", work, args.tasks)
                    shutil.rmtree(work)
                    runs[name].append(result)
                    print(f"  run {i + 1} {name}: {result.seconds:.1f} s "
                          f"({result.documents_in} in, {result.documents_out} out)", flush=True)

    best = {name: min(rs, key=lambda r: r.seconds) for name, rs in runs.items()}
    print(f"{'variant':8} {'docs in':>8} {'docs out':>9} {'seconds':>8} {'docs/s':>8} {'MB/s':>6}")
    for name, r in best.items():
        print(f"{name:8} {r.documents_in:8d} {r.documents_out:9d} {r.seconds:8.1f} "
              f"{r.documents_in / r.seconds:8.1f} {mb / r.seconds:6.2f}")
    counts = {(r.documents_in, r.documents_out) for rs in runs.values() for r in rs}
    assert len(counts) == 1, f"document counts differ between runs: {runs}"
    ratio = (best["ours"].documents_in / best["ours"].seconds) / (best["bare"].documents_in / best["bare"].seconds)
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
