"""Plans and runs stages: fingerprint, cache lookup, lock and lease, temp folder, atomic publish, record.

This is the one place that knows how a stage becomes an artifact; Prefect wraps `execute`
in a task (flows/pipeline.py) but nothing here depends on Prefect, so `bench/` can time
the same work without it. The store decides what an intact artifact is (`ArtifactStore.find`);
the runner only decides to build. A run reference (`pretrain.from: {run: NAME}`) is resolved
before any key is computed; tasks/core/references.py decides to what.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data_specs.errors import InputError, StageError
from data_specs.schema import RunSpec
from tasks.core.allocator import keep_freed_memory
from tasks.core.artifacts import Artifact
from tasks.core.faults import DiskFault, diagnose, from_os_error
from tasks.core.files import checksum_tree, make_gzip_reproducible
from tasks.core.fingerprint import explain_change, fresh, installed_version
from tasks.core.graph import Graph, critical_path
from tasks.core.keys import Placement, plan_keys, reads, stage_view
from tasks.core.lease import Lease, build_once
from tasks.core.references import Start, resolve
from tasks.core.stage import RunContext, Stage
from tasks.core.store import ArtifactRecord, ArtifactStore, now_iso

log = logging.getLogger("gristmill")

# Recorded in every artifact.json (provenance only: the key holds what changes outputs).
RECORDED_VERSIONS = ("torch", "transformers", "trl", "peft", "datatrove", "tokenizers", "prefect")


def pipeline() -> Graph:
    """The pipeline's graph (tasks/registry.py), imported when first needed: the stage modules
    import this package, so the registry cannot be imported at its top."""
    from tasks.registry import PIPELINE

    return PIPELINE


@dataclass(frozen=True)
class PlannedStage:
    """A stage with its fingerprint and whether the store already has its artifact."""

    name: str
    fingerprint: str
    key: dict[str, Any]
    cached: bool
    reason: str  # why it must be built; "" when cached
    path: str
    # Fingerprints of every stage upstream of this one (direct or not), for lineage.
    ancestry: dict[str, str] = field(default_factory=dict)
    # What its run reference resolved to (Stage.start_from holds one), for the build and the plan.
    start: Start | None = None
    # {spec field: (stage, fingerprint)} of other runs' artifacts it or a stage above it starts from (lineage).
    references: dict[str, tuple[str, str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The `gristmill plan --json` row."""
        return {"stage": self.name, "fingerprint": self.fingerprint, "cached": self.cached,
                "reason": self.reason or None, "path": self.path, "resolved": self.key.get("resolved") or None,
                "from": self.start.as_json() if self.start else None}

    @property
    def started(self) -> bool:
        """True when it starts from another run's artifact (not from scratch)."""
        return self.start is not None and self.start.source is not None


@dataclass(frozen=True)
class StageResult:
    """What running one stage did."""

    name: str
    fingerprint: str
    state: str  # "built" or "cached"
    path: str
    record: ArtifactRecord


def _latest(store: ArtifactStore, stage: str, run_name: str) -> ArtifactRecord | None:
    """The newest artifact record of this stage, preferring runs of the same spec name."""
    history = store.history(stage)
    same = [r for r in history if r.run_name == run_name]
    return (same or history)[-1] if history else None


