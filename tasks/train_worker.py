"""Entry point of one torchrun process of a multi-process training stage.

    python -m torch.distributed.run --nproc-per-node=N -m tasks.train_worker JOB.json

torchrun tells each process its place through RANK / WORLD_SIZE / LOCAL_RANK; this entry
point is the one place that reads them. The main process writes result.json beside the job.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

from data_specs.spec import RunSpec
from tasks.errors import InputError
from tasks.training import Dist


def main(job_path: str) -> int:
    """Joins the process group, runs its share of the stage, and (main process) reports."""
    job = json.loads(Path(job_path).read_text())
    spec = RunSpec.model_validate(job["spec"])
    dist = Dist(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                strategy=getattr(spec.resources, job["stage"]).strategy)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    torch_dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")  # gloo: CPU test path
    spec._spec_path = Path(job["spec_path"])
    stage = importlib.import_module(f"tasks.{job['stage']}")
    inputs = {k: Path(v) for k, v in job["inputs"].items()}
    try:
        answer = {"metrics": stage.run(spec, inputs, Path(job["out"]), Path(job["work"]), dist)}
    except InputError as e:
        answer = {"input_error": str(e)}
    if dist.main:
        (Path(job["work"]) / "result.json").write_text(json.dumps(answer))
    torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
