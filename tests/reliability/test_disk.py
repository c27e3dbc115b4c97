"""A full disk, a file-size limit and a read-only store: a clear error naming the path, nothing
half-published, and a rerun that completes once the fault is gone.

Decisions (README, RELIABILITY.md): a store that cannot be written is bad input (exit 2,
checked before anything runs; `plan` and `report` only read and still work); a full disk or
a file-size limit fails the stage (exit 1) and keeps what earlier stages built.

Real faults where the machine allows them: RLIMIT_FSIZE (EFBIG) in a child process; a small
tmpfs (ENOSPC) and a read-only bind mount (EROFS) inside `unshare -rm` (a user and mount
namespace: no root needed, nothing outlives the test). Prefect's own SQLite database cannot
run under a file-size limit, so that fault goes through tests/reliability/killable.py, not
the CLI. The same faults are also injected in-process (OSError at the write points).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from data_specs.errors import InputError, StageError
from tasks.core import runner
from tasks.core.graph import Graph
from tasks.core.store import ArtifactStore
from tests.conftest import REPO, TINY
from tests.reliability.conftest import Golden, finished, payload
from tests.reliability.test_damage import run_until, seeded


def unshare_works() -> bool:
    """Whether this machine lets a process make its own user and mount namespace."""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode == 0


needs_unshare = pytest.mark.skipif(not unshare_works(), reason="no user namespaces (unshare -rm) on this machine")


def nothing_published(store: Path, golden: Golden, stage: str) -> None:
    """No record, no artifact folder, no temp or trash folder for the stage that failed."""
    assert stage not in finished(store)
    assert not (store / stage / golden.fingerprint(stage)).exists()
    assert list((store / stage).glob(".tmp-*")) == [] and list((store / stage).glob(".trash-*")) == []


# ---------------------------------------------------------------- injected in-process


def test_no_space_writing_the_record_publishes_nothing(golden, tmp_path, monkeypatch):
    """ENOSPC at the last write of a publish (the record, after the folder was renamed into place)."""
    store = seeded(golden, tmp_path, "ingest", "dedup", "quality")
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == ".artifact.json.tmp":
            write_text(self, "{\"stage\": ")  # the disk filled up part way through
            raise OSError(errno.ENOSPC, "No space left on device")  # a write() names no file
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(StageError) as e:
        run_until(store, "tokenizer")
    final = store / "tokenizer" / golden.fingerprint("tokenizer")
    assert str(e.value).startswith(f"stage 'tokenizer' failed: no space left on the device writing {final}; "
                                   "nothing of it was published")
    nothing_published(store, golden, "tokenizer")
    monkeypatch.undo()
    assert run_until(store, "tokenizer")["tokenizer"] == "built"
    assert payload(finished(store)["tokenizer"]) == payload(golden.records["tokenizer"])


def test_no_space_during_a_build_names_the_file(golden, tmp_path, monkeypatch):
    store = seeded(golden, tmp_path, "ingest", "dedup", "quality")
    real = Graph.get

    def failing_build(cfg, inputs, out, ctx):
        (out / "train.jsonl").write_text("{\"question\": ")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.jsonl"))

    monkeypatch.setattr(Graph, "get", lambda g, n: replace(real(g, n), build=failing_build) if n == "qa" else real(g, n))
    with pytest.raises(StageError, match=r"stage 'qa' failed: no space left on the device writing .*/qa/\.tmp-[0-9a-f]+-"
                                         r"[0-9a-f]+/train\.jsonl; nothing of it was published"):
        run_until(store, "qa")
    nothing_published(store, golden, "qa")


def test_read_only_store_mid_run_is_bad_input_naming_the_store(golden, tmp_path, monkeypatch):
    store = seeded(golden, tmp_path, "ingest", "dedup", "quality")
    plan = runner.prepare_run(TINY, str(store), until="tokenizer")  # writable when the run started

    def read_only(self, stage, fingerprint):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(self.root) / stage / f".tmp-{fingerprint}-x"))

    monkeypatch.setattr(ArtifactStore, "new_build_dir", read_only)
    with pytest.raises(InputError, match=rf"stage 'tokenizer': the store {store} is not writable \(read-only file "
                                         rf"system: {store}/tokenizer/\.tmp-"):
        for item in plan.stages:
            runner.execute(item, plan.spec, plan.store)
    nothing_published(store, golden, "tokenizer")


# ---------------------------------------------------------------- real faults


def test_file_size_limit_fails_the_stage_with_the_file_and_a_rerun_completes(golden, tmp_path):
    """RLIMIT_FSIZE 40 kB: tokenizer.json (55 kB, written by the Rust tokenizers library) fails with EFBIG."""
    store = seeded(golden, tmp_path, "ingest", "dedup", "quality")
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.killable", str(TINY), str(store), "tokenizer",
                           "--fsize-limit", "40000"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"gristmill: stage 'tokenizer' failed: file too large (a file-size limit was reached) "
                              f"writing {store}/tokenizer/.tmp-"), message
    assert message.split(" writing ")[1].split(";")[0].endswith("tokenizer.json")
    nothing_published(store, golden, "tokenizer")
    assert run_until(store, "tokenizer")["tokenizer"] == "built"
    assert payload(finished(store)["tokenizer"]) == payload(golden.records["tokenizer"])


def test_torch_write_error_without_errno_is_diagnosed_as_the_size_limit(tmp_path):
    """torch reports a refused write as "unexpected pos ..." with no errno and no path."""
    code = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from tasks.core.faults import diagnose\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
        f"out = Path({str(tmp_path)!r})\n"
        "try:\n"
        "    torch.save(torch.zeros(100_000), out / 'checkpoint.tmp')\n"
        "except Exception as e:\n"
        "    f = diagnose(e, out, [out])\n"
        "    print(type(e).__name__, f.errno, f.path)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["RuntimeError", str(errno.EFBIG), str(tmp_path / "checkpoint.tmp")]


IN_NAMESPACE = """
import json, os, shutil, subprocess, sys
store, seed, keep, result, tiny, mode = sys.argv[1:7]
os.makedirs(store, exist_ok=True)
env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
def cli(*args):
    p = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env)
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
out = {}
if mode == "full":
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", store], check=True)
    shutil.copytree(seed, store, dirs_exist_ok=True)
    filler = os.path.join(store, "filler")
    with open(filler, "wb") as f:  # leaves 16 KiB: enough for small files, not for tokenizer.json
        f.write(bytes(shutil.disk_usage(store).free - 16384))
    out["full"] = cli("run", tiny, "--store", store, "--until", "tokenizer")
    out["after_full"] = sorted(os.path.relpath(os.path.join(d, n), store) for d, ds, fs in os.walk(store) for n in ds + fs)
    os.remove(filler)
    out["rerun"] = cli("run", tiny, "--store", store, "--until", "tokenizer")
