"""Prefect sees the store's cache: a rerun's task runs are in state Cached."""

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import gristmill_pipeline
from tasks.runner import plan
from tests.conftest import SpecFactory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def run(factory: SpecFactory, force: list[str] = ()):
    state = gristmill_pipeline(str(factory.write()), factory.store.url, until="dedup", force=list(force),
                               return_state=True)
    return state, state.result()


def test_rerun_shows_cached_task_runs(harness, project):
    first, results = run(project)
    assert [r.state for r in results] == ["built", "built"]
    assert task_states(first.state_details.flow_run_id) == {"ingest": "Completed", "dedup": "Completed"}

    second, results = run(project)
    assert [r.state for r in results] == ["cached", "cached"]
    assert task_states(second.state_details.flow_run_id) == {"ingest": "Cached", "dedup": "Cached"}

    third, results = run(project, force=["dedup"])
    assert [r.state for r in results] == ["cached", "built"]
    assert task_states(third.state_details.flow_run_id) == {"ingest": "Cached", "dedup": "Completed"}


def test_deleted_artifact_is_rebuilt_even_if_prefect_remembers_it(harness, project):
    import shutil

    run(project)
    for row in plan(project.load(), project.store):
        if row.name == "dedup":
            shutil.rmtree(row.path)
    _, results = run(project)
    assert [r.state for r in results] == ["cached", "built"]
