"""The graph in one place: checked when built, a stage inserted with one module and one line,
builds that see exactly their keys, and imports that run one way."""

import ast
import itertools
import re
from pathlib import Path

import pytest

from data_specs.errors import InputError, StageError
from tasks import dedup, ingest, pretrain, quality, tokenizer
from tasks.core.artifacts import Documents, Model
from tasks.core.graph import Graph, GraphError, Wire, critical_path
from tasks.core.runner import execute, plan
from tasks.core.store import ArtifactStore
from tasks.registry import PIPELINE
from tests.conftest import REPO
from tests.tasks.core import toy_stage
from tests.tasks.core.test_fingerprint import _tiny


def test_the_pipeline_reads_as_wired():
    assert PIPELINE.names() == ["ingest", "dedup", "quality", "tokenizer", "pretrain", "qa", "midtrain", "sft", "dpo",
                                "index", "reader", "eval"]
    assert PIPELINE.upstream("reader") == {"model": "midtrain", "pairs": "qa", "index": "index"}
    assert PIPELINE.upstream("sft")["model"] == PIPELINE.upstream("reader")["model"]  # the controlled design
    assert PIPELINE.upstream("sft") == {"model": "midtrain", "pairs": "qa", "documents": "quality"}
    assert PIPELINE.needs("qa") == ["quality"]  # qa needs only the corpus
    assert PIPELINE.ancestors("eval") == set(PIPELINE.names()) - {"eval"}
    assert PIPELINE.gpu_stages() == ["pretrain", "midtrain", "sft", "dpo", "reader", "eval"]


@pytest.mark.parametrize("wires, message", [
    ((Wire(ingest.STAGE), Wire(tokenizer.STAGE, documents="dedup"), Wire(dedup.STAGE, documents="ingest")),
     "reads documents from 'dedup', which no stage above it provides"),
    ((Wire(ingest.STAGE), Wire(ingest.STAGE)), "wired twice"),
    ((Wire(ingest.STAGE), Wire(dedup.STAGE)), "misses documents"),
    ((Wire(ingest.STAGE), Wire(dedup.STAGE, documents="ingest", extra="ingest")), "names unknown extra"),
    ((Wire(ingest.STAGE), Wire(dedup.STAGE, documents="ingest", provides="corpus"),
      Wire(tokenizer.STAGE, documents="corpus"), Wire(pretrain.STAGE, documents="corpus", tokenizer="corpus")),
     r"reads tokenizer \(Tokenizer\) from 'corpus', which makes Documents"),
])
def test_a_wrong_graph_is_refused_when_built(wires, message):
    with pytest.raises(GraphError, match=message):
        Graph(*wires)


def test_a_stage_inserted_after_quality_feeds_every_consumer(tmp_path):
    """One new module (tests/tasks/core/toy_stage.py) and one line: the consumers of "corpus"
    read the toy stage's documents, and every stage downstream gets a new fingerprint."""
    graph = PIPELINE.inserted("quality", Wire(toy_stage.STAGE, documents="corpus", provides="corpus"))
    assert graph.upstream("tokenizer") == {"documents": "toy"} and graph.upstream("qa") == {"documents": "toy"}
    spec = _tiny(tmp_path, {})
    store = tmp_path / "store"
    st = ArtifactStore(store)
    before = {r.name: r.fingerprint for r in plan(spec, st)}
    rows = {r.name: r for r in plan(spec, st, graph=graph)}
    assert {n for n in before if before[n] != rows[n].fingerprint} == set(before) - {"ingest", "dedup", "quality"}
    results = {}
    for name in ("ingest", "dedup", "quality", "toy", "tokenizer", "qa", "index"):
        results[name] = execute(rows[name], spec, st, graph=graph)
    kept = results["quality"].record.metrics["documents_out"]
    assert results["toy"].record.metrics["documents_out"] == kept - 1
    for consumer in ("tokenizer", "qa", "index"):
        assert results[consumer].record.metrics["documents"] == kept - 1, consumer
    assert rows["tokenizer"].key["upstream"] == {"toy": rows["toy"].fingerprint}


