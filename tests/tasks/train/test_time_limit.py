"""Wall-clock time limits inside the training loops: the stage stops at a step boundary with a
checkpoint and fails clearly (CLI exit 1, nothing published), and a rerun resumes and finishes.
The limits never enter a cache key."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from data_specs.errors import StageError
from tasks.core.runner import execute, plan
from tasks.train.loop import CHECKPOINT, Dist, _reduce_step
from tests.conftest import REPO, SpecFactory
from tests.tasks.test_pretrain import FAST_PRETRAIN, run_until, tiny_project

# 4 optimizer steps of 2048 tokens; no periodic checkpoint, so one found must be the limit's.
SHORT = {**FAST_PRETRAIN, "tokens": 8192, "checkpoint_every": 1000}
# Any limit shorter than one step stops the loop after its first step: a deterministic test.
INSTANT = 0.001
STOPPED = r"reached its time limit of 0\.001 s at step 1 of 4; checkpoint saved; rerun to resume"


def limits(**stages: float) -> dict:
    return {"resources": {stage: {"time_limit": seconds} for stage, seconds in stages.items()}}


def stage_row(factory: SpecFactory, stage: str, **sections):
    spec = factory.load(**{**factory.sections, **sections})
    return spec, next(r for r in plan(spec, factory.store) if r.name == stage)


def test_time_limits_stay_out_of_every_key(project):
    base = {p.name: p.fingerprint for p in plan(project.load(), project.store)}
    limited = project.load(**limits(pretrain=60, midtrain=1.5, sft=600, dpo=3600))
    assert {p.name: p.fingerprint for p in plan(limited, project.store)} == base
    assert limited.resources.sft.time_limit == 600
    # A keyed field beside it still changes the key: this comparison can fail.
    other = project.load(pretrain={"tokens": 1234})
    assert {p.name: p.fingerprint for p in plan(other, project.store)}["pretrain"] != base["pretrain"]


def test_time_limit_must_be_positive_and_sft_has_no_gpus(project):
    from data_specs.errors import InputError

    with pytest.raises(InputError, match=r"resources\.pretrain\.time_limit: Input should be greater than 0"):
        project.load(**limits(pretrain=0))
    with pytest.raises(InputError, match=r"resources\.sft\.gpus: Extra inputs are not permitted"):
        project.load(resources={"sft": {"gpus": 2}})


def test_pretrain_stops_with_a_checkpoint_and_a_rerun_resumes(tmp_path):
    """Through the CLI (exit 1, the message, nothing published), then a rerun without the limit."""
    factory = tiny_project(tmp_path, pretrain=SHORT)
    run_until(factory, "tokenizer")
    spec_path = factory.write(**factory.sections, **limits(pretrain=INSTANT))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec_path), "--store", str(factory.store.root),
                           "--only", "pretrain"], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"pretrain {STOPPED.replace(chr(92), '')}" in proc.stderr
    assert not list(factory.store.local_root.glob("pretrain/*/artifact.json"))
    [checkpoint] = factory.store.local_root.glob(f".work/pretrain/*/{CHECKPOINT}")
    assert torch.load(checkpoint, weights_only=True)["step"] == 1

    spec, row = stage_row(factory, "pretrain")  # the limit is unkeyed: same fingerprint, same work folder
    m = execute(row, spec, factory.store).record.metrics
    assert m["resumed_from_step"] == 1 and m["steps"] == 4 and m["tokens_seen"] == 8192
    assert m["val_loss_final"] < m["val_loss_initial"]
    assert not list(factory.store.local_root.glob(".work/pretrain/*"))


@pytest.mark.slow
def test_torchrun_ranks_stop_together(tmp_path):
    """Two torchrun processes under FSDP (gloo on CPU): both stop at the same step, the checkpoint
    save (a collective gather) completes, and the main process's report fails the stage. DDP
    stops through the same all-reduce (test_one_rank_past_its_limit_stops_every_rank)."""
    factory = tiny_project(tmp_path, pretrain=SHORT)
    run_until(factory, "tokenizer")
    spec, row = stage_row(factory, "pretrain", resources={"pretrain": {"gpus": 2, "strategy": "fsdp",
                                                                       "time_limit": INSTANT}})
    with pytest.raises(StageError, match=STOPPED):  # the effective batch is kept: still 4 steps of 2048 tokens
        execute(row, spec, factory.store)
    [checkpoint] = factory.store.local_root.glob(f".work/pretrain/*/{CHECKPOINT}")
    assert torch.load(checkpoint, weights_only=True)["step"] == 1


def _agree(rank: int, path: str, answers) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    # Only rank 1's clock has passed: rank 0 must stop too, at the same step.
    answers[rank] = _reduce_step(float(rank + 1), over=rank == 1, dist=Dist(rank=rank, world=2), device=torch.device("cpu"))
    torch_dist.destroy_process_group()


def test_one_rank_past_its_limit_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    answers = mp.Manager().dict()
    # spawn, not fork: by now the test process has threads (Prefect, Ray, torch), and a forked
    # child of a threaded process can inherit a held lock and die (seen in CI).
    mp.start_processes(_agree, args=(str(tmp_path / "rendezvous"), answers), nprocs=2, start_method="spawn")
    assert dict(answers) == {0: (1.5, True), 1: (1.5, True)}


@pytest.mark.slow
def test_sft_stops_with_a_checkpoint_and_a_rerun_resumes(tmp_path):
    """A TRL stage: the callback saves and stops the trainer; the rerun resumes from that step."""
    sft = {"lora": {"r": 4, "alpha": 8}, "epochs": 1, "batch_size": 4, "answer_sample": 2, "max_new_tokens": 4,
           "save_steps": 1000}
    one_step = {"tokens": 2048, "batch_tokens": 2048, "micro_batch": 16}  # upstream only needs a model
    factory = tiny_project(tmp_path, pretrain={**SHORT, **one_step}, qa={"per_doc": 2}, midtrain=one_step, sft=sft)
    run_until(factory, "midtrain")
    spec, row = stage_row(factory, "sft", **limits(sft=INSTANT))
    with pytest.raises(StageError, match=r"sft reached its time limit of 0\.001 s at step 1 of (\d+); "
                                         r"checkpoint saved; rerun to resume") as failed:
        execute(row, spec, factory.store)
    assert not list(factory.store.local_root.glob("sft/*/artifact.json"))
    assert [p.name for p in factory.store.local_root.glob(".work/sft/*/trainer/checkpoint-*")] == ["checkpoint-1"]

    spec, row = stage_row(factory, "sft")
    m = execute(row, spec, factory.store).record.metrics
    total = int(re.search(r"at step 1 of (\d+)", str(failed.value)).group(1))
    assert m["resumed_from_step"] == 1 and m["steps"] == total > 1
