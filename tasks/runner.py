"""Plans and runs stages: fingerprint, cache lookup, lock, temp folder, atomic publish, record.

This is the one place that knows how a stage becomes an artifact; Prefect wraps `execute`
in a task (flows/pipeline.py) but nothing here depends on Prefect, so `bench/` can time
the same work without it.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from data_specs.spec import RunSpec
from tasks.errors import InputError, StageError
from tasks.faults import DiskFault, diagnose, from_os_error
from tasks.fingerprint import code_digest, digest_key, explain_change, lib_versions
from tasks.registry import STAGES, get_stage, stage_names
from tasks.stage import Stage
from tasks.store import (
    ArtifactRecord,
    ArtifactStore,
    checksum_tree,
    make_gzip_reproducible,
    now_iso,
)

log = logging.getLogger("gristmill")

# Recorded in every artifact.json (provenance only: the key holds what changes outputs).
RECORDED_VERSIONS = ("torch", "transformers", "trl", "peft", "datatrove", "tokenizers", "prefect")


@dataclass(frozen=True)
class PlannedStage:
    """A stage with its fingerprint and whether the store already has its artifact."""

    name: str
    fingerprint: str
    key: dict[str, Any]
    cached: bool
    reason: str  # why it must be built; "" when cached
    path: str

    def as_json(self) -> dict[str, Any]:
        """The `gristmill plan --json` row."""
        return {"stage": self.name, "fingerprint": self.fingerprint, "cached": self.cached,
                "reason": self.reason or None, "path": self.path}


@dataclass(frozen=True)
class StageResult:
    """What running one stage did."""

    name: str
    fingerprint: str
    state: str  # "built" or "cached"
    path: str
    record: ArtifactRecord


def stage_key(stage: Stage, spec: RunSpec, upstream: dict[str, str]) -> dict[str, Any]:
    """Everything that determines a stage's output (see tasks/fingerprint.py)."""
    return {
        "stage": stage.name,
        "code": dict(code_digest(stage.module)),
        "libs": lib_versions(stage.libs),
        "spec": stage.spec_view(spec),
        "inputs": stage.external_inputs(spec),
        "upstream": upstream,
    }


def _previous_key(store: ArtifactStore, stage: str, run_name: str) -> dict[str, Any] | None:
    """The key of the latest artifact of this stage, preferring runs of the same spec name."""
    history = store.history(stage)
    same = [r for r in history if r.run_name == run_name]
    latest = (same or history)[-1:] if history else []
    return latest[0].key if latest else None


def damage_of(store: ArtifactStore, stage: str, fingerprint: str, deep: bool = False) -> str | None:
    """None when the store has this artifact intact; "" when it has none (or only a killed
    build's partial folder); else what is damaged (sizes, and sha256 when `deep`)."""
    record, problem = store.read(stage, fingerprint)
    if problem:
        return problem
    if record is None:
        return ""
    problems = store.verify(record, deep=deep)
    if not problems:
        return None
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def plan(spec: RunSpec, store: ArtifactStore, force: Sequence[str] = ()) -> list[PlannedStage]:
    """Every stage with its fingerprint, in pipeline order; `force` marks stages (and what
    depends on them) as to be rebuilt."""
    forced = _with_dependents(force)
    fingerprints: dict[str, str] = {}
    planned = []
    for stage in STAGES:
        key = stage_key(stage, spec, {n: fingerprints[n] for n in stage.needs})
        fp = digest_key(key)
        fingerprints[stage.name] = fp
        damage = damage_of(store, stage.name, fp)
        cached = damage is None
        if stage.name in forced and cached:
            reason = "forced" if stage.name in force else f"forced upstream ({', '.join(sorted(forced & set(ancestors(stage.name))))})"
            cached = False
        elif cached:
            reason = ""
        elif damage:
            reason = f"damaged: {damage}"
        else:
            reason = explain_change(_previous_key(store, stage.name, spec.name), key)
        planned.append(PlannedStage(stage.name, fp, key, cached, reason, store.location(stage.name, fp)))
    return planned


def ancestors(name: str) -> set[str]:
    """Every stage that `name` reads, directly or not."""
    out: set[str] = set()
    todo = list(get_stage(name).needs)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(get_stage(n).needs)
    return out


def _with_dependents(names: Sequence[str]) -> set[str]:
    """The named stages and every stage downstream of one of them."""
    for n in names:
        get_stage(n)  # raises InputError for an unknown stage
    return {s.name for s in STAGES if s.name in names or ancestors(s.name) & set(names)}


def select(planned: list[PlannedStage], until: str | None = None, only: str | None = None) -> list[PlannedStage]:
    """The stages a run executes: all, those up to `until`, or just `only`."""
    names = stage_names()
    if only is not None:
        get_stage(only)
        return [p for p in planned if p.name == only]
    if until is not None:
        get_stage(until)
        wanted = {until} | ancestors(until)
        return [p for p in planned if p.name in wanted]
    return [p for p in planned if p.name in names]


DEFAULT_STORE = ".gristmill"


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


