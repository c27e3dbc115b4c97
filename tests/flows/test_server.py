"""The team setup on a real Prefect server: pools, `prefect deploy` from prefect.yaml, workers, the
nightly deployment running the GPU stages as flow runs of the stage deployment on the GPU pool,
one shared store, and a rerun that finds every stage Cached. Plus the Kubernetes GPU template.

The shared store starts seeded from the session's tiny store (tests/conftest.py `seed_store`)
with every stage but one data stage and one GPU stage: fingerprints come from code, spec and
upstream fingerprints, so the seeded stages are Cached, and the nightly builds qa in its own flow
run and eval as a flow run on the GPU pool (the CLI's rerun below runs dpo there). That is what
these tests are about; building all of tiny's training through the pools again (each GPU stage a
new process) took 200-250 s.

The server test starts everything it uses (server, workers) as subprocesses with their own
PREFECT_HOME and stops them, even when it fails. The workers run flows from a snapshot of this
checkout (their GRISTMILL_HOME), as each machine of a team runs its own checkout; it also keeps
edits made to this tree during the test out of the stages' fingerprints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.core.keys import local_device
from tasks.registry import PIPELINE
from tests.conftest import (
    REPO,
    S3_BUCKET,
    TINY_STORE_TIMEOUT_S,
    assert_task_states,
    free_port,
    seed_store,
    task_runs,
    wait_healthy,
)

PREFECT = str(Path(sys.executable).parent / "prefect")
TEMPLATE = REPO / "deploy" / "k8s-gpu-base-job-template.json"
NIGHTLY, STAGE_DEPLOYMENT = "gristmill-pipeline/nightly", "gristmill-stage/gpu"
STAGES = PIPELINE.names()
GPU = set(PIPELINE.gpu_stages())
# What the nightly builds on the seeded store: a cheap data stage in the pipeline's own flow run,
# and the last GPU stage (it reads the seeded models and index, and the report is made from it) as
# a flow run on the GPU pool: each flow run there is a process importing torch and transformers.
BUILT_HERE, BUILT_ON_GPU_POOL = {"qa"}, {"eval"}
SEEDED = set(STAGES) - BUILT_HERE - BUILT_ON_GPU_POOL
# The GPU pool's worker runs on this machine, so its stages run on this machine's device: the
# one the session's tiny store was built for, whose keys the seeded artifacts carry.
GPU_DEVICE = local_device()
# The nightly run through the pools took 314-599 s on the 2-core machine while other test runs
# shared it (load average 5-10), building every stage; the limit leaves room for a busier
# machine, not a hang.
RUN_TIMEOUT_S = 900


# ---------------------------------------------------------------- the Kubernetes GPU template

def test_k8s_gpu_template_is_a_base_job_template_with_gpu_limits():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    variables = template["variables"]["properties"]
    # Every placeholder names a declared variable (a typo would render as nothing).
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables), used - set(variables)
    # prefect-kubernetes' default variables are all still there, with the GPU ones added.
    assert {"name", "env", "labels", "command", "namespace", "image", "service_account_name", "image_pull_policy",
            "finished_job_ttl", "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output",
            "cluster_config", "gpu_count"} <= set(variables)
    assert variables["gpu_count"]["type"] == "integer" and variables["gpu_count"]["default"] == 1

    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, "gpu_count": 4})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job" and pod["restartPolicy"] == "Never"  # what the worker requires
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert job["env"]["GRISTMILL_HOME"]  # the pull step of prefect.yaml needs it


def test_k8s_gpu_template_passes_prefects_work_pool_validation():
    from prefect.server.schemas.actions import WorkPoolCreate  # what the server checks a new pool with

    template = json.loads(TEMPLATE.read_text())
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)
    del template["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)


def test_k8s_gpu_template_variables_are_valid_json_schema():
    import jsonschema

    schema = json.loads(TEMPLATE.read_text())["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"gpu_count": 8})
    assert not validator.is_valid({"gpu_count": "eight"})
    assert not validator.is_valid({"gpu_count": -1})


# ---------------------------------------------------------------- a real server, pools, workers

def snapshot_checkout(dest: Path) -> Path:
    """The files of this checkout (tracked and untracked, not ignored) copied to `dest`."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True).stdout.split(b"\0")
    for rel in filter(None, files):
        src = REPO / os.fsdecode(rel)
        if src.is_file():
            target = dest / os.fsdecode(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
    return dest


@dataclass
class Team:
    """The processes of a team's setup, each with its log file."""

    root: Path
    env: dict[str, str]
    api: str
    checkout: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    launches: dict[str, tuple] = field(default_factory=dict)  # name -> (args, env, cwd), to restart it

    def start(self, name: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.launches[name] = (args, env, cwd)
        log = (self.root / f"{name}.log").open("ab")
        # Its own session, so stopping it also stops the flow-run processes a worker started.
        self.procs[name] = subprocess.Popen(list(args), cwd=cwd or self.checkout, env=env or self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self, name: str) -> None:
        args, env, cwd = self.launches[name]
        self.start(name, *args, env=env, cwd=cwd)

    def prefect(self, *commands: list[str]) -> None:
        """Runs `prefect` commands side by side (each is a few seconds of imports) and checks them."""
        procs = [subprocess.Popen([PREFECT, *args], cwd=self.checkout, env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for args in commands]
        for args, proc in zip(commands, procs):
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{out[-3000:]}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def team(tmp_path_factory, s3_env) -> Iterator[Team]:
    """A Prefect server, the CPU and GPU process pools, `prefect deploy --all`, and one worker per pool
    (the GPU pool's takes one flow run at a time, as README advises for a GPU machine), all able to
    reach the module's S3 server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("team")
    checkout = snapshot_checkout(root / "checkout")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_CLI_PROMPT": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GRISTMILL_HOME": str(checkout),
           # Workers poll every second (default 10 s); no schedule is due during the test.
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **s3_env}
    t = Team(root, env, api, checkout)
    try:
        t.start("server", PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_healthy(api, t.procs["server"], 120, t.logs)
        t.prefect(["work-pool", "create", "gristmill-cpu", "--type", "process"],
                  ["work-pool", "create", "gristmill-gpu", "--type", "process"])
        t.start("worker-cpu", PREFECT, "worker", "start", "--pool", "gristmill-cpu")
        t.start("worker-gpu", PREFECT, "worker", "start", "--pool", "gristmill-gpu", "--limit", "1")
        t.prefect(["--no-prompt", "deploy", "--all"])
        with temporary_settings({PREFECT_API_URL: api}):
            yield t
    finally:
        t.stop()


def wait_final(flow_run_ids: list, team: Team, timeout: float = RUN_TIMEOUT_S) -> list:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = [client.read_flow_run(i) for i in flow_run_ids]
            if all(r.state and r.state.is_final() for r in runs):
                return runs
            time.sleep(1)
    raise AssertionError(f"flow runs not finished after {timeout} s: {[r.state for r in runs]}\n{team.logs()}")


def trigger_nightly(store: Path) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(NIGHTLY, parameters={"spec_path": "data_specs/tiny.yaml", "store": str(store),
                                               "gpu_deployment": STAGE_DEPLOYMENT, "gpu_device": GPU_DEVICE},
                          timeout=0)


def stage_flow_runs() -> list:
    """Every flow run of the one-stage deployment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])))


