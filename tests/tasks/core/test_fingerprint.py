"""Cache keys: the same/different table for every stage, the stale-key cases, code tracking,
and the reasons `plan` gives."""

import ast
import importlib.metadata
import os
import shutil
from pathlib import Path

import pytest

from data_specs.loader import load_spec
from tasks.core import fingerprint
from tasks.core.fingerprint import code_closure, code_digest, digest_key, explain_change, lib_versions
from tasks.core.keys import Placement, stage_key
from tasks.core.runner import execute, plan
from tasks.registry import PIPELINE
from tests.conftest import TINY, SpecFactory, doc_text, write_jsonl
from tests.tasks.test_pretrain import tiny_project


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


# ---------------------------------------------------------------- the table, every stage

# stage -> (a keyed field and a new value, a runtime field and a new value), as spec overrides.
TABLE = {
    "ingest": ({"corpus": {"filters": {"min_chars": 11}}}, {"executor": {"workers": 3}}),
    "dedup": ({"dedup": {"near": {"ngrams": 4}}}, {"executor": {"kind": "ray"}}),
    "quality": ({"quality": {"filters": [{"name": "c4", "min_num_sentences": 2}]}}, {"executor": {"workers": 2}}),
    "tokenizer": ({"tokenizer": {"vocab_size": 1000}}, {"store": "elsewhere"}),
    "pretrain": ({"pretrain": {"lr": 0.004}}, {"pretrain": {"checkpoint_every": 7}}),
    "qa": ({"qa": {"per_doc": 3}}, {"name": "renamed"}),
    "midtrain": ({"midtrain": {"mix": {"docs": 0.4}}}, {"resources": {"midtrain": {"time_limit": 60}}}),
    "sft": ({"sft": {"context_fraction": 0.5}}, {"sft": {"save_steps": 3}}),
    "dpo": ({"dpo": {"beta": 0.2}}, {"resources": {"dpo": {"time_limit": 60}}}),
    "index": ({"index": {"overlap": 8}}, {"store": "elsewhere"}),
    "reader": ({"reader": {"passages": 4}}, {"reader": {"save_steps": 9}}),
    "eval": ({"eval": {"k": 4}}, {"name": "renamed"}),
}


def _key(stage: str, spec, device: str = "cpu", upstream: dict | None = None) -> str:
    s = PIPELINE.get(stage)
    return digest_key(stage_key(s, spec, upstream or {}, Placement(gpu=device, data=device).device(s)))


def test_the_table_covers_every_stage():
    assert set(TABLE) == set(PIPELINE.names())


@pytest.mark.parametrize("stage", list(TABLE))
def test_keyed_and_runtime_fields(stage, tmp_path):
    base = _tiny(tmp_path, {})
    keyed, runtime = TABLE[stage]
    assert _key(stage, _tiny(tmp_path, keyed)) != _key(stage, base), f"{stage}: a keyed field must change the key"
    assert _key(stage, _tiny(tmp_path, runtime)) == _key(stage, base), f"{stage}: a runtime field must not"


@pytest.mark.parametrize("stage", list(TABLE))
def test_upstream_change(stage, tmp_path):
    spec = _tiny(tmp_path, {})
    needs = PIPELINE.needs(stage)
    if not needs:
        pytest.skip("reads no artifact")
    same = {n: "a" * 20 for n in needs}
    other = {**same, needs[0]: "b" * 20}
    assert _key(stage, spec, upstream=same) == _key(stage, spec, upstream=dict(same))
    assert _key(stage, spec, upstream=other) != _key(stage, spec, upstream=same)


@pytest.mark.parametrize("stage", list(TABLE))
def test_an_edit_to_any_module_a_stage_runs_changes_its_key(stage, tmp_path, monkeypatch):
    spec = _tiny(tmp_path, {})
    before = _key(stage, spec)
    module = PIPELINE.get(stage).module
    modules, _ = code_closure(module, *PIPELINE.get(stage).also_runs)
    # Its own module, a shared module two imports away, and a package's __init__.py.
    shared = next(p for name, p in sorted(modules.items()) if name.startswith("tasks.core.") and name != module)
    for edited in (modules[module], shared, modules["tasks"]):
        real = fingerprint.source_bytes
        monkeypatch.setattr(fingerprint, "source_bytes", lambda p, e=edited, r=real: r(p) + (b"#" if p == e else b""))
        assert _key(stage, spec) != before, f"{stage}: editing {edited} must change its key"
        monkeypatch.undo()


