"""The store on S3: tiny.yaml through the CLI against a real S3-compatible server (moto, in
server mode on 127.0.0.1), reached through the real client stack (s3fs → aiobotocore → HTTP).

The bucket starts seeded from the session's tiny store (tests/conftest.py `seed_store`) with
tiny's model stages, index and eval, which every run finds Cached. The first run still builds the
other five on S3 (ingest, dedup, quality, tokenizer, qa), each publishing its artifact to the
bucket; the last one rebuilds eval alone (`--only eval --force eval`), which downloads its four
inputs from the bucket (dpo's and the reader's models and the index seeded, qa's pairs built here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.registry import PIPELINE
from tests.conftest import REPO, S3_BUCKET, TINY, TINY_STORE_TIMEOUT_S, s3_client, seed_store

pytestmark = pytest.mark.slow

BUCKET = S3_BUCKET
SEEDED = {"pretrain", "midtrain", "sft", "dpo", "reader", "index", "eval"}


def gristmill(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, **env, "PREFECT_LOGGING_LEVEL": "WARNING"})


def states(stdout: str) -> dict[str, str]:
    """stage -> built/cached, from the table `gristmill run` ends with."""
    rows = [line.split() for line in stdout.split("done:", 1)[1].splitlines()[1:]]
    return {r[0]: r[1] for r in rows if len(r) == 3 and r[1] in ("built", "cached")}


def bucket_keys(env: dict[str, str]) -> list[str]:
    pages = s3_client(env).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.mark.timeout(TINY_STORE_TIMEOUT_S)  # it may build the session's tiny store
def test_tiny_on_s3_then_cached_then_only_eval(s3_env, tiny_store):
    store = f"s3://{BUCKET}/team/nightly"
    seed_store(tiny_store, store, SEEDED, s3_env)
    first = gristmill(s3_env, "run", str(TINY), "--store", store)
    assert first.returncode == 0, first.stderr[-4000:]
    assert states(first.stdout) == {s: "cached" if s in SEEDED else "built" for s in PIPELINE.names()}, first.stdout

    # Every artifact is in the bucket, payload and record, with the files its record lists.
    keys = set(bucket_keys(s3_env))
    plan = json.loads(gristmill(s3_env, "plan", str(TINY), "--store", store, "--json").stdout)
    assert all(row["cached"] for row in plan), plan
    for row in plan:
        prefix = f"team/nightly/{row['stage']}/{row['fingerprint']}/"
        assert prefix + "artifact.json" in keys, row
        body = s3_client(s3_env).get_object(Bucket=BUCKET, Key=prefix + "artifact.json")["Body"].read()
        assert {prefix + f for f in json.loads(body)["files"]} <= keys
        assert row["path"] == f"{store}/{row['stage']}/{row['fingerprint']}"
    # The store is the only cache: Prefect leaves no pickled result in the bucket.
    assert not any(k.startswith("team/nightly/.prefect/") for k in keys)

    again = gristmill(s3_env, "run", str(TINY), "--store", store)
    assert again.returncode == 0, again.stderr[-4000:]
    assert set(states(again.stdout).values()) == {"cached"}, again.stdout

    only = gristmill(s3_env, "run", str(TINY), "--store", store, "--only", "eval", "--force", "eval")
    assert only.returncode == 0, only.stderr[-4000:]
    assert states(only.stdout) == {"eval": "built"}, only.stdout
    report = gristmill(s3_env, "report", str(TINY), "--store", store)
    assert report.returncode == 0 and f"{store}/runs/tiny/report.html" in report.stdout, report.stdout + report.stderr