@dataclass
class NightlyRun:
    store: Path
    flow_run: Any
    twin: Any  # started at the same time: the concurrency limit must cancel it
    seconds: float


@pytest.fixture(scope="module")
def nightly(team, tiny_store, tmp_path_factory) -> NightlyRun:
    """Two nightly runs of tiny.yaml triggered together on a store seeded with SEEDED, both waited for."""
    store = tmp_path_factory.mktemp("shared") / "store"
    seed_store(tiny_store, store, SEEDED)
    start = time.monotonic()
    runs = wait_final([trigger_nightly(store).id, trigger_nightly(store).id], team)
    done = sorted(runs, key=lambda r: r.state.is_cancelled())
    return NightlyRun(store, done[0], done[1], time.monotonic() - start)


@pytest.mark.slow
@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_nightly_runs_gpu_stages_on_the_gpu_pool(team, nightly):
    assert BUILT_ON_GPU_POOL <= GPU and not BUILT_HERE & GPU, GPU
    assert nightly.flow_run.state.is_completed(), f"{nightly.flow_run.state}\n{team.logs()}"
    print(f"\nnightly run of tiny.yaml through the pools, {len(SEEDED)} stages seeded: {nightly.seconds:.0f} s")
    for stage in STAGES:
        assert list((nightly.store / stage).glob("*/artifact.json")), f"no {stage} artifact"

    # The seeded stages are Cached task runs of the pipeline's own flow run and the data stage it
    # built a Completed one; each GPU stage it built ran as a child flow run of the stage
    # deployment instead, on the GPU pool, linked to a task run of the pipeline's flow run.
    assert_task_states(nightly.flow_run.id, {**{s: "Cached" for s in SEEDED}, **{s: "Completed" for s in BUILT_HERE},
                                             "report": "Completed"}, only={*STAGES, "report"})
    own = task_runs(nightly.flow_run.id)
    children = stage_flow_runs()
    assert sorted(c.parameters["stage"] for c in children) == sorted(BUILT_ON_GPU_POOL)
    assert {c.work_pool_name for c in children} == {"gristmill-gpu"}
    assert all(c.state.is_completed() for c in children)
    assert {c.parent_task_run_id for c in children} <= {r.id for r in own}
    assert all(c.parameters["store"] == str(nightly.store) for c in children)

    # The run's report reached the Prefect API as a markdown artifact of the pipeline's flow run.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gristmill-report-tiny"])))
    report = nightly.store / "runs" / "tiny" / "report.md"
    assert artifact.type == "markdown" and artifact.data == report.read_text()
    assert artifact.flow_run_id == nightly.flow_run.id


