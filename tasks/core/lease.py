"""Leases: one worker builds an artifact while the other workers sharing its store wait for it.

Within one machine, builds of a fingerprint are serialised by a file lock (ArtifactStore.lock).
Workers on several machines sharing one store (an S3 bucket, a network folder) take turns by a
lease: the object `<store>/<stage>/.lease-<fingerprint>`, which a worker creates only if it is
absent (tasks/core/objects.py) before building, renews while it builds, and deletes after
publishing or failing, so that a failed build lets the next worker try:

    {"stage", "fingerprint", "owner": a uuid per lease, "host", "pid", "machine",
     "started_at", "heartbeat_at": unix seconds, "expiry_s": the holder's setting}

A worker that finds a live lease polls the store for the artifact, logging every 30 s who holds
the lease, for how long, and how to clear it; the artifact, once there, is its cached result.
A lease is expired when its heartbeat is older than its expiry_s by this machine's clock (workers'
clocks are assumed within a few seconds of each other, as NTP keeps them), when this worker has
seen it unchanged that long (a skewed clock cannot keep a dead lease alive), or at once when it
was taken on this machine by a process that is gone (a SIGKILLed run rerun on the same machine
waits for nothing). An expired lease is taken over: deleted if still the version read, then
created afresh; of two workers taking it over together, one creates it and the other waits.

The holder renews its lease every expiry_s / 4 from a background thread, with a conditional
rewrite (If-Match on S3), and once more right before publishing. If another worker holds the
lease by then (this one stalled past its expiry and was taken over), its build is discarded and
it waits for the new holder's; a lease found deleted (cleared by hand) is created again. Left
possible: a holder that stalls past its expiry between that last renewal and the end of its
publish publishes beside the taker, both under one fingerprint (locally the later rename wins
whole; on S3 files of two builds can mix, which the size check on use reports as damage). On a
file system a renewal's check and write are two steps (objects.py), so a renewal racing a
takeover can overwrite the taker's fresh lease; the taker then finds it lost before publishing.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from data_specs.errors import StageError
from data_specs.schema import LeaseSpec
from tasks.core.objects import Objects, Versioned, objects_of
from tasks.core.store import ArtifactStore

T = TypeVar("T")
log = logging.getLogger("gristmill")

LEASE_PREFIX = ".lease-"
PROGRESS_EVERY_S = 30.0  # between two "waiting for" lines of a waiting worker
POLL_MAX_S = 5.0  # between two looks at the store while waiting (expiry_s / 4 when that is shorter)
CLAIM_TRIES = 3  # reads and creates in one attempt at a lease that comes and goes between calls


class LeaseInfo(BaseModel):
    """What a lease object holds: who builds which artifact, since when, and its last heartbeat."""

    model_config = ConfigDict(frozen=True)

    stage: str
    fingerprint: str
    owner: str  # a uuid per lease taken
    host: str
    pid: int
    machine: str  # this_machine() of the holder: where its pid means something
    started_at: float  # unix seconds
    heartbeat_at: float  # unix seconds
    expiry_s: float

    def body(self) -> bytes:
        return self.model_dump_json().encode()

    def holder(self) -> str:
        """The holder in words, for log lines."""
        return f"host {self.host} (owner {self.owner}, pid {self.pid})"


# What an object that is not a lease (torn by hand, another tool's) reads as: expired, so taken over.
UNREADABLE = LeaseInfo(stage="?", fingerprint="?", owner="an unreadable lease", host="?", pid=0, machine="",
                       started_at=0.0, heartbeat_at=0.0, expiry_s=0.0)


class LeaseLost(Exception):
    """Another worker holds the lease of a build in progress here."""


@functools.cache
def this_machine() -> str:
    """This host, boot and pid namespace: a lease's pid can be looked up only where they match."""
    boot, pidns = _read("/proc/sys/kernel/random/boot_id"), _read("/proc/self/ns/pid", link=True)
    return f"{socket.gethostname()} {boot} {pidns}"


def _read(path: str, link: bool = False) -> str:
    """A /proc file's text (or a link's target), "" where there is none (off Linux)."""
    try:
        return os.readlink(path) if link else Path(path).read_text().strip()
    except OSError:
        return ""


def lease_rel(stage: str, fingerprint: str) -> str:
    """Where a fingerprint's lease lives in the store: beside its artifact, hidden from listings."""
    return f"{stage}/{LEASE_PREFIX}{fingerprint}"


