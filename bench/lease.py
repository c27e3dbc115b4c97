"""Benchmark: what leases cost (tasks/core/lease.py). Two measures, each leased vs unleased
(`lease: null`) in the same process, on a local store and on S3 (a moto server on this machine,
reached through s3fs as a bucket would be):

- stages: the spec's cheap stages (ingest and dedup of tiny.yaml) planned and built through
  the runner (tasks.core.runner.prepare_run, then execute per stage; no Prefect), each run
  into a fresh store; the best of --repeats runs per variant counts;
- stub: --stub-builds artifacts of one small file published through build_once, each under a
  fresh fingerprint: the lease's own cost per build (create, one renewal before publishing,
  delete, the heartbeat thread), against a build that costs almost nothing.

After one uncounted warm-up run per store, the variants alternate (unleased, leased, leased,
unleased, ...) so slow phases of a shared machine hit both. A lease costs a few requests per build and none per cached stage, so the
stage ratio is expected within noise of 1.00; the stub figure is its absolute cost.

    PYTHONPATH=. python bench/lease.py [--spec data_specs/tiny.yaml] [--until dedup] [--repeats 3]
                                       [--stub-builds 20]

The last line per store is `<store> ratio=X.XX`: leased best over unleased best, for the stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from machine import describe  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
BUCKET = "gristmill-bench"


def order(repeats: int) -> list[bool]:
    """unleased, leased, leased, unleased, ...: each variant goes first as often as the other."""
    pairs = [(False, True) if i % 2 == 0 else (True, False) for i in range(repeats)]
    return [leased for pair in pairs for leased in pair]


def run_stages(spec: str, store: str, until: str, leased: bool) -> float:
    """Seconds to plan and build the spec's stages up to `until` into `store`."""
    from tasks.core.runner import execute, prepare_run

    start = time.perf_counter()
    run = prepare_run(spec, store, until=until, override=None if leased else json.dumps({"lease": None}))
    states = [execute(item, run.spec, run.store).state for item in run.stages]
    seconds = time.perf_counter() - start
    if set(states) != {"built"}:
        raise SystemExit(f"a fresh store {store} had cached stages: {states}")
    return seconds


def stub_builds(store_url: str, n: int, leased: bool) -> float:
    """Milliseconds per stub artifact built through build_once (each its own fingerprint)."""
    from data_specs.schema import LeaseSpec
    from tasks.core.files import checksum_tree
    from tasks.core.lease import build_once
    from tasks.core.store import ArtifactRecord, ArtifactStore, now_iso

    store = ArtifactStore(store_url)

    def build(fp: str) -> Callable:
        def publish(held) -> str:
            out = store.new_build_dir("stub", fp)
            (out / "payload.txt").write_text(fp)
            if held is not None:
                held.confirm()
            store.publish(out, ArtifactRecord(stage="stub", fingerprint=fp, run_name="bench", key={}, metrics={},
                                              files=checksum_tree(out), wall_s=0.0, versions={}, created_at=now_iso()))
            return "built"
        return publish

    start = time.perf_counter()
    for _ in range(n):
        fp = uuid.uuid4().hex
        build_once(store, "stub", fp, LeaseSpec() if leased else None, ready=lambda: None, build=build(fp),
                   clear_hint="-")
    return 1000 * (time.perf_counter() - start) / n


def moto_server(root: Path):
    """A moto S3 server on a free local port with the bench bucket; the AWS stack pointed at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    return server


def measure(name: str, base: Callable[[str], str], args: argparse.Namespace) -> None:
    """Both measures on one kind of store (`base(run name)` -> a fresh store URL); prints them."""
    warm = run_stages(args.spec, base("warm-up"), args.until, leased=False)  # imports, caches, first connections
    print(f"  {name} warm-up run (not counted): {warm:6.2f} s", flush=True)
    stages: dict[bool, list[float]] = {False: [], True: []}
    for i, leased in enumerate(order(args.repeats)):
        seconds = run_stages(args.spec, base(f"stages-{i}"), args.until, leased)
        stages[leased].append(seconds)
        print(f"  {name} run {i + 1} {'leased  ' if leased else 'unleased'}: {seconds:6.2f} s", flush=True)
    stub = {leased: min(stub_builds(base(f"stub-{i}-{leased}"), args.stub_builds, leased) for i in range(2))
            for leased in (False, True)}
    print(f"{name:5} stub build (1 file), best of 2 x {args.stub_builds}: unleased {stub[False]:.1f} ms, "
          f"leased {stub[True]:.1f} ms per build (+{stub[True] - stub[False]:.1f} ms), "
          f"ratio {stub[True] / stub[False]:.2f}")
    best = {leased: min(values) for leased, values in stages.items()}
    print(f"{name:5} {args.spec} up to {args.until}: unleased best {best[False]:.2f} s, leased best "
          f"{best[True]:.2f} s (means {sum(stages[False]) / len(stages[False]):.2f} / "
          f"{sum(stages[True]) / len(stages[True]):.2f} s)")
    print(f"{name} ratio={best[True] / best[False]:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(REPO / "data_specs" / "tiny.yaml"), help="run spec")
    parser.add_argument("--until", default="dedup", help="last stage built (the cheap data stages by default)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh runs of each variant (alternating); best counts")
    parser.add_argument("--stub-builds", type=int, default=20, help="stub artifacts per variant for the per-build cost")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-lease-"))
    os.environ["HOME"] = str(root / "home")  # the S3 store's local caches, fresh per store URL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(describe(), flush=True)
    print(f"spec {args.spec} up to {args.until}; {args.repeats} runs per variant, order "
          f"{' '.join('leased' if x else 'unleased' for x in order(args.repeats))}", flush=True)
    server = moto_server(root)
    try:
        measure("local", lambda run: str(root / run), args)
        measure("s3", lambda run: f"s3://{BUCKET}/{run}", args)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
