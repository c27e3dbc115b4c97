"""Cache keys: what enters a stage's fingerprint, and why a fingerprint changed.

fingerprint = sha256 of the canonical JSON of the stage's *key*:

    {"stage":    name,
     "code":     {file: sha256} of the stage module, every gristmill module it imports (found by
                 walking `import` statements, so any edit to code the stage can run changes the
                 key) and the modules it starts by name (the torchrun worker),
     "libs":     {distribution: version} of every third-party package that code imports (found
                 by import name: faiss is faiss-cpu or faiss-gpu, whichever is installed) and of
                 everything those require, transitively (tokenizers under transformers),
     "spec":     its spec section's keyed fields and the other fields it declared,
     "resolved": values fixed where it runs that change the output (device, precision,
                 processes, packing),
     "inputs":   {name: sha256} of the *content* of files outside the store it reads,
     "upstream": {stage: fingerprint} of the artifacts it reads}

Left out on purpose: worker counts, store location, log level, timestamps, run ids, and the
libraries in NEUTRAL_LIBS. Code and inputs are hashed again for every plan, so a long-lived
worker never misses an edit. What outlives a plan is keyed by the state of the file it was read
from, so an edit or an install is seen by the next plan: the names a module imports (parsed
once per module file's size, mtime and inode) and a distribution's version and requirements
(read once per metadata file's); a plan still locates every distribution afresh.

The requirement closure is deliberately wide: upgrading any package a stage's code can reach
rebuilds the stage. A pinned environment (constraints.txt) upgrades rarely and on purpose;
a stale artifact after an upgrade would go unnoticed.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import email
import email.message
import hashlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

# Top-level packages whose source enters fingerprints (third-party code enters via "libs").
# data_specs is not one of them: a stage sees the spec only through its keyed values (in the
# key) and the files it names (keyed by content), so adding a field to another section must
# not invalidate every artifact. Code that *interprets* a field lives in tasks/ or eval/.
OWN_PACKAGES = ("tasks", "eval")
FIRST_PARTY = (*OWN_PACKAGES, "data_specs", "flows")  # gristmill's own: never a "library"
# Imported only to show progress or logs, never on a path that writes artifact bytes: a new
# release of one of them must not retrain every model.
NEUTRAL_LIBS = frozenset({"prefect", "tqdm", "loguru"})
FINGERPRINT_CHARS = 20  # 80 bits: collisions are out of reach for any realistic store

# What one plan has already read (file digests by (path, size, mtime, inode), module sources,
# distributions), so ten stages sharing code read it once; None outside `fresh()`, where nothing
# is kept: a long-lived worker reads everything again for its next plan.
_PLAN: dict[str, dict[Any, Any]] | None = None
# What later plans of this process reuse, each keyed by the state of the file it came from
# (`file_state`): a module's imports, a distribution's metadata. Parsing them was ~1 s of
# every plan on 2 cores, and a CLI run plans twice (the CLI, then its flow).
_PROCESS: dict[tuple[Any, ...], Any] = {}


def _memo(kind: str) -> dict[Any, Any]:
    """This plan's memo of one kind (a throwaway dict outside a plan)."""
    return _PLAN.setdefault(kind, {}) if _PLAN is not None else {}


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data always gives equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_key(key: dict[str, Any]) -> str:
    """The fingerprint of a stage key."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:FINGERPRINT_CHARS]


@contextlib.contextmanager
def fresh() -> Iterator[None]:
    """One plan: code, input files and library metadata are read at most once inside it, and
    again in the next one."""
    global _PLAN
    outer, _PLAN = _PLAN, {}
    try:
        yield
    finally:
        _PLAN = outer


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_state(path: Path) -> tuple[str, int, int, int]:
    """(path, size, mtime, inode): what an edit, a replacement or a reinstall of a file changes."""
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read once per plan."""
    key, memo = file_state(path), _memo("files")
    if key not in memo:
        memo[key] = sha256_file(path)
    return memo[key]


