"""Cache keys: what enters a stage's fingerprint, and why a fingerprint changed.

fingerprint = sha256 of the canonical JSON of the stage's *key*:

    {"stage":    name,
     "code":     {file: sha256} of the stage module, every gristmill module it imports (found by
                 walking `import` statements, so any edit to code the stage can run changes the
                 key) and the modules it starts by name (the torchrun worker),
     "libs":     {import name: "distribution==version"} of every third-party package that code
                 imports (faiss is faiss-cpu or faiss-gpu, whichever is installed),
     "spec":     its spec section's keyed fields and the other fields it declared,
     "resolved": values fixed where it runs that change the output (device, precision,
                 processes, packing),
     "inputs":   {name: sha256} of the *content* of files outside the store it reads,
     "upstream": {role: fingerprint} of the artifacts it reads}

Left out on purpose: worker counts, store location, log level, timestamps, run ids, and the
libraries in NEUTRAL_LIBS. Nothing is memoised beyond one plan: a long-lived worker hashes
code and inputs again for every plan, so an edit is never missed.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

# Top-level packages whose source enters fingerprints (third-party code enters via "libs").
# data_specs is not one of them: a stage sees the spec only through its keyed values (in the
# key) and the files it names (keyed by content), so adding a field to another section must
# not invalidate every artifact. Code that *interprets* a field lives in tasks/ or eval/.
OWN_PACKAGES = ("tasks", "eval")
# Imported only to show progress or logs, never on a path that writes artifact bytes: a new
# release of one of them must not retrain every model.
NEUTRAL_LIBS = frozenset({"prefect", "tqdm", "loguru"})
FINGERPRINT_CHARS = 20  # 80 bits: collisions are out of reach for any realistic store

# Digests of input files within one plan, by (path, size, mtime, inode); cleared by `fresh()`.
_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data always gives equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_key(key: dict[str, Any]) -> str:
    """The fingerprint of a stage key."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:FINGERPRINT_CHARS]


@contextlib.contextmanager
def fresh() -> Iterator[None]:
    """One plan: input files are hashed at most once inside it, and again in the next one."""
    _FILE_DIGESTS.clear()
    try:
        yield
    finally:
        _FILE_DIGESTS.clear()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read once per plan."""
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


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module one source file imports (anywhere in it)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
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
    return names


def code_closure(*modules: str) -> tuple[dict[str, Path], set[str]]:
    """({module: file} of the gristmill modules these run, transitively; the top-level names of
    the third-party packages they import)."""
    seen: dict[str, Path] = {}
    third_party: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        # A submodule also runs its packages' __init__.py files.
        todo.extend(".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1))
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            top = imported.split(".")[0]
            if top in OWN_PACKAGES:
                todo.append(imported)
            elif top and top not in sys.stdlib_module_names:
                third_party.add(top)
    return seen, third_party


def code_digest(*modules: str) -> dict[str, str]:
    """{file relative to the repository: sha256 prefix} of every gristmill module these run."""
    seen, _ = code_closure(*modules)
    anchor = _repository_root()
    return {os.path.relpath(p, anchor): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(seen.values())}


def _repository_root() -> Path:
    """The folder holding the gristmill packages (where `tasks/` is)."""
    return Path(__file__).resolve().parents[2]


@cache
def _distributions() -> dict[str, list[str]]:
    """{top-level import name: its distributions}: what is installed (~1 s to read, so once a process)."""
    return importlib.metadata.packages_distributions()


def lib_versions(import_names: set[str] | frozenset[str]) -> dict[str, str]:
    """{import name: "distribution==version"} of third-party packages, read fresh; a name with no
    installed distribution is "absent"."""
    out = {}
    for name in sorted(set(import_names) - NEUTRAL_LIBS):
        dists = _distributions().get(name)
        if not dists:
            out[name] = "absent"
            continue
        out[name] = ",".join(f"{d}=={importlib.metadata.version(d)}" for d in sorted(set(dists)))
    return out


def installed_version(distribution: str) -> str:
    """The installed version of a distribution, or "absent" (provenance in records)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


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
    for part, label in (("spec", "spec field"), ("resolved", "resolved"), ("inputs", "input content changed:"),
                        ("code", "code changed:"), ("libs", "library version changed:")):
        paths = _diff_paths(old.get(part), new.get(part))
        if paths:
            reasons.append(f"{label} {', '.join(paths)}" + (" changed" if part in ("spec", "resolved") else ""))
    return "; ".join(reasons) or "key format changed"
