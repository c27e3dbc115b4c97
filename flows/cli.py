"""The `gristmill` command line.

    gristmill run SPEC [--store DIR_OR_URL] [--until STAGE | --only STAGE] [--force STAGE ...]
                       [--gpu-deployment FLOW/DEPLOYMENT [--gpu-device cuda|cpu]] [--trust-remote-code]
    gristmill plan SPEC [--store DIR_OR_URL] [--force STAGE ...] [--gpu-deployment FLOW/DEPLOYMENT] [--json]
    gristmill report SPEC [--store DIR_OR_URL]
    gristmill eval SPEC --questions FILE [--store DIR_OR_URL] [--trust-remote-code]
    gristmill leases SPEC [--store DIR_OR_URL] [--clear]

Exit codes: 0 success; 2 bad input (spec, files, stage names), with a message naming the file,
field or line; 1 a stage failed; 3 a regression gate failed (`eval.gates`, checked after eval by
`run` and `eval`): every stage finished and the report is written, and the message names each
failed gate, its value and its threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from data_specs.errors import GateFailed, InputError, StageError
from data_specs.loader import load_spec
from eval.questions import load_questions
from tasks.core.keys import Placement, local_device
from tasks.core.lease import clear_lease, expired, list_leases
from tasks.core.runner import (
    DEFAULT_STORE,
    PlannedStage,
    RunPlan,
    StageResult,
    cached_results,
    estimate_critical_path,
    pipeline,
    plan,
    prepare_run,
    resolve_store,
)
from tasks.run_report import publish_run_report, run_report_location

EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 1, 2, 3
# Prefect waits 20 s for its temporary server; a busy 2-core machine (four runs started together,
# each importing torch) needs longer.
SERVER_STARTUP_TIMEOUT_S = 120
log = logging.getLogger("gristmill")


def _offline_defaults() -> None:
    """Nothing downloads weights or datasets from a hub at run time."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(SERVER_STARTUP_TIMEOUT_S))


def _start_prefect_server() -> None:
    """Starts Prefect's temporary local server (when no PREFECT_API_URL names one) one process at
    a time, under a lock in PREFECT_HOME: runs started together on a fresh PREFECT_HOME would
    otherwise all migrate its SQLite database at once and fail ("duplicate column name")."""
    import fcntl

    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    # The server's app (~3 s of imports on 2 cores) only when this process starts it: a run
    # against a team's server (PREFECT_API_URL) never does.
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    with (home / "gristmill-server-start.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The timeout passed, not only set in the environment (_offline_defaults): a process that
        # imported Prefect before calling main() keeps the settings it read then (the tests' in-process
        # CLI timed out after Prefect's 20 s while three test workers shared 2 cores).
        timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), SERVER_STARTUP_TIMEOUT_S)
        SubprocessASGIServer().start(timeout=timeout)  # the instance Prefect's client uses for this process


def _print_plan(rows: Sequence[PlannedStage], out=None) -> None:
    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a redirect
    width = max(len(r.name) for r in rows)
    shown = set()
    for r in rows:
        state = "cached" if r.cached else f"build  ({r.reason})"
        print(f"  {r.name:<{width}}  {r.fingerprint}  {state}", file=out)
        if r.start is not None and r.start.field not in shown:  # what a run reference resolved to, once
            shown.add(r.start.field)
            print(f"  {'':<{width}}  from {r.start.describe()}", file=out)


def cmd_plan(args: argparse.Namespace) -> int:
    """Prints every stage's fingerprint, whether it is cached, and why not."""
    spec = load_spec(args.spec)
    store = resolve_store(spec, args.store)
    rows = plan(spec, store, force=args.force, placement=_placement(args))
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        print(f"plan for {spec.name} ({args.spec}), store {store.url}")
        _print_plan(rows)
        print(estimate_critical_path(rows, store, spec.name).describe())
    return EXIT_OK


def _placement(args: argparse.Namespace) -> Placement:
    """Where the stages run: here, or the GPU stages on the GPU work pool (--gpu-deployment)."""
    return Placement(gpu=args.gpu_device, data=local_device()) if args.gpu_deployment else Placement()


def cmd_run(args: argparse.Namespace) -> int:
    """Runs the pipeline (or part of it) through Prefect and prints each stage's artifact."""
    run = prepare_run(args.spec, args.store, until=args.until, only=args.only, force=args.force,
                      trust_remote_code=args.trust_remote_code, placement=_placement(args))
    print(f"run {run.spec.name} ({args.spec}), store {run.store.url}")
    _print_plan(run.stages)
    if not all(r.cached for r in run.stages):
        print(estimate_critical_path(run.stages, run.store, run.spec.name).describe())
    try:
        results = _all_cached(run) if _without_prefect_server() else None
        if results is None:
            from flows.pipeline import gristmill_pipeline  # Prefect is imported only when something runs

            _start_prefect_server()
            state = gristmill_pipeline(args.spec, args.store, until=args.until, only=args.only, force=args.force,
                                       gpu_deployment=args.gpu_deployment, trust_remote_code=args.trust_remote_code,
                                       gpu_device=args.gpu_device, max_parallel=args.max_parallel,
                                       return_state=True)
            results = state.result()  # raises the InputError, stage failure or GateFailed that ended the run
    except GateFailed:
        print(_report_paths(run.store, run.spec.name))  # every stage finished: the report shows the gates
        raise
    print("done:")
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"  {r.name:<{width}}  {r.state:<6}  {r.path}")
    if results[-1].name == "eval":
        print(_report_paths(run.store, run.spec.name))
    return EXIT_OK


