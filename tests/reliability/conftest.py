"""What the fault tests share: one uninterrupted tiny.yaml run (the golden store), and checks of
a store that do not trust the code under test (files are hashed here, with hashlib)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks.registry import PIPELINE
from tests.conftest import REPO, seed_store

STAGES = tuple(PIPELINE.names())
# Stages whose output depends only on their inputs: a rerun after a kill must give the same bytes.
# datatrove's logs/ (timings, dates) are provenance, not output, and are left out.
DETERMINISTIC = ("ingest", "dedup", "quality", "tokenizer", "qa", "index")
TRAINING = ("pretrain", "midtrain", "sft", "dpo", "reader")


@dataclass(frozen=True)
class Golden:
    """The store of one uninterrupted run, with what each stage's artifact.json says."""

    store: Path
    records: dict[str, dict[str, Any]]  # stage -> its artifact.json

    def fingerprint(self, stage: str) -> str:
        return self.records[stage]["fingerprint"]

    def wall_s(self, stage: str) -> float:
        return float(self.records[stage]["wall_s"])

    def seed_store(self, store: Path, stages: set[str]) -> None:
        """Copies the golden artifacts of `stages` into a fresh store."""
        seed_store(self.store, store, stages)


def needs(stage: str) -> set[str]:
    """Every stage that `stage` reads, directly or not."""
    from tasks.registry import PIPELINE

    return PIPELINE.ancestors(stage)


def payload(record: dict[str, Any]) -> dict[str, str]:
    """relative path -> sha256 of an artifact's output files (datatrove's logs left out)."""
    return {rel: f["sha256"] for rel, f in record["files"].items() if not rel.startswith("logs/")}


def finished(store: Path) -> dict[str, dict[str, Any]]:
    """stage -> the artifact.json of its one finished artifact, after checking that every such
    folder holds every file its record lists with the recorded size and sha256 (hashed here)."""
    done: dict[str, dict[str, Any]] = {}
    for stage_dir in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in sorted(p for p in stage_dir.iterdir() if not p.name.startswith(".")):
            if not (folder / "artifact.json").exists():
                continue
            record = json.loads((folder / "artifact.json").read_text())
            assert (record["stage"], record["fingerprint"]) == (stage_dir.name, folder.name), folder
            for rel, want in record["files"].items():
                data = (folder / rel).read_bytes()
                assert len(data) == want["bytes"], f"{folder / rel}: {len(data)} bytes, recorded {want['bytes']}"
                assert hashlib.sha256(data).hexdigest() == want["sha256"], f"{folder / rel}: sha256 differs"
            assert stage_dir.name not in done, f"two finished {stage_dir.name} artifacts in {store}"
            done[stage_dir.name] = record
    return done


def leftovers(store: Path, stages: tuple[str, ...] = STAGES) -> list[str]:
    """Temp build folders, trash and scratch that a finished run should not leave behind."""
    found = [str(p) for stage in stages for pattern in (".tmp-*", ".trash-*") for p in (store / stage).glob(pattern)]
    found += [str(p) for stage in stages for p in (store / ".work" / stage).glob("*") if p.name != "_shared"]
    return found


def gristmill(*args: str, timeout: float = 900, **kwargs: Any) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (Prefect's progress lines kept quiet)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}, check=False,
                          **kwargs)


@pytest.fixture(scope="session")
def golden(tiny_store: Path) -> Golden:
    """An uninterrupted tiny.yaml store (tests/conftest.py's `tiny_store`: the one the four
    simultaneous runs built when this session runs them, so it is checked twice; a run killed in
    a trial is compared with it, stage by stage), its every artifact checked intact here."""
    records = finished(tiny_store)
    assert set(records) == set(STAGES)
    return Golden(tiny_store, records)
