"""Several training processes through torchrun, for any stage with a `run(spec, inputs, out,
work, dist)` function (pretrain, midtrain). tasks/train_worker.py is each process's entry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from data_specs.spec import RunSpec
from tasks.errors import InputError
from tasks.stage import Inputs, Metrics


def launch(stage: str, spec: RunSpec, inputs: Inputs, out: Path, work: Path, processes: int) -> Metrics:
    """Runs `tasks.<stage>.run` in `processes` torchrun processes; returns the main one's metrics."""
    job = work / "job.json"
    job.write_text(json.dumps({"stage": stage, "spec": spec.model_dump(mode="json", by_alias=True),
                               "spec_path": str(spec.spec_path), "inputs": {k: str(v) for k, v in inputs.items()},
                               "out": str(out), "work": str(work)}))
    result = work / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "tasks.train_worker", str(job)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{stage}: torchrun with {processes} processes exited with code {proc.returncode}")
    answer = json.loads(result.read_text())
    if "input_error" in answer:
        raise InputError(answer["input_error"])
    return answer["metrics"]


def run_or_launch(stage: str, run, spec: RunSpec, inputs: Inputs, out: Path, work: Path, processes: int) -> Metrics:
    """`run` in this process, or in `processes` torchrun processes; adds the stage's wall time."""
    from tasks.training import Dist

    start = time.perf_counter()
    metrics = launch(stage, spec, inputs, out, work, processes) if processes > 1 else run(spec, inputs, out, work, Dist())
    metrics["wall_s"] = round(time.perf_counter() - start, 3)
    return metrics