@pytest.mark.parametrize("stage, library", [
    ("ingest", "datatrove"), ("dedup", "spacy"), ("quality", "spacy"), ("tokenizer", "tokenizers"), ("pretrain", "torch"),
    ("qa", "transformers"), ("midtrain", "torch"), ("sft", "trl"), ("dpo", "peft"), ("index", "faiss-cpu"),
    ("reader", "trl"), ("eval", "scipy"),
])
def test_a_library_version_changes_the_key_and_a_neutral_one_does_not(stage, library, tmp_path, monkeypatch):
    spec = _tiny(tmp_path, {})
    before = _key(stage, spec)
    real = importlib.metadata.distribution

    class Bumped:
        def __init__(self, dist):
            self._dist = dist

        version = property(lambda self: self._dist.version + ".post1")
        requires = property(lambda self: self._dist.requires)

    def fake(name, bump):
        dist = real(name)
        return Bumped(dist) if name.replace("_", "-").lower() == bump else dist

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: fake(name, library))
    assert _key(stage, spec) != before, f"{stage}: {library} must be in its key"
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: fake(name, "prefect"))
    assert _key(stage, spec) == before, f"{stage}: prefect only shows progress"


# ---------------------------------------------------------------- eval.gates: in no key

# A gate judges a finished eval (tasks/run_report.py); it changes no artifact, so no key holds it.
GATES = [{"arm": "finetuned", "metric": "f1", "min": 0.3},
         {"arm": "finetuned", "metric": "f1", "max_drop_vs_previous": 0.02},
         {"metric": "retrieval.recall@5", "min": 0.9}]

# change (over tiny.yaml with GATES) -> eval's key changes?
GATE_CHANGES = [
    ({"eval": {"gates": []}}, False),
    ({"eval": {"gates": GATES[:1]}}, False),
    ({"eval": {"gates": [{**GATES[0], "min": 0.9}, *GATES[1:]]}}, False),
    ({"eval": {"gates": [{**GATES[0], "min": None, "max": 0.9}, *GATES[1:]]}}, False),
    ({"eval": {"gates": [*GATES, {"arm": "rag", "metric": "latency_p95_s", "max": 2}]}}, False),
    ({"eval": {"gates": GATES, "k": 4}}, True),  # a keyed field beside them still changes it
]


@pytest.mark.parametrize("change, eval_changes", GATE_CHANGES)
def test_a_gate_change_keeps_the_eval_key(change, eval_changes, tmp_path):
    base = _tiny(tmp_path, {"eval": {"gates": GATES}})
    with fingerprint.fresh():  # one plan's worth of hashing: code and inputs read once
        assert (_key("eval", _tiny(tmp_path, change)) != _key("eval", base)) == eval_changes


def test_gates_are_in_no_stage_key_and_no_build_can_read_them(tmp_path):
    from data_specs.views import UnkeyedFieldError
    from tasks.core.keys import stage_view

    without, gated = _tiny(tmp_path, {}), _tiny(tmp_path, {"eval": {"gates": GATES}})
    with fingerprint.fresh():
        assert {s: _key(s, gated) for s in PIPELINE.names()} == {s: _key(s, without) for s in PIPELINE.names()}
    cfg = stage_view(PIPELINE.get("eval"), gated)[0]
    with pytest.raises(UnkeyedFieldError, match="eval.gates is not in this stage's cache key"):
        cfg.gates


# ---------------------------------------------------------------- the stale-key cases

def test_the_device_is_keyed_where_it_changes_the_output(tmp_path):
    spec = _tiny(tmp_path, {})
    changes = {s: _key(s, spec, "cpu") != _key(s, spec, "cuda") for s in PIPELINE.names()}
    assert changes == {"ingest": False, "dedup": False, "quality": False, "tokenizer": False, "pretrain": True, "qa": False,
                       "midtrain": True, "sft": True, "dpo": True, "index": True, "reader": True, "eval": True}


