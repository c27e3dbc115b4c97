"""A warm start, built: run `b` (pretrain.from: {run: a}) starts from run `a`'s pretrained model and
keeps its tokenizer, on tiny.yaml's documents plus five new ones, with a two-step budget; a nightly
naming its own run continues from its previous night and plans cached after its run. Resolution
cases without training are tests/tasks/core/test_references.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.core.graph import Wire
from tasks.core.runner import execute, plan
from tasks.registry import PIPELINE
from tests.conftest import SpecFactory, doc_text, write_jsonl
from tests.tasks.core import toy_stage
from tests.tasks.test_pretrain import FAST_PRETRAIN, run_until, tiny_project

A = {**FAST_PRETRAIN, "tokens": 40_000, "eval_every": 20}  # 20 steps: far below a new model's loss
# Two optimizer steps at a small learning rate: the weights stay close to where they started.
WARM = {**A, "tokens": 4096, "lr": 1e-4, "from": {"run": "a"}}
BUILT = ("ingest", "dedup", "tokenizer", "pretrain")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(project, run a's results, run b's results), through pretrain."""
    factory = tiny_project(tmp_path_factory.mktemp("warm"), dedup={"near": None})  # MinHash is not under test
    a = run_until(factory, "pretrain", name="a", pretrain=A)
    write_jsonl(factory.root / "data" / "more.jsonl",
                [{"id": f"new{i}", "text": doc_text(100 + i, 80)} for i in range(5)])
    b = run_until(factory, "pretrain", name="b", pretrain=WARM)
    return factory, a, b


def weights(result) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(result["pretrain"].path) / "model" / "model.safetensors")


def test_b_starts_from_a_s_weights(runs):
    _, a, b = runs
    ma, mb = a["pretrain"].record.metrics, b["pretrain"].record.metrics
    # A new model starts near ln(vocab); b starts where a ended (the five new documents are all
    # training documents, so the validation blocks are a's).
    assert mb["val_loss_initial"] < ma["val_loss_initial"] - 0.5, (ma["val_loss_initial"], mb["val_loss_initial"])
    assert mb["val_loss_initial"] == pytest.approx(ma["val_loss_final"], abs=0.02)
    assert mb["started_from"] == f"pretrain artifact {a['pretrain'].fingerprint} of run a"
    assert b["pretrain"].record.key["resolved"]["pretrain.from"] == {"stage": "pretrain",
                                                                    "fingerprint": a["pretrain"].fingerprint}
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        moved = float((wb[name] - wa[name]).norm() / wa[name].norm())
        assert moved < 0.05, f"{name} moved {moved:.3f} of its norm: not a's weights continued"


def test_b_keeps_a_s_tokenizer(runs):
    from transformers import AutoTokenizer

    _, a, b = runs
    folder_a, folder_b = (Path(r["tokenizer"].path) / "tokenizer" for r in (a, b))
    assert json.loads((folder_b / "tokenizer.json").read_text()) == json.loads((folder_a / "tokenizer.json").read_text())
    assert AutoTokenizer.from_pretrained(folder_b).get_vocab() == AutoTokenizer.from_pretrained(folder_a).get_vocab()
    m = b["tokenizer"].record.metrics
    assert m["trained"] is False and m["copied_from"] == f"pretrain artifact {a['pretrain'].fingerprint} of run a"
    assert b["tokenizer"].record.key["upstream"] == {}  # keyed by a's model, not by the corpus


def test_b_plans_cached_after_its_run_and_its_lineage_holds_a(runs):
    factory, a, b = runs
    spec = factory.load(**{**factory.sections, "name": "b", "pretrain": WARM})
    graph = PIPELINE.inserted("pretrain", Wire(toy_stage.LINEAGE, model="pretrain"))
    planned = {r.name: r for r in plan(spec, factory.store, graph=graph)}
    assert [n for n in BUILT if not planned[n].cached] == []
    seen = execute(planned["lineage"], spec, factory.store, graph=graph).record.metrics["lineage"]
    assert seen["pretrain.from"] == f"pretrain/{a['pretrain'].fingerprint} of a"
    assert seen["pretrain"] == f"pretrain/{b['pretrain'].fingerprint} of b"


def test_a_nightly_continues_its_own_previous_run_and_then_plans_cached(runs, tmp_path):
    factory, a, _ = runs
    shutil.copytree(factory.root, tmp_path / "p")  # its own store: b's tests keep theirs
    nightly = SpecFactory(tmp_path / "p")
    # Run "a" names itself; its lr differs from b's, which would otherwise be this very artifact, cached.
    nightly.sections = {**factory.sections, "name": "a", "pretrain": {**WARM, "lr": 2e-4}}
    first = run_until(nightly, "pretrain")
    assert first["pretrain"].state == "built"
    assert first["pretrain"].record.key["resolved"]["pretrain.from"]["fingerprint"] == a["pretrain"].fingerprint
    again = {r.name: r for r in plan(nightly.load(**nightly.sections), nightly.store)}
    assert [n for n in BUILT if not again[n].cached] == []
    assert again["pretrain"].fingerprint == first["pretrain"].fingerprint
