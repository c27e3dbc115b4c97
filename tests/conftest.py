"""Shared fixtures: small specs written into a temp folder, a store beside them, one finished
tiny.yaml store per session for the tests that need every stage (reliability, the run report,
gates, and `seed_store` for end-to-end runs that need only some), a moto S3 server, and the
"gristmill" log.

`make test` runs the suite in two pytest-xdist workers (`--dist loadfile`: a module's tests and its
module fixtures stay in one worker). Half of a 2-core machine idles in a serial run (process
start-ups and imports are single-threaded; 49% busy over test_cli + test_pipeline): the suite took
25 min 49 s serially and, in two workers computing on one thread each, 16 min 02 s to 21 min 21 s up
to 0e89674, 14 min 41 s at 6abdda2 and 13 min 54 s at a857f5b (fresh clones on one machine whose
speed varies); three workers were no faster. What a session builds once, the tiny store and the four
simultaneous runs, is built once for both workers: in a folder they share (`shared_folder`), by
whichever worker takes its lock (the store's build lock) first; the one Prefect server they use is
started by xdist's controller (`pytest_configure`)."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from data_specs.loader import load_spec
from data_specs.schema import RunSpec
from tasks.core.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data_specs" / "tiny.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two xdist workers share the machine: each one's torch (and every process it starts) computes on
# one thread, not on every core. Two processes of two OpenMP threads each on 2 cores made the
# training tests 2-5x slower than alone, and the suite only 1.15x faster than serial.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Hermetic Prefect: the tests (and the CLI subprocesses they start) get a fresh Prefect home
# of their own, so a user's ~/.prefect database, or another run using it, cannot interfere.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gristmill-prefect-")
# The tests that use `tiny_store` may build it: the whole tiny pipeline took 200-423 s on the
# 2-core machine under other test runs (BENCHMARKS.md, Prefect's overhead) and 29 min in-process
# at a load average of 9, far past pytest's 600 s default. The same hour four_runs allows.
TINY_STORE_TIMEOUT_S = 3600
# A `gristmill run` that builds anything without a Prefect server (PREFECT_API_URL unset) starts
# Prefect's temporary one: ~11 s of each such CLI run on 2 cores (26 s vs 15 s for `--until
# ingest`), and the suite has dozens. A session of end-to-end tests starts one server, as a team
# runs one, and points every process at it; the tests of the temporary-server path unset it.
SERVER_STARTUP_TIMEOUT_S = 180


_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "gu", "ba", "fe", "zo", "hy", "wa", "qi"]


def doc_text(i: int, words: int = 40) -> str:
    """A distinct document of letter-only words (MinHash normalises digits away), seeded by i,
    so no two documents are near duplicates."""
    rng = random.Random(i)
    return " ".join("".join(rng.choices(_SYLLABLES, k=3)) for _ in range(words)) + "."


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Writes rows (dicts are JSON-encoded, str/bytes written as the raw line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


def plain_transformers(model_dir: str | Path, body: str) -> dict:
    """Runs `body` in a fresh interpreter that loads `model_dir` as `m` (model) and `t`
    (tokenizer) with plain transformers, and returns the dict it assigns to `result`, plus
    whether any gristmill module was imported."""
    code = (
        "import json, sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}); t = AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
        f"{body}\n"
        "result['gristmill'] = any(k.split('.')[0] in ('tasks', 'flows', 'data_specs') for k in sys.modules)\n"
        "print(json.dumps(result))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class SpecFactory:
    """Writes a spec YAML (and returns it loaded) in a temp project folder.

    Its specs skip the quality stage (`quality: null`) unless a test passes a `quality` section:
    the syllable documents of `doc_text` are not language, and the quality filters would rightly
    remove every one of them (tests/tasks/test_quality.py runs the stage on real text)."""

    def __init__(self, root: Path):
        self.root = root
        self.store = ArtifactStore(root / "store")

    def write(self, name: str = "t", **sections: Any) -> Path:
        body = {"name": name, "corpus": {"sources": [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"}]},
                "quality": None}
        body.update(sections)
        path = self.root / "spec.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    def load(self, **sections: Any) -> RunSpec:
        return load_spec(self.write(**sections))


@pytest.fixture
def project(tmp_path: Path) -> SpecFactory:
    """A temp project with ten distinct documents in data/docs.jsonl."""
    write_jsonl(tmp_path / "data" / "docs.jsonl", [{"id": f"d{i}", "text": doc_text(i)} for i in range(10)])
    return SpecFactory(tmp_path)


def tiny_copy(folder: Path, **sections: Any) -> Path:
    """tiny.yaml written into `folder` beside a copy of its corpus, each of `sections` laid over the
    section of that name (the corpus is keyed by content, so the stages keep tiny's fingerprints)."""
    shutil.copytree(TINY.parent / "tiny", folder / "tiny", dirs_exist_ok=True)
    spec = yaml.safe_load(TINY.read_text())
    for name, value in sections.items():
        spec[name] = {**spec[name], **value} if isinstance(value, dict) and isinstance(spec.get(name), dict) else value
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def finetuned_f1(store: Path) -> float:
    """The finetuned arm's F1 in the one eval of a finished tiny store (its summary.json)."""
    (summary,) = (store / "eval").glob("*/summary.json")
    return json.loads(summary.read_text())["arms"]["finetuned"]["f1"]


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this session that every pytest-xdist worker sees: under the session's base temp
    folder, whose subfolders the workers' own base temp folders are (this process's without xdist)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class FourRuns:
    """Four `gristmill run tiny.yaml` started together on one fresh store."""

    store: Path
    outputs: list[tuple[int, str, str]]  # (exit code, stdout, stderr) of each