def plan(spec: RunSpec, store: ArtifactStore, force: Sequence[str] = (), graph: Graph | None = None,
         placement: Placement = Placement()) -> list[PlannedStage]:
    """Every stage with its fingerprint, in pipeline order; `force` marks stages (and what depends
    on them) as to be rebuilt. `placement` says where stages run (their keys hold the device).
    Stages the spec skips (an optional stage whose section is null) are not planned."""
    graph = (graph or pipeline()).for_spec(spec)
    forced = graph.with_dependents(force)
    planned = []
    with fresh():  # code and input files hashed again for every plan: a long-lived worker misses no edit
        # Run references first (tasks/core/references.py): the keys of the stages starting from one hold
        # what it resolved to. Resolving may plan a stage with a candidate start, hence the callback.
        starts = resolve(spec, store, sorted({s.start_from for s in graph if s.start_from}),
                         lambda candidate, last: plan_keys(spec, graph, placement, candidate, last)[-1].fingerprint)
        resolved = {f: start.source for f, start in starts.items() if start.source}
        for k in plan_keys(spec, graph, placement, resolved):
            name, fp = k.stage.name, k.fingerprint
            found = store.find(name, fp)
            cached = found.record is not None
            if name in forced and cached:
                reason = "forced" if name in force else \
                    f"forced upstream ({', '.join(sorted(forced & graph.ancestors(name)))})"
                cached = False
            elif cached:
                reason = ""
            elif found.damage:
                reason = f"damaged: {found.damage}"
            else:
                reason = explain_change(previous.key if (previous := _latest(store, name, spec.name)) else None, k.key)
            planned.append(PlannedStage(name, fp, k.key, cached, reason, store.location(name, fp), k.ancestry,
                                        starts.get(k.stage.start_from or ""), k.references))
    return planned


def select(planned: list[PlannedStage], until: str | None = None, only: str | None = None,
           graph: Graph | None = None) -> list[PlannedStage]:
    """The stages a run executes: all, those up to `until`, or just `only`."""
    graph = graph or pipeline()
    if only is not None:
        graph.get(only)
        return [p for p in planned if p.name == only]
    if until is not None:
        graph.get(until)
        wanted = {until} | graph.ancestors(until)
        return [p for p in planned if p.name in wanted]
    return list(planned)


@dataclass(frozen=True)
class CriticalPath:
    """The chain of stages to build whose last builds' wall times add up most: the least time the
    run can take however many stages run at once."""

    stages: list[str]
    seconds: float  # along the path
    total_s: float  # of every stage to build, one after another
    unknown: list[str]  # stages to build with no earlier build in the store (counted as 0 s)

    def describe(self) -> str:
        """One line for `gristmill plan` and `gristmill run`."""
        if not self.stages:
            return "critical path: nothing to build"
        if self.seconds == 0 and self.unknown:
            return "critical path: not timed (no earlier run of these stages in this store)"
        line = (f"critical path: {' -> '.join(self.stages)}, ~{_minutes(self.seconds)} of ~{_minutes(self.total_s)} "
                f"of stages to build (their last builds' wall times in this store)")
        return line + (f"; not timed (no earlier run here): {', '.join(self.unknown)}" if self.unknown else "")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def estimate_critical_path(rows: Sequence[PlannedStage], store: ArtifactStore, run_name: str) -> CriticalPath:
    """The critical path among `rows` to build, each timed by the newest build of its stage in the
    store (of this run name if there is one, any fingerprint: what a rebuild is likely to take)."""
    seconds, unknown = {}, []
    for row in rows:
        if row.cached:
            continue
        latest = _latest(store, row.name, run_name)
        seconds[row.name] = latest.wall_s if latest else 0.0
        if latest is None:
            unknown.append(row.name)
    needs = {row.name: list(row.key.get("upstream", {})) for row in rows}
    path, along = critical_path(seconds, needs) if seconds else ([], 0.0)
    return CriticalPath(path, along, sum(seconds.values()), unknown)


DEFAULT_STORE = ".gristmill"


def gpu_count(spec: RunSpec, name: str) -> int:
    """GPUs a stage asks its work pool for: the spec's `resources.<stage>.gpus`, else 1."""
    return getattr(getattr(spec.resources, name, None), "gpus", 1)


def resolve_store(spec: RunSpec, flag: str | None) -> ArtifactStore:
    """`--store`, else the spec's `store:` (relative to the spec file), else ./.gristmill."""
    if flag:
        where: str | Path = flag
    elif spec.store:
        where = spec.store if "://" in spec.store else spec.resolve(spec.store)
    else:
        where = DEFAULT_STORE
    try:
        return ArtifactStore(where)
    except OSError as e:  # its folder cannot be created (a read-only parent, a file in the way)
        raise InputError(f"store {where}: cannot create its folder ({e.strerror}: {e.filename})") from e


