"""Run references: `pretrain.from: {run: NAME, stage: pretrain|midtrain, fallback: error|scratch}`
resolved, when a run is planned, to the newest intact artifact of that stage whose record names
run NAME. This module owns that decision; the planner (tasks/core/runner.py) keys the stages
that start from the field by what it resolved to (tasks/core/keys.py: `resolved[field]`), so a
newer artifact of that run changes their keys and the name alone does not. With `fallback:
scratch` and no such artifact nothing is resolved: those stages are keyed and built exactly as
without `from`.

A nightly usually names its own run (`name: nightly`, `from: {run: nightly}`). After a night's
run the newest artifact of that run is the one it just built; resolving to it would make the
next plan train once more on the same data, and nothing would ever be cached. So the newest
artifact of the spec's *own* run is passed over when this plan would build exactly it (it is
what the plan computes when starting where that artifact started): the plan starts there too,
and finds it cached. A plan is then the same before and after its run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from data_specs.errors import InputError
from data_specs.schema import RunRef, RunSpec
from tasks.core.keys import spec_value
from tasks.core.store import ArtifactRecord, ArtifactStore

# (the starts to plan with, {field: (stage, fingerprint)}; a stage) -> that stage's fingerprint.
Fingerprint = Callable[[dict[str, tuple[str, str]], str], str]


@dataclass(frozen=True)
class Start:
    """What a run reference resolved to: another run's artifact, or from scratch (its fallback)."""

    field: str  # the spec field, e.g. "pretrain.from"
    run: str  # the run it names
    stage: str  # the stage of the artifact (the one the reference names)
    fingerprint: str | None  # None: from scratch
    created_at: str | None = None
    note: str = ""  # why it is not simply that run's newest artifact

    @property
    def source(self) -> tuple[str, str] | None:
        """(stage, fingerprint) of the artifact, or None from scratch."""
        return (self.stage, self.fingerprint) if self.fingerprint else None

    def as_json(self) -> dict[str, Any]:
        """The `from` entry of a `gristmill plan --json` row."""
        return {"field": self.field, "run": self.run, "stage": self.stage, "fingerprint": self.fingerprint,
                "created_at": self.created_at, "scratch": self.fingerprint is None, "note": self.note or None}

    def describe(self) -> str:
        """One line for `gristmill plan`."""
        if self.fingerprint is None:
            return f"{self.field}: run {self.run!r}: from scratch ({self.note})"
        when = f", published {self.created_at}" if self.created_at else ""
        return f"{self.field}: run {self.run!r} -> {self.stage} {self.fingerprint}{when}" + \
            (f" ({self.note})" if self.note else "")


def resolve(spec: RunSpec, store: ArtifactStore, fields: Iterable[str], fingerprint: Fingerprint) -> dict[str, Start]:
    """{field: Start} of every given field that holds a run reference; a reference with nothing to
    resolve to and `fallback: error` is bad input naming the field and the run."""
    starts: dict[str, Start] = {}
    for field in fields:
        ref = spec_value(spec, field)
        if isinstance(ref, RunRef):
            starts[field] = _resolve(spec, store, field, ref, fingerprint)
    return starts


def newest(store: ArtifactStore, stage: str, run: str) -> tuple[ArtifactRecord | None, int]:
    """(the newest intact artifact of `stage` whose record names `run`, how many newer ones of that
    run were passed over as damaged). Quarantined artifacts are no longer in the store's listing;
    a damaged one (a file missing or of another size) is skipped, not repaired: it is another run's."""
    damaged = 0
    for record in reversed(store.history(stage)):
        if record.run_name != run:
            continue
        if store.find(stage, record.fingerprint).record is not None:
            return record, damaged
        damaged += 1
    return None, damaged


def _resolve(spec: RunSpec, store: ArtifactStore, field: str, ref: RunRef, fingerprint: Fingerprint) -> Start:
    found, damaged = newest(store, ref.stage, ref.run)
    if found is None:
        what = f"run {ref.run!r} has no intact {ref.stage} artifact in {store.url}" + \
            (f" ({damaged} damaged one{'s' if damaged > 1 else ''} skipped)" if damaged else "")
        if ref.fallback == "error":
            raise InputError(f"{spec.spec_path}: {field}: {what}; run it first, or set `fallback: scratch` to "
                             "train from scratch when there is none")
        return Start(field, ref.run, ref.stage, None, note=f"{what}; fallback: scratch")
    latest = Start(field, ref.run, found.stage, found.fingerprint, found.created_at)
    if ref.run != spec.name:
        return latest  # another run's artifacts: this spec never builds them
    own = started_from(store, found, field, ref.run)
    if fingerprint({field: own.source} if own.source else {}, ref.stage) == found.fingerprint:
        how = f"started from {own.stage} {own.fingerprint}" if own.source else "trained from scratch"
        return replace(own, note=f"this run's newest {ref.stage}, {found.fingerprint}, is what this plan builds; "
                                 f"it {how}")
    return latest


def started_from(store: ArtifactStore, record: ArtifactRecord, field: str, run: str) -> Start:
    """Where the build of `record` started: what `field` resolved to for it, on its own key or on
    that of an artifact it read (a midtrain artifact's pretrain); from scratch when none has it."""
    seen: set[tuple[str, str]] = set()
    todo = [record]
    while todo:
        current = todo.pop(0)
        got = current.key.get("resolved", {}).get(field)
        if got:
            source = store.load(got["stage"], got["fingerprint"])
            return Start(field, run, got["stage"], got["fingerprint"], source.created_at if source else None)
        for stage, fp in current.key.get("upstream", {}).items():
            if (stage, fp) not in seen:
                seen.add((stage, fp))
                up = store.load(stage, fp)
                if up is not None:
                    todo.append(up)
    return Start(field, run, record.stage, None)
