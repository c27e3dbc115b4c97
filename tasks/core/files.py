"""Payload files: checksums that detect damage, reproducible gzip, flushing, linking.

What `artifact.json` records about each payload file (sha256, size) and how a payload is
checked against it; the store decides what to do with what these find (tasks/core/store.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from tasks.core.fingerprint import sha256_file


def checksum_tree(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every payload file, so later damage to an artifact can be detected."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def make_gzip_reproducible(root: Path) -> None:
    """Zeroes the write time in every gzip header under `root` (as `gzip -n` does), so equal
    content gives equal bytes and equal checksums whenever it was built. The header's MTIME
    field is bytes 4-7; no checksum covers it (the CRC32 in the trailer is of the content)."""
    for path in root.rglob("*.gz"):
        with path.open("r+b") as f:
            header = f.read(8)
            if len(header) == 8 and header[:2] == b"\x1f\x8b" and header[4:8] != b"\0\0\0\0":
                f.seek(4)
                f.write(b"\0\0\0\0")


def fsync_tree(root: Path) -> None:
    """Flushes a finished build to disk before it is renamed into place."""
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on folders; the rename still orders it
            pass
        finally:
            os.close(fd)


def safe_relpath(rel: str) -> bool:
    """A record's file path stays inside its artifact folder (no absolute path, no `..`)."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def check_sizes(found: dict[str, Any], files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with a payload's sizes (`found`: relative path -> bytes) against a record's `files`."""
    problems = []
    for rel, want in files.items():
        if not safe_relpath(rel):
            problems.append(f"{rel}: path outside the artifact")
        elif rel not in found:
            problems.append(f"{rel}: missing")
        elif found[rel] != want.get("bytes"):
            problems.append(f"{rel}: {found[rel]} bytes, artifact.json says {want.get('bytes')}")
    return problems


def check_files(root: Path, files: dict[str, dict[str, Any]], deep: bool) -> list[str]:
    """Problems with the payload under a local folder against a record's `files` (sizes; with
    `deep`, sha256 of the files whose size is right)."""
    found = {rel: (root / rel).stat().st_size for rel in files
             if safe_relpath(rel) and (root / rel).is_file()}
    problems = check_sizes(found, files)
    if deep:
        for rel, want in files.items():
            if rel in found and found[rel] == want.get("bytes"):
                digest = sha256_file(root / rel)
                if digest != want.get("sha256"):
                    problems.append(f"{rel}: sha256 {digest[:16]}…, artifact.json says {str(want.get('sha256'))[:16]}…")
    return problems


def link_tree(src: Path, dst: Path) -> None:
    """Puts a finished folder from a work area into an artifact (hard links when possible)."""
    shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)
