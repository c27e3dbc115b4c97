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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_specs.spec import RunSpec
from tasks.errors import InputError, StageError
from tasks.fingerprint import code_digest, digest_key, explain_change, lib_versions
from tasks.registry import STAGES, get_stage, stage_names
from tasks.stage import Stage
from tasks.store import ArtifactRecord, ArtifactStore, checksum_tree, make_gzip_reproducible, now_iso

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
        cached = store.load(stage.name, fp) is not None
        if stage.name in forced and cached:
            reason = "forced" if stage.name in force else f"forced upstream ({', '.join(sorted(forced & set(_ancestors(stage.name))))})"
            cached = False
        elif cached:
            reason = ""
        else:
            reason = explain_change(_previous_key(store, stage.name, spec.name), key)
        planned.append(PlannedStage(stage.name, fp, key, cached, reason, store.location(stage.name, fp)))
    return planned


def _ancestors(name: str) -> set[str]:
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
    return {s.name for s in STAGES if s.name in names or _ancestors(s.name) & set(names)}


def select(planned: list[PlannedStage], until: str | None = None, only: str | None = None) -> list[PlannedStage]:
    """The stages a run executes: all, those up to `until`, or just `only`."""
    names = stage_names()
    if only is not None:
        get_stage(only)
        return [p for p in planned if p.name == only]
    if until is not None:
        get_stage(until)
        wanted = {until} | _ancestors(until)
        return [p for p in planned if p.name in wanted]
    return [p for p in planned if p.name in names]


DEFAULT_STORE = ".gristmill"


def resolve_store(spec: RunSpec, flag: str | None) -> ArtifactStore:
    """`--store`, else the spec's `store:` (relative to the spec file), else ./.gristmill."""
    if flag:
        return ArtifactStore(flag)
    if spec.store:
        return ArtifactStore(spec.store if "://" in spec.store else spec.resolve(spec.store))
    return ArtifactStore(DEFAULT_STORE)


@dataclass(frozen=True)
class RunPlan:
    """What one `gristmill run` will do: the spec, the store, and the chosen stages."""

    spec: RunSpec
    store: ArtifactStore
    stages: list[PlannedStage]
    forced: frozenset[str]


def prepare_run(spec_path: str | Path, store: str | None = None, until: str | None = None,
                only: str | None = None, force: Sequence[str] = (), override: str | None = None) -> RunPlan:
    """Loads the spec, plans every stage, and picks those to run; bad input raises InputError.

    `override` is JSON of spec fields set on top of the file (e.g. `gristmill eval`'s question
    file); it is validated like the file itself."""
    from data_specs.spec import load_spec

    if only and until:
        raise InputError("--only and --until cannot be used together")
    spec = load_spec(spec_path, override=json.loads(override) if override else None)
    st = resolve_store(spec, store)
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
    """Builds one planned stage unless its artifact exists; publishes it atomically."""
    stage = get_stage(item.name)
    inputs = {}
    for need in stage.needs:
        up_fp = item.key["upstream"][need]
        if store.load(need, up_fp) is None:
            raise InputError(
                f"stage {item.name!r} needs the {need!r} artifact {up_fp}, which is not in {store.url}; "
                f"run `gristmill run {spec.spec_path} --until {need}` first"
            )
        inputs[need] = store.materialize(need, up_fp)
    if stage.wants_previous:
        earlier = [r for r in store.history(item.name) if r.run_name == spec.name and r.fingerprint != item.fingerprint]
        if earlier:
            inputs["previous"] = store.materialize(item.name, earlier[-1].fingerprint)

    with store.lock(item.name, item.fingerprint):
        record = store.load(item.name, item.fingerprint)
        if record is not None and not force:
            log.info("%s: cached %s", item.name, item.path)
            return StageResult(item.name, item.fingerprint, "cached", item.path, record)
        store.clear_stale_builds(item.name, item.fingerprint)
        work = store.work_dir(item.name, item.fingerprint)
        out = store.new_build_dir(item.name, item.fingerprint)
        log.info("%s: building %s (%s)", item.name, item.fingerprint, item.reason or "forced")
        start = time.perf_counter()
        try:
            metrics = stage.build(spec, inputs, out, work)
        except InputError:
            shutil.rmtree(out, ignore_errors=True)
            raise
        except Exception as e:
            shutil.rmtree(out, ignore_errors=True)
            raise StageError(f"stage {item.name!r} failed: {type(e).__name__}: {e}") from e
        wall = time.perf_counter() - start
        make_gzip_reproducible(out)
        record = ArtifactRecord(
            stage=item.name, fingerprint=item.fingerprint, run_name=spec.name, key=item.key,
            metrics=metrics, files=checksum_tree(out), wall_s=round(wall, 3),
            versions={"python": platform.python_version(), **lib_versions(RECORDED_VERSIONS)},
            created_at=now_iso(),
        )
        path = store.publish(out, record)
        store.discard_work(item.name, item.fingerprint)
        log.info("%s: built in %.1f s -> %s", item.name, wall, path)
        return StageResult(item.name, item.fingerprint, "built", path, record)
