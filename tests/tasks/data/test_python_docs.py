"""Tests for the built-in "python_docs" corpus generator."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.data import python_docs
from tasks.data.python_docs import corpus_version, write_python_docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[dict]]:
    """Generates the corpus once for the whole module (it imports ~200 stdlib modules)."""
    dest = tmp_path_factory.mktemp("python_docs") / "python_docs.jsonl"
    count = write_python_docs(dest)
    docs = [json.loads(line) for line in dest.read_text(encoding="utf-8").splitlines()]
    return dest, count, docs


def test_count_matches_lines_and_no_tmp_left(corpus: tuple[Path, int, list[dict]]) -> None:
    """The returned count is the number of JSONL lines and the temp file was renamed away."""
    dest, count, docs = corpus
    assert count == len(docs) > 0
    assert not dest.with_suffix(".tmp").exists()


def test_deterministic(corpus: tuple[Path, int, list[dict]], tmp_path: Path) -> None:
    """Same Python yields byte-identical output, even from a different cwd."""
    dest, _, _ = corpus
    again = tmp_path / "again.jsonl"
    old_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        write_python_docs(again)
    finally:
        os.chdir(old_cwd)
    assert again.read_bytes() == dest.read_bytes()


def test_schema_and_order(corpus: tuple[Path, int, list[dict]]) -> None:
    """Every line has the documented shape; topics come first, each group sorted by name."""
    _, _, docs = corpus
    for doc in docs:
        assert set(doc) == {"id", "text", "metadata"}
        kind, name = doc["metadata"]["kind"], doc["metadata"]["name"]
        assert kind in ("topic", "module")
        assert doc["id"] == f"{kind}:{name}"
        assert doc["text"].startswith(f"# {name}\n\n")
        assert "\x00" not in doc["text"]
    kinds = [d["metadata"]["kind"] for d in docs]
    assert kinds == sorted(kinds, key=lambda k: k != "topic")
    for kind in ("topic", "module"):
        names = [d["metadata"]["name"] for d in docs if d["metadata"]["kind"] == kind]
        assert names and names == sorted(names)


def test_ids_unique(corpus: tuple[Path, int, list[dict]]) -> None:
    """Document ids are unique."""
    ids = [d["id"] for d in corpus[2]]
    assert len(ids) == len(set(ids))


def test_expected_content(corpus: tuple[Path, int, list[dict]]) -> None:
    """Topics and well-known modules are present with their API documented."""
    by_id = {d["id"]: d for d in corpus[2]}
    assert any(i.startswith("topic:") for i in by_id)
    assert "topic:if" in by_id
    assert "dumps" in by_id["module:json"]["text"]
    assert "## dumps(" in by_id["module:json"]["text"]
    assert "### JSONDecoder.decode(" in by_id["module:json"]["text"]


def test_skipped_modules_absent(corpus: tuple[Path, int, list[dict]]) -> None:
    """Side-effecting / GUI / private modules never become documents."""
    ids = {d["id"] for d in corpus[2]}
    for name in ("antigravity", "this", "idlelib", "turtle", "tkinter", "turtledemo",
                 "lib2to3", "pydoc_data", "ensurepip", "__main__"):
        assert f"module:{name}" not in ids
    assert not any(i.startswith("module:_") for i in ids)


def test_module_texts_long_enough(corpus: tuple[Path, int, list[dict]]) -> None:
    """Module docs shorter than the minimum are dropped."""
    for doc in corpus[2]:
        if doc["metadata"]["kind"] == "module":
            assert len(doc["text"]) >= 200, doc["id"]


def test_no_environment_or_addresses_leak(corpus: tuple[Path, int, list[dict]]) -> None:
    """Defaults like os.environ or object addresses must not leak runtime state into the corpus."""
    raw = corpus[0].read_text(encoding="utf-8")
    assert os.environ.get("PATH", "/nonexistent-path") not in raw
    assert " at 0x" not in raw


def test_parent_output_not_polluted(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The child's stdout/stderr (e.g. noisy imports) never reach the parent's streams."""
    write_python_docs(tmp_path / "out.jsonl")
    out, err = capfd.readouterr()
    assert "The Zen of Python" not in out + err
    assert out == "" and err == ""


def test_child_failure_raises_with_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing child surfaces its stderr in a RuntimeError and leaves no files behind."""
    monkeypatch.setattr(python_docs, "_CHILD_CODE", "import sys; sys.stderr.write('boom-xyz'); sys.exit(3)")
    dest = tmp_path / "fail.jsonl"
    with pytest.raises(RuntimeError, match="boom-xyz"):
        write_python_docs(dest)
    assert not dest.exists() and not dest.with_suffix(".tmp").exists()


def test_timeout_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hanging child is killed at the timeout and reported as RuntimeError."""
    monkeypatch.setattr(python_docs, "_CHILD_CODE", "import time; time.sleep(30)")
    with pytest.raises(RuntimeError, match="timed out"):
        write_python_docs(tmp_path / "slow.jsonl", timeout_s=1.0)


def test_corpus_version_stable_and_cheap() -> None:
    """corpus_version is stable, names the Python version, and imports no stdlib modules to compute."""
    v1, v2 = corpus_version(), corpus_version()
    assert v1 == v2
    assert platform.python_version() in v1
    assert sys.platform in v1
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules);"
            "from tasks.data.python_docs import corpus_version; corpus_version();"
            "print(sorted(m for m in set(sys.modules) - before if m in ('pydoc_data.topics', 'cgi', 'tkinter', 'antigravity')))")
    root = str(Path(python_docs.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_has_no_side_effects() -> None:
    """Importing the module runs nothing (no child process, no output)."""
    root = str(Path(python_docs.__file__).resolve().parent.parent)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import tasks.data.python_docs"
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True)
    assert out.stdout == "" and out.stderr == ""
