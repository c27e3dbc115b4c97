"""Prefect flows that wire the stages; all logic lives in tasks/.

`gristmill_pipeline` runs the planned stages as a graph, one Prefect task each: every stage is
submitted with `wait_for` on the stages it reads, so a stage starts as soon as its inputs are
published, and at most `max_parallel` stages build on this machine at once (default: 1 on a
machine of up to 4 cores, where two training stages would only share the same cores; 2 above).
A stage sent to the GPU work pool only waits here, so it takes none of those slots: with work
pools, index and qa build on the CPU worker while pretrain trains on the GPU pool. The artifact store
is the only cache: a stage it holds ends in a task state named Cached (so the UI shows reuse
as usual), and Prefect persists no result of its own, so nothing of Prefect's has to be shared
between workers, and no pickle in a shared bucket is ever loaded.

`gristmill_stage` runs exactly one stage; it is what the GPU work pool's deployment runs. With
`gpu_deployment` set, the pipeline runs the data stages itself and each GPU stage that is not
cached (the stages marked `gpu` in tasks/registry.py) as a flow run of that deployment, waiting for it. Both flows
use one artifact store, passed explicitly, so a stage built on the GPU pool shows as Cached in
the next nightly run wherever it runs.

After eval, the run's report checks `eval.gates`; a failed gate ends the pipeline's flow run
Failed (its message names each failed gate, its value and threshold), after every artifact and
the report are published, so an automation on the Failed state can tell the team.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import TaskRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff

from data_specs.errors import InputError, StageError, TransientError
from data_specs.schema import GateSpec, RunSpec
from tasks.core.keys import Placement, local_device
from tasks.core.runner import PlannedStage, RunPlan, StageResult, execute, gpu_count, pipeline, prepare_run
from tasks.core.store import ArtifactStore
from tasks.run_report import RunReport, publish_run_report

# A stage failing with TransientError (remote store I/O, an API that kept failing) is retried
# twice, after 30 s and 60 s: long enough for a throttled bucket or API to recover, short
# next to a training stage. Anything else fails at once: retrying bad input or a bug only
# repeats the failure.
RETRIES = 2
RETRY_BACKOFF_S = 30.0
# How often the pipeline asks the server whether a GPU stage's flow run has finished (s).
DEPLOYMENT_POLL_S = 2.0


def store_url(store: ArtifactStore) -> str:
    """The store as every worker must name it: a local folder as its absolute path."""
    return store.root if store.is_local else store.url


def is_transient(exc: BaseException | None) -> bool:
    """True when a TransientError is the failure or its cause (the runner wraps a stage's
    own exceptions in StageError, keeping the original as `__cause__`)."""
    while exc is not None:
        if isinstance(exc, TransientError):
            return True
        exc = exc.__cause__
    return False


def retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect's retry condition for a stage: retry only transient failures."""
    return is_transient(state.result(raise_on_failure=False))


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{item.name}",
      retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
      retry_condition_fn=retry_transient)
def run_stage(item: PlannedStage, spec: RunSpec, store_url: str, force: bool = False,
              placement: Placement = Placement(), slots: threading.Semaphore | None = None) -> StageResult | State:
    """Builds one stage's artifact unless the store has it (tasks/runner.py does the work), in
    one of `slots` (the pipeline's bound on stages building here at once) when given.

    The store is the only cache: a stage it already holds ends in a state named Cached, which
    Prefect's UI shows like one of its own cache hits. Prefect keeps no result of its own
    (persisting one would put a cloudpickle in the shared store that every later run unpickles,
    so anyone able to write to the bucket could run code on every worker)."""
    try:
        with slots or nullcontext():
            result = execute(item, spec, ArtifactStore(store_url), force=force, placement=placement)
    except InputError as e:
        # The user's input, not a crash: fail with the message, without a traceback in the log.
        return Failed(message=str(e), data=e)
    if result.state == "cached":
        return Completed(name="Cached", message=f"in the store: {result.path}", data=result)
    return result


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="report")
def run_report(run_name: str, store_url: str, fingerprint: str, gates: tuple[GateSpec, ...] = ()) -> RunReport:
    """The run's own report from its eval artifact: its name, what changed, its gates (tasks/run_report.py)."""
    return publish_run_report(ArtifactStore(store_url), run_name, fingerprint, gates)


