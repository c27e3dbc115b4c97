"""Leases across machines sharing one store (tasks/core/lease.py): create-if-absent on a folder
and on S3 (moto's server), one build among racing workers, takeover of a dead holder's lease,
heartbeats that keep a long build's lease, a lost lease noticed before publishing, and the CLI.

A "machine" here is a process (tests/tasks/core/lease_worker.py) or, for the runner, an
ArtifactStore with a local cache (and so file locks) of its own."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data_specs.errors import InputError, StageError
from data_specs.schema import LeaseSpec
from tasks.core.keys import content_inputs, resolved_part, spec_part
from tasks.core.lease import LeaseInfo, LeaseLost, build_once, clear_lease, lease_rel, list_leases
from tasks.core.objects import objects_of
from tasks.core.runner import execute, plan
from tasks.core.store import ArtifactStore
from tests.conftest import REPO, S3_BUCKET
from tests.tasks.core import lease_worker
from tests.tasks.core.lease_worker import GRAPH, STAGE, publish_stub


def s3_url(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """An empty prefix in the bucket of this module's moto server, which this process now talks to."""
    from s3fs import S3FileSystem

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    S3FileSystem.clear_instance_cache()  # one cached by an earlier test would talk to another server
    return f"s3://{S3_BUCKET}/{tmp_path.name}"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path, monkeypatch) -> str:
    """An empty store: a folder, or a prefix in a bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return s3_url(request.getfixturevalue("s3_env"), monkeypatch, tmp_path)


def ready(store: ArtifactStore, fingerprint: str):
    return lambda: "cached" if store.load(STAGE, fingerprint) is not None else None


def start_worker(store_url: str, fingerprint: str, home: Path, *flags: str) -> subprocess.Popen:
    """A lease_worker process: another machine (its own HOME, so its own local cache)."""
    return subprocess.Popen([sys.executable, "-m", "tests.tasks.core.lease_worker", store_url, fingerprint, *flags],
                            cwd=REPO, env={**os.environ, "HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def holding(worker: subprocess.Popen) -> str:
    """Waits until a worker holds its lease; the lease's owner."""
    line = worker.stdout.readline()
    assert line, worker.stderr.read()[-2000:]
    return json.loads(line)["holding"]


def test_objects_are_created_only_if_absent_and_changed_only_if_unchanged(store_url):
    objects = objects_of(ArtifactStore(store_url))
    rel = f"{STAGE}/.lease-f0"
    assert objects.read(rel) is None
    first = objects.create(rel, b"one")
    assert first is not None and objects.create(rel, b"two") is None
    assert objects.read(rel).body == b"one" and objects.read(rel).version == first
    assert objects.replace(rel, b"three", "not-its-version") is None
    second = objects.replace(rel, b"three", first)
    assert second not in (None, first) and objects.read(rel).body == b"three"
    assert not objects.delete(rel, first) and objects.read(rel).body == b"three"  # changed since `first`
    assert objects.glob("*/.lease-*") == [rel]
    assert objects.delete(rel, second) and objects.read(rel) is None
    assert objects.replace(rel, b"four", second) is None and objects.read(rel) is None  # gone: not rewritten
    assert not objects.delete(rel, second)
    assert objects.create(rel, b"five") is not None


def test_stores_without_conditional_writes_are_bad_input_naming_lease_null(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"leases need a local folder or an s3:// store .* `lease: null`"):
        objects_of(ArtifactStore("memory://gristmill-lease/store", local_cache=tmp_path / "cache"))

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # what link(2) says where there are no hard links
    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(InputError, match=r"cannot hard-link files .* set `lease: null`"):
        objects_of(ArtifactStore(tmp_path / "store")).create(f"{STAGE}/.lease-f0", b"x")