@pytest.mark.slow
@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_nightly_runs_never_overlap(team, nightly):
    assert nightly.twin.state.is_cancelled(), nightly.twin.state
    assert "concurrency limit" in (nightly.twin.state.message or "")


@pytest.mark.slow
@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_rerun_finds_every_stage_cached_without_the_gpu_pool(team, nightly):
    before = len(stage_flow_runs())
    (rerun,) = wait_final([trigger_nightly(nightly.store).id], team)
    assert rerun.state.is_completed(), f"{rerun.state}\n{team.logs()}"
    # GPU stages built by the other worker's flow runs are Cached here too: their cache records
    # are in the shared store, and a cached GPU stage needs no flow run on the GPU pool.
    assert_task_states(rerun.id, {**{s: "Cached" for s in STAGES}, "report": "Completed"})
    assert len(stage_flow_runs()) == before


@pytest.mark.slow
def test_deployments_carry_the_schedule_pools_and_limits(team):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name(NIGHTLY)
        stage = client.read_deployment_by_name(STAGE_DEPLOYMENT)
    assert nightly.work_pool_name == "gristmill-cpu" and stage.work_pool_name == "gristmill-gpu"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert nightly.parameters["gpu_deployment"] == STAGE_DEPLOYMENT
    assert stage.job_variables == {"gpu_count": 1}


@pytest.mark.slow
def test_server_accepts_the_k8s_gpu_pool_and_checks_gpu_count(team):
    """The server validates the template, and deployments' gpu_count against its schema
    (the Kubernetes worker itself needs a cluster, which this test does not have)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(WorkPoolCreate(name="gristmill-gpu-k8s", type="kubernetes",
                                                      base_job_template=json.loads(TEMPLATE.read_text())))
        assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1
        flow_id = client.read_flow_by_name("gristmill-stage").id
        with pytest.raises(PrefectHTTPStatusError, match="422"):
            client.create_deployment(flow_id=flow_id, name="k8s-bad", work_pool_name=pool.name,
                                     entrypoint="flows/pipeline.py:gristmill_stage", job_variables={"gpu_count": "two"})
        client.create_deployment(flow_id=flow_id, name="k8s", work_pool_name=pool.name,
                                 entrypoint="flows/pipeline.py:gristmill_stage", job_variables={"gpu_count": 2})


def gristmill_cli(team: Team, *args: str) -> subprocess.CompletedProcess:
    """The CLI from the workers' checkout (same code, so the same fingerprints), on the team's server."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=team.checkout, env=team.env,
                          capture_output=True, text=True, timeout=540)


