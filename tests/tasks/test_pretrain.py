"""tokenizer + pretrain on tiny.yaml: the model learns, loads with plain transformers, and bad
`from:` paths or a too-small corpus are InputErrors that name the path and the numbers."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from data_specs.errors import InputError
from data_specs.schema import OptimSpec
from tasks.core.runner import execute, plan
from tasks.train.loop import BatchOrder, lr_at
from tests.conftest import REPO, SpecFactory, plain_transformers

TINY_DOCS = REPO / "data_specs" / "tiny" / "docs.jsonl"
FAST_PRETRAIN = {"model": {"preset": "tiny"}, "tokens": 80_000, "batch_tokens": 2048, "micro_batch": 16,
                 "lr": 0.005, "eval_every": 10, "checkpoint_every": 10}


def tiny_project(root: Path, **sections) -> SpecFactory:
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_DOCS, root / "data" / "docs.jsonl")
    factory = SpecFactory(root)
    factory.sections = {"tokenizer": {"vocab_size": 512}, "pretrain": FAST_PRETRAIN, **sections}
    return factory


def run_until(factory: SpecFactory, last: str, **overrides):
    spec = factory.load(**{**factory.sections, **overrides})
    results = {}
    for row in plan(spec, factory.store):
        results[row.name] = execute(row, spec, factory.store)
        if row.name == last:
            return results
    raise AssertionError(last)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_until(tiny_project(tmp_path_factory.mktemp("pretrain")), "pretrain")


def test_pretrain_learns(trained):
    m = trained["pretrain"].record.metrics
    assert m["val_loss_final"] < m["val_loss_initial"] - 0.5, m
    assert m["val_perplexity_final"] == pytest.approx(math.exp(m["val_loss_final"]))
    assert m["tokens_seen"] >= 80_000 and m["tokens_per_s"] > 0
    assert m["mfu"] is None and m["device"] == "cpu"  # no MFU claim on a CPU
    assert m["resumed_from_step"] == 0
    for key in ("wall_s", "peak_memory_mb"):
        assert m[key] > 0


def test_loss_curve_csv(trained):
    lines = (Path(trained["pretrain"].path) / "loss_curve.csv").read_text().splitlines()
    assert lines[0] == "step,tokens,lr,train_loss,val_loss"
    assert len(lines) == trained["pretrain"].record.metrics["steps"] + 2  # header + step 0 + every step


def test_model_loads_with_plain_transformers(trained):
    """In a fresh interpreter that never imports gristmill."""
    result = plain_transformers(Path(trained["pretrain"].path) / "model", (
        "ids = t('The assert statement', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "chat = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False, add_generation_prompt=True)\n"
        "result = {'new': out.shape[1] - ids.shape[1], 'chat': chat}"))
    assert result["new"] == 5 and not result["gristmill"]
    assert result["chat"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_metrics_and_special_tokens(trained):
    from transformers import AutoTokenizer

    m = trained["tokenizer"].record.metrics
    assert m["trained"] and m["vocab_size"] <= 512 + 4 and m["chars_per_token"] > 1.5
    tok = AutoTokenizer.from_pretrained(Path(trained["tokenizer"].path) / "tokenizer")
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert len(tok("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_from_folder_enters_the_key_by_content(trained, tmp_path):
    factory = tiny_project(tmp_path / "p")
    folder = tmp_path / "tok"
    shutil.copytree(Path(trained["tokenizer"].path) / "tokenizer", folder)
    key = lambda: {r.name: r.fingerprint for r in plan(factory.load(tokenizer={"from": str(folder)}), factory.store)}
    before = key()
    shutil.copytree(folder, tmp_path / "tok2")
    moved = {r.name: r.fingerprint for r in plan(factory.load(tokenizer={"from": str(tmp_path / "tok2")}), factory.store)}
    assert moved == before  # same content elsewhere: same key
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text().replace("}", ' }', 1))
    assert key()["tokenizer"] != before["tokenizer"]
    result = run_until(factory, "tokenizer", tokenizer={"from": str(folder)})
    assert result["tokenizer"].record.metrics["trained"] is False


def test_continue_from_checkpoint(trained, tmp_path):
    factory = tiny_project(tmp_path / "p")
    ckpt = str(Path(trained["pretrain"].path) / "model")
    result = run_until(factory, "pretrain", tokenizer={"from": ckpt},
                       pretrain={**FAST_PRETRAIN, "from": ckpt, "tokens": 8192})
    m = result["pretrain"].record.metrics
    # It starts where the first model ended, far below a fresh model's ~ln(vocab) loss.
    assert m["val_loss_initial"] == pytest.approx(trained["pretrain"].record.metrics["val_loss_final"], abs=0.05)


@pytest.mark.parametrize("sections, message", [
    ({"pretrain": {**FAST_PRETRAIN, "from": "nowhere"}}, "pretrain.from: .*nowhere is not a folder"),
    ({"tokenizer": {"from": "nowhere"}}, "tokenizer.from: .*nowhere is not a folder"),
])
def test_from_paths_that_do_not_exist(tmp_path, sections, message):
    factory = tiny_project(tmp_path)
    with pytest.raises(InputError, match=message):
        plan(factory.load(**{**factory.sections, **sections}), factory.store)


def test_from_folders_that_are_not_models(tmp_path):
    factory = tiny_project(tmp_path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"tokenizer.from: .*junk is not a loadable tokenizer"):
        run_until(factory, "tokenizer", tokenizer={"from": str(junk)})
    with pytest.raises(InputError, match=r"pretrain.from: .*junk is not a loadable checkpoint"):
        run_until(factory, "pretrain", pretrain={**FAST_PRETRAIN, "from": str(junk)})


def test_tokenizer_larger_than_checkpoint_vocabulary(trained, tmp_path):
    factory = tiny_project(tmp_path)
    with pytest.raises(InputError, match=r"has 512 embedding rows but the tokenizer has 2000 tokens"):
        run_until(factory, "pretrain", tokenizer={"vocab_size": 2000},
                  pretrain={**FAST_PRETRAIN, "from": str(Path(trained["pretrain"].path) / "model")})


def test_corpus_too_small_for_one_block(tmp_path):
    factory = tiny_project(tmp_path)
    with pytest.raises(InputError, match=r"corpus too small: \d+ training documents \(\d+ tokens\).*one training block is 4096"):
        run_until(factory, "pretrain", pretrain={**FAST_PRETRAIN, "model": {"preset": "tiny", "context": 4096}})


def test_lr_schedule():
    spec = OptimSpec(lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1)
    lrs = [lr_at(s, 100, spec) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine never rises after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    wsd = OptimSpec(lr=1.0, min_lr_ratio=0.0, warmup_fraction=0.1, schedule="wsd", decay_fraction=0.2)
    w = [lr_at(s, 100, wsd) for s in range(100)]
    assert w[10:80] == [1.0] * 70 and w[-1] == pytest.approx(0.0) and w[85] < 1.0


def test_batch_order_is_a_permutation_per_epoch_and_reproducible():
    a, b = BatchOrder(10, seed=3), BatchOrder(10, seed=3)
    first = a.blocks(0, 10).tolist()
    assert sorted(first) == list(range(10))
    assert b.blocks(5, 10).tolist()[:5] == first[5:]  # any position can be recomputed on resume
    assert a.blocks(10, 10).tolist() != first  # a new epoch, a new order
