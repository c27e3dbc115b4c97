"""Faults of the machine rather than of a stage: a full disk, a file-size limit, a store that
cannot be written. The runner turns them into messages that say what happened and where,
instead of a library's wrapped error (torch reports a full disk as "unexpected pos 704 vs 598").

Python's own OSError carries the errno (and often no file name: a failed `write` has none);
Rust libraries (tokenizers, safetensors) end their message with "(os error N)"; torch reports
neither, so the machine itself is looked at: a file that reached this process's file-size
limit (RLIMIT_FSIZE), or a store disk with almost no space left.
"""

from __future__ import annotations

import errno
import re
import resource
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large (a file-size limit was reached)"}
READ_ONLY = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted"}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# Free bytes below which a write that failed without saying why is taken for a full disk.
LOW_SPACE_BYTES = 1 << 20


@dataclass(frozen=True)
class DiskFault:
    """A write refused by the machine: its errno and the file (or folder) being written."""

    errno: int
    path: str

    @property
    def read_only(self) -> bool:
        """The store cannot be written at all (as opposed to being full)."""
        return self.errno in READ_ONLY

    @property
    def what(self) -> str:
        """The fault in words."""
        return FULL.get(self.errno) or READ_ONLY.get(self.errno) or errno.errorcode.get(self.errno, str(self.errno))


def _errno_behind(e: BaseException | None) -> tuple[int, str] | None:
    """(errno, file name or "") of the OS error behind an exception or its causes, if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno, str(e.filename or "")
        match = _RUST_OS_ERROR.search(str(e))
        if match:
            return int(match.group(1)), ""
        e = e.__cause__ or e.__context__
    return None


def newest_file(folders: Sequence[Path]) -> Path | None:
    """The most recently written file under `folders`: the one a failed write was filling."""
    files = [p for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def diagnose(e: BaseException, store_root: Path, folders: Sequence[Path]) -> DiskFault | None:
    """The disk fault behind a failure while writing under `folders` (in the store at
    `store_root`), or None when the failure is not the disk's. Call before cleaning `folders`."""
    newest = newest_file(folders)
    where = str(newest or folders[0])
    found = _errno_behind(e)
    if found is not None:
        number, filename = found
        if number in FULL:
            return DiskFault(number, filename or where)
        # A permission error on a file outside the store (a corpus file) is the stage's own failure.
        if number in READ_ONLY and (filename or where).startswith(str(store_root)):
            return DiskFault(number, filename or where)
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if newest is not None and limit != resource.RLIM_INFINITY and newest.stat().st_size >= limit:
        return DiskFault(errno.EFBIG, str(newest))
    if store_root.exists() and shutil.disk_usage(store_root).free < LOW_SPACE_BYTES:
        return DiskFault(errno.ENOSPC, where)
    return None


def from_os_error(e: OSError, default_path: str) -> DiskFault | None:
    """The disk fault an OSError of the store's own reads and writes is, if it is one."""
    if e.errno in FULL or e.errno in READ_ONLY:
        return DiskFault(e.errno, str(e.filename or default_path))
    return None
