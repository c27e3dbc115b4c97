"""midtrain: the pretrained model keeps learning on the docs + Q&A mixture the spec asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_specs.errors import InputError
from tests.tasks.test_pretrain import run_until, tiny_project

MID = {"tokens": 20_000, "batch_tokens": 2048, "micro_batch": 16, "eval_every": 5, "checkpoint_every": 5}
QA = {"per_doc": 6, "paraphrases": 1}


@pytest.fixture(scope="module")
def midtrained(tmp_path_factory):
    factory = tiny_project(tmp_path_factory.mktemp("mid"), qa=QA, midtrain=MID)
    return factory, run_until(factory, "midtrain")


def test_midtrain_learns_and_starts_from_the_pretrained_model(midtrained):
    _, results = midtrained
    m = results["midtrain"].record.metrics
    assert m["val_loss_final"] < m["val_loss_initial"]
    # It continues the pretrained model: its first validation loss is far below a new model's ln(512) ~ 6.2.
    assert m["val_loss_initial"] < 6.0
    assert {"tokens_seen", "tokens_per_s", "resumed_from_step", "peak_memory_mb", "wall_s"} <= set(m)


def test_mixture_manifest_follows_the_weights(midtrained):
    _, results = midtrained
    manifest = json.loads((Path(results["midtrain"].path) / "mixture.json").read_text())
    drawn = manifest["blocks_drawn"]
    assert manifest["weights"] == {"docs": 0.5, "qa": 0.5}
    assert abs(drawn["docs"] - drawn["qa"]) <= 1
    assert sum(drawn.values()) == sum(manifest["blocks_available"].values())
    assert (Path(results["midtrain"].path) / "loss_curve.csv").exists()


def test_docs_only_mixture(midtrained, tmp_path):
    factory = tiny_project(tmp_path, qa=QA, midtrain={**MID, "mix": {"docs": 1.0, "qa": 0.0}})
    manifest = json.loads((Path(run_until(factory, "midtrain")["midtrain"].path) / "mixture.json").read_text())
    assert manifest["blocks_drawn"]["qa"] == 0 and manifest["blocks_drawn"]["docs"] > 0


def test_a_weighted_source_without_a_block_is_bad_input(tmp_path):
    factory = tiny_project(tmp_path, qa={"per_doc": 1}, pretrain={
        "model": {"preset": "tiny", "context": 2048}, "tokens": 4096, "batch_tokens": 4096, "micro_batch": 2, "val_fraction": 0.25})
    with pytest.raises(InputError, match=r"midtrain.mix.qa is 0.5 but the qa source has no full block of 2048 tokens"):
        run_until(factory, "midtrain", midtrain={**MID, "batch_tokens": 4096, "micro_batch": 2})
