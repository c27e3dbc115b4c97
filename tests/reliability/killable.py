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
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import threading
import time
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


def main() -> int:
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
