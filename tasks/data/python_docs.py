"""Built-in corpus "python_docs": the reference docs shipped with the running CPython, as JSONL.

Importing arbitrary stdlib modules can print, open windows or hang, so the actual
generation runs in a child interpreter (see `_child_main`); this module's import has
no side effects.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Modules whose import has side effects (printing, browsers, GUIs) or that only add noise.
SKIP_MODULES: frozenset[str] = frozenset({
    "antigravity", "this", "idlelib", "turtledemo", "turtle", "tkinter", "__main__",
    "lib2to3", "pydoc_data", "ensurepip",
})
MIN_MODULE_CHARS = 200
MAX_DEFAULT_REPR = 80  # longer default reprs are runtime state, not documentation
_STDERR_TAIL = 4000

# The child strips cwd/PYTHONPATH entries from sys.path so nothing shadows the stdlib,
# then runs this very file as __main__ (run_path does not touch sys.path).
_CHILD_CODE = (
    "import sys, runpy\n"
    "bases = (sys.base_prefix, sys.base_exec_prefix)\n"
    "sys.path[:] = [p for p in sys.path[1:] if p.startswith(bases)]\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def corpus_version() -> str:
    """Cheap cache key that changes whenever the generated corpus could change."""
    topics = Path(os.__file__).parent / "pydoc_data" / "topics.py"
    topics_sha = hashlib.sha256(topics.read_bytes()).hexdigest() if topics.is_file() else "missing"
    # Hashing our own source covers changes to the generator's output format.
    gen_sha = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"python_docs|{sys.version}|{sys.platform}|topics={topics_sha}|gen={gen_sha}"


def write_python_docs(dest: Path, timeout_s: float = 300.0) -> int:
    """Writes the corpus to `dest` (JSONL, one document per line) and returns the number of documents."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    env = dict(os.environ, PYTHONHASHSEED="0")
    # -S: document the stdlib only, not site-packages hacks (e.g. setuptools' distutils shim).
    cmd = [sys.executable, "-S", "-c", _CHILD_CODE, str(Path(__file__).resolve()), str(tmp)]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"python_docs generation timed out after {timeout_s}s: "
                           f"{_tail(exc.stderr)}") from exc
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"python_docs generation failed (rc={proc.returncode}): "
                           f"{_tail(proc.stderr)}")
    with tmp.open("rb") as fh:
        count = sum(1 for _ in fh)
    os.replace(tmp, dest)
    return count


def _tail(data: bytes | str | None) -> str:
    """Last few KB of the child's stderr, for an actionable error message."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    return (data or "")[-_STDERR_TAIL:]


def _clean(text: str) -> str:
    """Makes text JSON/UTF-8 safe and run-independent (no NULs, surrogates or addresses)."""
    import re  # local: keeps module import cheap; only the child needs it
    text = text.replace("\x00", "")
    text = text.encode("utf-8", "replace").decode("utf-8")
    # Reprs of sentinel defaults embed memory addresses, which differ per run.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


class _Shown(str):
    """Stand-in default whose repr is its own text (used to hide unsafe default values)."""

    __repr__ = str.__str__


def _signature(obj: Any) -> str:
    """Signature text for a callable, or "" when introspection can't provide one."""
    import inspect
    try:
        sig = inspect.signature(obj)
    except Exception:  # many builtins have no signature metadata
        return ""
    params = []
    for p in sig.parameters.values():
        # Defaults like os.environ would leak the environment (secrets) and break determinism.
        if isinstance(p.default, type(os.environ)):
            p = p.replace(default=_Shown("os.environ"))
        elif p.default is not p.empty and len(repr(p.default)) > MAX_DEFAULT_REPR:
            p = p.replace(default=_Shown("..."))
        params.append(p)
    try:
        return str(sig.replace(parameters=params))
    except Exception:
        return ""


def _doc(obj: Any) -> str:
    """Cleaned docstring, or "" when there is none."""
    import inspect
    try:
        return (inspect.getdoc(obj) or "").strip()
    except Exception:
        return ""


def _owned_by(obj: Any, mod_name: str) -> bool:
    """True if obj is defined by the module (or its C accelerator / a package submodule)."""
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    return owner in (mod_name, "_" + mod_name) or owner.startswith(mod_name + ".")


def _class_sections(cls: type, cls_name: str) -> list[str]:
    """`###` sections for public methods defined on the class itself (not inherited)."""
    import inspect
    sections = []
    for name in sorted(vars(cls)):
        raw = vars(cls)[name]
        if name.startswith("_") or not (inspect.isroutine(raw) or isinstance(raw, (classmethod, staticmethod))):
            continue
        try:
            meth = getattr(cls, name)
        except Exception:
            continue
        doc = _doc(meth)
        if doc:
            sections.append(f"### {cls_name}.{name}{_signature(meth)}\n\n{doc}")
    return sections


def _module_text(mod_name: str, module: Any) -> str:
    """Markdown-ish text for one module: docstring plus documented public classes/functions."""
    import inspect
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in vars(module) if not n.startswith("_")]
    parts = [f"# {mod_name}", _doc(module)]
    for name in sorted({n for n in names if isinstance(n, str)}):
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        doc = _doc(obj)
        if not doc or not _owned_by(obj, mod_name):
            continue
        parts.append(f"## {name}{_signature(obj)}\n\n{doc}")
        if inspect.isclass(obj):
            parts.extend(_class_sections(obj, name))
    return _clean("\n\n".join(p for p in parts if p))


def _generate() -> list[dict[str, Any]]:
    """All documents in output order: topics by name, then modules by name."""
    import importlib
    import warnings
    from pydoc_data.topics import topics
    warnings.simplefilter("ignore")  # deprecated modules warn on import; irrelevant here
    docs: list[dict[str, Any]] = [
        {"id": f"topic:{name}", "text": _clean(f"# {name}\n\n{topics[name]}"),
         "metadata": {"kind": "topic", "name": name}}
        for name in sorted(topics)
    ]
    for mod_name in sorted(sys.stdlib_module_names):
        if mod_name.startswith("_") or mod_name in SKIP_MODULES:
            continue
        try:
            module = importlib.import_module(mod_name)
            text = _module_text(mod_name, module)
        except BaseException:  # includes SystemExit from odd modules; skip what can't load
            continue
        if len(text) >= MIN_MODULE_CHARS:
            docs.append({"id": f"module:{mod_name}", "text": text,
                         "metadata": {"kind": "module", "name": mod_name}})
    return docs


def _child_main(tmp_path: str) -> None:
    """Child entry point: writes the JSONL to tmp_path and exits hard."""
    docs = _generate()
    # Written here, not with tasks/core/jsonl.py: the child's sys.path holds only the stdlib.
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: imported modules' atexit hooks/threads could hang or print.
    os._exit(0)


if __name__ == "__main__":
    _child_main(sys.argv[1])
