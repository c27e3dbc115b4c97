"""pretrain killed midway resumes from its checkpoint; several processes train through torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.core.runner import execute, plan
from tests.tasks.test_pretrain import FAST_PRETRAIN, run_until, tiny_project

pytestmark = pytest.mark.slow


def test_killed_fsdp_pretrain_resumes_from_its_checkpoint(tmp_path):
    """Two torchrun processes under FSDP, killed after a checkpoint, resume to where a clean run
    in one process ends: the effective batch is kept across processes, so they train the same
    model. (One process killed through the CLI is tests/reliability/test_kill.py's pretrain trial.)"""
    # 16 steps, a checkpoint every 4: the kill lands after the first with most of the run still ahead.
    pretrain = {"pretrain": {**FAST_PRETRAIN, "tokens": 32_768, "eval_every": 4, "checkpoint_every": 4}}
    extra = {"resources": {"pretrain": {"gpus": 2, "strategy": "fsdp"}}, **pretrain}
    clean = run_until(tiny_project(tmp_path / "clean", **pretrain), "pretrain")["pretrain"].record.metrics
    assert clean["processes"] == 1

    factory = tiny_project(tmp_path / "killed", **extra)
    run_until(factory, "tokenizer")
    spec_path = factory.write(**factory.sections)
    code = ("import sys; from flows.cli import main; "
            f"sys.exit(main(['run', {str(spec_path)!r}, '--store', {str(factory.store.root)!r}, '--only', 'pretrain']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(factory.store.local_root.glob(".work/pretrain/*/checkpoint.pt")):
        assert proc.poll() is None, "pretrain ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(factory.store.local_root.glob("pretrain/*/artifact.json"))

    spec = factory.load(**factory.sections)
    row = [r for r in plan(spec, factory.store) if r.name == "pretrain"][0]
    resumed = execute(row, spec, factory.store)
    check_launch(resumed, "fsdp")  # the resumed run is also the FSDP launch test (a torchrun start-up less)
    m = resumed.record.metrics
    assert m["resumed_from_step"] >= 4
    # The data order depends only on the step, so the resumed run ends where a clean one does.
    assert m["steps"] == clean["steps"] and m["tokens_seen"] == clean["tokens_seen"]
    assert m["val_loss_initial"] == pytest.approx(clean["val_loss_initial"], abs=1e-6)
    assert m["val_loss_final"] == pytest.approx(clean["val_loss_final"], abs=1e-3)
    assert not list(factory.store.local_root.glob(".work/pretrain/*"))  # scratch removed once published


def check_launch(result, strategy: str) -> None:
    """What the multi-GPU launch path promises: two processes under `strategy`, the effective batch
    kept, a model that learned, and an unsharded export that loads as a plain model."""
    m = result.record.metrics
    assert m["processes"] == 2 and m["strategy"] == strategy
    assert m["batch_tokens_effective"] == 2048  # the effective batch is kept across processes
    assert m["val_loss_final"] < m["val_loss_initial"]
    assert (result.record.files.keys() >= {"model/model.safetensors", "model/config.json", "loss_curve.csv"})
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(Path(result.path) / "model")


def test_two_processes_through_torchrun_under_ddp(tmp_path):
    """The multi-GPU launch path, on CPU: torchrun, two processes, gloo, DDP (FSDP's is the resumed
    run of the kill test above, whose checkpoint save, a collective gather, runs every 4 of its 16 steps)."""
    factory = tiny_project(tmp_path, resources={"pretrain": {"gpus": 2, "strategy": "ddp"}})
    result = run_until(factory, "pretrain", pretrain={**FAST_PRETRAIN, "tokens": 16_384, "checkpoint_every": 3})["pretrain"]
    check_launch(result, "ddp")
