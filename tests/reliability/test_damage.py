"""Artifacts damaged after they were published (a file truncated, changed or deleted, a torn
record) are detected on use through artifact.json, moved aside to .damaged/, and rebuilt.

The policy (README, RELIABILITY.md): `plan` and a cached stage check sizes (one stat per file);
a build checks the sha256 of every upstream artifact it reads. So a same-size change to the
last stage of a run is caught the next time a build reads it, not by `plan`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_specs.loader import load_spec
from tasks.core.runner import execute, plan, prepare_run
from tasks.core.store import ArtifactStore, now_iso
from tests.conftest import TINY
from tests.reliability.conftest import Golden, finished, gristmill, leftovers, payload


def seeded(golden: Golden, tmp_path: Path, *stages: str) -> Path:
    store = tmp_path / "store"
    golden.seed_store(store, set(stages))
    return store


def artifact(store: Path, golden: Golden, stage: str) -> Path:
    return store / stage / golden.fingerprint(stage)


def run_until(store: Path, stage: str) -> dict[str, str]:
    """tasks.core.runner up to `stage` (what the flow calls); stage -> built/cached."""
    run = prepare_run(TINY, str(store), until=stage)
    return {item.name: execute(item, run.spec, run.store).state for item in run.stages}


def plan_rows(store: Path) -> dict[str, dict]:
    return {r.name: r.as_json() for r in plan(load_spec(TINY), ArtifactStore(store))}


def moved_aside(store: Path, stage: str) -> list[Path]:
    return sorted((store / ".damaged" / stage).glob("*"))


@pytest.mark.slow
def test_truncated_file_shows_in_plan_and_is_rebuilt_through_the_cli(golden, tmp_path):
    store = seeded(golden, tmp_path, "ingest", "dedup", "quality", "tokenizer")
    damaged = artifact(store, golden, "tokenizer") / "tokenizer" / "tokenizer.json"
    size = damaged.stat().st_size
    os.truncate(damaged, 100)

    proc = gristmill("plan", str(TINY), "--store", str(store), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = {r["stage"]: r for r in json.loads(proc.stdout)}["tokenizer"]
    assert row["cached"] is False
    assert row["reason"] == f"damaged: tokenizer/tokenizer.json: 100 bytes, artifact.json says {size}"

    proc = gristmill("run", str(TINY), "--store", str(store), "--until", "tokenizer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenizer  built" in proc.stdout
    [aside] = moved_aside(store, "tokenizer")
    assert aside.name.startswith(golden.fingerprint("tokenizer") + "-")
    assert (aside / "tokenizer" / "tokenizer.json").stat().st_size == 100  # kept as found, for inspection
    warning = f"tokenizer: artifact {artifact(store, golden, 'tokenizer')} is damaged (tokenizer/tokenizer.json: 100 bytes"
    assert warning in proc.stderr and f"moved aside to {aside}" in proc.stderr
    assert payload(finished(store)["tokenizer"]) == payload(golden.records["tokenizer"])


def test_changed_upstream_byte_is_caught_by_its_sha256_before_a_build_reads_it(golden, tmp_path, gristmill_log):
    store = seeded(golden, tmp_path, "ingest", "dedup")
    [docs] = sorted((artifact(store, golden, "dedup") / "documents").glob("*"))
    data = bytearray(docs.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only a checksum sees it
    docs.write_bytes(bytes(data))
    assert plan_rows(store)["dedup"]["cached"] is True  # plan checks sizes only (see the policy)

    states = run_until(store, "quality")  # quality reads dedup: its sha256 is checked first
    assert states == {"ingest": "cached", "dedup": "cached", "quality": "built"}
    rel = docs.relative_to(artifact(store, golden, "dedup")).as_posix()
    assert f"is damaged ({rel}: sha256 " in gristmill_log.text and "artifact.json says" in gristmill_log.text
    [aside] = moved_aside(store, "dedup")
    assert (aside / rel).read_bytes() == bytes(data)
    done = finished(store)
    assert payload(done["dedup"]) == payload(golden.records["dedup"])  # rebuilt as it was
    assert payload(done["quality"]) == payload(golden.records["quality"])
    assert leftovers(store) == []


def test_deleted_file_is_rebuilt_with_what_reads_it(golden, tmp_path, gristmill_log):
    store = seeded(golden, tmp_path, "ingest", "dedup")
    removed = artifact(store, golden, "ingest") / "documents"
    victim = min(removed.glob("*"))
    rel = victim.relative_to(artifact(store, golden, "ingest")).as_posix()
    victim.unlink()
    rows = plan_rows(store)
    assert rows["ingest"]["reason"] == f"damaged: {rel}: missing"
    assert rows["dedup"]["cached"] is True  # its own files are intact; its fingerprint is unchanged

    assert run_until(store, "dedup") == {"ingest": "built", "dedup": "cached"}
    assert f"({rel}: missing)" in gristmill_log.text
    assert payload(finished(store)["ingest"]) == payload(golden.records["ingest"])
    assert len(moved_aside(store, "ingest")) == 1


@pytest.mark.parametrize("record", ['{"stage": "ingest", "finger', "[]", "FOREIGN"], ids=["torn", "not-a-record", "foreign"])
def test_unusable_record_is_not_done_and_is_moved_aside(golden, tmp_path, record):
    store = seeded(golden, tmp_path, "ingest", "tokenizer")
    path = artifact(store, golden, "ingest") / "artifact.json"
    if record == "FOREIGN":  # a record copied from another artifact's folder
        record = (artifact(store, golden, "tokenizer") / "artifact.json").read_text()
    path.write_text(record)
    reason = plan_rows(store)["ingest"]["reason"]
    assert reason.startswith("damaged: artifact.json ")
    assert ("is the record of tokenizer/" in reason) if "tokenizer" in record else ("unreadable" in reason)
    assert ArtifactStore(store).load("ingest", golden.fingerprint("ingest")) is None
    assert run_until(store, "ingest") == {"ingest": "built"}
    assert (moved_aside(store, "ingest")[0] / "artifact.json").read_text() == record
    assert payload(finished(store)["ingest"]) == payload(golden.records["ingest"])


def test_record_paths_outside_the_artifact_are_damage(tmp_path):
    """A record cannot make the checks read (or vouch for) a file outside its folder."""
    from tasks.core.store import ArtifactRecord

    store = ArtifactStore(tmp_path / "store")
    (tmp_path / "secret").write_text("x")
    build = store.new_build_dir("s", "f1")
    (build / "a.txt").write_text("a")
    record = ArtifactRecord(stage="s", fingerprint="f1", run_name="r", key={}, metrics={}, wall_s=0.0, versions={},
                            created_at=now_iso(), files={"a.txt": {"sha256": "0" * 64, "bytes": 1},
                                                         "../../secret": {"sha256": "0" * 64, "bytes": 1}})
    store.publish(build, record)
    assert store.verify(record, deep=True) == ["../../secret: path outside the artifact",
                                              "a.txt: sha256 ca978112ca1bbdca…, artifact.json says 0000000000000000…"]
