"""Small objects in the store written only on a condition: the primitives leases are made of.

    create(rel, body)            -> its version, or None when the object exists (create-if-absent)
    read(rel)                    -> Versioned(body, version), or None when there is none
    replace(rel, body, version)  -> the new version, or None when it changed or is gone
    delete(rel, version)         -> True when deleted, False when it changed or is gone

`rel` is a path inside the store (`dedup/.lease-<fingerprint>`).

On S3 the server checks the conditions: PutObject with `If-None-Match: *` (412 when the key
exists), PutObject and DeleteObject with `If-Match: <ETag>` (412 when it changed, 404 when it
is gone). AWS S3 honours all three (conditional deletes since September 2025), as do moto and
MinIO; a server that ignores `If-Match` on DELETE makes `delete` unconditional. A version is
the object's ETag.

On a file system (local, or NFS shared by several machines) a version is the sha256 of the
bytes. `create` writes a temp file and hard-links it into place: link(2) fails when the name
exists, atomically (also over NFS, the classic lock-file idiom), and a reader never sees a
half-written object. `delete` first renames the object to a private name (of two callers only
one gets it), checks it, and puts it back when it is not the version asked for. `replace`
checks, then renames a temp file over the object: two steps, so a `delete` of the old version
may land between them and both succeed (tasks/core/lease.py says when that matters).

Other fsspec protocols (gcs, azure, ...) are not offered conditional writes here: InputError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fsspec.asyn import sync

from data_specs.errors import InputError
from tasks.core.retry import with_retries
from tasks.core.store import ArtifactStore

# S3 answers to a condition that did not hold: 412 (it changed), 404 (it is gone: If-Match on a
# missing key), 409 (another conditional write to the key was in flight).
CONDITION_FAILED_STATUS = frozenset({404, 409, 412})
# link(2) on a file system without hard links (some FUSE and SMB mounts); the temp file beside
# the target was just created, so EPERM is not a permission problem here.
NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the version a conditional write or delete names."""

    body: bytes
    version: str  # the ETag on S3; sha256 of the bytes on a file system


class Objects(Protocol):
    """The conditional operations, on one store."""

    def location(self, rel: str) -> str: ...
    def create(self, rel: str, body: bytes) -> str | None: ...
    def read(self, rel: str) -> Versioned | None: ...
    def replace(self, rel: str, body: bytes, version: str) -> str | None: ...
    def delete(self, rel: str, version: str) -> bool: ...
    def glob(self, pattern: str) -> list[str]: ...


def objects_of(store: ArtifactStore) -> Objects:
    """The conditional operations on a store's backend; InputError for a backend without them."""
    if store.is_local:
        return FileObjects(Path(store.root))
    protocols = store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
    if "s3" in protocols:
        return S3Objects(store.fs, store.root, store.url)
    raise InputError(f"store {store.url}: leases need a local folder or an s3:// store (conditional writes); "
                     "set `lease: null` in the spec to build without them (then only one machine may use "
                     "this store at a time)")


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class FileObjects:
    """Conditional objects in a folder (see the module docstring for how each is made atomic)."""

    def __init__(self, root: Path):
        self.root = root

    def location(self, rel: str) -> str:
        return str(self.root / rel)

    def create(self, rel: str, body: bytes) -> str | None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path, body)
        try:
            os.link(tmp, path)  # fails when `path` exists
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno not in NO_LINKS:
                raise
            raise InputError(f"store {self.root}: its file system cannot hard-link files ({e.strerror}), which "
                             "leases use; set `lease: null` in the spec (then only one machine may use this store "
                             "at a time)") from e
        finally:
            tmp.unlink(missing_ok=True)
        return _sha(body)

    def read(self, rel: str) -> Versioned | None:
        try:
            body = (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(body, _sha(body))

    def replace(self, rel: str, body: bytes, version: str) -> str | None:
        current = self.read(rel)
        if current is None or current.version != version:
            return None
        path = self.root / rel
        os.replace(_write_temp(path, body), path)
        return _sha(body)

    def delete(self, rel: str, version: str) -> bool:
        path = self.root / rel
        claimed = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.gone")
        try:
            os.rename(path, claimed)  # of two callers, one gets the object and the other ENOENT
        except FileNotFoundError:
            return False
        try:
            if _sha(claimed.read_bytes()) == version:
                return True
            with contextlib.suppress(FileExistsError):  # a newer one was created meanwhile: it stays
                os.link(claimed, path)
            return False
        finally:
            claimed.unlink(missing_ok=True)

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern) if p.is_file())


def _write_temp(path: Path, body: bytes) -> Path:
    """`body` in a new file beside `path`; returns its path. Not fsynced: these objects matter only
    while their writer runs (a machine that crashes takes its lease's holder with it), and NFS
    shows a closed file to other machines without it (close-to-open consistency)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.new")
    tmp.write_bytes(body)
    return tmp


def _condition_failed(e: BaseException) -> bool:
    """True when s3fs's error is S3 saying a condition did not hold (it keeps the ClientError
    as the cause; its own translation makes a 412 an OSError(EINVAL), which looks transient)."""
    response: dict[str, Any] = getattr(e.__cause__, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") in CONDITION_FAILED_STATUS


class S3Objects:
    """Conditional objects in a bucket, through s3fs's aiobotocore client; each call is retried
    on network trouble (tasks/core/retry.py), a failed condition is an answer, not an error."""

    def __init__(self, fs: Any, root: str, url: str):
        self.fs, self.root, self.url = fs, root, url

    def location(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _call(self, what: str, method: str, rel: str, **kwargs: Any) -> dict[str, Any] | None:
        """One S3 call on the object; its response, or None when its condition did not hold."""
        bucket, key, _ = self.fs.split_path(f"{self.root}/{rel}")

        def call() -> dict[str, Any] | None:
            try:
                return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
            except OSError as e:
                if _condition_failed(e):
                    return None
                raise
            finally:
                self.fs.invalidate_cache(f"{self.root}/{rel}")
        return with_retries(call, f"{what} {self.location(rel)}")

    def create(self, rel: str, body: bytes) -> str | None:
        response = self._call("creating", "put_object", rel, Body=body, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def read(self, rel: str) -> Versioned | None:
        bucket, key, _ = self.fs.split_path(f"{self.root}/{rel}")

        async def get() -> Versioned:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:  # the body and the ETag of one response: one version, never a mix of two
                return Versioned(await response["Body"].read(), response["ETag"])
            finally:
                response["Body"].close()

        def call() -> Versioned | None:
            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None
        return with_retries(call, f"reading {self.location(rel)}")

    def replace(self, rel: str, body: bytes, version: str) -> str | None:
        response = self._call("rewriting", "put_object", rel, Body=body, IfMatch=version)
        return None if response is None else response["ETag"]

    def delete(self, rel: str, version: str) -> bool:
        return self._call("deleting", "delete_object", rel, IfMatch=version) is not None

    def glob(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache()  # listings are cached per process; leases come and go
        found = with_retries(lambda: self.fs.glob(f"{self.root}/{pattern}"), f"listing {self.url}/{pattern}")
        return sorted(path[len(self.root) + 1:] for path in found)
