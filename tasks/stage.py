"""The stage contract every module in `tasks/` implements.

    STAGE = Stage("dedup", needs=("ingest",), section="dedup", build=build, ...)

    def build(spec: RunSpec, inputs: Inputs, out: Path, work: Path) -> Metrics:
        '''Reads upstream artifacts, writes only under `out`, returns metrics.'''

A stage reads its spec section and the artifacts of the stages it needs (`inputs[name]`
is a local folder), writes only into `out` (fresh and empty), may keep resumable state in
`work` (kept across attempts of the same fingerprint; `shared_cache(work)` is kept across
fingerprints), and returns JSON-able metrics. It
never reads environment variables, global paths or another stage's folder by name. The
machinery around it (fingerprint, cache, temp folder, publish, record) is in `runner.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_specs.spec import RunSpec

Inputs = Mapping[str, Path]
Metrics = dict[str, Any]


def shared_cache(work: Path) -> Path:
    """A folder every fingerprint of a stage shares (e.g. an API response cache, so a rerun
    with a changed spec does not pay for the same request twice). It sits beside the
    per-fingerprint work folders and is never part of an artifact."""
    path = work.parent / "_shared"
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_digest(spec: RunSpec, field: str, value: str | None, kind: str = "folder") -> dict[str, str]:
    """{field: sha256 of the content} of a file or folder a spec field names ({} when unset);
    a missing one is bad input naming the field. Paths never enter a key, contents do."""
    from tasks.errors import InputError
    from tasks.fingerprint import file_digest, tree_digest

    if not value:
        return {}
    path = spec.resolve(value)
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        raise InputError(f"{spec.spec_path}: {field}: {path} is not a {kind}" if kind == "folder"
                         else f"{spec.spec_path}: {field}: {path} not found")
    try:
        return {field: tree_digest(path) if kind == "folder" else file_digest(path)}
    except OSError as e:  # a file in it we may not read, or one removed while it is hashed
        raise InputError(f"{spec.spec_path}: {field}: cannot read {e.filename or path} ({e.strerror or e})") from None


def no_external_inputs(spec: RunSpec) -> dict[str, str]:
    """For stages that read only upstream artifacts."""
    return {}


@dataclass(frozen=True)
class Stage:
    """One box of the pipeline: its name, what it reads, and how its cache key is made."""

    name: str
    needs: tuple[str, ...]
    build: Callable[[RunSpec, Inputs, Path, Path], Metrics]
    # The spec fields that change this stage's output, as JSON data keyed by their dotted
    # spec path (so `plan` can say "spec field dedup.near.threshold changed").
    spec_view: Callable[[RunSpec], dict[str, Any]]
    # Content digests of files outside the store that the stage reads (corpus sources).
    external_inputs: Callable[[RunSpec], dict[str, str]] = no_external_inputs
    # Libraries whose version can change the output.
    libs: tuple[str, ...] = field(default_factory=tuple)
    # Where the code lives (entered into the fingerprint with everything it imports).
    module: str = ""
    # When True, inputs["previous"] is the latest earlier artifact of this stage for the same
    # run name (another fingerprint), when there is one: the eval report shows what changed.
    # It is context for reviewers, not an input of the results: it never enters the key.
    wants_previous: bool = False
