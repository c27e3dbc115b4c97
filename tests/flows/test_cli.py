"""The CLI as a user runs it: a subprocess, exit codes, messages, reruns, kills. Runs started
together on one store: tests/reliability/test_kill.py's four runs of tiny.yaml (every stage built
once), which cover the two runs up to dedup this file started before."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.registry import PIPELINE
from tests.conftest import REPO, TINY, TINY_STORE_TIMEOUT_S, finetuned_f1, tiny_copy

GRISTMILL = [sys.executable, "-m", "flows.cli"]
pytestmark = pytest.mark.slow


def gristmill(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*GRISTMILL, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})


def artifacts(store: Path) -> dict[str, Path]:
    """stage -> its one finished artifact folder."""
    out = {}
    for stage in ("ingest", "dedup"):
        done = [p for p in (store / stage).glob("*") if (p / "artifact.json").exists()]
        assert len(done) <= 1, done
        if done:
            out[stage] = done[0]
    return out


def snapshot(folder: Path) -> dict[str, int]:
    """Every path under a folder with its modification time, to prove nothing was touched."""
    return {str(p): p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}


@pytest.fixture(scope="module")
def built_store(tmp_path_factory) -> Path:
    """tiny.yaml run once through the CLI."""
    store = tmp_path_factory.mktemp("cli") / "store"
    proc = gristmill("run", str(TINY), "--store", str(store), "--until", "dedup")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ingest  built" in proc.stdout and "dedup   built" in proc.stdout
    return store


def test_rerun_is_cached_and_touches_nothing(built_store):
    before = {stage: snapshot(path) for stage, path in artifacts(built_store).items()}
    proc = gristmill("run", str(TINY), "--store", str(built_store), "--until", "dedup")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ingest  cached" in proc.stdout and "dedup   cached" in proc.stdout
    assert {stage: snapshot(path) for stage, path in artifacts(built_store).items()} == before


def test_a_fully_cached_rerun_does_not_start_prefects_temporary_server(built_store):
    """Nothing to build and no team server (PREFECT_API_URL unset): the CLI answers from the store
    without spending seconds starting and stopping Prefect's temporary server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([*GRISTMILL, "run", str(TINY), "--store", str(built_store), "--until", "dedup"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**env, "PREFECT_LOGGING_LEVEL": "INFO"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "ingest  cached" in proc.stdout and "dedup   cached" in proc.stdout
    assert "Prefect's temporary server not started" in out
    assert "temporary server on http" not in out, out[-2000:]