def check_store_writable(store: ArtifactStore) -> None:
    """Bad input (exit 2) unless runs can write into the store, before anything starts."""
    try:
        store.check_writable()
    except OSError as e:
        raise InputError(f"the store {store.url} is not writable ({e.strerror}: {e.filename}); "
                         "pass a writable --store (plan and report only read)") from e


@dataclass(frozen=True)
class RunPlan:
    """What one `gristmill run` will do: the spec, the store, and the chosen stages."""

    spec: RunSpec
    store: ArtifactStore
    stages: list[PlannedStage]
    forced: frozenset[str]
    placement: Placement


def prepare_run(spec_path: str | Path, store: str | None = None, until: str | None = None,
                only: str | None = None, force: Sequence[str] = (), override: str | None = None,
                trust_remote_code: bool = False, placement: Placement = Placement()) -> RunPlan:
    """Loads the spec, plans every stage, and picks those to run; bad input raises InputError.

    `override` is JSON of spec fields set on top of the file (e.g. `gristmill eval`'s question
    file); it is validated like the file itself. `trust_remote_code` (the CLI's flag, which a
    spec file cannot set) lets model folders run their own code; it is not in any key. `placement`:
    see `plan`."""
    from data_specs.loader import load_spec

    if only and until:
        raise InputError("--only and --until cannot be used together")
    spec = load_spec(spec_path, override=json.loads(override) if override else None)
    if trust_remote_code:
        spec = spec.allowing_remote_code()
    st = resolve_store(spec, store)
    check_store_writable(st)
    graph = pipeline().for_spec(spec)
    rows = plan(spec, st, force=force, graph=graph, placement=placement)
    chosen = select(rows, until=until, only=only, graph=graph)
    by_name = {r.name: r for r in rows}
    names = {r.name for r in chosen}
    for item in chosen:
        for need in item.key["upstream"]:  # what it reads (a warm-started tokenizer reads no corpus)
            if need not in names and not by_name[need].cached:
                raise InputError(
                    f"--only {item.name}: its upstream stage {need!r} has no artifact for this spec in {st.url} "
                    f"({by_name[need].reason}); run `gristmill run {spec_path} --until {need}` first")
    forced = frozenset(r.name for r in chosen if r.reason.startswith("forced"))
    return RunPlan(spec, st, chosen, forced, placement)


def cached_results(run: RunPlan) -> list[StageResult] | None:
    """The results of a run whose every chosen stage is cached and not forced, each checked intact
    under its lock as `execute` would; None as soon as one must be built (a damaged one included:
    `execute` moves it aside, holding its lease, and rebuilds it)."""
    if run.forced or not all(item.cached for item in run.stages):
        return None
    results = []
    for item in run.stages:
        with run.store.lock(item.name, item.fingerprint):
            found = _cached(item, run.store)
        if found is None:
            return None
        results.append(found)
    return results


def execute(item: PlannedStage, spec: RunSpec, store: ArtifactStore, force: bool = False,
            graph: Graph | None = None, placement: Placement = Placement()) -> StageResult:
    """Builds one planned stage unless its artifact exists intact; publishes it atomically.

    Builds of one fingerprint take turns: under a file lock among the processes of this machine,
    and under a lease in the store among machines (tasks/core/lease.py): a worker that finds
    another building it waits for that artifact. A cached stage takes no lease. Damage is
    checked on use: the sizes of this stage's own cached artifact, the sha256 of every upstream
    artifact a build reads. A damaged artifact is moved aside (holding the lease) and rebuilt."""
    graph = (graph or pipeline()).for_spec(spec)
    stage = graph.get(item.name)
    try:
        inputs = _inputs(item, stage, spec, store, graph, placement)
        with store.lock(item.name, item.fingerprint):
            found = None if force else _cached(item, store)
            if found is not None:
                log.info("%s: cached %s", item.name, item.path)
                return found
            return build_once(store, item.name, item.fingerprint, spec.lease,
                              ready=lambda: None if force else _cached(item, store),
                              build=lambda lease: _turn(item, stage, spec, store, inputs, force, lease, graph),
                              clear_hint=f"gristmill leases {spec.spec_path} --store {store.url} --clear")
    except OSError as e:  # the store's own reads and writes (a build's are diagnosed in _build)
        fault = from_os_error(e, store.location(item.name, item.fingerprint))
        if fault is None:
            raise StageError(f"stage {item.name!r} failed: {type(e).__name__}: {e}") from e
        raise _fault_error(item.name, store, fault) from e