def run_here(item: PlannedStage, run: RunPlan) -> StageResult | State:
    """Runs one planned stage as a task of this flow; a failed state for bad input."""
    return outcome(run_stage(item, run.spec, store_url(run.store), force=item.name in run.forced,
                             placement=run.placement, return_state=True))


def outcome(state: State) -> StageResult | State:
    """A finished stage task's result; its state when bad input failed it (the flow run fails with
    the message, the CLI exits with code 2); a crashed stage's exception is raised (its traceback
    belongs in the log)."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, InputError):
        return state
    if isinstance(result, BaseException):
        raise result
    return result


@contextmanager
def logs_to_prefect() -> Iterator[None]:
    """While a flow runs, gristmill's progress and lease lines (the "gristmill" logger, INFO) also
    go to the Prefect API as its flow run's logs (the UI shows them), as PREFECT_LOGGING_EXTRA_LOGGERS
    =gristmill would do without each worker having to set it. On a worker they print as Prefect's
    own do (the logger propagates to the root's console handler); the CLI prints them itself. Undone
    after the flow: outside a flow run the API handler has no run to log to."""
    logger = logging.getLogger("gristmill")
    added = [h for h in logging.getLogger("prefect.extra").handlers if h not in logger.handlers]
    level = logger.level
    for handler in added:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            logger.removeHandler(handler)
        logger.setLevel(level)


def default_parallel() -> int:
    """Stages that build on this machine at once when the run does not say: 1 up to 4 cores (each
    training stage uses every core: two would share them and finish no sooner), 2 above."""
    return 1 if (os.cpu_count() or 1) <= 4 else 2


def check_deployment(name: str) -> None:
    """Bad input unless the Prefect API this run talks to has the deployment `name`."""
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except (ObjectNotFound, ValueError) as e:
        api = PREFECT_API_URL.value() or "none set: this run uses a temporary local server"
        raise InputError(f"--gpu-deployment {name}: no such deployment (flow/deployment) on the Prefect API "
                         f"({api}); set PREFECT_API_URL to the team's server and run `prefect deploy --all` "
                         f"(README: Running nightly for a team)") from e


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{item.name} (on {name})")
def run_on_deployment(name: str, item: PlannedStage, run: RunPlan, spec_path: str,
                      override: str | None) -> StageResult:
    """Runs one stage as a flow run of the one-stage deployment `name` and waits for it; its
    failure fails this run with its message. The artifact is then read from the shared store."""
    child = run_deployment(
        name,
        parameters={"spec_path": spec_path, "stage": item.name, "store": store_url(run.store),
                    "force": item.name in run.forced, "override": override, "fingerprint": item.fingerprint,
                    "trust_remote_code": run.spec.trust_remote_code, "gpu_device": run.placement.gpu,
                    "data_device": run.placement.data},
        job_variables={"gpu_count": gpu_count(run.spec, item.name)},  # resources.<stage>.gpus, else 1
        flow_run_name=f"{run.spec.name}-{item.name}", timeout=None, poll_interval=DEPLOYMENT_POLL_S,
    )
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "no state"
        message = child.state.message if child.state else ""
        raise StageError(f"stage {item.name!r} failed in flow run {child.name!r} of {name} ({state}): {message}")
    record = run.store.load(item.name, item.fingerprint)
    if record is None:
        raise StageError(f"stage {item.name!r}: flow run {child.name!r} of {name} completed, but artifact "
                         f"{item.fingerprint} is not in {run.store.url}: the GPU worker must use the same store")
    return StageResult(item.name, item.fingerprint, "built", item.path, record)


def run_graph(run: RunPlan, remote: set[str], max_parallel: int, gpu_deployment: str | None, spec_path: str,
              override: str | None) -> list[StageResult] | State:
    """Every planned stage as a task that waits for the stages it reads (`wait_for`), at most
    `max_parallel` building here at once (the `remote` ones wait for their flow run on the
    deployment and take no slot); the results in plan order, or the first failed state."""
    slots = threading.BoundedSemaphore(max_parallel)
    futures = {}
    with ThreadPoolTaskRunner(max_workers=max(len(run.stages), 1)) as runner:  # a thread per stage, mostly waiting
        for item in run.stages:
            after = [futures[n] for n in item.key["upstream"] if n in futures]  # the others are cached
            if item.name in remote:
                futures[item.name] = runner.submit(run_on_deployment, {
                    "name": gpu_deployment, "item": item, "run": run, "spec_path": spec_path, "override": override},
                    wait_for=after)
            else:
                futures[item.name] = runner.submit(run_stage, {
                    "item": item, "spec": run.spec, "store_url": store_url(run.store), "force": item.name in run.forced,
                    "placement": run.placement, "slots": slots}, wait_for=after)
        for future in futures.values():
            future.wait()
    results = []
    for future in futures.values():  # in plan order: the first failure is the one upstream
        if future.state.name == "NotReady":
            continue  # a stage downstream of a failure never started
        result = outcome(future.state)
        if isinstance(result, State):
            return result
        results.append(result)
    return results


@flow(name="gristmill-pipeline")
@logs_to_prefect()  # a context manager, used as a decorator: Prefect reads the signature through it
def gristmill_pipeline(spec_path: str, store: str | None = None, until: str | None = None,
                       only: str | None = None, force: list[str] | None = None,
                       override: str | None = None, gpu_deployment: str | None = None,
                       trust_remote_code: bool = False, gpu_device: str = "cuda",
                       max_parallel: int | None = None) -> list[StageResult] | State:
    """Runs a spec's stages (all, up to `until`, or `only` one) against one store, each as soon
    as the stages it reads are done, at most `max_parallel` building here at once (default:
    `default_parallel()`); with `gpu_deployment`, GPU stages to build run as flow runs of that
    deployment, whose workers have `gpu_device`. `trust_remote_code` is the CLI's
    --trust-remote-code (a spec file cannot set it)."""
    if max_parallel is not None and max_parallel < 1:
        error = InputError(f"max_parallel: {max_parallel}; must be at least 1")
        return Failed(message=str(error), data=error)
    placement = Placement(gpu=gpu_device, data=local_device()) if gpu_deployment else Placement()
    run = prepare_run(spec_path, store, until=until, only=only, force=force or [], override=override,
                      trust_remote_code=trust_remote_code, placement=placement)
    # A cached stage needs no GPU: it is looked up here, like any other.
    gpu = set(pipeline().gpu_stages())
    remote = {i.name for i in run.stages if gpu_deployment and i.name in gpu and not i.cached}
    if remote:
        try:
            check_deployment(gpu_deployment)
        except InputError as e:
            return Failed(message=str(e), data=e)  # before any stage runs; the CLI exits with code 2
    results = run_graph(run, remote, max_parallel or default_parallel(), gpu_deployment, spec_path, override)
    if isinstance(results, State):
        return results
    for result in results:
        if result.name == "eval":
            report = run_report(run.spec.name, store_url(run.store), result.fingerprint, run.spec.eval.gates)
            if report.failure is not None:
                return Failed(message=str(report.failure), data=report.failure)  # the CLI exits with code 3
    return results


@flow(name="gristmill-stage")
@logs_to_prefect()  # a context manager, used as a decorator: Prefect reads the signature through it
def gristmill_stage(spec_path: str, stage: str, store: str, force: bool = False, override: str | None = None,
                    fingerprint: str | None = None, trust_remote_code: bool = False,
                    gpu_device: str | None = None, data_device: str | None = None) -> StageResult | State:
    """Runs one stage of a spec on the cached artifacts of its upstream stages in `store`.

    `fingerprint` is the one the calling pipeline planned, with the devices it planned for
    (`gpu_device`, `data_device`): a worker whose code, libraries or spec differ would build
    another artifact than the pipeline waits for, so it refuses."""
    run = prepare_run(spec_path, store, only=stage, force=[stage] if force else [], override=override,
                      trust_remote_code=trust_remote_code, placement=Placement(gpu=gpu_device, data=data_device))
    item = run.stages[0]
    if fingerprint and item.fingerprint != fingerprint:
        raise StageError(f"stage {stage!r} has fingerprint {item.fingerprint} on this worker, but the pipeline "
                         f"planned {fingerprint}: this worker's code, libraries or spec files differ from the "
                         f"pipeline's (deploy the same commit and environment to every work pool)")
    return run_here(item, run)
