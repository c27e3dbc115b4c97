"""The spec loader: valid specs load, bad ones are InputErrors naming the file and field."""

import contextlib
import io

import pytest

from data_specs.errors import InputError
from data_specs.loader import load_spec
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["tiny.yaml", "python_docs.yaml"])
def test_shipped_specs_load(name):
    spec = load_spec(REPO / "data_specs" / name)
    assert spec.corpus.sources
    assert spec.spec_path == (REPO / "data_specs" / name).resolve()


def test_defaults_fill_every_section_but_corpus(project):
    spec = project.load()
    assert spec.corpus.filters.min_chars == 50
    assert spec.dedup.exact is True and spec.dedup.near.threshold == 0.8
    assert spec.executor.kind == "local"


def test_relative_paths_are_relative_to_the_spec_file(project):
    spec = project.load()
    assert spec.resolve("data/x.jsonl") == project.root / "data" / "x.jsonl"


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"dedup": {"exact": True, "nearr": {}}}, "dedup.nearr"),
        ({"dedup": {"near": {"threshold": "high"}}}, "dedup.near.threshold"),
        ({"dedup": {"near": {"threshold": 1.5}}}, "dedup.near.threshold"),
        ({"corpus": {"sources": [{"kind": "csv", "path": "x"}]}}, "corpus.sources.0"),
        ({"corpus": {"sources": [{"kind": "jsonl"}]}}, "corpus.sources.0.jsonl.path"),
        ({"corpus": {"sources": []}}, "corpus.sources"),
        ({"corpus": {"sources": [{"kind": "python_docs"}], "filters": {"min_chars": 10, "max_chars": 5}}},
         "corpus.filters"),
        ({"executor": {"tasks": 0}}, "executor.tasks"),
        ({"executor": {"kind": "k8s"}}, "executor.kind"),
        ({"name": "has space"}, "name"),
    ],
)
def test_invalid_specs_name_file_and_field(project, sections, field):
    path = project.write(**sections)
    with pytest.raises(InputError) as e:
        load_spec(path)
    assert str(path) in str(e.value)
    assert field in str(e.value)


def test_slurm_is_refused_saying_why_and_what_to_use_instead(project):
    path = project.write(executor={"kind": "slurm", "tasks": 4})
    with pytest.raises(InputError) as e:
        load_spec(path)
    # Pydantic alone says "Input should be 'local' or 'ray'": true, and no help to a Slurm user.
    assert str(e.value) == (f"{path}: invalid spec\n  executor.kind: Value error, slurm is not supported: "
                            "datatrove's Slurm executor submits sbatch jobs and returns before they finish, and a "
                            "stage must wait for its output, which needs a job watcher gristmill does not have. Use "
                            "'ray' on a cluster (`ray start` on the nodes, RAY_ADDRESS pointing at the head) or 'local'")


@pytest.mark.slow  # imports the CLI, and with it Prefect: ~5 s alone, more on busy cores
def test_slurm_is_exit_2_through_the_cli_naming_the_field(project):
    from flows.cli import main

    path = project.write(executor={"kind": "slurm"})
    err = io.StringIO()  # never closed: gristmill's log handler may keep the first stream it sees
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["plan", str(path), "--store", str(project.root / "store")])
    assert code == 2, err.getvalue()
    assert f"{path}: invalid spec\n  executor.kind: Value error, slurm is not supported" in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_missing_corpus_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\n")
    with pytest.raises(InputError, match="corpus"):
        load_spec(path)


@pytest.mark.parametrize("content, message", [
    (b"name: [unclosed", "invalid YAML"),
    (b"- a\n- b\n", "YAML mapping"),
    (b"name: \xff\xfe", "not UTF-8"),
])
def test_unparseable_files(tmp_path, content, message):
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_cache_view_leaves_out_unkeyed_fields(project):
    a = project.load(executor={"kind": "local", "workers": 1}, store="elsewhere")
    b = project.load(executor={"kind": "ray", "workers": 8})
    assert a.cache_view() == b.cache_view()
    assert "store" not in a.cache_view()
    assert "path" not in a.corpus.sources[0].cache_view()
    c = project.load(executor={"tasks": 3})
    assert c.cache_view() != a.cache_view()


# ---------------------------------------------------------------- eval.gates

ISSUE_EXAMPLE = [{"arm": "finetuned", "metric": "f1", "min": 0.30},
                 {"arm": "finetuned", "metric": "f1", "max_drop_vs_previous": 0.02},
                 {"metric": "retrieval.recall@5", "min": 0.9}]


def test_gates_load_as_written(project):
    spec = project.load(eval={"gates": ISSUE_EXAMPLE})
    assert [(g.arm, g.metric, g.min, g.max, g.max_drop_vs_previous) for g in spec.eval.gates] == [
        ("finetuned", "f1", 0.3, None, None), ("finetuned", "f1", None, None, 0.02),
        (None, "retrieval.recall@5", 0.9, None, None)]
    assert spec.eval.gates[2].figure() == ("retrieval", "strict", "recall@5")
    assert project.load().eval.gates == ()