def _cached(item: PlannedStage, store: ArtifactStore) -> StageResult | None:
    """The stage's result when the store holds its artifact intact (sizes checked); None otherwise."""
    found = store.find(item.name, item.fingerprint)
    return None if found.record is None else StageResult(item.name, item.fingerprint, "cached", item.path,
                                                         found.record)


def _turn(item: PlannedStage, stage: Stage, spec: RunSpec, store: ArtifactStore, inputs: Any, force: bool,
          lease: Lease | None, graph: Graph) -> StageResult:
    """This worker's turn at a fingerprint (its lease held): the artifact if another worker
    published it meanwhile, else a build; a damaged artifact is moved aside first."""
    reason = item.reason or "forced"
    if not force:
        found = store.find(item.name, item.fingerprint, repair=True)
        if found.record is not None:
            log.info("%s: cached %s", item.name, item.path)
            return StageResult(item.name, item.fingerprint, "cached", item.path, found.record)
        reason = f"damaged: {found.damage}" if found.damage else reason
    return _build(item, stage, spec, store, inputs, reason, lease, _start(item, store, graph))


def _inputs(item: PlannedStage, stage: Stage, spec: RunSpec, store: ArtifactStore, graph: Graph,
            placement: Placement) -> Any:
    """The stage's inputs dataclass: one typed handle per role, each on an intact local folder."""
    if stage.inputs is None:
        return None
    producers, roles = reads(graph, stage, item.started), stage.roles()
    handles = {role: roles[role].at(_upstream(item, role, producers[role], spec, store, graph, placement))
               for role in producers}
    return stage.inputs(**handles)


def _start(item: PlannedStage, store: ArtifactStore, graph: Graph) -> Artifact | None:
    """The handle of the other run's artifact the stage starts from (ctx.start), its sha256 checked
    first. It is that run's to rebuild, not this one's: damaged (moved aside) or gone, it is bad
    input, and the next plan resolves to the newest intact one left."""
    if not item.started:
        return None
    start = item.start
    stage, fp = start.source
    found = store.find(stage, fp, deep=True)
    if found.record is None and found.damage:
        with store.lock(stage, fp):
            found = store.find(stage, fp, deep=True, repair=True)
    if found.record is None:
        what = f"damaged ({found.damage}), moved aside" if found.damage else f"no longer in {store.url}"
        raise InputError(f"{item.name}: {start.field} resolved to {stage} artifact {fp} of run {start.run!r}, "
                         f"which is {what}; run again to start from the newest intact one")
    return graph.get(stage).output.at(store.materialize(stage, fp))


def _upstream(item: PlannedStage, role: str, need: str, spec: RunSpec, store: ArtifactStore, graph: Graph,
              placement: Placement) -> Path:
    """The local folder of an upstream artifact this build reads, its sha256 checked first (the
    build reads every byte of it anyway); a damaged one is moved aside and rebuilt here."""
    up_fp = item.key["upstream"][need]
    if store.load(need, up_fp) is None:
        raise InputError(
            f"stage {item.name!r} needs the {need!r} artifact {up_fp}, which is not in {store.url}; "
            f"run `gristmill run {spec.spec_path} --until {need}` first"
        )
    if store.find(need, up_fp, deep=True).record is not None:
        return store.materialize(need, up_fp)
    with store.lock(need, up_fp):  # looked at again under the lock: another run may have moved it already
        found = store.find(need, up_fp, deep=True, repair=True)
    if found.record is None:
        row = next(r for r in plan(spec, store, graph=graph, placement=placement) if r.name == need)
        if row.fingerprint != up_fp:
            raise StageError(f"stage {item.name!r}: upstream {need!r} now plans as {row.fingerprint}, not {up_fp}: "
                             "its code or spec changed during this run; run again")
        execute(replace(row, reason=f"damaged: {found.damage}" if found.damage else row.reason), spec, store,
                graph=graph, placement=placement)
    return store.materialize(need, up_fp)