def prepare_run(spec_path: str | Path, store: str | None = None, until: str | None = None,
                only: str | None = None, force: Sequence[str] = (), override: str | None = None,
                trust_remote_code: bool = False) -> RunPlan:
    """Loads the spec, plans every stage, and picks those to run; bad input raises InputError.

    `override` is JSON of spec fields set on top of the file (e.g. `gristmill eval`'s question
    file); it is validated like the file itself. `trust_remote_code` (the CLI's flag, which a
    spec file cannot set) lets model folders run their own code; it is not in any key."""
    from data_specs.spec import load_spec

    if only and until:
        raise InputError("--only and --until cannot be used together")
    spec = load_spec(spec_path, override=json.loads(override) if override else None)
    if trust_remote_code:
        spec = spec.allowing_remote_code()
    st = resolve_store(spec, store)
    check_store_writable(st)
    rows = plan(spec, st, force=force)
    chosen = select(rows, until=until, only=only)
    by_name = {r.name: r for r in rows}
    names = {r.name for r in chosen}
    for item in chosen:
        for need in get_stage(item.name).needs:
            if need not in names and not by_name[need].cached:
                raise InputError(
                    f"--only {item.name}: its upstream stage {need!r} has no artifact for this spec in {st.url} "
                    f"({by_name[need].reason}); run `gristmill run {spec_path} --until {need}` first")
    forced = frozenset(r.name for r in chosen if r.reason.startswith("forced"))
    return RunPlan(spec, st, chosen, forced)


def execute(item: PlannedStage, spec: RunSpec, store: ArtifactStore, force: bool = False) -> StageResult:
    """Builds one planned stage unless its artifact exists intact; publishes it atomically.

    Damage is checked on use: the sizes of this stage's own cached artifact, the sha256 of every
    upstream artifact a build reads. A damaged artifact is moved aside and rebuilt."""
    stage = get_stage(item.name)
    try:
        inputs = {need: _upstream(item, need, spec, store) for need in stage.needs}
        if stage.wants_previous:
            earlier = [r for r in store.history(item.name)
                       if r.run_name == spec.name and r.fingerprint != item.fingerprint and not store.verify(r)]
            if earlier:
                inputs["previous"] = store.materialize(item.name, earlier[-1].fingerprint)
        with store.lock(item.name, item.fingerprint):
            reason = item.reason or "forced"
            if not force:
                record, damage = _intact_or_moved(store, item.name, item.fingerprint, deep=False)
                if record is not None:
                    log.info("%s: cached %s", item.name, item.path)
                    return StageResult(item.name, item.fingerprint, "cached", item.path, record)
                reason = f"damaged: {damage}" if damage else reason
            return _build(item, stage, spec, store, inputs, reason)
    except OSError as e:  # the store's own reads and writes (a build's are diagnosed in _build)
        fault = from_os_error(e, store.location(item.name, item.fingerprint))
        if fault is None:
            raise StageError(f"stage {item.name!r} failed: {type(e).__name__}: {e}") from e
        raise _fault_error(item.name, store, fault) from e


def _intact_or_moved(store: ArtifactStore, stage: str, fingerprint: str,
                     deep: bool) -> tuple[ArtifactRecord | None, str]:
    """(record, "") of an intact artifact; (None, "") when there is none; (None, what is damaged)
    for a damaged one, which is moved aside with a warning. Call with the fingerprint's lock held."""
    damage = damage_of(store, stage, fingerprint, deep=deep)
    if not damage:
        return (store.load(stage, fingerprint) if damage is None else None), ""
    where = store.quarantine(stage, fingerprint)
    log.warning("%s: artifact %s is damaged (%s); moved aside to %s; rebuilding it",
                stage, store.location(stage, fingerprint), damage, where)
    return None, damage


def _upstream(item: PlannedStage, need: str, spec: RunSpec, store: ArtifactStore) -> Path:
    """The local folder of an upstream artifact this build reads, its sha256 checked first (the
    build reads every byte of it anyway); a damaged one is moved aside and rebuilt here."""
    up_fp = item.key["upstream"][need]
    if store.load(need, up_fp) is None:
        raise InputError(
            f"stage {item.name!r} needs the {need!r} artifact {up_fp}, which is not in {store.url}; "
            f"run `gristmill run {spec.spec_path} --until {need}` first"
        )
    if not damage_of(store, need, up_fp, deep=True):
        return store.materialize(need, up_fp)
    with store.lock(need, up_fp):  # looked at again under the lock: another run may have moved it already
        record, damage = _intact_or_moved(store, need, up_fp, deep=True)
    if record is None:
        row = next(r for r in plan(spec, store) if r.name == need)
        if row.fingerprint != up_fp:
            raise StageError(f"stage {item.name!r}: upstream {need!r} now plans as {row.fingerprint}, not {up_fp}: "
                             "its code or spec changed during this run; run again")
        execute(replace(row, reason=f"damaged: {damage}" if damage else row.reason), spec, store)
    return store.materialize(need, up_fp)


def _build(item: PlannedStage, stage: Stage, spec: RunSpec, store: ArtifactStore, inputs: dict[str, Path],
           reason: str) -> StageResult:
    """Builds a stage into a fresh temp folder and publishes it. Call with its lock held."""
    store.clear_stale_builds(item.name, item.fingerprint)
    work = store.work_dir(item.name, item.fingerprint)
    out = store.new_build_dir(item.name, item.fingerprint)
    log.info("%s: building %s (%s)", item.name, item.fingerprint, reason)
    start = time.perf_counter()
    try:
        metrics = stage.build(spec, inputs, out, work)
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
            versions={"python": platform.python_version(), **lib_versions(RECORDED_VERSIONS)},
            created_at=now_iso(),
        )
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