def _without_prefect_server() -> bool:
    """True when no Prefect server is configured (PREFECT_API_URL unset): a run would start
    Prefect's temporary local server, whose record of the run nobody else sees."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def _all_cached(run: RunPlan) -> list[StageResult] | None:
    """The results of a run whose every stage the store holds, looked up without Prefect (starting
    its temporary server costs ~10 s and records nothing a team sees); None when anything must
    run. A team's server (PREFECT_API_URL) always gets the run through Prefect, to keep its record."""
    results = cached_results(run)
    if results is not None:
        log.info("every stage is cached; Prefect's temporary server not started")
        if any(r.name == "eval" for r in results):
            fingerprint = next(r for r in results if r.name == "eval").fingerprint
            failure = publish_run_report(run.store, run.spec.name, fingerprint, run.spec.eval.gates).failure
            if failure is not None:
                raise failure  # as the flow would fail: exit 3
    return results


def _report_paths(store, run_name: str) -> str:
    """Where the run's report is (tasks/run_report.py), HTML and Markdown."""
    html = run_report_location(store, run_name)
    return f"report: {html}\n        {html[: -len('.html')]}.md" if html else "report: none written yet"


def cmd_report(args: argparse.Namespace) -> int:
    """Prints where the spec's report is; exit 2 when its eval has not been built."""
    spec = load_spec(args.spec)
    store = resolve_store(spec, args.store)
    row = next(r for r in plan(spec, store) if r.name == "eval")
    if not row.cached:
        raise InputError(f"no report for {args.spec} in {store.url} yet ({row.reason}); run `gristmill run {args.spec}`")
    if run_report_location(store, spec.name) is None:  # built by another run name, or before run reports
        try:  # with its gates in the table; `report` only says where it is, so a failed gate is not exit 3 here
            publish_run_report(store, spec.name, row.fingerprint, spec.eval.gates)
        except OSError:  # a read-only store: the eval artifact's own report (without the run's name)
            print(f"report: {row.path}/report.html\n        {row.path}/report.md")
            return EXIT_OK
    print(_report_paths(store, spec.name))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Scores the existing models on a question file: only index and eval run (cached by the file)."""
    path = Path(args.questions).resolve()
    load_questions(path)  # a bad line is exit 2 before anything runs
    override = json.dumps({"eval": {"score_questions": str(path)}})
    run = prepare_run(args.spec, args.store, only="eval", override=override, trust_remote_code=args.trust_remote_code)
    print(f"eval {run.spec.name} on {path}, store {run.store.url}")
    _print_plan(run.stages)

    from flows.pipeline import gristmill_pipeline

    _start_prefect_server()
    state = gristmill_pipeline(args.spec, args.store, only="eval", override=override,
                               trust_remote_code=args.trust_remote_code, return_state=True)
    try:
        results = state.result()
    except GateFailed:
        print(_report_paths(run.store, run.spec.name))
        raise
    print(f"done: eval {results[0].state} {results[0].path}")
    print(_report_paths(run.store, run.spec.name))
    return EXIT_OK


def cmd_leases(args: argparse.Namespace) -> int:
    """Lists the store's leases (who builds what, since when, live or expired); --clear deletes them."""
    spec = load_spec(args.spec)
    store = resolve_store(spec, args.store)
    held = list_leases(store)
    if not held:
        print(f"no leases in {store.url}")
        return EXIT_OK
    print(f"leases in {store.url}:")
    now = time.time()
    for h in held:
        state = expired(h.info) or "live"
        print(f"  {h.info.stage}  {h.info.fingerprint}  {h.info.holder()}  building {now - h.info.started_at:.0f} s, "
              f"heartbeat {now - h.info.heartbeat_at:.0f} s ago: {state}\n    {h.location}")
    if args.clear:
        for h in held:
            print(f"{'cleared' if clear_lease(store, h.rel) else 'gone already'}: {h.location}")
        print("a holder that is still running takes its lease back at its next heartbeat: stop it first")
    return EXIT_OK


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (argparse exits 2 naming the flag otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def remote_code_flag(p: argparse.ArgumentParser) -> None:
    """--trust-remote-code: only here can a run allow model code (a spec file cannot)."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let model, tokenizer and embedder folders run their own Python code (an auto_map in "
                        "their config); off by default, and a spec file cannot turn it on. Weights still load "
                        "from safetensors only")


def gpu_device_flag(p: argparse.ArgumentParser) -> None:
    """--gpu-device: the device of the GPU work pool's workers (it is in the GPU stages' keys)."""
    p.add_argument("--gpu-device", choices=("cuda", "cpu"), default="cuda",
                   help="with --gpu-deployment: the device the GPU pool's workers train on (default cuda; cpu only "
                        "for a pool of CPU machines, e.g. to test the set-up); training on another device gives "
                        "other weights, so it is part of those stages' fingerprints")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gristmill", description="From a team's documents to a trained model "
                                     "and a RAG-vs-fine-tune verdict. Stages: " + ", ".join(pipeline().names()),
                                     epilog="exit codes: 0 success; 1 a stage failed; 2 bad input (spec, files, "
                                     "stage names); 3 a regression gate (eval.gates) failed after every stage "
                                     "finished and the report was written")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="run spec (YAML); relative paths in it are relative to its folder")
        p.add_argument("--store", metavar="DIR_OR_URL",
                       help=f"artifact store: a folder or an fsspec URL (default: the spec's store:, else ./{DEFAULT_STORE})")
        p.add_argument("--force", nargs="+", default=[], metavar="STAGE",
                       help="rebuild these stages (and the stages that read them) even if cached")

    run = sub.add_parser("run", help="run the pipeline; prints each stage's state and artifact path; exit 3 "
                         "when a regression gate (eval.gates) fails")
    common(run)
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (runs what it needs)")
    run.add_argument("--only", metavar="STAGE", help="run just this stage on cached upstream artifacts")
    run.add_argument("--gpu-deployment", metavar="FLOW/DEPLOYMENT",
                     help=f"run the GPU stages ({', '.join(pipeline().gpu_stages())}) that are not cached as flow "
                          "runs of this one-stage deployment (e.g. gristmill-stage/gpu) on the Prefect server at "
                          "PREFECT_API_URL; the store must be one every worker reaches (e.g. s3://...)")
    run.add_argument("--max-parallel", type=positive_int, metavar="N",
                     help="build at most N stages on this machine at once, each as soon as what it reads is done "
                          "(default: 1 on up to 4 cores, 2 above; stages sent to --gpu-deployment do not count)")
    gpu_device_flag(run)
    remote_code_flag(run)
    run.set_defaults(func=cmd_run)

    pl = sub.add_parser("plan", help="dry run: each stage's fingerprint, cached or not, and why")
    common(pl)
    pl.add_argument("--gpu-deployment", metavar="FLOW/DEPLOYMENT",
                    help="plan as a run with --gpu-deployment would: the GPU stages' keys hold the GPU pool's device")
    gpu_device_flag(pl)
    pl.add_argument("--json", action="store_true",
                    help="print a JSON list of {stage, fingerprint, cached, reason, path, resolved, from}; `from`: "
                         "what a run reference (pretrain.from: {run: NAME}) resolved to, or null")
    pl.set_defaults(func=cmd_plan)

    rep = sub.add_parser("report", help="print the path of the spec's RAG-vs-fine-tune report")
    rep.add_argument("spec", help="run spec (YAML)")
    rep.add_argument("--store", metavar="DIR_OR_URL", help="artifact store (default as for run)")
    rep.set_defaults(func=cmd_report)

    ev = sub.add_parser("eval", help="score the existing models on a question file, without retraining; exit 3 "
                        "when a regression gate (eval.gates) fails")
    ev.add_argument("spec", help="run spec (YAML) whose models to score")
    ev.add_argument("--questions", required=True, metavar="FILE",
                    help="JSONL: question, answers (list) or answer (string), optional doc_id")
    ev.add_argument("--store", metavar="DIR_OR_URL", help="artifact store (default as for run)")
    remote_code_flag(ev)
    ev.set_defaults(func=cmd_eval)

    ls = sub.add_parser("leases", help="list the store's leases (builds in progress on any machine); --clear "
                        "deletes them, to unblock waiting workers when a holder is gone")
    ls.add_argument("spec", help="run spec (YAML) whose store to look in")
    ls.add_argument("--store", metavar="DIR_OR_URL", help="artifact store (default as for run)")
    ls.add_argument("--clear", action="store_true",
                    help="delete every lease listed (a holder still running creates its lease again at its next "
                         "heartbeat, every lease.expiry_s / 4)")
    ls.set_defaults(func=cmd_leases)
    return parser


def _setup_logging() -> None:
    """gristmill's own progress lines on stderr; Prefect keeps its own handlers."""
    logger = logging.getLogger("gristmill")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s gristmill %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gristmill` command; returns the exit code."""
    _offline_defaults()
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"gristmill: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageError as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except GateFailed as e:
        print(f"gristmill: {e}; every artifact is kept (a rerun finds them cached)", file=sys.stderr)
        return EXIT_GATE_FAILED
    except KeyboardInterrupt:
        print("gristmill: interrupted; completed stages are kept and reused on the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