def test_two_workers_racing_for_one_fingerprint_build_it_once(store_url, tmp_path):
    workers = [start_worker(store_url, "f1", tmp_path / f"machine{i}", "--build-s", "2") for i in range(2)]
    outputs = [w.communicate(timeout=60) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    states = {json.loads(out.splitlines()[-1])["state"]: (out, err) for out, err in outputs}
    assert sorted(states) == ["built", "cached"], outputs
    # The second found the first's live lease and waited for its artifact.
    assert "stub: waiting for f1, which host " in states["cached"][1], states["cached"][1][-2000:]
    store = ArtifactStore(store_url)
    assert store.load(STAGE, "f1").metrics["builder"] == json.loads(states["built"][0].splitlines()[0])["holding"]
    assert list_leases(store) == []  # released after publishing


def take_over_after_kill(url: str, fp: str, machine: Path, expiry: int, *flags: str) -> tuple[str, int, str, float, ArtifactStore]:
    """A worker takes the lease of `fp` and is SIGKILLed mid-build; then this process builds `fp`.
    (the killed owner, its pid, the build's state, seconds this process waited, the store)."""
    worker = start_worker(url, fp, machine, "--expiry", str(expiry), "--build-s", "600", *flags)
    owner = holding(worker)
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=30)
    store = ArtifactStore(url)
    start = time.monotonic()
    state = build_once(store, STAGE, fp, LeaseSpec(expiry_s=expiry), ready=ready(store, fp),
                       build=lambda held: publish_stub(store, fp, held), clear_hint="-")
    return owner, worker.pid, state, time.monotonic() - start, store


def test_a_killed_holder_elsewhere_is_taken_over_after_its_expiry(store_url, tmp_path, gristmill_log):
    owner, _, state, waited, store = take_over_after_kill(store_url, "f2", tmp_path / "machine", 2, "--elsewhere")
    # Renewed every 0.5 s until killed, the lease expires 2 s after its last heartbeat.
    assert state == "built" and 1.0 < waited < 10, waited
    assert f"took over the lease {objects_of(store).location(lease_rel(STAGE, 'f2'))} from host" in gristmill_log.text
    assert f"owner {owner}" in gristmill_log.text and "its last heartbeat is" in gristmill_log.text
    assert store.load(STAGE, "f2").metrics["builder"] != owner
    assert list_leases(store) == []


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path, gristmill_log):
    owner, pid, state, waited, _ = take_over_after_kill(str(tmp_path / "store"), "f3", tmp_path / "machine", 60)
    assert state == "built" and waited < 5
    assert f"owner {owner}" in gristmill_log.text
    assert f"its process {pid} on this machine is gone" in gristmill_log.text


def test_heartbeats_keep_a_long_build_alive_past_its_expiry(tmp_path, gristmill_log):
    store = ArtifactStore(tmp_path / "store")
    settings = LeaseSpec(expiry_s=1)
    started, results = threading.Event(), {}

    def slow(held):
        started.set()
        time.sleep(3)  # three expiries
        return publish_stub(store, "f4", held)

    holder = threading.Thread(target=lambda: results.update(
        holder=build_once(store, STAGE, "f4", settings, ready(store, "f4"), slow, "-")))
    holder.start()
    assert started.wait(10)
    results["waiter"] = build_once(store, STAGE, "f4", settings, ready(store, "f4"),
                                   build=lambda held: pytest.fail("the waiter built too"), clear_hint="-")
    holder.join()
    assert results == {"holder": "built", "waiter": "cached"}
    assert "stub: waiting for f4" in gristmill_log.text and "took over" not in gristmill_log.text


def test_a_lease_taken_over_is_noticed_before_publishing_and_left_to_its_new_holder(tmp_path, gristmill_log):
    store = ArtifactStore(tmp_path / "store")
    objects, rel = objects_of(store), lease_rel(STAGE, "f5")

    def build(held):
        # Another worker takes the lease over, as if this one had stalled past its expiry.
        theirs = held.info.model_copy(update={"owner": "their-owner", "host": "elsewhere"})
        assert objects.replace(rel, theirs.body(), objects.read(rel).version)
        with pytest.raises(LeaseLost, match=r"host elsewhere \(owner their-owner"):
            publish_stub(store, "f5", held)
        return "discarded"

    assert build_once(store, STAGE, "f5", LeaseSpec(), ready(store, "f5"), build, "-") == "discarded"
    assert store.load(STAGE, "f5") is None
    assert LeaseInfo.model_validate_json(objects.read(rel).body).owner == "their-owner"  # not deleted on release
    assert "lost the lease" in gristmill_log.text