else:
    shutil.copytree(seed, store, dirs_exist_ok=True)
    subprocess.run(["mount", "--bind", store, store], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", store], check=True)
    out["run"] = cli("run", tiny, "--store", store, "--until", "dedup")
    out["plan"] = cli("plan", tiny, "--store", store, "--json")
shutil.copytree(store, keep)
json.dump(out, open(result, "w"))
"""


def in_namespace(mode: str, golden: Golden, tmp_path: Path, *stages: str) -> tuple[dict, Path]:
    """Runs IN_NAMESPACE under `unshare -rm`; its CLI results, and a copy of the store it left."""
    seed = seeded(golden, tmp_path / "seed", *stages)
    keep, result = tmp_path / "kept", tmp_path / "result.json"
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", IN_NAMESPACE, str(tmp_path / "store"), str(seed),
                           str(keep), str(result), str(TINY), mode], cwd=REPO, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text()), keep


@pytest.mark.slow
@needs_unshare
def test_full_disk_through_the_cli(golden, tmp_path):
    out, kept = in_namespace("full", golden, tmp_path, "ingest", "dedup", "quality")
    store = tmp_path / "store"
    assert out["full"]["rc"] == 1, out["full"]["stderr"][-3000:]
    message = out["full"]["stderr"].strip().splitlines()[-1]
    assert message.startswith(f"gristmill: stage 'tokenizer' failed: no space left on the device writing "
                              f"{store}/tokenizer/.tmp-"), message
    assert "nothing of it was published" in message
    fp = golden.fingerprint("tokenizer")
    assert not any(p.startswith(f"tokenizer/{fp}") or "/.tmp-" in p for p in out["after_full"]), out["after_full"]
    assert out["rerun"]["rc"] == 0, out["rerun"]["stderr"][-3000:]
    assert "tokenizer  built" in out["rerun"]["stdout"]
    assert payload(finished(kept)["tokenizer"]) == payload(golden.records["tokenizer"])


@pytest.mark.slow
@needs_unshare
def test_read_only_store_is_exit_2_before_anything_runs(golden, tmp_path):
    out, kept = in_namespace("read-only", golden, tmp_path, "ingest", "dedup")
    store = tmp_path / "store"
    assert out["run"]["rc"] == 2, out["run"]["stderr"][-3000:]
    stderr = out["run"]["stderr"]
    assert stderr.startswith(f"gristmill: error: the store {store} is not writable (Read-only file system: {store}/"), stderr
    assert "Traceback" not in stderr
    assert out["plan"]["rc"] == 0  # plan only reads
    rows = {r["stage"]: r for r in json.loads(out["plan"]["stdout"])}
    assert rows["ingest"]["cached"] and rows["dedup"]["cached"] and not rows["tokenizer"]["cached"]
    assert set(finished(kept)) == {"ingest", "dedup"}
