"""Benchmark: what Prefect costs. The whole pipeline through `gristmill run` (the CLI: it plans,
then runs the `gristmill_pipeline` flow in Prefect's ephemeral mode, one task per stage) vs the
same stage functions called directly (tasks.core.runner.prepare_run, then execute for each stage in
order: no Prefect), each into a fresh store; then fully cached reruns of both.

Every run is a fresh process, so both variants pay the same interpreter start and imports
(a user's run pays them too). The variants alternate (direct, prefect, prefect, direct, ...)
so slow phases of a shared machine hit both, and the best time of each counts. Prefect's
database lives in a temporary PREFECT_HOME created before the first timed run (as on a
machine that has run gristmill before). Both variants must build the same artifacts (same
stages and fingerprints); the benchmark checks it. The code run is a snapshot of the
committed tree (git HEAD), since a fingerprint covers the code: an edit made while the
benchmark runs would otherwise rebuild stages of a "cached" rerun; --worktree runs the
working tree as it is.

    python bench/overhead.py [--spec data_specs/tiny.yaml] [--repeats 2] [--worktree] [--server]

--server measures a team's setup instead of the ephemeral mode: a `prefect server start` of its
own (in the temporary PREFECT_HOME) and PREFECT_API_URL pointing at it for every run, so the
prefect variant records its runs there, and a fully cached rerun goes through Prefect too.

The last line printed is `ratio=X.XX`: Prefect's best wall time over the direct one (1.00 is
no overhead; the goal is <= 1.05 on data_specs/python_docs.yaml). On a machine shared with
other jobs the stages' own times swing between runs far more than the overhead; the time
each run spends outside its stages (process wall time minus the stages' build times from
artifact.json: interpreter start, imports, planning, Prefect) is the steadier figure, and is
printed beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# As the CLI sets them (flows/cli.py), for both variants alike.
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
WARM_PREFECT = "from prefect import flow\n@flow\ndef warm():\n    pass\nwarm()\n"
# The direct variant: the stage functions in pipeline order, no Prefect (argv: spec, store).
DIRECT = ("import sys\nfrom tasks.core.runner import execute, prepare_run\n"
          "run = prepare_run(sys.argv[1], sys.argv[2])\n"
          "for item in run.stages:\n    execute(item, run.spec, run.store)\n")


def command(variant: str, spec: str, store: Path) -> list[str]:
    """The process one timed run starts (in the code folder: `-m` and `-c` import from there)."""
    if variant == "prefect":
        return [sys.executable, "-m", "flows.cli", "run", spec, "--store", str(store)]
    return [sys.executable, "-c", DIRECT, spec, str(store)]


def snapshot(folder: Path) -> tuple[Path, str]:
    """The committed tree (git HEAD) extracted into `folder`; returns it and the commit."""
    import tarfile

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    tar = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(folder, filter="data")
    return folder, commit


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Wall seconds of one process (its output goes to `log`); a failed run stops the benchmark."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited with {proc.returncode}; see {log}")
    return seconds


def artifacts(store: Path) -> dict[str, tuple[str, float]]:
    """stage -> (fingerprint, build seconds) of every artifact in a store."""
    out = {}
    for record in store.glob("*/*/artifact.json"):
        data = json.loads(record.read_text())
        out[data["stage"]] = (data["fingerprint"], data["wall_s"])
    return out


def order(repeats: int) -> list[str]:
    """direct, prefect, prefect, direct, ...: each variant goes first as often as the other."""
    pairs = [("direct", "prefect") if i % 2 == 0 else ("prefect", "direct") for i in range(repeats)]
    return [variant for pair in pairs for variant in pair]


def measure(spec: str, repeats: int, code: Path, root: Path,
            env: dict[str, str]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times fresh and fully cached runs of both variants, and each fresh run's time outside its
    stages; prints each run as it goes."""
    times: dict[str, list[float]] = {"direct": [], "prefect": [], "direct cached": [], "prefect cached": []}
    outside: dict[str, list[float]] = {"direct": [], "prefect": []}
    built: dict[str, dict[str, tuple[str, float]]] = {}
    for i, variant in enumerate(order(repeats)):
        store = root / f"store-{i}-{variant}"
        seconds = timed(command(variant, spec, store), code, env, root / f"run-{i}-{variant}.log")
        stages = artifacts(store)
        inside = sum(w for _, w in stages.values())
        times[variant].append(seconds)
        outside[variant].append(seconds - inside)
        built[f"{i}-{variant}"] = stages
        print(f"  run {i + 1} {variant:7}: {seconds:6.1f} s ({len(stages)} stages built, {inside:.1f} s inside "
              f"the stages, {seconds - inside:.1f} s outside)", flush=True)
        cached = timed(command(variant, spec, store), code, env, root / f"run-{i}-{variant}-cached.log")
        times[f"{variant} cached"].append(cached)
        print(f"  run {i + 1} {variant:7} rerun, all cached: {cached:5.1f} s", flush=True)
        if artifacts(store) != stages:
            sys.exit(f"the cached rerun of {variant} built something; see {root}")
    fingerprints = {name: {s: fp for s, (fp, _) in stages.items()} for name, stages in built.items()}
    if len({json.dumps(f, sort_keys=True) for f in fingerprints.values()}) != 1:
        sys.exit(f"the runs built different artifacts: {json.dumps(fingerprints, indent=1)}")
    return times, outside