def test_sft_packing_auto_resolves_per_device(tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.train.finetune.native_bf16", lambda device: device == "cuda")
    sft = PIPELINE.get("sft")
    spec = _tiny(tmp_path, {"sft": {"packing": "auto"}})
    resolved = {d: stage_key(sft, spec, {}, d)["resolved"] for d in ("cpu", "cuda")}
    assert resolved["cpu"]["packing"] is False and resolved["cuda"]["packing"] is True
    assert resolved["cuda"]["precision"] == "bf16" and resolved["cpu"]["precision"] == "fp32"


@pytest.mark.parametrize("native", [True, False])
def test_precision_follows_what_the_hardware_computes_natively(tmp_path, monkeypatch, native):
    """bf16 where this machine's CPU computes it (AVX512-BF16, AMX), fp32 elsewhere; index.precision
    overrides auto; what it resolves to is in every model's and the index's key."""
    for module in ("tasks.train.loop", "tasks.train.finetune", "tasks.index"):
        monkeypatch.setattr(f"{module}.native_bf16", lambda device: native)
    spec = _tiny(tmp_path, {})
    resolved = {s: stage_key(PIPELINE.get(s), spec, {}, "cpu")["resolved"]["precision"]
                for s in ("pretrain", "midtrain", "sft", "reader", "dpo", "index")}
    want = ("bf16-autocast", "bf16") if native else ("fp32", "fp32")
    assert resolved == {"pretrain": want[0], "midtrain": want[0], "sft": want[1], "reader": want[1], "dpo": want[1],
                        "index": want[1]}
    fixed = _tiny(tmp_path, {"index": {"precision": "fp32"}})
    assert stage_key(PIPELINE.get("index"), fixed, {}, "cpu")["resolved"]["precision"] == "fp32"


def test_the_reader_is_keyed_by_the_sft_recipe_it_trains_with(tmp_path):
    """Same recipe as the fine-tuned model: an sft hyperparameter changes the reader too."""
    assert _key("reader", _tiny(tmp_path, {"sft": {"lr": 0.01}})) != _key("reader", _tiny(tmp_path, {}))
    assert _key("reader", _tiny(tmp_path, {"dpo": {"lr": 0.01}})) == _key("reader", _tiny(tmp_path, {}))


def test_qa_split_settings_key_the_models_only_when_they_leave_held_out_documents_out(tmp_path):
    """qa.holdout_from_training off (the default): qa's seed and eval_fraction rebuild no model.
    On: they change which documents pretrain and midtrain read, so they are in both keys."""
    doc = {"qa": {"split_by": "document"}}
    off = {s: _key(s, _tiny(tmp_path, doc)) for s in ("pretrain", "midtrain")}
    for s in off:
        assert _key(s, _tiny(tmp_path, {"qa": {"split_by": "document", "seed": 3}})) == off[s]
    on = {"qa": {"split_by": "document", "holdout_from_training": True}}
    for s in off:
        assert _key(s, _tiny(tmp_path, on)) != off[s]
        assert _key(s, _tiny(tmp_path, {"qa": {**on["qa"], "seed": 3}})) != _key(s, _tiny(tmp_path, on))
        assert _key(s, _tiny(tmp_path, {"qa": {**on["qa"], "eval_fraction": 0.3}})) != _key(s, _tiny(tmp_path, on))
    assert _key("tokenizer", _tiny(tmp_path, on)) == _key("tokenizer", _tiny(tmp_path, doc))


def test_a_model_folder_as_rag_generator_is_keyed_by_content(tmp_path):
    folder = tmp_path / "spec" / "gen"
    _tiny(tmp_path, {})  # writes the spec folder
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = _key("eval", _tiny(tmp_path, {"eval": {"rag_generator": "gen"}}))
    (folder / "config.json").write_text('{"changed": 1}')
    assert _key("eval", _tiny(tmp_path, {"eval": {"rag_generator": "gen"}})) != first
    assert _key("eval", _tiny(tmp_path, {"eval": {"rag_generator": "reader"}})) != first


def test_the_torchrun_worker_is_in_the_training_stages_digest():
    for stage in ("pretrain", "midtrain"):
        assert "tasks/train/worker.py" in code_digest(PIPELINE.get(stage).module)


def test_libraries_come_from_what_the_code_imports():
    _, imported = code_closure("tasks.evaluate")
    libs = lib_versions(imported)
    for dist in ("numpy", "scipy", "torch", "transformers", "tokenizers", "sentence-transformers", "faiss-cpu"):
        assert dist in libs, dist
    assert "prefect" not in lib_versions({"prefect"})
    assert lib_versions({"not_a_module_anywhere"}) == {"not_a_module_anywhere": "absent"}


def test_imports_inside_functions_still_enter_the_key():
    """Slow libraries are imported where they are used, so planning a run does not import them
    (tests/tasks/test_registry.py); the code walk must still see them, or upgrading one would
    reuse a stale artifact."""
    source = ("import json\nif TYPE_CHECKING:\n    from faiss import Index\n"
              "def chart():\n    import matplotlib.pyplot as plt\n    from scipy.stats import norm\n")
    names = fingerprint._imported_names(ast.parse(source), "eval.example", is_package=False)
    assert {"json", "faiss", "matplotlib.pyplot", "scipy.stats"} <= names
    assert "scipy" in code_closure("eval.stats")[1]  # imported in two functions only
    modules, libs = code_closure("tasks.ingest")  # its filter and datatrove's writer: in `build`
    assert "tasks.data.ingest_filter" in modules and "datatrove" in libs


@pytest.mark.parametrize("stage, field", [
    ("pretrain", {"pretrain": {"micro_batch": 6}}), ("pretrain", {"resources": {"pretrain": {"gpus": 2}}}),
    ("midtrain", {"midtrain": {"micro_batch": 4}}), ("eval", {"eval": {"batch_size": 4}}),
])
def test_what_changes_the_effective_batch_or_the_batching_is_keyed(stage, field, tmp_path):
    assert _key(stage, _tiny(tmp_path, field)) != _key(stage, _tiny(tmp_path, {}))


def test_an_edit_that_keeps_size_and_time_is_seen_by_the_next_plan(project):
    before = fingerprints(project)
    data = project.root / "data" / "docs.jsonl"
    st = data.stat()
    text = data.read_text()
    data.write_text(text.replace("ka", "lo", 1) if "ka" in text else text.replace("lo", "ka", 1))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime, same inode
    assert data.stat().st_size == st.st_size and data.stat().st_ino == st.st_ino
    assert fingerprints(project)["ingest"] != before["ingest"]


def test_a_module_given_a_new_import_is_walked_by_the_next_plan(tmp_path, monkeypatch):
    """A module's imports are parsed once per state of its file, across plans: an edit is seen."""
    (tmp_path / "tasks").mkdir()
    for name in ("__init__", "b", "c"):
        (tmp_path / "tasks" / f"{name}.py").write_text("")
    a = tmp_path / "tasks" / "a.py"
    a.write_text("from tasks import b\n")
    monkeypatch.setattr(fingerprint, "_repository_root", lambda: tmp_path)
    with fingerprint.fresh():
        assert set(code_closure("tasks.a")[0]) == {"tasks", "tasks.a", "tasks.b"}
    a.write_text("from tasks import b\nimport tasks.c\n")
    with fingerprint.fresh():
        assert set(code_closure("tasks.a")[0]) == {"tasks", "tasks.a", "tasks.b", "tasks.c"}


def _dist_info(site: Path, version: str, requires: str = "") -> Path:
    folder = site / f"fake_gristmill_lib-{version}.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-gristmill-lib\nVersion: {version}\n{requires}")
    (folder / "top_level.txt").write_text("fake_gristmill_lib\n")
    return folder


