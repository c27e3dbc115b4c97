"""The flows on the session's Prefect server: a rerun's task runs are Cached, transient failures are
retried (and nothing else), the one-stage flow, and deployment mode's checks before it needs a
server with workers (tests/flows/test_server.py runs it on one)."""

import shutil
import threading
import time

import pytest

from data_specs.errors import GateFailed, InputError, StageError, TransientError
from flows.pipeline import gristmill_pipeline, gristmill_stage
from tasks.core.runner import StageResult, plan
from tasks.registry import PIPELINE
from tests.conftest import TINY_STORE_TIMEOUT_S, SpecFactory, assert_task_states, finetuned_f1, task_runs, tiny_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness(prefect_server):
    """The flows of this module run against the session's Prefect server (tests/conftest.py), set
    in Prefect's settings: Prefect read them when first imported, before the server's URL was in
    the environment. (prefect_test_harness started a server of its own: ~18 s.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert prefect_server, "the session's Prefect server is started for `slow` tests"
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield


def run(factory: SpecFactory, force: list[str] = ()):
    state = gristmill_pipeline(str(factory.write()), factory.store.url, until="dedup", force=list(force),
                               return_state=True)
    return state, state.result()


def test_rerun_shows_cached_task_runs(harness, project):
    first, results = run(project)
    assert [r.state for r in results] == ["built", "built"]
    assert_task_states(first.state_details.flow_run_id, {"ingest": "Completed", "dedup": "Completed"})

    second, results = run(project)
    assert [r.state for r in results] == ["cached", "cached"]
    assert_task_states(second.state_details.flow_run_id, {"ingest": "Cached", "dedup": "Cached"})

    third, results = run(project, force=["dedup"])
    assert [r.state for r in results] == ["cached", "built"]
    assert_task_states(third.state_details.flow_run_id, {"ingest": "Cached", "dedup": "Completed"})


def test_deleted_artifact_is_rebuilt_even_if_prefect_remembers_it(harness, project):
    run(project)
    for row in plan(project.load(), project.store):
        if row.name == "dedup":
            shutil.rmtree(row.path)
    _, results = run(project)
    assert [r.state for r in results] == ["cached", "built"]


# ---------------------------------------------------------------- the graph runs as a graph

def timed_builds(monkeypatch, fail: str | None = None, seconds: float = 0.3) -> tuple[list, list]:
    """Replaces the builds with ones that take `seconds` (the stage named `fail` then raises);
    returns the log of ("start"|"end", stage) events and a one-item list: the most builds at once."""
    from flows import pipeline

    lock, running, events, peak = threading.Lock(), set(), [], [0]

    def build(item, spec, store, force=False, placement=None):
        with lock:
            running.add(item.name)
            peak[0] = max(peak[0], len(running))
            events.append(("start", item.name))
        time.sleep(seconds)
        with lock:
            running.discard(item.name)
            events.append(("end", item.name))
        if item.name == fail:
            raise StageError(f"stage {fail!r} failed: ValueError: on purpose")
        return StageResult(item.name, item.fingerprint, "built", item.path, None)

    monkeypatch.setattr(pipeline, "execute", build)
    return events, peak


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_stages_start_when_their_inputs_are_done_at_most_max_parallel_at_once(harness, project, monkeypatch, limit):
    """Up to reader: after the corpus, tokenizer, qa and index are all ready; the run builds as many
    of them at once as max_parallel allows, and never a stage before what it reads has ended."""
    events, peak = timed_builds(monkeypatch)
    state = gristmill_pipeline(str(project.write()), project.store.url, until="reader", max_parallel=limit,
                               return_state=True)
    graph = PIPELINE.for_spec(project.load())
    names = [n for n in graph.names() if n in graph.ancestors("reader") | {"reader"}]
    assert {"tokenizer", "qa", "index"} <= set(names) and "sft" not in names
    assert [r.name for r in state.result()] == names  # in plan order, however they ran
    assert peak[0] == limit
    for name in names:
        for need in graph.needs(name):
            assert events.index(("end", need)) < events.index(("start", name)), (need, name)


def test_a_failed_stage_stops_what_reads_it_and_nothing_else(harness, project, monkeypatch):
    events, _ = timed_builds(monkeypatch, fail="tokenizer")
    state = gristmill_pipeline(str(project.write()), project.store.url, until="reader", max_parallel=2,
                               return_state=True)
    assert state.is_failed()
    with pytest.raises(StageError, match="tokenizer"):
        state.result()
    graph = PIPELINE.for_spec(project.load())
    stopped = {"pretrain", "midtrain", "reader"}  # what reads the tokenizer, directly or not
    assert stopped == {n for n in graph.ancestors("reader") | {"reader"} if "tokenizer" in graph.ancestors(n)}
    started = {name for kind, name in events if kind == "start"}
    assert started == graph.ancestors("reader") - stopped and {"qa", "index"} <= started
    assert_task_states(state.state_details.flow_run_id, {
        **{n: "Completed" for n in started - {"tokenizer"}}, "tokenizer": "Failed", **{n: "NotReady" for n in stopped}})


def test_max_parallel_below_one_is_bad_input(harness, project):
    state = gristmill_pipeline(str(project.write()), project.store.url, until="ingest", max_parallel=0,
                               return_state=True)
    with pytest.raises(InputError, match="max_parallel: 0; must be at least 1"):
        state.result()


# ---------------------------------------------------------------- regression gates

@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_a_failed_gate_fails_the_flow_run_after_every_stage_and_the_report(harness, tiny_store, tmp_path):
    """The state an automation reacts to: Failed, its message naming the gate, value and threshold,
    with every stage Cached and the report task Completed (the report written)."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    f1 = finetuned_f1(store)
    spec = tiny_copy(tmp_path, eval={"gates": [{"arm": "finetuned", "metric": "f1", "min": f1 + 0.01}]})
    state = gristmill_pipeline(str(spec), str(store), return_state=True)
    assert state.is_failed()
    expected = f"finetuned f1 >= {f1 + 0.01:.4g}: value {f1:.4g}, threshold {f1 + 0.01:.4g}"
    assert expected in state.message
    with pytest.raises(GateFailed, match="1 of 1 regression gate"):
        state.result()
    assert_task_states(state.state_details.flow_run_id, {**{s: "Cached" for s in PIPELINE.names()},
                                                         "report": "Completed"})
    assert "| **FAIL** |" in (store / "runs" / "tiny" / "report.md").read_text()


