"""A light `gristmill run` for the kill trials, with seeded SIGKILL points inside the run.

    python -m tests.reliability.killable SPEC STORE UNTIL [--kill-after S | --kill-after-checkpoint S |
                                                           --kill-at-publish] [--fsize-limit BYTES]

It runs the stages up to UNTIL through tasks.core.runner (what the Prefect flow calls), without
Prefect, whose start-up costs seconds a trial. A kill is a real SIGKILL to the whole process
group (datatrove or torchrun children included), sent from a thread of this process:
  --kill-after S             S seconds after UNTIL's build starts (its temp folder is made);
  --kill-after-checkpoint S  S seconds after UNTIL's first training checkpoint is on disk;
  --kill-at-publish          right after UNTIL's build folder is renamed into place, before
                             its artifact.json is written (the one window publish leaves);
  --kill-in-checkpoint-save  in the middle of a checkpoint save: the training loop's second
                             checkpoint written to checkpoint.tmp but not renamed over the
                             first; TRL's second checkpoint folder without its trainer_state.json.
Exit 0 means the run finished before any kill; 3 means a stage failed (message on stderr).
`--fsize-limit` sets RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG instead).

    python -m tests.reliability.killable --serve

imports what the stages import (~11 s on 2 cores, which every trial would pay again), then runs
one trial per line of stdin (a JSON object: "argv", the arguments above, and "stderr", a file for
its standard error) in a child forked from itself, in a process group of its own as a trial run
alone has, and answers each line with the child's exit status (-9 when killed). `Warm` is the
client the fault tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path


def die() -> None:
    """SIGKILL to this process's group: nothing runs after it, no handler, no cleanup."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


def checkpoint_written(work: Path) -> bool:
    """A resumable checkpoint is complete in a training stage's work folder (the loop's
    checkpoint.pt, renamed into place when whole, or a TRL checkpoint with its trainer state)."""
    return (work / "checkpoint.pt").exists() or any(work.glob("trainer/checkpoint-*/trainer_state.json"))


def arm(stage: str, args: argparse.Namespace) -> None:
    """Installs the kill point for `stage` (before anything runs)."""
    from tasks.core import store as store_module

    if args.kill_in_checkpoint_save:
        arm_checkpoint_save(stage)
        return
    if args.kill_at_publish:
        real_replace = os.replace

        def replace_then_die(src, dst, *a, **kw):
            real_replace(src, dst, *a, **kw)
            if Path(src).name.startswith(".tmp-") and Path(dst).parent.name == stage:
                die()  # the folder is in place; its artifact.json is not written yet

        os.replace = replace_then_die  # for this whole process: only that one rename kills
        return
    real_new_build_dir = store_module.ArtifactStore.new_build_dir

    def new_build_dir(self, name: str, fingerprint: str) -> Path:
        path = real_new_build_dir(self, name, fingerprint)
        if name == stage:
            work = self.local_root / store_module.WORK / name / fingerprint
            threading.Thread(target=kill_later, args=(work, args), daemon=True).start()
        return path

    store_module.ArtifactStore.new_build_dir = new_build_dir


def arm_checkpoint_save(stage: str) -> None:
    """Kills in the middle of a checkpoint save of `stage` (see the module docstring)."""
    from transformers.trainer_callback import TrainerState

    saves = {"n": 0}
    real_replace, real_save_to_json = os.replace, TrainerState.save_to_json

    def in_stage(path: str) -> bool:
        return f"/{stage}/" in str(path)

    def replace(src, dst, *a, **kw):
        if Path(dst).name == "checkpoint.pt" and in_stage(dst):
            saves["n"] += 1
            if saves["n"] == 2:  # the first checkpoint.pt is in place, the second one is written
                die()  # ... to checkpoint.tmp, but not renamed over the first
        real_replace(src, dst, *a, **kw)

    def save_to_json(self, json_path: str) -> None:
        if "/checkpoint-" in str(json_path) and in_stage(json_path):
            saves["n"] += 1
            if saves["n"] == 2:  # the first checkpoint is complete; the second has its model,
                die()  # optimizer and RNG state written, but not trainer_state.json
        real_save_to_json(self, json_path)

    os.replace = replace
    TrainerState.save_to_json = save_to_json


def kill_later(work: Path, args: argparse.Namespace) -> None:
    """Waits for the chosen moment of the build, then kills."""
    if args.kill_after_checkpoint is not None:
        while not checkpoint_written(work):
            time.sleep(0.005)
        time.sleep(args.kill_after_checkpoint)
    else:
        time.sleep(args.kill_after)
    die()


def main(argv: list[str] | None = None) -> int:
    """Runs SPEC up to UNTIL in STORE; see the module docstring."""
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("store")
    parser.add_argument("until")
    parser.add_argument("--kill-after", type=float)
    parser.add_argument("--kill-after-checkpoint", type=float)
    parser.add_argument("--kill-at-publish", action="store_true")
    parser.add_argument("--kill-in-checkpoint-save", action="store_true")
    parser.add_argument("--fsize-limit", type=int)
    args = parser.parse_args(argv)
    if args.fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    from data_specs.errors import InputError, StageError
    from tasks.core.runner import execute, prepare_run

    if (args.kill_after is not None or args.kill_after_checkpoint is not None or args.kill_at_publish
            or args.kill_in_checkpoint_save):
        arm(args.until, args)
    try:
        run = prepare_run(args.spec, args.store, until=args.until)
        for item in run.stages:
            result = execute(item, run.spec, run.store)
            print(f"{result.name} {result.state} {result.fingerprint}", flush=True)
    except (InputError, StageError) as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return 3
    return 0


# ---------------------------------------------------------------- a warm process to fork trials from

PRELOAD = ("torch", "transformers.modeling_utils", "trl", "peft", "sentence_transformers", "faiss", "bm25s",
           "datatrove.executor", "datatrove.pipeline.dedup", "datatrove.pipeline.filters", "spacy",
           "tasks.registry", "tasks.core.runner")


def serve() -> int:
    """`--serve`: see the module docstring. Nothing here runs a torch operation before a fork (no
    thread pool to inherit), as DataLoader workers are forked after `import torch`."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(trial(request["argv"], request["stderr"]))
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    return 0


def trial(argv: list[str], stderr: str) -> int:
    """In the forked child: a process group of its own, stdout to /dev/null, stderr to `stderr`."""
    os.setsid()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


class Warm:
    """The client of a `--serve` process: `run(argv, folder)` -> (exit status, standard error)."""

    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.killable", "--serve"], cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"killable --serve exited with {self.proc.wait()} before it was ready")

    def run(self, argv: list[str], folder: Path) -> tuple[int, str]:
        err = folder / "killable.stderr"
        self.proc.stdin.write(json.dumps({"argv": argv, "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        status = self.proc.stdout.readline()
        if not status:
            raise RuntimeError(f"killable --serve exited with {self.proc.wait()}")
        return int(status), err.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