def test_an_upgrade_or_a_rewritten_metadata_file_is_seen_by_the_next_plan(tmp_path, monkeypatch):
    """A distribution's metadata is read once per state of its METADATA file, across plans."""
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    old = _dist_info(site, "1.0", "Requires-Dist: numpy\n")
    with fingerprint.fresh():
        first = fingerprint.requirement_closure(["fake-gristmill-lib"])
        assert first["fake-gristmill-lib"] == "1.0" and "numpy" in first
    with fingerprint.fresh():  # nothing changed: the same answer
        assert fingerprint.requirement_closure(["fake-gristmill-lib"]) == first
    (old / "METADATA").write_text((old / "METADATA").read_text().replace("Requires-Dist: numpy\n", ""))
    with fingerprint.fresh():  # the file rewritten in place: read again
        assert fingerprint.requirement_closure(["fake-gristmill-lib"]) == {"fake-gristmill-lib": "1.0"}
    shutil.rmtree(old)
    _dist_info(site, "2.0")  # what pip does on an upgrade: another dist-info folder
    with fingerprint.fresh():
        assert fingerprint.requirement_closure(["fake-gristmill-lib"]) == {"fake-gristmill-lib": "2.0"}


def test_installed_metadata_is_read_as_importlib_reads_it():
    """The fast readers (headers only, RECORD as text) give importlib's answers, so no key changes."""
    assert fingerprint._distributions() == importlib.metadata.packages_distributions()
    with fingerprint.fresh():
        for name in {fingerprint.canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}:
            dist = importlib.metadata.distribution(name)
            slow = (dist.version, fingerprint._runtime_requirements(dist.requires))
            assert fingerprint._distribution(name) == slow, name