def tree_digest(root: Path) -> str:
    """sha256 over every file of a folder (relative names and contents), in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix().encode("utf-8", "surrogateescape")  # names need not be UTF-8
        h.update(name + b"\0" + file_digest(path).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- code


def _module_file(name: str) -> Path | None:
    """Source file of a gristmill module, found by path, importing nothing. importlib.util.find_spec
    would import the parent packages, and the walk also tries names that are not modules
    (`from tasks.data.quality_filters import Tally` gives tasks.data.quality_filters.Tally), whose
    parent is a module: it would be imported, with the slow libraries it imports at its top, which
    planning a run otherwise never imports (tests/tasks/test_registry.py)."""
    base = _repository_root().joinpath(*name.split("."))
    for path in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if path.is_file():
            return path
    return None


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
        for imported in _module_imports(path, name):
            top = imported.split(".")[0]
            if top in OWN_PACKAGES:
                todo.append(imported)
            elif top and top not in FIRST_PARTY and top not in sys.stdlib_module_names:
                third_party.add(top)
    return seen, third_party


def _module_imports(path: Path, name: str) -> set[str]:
    """The names a module file imports (its state read once per plan, parsed once per state)."""
    memo = _memo("imports")
    if name not in memo:
        key = ("imports", name, file_state(path))
        if key not in _PROCESS:
            _PROCESS[key] = _imported_names(parse_source(path), name, path.name == "__init__.py")
        memo[name] = _PROCESS[key]
    return memo[name]


AST_RETRIES = 3


def parse_source(path: Path) -> ast.Module:
    """ast.parse of a file, retried when CPython 3.11's AST constructor reports a "recursion depth
    mismatch": its depth counter is shared by the interpreter's threads, so a parse racing another
    thread's (Prefect parses flow sources in its own threads) can fail spuriously (CPython
    gh-106905; seen once in the suite, in a CLI run against a Prefect server). The parse is pure:
    a retry gives the right tree."""
    source = path.read_bytes()
    for attempt in range(AST_RETRIES):
        try:
            return ast.parse(source, filename=str(path))
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == AST_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def code_digest(*modules: str) -> dict[str, str]:
    """{file relative to the repository: sha256 prefix} of every gristmill module these run."""
    seen, _ = code_closure(*modules)
    anchor = _repository_root()
    memo = _memo("sources")
    for p in seen.values():
        if p not in memo:
            memo[p] = hashlib.sha256(source_bytes(p)).hexdigest()[:16]
    return {os.path.relpath(p, anchor): memo[p] for p in sorted(seen.values())}


def source_bytes(path: Path) -> bytes:
    """A module's source as hashed (one seam, so a test can show an edit changes the key)."""
    return path.read_bytes()


@cache
def _repository_root() -> Path:
    """The folder holding the gristmill packages (where `tasks/` is)."""
    return Path(__file__).resolve().parents[2]


@cache
def _distributions() -> dict[str, list[str]]:
    """{top-level import name: its distributions}: importlib.metadata.packages_distributions(), with
    each distribution's name read from its metadata's headers alone (through the email parser,
    whole files were ~0.5 s of every process's first plan); once a process."""
    found: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions():
        name = _headers(dist)["Name"]
        for top in (dist.read_text("top_level.txt") or "").split() or _top_level_inferred(dist):
            found.setdefault(top, []).append(name)
    return found


def _top_level_inferred(dist: importlib.metadata.Distribution) -> set[str]:
    """The top-level names of a distribution's .py files, as importlib infers them, from its RECORD
    read as text (torch's lists ~20k files: made into path objects, ~0.3 s of a first plan)."""
    record = dist.read_text("RECORD")
    if record is None:  # an egg-info: its file list, as importlib reads it
        paths = [str(f) for f in dist.files or ()]
    else:
        paths = [row[0] for row in csv.reader(record.splitlines()) if row]
    tops = set()
    for path in paths:
        parts = [p for p in path.split("/") if p and p != "."]
        if parts and parts[-1].endswith(".py") and parts[-1] != ".py":
            tops.add(parts[0] if len(parts) > 1 else parts[0][: -len(".py")])
    return tops


