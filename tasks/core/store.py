"""The artifact store: `<store>/<stage>/<fingerprint>/` holds a payload and `artifact.json`.

Publishing is atomic: a stage builds into a fresh temp folder, the folder is renamed into
place, and `artifact.json` is written last (itself through a temp file and a rename). A
folder without `artifact.json` never counts as done and is cleared before the next build.
Builds of one fingerprint are serialised by a file lock, so two runs started together build
once and both succeed.

The store is a local folder or any fsspec URL (`s3://bucket/prefix`). Stages always see
local folders: a remote store's artifacts are built locally and uploaded (payload first,
`artifact.json` last), and downloaded into a local cache when read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from pydantic import BaseModel, ConfigDict

from tasks.core.files import check_files, check_sizes, fsync_tree
from tasks.core.retry import with_retries

T = TypeVar("T")
log = logging.getLogger("gristmill")

RECORD = "artifact.json"
WORK = ".work"  # per-fingerprint scratch kept across attempts (checkpoints, datatrove logs)
LOCKS = ".locks"
DAMAGED = ".damaged"  # damaged artifacts moved aside on detection, kept for inspection


PROBLEMS_SHOWN = 3  # damaged files named in one message; the rest are counted


class ArtifactRecord(BaseModel):
    """The small JSON record that marks an artifact as done and describes it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    stage: str
    fingerprint: str
    run_name: str
    key: dict[str, Any]
    metrics: dict[str, Any]
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "bytes"}
    wall_s: float
    versions: dict[str, str]
    created_at: str


@dataclass(frozen=True)
class Lookup:
    """What the store holds under one fingerprint: an intact artifact, nothing, or damage."""

    record: ArtifactRecord | None  # the record of an intact artifact; None otherwise
    damage: str = ""  # what is wrong with a damaged one; "" when intact or absent
    moved_to: str | None = None  # where a damaged one was moved aside (find(..., repair=True))