def test_quality_null_skips_the_stage_and_its_consumers_read_dedup(tmp_path):
    """An optional stage whose section is null is left out of the spec's graph: "corpus" is
    dedup's again, the consumers' keys name dedup, and asking for the stage says why it is not there."""
    on, off = _tiny(tmp_path, {}), _tiny(tmp_path, {"quality": None})
    assert PIPELINE.for_spec(on) is PIPELINE
    graph = PIPELINE.for_spec(off)
    assert "quality" not in graph.names() and graph.upstream("tokenizer") == {"documents": "dedup"}
    st = ArtifactStore(tmp_path / "store")
    rows_on, rows_off = ({r.name: r for r in plan(spec, st)} for spec in (on, off))
    assert list(rows_off) == [n for n in rows_on if n != "quality"]
    for consumer in ("tokenizer", "qa", "index", "pretrain", "midtrain", "sft"):
        assert set(rows_off[consumer].key["upstream"]) <= set(PIPELINE.names()) - {"quality"}, consumer
        assert rows_off[consumer].fingerprint != rows_on[consumer].fingerprint, consumer
    assert rows_off["tokenizer"].key["upstream"] == {"dedup": rows_off["dedup"].fingerprint}
    assert (rows_off["ingest"].fingerprint, rows_off["dedup"].fingerprint) == \
        (rows_on["ingest"].fingerprint, rows_on["dedup"].fingerprint)
    with pytest.raises(InputError, match=r"stage 'quality' is skipped: the spec sets `quality: null`"):
        graph.get("quality")


@pytest.mark.parametrize("wires, message", [
    ((Wire(ingest.STAGE), Wire(dedup.STAGE, documents="ingest", provides="corpus"),
      Wire(quality.STAGE, documents="corpus")), "must rebind a name a stage above it provides"),
    ((Wire(ingest.STAGE), Wire(dedup.STAGE, documents="ingest", provides="corpus"),
      Wire(quality.STAGE, documents="corpus", provides="corpus"), Wire(tokenizer.STAGE, documents="quality")),
     "skipping optional stage 'quality' breaks the graph: stage 'tokenizer' reads documents from 'quality'"),
])
def test_an_optional_stage_must_be_skippable(wires, message):
    with pytest.raises(GraphError, match=message):
        Graph(*wires)


def test_a_build_that_reads_a_field_outside_its_key_fails(tmp_path):
    graph = Graph(Wire(ingest.STAGE), Wire(toy_stage.UNKEYED, documents="ingest"))
    spec = _tiny(tmp_path, {})
    st = ArtifactStore(tmp_path / "store")
    rows = plan(spec, st, graph=graph)
    execute(rows[0], spec, st, graph=graph)
    with pytest.raises(StageError, match=r"pretrain.checkpoint_every is not in this stage's cache key"):
        execute(rows[1], spec, st, graph=graph)


def test_every_model_artifact_keeps_its_model_in_one_place():
    for stage in PIPELINE:
        if stage.output is Model:
            assert stage.output.FOLDER == "model"
    assert issubclass(toy_stage.STAGE.output, Documents)


# ---------------------------------------------------------------- imports run one way

def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package, forbidden", [("eval", ("tasks", "flows")), ("data_specs", ("tasks", "flows", "eval")),
                                                ("tasks", ("flows",))])