# ---------------------------------------------------------------- retries

def attempts_of(monkeypatch, failure: BaseException) -> list[str]:
    """Makes the first build of every stage raise `failure`, with no delay between retries;
    returns the list the fake appends each stage name to, once per attempt."""
    import flows.pipeline as pipeline

    calls: list[str] = []
    real_execute = pipeline.execute

    def flaky_execute(item, *args, **kwargs):
        calls.append(item.name)
        if calls.count(item.name) == 1:
            raise failure
        return real_execute(item, *args, **kwargs)

    monkeypatch.setattr(pipeline, "execute", flaky_execute)
    monkeypatch.setattr(pipeline, "run_stage", pipeline.run_stage.with_options(retry_delay_seconds=0))
    return calls


def wrapped_transient() -> StageError:
    """What the runner raises when a stage's build raises TransientError."""
    try:
        raise TransientError("s3: SlowDown")
    except TransientError as e:
        try:
            raise StageError("stage 'ingest' failed: TransientError: s3: SlowDown") from e
        except StageError as wrapped:
            return wrapped


@pytest.mark.parametrize("failure", [TransientError("s3: SlowDown"), wrapped_transient()], ids=["direct", "as-cause"])
def test_transient_failure_is_retried(harness, project, monkeypatch, failure):
    calls = attempts_of(monkeypatch, failure)
    state = gristmill_pipeline(str(project.write()), project.store.url, until="ingest", return_state=True)
    assert [r.state for r in state.result()] == ["built"]
    assert calls == ["ingest", "ingest"]
    assert_task_states(state.state_details.flow_run_id, {"ingest": "Completed"})
    runs = task_runs(state.state_details.flow_run_id)
    assert [(r.name, r.state.name, r.run_count) for r in runs] == [("ingest", "Completed", 2)]


