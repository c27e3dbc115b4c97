"""Several training processes through torchrun, for any stage with a `run(cfg, inputs, out, ctx,
dist)` function (pretrain, midtrain). tasks/train/worker.py is each process's entry."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from data_specs.errors import InputError
from data_specs.views import KeyedView
from tasks.core.stage import Metrics, RunContext
from tasks.train import worker

WORKER = worker.__name__  # started by name through torchrun (and in the stage's code digest via this import)


def _dump(section: Any) -> dict[str, Any] | None:
    """A spec section as JSON with its class, so another process can validate it back."""
    if section is None:
        return None
    cls = type(section)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "value": section.model_dump(mode="json", by_alias=True)}


def launch(stage: str, run, cfg: KeyedView, inputs: Any, out: Path, ctx: RunContext, processes: int) -> Metrics:
    """Runs `run` (a stage module's) in `processes` torchrun processes; returns the main one's metrics."""
    job = ctx.work / "job.json"
    job.write_text(json.dumps({
        "stage": stage, "module": run.__module__, "section": _dump(cfg.unwrap()), "resources": _dump(ctx.resources),
        "inputs": {f.name: str(getattr(inputs, f.name).path) for f in dataclasses.fields(inputs)
                   if getattr(inputs, f.name) is not None},
        "start": str(ctx.start.path) if ctx.start is not None else None,
        "out": str(out), "work": str(ctx.work), "spec_path": str(ctx.spec_path),
        "trust_remote_code": ctx.trust_remote_code, "resolved": dict(ctx.resolved), "fields": dict(ctx.fields)}))
    result = ctx.work / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", WORKER, str(job)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{stage}: torchrun with {processes} processes exited with code {proc.returncode}")
    answer = json.loads(result.read_text())
    if "input_error" in answer:
        raise InputError(answer["input_error"])
    return answer["metrics"]


def run_or_launch(stage: str, run, cfg: KeyedView, inputs: Any, out: Path, ctx: RunContext) -> Metrics:
    """`run` in this process, or in one torchrun process per planned process; adds the wall time."""
    from tasks.train.loop import Dist

    processes = int(ctx.resolved.get("processes", 1))
    start = time.perf_counter()
    metrics = launch(stage, run, cfg, inputs, out, ctx, processes) if processes > 1 else run(cfg, inputs, out, ctx, Dist())
    metrics["wall_s"] = round(time.perf_counter() - start, 3)
    return metrics