def _context(item: PlannedStage, stage: Stage, spec: RunSpec, store: ArtifactStore, work: Path,
             start: Artifact | None = None) -> RunContext:
    """What the build gets besides its config and inputs. Its lineage holds the records of the
    stages above it and, under their spec field (e.g. "pretrain.from"), of the other runs'
    artifacts it or they started from."""
    cfg, runtime, fields = stage_view(stage, spec)
    lineage = {}
    sources = {**item.references, **{name: (name, fp) for name, fp in item.ancestry.items()}}
    for name, (source_stage, fp) in sources.items():
        record = store.load(source_stage, fp)
        if record is not None:
            lineage[name] = record
    return RunContext(
        work=work, trust_remote_code=spec.trust_remote_code, spec_path=spec.spec_path,
        resolved=dict(item.key.get("resolved", {})), fields=fields, runtime=runtime,
        resources=getattr(spec.resources, stage.name, None), executor=spec.executor if stage.uses_executor else None,
        lineage=lineage, start=start,
        fetch=lambda name, rel: store.fetch_file(lineage[name].stage, lineage[name].fingerprint, rel)
        if name in lineage else None,
    )


def _build(item: PlannedStage, stage: Stage, spec: RunSpec, store: ArtifactStore, inputs: Any,
           reason: str, lease: Lease | None, source: Artifact | None = None) -> StageResult:
    """Builds a stage into a fresh temp folder and publishes it (`source`: ctx.start), unless it lost
    its lease meanwhile (LeaseLost: nothing published). Call with its lock and lease held."""
    store.clear_stale_builds(item.name, item.fingerprint)
    work = store.work_dir(item.name, item.fingerprint)
    out = store.new_build_dir(item.name, item.fingerprint)
    log.info("%s: building %s (%s)", item.name, item.fingerprint, reason)
    start = time.perf_counter()
    try:
        ctx = _context(item, stage, spec, store, work, source)
        cfg, _, _ = stage_view(stage, spec)
        keep_freed_memory()
        metrics = stage.build(cfg, inputs, out, ctx)
    except InputError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    except Exception as e:
        fault = diagnose(e, store.local_root, [out, work])  # before the evidence is cleaned up
        shutil.rmtree(out, ignore_errors=True)
        if fault is not None:
            raise _fault_error(item.name, store, fault) from e
        raise StageError(f"stage {item.name!r} failed: {type(e).__name__}: {e}") from e
    wall = time.perf_counter() - start
    try:
        make_gzip_reproducible(out)
        record = ArtifactRecord(
            stage=item.name, fingerprint=item.fingerprint, run_name=spec.name, key=item.key,
            metrics=metrics, files=checksum_tree(out), wall_s=round(wall, 3),
            versions={"python": platform.python_version(), **{d: installed_version(d) for d in RECORDED_VERSIONS}},
            created_at=now_iso(),
        )
        if lease is not None:
            lease.confirm()  # renewed right before publishing: a worker that was taken over publishes nothing
        path = store.publish(out, record)
    except BaseException:
        # Nothing half-published: no temp folder, no artifact folder without its record.
        shutil.rmtree(out, ignore_errors=True)
        store.clear_stale_builds(item.name, item.fingerprint)
        raise
    store.discard_work(item.name, item.fingerprint)
    log.info("%s: built in %.1f s -> %s", item.name, wall, path)
    return StageResult(item.name, item.fingerprint, "built", path, record)


def _fault_error(stage: str, store: ArtifactStore, fault: DiskFault) -> Exception:
    """The error a disk fault ends a stage with: an unwritable store is the user's input
    (InputError, exit 2); a full disk or a file-size limit fails the stage (exit 1)."""
    if fault.read_only:
        return InputError(f"stage {stage!r}: the store {store.url} is not writable ({fault.what}: {fault.path}); "
                          "pass a writable --store")
    return StageError(f"stage {stage!r} failed: {fault.what} writing {fault.path}; nothing of it was published: "
                      "free space (or lift the limit) and run again; completed stages are kept")
