"""Runs datatrove pipelines for the data stages, and reads back the counts they keep.

Every executor's logging folder lives in the stage's per-fingerprint work folder, so a
killed stage resumes with datatrove's own completion markers and a changed spec never
mixes with a stale folder. The executor kind (local / ray) never enters a key: the same
`tasks` give the same shards and the same output files on every executor
(tests/tasks/data/test_engine_ray.py checks ray against local).

Ray: to run on an existing cluster, start Ray on its machines (`ray start --head` on one,
`ray start --address=<head>:<port>` on the others) and set RAY_ADDRESS=<head>:<port> where
gristmill runs (with Ray's token auth, RAY_AUTH_MODE=token and the token there too; see the
README); `_start_ray` joins whatever cluster `ray.init()` finds that way. Every node
needs the same gristmill, datatrove and Python packages installed (Ray unpickles gristmill's
pipeline steps there), and the store's work folders on a filesystem every node sees (datatrove
writes each rank's output, logs and completion marker from the node that ran it); on one
machine any folder works. tests/tasks/data/test_engine_ray_cluster.py runs a stage on a
two-node cluster started this way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from data_specs.errors import InputError, StageError
from data_specs.schema import ExecutorSpec

if TYPE_CHECKING:
    from datatrove.pipeline.base import PipelineStep

log = logging.getLogger("gristmill")

StepCounts = list[dict[str, float]]


def run_pipeline(
    pipeline: Sequence[PipelineStep], name: str, work: Path, executor: ExecutorSpec, tasks: int | None = None
) -> StepCounts:
    """Runs one datatrove pipeline to completion (skipping ranks a killed run finished) and
    returns the merged per-rank stats of every rank, including those done earlier."""
    # loguru and datatrove are imported where used, not at the top: planning a run imports the
    # data stages, which import this module, and needs neither.
    from loguru import logger as loguru_logger

    logs = work / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    tasks = executor.tasks if tasks is None else tasks
    log.info("datatrove %s: %d task(s) on the %s executor", name, tasks, executor.kind)
    # datatrove prints per-task stats to stderr; they go to a file kept with the logs instead.
    try:
        with (logs / "console.log").open("a", encoding="utf-8") as console, contextlib.redirect_stderr(console):
            loguru_logger.remove()  # its default sink holds the real stderr
            loguru_logger.add(console, level="INFO")
            runner = _executor(pipeline, logs, executor, tasks)
            runner.run()
    finally:
        # datatrove re-adds a sink on the (redirected, now closed) stderr after each task.
        loguru_logger.remove()
        loguru_logger.add(sys.stderr, level="WARNING")
    # The Ray executor logs a failed task and returns; without this check a stage would
    # publish the output of the ranks that happened to finish.
    missing = runner.get_incomplete_ranks(range(tasks), skip_completed=True)
    if missing:
        raise StageError(f"datatrove {name}: {len(missing)} of {tasks} task(s) did not complete on the "
                         f"{executor.kind} executor (ranks {', '.join(map(str, missing[:10]))}); their logs are "
                         f"in {logs / 'logs'}")
    return merged_stats(logs)


# datatrove's local executor talks to its worker processes through a multiprocessing Manager, over
# a Unix socket at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX: 32 characters past TMPDIR, and a socket
# path holds at most 107. Past that the Manager's process dies at start and the stage fails with
# a bare EOFError (seen with a deep TMPDIR in tests/reliability/test_security.py).
SOCKET_PATH_MAX, SOCKET_SUFFIX = 107, len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def check_socket_dir() -> None:
    """Bad input, before any work, when TMPDIR is too long for the local executor's socket."""
    tmp = tempfile.gettempdir()
    if len(tmp) + SOCKET_SUFFIX > SOCKET_PATH_MAX:
        raise InputError(f"TMPDIR: {tmp} is {len(tmp)} characters; datatrove's local executor needs a Unix "
                         f"socket in it, whose path may be at most {SOCKET_PATH_MAX} characters: set TMPDIR to "
                         f"a folder of at most {SOCKET_PATH_MAX - SOCKET_SUFFIX} characters")


def _executor(pipeline: Sequence[PipelineStep], logs: Path, executor: ExecutorSpec, tasks: int):
    """The datatrove executor the spec asks for."""
    if executor.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        check_socket_dir()

        return LocalPipelineExecutor(pipeline=list(pipeline), tasks=tasks, workers=min(executor.workers, tasks),
                                     logging_dir=str(logs), skip_completed=True)
    if executor.kind == "ray":
        try:
            from datatrove.executor.ray import RayPipelineExecutor
        except ImportError as e:
            raise InputError(f"executor.kind is 'ray' but ray is not installed ({e}); pip install 'ray[default]'") from None
        _start_ray()
        return RayPipelineExecutor(pipeline=list(pipeline), tasks=tasks, workers=executor.workers,
                                   logging_dir=str(logs), skip_completed=True)
    # ExecutorSpec.kind admits only the two above (its validator says why slurm is refused).
    raise ValueError(f"no datatrove executor for executor.kind {executor.kind!r}")


def _start_ray() -> None:
    """Joins the Ray cluster already set up (ray.init() by the caller, or the one ray.init finds:
    RAY_ADDRESS, or one `ray start` began on this machine), else starts a local one. Started here: no dashboard
    (a web server nobody asked for), and worker output stays in datatrove's task logs instead of
    being copied onto this process's console."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)


def merged_stats(logs: Path) -> StepCounts:
    """Per pipeline step, the counters summed over every rank datatrove saved under `logs/stats/`."""
    steps: StepCounts = []
    for path in sorted((logs / "stats").glob("*.json")):
        for i, step in enumerate(json.loads(path.read_text())):
            if i == len(steps):
                steps.append({})
            for key, value in step.get("stats", {}).items():
                # datatrove writes a counter as a bare number, or as {"total": ..., "mean": ...}.
                total = value.get("total", 0) if isinstance(value, dict) else value
                steps[i][key] = steps[i].get(key, 0) + total
    return steps


def step_counts(stats: StepCounts, step_index: int) -> dict[str, float]:
    """The counters of one step (by position in the pipeline)."""
    return stats[step_index] if step_index < len(stats) else {}