def test_a_run_against_a_team_server_does_not_import_prefects_server_app():
    """With PREFECT_API_URL set, the CLI never starts a server, so it must not pay the ~3 s of
    importing one (prefect.server.api.server) on every run."""
    code = ("import os, sys\nos.environ['PREFECT_API_URL'] = 'http://127.0.0.1:9/api'\n"
            "from flows.cli import _start_prefect_server\n_start_prefect_server()\n"
            "print(sorted(m for m in sys.modules if m.startswith('prefect.server.api')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_temporary_server_gets_two_minutes_to_start_even_in_a_process_that_read_prefects_settings(
        monkeypatch, tmp_path):
    """Prefect's 20 s is too short on a busy 2-core machine. The CLI sets the environment variable
    before Prefect reads it, which a process that imported Prefect earlier (the CLI called as
    main() from Python, as tests do) never sees: the timeout is passed to the server as well."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from flows.cli import _start_prefect_server

    timeouts = []
    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, timeout=None: timeouts.append(timeout))
    with temporary_settings({PREFECT_API_URL: None, PREFECT_HOME: tmp_path,
                             PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 20}):
        _start_prefect_server()
    assert timeouts == [120]


def test_plan_json(built_store):
    proc = gristmill("plan", str(TINY), "--store", str(built_store), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["stage"] for r in rows] == ["ingest", "dedup", "quality", "tokenizer", "pretrain", "qa", "midtrain",
                                          "sft", "dpo", "index", "reader", "eval"]
    assert all(not r["cached"] and r["reason"] == "never built" for r in rows[2:])
    for row in rows[:2]:
        assert set(row) == {"stage", "fingerprint", "cached", "reason", "path", "resolved", "from"}
        assert row["cached"] is True and row["reason"] is None and row["from"] is None
        assert Path(row["path"]) == artifacts(built_store)[row["stage"]]


def test_force_dedup_rebuilds_only_dedup(built_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(built_store, store)
    ingest_before = snapshot(artifacts(store)["ingest"])
    dedup_record = json.loads((artifacts(store)["dedup"] / "artifact.json").read_text())
    proc = gristmill("run", str(TINY), "--store", str(store), "--until", "dedup", "--force", "dedup")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ingest  cached" in proc.stdout and "dedup   built" in proc.stdout
    assert snapshot(artifacts(store)["ingest"]) == ingest_before
    after = json.loads((artifacts(store)["dedup"] / "artifact.json").read_text())
    assert after["fingerprint"] == dedup_record["fingerprint"]
    assert after["created_at"] > dedup_record["created_at"]


def test_only_without_upstream_is_exit_2(tmp_path):
    proc = gristmill("run", str(TINY), "--store", str(tmp_path / "empty"), "--only", "dedup")
    assert proc.returncode == 2
    assert "upstream stage 'ingest'" in proc.stderr and "--until ingest" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "SPEC", "--only", "nope"], "unknown stage 'nope'; stages are: ingest, dedup, quality, tokenizer"),
    (["run", "SPEC", "--force", "nope"], "unknown stage 'nope'"),
    (["plan", "missing.yaml"], "missing.yaml: spec file not found"),
])
def test_bad_arguments_are_exit_2(tmp_path, args, message):
    args = [str(TINY) if a == "SPEC" else a for a in args]
    proc = gristmill(*args, "--store", str(tmp_path / "s"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_spec_and_missing_source_are_exit_2(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ncorpus:\n  sources:\n    - kind: jsonl\n      path: none/*.jsonl\n      txt_field: t\n")
    proc = gristmill("run", str(spec), "--store", str(tmp_path / "s"))
    assert proc.returncode == 2 and "corpus.sources.0.jsonl.txt_field" in proc.stderr and str(spec) in proc.stderr
    spec.write_text("name: x\ncorpus:\n  sources:\n    - kind: jsonl\n      path: none/*.jsonl\n")
    proc = gristmill("run", str(spec), "--store", str(tmp_path / "s"))
    assert proc.returncode == 2 and "no file matches 'none/*.jsonl'" in proc.stderr


def test_source_with_every_record_rejected_is_exit_2_without_traceback(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('not json\n{"text": ""}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ncorpus:\n  sources:\n    - kind: jsonl\n      path: data/*.jsonl\n")
    proc = gristmill("run", str(spec), "--store", str(tmp_path / "s"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "corpus.sources.0 (jsonl): no documents kept: all 2 records were rejected" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_quality_filter_that_removes_everything_is_exit_2_naming_it(built_store, tmp_path):
    shutil.copytree(TINY.parent / "tiny", tmp_path / "tiny")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.read_text() + "quality:\n  filters:\n    - {name: c4, min_num_sentences: 1000}\n")
    store = tmp_path / "s"
    shutil.copytree(built_store, store)  # tiny's ingest and dedup: the same documents, the same keys
    proc = gristmill("run", str(spec), "--store", str(store), "--until", "quality")
    assert proc.returncode == 2, proc.stderr[-3000:]
    planned = {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines()[1:4]}
    assert planned == {"ingest": "cached", "dedup": "cached", "quality": "build"}, proc.stdout
    assert "quality.filters.0 (c4).min_num_sentences (1000) removed 30 of 30 documents" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_killed_during_dedup_leaves_nothing_done_and_resumes(built_store, tmp_path):
    store = tmp_path / "store"
    proc = subprocess.Popen([*GRISTMILL, "run", str(TINY), "--store", str(store), "--until", "dedup"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    # Kill once dedup's MinHash steps have started (its exact steps are done by then).
    while not list(store.glob(".work/dedup/*/logs/minhash-1-signature")):
        assert proc.poll() is None, "the run ended before dedup could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = artifacts(store)
    assert "ingest" in done and "dedup" not in done
    assert not any((p / "artifact.json").exists() for p in (store / "dedup").glob("*"))

    rerun = gristmill("run", str(TINY), "--store", str(store), "--until", "dedup")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "ingest  cached" in rerun.stdout and "dedup   built" in rerun.stdout
    # Same fingerprint and same documents as an uninterrupted run.
    resumed, clean = artifacts(store)["dedup"], artifacts(built_store)["dedup"]
    assert resumed.name == clean.name
    files = lambda p: {k: v["sha256"] for k, v in json.loads((p / "artifact.json").read_text())["files"].items()
                       if not k.startswith("logs/")}
    assert files(resumed) == files(clean)


def test_report_before_eval_is_exit_2(built_store):
    proc = gristmill("report", str(TINY), "--store", str(built_store))
    assert proc.returncode == 2 and "no report for" in proc.stderr and "gristmill run" in proc.stderr


def test_eval_with_a_bad_question_file_names_the_line(built_store, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "ok?", "answer": "yes"}\n{"question": "no answer?"}\n')
    proc = gristmill("eval", str(TINY), "--store", str(built_store), "--questions", str(questions))
    assert proc.returncode == 2
    assert f"{questions}:2: needs `answers`" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- regression gates (eval.gates)

def done_states(stdout: str) -> dict[str, str]:
    """stage -> built/cached, from the lines after "done:"."""
    rows = [line.split() for line in stdout.split("done:")[-1].splitlines()]
    return {r[0]: r[1] for r in rows if len(r) == 3 and r[0] in PIPELINE.names()}


@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_a_failed_gate_is_exit_3_and_keeps_every_artifact(tiny_store, tmp_path):
    """On a finished store (no Prefect server: the CLI's all-cached path, as a rerun takes it): a gate
    just above the real F1 fails the run with exit 3, naming gate, value and threshold; no artifact
    is touched, the report shows the gate, and a rerun with the gate met finds every stage cached."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    f1 = finetuned_f1(store)
    recall = {"metric": "retrieval.recall@5", "min": 0.0}
    failing = tiny_copy(tmp_path / "failing", eval={"gates": [{"arm": "finetuned", "metric": "f1", "min": f1 + 0.01},
                                                               recall]})
    artifacts_before = {str(p.parent): snapshot(p.parent) for p in store.glob("*/*/artifact.json")}
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cli = lambda spec: subprocess.run([*GRISTMILL, "run", str(spec), "--store", str(store)], capture_output=True,
                                      text=True, timeout=300, cwd=REPO, env={**env, "PREFECT_LOGGING_LEVEL": "WARNING"})

    proc = cli(failing)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (f"1 of 2 regression gate(s) failed (eval.gates): finetuned f1 >= {f1 + 0.01:.4g}: value {f1:.4g}, "
            f"threshold {f1 + 0.01:.4g}") in proc.stderr
    assert "every artifact is kept" in proc.stderr and "Traceback" not in proc.stderr
    assert f"report: {store / 'runs' / 'tiny' / 'report.html'}" in proc.stdout
    md = (store / "runs" / "tiny" / "report.md").read_text()
    assert "1 of 2 passed; 1 failed, so the run failed (exit code 3)." in md and "| **FAIL** |" in md
    assert {str(p.parent): snapshot(p.parent) for p in store.glob("*/*/artifact.json")} == artifacts_before

    met = tiny_copy(tmp_path / "met", eval={"gates": [{"arm": "finetuned", "metric": "f1", "min": f1}, recall]})
    proc = cli(met)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done_states(proc.stdout) == {stage: "cached" for stage in PIPELINE.names()}
    assert "2 of 2 passed." in (store / "runs" / "tiny" / "report.md").read_text()
    assert {str(p.parent): snapshot(p.parent) for p in store.glob("*/*/artifact.json")} == artifacts_before
