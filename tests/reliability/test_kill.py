"""SIGKILL trials across every stage of tiny.yaml, and four runs started together.

Each trial copies the golden store's upstream artifacts into a fresh store, runs up to one
stage, SIGKILLs the whole process group at a seeded moment of that stage, checks that nothing
half-written counts as done, reruns, and compares with the uninterrupted run. Kill points:
  timed            a seeded fraction of the stage's golden wall time after its build starts
  checkpoint       a seeded moment after a training stage's first complete checkpoint
  checkpoint-save  in the middle of writing a checkpoint (the loop's checkpoint.tmp written,
                   not yet renamed over the first one)
  publish          after the build folder is renamed into place, before artifact.json
Most trials run through tests/reliability/killable.py (tasks.core.runner without Prefect: the
CLI's start-up costs seconds), each in a process of its own forked from one that has already
imported the stages' libraries (`killable --serve`); the `cli` one runs the real `gristmill`
command and is killed from outside, and their reruns and plans go through the CLI too.

GRISTMILL_KILL_TRIALS (default 17: one round) and GRISTMILL_KILL_SEED (default 8) set the trials; the
seeds, kill points and outcomes are printed (pytest -s) and written to kill-trials.json in
the test's temp folder, or to GRISTMILL_KILL_REPORT when set.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, TINY, FourRuns
from tests.reliability.conftest import (
    DETERMINISTIC,
    STAGES,
    TRAINING,
    Golden,
    finished,
    gristmill,
    leftovers,
    needs,
    payload,
)
from tests.reliability.killable import Warm

pytestmark = pytest.mark.slow

# One round of trials, (stage, kill point, how): every stage, and every kill point, at least once;
# the cheap stages at both of theirs. A publish kill is the runner's one window, whichever stage:
# the data stages have it (a model stage's costs a whole build more). The loop's checkpoint kill
# is pretrain's and its checkpoint-save kill midtrain's (both run the same loop); sft's TRL
# checkpoint-save kill is test_trl_checkpoint_killed_mid_save_resumes. One trial goes through
# the real CLI (its Prefect server and flow-run processes killed with it; it costs ~30 s of
# start-ups on 2 cores): tests/flows/test_cli.py kills a CLI run during dedup as well. A soak run
# (GRISTMILL_KILL_TRIALS above one round, `make soak`) takes the other points of every stage.
ROUND = (
    ("ingest", "timed", "runner"), ("ingest", "publish", "runner"),
    ("dedup", "timed", "runner"), ("dedup", "publish", "runner"),
    ("quality", "timed", "runner"), ("quality", "publish", "runner"),
    ("tokenizer", "publish", "runner"), ("tokenizer", "timed", "runner"),
    ("qa", "publish", "runner"), ("qa", "timed", "runner"),
    ("pretrain", "checkpoint", "cli"), ("midtrain", "checkpoint-save", "runner"),
    ("sft", "checkpoint", "runner"), ("reader", "checkpoint", "runner"),
    ("dpo", "timed", "runner"), ("index", "timed", "runner"), ("eval", "timed", "runner"),
)
TRIALS = int(os.environ.get("GRISTMILL_KILL_TRIALS", str(len(ROUND))))
SEED = int(os.environ.get("GRISTMILL_KILL_SEED", "8"))
# Later rounds (a soak run) go through killable.py and take each stage's kill points in turn: a
# stage that is in ROUND once gets KINDS[stage][(round + 1) % len] in round `round`, so the
# second round gives each of them a point the first did not.
KINDS = {
    "ingest": ("timed", "publish"), "dedup": ("timed", "publish"), "quality": ("timed", "publish"),
    "tokenizer": ("publish", "timed"),
    "pretrain": ("checkpoint", "checkpoint-save", "timed"), "qa": ("publish", "timed"),
    "midtrain": ("checkpoint-save", "timed", "checkpoint"), "sft": ("timed", "checkpoint"),
    "reader": ("timed", "checkpoint"),
    "dpo": ("publish", "timed"), "index": ("publish", "timed"), "eval": ("publish", "timed"),
}
# The metric a resumed training stage must end on, as the uninterrupted run did (to 1e-3).
FINAL_LOSS = {"pretrain": "val_loss_final", "midtrain": "val_loss_final", "sft": "val_loss_final",
              "reader": "val_loss_final", "dpo": "loss_final"}
ATTEMPTS = 3  # a timed kill that lands after the stage finished is retried, earlier each time
RESULTS: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Trial:
    """One kill: which stage, at which kind of point, how, and where in the window (seeded)."""

    index: int
    stage: str
    kind: str
    via: str
    fraction: float

    @property
    def id(self) -> str:
        return f"{self.index:02d}-{self.stage}-{self.kind}-{self.via}"


def schedule(n: int, seed: int) -> list[Trial]:
    """n trials, round after round of ROUND in a seeded order, each with a seeded fraction."""
    rng = random.Random(seed)
    trials: list[Trial] = []
    for rnd in range(-(-n // len(ROUND))):
        seen: dict[str, int] = {}
        for stage, kind, via in rng.sample(ROUND, len(ROUND)):
            if rnd > 0:
                seen[stage] = seen.get(stage, 0) + 1
                kinds = KINDS[stage]
                kind, via = kinds[(rnd + seen[stage]) % len(kinds)], "runner"
            trials.append(Trial(len(trials), stage, kind, via, round(rng.random(), 4)))
    return trials[:n]


def delay(trial: Trial, golden: Golden) -> float:
    """Seconds from the start of the kill window to the kill (0 for the exact kill points)."""
    wall = golden.wall_s(trial.stage)
    if trial.kind == "timed":
        return trial.fraction * 0.9 * wall
    if trial.kind == "checkpoint":  # the first checkpoint is at 1/4 to 2/5 of every tiny training stage
        return trial.fraction * 0.3 * wall
    return 0.0


# ---------------------------------------------------------------- running and killing


def kill_with_runner(warm: Warm, trial: Trial, store: Path, seconds: float) -> int:
    """Runs killable.py up to the trial's stage with its kill point armed (in a process forked from
    `warm`); its exit code."""
    flag = {"timed": ["--kill-after", f"{seconds:.4f}"], "checkpoint": ["--kill-after-checkpoint", f"{seconds:.4f}"],
            "checkpoint-save": ["--kill-in-checkpoint-save"], "publish": ["--kill-at-publish"]}[trial.kind]
    code, err = warm.run([str(TINY), str(store), trial.stage, *flag], store.parent)
    assert code in (0, -signal.SIGKILL), err[-3000:]
    return code


def window_open(trial: Trial, store: Path, fingerprint: str) -> bool:
    """The CLI run has reached the trial's kill window (seen from outside, in the store)."""
    if trial.kind == "checkpoint":
        work = store / ".work" / trial.stage / fingerprint
        return (work / "checkpoint.pt").exists() or any(work.glob("trainer/checkpoint-*/trainer_state.json"))
    return any((store / trial.stage).glob(f".tmp-{fingerprint}-*"))


