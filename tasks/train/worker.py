"""Entry point of one torchrun process of a multi-process training stage.

    python -m torch.distributed.run --nproc-per-node=N -m tasks.train.worker JOB.json

torchrun tells each process its place through RANK / WORLD_SIZE / LOCAL_RANK; this entry
point is the one place that reads them. The job file holds the stage's section, resources,
input folders and context (tasks/train/distributed.py); the main process writes result.json
beside it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from data_specs.errors import InputError
from data_specs.views import KeyedView, RuntimeView
from tasks.core.allocator import keep_freed_memory
from tasks.core.artifacts import Model
from tasks.core.stage import RunContext
from tasks.train.loop import Dist


def _load(dumped: dict[str, Any] | None) -> Any:
    """A spec section validated back from the job file."""
    if dumped is None:
        return None
    module, name = dumped["class"].split(":")
    return getattr(importlib.import_module(module), name).model_validate(dumped["value"])


def main(job_path: str) -> int:
    """Joins the process group, runs its share of the stage, and (main process) reports."""
    import torch
    import torch.distributed as torch_dist

    job = json.loads(Path(job_path).read_text())
    keep_freed_memory()
    module = importlib.import_module(job["module"])  # the stage's own module: already in its code digest
    stage = module.STAGE
    section, resources = _load(job["section"]), _load(job["resources"])
    base = Path(job["spec_path"]).parent
    dist = Dist(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)), strategy=resources.strategy)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    torch_dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")  # gloo: CPU test path
    roles = stage.roles()
    inputs = stage.inputs(**{role: roles[role].at(Path(path)) for role, path in job["inputs"].items()})
    # A run reference names a pretrain or midtrain artifact: a model (tasks/core/references.py).
    start = Model.at(Path(job["start"])) if job.get("start") else None
    ctx = RunContext(work=Path(job["work"]), trust_remote_code=job["trust_remote_code"], spec_path=Path(job["spec_path"]),
                     resolved=job["resolved"], fields=job["fields"], runtime=RuntimeView(section, stage.section, base),
                     resources=resources, start=start)
    try:
        answer = {"metrics": module.run(KeyedView(section, stage.section, base), inputs, Path(job["out"]), ctx, dist)}
    except InputError as e:
        answer = {"input_error": str(e)}
    if dist.main:
        (Path(job["work"]) / "result.json").write_text(json.dumps(answer))
    # Every rank reaches here before any tears the group down: a rank destroying it while another
    # still talks to it aborts that one ("terminate called without an active exception").
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
