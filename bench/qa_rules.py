"""Rule Q&A generator throughput on the built-in corpus, vs a bare regex scan of the same text.

The baseline runs only the generator's regular expressions over every document (the floor
any structure-mining pass pays); ours also cuts spans, builds questions and pairs. Both run
in the same process on the same documents, best of --repeats.

    .venv/bin/python bench/qa_rules.py

Last line: ratio=X.XX (ours / bare-regex throughput in MB/s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tasks.data.python_docs import write_python_docs
from tasks.ingest import normalize_text
from tasks.qagen.rules import _DEFINITION, _GRAMMAR, _MEMBER, rule_pairs


def bare_scan(docs: list[dict]) -> int:
    """Matches of the generator's patterns, nothing else."""
    return sum(sum(1 for _ in rx.finditer(d["text"])) for d in docs for rx in (_MEMBER, _GRAMMAR, _DEFINITION))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (best is kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        write_python_docs(path)
        docs = [json.loads(line) for line in path.read_text().splitlines()]
    for d in docs:
        d["text"] = normalize_text(d["text"])
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6

    ours, bare, pairs = [], [], 0
    for _ in range(args.repeats):
        t = time.perf_counter()
        pairs = sum(len(rule_pairs(d["id"], d["text"])) for d in docs)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare_scan(docs)
        bare.append(time.perf_counter() - t)
    o, b = min(ours), min(bare)
    print(f"corpus: {len(docs)} documents, {mb:.2f} MB")
    print(f"ours: {pairs} pairs in {o:.3f} s = {pairs / o:,.0f} pairs/s, {len(docs) / o:,.0f} docs/s, {mb / o:.1f} MB/s")
    print(f"bare regex scan: {b:.3f} s = {mb / b:.1f} MB/s")
    print(f"ratio={b / o:.2f}")


if __name__ == "__main__":
    main()