def _tiny(tmp_path: Path, overrides: dict):
    """tiny.yaml with `overrides` laid over it, loaded from a copy beside its corpus."""
    folder = tmp_path / "spec"
    if not folder.exists():
        shutil.copytree(TINY.parent / "tiny", folder / "tiny")
        shutil.copy(TINY, folder / "tiny.yaml")
    return load_spec(folder / "tiny.yaml", override=overrides)


# ---------------------------------------------------------------- code tracking and reasons

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
    files = code_digest("tasks.dedup")
    for expected in ("tasks/dedup.py", "tasks/data/engine.py", "tasks/core/stage.py", "tasks/core/store.py"):
        assert expected in files
    assert not any(f.startswith("data_specs/") for f in files)  # the spec enters through its values
    assert "tasks/ingest.py" not in files  # dedup does not import ingest
    assert "tasks/registry.py" not in files  # nor the graph (an edit to another stage's wiring)
    assert "tasks/data/readers.py" in code_digest("tasks.ingest")


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


def test_explain_change_names_code_library_and_resolved_changes():
    old = {"upstream": {}, "spec": {"a": 1}, "inputs": {}, "code": {"tasks/x.py": "1"}, "libs": {"datatrove": "0.10"},
           "resolved": {"device": "cpu"}}
    new = {**old, "code": {"tasks/x.py": "2"}, "libs": {"datatrove": "0.11"}, "resolved": {"device": "cuda"}}
    reason = explain_change(old, new)
    assert "code changed: tasks/x.py" in reason
    assert "library version changed: datatrove" in reason
    assert "resolved device changed" in reason
    assert explain_change(None, new) == "never built"


def test_a_quality_threshold_rebuilds_quality_and_every_consumer_and_plan_names_it(tmp_path):
    """The consumers read the quality stage's documents: a threshold change gives quality and every
    stage reading the corpus a new key; `plan` names the field, then the upstream; ingest and dedup
    stay cached. Skipping the stage (`quality: null`) moves the consumers onto dedup, and plan says so."""
    factory = tiny_project(tmp_path, quality={})
    spec = factory.load(**factory.sections)
    rows = {r.name: r for r in plan(spec, factory.store)}
    for name in ("ingest", "dedup", "quality", "tokenizer"):
        execute(rows[name], spec, factory.store)
    filters = [{"name": "gopher_repetition"}, {"name": "gopher_quality", "min_doc_words": 25}, {"name": "c4"}]
    changed = {r.name: r for r in plan(factory.load(**{**factory.sections, "quality": {"filters": filters}}),
                                       factory.store)}
    assert changed["ingest"].cached and changed["dedup"].cached
    assert changed["quality"].reason == "spec field quality.filters.1.min_doc_words changed"
    assert changed["tokenizer"].reason == "upstream quality changed"
    assert {n for n in rows if rows[n].fingerprint != changed[n].fingerprint} == set(rows) - {"ingest", "dedup"}
    skipped = {r.name: r for r in plan(factory.load(**{**factory.sections, "quality": None}), factory.store)}
    assert "quality" not in skipped and skipped["tokenizer"].reason == "reads dedup instead of quality"


def test_force_marks_the_stage_and_its_dependents(project):
    spec = project.load()
    for row in plan(spec, project.store)[:2]:
        execute(row, spec, project.store)
    rows = {r.name: r for r in plan(spec, project.store, force=["ingest"])}
    assert rows["ingest"].reason == "forced" and not rows["ingest"].cached
    assert rows["dedup"].reason.startswith("forced upstream")
    rows = {r.name: r for r in plan(spec, project.store, force=["dedup"])}
    assert rows["ingest"].cached and not rows["dedup"].cached


def test_a_spurious_ast_recursion_error_is_retried_and_a_real_one_is_not(tmp_path, monkeypatch):
    """CPython 3.11's AST constructor can fail spuriously when threads parse at once (gh-106905):
    the fingerprint's parse retries that error, and only that one."""
    path = tmp_path / "m.py"
    path.write_text("import os\n")
    real, calls = ast.parse, []

    def flaky(source, filename="<unknown>"):
        calls.append(filename)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=60, after=78)")
        return real(source, filename=filename)

    monkeypatch.setattr(fingerprint.ast, "parse", flaky)
    assert isinstance(fingerprint.parse_source(path), ast.Module) and len(calls) == 2

    def broken(source, filename="<unknown>"):
        raise SystemError("something else")

    monkeypatch.setattr(fingerprint.ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        fingerprint.parse_source(path)
