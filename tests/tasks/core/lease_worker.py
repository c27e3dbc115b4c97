"""A worker for the lease tests: takes a fingerprint's lease in a store and builds a stub artifact
under it, as a worker on another machine sharing the store would (tasks/core/lease.py).

    python -m tests.tasks.core.lease_worker STORE FINGERPRINT [--expiry S] [--build-s S] [--elsewhere]

It prints a JSON line {"holding": owner} once it holds the lease, and {"state": "built" | "cached"}
when done; its log (the "waiting for" lines) goes to stderr. --elsewhere makes its leases name
another machine, whose pids cannot be looked up here (a holder on another host). Also the stub
stage the runner tests build (`STUB`, one stage with no inputs, in `GRAPH`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from data_specs.schema import LeaseSpec
from tasks.core import lease
from tasks.core.artifacts import Documents
from tasks.core.files import checksum_tree
from tasks.core.graph import Graph, Wire
from tasks.core.lease import Lease, build_once
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.core.store import ArtifactRecord, ArtifactStore, now_iso

STAGE = "stub"
STUB_BUILD_S = 1.5  # long enough for a second worker to arrive while the first builds
BUILDS: list[str] = []  # one entry per stub stage build in this process


def publish_stub(store: ArtifactStore, fingerprint: str, held: Lease) -> str:
    """Builds and publishes a stub artifact naming its builder (the lease's owner); "built"."""
    out = store.new_build_dir(STAGE, fingerprint)
    (out / "payload.txt").write_text(held.info.owner)
    held.confirm()  # as the runner does right before publishing
    store.publish(out, ArtifactRecord(stage=STAGE, fingerprint=fingerprint, run_name="lease-test", key={},
                                      metrics={"builder": held.info.owner}, files=checksum_tree(out), wall_s=0.0,
                                      versions={}, created_at=now_iso()))
    return "built"


def stub_build(cfg: None, inputs: None, out: Path, ctx: RunContext) -> Metrics:
    """Sleeps STUB_BUILD_S, then writes one file."""
    BUILDS.append(str(out))
    time.sleep(STUB_BUILD_S)
    (out / "payload.txt").write_text("stub")
    return {"slept_s": STUB_BUILD_S}


STUB = Stage("stub", stub_build, output=Documents)
GRAPH = Graph(Wire(STUB))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("fingerprint")
    parser.add_argument("--expiry", type=float, default=2.0, help="lease.expiry_s")
    parser.add_argument("--build-s", type=float, default=STUB_BUILD_S, help="seconds the build holds the lease")
    parser.add_argument("--elsewhere", action="store_true", help="take leases as another machine would")
    args = parser.parse_args()
    logger = logging.getLogger("gristmill")
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(logging.INFO)
    if args.elsewhere:
        lease.this_machine = lambda: "another machine"
    store = ArtifactStore(args.store)

    def ready() -> str | None:
        return "cached" if store.load(STAGE, args.fingerprint) is not None else None

    def build(held: Lease | None) -> str:
        assert held is not None
        print(json.dumps({"holding": held.info.owner}), flush=True)
        if ready():  # published by another worker between our first look and our lease (as the runner checks)
            return "cached"
        time.sleep(args.build_s)
        return publish_stub(store, args.fingerprint, held)

    state = ready() or build_once(store, STAGE, args.fingerprint, LeaseSpec(expiry_s=args.expiry, wait_timeout_s=60),
                                  ready=ready, build=build, clear_hint="gristmill leases SPEC --clear")
    print(json.dumps({"state": state}), flush=True)


if __name__ == "__main__":
    main()