def _headers(dist: importlib.metadata.Distribution) -> email.message.Message:
    """A distribution's metadata headers, as `dist.metadata` parses them, without the long
    description that follows them (most of the file)."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or dist.read_text("") or ""
    return email.message_from_string(text.split("\n\n", 1)[0] + "\n")


def lib_versions(import_names: Iterable[str]) -> dict[str, str]:
    """{distribution: version} of the packages behind these import names and of everything they
    require, transitively; read fresh. An import name no installed distribution provides is
    keyed as {name: "absent"} (installing it later changes the key)."""
    roots, out = [], {}
    for name in sorted(set(import_names) - NEUTRAL_LIBS):
        dists = _distributions().get(name)
        if dists:
            roots += dists
        else:
            out[name] = "absent"
    return {**out, **requirement_closure(roots)}


def requirement_closure(distributions: Iterable[str]) -> dict[str, str]:
    """{distribution: version} of these distributions and everything they require (environment
    markers evaluated here, extras not taken), transitively."""
    versions: dict[str, str] = {}
    todo = [canonicalize_name(d) for d in distributions]
    while todo:
        name = todo.pop()
        if name not in versions:
            versions[name], requires = _distribution(name)
            todo += requires
    return dict(sorted(versions.items()))


def _distribution(name: str) -> tuple[str, list[str]]:
    """(installed version or "absent", the names it requires here) of one distribution, read
    once per plan; extras are not taken, environment markers are evaluated."""
    memo = _memo("dists")
    if name not in memo:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            memo[name] = ("absent", [])  # an optional requirement not installed
            return memo[name]
        key = _metadata_key(name, dist)
        if key is None:  # not read from a file (a stand-in): as importlib reads it, each plan
            memo[name] = (dist.version, _runtime_requirements(dist.requires))
            return memo[name]
        if key not in _PROCESS:
            headers = _headers(dist)  # one parse for both (dist.version and dist.requires parse it each)
            listed = headers.get_all("Requires-Dist")
            if listed is None and dist.read_text("requires.txt"):
                listed = dist.requires  # an egg-info's requirements
            _PROCESS[key] = (headers["Version"], _runtime_requirements(listed))
        memo[name] = _PROCESS[key]
    return memo[name]


def _metadata_key(name: str, dist: importlib.metadata.Distribution) -> tuple[Any, ...] | None:
    """What identifies the metadata of an installed distribution: its metadata file's state (an
    upgrade installs another dist-info folder, a reinstall rewrites the file); None for a
    distribution not read from a file, which is then read again each plan."""
    folder = getattr(dist, "_path", None)  # importlib's PathDistribution: its dist-info folder
    if not isinstance(folder, Path):
        return None
    for metadata in ("METADATA", "PKG-INFO"):
        if (folder / metadata).is_file():
            return "dist", name, file_state(folder / metadata)
    return None


def _runtime_requirements(lines: Iterable[str] | None) -> list[str]:
    """The distributions these requirement lines name that apply here: environment markers
    evaluated, extras not taken."""
    requires = []
    for line in lines or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            requires.append(canonicalize_name(req.name))
    return requires


def installed_version(distribution: str) -> str:
    """The installed version of a distribution, or "absent" (provenance in records)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------- explaining a miss


def _diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two JSON values (list items by position,
    e.g. quality.filters.2.min_num_sentences, when both lists have the same length)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff_paths(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
            all(isinstance(v, dict) for v in old + new):
        return [p for i, (a, b) in enumerate(zip(old, new)) for p in _diff_paths(a, b, f"{prefix}.{i}")]
    return [] if old == new else [prefix or "<all>"]


def explain_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why `new` misses the cache, compared with the key of an earlier artifact of the stage."""
    if old is None:
        return "never built"
    reasons = []
    before = old.get("upstream", {})
    gone, came = sorted(set(before) - set(new["upstream"])), sorted(set(new["upstream"]) - set(before))
    if gone or came:  # an optional stage skipped or brought back (quality: null)
        reasons.append(f"reads {', '.join(came) or 'nothing new'} instead of {', '.join(gone) or 'nothing'}")
    changed_up = sorted(s for s in new["upstream"] if s in before and before[s] != new["upstream"][s])
    if changed_up:
        reasons.append("upstream " + ", ".join(changed_up) + " changed")
    for part, label in (("spec", "spec field"), ("resolved", "resolved"), ("inputs", "input content changed:"),
                        ("code", "code changed:"), ("libs", "library version changed:")):
        paths = _diff_paths(old.get(part), new.get(part))
        if paths:
            reasons.append(f"{label} {', '.join(paths)}" + (" changed" if part in ("spec", "resolved") else ""))
    return "; ".join(reasons) or "key format changed"