def test_a_cleared_lease_is_taken_again_by_its_running_holder(tmp_path, gristmill_log):
    store = ArtifactStore(tmp_path / "store")

    def build(held):
        assert clear_lease(store, lease_rel(STAGE, "f6"))
        return publish_stub(store, "f6", held)  # no LeaseLost: nobody else holds it

    assert build_once(store, STAGE, "f6", LeaseSpec(), ready(store, "f6"), build, "-") == "built"
    assert "was deleted while building; taken again" in gristmill_log.text
    assert list_leases(store) == []


def test_waiting_times_out_naming_the_holder_the_lease_and_how_to_clear_it(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    settings = LeaseSpec(expiry_s=4, wait_timeout_s=0.5)
    started, done = threading.Event(), threading.Event()
    holder = threading.Thread(target=build_once, args=(store, STAGE, "f7", settings, lambda: None,
                                                       lambda held: started.set() or done.wait(10), "-"))
    holder.start()
    assert started.wait(10)
    try:
        with pytest.raises(StageError, match=r"waited 0.5 s for f7, which host .* is still building \(lease "
                                             r".*/stub/\.lease-f7\).*: gristmill leases SPEC --clear"):
            build_once(store, STAGE, "f7", settings, ready=lambda: None, build=lambda held: "built",
                       clear_hint="gristmill leases SPEC --clear")
    finally:
        done.set()
        holder.join()


def test_two_machines_running_one_stage_on_s3_build_it_once(project, s3_env, monkeypatch, tmp_path):
    url = s3_url(s3_env, monkeypatch, tmp_path)
    # No takeover is wanted here: an expiry long enough that a loaded machine's late heartbeat
    # (seen at load average 15 with 2 s) cannot hand the lease to the waiting machine.
    spec = project.load(lease={"expiry_s": 30})
    # Two machines: each has its own local cache, so its own file locks; only the lease is shared.
    stores = [ArtifactStore(url, local_cache=tmp_path / f"machine{i}") for i in range(2)]
    item = plan(spec, stores[0], graph=GRAPH)[0]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: execute(item, spec, stores[i], graph=GRAPH).state}))
               for i in range(2)]
    lease_worker.BUILDS.clear()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results.values()) == ["built", "cached"] and len(lease_worker.BUILDS) == 1
    assert list_leases(stores[0]) == []


def test_lease_settings_leave_every_fingerprint_alone(project):
    from tasks.registry import PIPELINE  # every stage module (torch included): imported only here

    # The parts of a stage's key the spec decides (the code and library parts do not read it).
    def spec_parts(spec):
        return {stage.name: (spec_part(stage, spec), resolved_part(stage, spec, "cpu"), content_inputs(stage, spec))
                for stage in PIPELINE.for_spec(spec)}

    default = spec_parts(project.load())
    assert spec_parts(project.load(lease={"expiry_s": 2, "wait_timeout_s": 5})) == default
    assert spec_parts(project.load(lease=None)) == default
    assert spec_parts(project.load(dedup={"exact": False})) != default  # the comparison can fail


def test_cli_lists_and_clears_leases(project, capsys):
    from flows.cli import main

    spec = project.write()
    objects, rel = objects_of(project.store), lease_rel("dedup", "abc")
    objects.create(rel, LeaseInfo(stage="dedup", fingerprint="abc", owner="o1", host="gpu-7", pid=1, machine="m",
                                  started_at=time.time() - 600, heartbeat_at=time.time() - 300, expiry_s=120).body())
    assert main(["leases", str(spec), "--store", project.store.url]) == 0
    out = capsys.readouterr().out
    assert "dedup  abc  host gpu-7 (owner o1, pid 1)  building 600 s, heartbeat 300 s ago: its last heartbeat" in out
    assert objects.location(rel) in out
    assert main(["leases", str(spec), "--store", project.store.url, "--clear"]) == 0
    assert f"cleared: {objects.location(rel)}" in capsys.readouterr().out and list_leases(project.store) == []
    assert main(["leases", str(spec), "--store", project.store.url]) == 0
    assert "no leases in" in capsys.readouterr().out
    assert main(["leases", str(project.root / "missing.yaml")]) == 2