@pytest.mark.slow
@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_cli_reruns_one_gpu_stage_through_the_stage_deployment(team, nightly):
    before = {c.id for c in stage_flow_runs()}
    proc = gristmill_cli(team, "run", "data_specs/tiny.yaml", "--store", str(nightly.store), "--only", "dpo",
                         "--force", "dpo", "--gpu-deployment", STAGE_DEPLOYMENT, "--gpu-device", GPU_DEVICE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dpo  built" in proc.stdout, proc.stdout
    (new,) = [c for c in stage_flow_runs() if c.id not in before]
    assert (new.parameters["stage"], new.parameters["force"], new.state.name) == ("dpo", True, "Completed")


@pytest.mark.slow
@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_cli_with_an_unknown_gpu_deployment_exits_2_before_running(team, nightly):
    proc = gristmill_cli(team, "run", "data_specs/tiny.yaml", "--store", str(nightly.store), "--only", "sft",
                         "--force", "sft", "--gpu-deployment", "gristmill-stage/nowhere", "--gpu-device", GPU_DEVICE)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "gristmill-stage/nowhere: no such deployment" in proc.stderr


# ---------------------------------------------------------------- two machines, one pool, one S3 store

@pytest.fixture(scope="module")
def two_machines(team, tiny_store, s3_env, tmp_path_factory) -> str:
    """A second worker on the GPU pool with a machine of its own (HOME, checkout, scratch: its
    GRISTMILL_HOME), and an S3 store seeded with tiny's stages up to pretrain; the store's URL."""
    root = tmp_path_factory.mktemp("machine2")
    checkout = snapshot_checkout(root / "checkout")
    env = {**team.env, "HOME": str(root / "home"), "GRISTMILL_HOME": str(checkout), "TMPDIR": str(root)}
    team.start("worker-gpu-2", PREFECT, "worker", "start", "--pool", "gristmill-gpu", "--limit", "1",
               env=env, cwd=checkout)
    url = f"s3://{S3_BUCKET}/two-machines"
    seed_store(tiny_store, url, {"ingest", "dedup", "quality", "tokenizer"}, s3_env)
    return url


def trigger_pretrain(url: str, override: dict) -> Any:
    """A flow run of the stage deployment building tiny's pretrain (with `override`) on the store `url`."""
    from prefect.deployments import run_deployment

    return run_deployment(STAGE_DEPLOYMENT, parameters={
        "spec_path": "data_specs/tiny.yaml", "stage": "pretrain", "store": url, "override": json.dumps(override),
        "gpu_device": GPU_DEVICE, "data_device": local_device()}, timeout=0)


@contextmanager
def s3_store(url: str, s3_env: dict[str, str]) -> Iterator[Any]:
    """The store at `url` on the module's S3 server, seen from this process; s3fs's cached clients
    dropped before and after (one kept would talk to this server after it stops)."""
    from s3fs import S3FileSystem

    from tasks.core.store import ArtifactStore

    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_env.items():
            mp.setenv(name, value)
        S3FileSystem.clear_instance_cache()
        try:
            yield ArtifactStore(url)
        finally:
            S3FileSystem.clear_instance_cache()


def pretrain_records(url: str, s3_env: dict[str, str]) -> list:
    with s3_store(url, s3_env) as store:
        return store.history("pretrain")


def parents(pid: int) -> list[int]:
    """The pids above `pid`, up to init (from /proc)."""
    out = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def worker_logs(team: Team) -> str:
    return "".join((team.root / f"{w}.log").read_text(errors="replace") for w in ("worker-gpu", "worker-gpu-2"))


@pytest.mark.slow
@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_two_workers_given_the_same_stage_build_it_once(team, two_machines, s3_env):
    """Two flow runs of one stage start together on two machines' workers: one builds, the other
    finds its live lease in the store, waits, and uses the artifact; both Completed."""
    override = {"pretrain": {"seed": 11}}
    runs = wait_final([trigger_pretrain(two_machines, override).id, trigger_pretrain(two_machines, override).id], team)
    assert all(r.state.is_completed() for r in runs), f"{[r.state for r in runs]}\n{team.logs()}"
    (record,) = pretrain_records(two_machines, s3_env)
    logs = worker_logs(team)
    # One built; the other waited, then used the artifact: seen while waiting ("; using it"), or,
    # when the holder published and released between two looks, found cached once it took the
    # free lease (the build's own check under the lease).
    assert logs.count("pretrain: building ") == 1 and logs.count("pretrain: waiting for ") >= 1, logs[-6000:]
    assert logs.count("; using it") + logs.count("pretrain: cached ") == 1, logs[-6000:]
    assert record.run_name == "tiny"


@pytest.mark.slow
@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_a_killed_workers_lease_is_taken_over_and_the_stage_published_once(team, two_machines, s3_env):
    """The machine building the stage dies (its worker and flow-run process SIGKILLed mid-build):
    the other worker's run takes the lease over and publishes the artifact once."""
    from prefect.client.orchestration import get_client

    from tasks.core.lease import list_leases

    before = len(pretrain_records(two_machines, s3_env))
    override = {"pretrain": {"seed": 12}, "lease": {"expiry_s": 10}}
    ids = [trigger_pretrain(two_machines, override).id, trigger_pretrain(two_machines, override).id]
    deadline, held = time.monotonic() + RUN_TIMEOUT_S, []
    with s3_store(two_machines, s3_env) as store:
        while not held and time.monotonic() < deadline:
            held = [h for h in list_leases(store) if h.info.stage == "pretrain"]
            time.sleep(0.2)
    assert held, team.logs()
    holder = held[0].info.pid
    worker = next(name for name, proc in team.procs.items() if proc.pid in parents(holder))
    os.kill(holder, signal.SIGKILL)  # the flow run building it and the worker that started it: the machine died
    os.killpg(team.procs[worker].pid, signal.SIGKILL)
    team.procs[worker].wait()
    try:
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = [client.read_flow_run(i) for i in ids]
                if any(r.state and r.state.is_completed() for r in runs):
                    break
                time.sleep(1)
        assert any(r.state.is_completed() for r in runs), f"{[r.state for r in runs]}\n{team.logs()}"
        assert len(pretrain_records(two_machines, s3_env)) == before + 1
        assert "pretrain: took over the lease" in worker_logs(team), worker_logs(team)[-6000:]
    finally:
        team.restart(worker)  # the killed machine's worker back, for the tests after this one
