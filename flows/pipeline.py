"""Prefect flows that wire the stages; all logic lives in tasks/.

`gristmill_pipeline` runs the planned stages in order, one Prefect task each. Prefect sees the same
cache key as the store (`StoreCachePolicy`), so its UI shows reused stages as Cached; the
store stays the source of truth: a stage whose artifact is missing from the store is always
re-run (`refresh_cache`), whatever Prefect remembers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem
from prefect.states import Failed, State

from data_specs.spec import RunSpec
from tasks.errors import InputError
from tasks.runner import PlannedStage, StageResult, execute, prepare_run
from tasks.store import ArtifactStore


@dataclass
class StoreCachePolicy(CachePolicy):
    """Prefect's cache key for a stage: its fingerprint, scoped to the store it lives in."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        item: PlannedStage = inputs["item"]
        store = hashlib.sha256(inputs["store_url"].encode()).hexdigest()[:12]
        return f"gristmill-{item.name}-{item.fingerprint}-{store}"


def result_storage(store: ArtifactStore) -> Path | str:
    """Prefect's cache records live beside the artifacts, so they travel (and vanish) with them.

    Prefect wants remote result storage as a saved block: one named after the store URL.
    """
    if store.is_local:
        return Path(store.root) / ".prefect"
    name = "gristmill-" + hashlib.sha256(store.url.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=f"{store.url}/.prefect").save(name, overwrite=True)
    return f"remote-file-system/{name}"


@task(cache_policy=StoreCachePolicy(), persist_result=True, task_run_name="{item.name}")
def run_stage(item: PlannedStage, spec: RunSpec, store_url: str, force: bool = False) -> StageResult:
    """Builds one stage's artifact unless the store has it (tasks/runner.py does the work)."""
    try:
        return execute(item, spec, ArtifactStore(store_url), force=force)
    except InputError as e:
        # The user's input, not a crash: fail with the message, without a traceback in the log.
        return Failed(message=str(e), data=e)


@flow(name="gristmill-pipeline")
def gristmill_pipeline(spec_path: str, store: str | None = None, until: str | None = None,
                       only: str | None = None, force: list[str] | None = None,
                       override: str | None = None) -> list[StageResult] | State:
    """Runs a spec's stages in order (all, up to `until`, or `only` one) against one store."""
    run = prepare_run(spec_path, store, until=until, only=only, force=force or [], override=override)
    storage = result_storage(run.store)
    results = []
    for item in run.stages:
        rebuild = item.name in run.forced
        stage_task = run_stage.with_options(
            result_storage=storage,
            # Not in the store (or forced): run it, and record the fresh result under the key.
            refresh_cache=rebuild or not item.cached,
        )
        state = stage_task(item, run.spec, run.store.url, force=rebuild, return_state=True)
        result = state.result(raise_on_failure=False)
        if isinstance(result, InputError):
            return state  # the flow run fails with the message; the CLI exits with code 2
        if isinstance(result, BaseException):
            raise result  # a crashed stage: its traceback belongs in the log
        if state.name == "Cached":
            # Prefect handed back the result it persisted when the stage was built.
            result = replace(result, state="cached")
        results.append(result)
    return results