class ArtifactStore:
    """Content-addressed artifacts in a local folder or an fsspec URL."""

    def __init__(self, url: str | Path, local_cache: Path | None = None):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.is_local:
            self.root = str(Path(self.root).resolve())
            self.local_root = Path(self.root)
        else:
            # Work folders, locks and downloads of a remote store live on this machine.
            key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
            self.local_root = (local_cache or Path.home() / ".cache" / "gristmill") / key
        self.local_root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # ------------------------------------------------------------ paths

    def location(self, stage: str, fingerprint: str) -> str:
        """Where an artifact lives (a local path or a URL), as shown to users."""
        if self.is_local:
            return str(Path(self.root) / stage / fingerprint)
        return f"{self.url}/{stage}/{fingerprint}"

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        """A local scratch folder for one fingerprint, kept across attempts until publish."""
        path = self.local_root / WORK / stage / fingerprint
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _io(self, what: str, call: Callable[[], T]) -> T:
        """One call to a remote store, retried with backoff on network trouble (tasks/retry.py);
        local calls run once (a local filesystem error is not transient)."""
        return call() if self.is_local else with_retries(call, what)

    # ------------------------------------------------------------ reading

    def load(self, stage: str, fingerprint: str) -> ArtifactRecord | None:
        """The record of a finished artifact, or None when there is none (or only a partial one)."""
        return self.read(stage, fingerprint)[0]

    def read(self, stage: str, fingerprint: str) -> tuple[ArtifactRecord | None, str]:
        """(record, "") for a finished artifact; (None, "") when there is none, or only the
        partial folder of a killed build; (None, why) when a record is there but unusable."""
        path = f"{self.root}/{stage}/{fingerprint}/{RECORD}"
        try:
            raw = self._io(f"reading {self.url}/{stage}/{fingerprint}/{RECORD}", lambda: self.fs.cat_file(path))
            record = ArtifactRecord.model_validate(json.loads(raw))
        except FileNotFoundError:
            return None, ""
        except (ValueError, OSError) as e:  # torn or edited JSON, not a record, unreadable bytes
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            return None, f"{RECORD} unreadable ({type(e).__name__}: {first})"
        if (record.stage, record.fingerprint) != (stage, fingerprint):
            # A record copied from another folder describes another artifact, not this one.
            return None, f"{RECORD} is the record of {record.stage}/{record.fingerprint}"
        return record, ""

    def find(self, stage: str, fingerprint: str, deep: bool = False, repair: bool = False) -> Lookup:
        """The intact artifact of this fingerprint, or none and why. Every file's size is checked,
        and its sha256 too when `deep` (reads every byte). A killed build's partial folder is
        no artifact, not damage. With `repair` (call with the fingerprint's lock held), a
        damaged artifact is moved aside to .damaged/ with a warning, so it can be rebuilt."""
        record, damage = self.read(stage, fingerprint)
        if record is not None:
            problems = self.verify(record, deep=deep)
            if not problems:
                return Lookup(record)
            more = f"; and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
            damage = "; ".join(problems[:PROBLEMS_SHOWN]) + more
        if not damage or not repair:
            return Lookup(None, damage)
        where = self.quarantine(stage, fingerprint)
        log.warning("%s: artifact %s is damaged (%s); moved aside to %s; rebuilding it",
                    stage, self.location(stage, fingerprint), damage, where)
        return Lookup(None, damage, where)

    def history(self, stage: str) -> list[ArtifactRecord]:
        """Every finished artifact of a stage, oldest first."""
        try:
            entries = self._io(f"listing {self.url}/{stage}", lambda: self.fs.ls(f"{self.root}/{stage}", detail=False))
        except FileNotFoundError:
            return []
        records = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("."):
                continue
            record = self.load(stage, name)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: r.created_at)

    def materialize(self, stage: str, fingerprint: str) -> Path:
        """A local folder holding the artifact's payload (downloaded once for a remote store)."""
        if self.is_local:
            return Path(self.root) / stage / fingerprint
        local = self.local_root / "downloads" / stage / fingerprint
        if not (local / RECORD).exists():
            tmp = local.with_name(f".{fingerprint}.{uuid.uuid4().hex}")
            self._io(f"downloading {self.url}/{stage}/{fingerprint}",
                     lambda: self.fs.get(f"{self.root}/{stage}/{fingerprint}/", str(tmp), recursive=True))
            shutil.rmtree(local, ignore_errors=True)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, local)
        return local

    def fetch_file(self, stage: str, fingerprint: str, rel: str) -> Path | None:
        """A local copy of one file of an artifact (None when it has no such file), without
        downloading the rest: reports read small files of large artifacts."""
        if self.is_local:
            path = Path(self.root) / stage / fingerprint / rel
            return path if path.is_file() else None
        local = self.local_root / "downloads" / stage / fingerprint / rel
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}")  # a killed download never looks whole
            try:
                self._io(f"downloading {self.url}/{stage}/{fingerprint}/{rel}",
                         lambda: self.fs.get_file(f"{self.root}/{stage}/{fingerprint}/{rel}", str(tmp)))
            except FileNotFoundError:
                return None
            os.replace(tmp, local)
        return local

    # ------------------------------------------------------------ writing

    @contextlib.contextmanager
    def lock(self, stage: str, fingerprint: str) -> Iterator[None]:
        """Serialises builds of one fingerprint across processes on this machine."""
        path = self.local_root / LOCKS / f"{stage}-{fingerprint}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _builds(self, stage: str) -> Path:
        """Where temp build folders go: beside the artifacts locally (one rename publishes),
        under the local cache for a remote store (uploaded on publish)."""
        return Path(self.root) / stage if self.is_local else self.local_root / "builds" / stage

    def new_build_dir(self, stage: str, fingerprint: str) -> Path:
        """A fresh, empty local folder to build an artifact in (never seen as done)."""
        path = self._builds(stage) / f".tmp-{fingerprint}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def publish(self, build_dir: Path, record: ArtifactRecord) -> str:
        """Moves a finished build into place, then writes its record; returns its location.

        Call with the fingerprint's lock held. An existing artifact of the same fingerprint
        (a forced rebuild) is replaced; a partial one (a killed publish) is cleared first.
        """
        stage, fp = record.stage, record.fingerprint
        if not self.is_local:
            return self._publish_remote(build_dir, record)
        final = Path(self.root) / stage / fp
        fsync_tree(build_dir)
        if final.exists():
            # Out of the way first (one rename), then deleted: a reader never sees a mix.
            trash = final.with_name(f".trash-{fp}-{uuid.uuid4().hex[:8]}")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(build_dir, final)
        tmp = final / f".{RECORD}.tmp"
        tmp.write_text(record.model_dump_json(indent=2), encoding="utf-8")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final / RECORD)
        return str(final)

    def _publish_remote(self, build_dir: Path, record: ArtifactRecord) -> str:
        """Uploads the payload, then the record: a reader sees the record only after the payload."""
        target = f"{self.root}/{record.stage}/{record.fingerprint}"
        where = f"{self.url}/{record.stage}/{record.fingerprint}"
        with contextlib.suppress(FileNotFoundError):
            self._io(f"unpublishing {where}", lambda: self.fs.rm(f"{target}/{RECORD}"))
        # A retried put re-sends every file; object stores overwrite, so that is idempotent.
        self._io(f"uploading {where}", lambda: self.fs.put(f"{build_dir}/", f"{target}/", recursive=True))
        body = record.model_dump_json(indent=2).encode()
        self._io(f"writing {where}/{RECORD}", lambda: self.fs.pipe_file(f"{target}/{RECORD}", body))
        shutil.rmtree(build_dir, ignore_errors=True)
        return where

    def publish_view(self, rel: str, folder: Path) -> str:
        """Replaces the files of `<store>/<rel>/` with those of a local folder: a derived view (a
        run's report), not an artifact, so it has no record and is never a cache hit. Each file
        is replaced whole (a temp file and a rename locally)."""
        if not self.is_local:
            target = f"{self.root}/{rel}"
            self._io(f"uploading {self.url}/{rel}", lambda: self.fs.put(f"{folder}/", f"{target}/", recursive=True))
            return f"{self.url}/{rel}"
        dest = Path(self.root) / rel
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tmp = dest / f".{path.name}.{uuid.uuid4().hex[:8]}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest / path.name)
        return str(dest)

    def view_location(self, rel: str, name: str) -> str | None:
        """Where a view's file is (`publish_view`), or None when it was never written."""
        where = f"{self.root}/{rel}/{name}"
        try:
            exists = self._io(f"looking up {self.url}/{rel}/{name}", lambda: self.fs.exists(where))
        except FileNotFoundError:
            exists = False
        if not exists:
            return None
        return str(Path(self.root) / rel / name) if self.is_local else f"{self.url}/{rel}/{name}"

    def discard_work(self, stage: str, fingerprint: str) -> None:
        """Removes the scratch folder of a published fingerprint."""
        shutil.rmtree(self.local_root / WORK / stage / fingerprint, ignore_errors=True)

    def clear_stale_builds(self, stage: str, fingerprint: str) -> None:
        """Removes temp folders and partial artifacts that killed runs of this fingerprint left.

        Call with the fingerprint's lock held: no live build of it can be in progress then.
        """
        for path in self._builds(stage).glob(f".tmp-{fingerprint}-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self._builds(stage).glob(f".trash-{fingerprint}-*"):  # a publish killed mid-replace
            shutil.rmtree(path, ignore_errors=True)
        final = Path(self.root) / stage / fingerprint
        if self.is_local and final.exists() and not (final / RECORD).exists():
            shutil.rmtree(final, ignore_errors=True)

    # ------------------------------------------------------------ integrity

    def verify(self, record: ArtifactRecord, deep: bool = False) -> list[str]:
        """What is wrong with a finished artifact's payload against its record's `files`: missing
        files and sizes always (cheap), sha256 too when `deep` (reads every byte); [] if intact."""
        stage, fp = record.stage, record.fingerprint
        if self.is_local:
            return check_files(Path(self.root) / stage / fp, record.files, deep)
        if not deep:
            base = f"{self.root}/{stage}/{fp}"
            listing = self._io(f"listing {self.url}/{stage}/{fp}", lambda: self.fs.find(base, detail=True))
            found = {p[len(base) + 1:]: info.get("size") for p, info in listing.items()}
            return check_sizes(found, record.files)
        problems = check_files(self.materialize(stage, fp), record.files, deep=True)
        if problems:  # the local download may be what is damaged: fetch it again before blaming the store
            shutil.rmtree(self.local_root / "downloads" / stage / fp, ignore_errors=True)
            problems = check_files(self.materialize(stage, fp), record.files, deep=True)
        return problems

    def quarantine(self, stage: str, fingerprint: str) -> str:
        """Moves a damaged artifact to `<store>/.damaged/<stage>/<fingerprint>-<UTC time>/`, kept
        for inspection (never deleted), and returns where. Call with the fingerprint's lock held."""
        t = time.time()
        name = f"{fingerprint}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(t))}.{int(t % 1 * 1e6):06d}Z"
        shutil.rmtree(self.local_root / "downloads" / stage / fingerprint, ignore_errors=True)
        if self.is_local:
            dest = Path(self.root) / DAMAGED / stage / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(self.root) / stage / fingerprint, dest)  # one rename: never half moved
            return str(dest)
        src, dest = f"{self.root}/{stage}/{fingerprint}", f"{self.root}/{DAMAGED}/{stage}/{name}"
        # Object stores move file by file: the record goes first, so the source stops counting as done.
        paths = sorted(self._io(f"listing {src}", lambda: self.fs.find(src)), key=lambda p: not p.endswith(f"/{RECORD}"))
        for path in paths:
            target = f"{dest}/{path[len(src) + 1:]}"
            self._io(f"moving {path} aside", lambda path=path, target=target: self.fs.mv(path, target))
        return f"{self.url}/{DAMAGED}/{stage}/{name}"

    def check_writable(self) -> None:
        """Raises OSError unless this machine can create files in the store's local folder (the
        store itself when local; for a remote store, its local locks, scratch and downloads)."""
        probe = self.local_root / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()


def now_iso() -> str:
    """UTC timestamp with microseconds, so records sort by creation time."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