F1 = {"arm": "finetuned", "metric": "f1"}


@pytest.mark.parametrize("section, message", [
    ({"gates": [F1]}, "eval.gates.0: Value error, a gate has exactly one of min, max, max_drop_vs_previous "
                      "(this one: none)"),
    ({"gates": [{**F1, "min": 0.3, "max": 0.9}]}, "eval.gates.0: Value error, a gate has exactly one of min, max, "
                                                  "max_drop_vs_previous (this one: min, max)"),
    ({"gates": [{**F1, "minimum": 0.3}]}, "eval.gates.0.minimum: Extra inputs are not permitted"),
    ({"gates": [{**F1, "min": float("nan")}]}, "eval.gates.0.min: Input should be a finite number"),
    ({"gates": [{**F1, "max_drop_vs_previous": -0.1}]}, "eval.gates.0.max_drop_vs_previous: Input should be "
                                                        "greater than or equal to 0"),
    ({"gates": [{"arm": "finetuned", "metric": "f2", "min": 0}]}, "eval.gates.0.metric: Value error, 'f2' is not a "
                                                                  "figure of an arm (one of: n, not_applicable, em, f1"),
    ({"gates": [{"arm": "finetuned", "metric": "retrieval.recall@5", "min": 0}]},
     "eval.gates.0.metric: Value error, 'retrieval.recall@5' is not a figure of an arm"),
    ({"gates": [{"metric": "f1", "min": 0}]}, "eval.gates.0.metric: Value error, 'f1' is not a retrieval figure "
                                              "(retrieval.recall@N or retrieval_lenient.recall@N); name its arm"),
    ({"gates": [{"metric": "retrieval.recall5", "min": 0}]}, "eval.gates.0.metric: Value error, 'retrieval.recall5'"),
    ({"gates": [{"arm": "finetuned_rag", "metric": "f1", "min": 0}]}, "eval.gates.0.arm: Input should be 'finetuned'"),
    ({"arms": ["finetuned", "rag"], "gates": [{"arm": "gold", "metric": "f1", "min": 0}]},
     "eval.gates: Value error, gates.0.arm: 'gold' is not evaluated (eval.arms: finetuned, rag)"),
    ({"k": 3, "gates": [ISSUE_EXAMPLE[0], {"metric": "retrieval.recall@4", "min": 0}]},
     "eval.gates: Value error, gates.1.metric: eval measures recall at 1, 5, 3 (eval.k) and seen, not at 4"),
])
def test_invalid_gates_name_file_field_and_reason(project, section, message):
    path = project.write(eval=section)
    with pytest.raises(InputError) as e:
        load_spec(path)
    assert str(path) in str(e.value)
    assert message in str(e.value)


# ---------------------------------------------------------------- pretrain.from: a path or a run reference

def test_pretrain_from_takes_a_path_or_a_run_reference(project):
    from data_specs.schema import RunRef

    assert project.load(pretrain={"from": "ckpt"}).pretrain.from_ == "ckpt"
    ref = project.load(pretrain={"from": {"run": "nightly"}}).pretrain.from_
    assert ref == RunRef(run="nightly", stage="pretrain", fallback="error")
    full = project.load(pretrain={"from": {"run": "a.b-c_1", "stage": "midtrain", "fallback": "scratch"}})
    assert full.pretrain.from_ == RunRef(run="a.b-c_1", stage="midtrain", fallback="scratch")
    assert project.load().pretrain.from_ is None


@pytest.mark.parametrize("value, words", [
    ({"run": "nightly", "stage": "sft"}, ["stage", "'pretrain' or 'midtrain'"]),
    ({"stage": "pretrain"}, ["run: NAME", "run", "Field required"]),
    ({"run": "a/b"}, ["run", "should match pattern"]),
    ({"run": "nightly", "fallback": "retry"}, ["fallback", "'scratch' or 'error'"]),
    ({"run": "nightly", "runs": 2}, ["runs", "Extra inputs are not permitted"]),
    (7, ["a checkpoint folder (a path) or a run reference"]),
])
def test_bad_run_references_name_the_field(project, value, words):
    path = project.write(pretrain={"from": value})
    with pytest.raises(InputError) as e:
        load_spec(path)
    message = str(e.value)
    assert str(path) in message and "pretrain.from" in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("sections, field", [
    ({"tokenizer": {"from": "tok"}}, "tokenizer.from"),
    ({"eval": {"rag_generator": "base"}}, "eval.rag_generator"),
])
def test_a_run_reference_refuses_the_fields_it_contradicts(project, sections, field):
    path = project.write(pretrain={"from": {"run": "nightly"}}, **sections)
    with pytest.raises(InputError, match=field):
        load_spec(path)
    project.load(pretrain={"from": "ckpt"}, **sections)  # a checkpoint folder goes with either