def kill_cli(trial: Trial, store: Path, fingerprint: str, seconds: float) -> int:
    """Runs the real CLI up to the trial's stage and SIGKILLs its process group from outside."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(TINY), "--store", str(store),
                             "--until", trial.stage], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
    deadline = time.monotonic() + 900
    while not window_open(trial, store, fingerprint):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    else:
        time.sleep(seconds)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return proc.returncode


# ---------------------------------------------------------------- checks


def check_killed_state(trial: Trial, store: Path, golden: Golden) -> None:
    """Nothing half-written counts as done, and `plan` says so."""
    from data_specs.loader import load_spec
    from tasks.core.runner import plan
    from tasks.core.store import ArtifactStore

    done = finished(store)  # every folder with an artifact.json is complete and intact
    assert trial.stage not in done
    fp = golden.fingerprint(trial.stage)
    if trial.kind == "publish":  # the kill landed between the rename and the record
        assert (store / trial.stage / fp).is_dir() and not (store / trial.stage / fp / "artifact.json").exists()
    if trial.kind == "checkpoint-save":
        work = store / ".work" / trial.stage / fp
        if trial.stage in ("sft", "dpo"):  # TRL: a checkpoint folder without its trainer state
            assert [p for p in work.glob("trainer/checkpoint-*") if not (p / "trainer_state.json").exists()]
        else:  # the loop: the second checkpoint written, the first still in place
            assert (work / "checkpoint.pt").exists() and (work / "checkpoint.tmp").exists()
    if trial.via == "cli":
        proc = gristmill("plan", str(TINY), "--store", str(store), "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = json.loads(proc.stdout)
    else:
        rows = [r.as_json() for r in plan(load_spec(TINY), ArtifactStore(store))]
    assert {r["stage"] for r in rows if r["cached"]} == set(done)
    assert {r["stage"]: r["fingerprint"] for r in rows} == {s: golden.fingerprint(s) for s in STAGES}


def done_lines(stdout: str) -> list[tuple[str, str, str]]:
    """(stage, built/cached, path) from the `done:` block a `gristmill run` prints."""
    words = stdout.split("done:")[1].split("report:")[0].split()
    return [(words[i], words[i + 1], words[i + 2]) for i in range(0, len(words), 3)]


def rerun(trial: Trial, store: Path) -> dict[str, str]:
    """Runs up to the trial's stage again (the CLI for cli trials); stage -> built/cached."""
    if trial.via == "cli":
        proc = gristmill("run", str(TINY), "--store", str(store), "--until", trial.stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {stage: state for stage, state, _ in done_lines(proc.stdout)}
    from tasks.core.runner import execute, prepare_run

    run = prepare_run(TINY, str(store), until=trial.stage)
    return {item.name: execute(item, run.spec, run.store).state for item in run.stages}


def check_recovered(trial: Trial, store: Path, golden: Golden, states: dict[str, str]) -> dict[str, Any]:
    """The rerun built the stage, matches the uninterrupted run, and left nothing behind."""
    wanted = needs(trial.stage) | {trial.stage}
    assert states[trial.stage] == "built" and all(states[s] == "cached" for s in wanted - {trial.stage})
    done = finished(store)
    assert {s: r["fingerprint"] for s, r in done.items()} == {s: golden.fingerprint(s) for s in wanted}
    assert leftovers(store) == []
    record, clean = done[trial.stage], golden.records[trial.stage]
    if trial.stage in DETERMINISTIC:
        assert payload(record) == payload(clean), "a deterministic stage differs from the uninterrupted run"
    metrics = record["metrics"]
    if trial.stage in TRAINING:  # the data order depends on the step only: a resumed run ends where a clean one does
        assert metrics["steps"] == clean["metrics"]["steps"]
        loss = FINAL_LOSS[trial.stage]
        assert metrics[loss] == pytest.approx(clean["metrics"][loss], abs=1e-3)
    if trial.kind in ("checkpoint", "checkpoint-save"):
        assert metrics["resumed_from_step"] > 0
    return {"resumed_from_step": metrics.get("resumed_from_step"),
            "identical_payload": payload(record) == payload(clean)}


@pytest.fixture(scope="module")
def warm() -> Iterator[Warm]:
    """A process that has imported what the stages import, to fork each trial's run from: the
    trials are about the store, and 20 of them would otherwise pay ~11 s of imports each."""
    server = Warm(REPO)
    yield server
    server.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Collects every trial's outcome; printed and written to JSON after the last trial."""
    yield RESULTS
    path = Path(os.environ.get("GRISTMILL_KILL_REPORT") or tmp_path_factory.mktemp("kill") / "kill-trials.json")
    path.write_text(json.dumps({"seed": SEED, "trials": RESULTS}, indent=2))
    print(f"\nkill trials (seed {SEED}), written to {path}:")
    for r in RESULTS:
        print(f"  {r['id']:<36} fraction {r['fraction']:.3f}  delay {r['delay_s']:6.2f} s  attempts {r['attempts']}  "
              f"resumed_from_step {r['resumed_from_step']}  identical {r['identical_payload']}  {r['wall_s']:.1f} s")


@pytest.mark.parametrize("trial", schedule(TRIALS, SEED), ids=lambda t: t.id)
def test_killed_run_recovers(trial: Trial, golden: Golden, report: list, warm: Warm, tmp_path: Path) -> None:
    start = time.perf_counter()
    for attempt in range(1, ATTEMPTS + 1):
        store = tmp_path / f"store-{attempt}"
        golden.seed_store(store, needs(trial.stage))
        seconds = delay(trial, golden)
        if trial.via == "cli":
            code = kill_cli(trial, store, golden.fingerprint(trial.stage), seconds)
        else:
            code = kill_with_runner(warm, trial, store, seconds)
        if code == -signal.SIGKILL and trial.stage not in finished(store):
            break
        # The stage finished before the kill (a busy machine runs faster or slower than the
        # golden run, and a trial forked from the warm process skips the imports the golden
        # stage's wall time includes): try again, earlier in the window; the last try kills as
        # the build starts (tokenizer's build is ~0.1 s, its golden wall time ~0.8 s).
        trial = replace(trial, fraction=trial.fraction / 2 if attempt < ATTEMPTS - 1 else 0.0)
    else:
        pytest.fail(f"{trial.id}: the stage finished before the kill in all {ATTEMPTS} attempts")
    check_killed_state(trial, store, golden)
    outcome = check_recovered(trial, store, golden, rerun(trial, store))
    report.append({**asdict(trial), "id": trial.id, "seed": SEED, "attempts": attempt, "delay_s": seconds,
                   "wall_s": time.perf_counter() - start, **outcome})


def test_four_runs_started_together(four_runs: FourRuns, golden: Golden) -> None:
    """Four `gristmill run` of tiny.yaml started together on one store: all succeed, each stage
    is built by exactly one of them, all report the same artifacts, nothing stray is left."""
    assert [code for code, _, _ in four_runs.outputs] == [0] * 4, [err[-2000:] for _, _, err in four_runs.outputs]
    reported = [done_lines(out) for _, out, _ in four_runs.outputs]
    assert all([(s, p) for s, _, p in r] == [(s, p) for s, _, p in reported[0]] for r in reported)
    assert sorted(stage for r in reported for stage, state, _ in r if state == "built") == sorted(STAGES)
    store = four_runs.store
    done = finished(store)  # one finished artifact per stage, every file as its record says
    assert [Path(path) for _, _, path in reported[0]] == [store / s / done[s]["fingerprint"] for s in STAGES]
    assert {s: r["fingerprint"] for s, r in done.items()} == {s: golden.fingerprint(s) for s in STAGES}
    assert leftovers(store) == []
    assert sorted(p.name for p in store.iterdir()) == sorted([".locks", ".work", "runs", *STAGES])


def test_trl_checkpoint_killed_mid_save_resumes(golden: Golden, warm: Warm, tmp_path: Path) -> None:
    trial = Trial(TRIALS, "sft", "checkpoint-save", "runner", 0.0)
    store = tmp_path / "store"
    golden.seed_store(store, needs("sft"))
    assert kill_with_runner(warm, trial, store, 0.0) == -signal.SIGKILL
    check_killed_state(trial, store, golden)
    check_recovered(trial, store, golden, rerun(trial, store))
