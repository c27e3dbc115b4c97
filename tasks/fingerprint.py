"""Cache keys: what enters a stage's fingerprint, and why a fingerprint changed.

fingerprint = sha256 of the canonical JSON of the stage's *key*:

    {"stage":    name,
     "code":     {file: sha256} of the stage module and every gristmill module it imports,
                 found by walking `import` statements (not by a hand-bumped version, which
                 can be forgotten: any edit to code the stage can run changes the key),
     "libs":     {package: version} of the libraries that shape the output,
     "spec":     the spec fields that change the output (unkeyed fields dropped),
     "inputs":   {name: sha256} of the *content* of external input files,
     "upstream": {stage: fingerprint} of the artifacts it reads}

Left out on purpose: device, worker counts, store location, log level, timestamps, run ids.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

# Top-level packages whose source enters fingerprints (third-party code enters via "libs").
# data_specs is not one of them: a stage sees the spec only through its `spec_view` values
# (in the key) and the files it names (keyed by content), so adding a field to another
# section must not invalidate every artifact. Code that *interprets* a field lives in tasks/.
OWN_PACKAGES = ("tasks", "eval")
FINGERPRINT_CHARS = 20  # 80 bits: collisions are out of reach for any realistic store


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data always gives equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_key(key: dict[str, Any]) -> str:
    """The fingerprint of a stage key."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:FINGERPRINT_CHARS]


# Memo of file digests by (path, size, mtime, inode): a touched file is re-read, but
# hashes the same when its bytes did not change.
_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, memoised by its stat so a re-plan does not re-read it."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _FILE_DIGESTS:
        _FILE_DIGESTS[memo] = sha256_file(path)
    return _FILE_DIGESTS[memo]


def tree_digest(root: Path) -> str:
    """sha256 over every file of a folder (relative names and contents), in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix().encode("utf-8", "surrogateescape")  # names need not be UTF-8
        h.update(name + b"\0" + file_digest(path).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- code


def _module_file(name: str) -> Path | None:
    """Source file of a gristmill module, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_names(path: Path, module: str) -> set[str]:
    """Absolute names of the gristmill modules one source file imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            # `from tasks import dedup` imports a module, not a name in tasks/__init__.py.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in OWN_PACKAGES}


@lru_cache(maxsize=None)
def code_digest(module: str) -> tuple[tuple[str, str], ...]:
    """(file, sha256) for a module and every gristmill module it transitively imports."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        # A submodule also runs its packages' __init__.py files.
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend(parents)
        todo.extend(_imported_names(path, name))
    root = _module_file(module)
    anchor = root.parents[len(module.split(".")) - (0 if root.name == "__init__.py" else 1)] if root else Path()
    return tuple(
        sorted((os.path.relpath(p, anchor), hashlib.sha256(p.read_bytes()).hexdigest()[:16]) for p in seen.values())
    )


@lru_cache(maxsize=None)
def lib_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the libraries that shape a stage's output."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


# ---------------------------------------------------------------- explaining a miss


def _diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff_paths(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [prefix or "<all>"]


def explain_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why `new` misses the cache, compared with the key of an earlier artifact of the stage."""
    if old is None:
        return "never built"
    reasons = []
    changed_up = sorted(s for s in new["upstream"] if old.get("upstream", {}).get(s) != new["upstream"][s])
    if changed_up:
        reasons.append("upstream " + ", ".join(changed_up) + " changed")
    fields = _diff_paths(old.get("spec"), new["spec"])
    if fields:
        reasons.append("spec field " + ", ".join(fields) + " changed")
    inputs = _diff_paths(old.get("inputs"), new["inputs"])
    if inputs:
        reasons.append("input content changed: " + ", ".join(inputs))
    code = _diff_paths(dict(old.get("code", {})), dict(new["code"]))
    if code:
        reasons.append("code changed: " + ", ".join(code))
    libs = _diff_paths(old.get("libs"), new["libs"])
    if libs:
        reasons.append("library version changed: " + ", ".join(libs))
    return "; ".join(reasons) or "key format changed"