def start_server(env: dict[str, str], root: Path) -> subprocess.Popen:
    """`prefect server start` on a free local port; sets PREFECT_API_URL in `env` once healthy."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    with (root / "server.log").open("wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env={**env, "PREFECT_UI_ENABLED": "false"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the Prefect server exited; see {root / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                env["PREFECT_API_URL"] = api
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"no healthy Prefect server after 180 s; see {root / 'server.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/tiny.yaml", help="run spec (the demo: data_specs/python_docs.yaml, "
                        "about 11 minutes per run on 2 cores)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh runs of each variant (alternating); best counts")
    parser.add_argument("--worktree", action="store_true", help="run the working tree as it is, not a snapshot of HEAD")
    parser.add_argument("--server", action="store_true", help="runs record to a Prefect server of their own "
                        "(PREFECT_API_URL), as a team's do, instead of Prefect's temporary one")
    args = parser.parse_args()

    # Kept when a run fails (its logs say why); removed after a complete benchmark.
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    code, commit = (REPO, "working tree") if args.worktree else snapshot(root / "code")
    env = {**os.environ, **ENV, "PREFECT_HOME": str(root / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    server = start_server(env, root) if args.server else None
    try:
        timed([sys.executable, "-c", WARM_PREFECT], code, env, root / "warm.log")  # creates Prefect's database
        print(f"spec: {args.spec} (code: {commit}); Prefect: {'a server of its own' if server else 'ephemeral'}; "
              f"{args.repeats} fresh runs of each variant, order {' '.join(order(args.repeats))}; each followed by a "
              "fully cached rerun", flush=True)
        times, outside = measure(args.spec, args.repeats, code, root, env)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    shutil.rmtree(root)

    mean = lambda values: sum(values) / len(values)
    print(f"{'variant':15} {'best s':>7} {'mean s':>7} {'outside stages, mean s':>23}")
    for name, values in times.items():
        extra = f" {mean(outside[name]):23.1f}" if name in outside else ""
        print(f"{name:15} {min(values):7.1f} {mean(values):7.1f}{extra}")
    print(f"Prefect adds {mean(outside['prefect']) - mean(outside['direct']):.1f} s outside the stages (mean)")
    print(f"cached ratio={min(times['prefect cached']) / min(times['direct cached']):.2f}")
    print(f"ratio={min(times['prefect']) / min(times['direct']):.2f}")


if __name__ == "__main__":
    main()
