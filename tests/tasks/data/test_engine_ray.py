"""datatrove's Ray executor on a local Ray instance: ingest + dedup give the same fingerprints and
byte-identical outputs as the local executor, and a failed Ray task fails the stage."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from data_specs.errors import StageError
from data_specs.schema import ExecutorSpec
from tasks.core.runner import execute, plan
from tasks.data.engine import run_pipeline
from tests.conftest import SpecFactory, doc_text, write_jsonl

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (starting one costs seconds), shut down after."""
    with pytest.MonkeyPatch.context() as env:
        # Else Ray 2.60's ray.init() turns token auth on for this process (RAY_AUTH_MODE, kept after
        # shutdown) and writes ~/.ray/auth_token, which makes any later `ray start --head` on this
        # machine demand a token its worker nodes lack (test_engine_ray_cluster.py met it).
        env.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


def corpus(root: Path) -> SpecFactory:
    """30 documents, 4 exact copies and 3 one-word edits (near duplicates at threshold 0.8)."""
    docs = [{"id": f"d{i}", "text": doc_text(i, words=120)} for i in range(30)]
    docs += [{"id": f"copy{i}", "text": docs[i]["text"]} for i in range(4)]
    for i in range(10, 13):
        words = docs[i]["text"].split()
        words[random.Random(i).randrange(len(words))] = "zzzzzz"
        docs.append({"id": f"edit{i}", "text": " ".join(words)})
    write_jsonl(root / "data" / "docs.jsonl", docs)
    return SpecFactory(root)


def build_data_stages(factory: SpecFactory, kind: str, workers: int, **sections) -> dict[str, tuple[str, dict, dict]]:
    """stage -> (fingerprint, {payload file: sha256}, metrics) for ingest and dedup (spec `sections` added)."""
    spec = factory.load(executor={"kind": kind, "tasks": 2, "workers": workers}, **sections)
    out = {}
    for row in plan(spec, factory.store):
        if row.name in ("ingest", "dedup"):
            record = execute(row, spec, factory.store).record
            # logs/ holds datatrove's per-run timings and executor settings: not output.
            files = {path: meta["sha256"] for path, meta in record.files.items() if not path.startswith("logs/")}
            out[row.name] = (row.fingerprint, files, record.metrics)
    return out


def test_ray_executor_matches_the_local_one(tmp_path, local_ray):
    local = build_data_stages(corpus(tmp_path / "local"), "local", workers=1)
    on_ray = build_data_stages(corpus(tmp_path / "ray"), "ray", workers=2)
    for stage in ("ingest", "dedup"):
        fp_local, files_local, metrics_local = local[stage]
        fp_ray, files_ray, metrics_ray = on_ray[stage]
        assert fp_ray == fp_local  # the executor kind and worker count are out of the key
        assert files_ray == files_local and any(p.startswith("documents/") for p in files_ray)
        assert metrics_ray == metrics_local
    # The comparison covers real work: both kinds of duplicate were found and removed.
    dedup = on_ray["dedup"][2]
    assert dedup["exact_duplicates"] == 4 and dedup["near_duplicates"] == 3 and dedup["documents_out"] == 30, dedup
    ray_logs = tmp_path / "ray" / "store" / "dedup"
    assert list(ray_logs.glob("*/logs/minhash-1-signature/logs/task_00001.log"))  # task logs kept with the artifact


def test_a_failed_ray_task_fails_the_stage(tmp_path, local_ray):
    """datatrove's Ray executor only logs a failed task; run_pipeline must not return as if done."""

    def fail_on_rank_one(data, rank: int, world_size: int):  # pickled by value into the Ray worker
        if rank == 1:
            raise ValueError("a broken shard")
        return data

    with pytest.raises(StageError, match=r"datatrove broken: 1 of 2 task\(s\) did not complete on the ray executor "
                                         r"\(ranks 1\); their logs are in .*broken/logs"):
        run_pipeline([fail_on_rank_one], "broken", tmp_path, ExecutorSpec(kind="ray", tasks=2, workers=2))
    assert "a broken shard" in (tmp_path / "logs" / "broken" / "logs" / "task_00001.log").read_text()
