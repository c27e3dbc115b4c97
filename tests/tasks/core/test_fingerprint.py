"""Cache keys: the same/different table, code tracking, and the reasons `plan` gives."""

import os
import shutil

import pytest

from tasks.core.fingerprint import code_digest, explain_change
from tasks.core.runner import execute, plan
from tests.conftest import SpecFactory, doc_text, write_jsonl


def fingerprints(factory: SpecFactory, **sections) -> dict[str, str]:
    return {p.name: p.fingerprint for p in plan(factory.load(**sections), factory.store)}


# change -> (ingest fingerprint changes?, dedup fingerprint changes?)
SPEC_CHANGES = [
    ({"executor": {"workers": 4}}, False, False),
    ({"executor": {"kind": "ray"}}, False, False),
    ({"store": "/somewhere/else"}, False, False),
    ({"name": "another-name"}, False, False),
    ({"executor": {"tasks": 2}}, True, True),
    ({"corpus": {"sources": [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"}],
                 "filters": {"min_chars": 10}}}, True, True),
    ({"corpus": {"sources": [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": None}]}}, True, True),
    ({"dedup": {"near": {"threshold": 0.7}}}, False, True),
    ({"dedup": {"near": None}}, False, True),
    ({"dedup": {"exact": False}}, False, True),
]


@pytest.mark.parametrize("change, ingest_changes, dedup_changes", SPEC_CHANGES)
def test_spec_changes(project, change, ingest_changes, dedup_changes):
    before, after = fingerprints(project), fingerprints(project, **change)
    assert (before["ingest"] != after["ingest"]) == ingest_changes
    assert (before["dedup"] != after["dedup"]) == dedup_changes


def test_touching_a_file_keeps_the_key_but_editing_it_changes_it(project):
    before = fingerprints(project)
    data = project.root / "data" / "docs.jsonl"
    os.utime(data, (1, 1))
    assert fingerprints(project) == before
    lines = data.read_text().splitlines()
    lines[3] = lines[3].replace("\"text\": \"", "\"text\": \"edited ")
    data.write_text("\n".join(lines) + "\n")
    after = fingerprints(project)
    assert after["ingest"] != before["ingest"] and after["dedup"] != before["dedup"]


def test_adding_a_file_changes_the_key(project):
    before = fingerprints(project)
    write_jsonl(project.root / "data" / "more.jsonl", [{"id": "m", "text": doc_text(99)}])
    assert fingerprints(project)["ingest"] != before["ingest"]


def test_moving_the_project_keeps_the_key(project, tmp_path_factory):
    before = fingerprints(project)
    moved = tmp_path_factory.mktemp("moved") / "proj"
    shutil.copytree(project.root, moved)
    assert fingerprints(SpecFactory(moved)) == before


def test_code_digest_covers_the_stage_and_the_shared_code_it_imports():
    files = dict(code_digest("tasks.dedup"))
    for expected in ("tasks/dedup.py", "tasks/data/engine.py", "tasks/core/stage.py", "tasks/core/store.py"):
        assert expected in files
    assert not any(f.startswith("data_specs/") for f in files)  # the spec enters through its values
    assert "tasks/ingest.py" not in files  # dedup does not import ingest
    assert "tasks/data/readers.py" in dict(code_digest("tasks.ingest"))


def test_code_edit_changes_the_fingerprint(project, monkeypatch):
    import tasks.core.runner as runner

    before = fingerprints(project)
    real = runner.code_digest

    def edited(module):
        files = dict(real(module))
        if module == "tasks.dedup":
            files["tasks/dedup.py"] = "0" * 16
        return tuple(sorted(files.items()))

    monkeypatch.setattr(runner, "code_digest", edited)
    after = fingerprints(project)
    assert after["ingest"] == before["ingest"] and after["dedup"] != before["dedup"]


def test_plan_reasons_after_a_build(project):
    spec = project.load()
    rows = plan(spec, project.store)[:2]
    assert [r.name for r in rows] == ["ingest", "dedup"]
    assert [r.reason for r in rows] == ["never built", "never built"]
    for row in rows:
        execute(row, spec, project.store)
    assert all(r.cached and r.reason == "" for r in plan(spec, project.store)[:2])

    rows = plan(project.load(dedup={"near": {"threshold": 0.7}}), project.store)
    assert rows[0].cached
    assert rows[1].reason == "spec field dedup.near.threshold changed"

    (project.root / "data" / "docs.jsonl").write_text('{"id": "x", "text": "%s"}\n' % doc_text(1))
    rows = plan(project.load(), project.store)
    assert rows[0].reason == "input content changed: 0:docs.jsonl"
    assert rows[1].reason == "upstream ingest changed"


def test_explain_change_names_code_and_library_changes():
    old = {"upstream": {}, "spec": {"a": 1}, "inputs": {}, "code": {"tasks/x.py": "1"}, "libs": {"datatrove": "0.10"}}
    new = {**old, "code": {"tasks/x.py": "2"}, "libs": {"datatrove": "0.11"}}
    reason = explain_change(old, new)
    assert "code changed: tasks/x.py" in reason
    assert "library version changed: datatrove" in reason
    assert explain_change(None, new) == "never built"


def test_force_marks_the_stage_and_its_dependents(project):
    spec = project.load()
    for row in plan(spec, project.store)[:2]:
        execute(row, spec, project.store)
    rows = {r.name: r for r in plan(spec, project.store, force=["ingest"])}
    assert rows["ingest"].reason == "forced" and not rows["ingest"].cached
    assert rows["dedup"].reason.startswith("forced upstream")
    rows = {r.name: r for r in plan(spec, project.store, force=["dedup"])}
    assert rows["ingest"].cached and not rows["dedup"].cached