@pytest.mark.parametrize("failure", [StageError("stage 'ingest' failed: ValueError: bug"),
                                     InputError("spec.yaml: corpus.sources: no files")], ids=["stage-error", "input-error"])
def test_other_failures_are_not_retried(harness, project, monkeypatch, failure):
    calls = attempts_of(monkeypatch, failure)
    state = gristmill_pipeline(str(project.write()), project.store.url, until="ingest", return_state=True)
    assert state.is_failed()
    assert calls == ["ingest"]
    with pytest.raises(type(failure), match=str(failure).split(":")[0]):
        state.result()


def test_retry_policy_is_exponential():
    import flows.pipeline as pipeline

    assert pipeline.run_stage.retries == pipeline.RETRIES == 2
    assert pipeline.run_stage.retry_delay_seconds == [pipeline.RETRY_BACKOFF_S, 2 * pipeline.RETRY_BACKOFF_S]


# ---------------------------------------------------------------- the one-stage flow, deployment mode

def test_stage_flow_runs_exactly_one_stage(harness, project):
    run(project)  # ingest and dedup built
    shutil.rmtree(next(p for p in plan(project.load(), project.store) if p.name == "dedup").path)
    result = gristmill_stage(str(project.write()), "dedup", project.store.url)
    assert (result.name, result.state) == ("dedup", "built")
    assert [p.name for p in plan(project.load(), project.store) if p.cached] == ["ingest", "dedup"]


def test_stage_flow_refuses_a_fingerprint_it_would_not_build(harness, project):
    run(project)
    state = gristmill_stage(str(project.write()), "dedup", project.store.url, fingerprint="0" * 16, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageError, match="has fingerprint .* but the pipeline planned 0000000000000000"):
        state.result()


def test_gpu_deployment_that_does_not_exist_is_bad_input_before_any_stage(harness, project):
    state = gristmill_pipeline(str(project.write()), project.store.url, until="pretrain",
                               gpu_deployment="gristmill-stage/nowhere", return_state=True)
    assert state.is_failed()
    with pytest.raises(InputError, match="gristmill-stage/nowhere: no such deployment"):
        state.result()
    assert not any(p.cached for p in plan(project.load(), project.store))


def test_gpu_deployment_is_not_needed_when_no_gpu_stage_runs(harness, project):
    # No GPU stage up to dedup: the run must not need (or look up) the deployment.
    state = gristmill_pipeline(str(project.write()), project.store.url, until="dedup",
                               gpu_deployment="gristmill-stage/nowhere", return_state=True)
    assert [r.state for r in state.result()] == ["built", "built"]


def test_gpu_stages_are_registered_stages():
    assert set(PIPELINE.gpu_stages()) <= set(PIPELINE.names())
    assert {"pretrain", "midtrain", "sft", "dpo", "reader", "eval"} == set(PIPELINE.gpu_stages())


# ---------------------------------------------------------------- Prefect's records on a remote store

@pytest.fixture
def s3_store(monkeypatch, tmp_path):
    """An empty bucket on a local S3 server (moto), reached through the real s3fs/botocore stack."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "HOME": str(tmp_path / "home")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="gristmill-prefect")
    yield "s3://gristmill-prefect/team"
    server.stop()


def test_remote_store_is_the_cache_and_holds_no_prefect_pickles(harness, project, s3_store):
    # A stage built by another worker shows as Cached because the shared store has it; Prefect
    # keeps no result there (a pickle in a shared bucket would be code every later run executes).
    import fsspec

    first = gristmill_pipeline(str(project.write()), s3_store, until="ingest", return_state=True)
    assert [r.state for r in first.result()] == ["built"]
    second = gristmill_pipeline(str(project.write()), s3_store, until="ingest", return_state=True)
    assert [r.state for r in second.result()] == ["cached"]
    assert_task_states(second.state_details.flow_run_id, {"ingest": "Cached"})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists("gristmill-prefect/team/.prefect")