@pytest.fixture(scope="session")
def four_runs(tmp_path_factory) -> FourRuns:
    """The real CLI, four processes started at once on one store (each waits for the others'
    locks, so the stages are built once, uninterrupted). Once a session: the worker that takes
    the lock first runs them and keeps their outputs beside the store for the other."""
    root = shared_folder(tmp_path_factory, "four-runs")
    store, outputs = root / "store", root / "outputs.json"
    with ArtifactStore(root).lock("four-runs", "outputs"):  # the store's build lock, across processes
        if not outputs.exists():
            env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
            procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(TINY), "--store", str(store)],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(4)]
            outs = [p.communicate(timeout=3600) for p in procs]
            outputs.write_text(json.dumps([(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]))
    return FourRuns(store, [tuple(o) for o in json.loads(outputs.read_text())])


@pytest.fixture(scope="session")
def tiny_store(request, tmp_path_factory) -> Path:
    """A store holding every stage of tiny.yaml, built once per session (never modified: copy it).
    A test using it may be the one that builds it (minutes on a busy 2-core machine): give it
    TINY_STORE_TIMEOUT_S.

    When this session also runs the four simultaneous runs (tests/reliability/test_kill.py), their
    store is this one, so tiny is built once and checked twice; otherwise one in-process run
    (tasks.core.runner) builds it. GRISTMILL_GOLDEN_STORE names a folder to build it in and keep
    across sessions instead (a soak run, or iterating on these tests): what the current code
    would build again is reused, artifacts of other code are removed (one artifact per stage)."""
    from tasks.core.runner import execute, prepare_run

    keep = os.environ.get("GRISTMILL_GOLDEN_STORE")
    if not keep and any("four_runs" in item.fixturenames for item in request.session.items):
        runs: FourRuns = request.getfixturevalue("four_runs")
        assert [code for code, _, _ in runs.outputs] == [0] * 4, [err[-2000:] for _, _, err in runs.outputs]
        return runs.store
    store = Path(keep) if keep else shared_folder(tmp_path_factory, "tiny") / "store"
    with ArtifactStore(store).lock("golden", "session"):
        run = prepare_run(TINY, str(store))
        for item in run.stages:
            for stale in (store / item.name).glob("*"):
                if stale.name != item.fingerprint:
                    shutil.rmtree(stale, ignore_errors=True)
            execute(item, run.spec, run.store)
    return store


@pytest.fixture(scope="session")
def one_layer_minilm(tmp_path_factory) -> Path:
    """The default embedder cut to its first of six layers (its tokenizer, word embeddings, pooling
    and normalisation kept), as an `index.embedder` folder: for tests about where a run writes or
    what shape its metrics have, not how well RAG retrieves. It embeds several times faster than
    the whole model, which costs a full run ~20 s on one core."""
    from transformers import AutoConfig, AutoModel

    from eval.rag import default_embedder_path

    source = default_embedder_path()
    folder = tmp_path_factory.mktemp("one-layer-minilm")
    shutil.copytree(source, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = 1
    AutoModel.from_pretrained(source, config=config).save_pretrained(folder)  # config.json with it
    return folder


# What the heavy modules cost (seconds of test phases, summed over both workers, at da96333 on the
# 2-core machine): the order below runs the long ones first and leaves short ones for the end.
MODULE_SECONDS = {
    "tests/reliability/test_kill.py": 345, "tests/flows/test_server.py": 278,
    "tests/reliability/test_security.py": 142, "tests/flows/test_s3_store.py": 118,
    "tests/tasks/train/test_distributed.py": 109, "tests/flows/test_cli.py": 108,
    "tests/flows/test_pipeline.py": 103, "tests/tasks/test_finetune.py": 94,
    "tests/tasks/train/test_time_limit.py": 86, "tests/tasks/data/test_engine_ray.py": 67,
    "tests/reliability/test_fuzz.py": 45, "tests/tasks/core/test_fingerprint.py": 44,
    "tests/tasks/test_pretrain.py": 42, "tests/tasks/data/test_engine_ray_cluster.py": 34,
    "tests/tasks/test_midtrain.py": 33, "tests/tasks/test_qa.py": 33, "tests/tasks/test_dedup.py": 32,
    "tests/reliability/test_disk.py": 29, "tests/tasks/core/test_graph.py": 29,
    "tests/tasks/core/test_lease.py": 26,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules in the order that keeps both xdist workers busy to the end (`make test` passes
    --no-loadscope-reorder, or xdist would order them by their number of tests): the one that
    builds the session's tiny store (the four runs) first; then the heavy modules (MODULE_SECONDS)
    that need no tiny store, then those that wait for it (by then it is built), each group longest
    first; the light modules last, small pieces that even out the workers' ends. A module's own
    tests keep their order. In collection order one worker sat ~85 s on the store's lock."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    needs: dict[str, set[str]] = {}
    for item in items:
        needs.setdefault(module(item), set()).update({"four_runs", "tiny_store"} & set(item.fixturenames))

    def rank(m: str) -> int:
        if "four_runs" in needs[m]:
            return 0
        return 2 if "tiny_store" in needs[m] else 1 if m in MODULE_SECONDS else 3

    position = {m: i for i, m in enumerate(needs)}
    items.sort(key=lambda item: (rank(module(item)), -MODULE_SECONDS.get(module(item), 0),
                                 position[module(item)]))


def free_port() -> int:
    """A port nobody listens on now (chosen by the OS; the caller's server binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api: str, proc: subprocess.Popen | None, timeout: float, logs: Callable[[], str]) -> None:
    """Waits until the Prefect server `proc` started (None: one another process started) answers
    on `api`; fails with its `logs()` if it exits or is not healthy after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, f"the Prefect server exited:\n{logs()}"
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no healthy Prefect server after {timeout} s\n{logs()}")


def task_runs(flow_run_id) -> list:
    """The task runs of a flow run, as the Prefect server (of the current settings) records them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def assert_task_states(flow_run_id, expected: dict[str, str], only: set[str] | None = None,
                       timeout: float = 60) -> None:
    """The task runs of a flow run (those named in `only`, if given), as the Prefect server records
    them, are `expected` (name -> state name), within `timeout` seconds. Prefect 3 sends task-run
    states to the server as events, which it records asynchronously: a read right after the flow
    returned once saw a task run still Pending under its first name (run_stage-194) and no report."""
    deadline = time.monotonic() + timeout
    while True:
        states = {run.name: run.state.name for run in task_runs(flow_run_id)
                  if run.state and (only is None or run.name in only)}
        if states == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states == expected


# The session's Prefect server runs only what the tests use: the services that record task runs
# (event persister, task-run recorder), none of those that poll the database for work on a
# schedule (late runs, foremen, cancellations, pauses, repossession, automations). Those cost an
# idle server 3.4% of a core; it uses 1.9% without them.
SESSION_SERVER_SERVICES_OFF = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS",
                               "REPOSSESSOR", "CLEANUP_RECONCILER", "TRIGGERS")
# Set by the xdist controller for its workers: "api-url|server log" of the one server they share.
SHARED_SERVER_ENV = "GRISTMILL_TEST_PREFECT_SERVER"


def start_session_server(log: Path) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free port, its output in `log`, in a session of its own (so a
    signal to a test's process group does not stop it); (process, API URL). Not waited for."""
    port = free_port()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in SESSION_SERVER_SERVICES_OFF}}
    env.pop("PREFECT_API_URL", None)
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/api"


def stop_session_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


SERVER_KEY = pytest.StashKey[subprocess.Popen]()


def pytest_configure(config: pytest.Config) -> None:
    """In the controller of xdist workers: starts the one Prefect server every worker's session
    uses (one server's start-up and idle polling less than a server per worker). Skipped when
    the run deselects the slow tests, which never use it."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if "not slow" in (config.option.markexpr or ""):
        return
    log = Path(tempfile.mkdtemp(prefix="gristmill-prefect-server-")) / "server.log"
    proc, api = start_session_server(log)
    config.stash[SERVER_KEY] = proc
    os.environ[SHARED_SERVER_ENV] = f"{api}|{log}"  # the workers, started after this, inherit it


def pytest_unconfigure(config: pytest.Config) -> None:
    proc = config.stash.get(SERVER_KEY, None)
    if proc is not None:
        stop_session_server(proc)


@pytest.fixture(scope="session", autouse=True)
def prefect_server(request, tmp_path_factory) -> Iterator[str | None]:
    """One Prefect server for a session that runs end-to-end (`slow`) tests, with
    PREFECT_API_URL set for this process and the CLI subprocesses it starts (None otherwise:
    a run then starts Prefect's temporary one, which is slower, not different). Under xdist the
    controller started it for every worker (`pytest_configure`); else this session starts it, its
    log in the session's temp folder. A server that does not come up fails the session."""
    if not any(item.get_closest_marker("slow") for item in request.session.items):
        yield None
        return
    shared = os.environ.get(SHARED_SERVER_ENV)
    if shared:  # the controller's: it stops it
        api, log_path = shared.split("|", 1)
        proc, log = None, Path(log_path)
    else:
        log = tmp_path_factory.mktemp("prefect-server") / "server.log"
        proc, api = start_session_server(log)
    try:
        wait_healthy(api, proc, SERVER_STARTUP_TIMEOUT_S, lambda: log.read_text()[-3000:])
        os.environ["PREFECT_API_URL"] = api
        yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if proc is not None:
            stop_session_server(proc)


@pytest.fixture
def gristmill_log(caplog):
    """caplog with the "gristmill" logger's records, even where the CLI set it not to propagate."""
    logger = logging.getLogger("gristmill")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


S3_BUCKET = "gristmill-test"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A moto S3 server on a free local port, a bucket in it, and the environment that points
    the AWS client stack at it (the way a team points gristmill at MinIO or a real bucket)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Downloads of remote artifacts are cached per machine; keep this test's apart.
        "HOME": str(tmp_path_factory.mktemp("home")),
    }
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    s3_client(env).create_bucket(Bucket=S3_BUCKET)
    try:
        yield env
    finally:
        server.stop()


def s3_client(env: dict[str, str]):
    """A boto3 client of the server `s3_env` started (to look at the bucket from outside gristmill)."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def seed_store(tiny_store: Path, dest: str | Path, stages: set[str], s3_env: dict[str, str] | None = None) -> None:
    """Copies the finished artifacts of `stages` from `tiny_store` into the store `dest`: a folder,
    or an s3://bucket/prefix URL on the server of `s3_env` (every file under the same relative key).

    A stage's fingerprint is planned from code, spec and its upstream stages' fingerprints, not
    from their bytes, so a run of tiny.yaml on `dest` finds the copies Cached and builds the other
    stages on top of them: an end-to-end test pays for the stages it is about, not for all of
    tiny's training. The copies keep the keys `tiny_store` was planned with, this machine's device
    among them (a GPU stage's key holds it): a run planned for another device rebuilds them."""
    for stage in stages:
        records = list((tiny_store / stage).glob("*/artifact.json"))
        assert len(records) == 1, f"{tiny_store / stage}: {len(records)} finished artifacts, expected one"
        folder = records[0].parent
        if not str(dest).startswith("s3://"):
            shutil.copytree(folder, Path(dest) / stage / folder.name)
            continue
        bucket, _, prefix = str(dest).removeprefix("s3://").partition("/")
        client = s3_client(s3_env)
        # The record last, as a publication writes it: until then a reader sees no artifact.
        for path in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p == records[0]):
            key = posixpath.join(prefix, stage, folder.name, path.relative_to(folder).as_posix())
            client.upload_file(str(path), bucket, key)
