"""Planning stays cheap: a cached rerun imports every stage module and plans every stage, and
needs none of the slow libraries their builds use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core import keys
from tasks.core.keys import GPU_DEVICE_FILES
from tests.conftest import REPO, TINY

# Imported only where a stage builds or a report is drawn. datatrove's data model and step base
# class are allowed (cheap, and the base of gristmill's own steps); its readers, writers, filters,
# dedup steps and executors, which pull in datatrove.io and huggingface_hub, are not. torch neither
# on a machine without a GPU driver: the device and the CPU's bf16 come from /dev and /proc
# (tasks/core/keys.py); where a GPU may be, the plan asks torch.
SLOW = ("scipy", "matplotlib", "trl", "peft", "transformers", "sentence_transformers", "faiss", "bm25s", "datasets",
        "huggingface_hub", "prefect", "datatrove.io", "datatrove.executor", "datatrove.pipeline.readers",
        "datatrove.pipeline.writers", "datatrove.pipeline.filters", "datatrove.pipeline.dedup",
        *(() if any(Path(f).exists() for f in GPU_DEVICE_FILES) else ("torch",)))

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


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f avx512_bf16 amx_tile", True),
                                             ("fpu avx2 amx_tile", True), ("fpu avx2 avx512f", False)])
def test_the_cpus_bf16_comes_from_its_flags(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: A CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(keys, "CPUINFO", str(cpuinfo))
    keys.native_bf16.cache_clear()
    try:
        assert keys.native_bf16("cpu") is expected
    finally:
        keys.native_bf16.cache_clear()


def test_without_a_gpu_drivers_device_files_the_device_is_cpu(tmp_path, monkeypatch):
    """And with one, torch decides (here: whatever this machine has)."""
    import torch

    monkeypatch.setattr(keys, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    keys.local_device.cache_clear()
    try:
        assert keys.local_device() == "cpu"
        (tmp_path / "nvidiactl").touch()
        keys.local_device.cache_clear()
        assert keys.local_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        keys.local_device.cache_clear()


def test_the_flags_agree_with_torch_here():
    """On this machine the /proc answer is torch's answer (the key's precision does not move)."""
    import torch

    if keys.cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo")
    assert bool(keys.cpu_flags() & {"avx512_bf16", "amx_tile"}) == bool(
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
