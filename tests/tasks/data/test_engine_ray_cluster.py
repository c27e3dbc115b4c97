"""datatrove's Ray executor on a real Ray cluster: two `ray start` nodes of 1 CPU each on this machine,
a head and a worker that joins it by address as a second machine would. A data stage run with
RAY_ADDRESS naming the head, the way a team points gristmill at its cluster, writes the local
executor's files, and its ranks ran on both nodes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.tasks.data.test_engine_ray import build_data_stages, corpus

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # installed with ray
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # this interpreter's `ray`, whatever PATH holds
START_TIMEOUT_S = 90  # both nodes came up in 22-37 s here, on 2 cores at a load average of 9-10
STOP_TIMEOUT_S = 60  # `ray start --block` drains its node for up to 30 s on SIGTERM, then stops its processes
# Through Ray pass only the pickled pipeline and file paths, never documents; Ray's default object
# store is 30% of the machine's memory per node.
OBJECT_STORE_BYTES = 100 * 1024**2


@dataclass(frozen=True)
class Node:
    name: str
    proc: subprocess.Popen  # `ray start --block`: the node's processes live as long as it does
    output: Path


@dataclass(frozen=True)
class Cluster:
    address: str  # host:port of the head, what RAY_ADDRESS holds
    nodes: list[Node]


# Looked up here, not in the forked child, which must not load libraries. Linux only (glibc).
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
PR_SET_PDEATHSIG = 1


def _term_when_parent_dies() -> None:
    """Runs in the child before exec: SIGTERM it if this test process dies, even by SIGKILL, so a
    killed test run cannot leave a node behind (`ray start --block` stops its node on SIGTERM)."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def start_node(name: str, args: list[str], root: Path, env: dict[str, str]) -> Node:
    """One `ray start --block` node, returned once the head has registered it."""
    output = root / f"{name}.out"
    cmd = [*RAY_CLI, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
           # Its own temp dir: sockets, logs, and the "current cluster" file that a bare ray.init()
           # reads (in /tmp/ray by default, where another test's ray.init would find this cluster).
           f"--temp-dir={root / name}", f"--object-store-memory={OBJECT_STORE_BYTES}",
           # Two nodes share this machine: fixed default ports (52365, 10002-19999) would collide.
           f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
           "--disable-usage-stats", *args]
    with output.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_term_when_parent_dies)
    node = Node(name, proc, output)
    deadline = time.monotonic() + START_TIMEOUT_S
    # Printed after the node's raylet is registered with the head (ray/_private/node.py waits for it).
    while "Ray runtime started" not in output.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_nodes([node])
            pytest.fail(f"`ray start` of the {name} node did not come up in {START_TIMEOUT_S} s:\n"
                        f"{output.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return node


def stop_nodes(nodes: list[Node]) -> list[str]:
    """Stops the nodes, last started first, and returns what was still running afterwards (killed).

    Not `ray stop`: it kills every Ray process on the machine by name, those of other test runs and
    users included. SIGTERM to `ray start --block` stops exactly the processes that node started."""
    ours: list[psutil.Process] = []
    for node in nodes:
        with contextlib.suppress(psutil.NoSuchProcess):
            # Ray workers rename themselves (ray::IDLE), so they are found as descendants, not by name.
            ours += psutil.Process(node.proc.pid).children(recursive=True)
    for node in reversed(nodes):
        if node.proc.poll() is None:
            node.proc.terminate()
            try:
                node.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
    _, alive = psutil.wait_procs(ours, timeout=10)
    left = [f"{p.pid} {p.name()}" for p in alive if _still_running(p)]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return left


def _still_running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A head and one worker node, both stopped (and checked gone) after the test."""
    assert not ray.is_initialized(), "the stage must join the cluster below, not a Ray this process holds"
    # Under /tmp, short: Ray's socket paths beneath it must fit the 107 bytes of a Unix socket path.
    root = Path(tempfile.mkdtemp(prefix="gm-ray-", dir="/tmp"))
    # The worker node stands for another machine, where gristmill is installed: its Ray workers import
    # this checkout (the driver's sys.path reaches them too, but a real node would not rely on that).
    # TMPDIR: datatrove's Ray workers stage task logs in $TMPDIR/ray_logs, a fixed name that other
    # Ray runs on this machine write too; here it goes with the cluster's folder.
    (root / "tmp").mkdir()
    # RAY_AUTH_MODE set, not left to Ray: a head turns token auth on by itself when ~/.ray/auth_token
    # exists (any earlier local ray.init() writes it), and a joining node does not, so it is refused.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(root / "tmp"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the driver, as the nodes
    nodes: list[Node] = []
    try:
        port = free_port()
        nodes.append(start_node("head", ["--head", f"--port={port}", "--include-dashboard=false"], root, env))
        address = f"127.0.0.1:{port}"
        nodes.append(start_node("worker", [f"--address={address}"], root, env))
        monkeypatch.setenv("RAY_ADDRESS", address)
        yield Cluster(address, nodes)
    finally:
        # The driver leaves first: one whose cluster disappears exits its process once it gives up
        # reconnecting, and here that process is pytest.
        ray.shutdown()
        left = stop_nodes(nodes)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"Ray processes still running after their node stopped (killed now): {left}"


@pytest.mark.timeout(300)
def test_a_stage_on_a_two_node_ray_cluster_matches_the_local_executor(tmp_path, cluster):
    # Exact dedup only: each rank is a fresh Ray actor that imports datatrove (seconds on 2 busy
    # cores), and MinHash's 4 steps would add 14 of them; test_engine_ray.py runs MinHash on Ray.
    exact_only = {"dedup": {"exact": True, "near": None}}
    local = build_data_stages(corpus(tmp_path / "local"), "local", workers=1, **exact_only)
    # tasks=2, workers=2 on 2 nodes of 1 CPU each: the two ranks in flight cannot share a node.
    on_cluster = build_data_stages(corpus(tmp_path / "cluster"), "ray", workers=2, **exact_only)
    assert on_cluster == local  # per stage: fingerprint, sha256 of every output file, metrics
    assert any(path.startswith("documents/") for path in on_cluster["dedup"][1])
    assert on_cluster["dedup"][2]["exact_duplicates"] == 4 and on_cluster["dedup"][2]["documents_out"] == 33

    # The stage joined the cluster RAY_ADDRESS names (engine.py calls a bare ray.init()); Ray
    # reports the head by this machine's address, not 127.0.0.1, so the (free, unique) port tells ...
    assert ray.get_runtime_context().gcs_address.rsplit(":", 1)[1] == cluster.address.rsplit(":", 1)[1]
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2 and all(n["Resources"].get("CPU") == 1 for n in alive.values()), alive
    # ... and its ranks ran on both nodes. datatrove runs each rank in a RankWorker actor; the GCS
    # keeps finished actors with the node that ran them (a developer API: no dashboard needed).
    from ray._private import state

    ranks_per_node = Counter(actor["Address"]["NodeID"] for actor in state.actors().values()
                             if actor["ActorClassName"] == "RankWorker")
    head = next(node_id for node_id, n in alive.items() if "node:__internal_head__" in n["Resources"])
    worker = next(node_id for node_id in alive if node_id != head)
    # 7 ranks in all (ingest 2, exact dedup 2 + 1 + 2); a run here put 4 on the head and 3 on the worker.
    assert sum(ranks_per_node.values()) == 7, ranks_per_node
    assert ranks_per_node[head] > 0 and ranks_per_node[worker] > 0, f"head {head}, worker {worker}: {ranks_per_node}"