def _parse(found: Versioned) -> LeaseInfo:
    try:
        return LeaseInfo.model_validate_json(found.body)
    except ValidationError:
        return UNREADABLE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def expired(info: LeaseInfo, unchanged_s: float = 0.0) -> str:
    """Why a lease's holder is presumed gone, or "" while the lease is live. `unchanged_s`: how
    long this worker has seen this version of it."""
    age = time.time() - info.heartbeat_at
    if age > info.expiry_s:
        return f"its last heartbeat is {age:.0f} s old (expiry {info.expiry_s:g} s)"
    if unchanged_s > info.expiry_s:
        return f"it has not been renewed for {unchanged_s:.0f} s seen from here (expiry {info.expiry_s:g} s)"
    if info.machine == this_machine() and not _alive(info.pid):
        return f"its process {info.pid} on this machine is gone"
    return ""


class Lease:
    """A lease this worker holds: renewed from a background thread until released."""

    def __init__(self, objects: Objects, rel: str, info: LeaseInfo, version: str):
        self.objects, self.rel, self.info, self.version = objects, rel, info, version
        self.lost = ""  # the worker that holds it now, once another does
        self._lock = threading.Lock()  # one renewal or release at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {info.stage}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.info.expiry_s / 4) and not self.lost:
            try:
                self.renew()
            except Exception as e:  # the store is unreachable: the next beat tries again
                log.warning("%s: could not renew the lease %s (%s: %s); others take it over %g s after the "
                            "last renewal", self.info.stage, self.objects.location(self.rel), type(e).__name__, e,
                            self.info.expiry_s)

    def renew(self) -> None:
        """Writes a new heartbeat if this worker still holds the lease; sets `lost` if another does."""
        with self._lock:
            if self.lost:
                return
            info = self.info.model_copy(update={"heartbeat_at": time.time()})
            version = self.objects.replace(self.rel, info.body(), self.version)
            if version is None:
                version, self.lost = self._recover(info)
            if version is not None:
                self.info, self.version = info, version

    def _recover(self, info: LeaseInfo) -> tuple[str | None, str]:
        """After a failed renewal: (the new version, "") if the lease is still this worker's,
        else (None, the worker holding it)."""
        current = self.objects.read(self.rel)
        if current is not None and current.body == info.body():  # written, but the reply was lost
            return current.version, ""
        if current is None:  # deleted by hand (`gristmill leases --clear`): this worker is still building
            version = self.objects.create(self.rel, info.body())
            if version is not None:
                log.warning("%s: the lease %s was deleted while building; taken again", info.stage,
                            self.objects.location(self.rel))
                return version, ""
            current = self.objects.read(self.rel)
        holder = _parse(current).holder() if current is not None else "another worker"
        log.warning("%s: lost the lease %s to %s while building %s", info.stage, self.objects.location(self.rel),
                    holder, info.fingerprint)
        return None, holder

    def confirm(self) -> None:
        """Renews now; LeaseLost if another worker holds the lease. Call right before publishing."""
        self.renew()
        if self.lost:
            raise LeaseLost(f"another worker, {self.lost}, took over the lease of {self.info.fingerprint} (this "
                            f"worker's renewals had stopped for over its expiry, {self.info.expiry_s:g} s)")

    def release(self) -> None:
        """Stops renewing and deletes the lease (unless another worker holds it now)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        with self._lock:
            if self.lost:
                return
            try:
                self.objects.delete(self.rel, self.version)
            except Exception as e:  # never hides the build's own error; the lease expires by itself
                log.warning("%s: could not delete the lease %s (%s: %s); it expires %g s after its last "
                            "heartbeat", self.info.stage, self.objects.location(self.rel), type(e).__name__, e,
                            self.info.expiry_s)


class _Waiting:
    """One worker's wait for another's build: how long it has seen each version of the lease,
    when it last said so, and when it gives up."""

    def __init__(self, stage: str, fingerprint: str, location: str, settings: LeaseSpec, clear_hint: str):
        self.stage, self.fingerprint, self.location, self.clear_hint = stage, fingerprint, location, clear_hint
        self.timeout_s = settings.wait_timeout_s
        self.poll_s = min(POLL_MAX_S, settings.expiry_s / 4)
        self.version, self.version_seen = "", 0.0
        self.started: float | None = None  # time.monotonic() when this wait began
        self.logged = float("-inf")

    def unchanged_s(self, version: str) -> float:
        """Seconds this worker has seen this version of the lease (0 the first time)."""
        now = time.monotonic()
        if version != self.version:
            self.version, self.version_seen = version, now
        return now - self.version_seen

    def restart(self) -> None:
        """A new wait (after this worker's own turn): a fresh timeout."""
        self.started, self.logged = None, float("-inf")

    def note(self, holder: LeaseInfo | None) -> None:
        """Says who holds the lease (at once, then every PROGRESS_EVERY_S); StageError once the
        wait timeout is spent; else sleeps until the next look."""
        now = time.monotonic()
        self.started = now if self.started is None else self.started
        if holder is not None and now - self.logged >= PROGRESS_EVERY_S:
            self.logged = now
            log.info("%s: waiting for %s, which %s has been building for %.0f s (last heartbeat %.0f s ago); lease "
                     "%s. If that worker is gone, its lease expires %g s after its last heartbeat; to clear it "
                     "now: %s", self.stage, self.fingerprint, holder.holder(), time.time() - holder.started_at,
                     time.time() - holder.heartbeat_at, self.location, holder.expiry_s, self.clear_hint)
        if now - self.started > self.timeout_s:
            who = holder.holder() if holder is not None else "another worker"
            raise StageError(f"stage {self.stage!r}: waited {self.timeout_s:g} s for {self.fingerprint}, which {who} "
                             f"is still building (lease {self.location}); raise lease.wait_timeout_s in the spec, or "
                             f"if that worker is stuck, stop it (its lease then expires) or clear the lease: "
                             f"{self.clear_hint}")
        time.sleep(min(self.poll_s, self.started + self.timeout_s - now + 0.01))  # never far past the timeout


def _new_info(stage: str, fingerprint: str, settings: LeaseSpec) -> LeaseInfo:
    now = time.time()
    return LeaseInfo(stage=stage, fingerprint=fingerprint, owner=uuid.uuid4().hex, host=socket.gethostname(),
                     pid=os.getpid(), machine=this_machine(), started_at=now, heartbeat_at=now,
                     expiry_s=settings.expiry_s)


def _attempt(objects: Objects, rel: str, me: LeaseInfo, waiting: _Waiting) -> Lease | LeaseInfo | None:
    """This worker's lease (created, or taken over from an expired holder), or the live holder's
    info; None when the lease came and went too often to tell (the next look tries again)."""
    taken_from: tuple[LeaseInfo, str] | None = None
    for _ in range(CLAIM_TRIES):
        version = objects.create(rel, me.body())  # first: the usual case costs one request
        if version is not None:
            if taken_from is not None:
                old, why = taken_from
                log.warning("%s: took over the lease %s from %s, building %s since %.0f s ago: %s", me.stage,
                            objects.location(rel), old.holder(), old.fingerprint, time.time() - old.started_at, why)
            return Lease(objects, rel, me, version)
        current = objects.read(rel)
        if current is None:
            continue  # released between the two calls
        info = _parse(current)
        if info.owner == me.owner:  # created, but the reply was lost
            return Lease(objects, rel, info, current.version)
        why = expired(info, waiting.unchanged_s(current.version))
        if not why:
            return info
        if objects.delete(rel, current.version):  # only if nobody renewed or took it since the read
            taken_from = (info, why)
    return None


def build_once(store: ArtifactStore, stage: str, fingerprint: str, settings: LeaseSpec | None,
               ready: Callable[[], T | None], build: Callable[[Lease | None], T], clear_hint: str) -> T:
    """`build(lease)` while holding this fingerprint's lease; while another worker holds it, its
    result instead: `ready()` (the artifact, once that worker has published it). A build that
    lost its lease (LeaseLost) is discarded and the wait starts over. Without settings (`lease:
    null` in the spec), `build(None)` at once. `clear_hint`: the command that clears the lease."""
    if settings is None:
        return build(None)
    objects = objects_of(store)
    rel = lease_rel(stage, fingerprint)
    waiting = _Waiting(stage, fingerprint, objects.location(rel), settings, clear_hint)
    holder: LeaseInfo | None = None
    while True:
        got = _attempt(objects, rel, _new_info(stage, fingerprint, settings), waiting)
        if isinstance(got, Lease):
            with got:
                try:
                    return build(got)
                except LeaseLost as e:
                    log.warning("%s: %s; this build is discarded, not published", stage, e)
            waiting.restart()
            continue
        holder = got or holder
        waiting.note(holder)
        found = ready()
        if found is not None:
            log.info("%s: %s built %s; using it", stage, holder.holder() if holder else "another worker", fingerprint)
            return found


@dataclass(frozen=True)
class Held:
    """A lease found in the store."""

    rel: str
    location: str
    info: LeaseInfo


def list_leases(store: ArtifactStore) -> list[Held]:
    """Every lease in the store, live or expired."""
    objects = objects_of(store)
    held = []
    for rel in objects.glob(f"*/{LEASE_PREFIX}*"):
        if "." in rel.rsplit("/", 1)[-1][len(LEASE_PREFIX):]:  # a create's or delete's temp file in flight
            continue
        found = objects.read(rel)
        if found is not None:
            held.append(Held(rel, objects.location(rel), _parse(found)))
    return held


def clear_lease(store: ArtifactStore, rel: str) -> bool:
    """Deletes a lease, live or not (a holder still running creates it again at its next
    heartbeat); False when it was gone already."""
    objects = objects_of(store)
    for _ in range(CLAIM_TRIES):  # renewed between the read and the delete: read it again
        found = objects.read(rel)
        if found is None:
            return False
        if objects.delete(rel, found.version):
            return True
    return False