def test_imports_run_one_way(package, forbidden):
    for path in sorted((REPO / package).rglob("*.py")):
        bad = {n for n in _imports(path) if n.split(".")[0] in forbidden}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_no_copied_jsonl_readers_writers_or_chunkers():
    """One JSONL reader and writer (tasks/core/jsonl.py), one paragraph chunker (qagen/common.py)."""
    loops = re.compile(r"json\.loads\(line\) for line in|f\.write\(json\.dumps\(")
    chunkers = re.compile(r"split\(\"\\n\\n\"\)")
    for path in sorted((REPO / "tasks").rglob("*.py")) + sorted((REPO / "eval").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(REPO).as_posix()
        # artifacts.py reads gzipped documents; python_docs.py's child sees only the stdlib.
        if rel not in ("tasks/core/jsonl.py", "tasks/core/artifacts.py", "tasks/data/python_docs.py"):
            assert not loops.search(text), f"{rel} has its own JSONL loop"
        assert not chunkers.search(text), f"{rel} has its own paragraph chunker"


# ---------------------------------------------------------------- critical path

def test_the_critical_path_is_the_heaviest_chain_not_the_longest():
    """A diamond: a -> (b, c) -> d. The path goes through the slower branch, whatever the number of
    stages on the other; a need outside `seconds` (cached) takes no time."""
    needs = {"a": [], "b": ["a"], "c": ["a"], "c2": ["c"], "d": ["b", "c2", "cached"]}
    assert critical_path({"a": 1, "b": 10, "c": 2, "c2": 3, "d": 4}, needs) == (["a", "b", "d"], 15.0)
    assert critical_path({"a": 1, "b": 4, "c": 2, "c2": 3, "d": 4}, needs) == (["a", "c", "c2", "d"], 10.0)
    assert critical_path({"b": 5, "d": 1}, needs) == (["b", "d"], 6.0)
    assert critical_path({}, needs) == ([], 0.0)


def test_the_pipelines_critical_path_follows_its_edges():
    """With index slow, the path runs through index (which reads the corpus, not the models); with
    pretrain slow, through pretrain. Each stage on it reads the one before it."""
    seconds = {name: 1.0 for name in PIPELINE.names()}  # in pipeline order: topological
    needs = {name: PIPELINE.needs(name) for name in PIPELINE.names()}
    path, total = critical_path({**seconds, "index": 100.0}, needs)
    assert path == ["ingest", "dedup", "quality", "index", "reader", "eval"] and total == 105.0
    path, total = critical_path({**seconds, "pretrain": 100.0}, needs)
    assert path == ["ingest", "dedup", "quality", "tokenizer", "pretrain", "midtrain", "sft", "dpo", "eval"]
    assert total == 108.0
    for earlier, later in itertools.pairwise(path):
        assert earlier in PIPELINE.needs(later)


def test_the_plan_times_its_critical_path_by_the_last_builds_in_the_store():
    """Stages to build are timed by their newest build of the same run name (else of any run);
    cached stages take no time; a stage never built is named."""
    from types import SimpleNamespace

    from tasks.core.runner import PlannedStage, estimate_critical_path

    history = {"a": [SimpleNamespace(run_name="other", wall_s=50.0), SimpleNamespace(run_name="me", wall_s=7.0),
                     SimpleNamespace(run_name="other", wall_s=60.0)],
               "b": [SimpleNamespace(run_name="other", wall_s=30.0)], "c": [SimpleNamespace(run_name="me", wall_s=99.0)]}
    store = SimpleNamespace(history=lambda stage: history.get(stage, []))

    def row(name, needs, cached=False):
        return PlannedStage(name, "fp", {"upstream": {n: "fp" for n in needs}}, cached, "", "path")

    rows = [row("a", []), row("b", ["a"]), row("c", ["a"], cached=True), row("d", ["b", "c"])]
    found = estimate_critical_path(rows, store, "me")
    assert (found.stages, found.seconds, found.total_s, found.unknown) == (["a", "b", "d"], 37.0, 37.0, ["d"])
    assert found.describe() == ("critical path: a -> b -> d, ~37 s of ~37 s of stages to build (their last builds' "
                                "wall times in this store); not timed (no earlier run here): d")
    assert estimate_critical_path([row("a", [], cached=True)], store, "me").describe() == \
        "critical path: nothing to build"
    assert estimate_critical_path([row("d", []), row("e", ["d"])], store, "me").describe() == \
        "critical path: not timed (no earlier run of these stages in this store)"
