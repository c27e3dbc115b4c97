"""Planning stays cheap: a cached rerun imports every stage module and plans every stage, and
needs none of the slow libraries their builds use."""

import json
import subprocess
import sys

from tests.conftest import REPO, TINY

# Imported only where a stage builds or a report is drawn. datatrove's data model and step base
# class are allowed (cheap, and the base of gristmill's own steps); its readers, writers, filters,
# dedup steps and executors, which pull in datatrove.io and huggingface_hub, are not. torch is
# allowed: the plan asks it for the device and whether the CPU computes bf16 (tasks/core/keys.py).
SLOW = ("scipy", "matplotlib", "trl", "peft", "transformers", "sentence_transformers", "faiss", "bm25s", "datasets",
        "huggingface_hub", "prefect", "datatrove.io", "datatrove.executor", "datatrove.pipeline.readers",
        "datatrove.pipeline.writers", "datatrove.pipeline.filters", "datatrove.pipeline.dedup")

PLAN = f"""
import json, sys, tempfile
import flows.cli
from data_specs.loader import load_spec
from tasks.core.runner import plan
from tasks.core.store import ArtifactStore

rows = plan(load_spec({str(TINY)!r}), ArtifactStore(tempfile.mkdtemp()))
assert len(rows) == 12 and not any(r.cached for r in rows)
print(json.dumps(sorted(m for m in sys.modules if m in {SLOW!r} or m.split(".")[0] in {SLOW!r})))
"""


def test_planning_imports_no_slow_library():
    """Walking the stages' code for their keys must not import it either (tasks/core/fingerprint.py)."""
    proc = subprocess.run([sys.executable, "-c", PLAN], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
