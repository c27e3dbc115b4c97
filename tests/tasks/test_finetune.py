"""sft + dpo on tiny: answers improve, preferences are learned, and the merged models load with
plain transformers and answer through the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_specs.errors import InputError
from tasks.core.keys import Placement
from tasks.core.runner import execute, plan
from tests.conftest import plain_transformers
from tests.tasks.test_pretrain import run_until, tiny_project

pytestmark = pytest.mark.slow

QA = {"per_doc": 3, "paraphrases": 1}  # few facts, so 20 epochs stay quick
MID = {"tokens": 40_000, "batch_tokens": 2048, "micro_batch": 16, "eval_every": 10, "checkpoint_every": 10}
SFT = {"lora": None, "epochs": 20, "lr": 0.003, "batch_size": 16, "context_fraction": 0.2, "distractors": 1,
       "passage_chars": 120, "answer_sample": 24, "max_new_tokens": 24}
DPO = {"lora": {"r": 8, "alpha": 16}, "epochs": 2, "lr": 0.001, "batch_size": 16, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    factory = tiny_project(tmp_path_factory.mktemp("ft"), qa=QA, midtrain=MID, sft=SFT, dpo=DPO)
    return factory, run_until(factory, "dpo")


def test_sft_improves_answers(tuned):
    m = tuned[1]["sft"].record.metrics
    assert m["answer_f1_after"] >= m["answer_f1_before"] + 0.05, m
    assert m["train_loss_final"] > 0 and m["val_loss_final"] > 0 and m["tokens_per_s"] > 0
    assert m["grounded"] > 0 and m["resumed_from_step"] == 0


def test_grounded_examples_hold_the_answer_in_a_passage(tuned):
    rows = [json.loads(l) for l in (Path(tuned[1]["sft"].path) / "examples_sample.jsonl").read_text().splitlines()]
    grounded = [r for r in rows if r["messages"][0]["content"].startswith("Answer from the passages.")]
    assert grounded
    for row in grounded:
        assert row["messages"][1]["role"] == "assistant"
        assert "[1]" in row["messages"][0]["content"]


def test_dpo_learns_the_preferences(tuned):
    m = tuned[1]["dpo"].record.metrics
    assert m["reward_accuracy_final"] > 0.5, m
    assert m["reward_margin_final"] > m["reward_margin_initial"], m
    assert m["lineage"]["reference_model"] == "the sft model with the adapter disabled"
    assert m["lineage"]["adapters_merged"] is True
    prefs = [json.loads(l) for l in (Path(tuned[1]["dpo"].path) / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == m["pairs"] > 0
    for p in prefs:
        assert p["chosen"] != p["rejected"]
        assert p["rejected_source"] in {"sft_answer", "same_document_answer", "other_document_answer"}
        if p["rejected_source"] == "sft_answer":
            assert p["sft_answer_f1"] < 0.5  # the model's own answer only when it is wrong
        else:
            assert p["sft_answer_f1"] >= 0.5 or p["rejected"] != p["chosen"]  # right or empty: another answer


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_merged_model_answers_with_plain_transformers(tuned, stage):
    result = plain_transformers(Path(tuned[1][stage].path) / "model", (
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'What is the grammar rule for `if_stmt`?'}],\n"
        "                            add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=12, do_sample=False)\n"
        "result = {'answer': t.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)}"))
    assert result["answer"].strip() and not result["gristmill"]


def test_lora_sft_writes_an_adapter_and_a_merged_model(tuned, tmp_path):
    factory, _ = tuned
    spec = factory.load(**{**factory.sections, "sft": {**SFT, "lora": {"r": 4, "alpha": 8}, "epochs": 1}})
    row = [r for r in plan(spec, factory.store) if r.name == "sft"][0]
    result = execute(row, spec, factory.store)
    files = result.record.files
    assert "adapter/adapter_config.json" in files and "model/model.safetensors" in files
    assert result.record.metrics["lora"] is True


def test_unknown_lora_target_lists_the_model_modules(tuned):
    factory, _ = tuned
    spec = factory.load(**{**factory.sections, "sft": {**SFT, "lora": {"target_modules": ["q_proj", "c_attn"]}}})
    row = [r for r in plan(spec, factory.store) if r.name == "sft"][0]
    with pytest.raises(InputError, match=r"sft.lora.target_modules: the model has no c_attn; its linear modules are: "
                                         r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        execute(row, spec, factory.store)


@pytest.fixture(scope="module")
def evaluated(tuned, one_layer_minilm):
    factory, results = tuned
    # Every eval below plans with this index section (the metrics' shape is checked, not RAG's quality).
    index = {"chunk_words": 32, "overlap": 8, "embedder": str(one_layer_minilm)}
    factory.sections = {**factory.sections, "index": index}
    spec = factory.load(**{**factory.sections, "eval": {"k": 3, "max_new_tokens": 16, "bootstrap": 300}})
    for row in plan(spec, factory.store):
        if row.name in ("index", "reader", "eval"):
            results[row.name] = execute(row, spec, factory.store)
    return factory, results


def test_eval_metrics_have_the_promised_shape(evaluated):
    m = evaluated[1]["eval"].record.metrics
    assert set(m["retrieval"]) >= {"recall@1", "recall@5", "recall@seen"} and 0 <= m["retrieval"]["recall@1"] <= 1
    assert set(m["retrieval_lenient"]) >= {"recall@1", "recall@5"}
    assert set(m["arms"]) == {"finetuned", "rag", "finetuned+rag", "reader", "rag-extractive", "gold"}
    for arm, s in m["arms"].items():
        assert {"em", "f1", "f1_ci", "rouge_l", "contains", "latency_p50_s", "empty_rate", "unfinished_rate",
                "repetitive_rate", "role", "n"} <= set(s)
        assert s["f1_ci"][0] <= s["f1"] <= s["f1_ci"][1]
    (primary, *_) = m["comparisons"]
    assert {"a", "b", "diff", "ci", "p", "p_adjusted", "n", "n_clusters", "winner", "mdd"} <= set(primary)
    assert (primary["a"], primary["b"]) == ("finetuned", "rag")
    assert all(c["a"] not in ("gold", "rag-extractive", "reader") for c in m["comparisons"])
    assert m["verdict"] and "rag" in m["verdict"]
    compared = dict.fromkeys(arm for c in m["comparisons"] for arm in (c["a"], c["b"]))
    silent = [f"{arm} gave an empty answer to {m['arms'][arm]['empty_rate']:.0%} of the questions"
              for arm in compared if m["arms"][arm]["empty_rate"] >= 0.5]
    assert m["cautions"] == silent and m["verdict"].startswith("caution: ") == bool(silent)


def test_the_report_names_the_heaviest_chain_of_the_stages_it_lists(evaluated):
    """The critical path in the report against every chain of the pipeline's edges through the
    stages of its table, summed by hand from their wall times."""
    from tasks.registry import PIPELINE

    factory, results = evaluated
    graph = PIPELINE.for_spec(factory.load())  # without the stages the spec skips
    eval_dir = Path(results["eval"].path)
    summary = json.loads((eval_dir / "summary.json").read_text())
    wall = {row["stage"]: row["wall_s"] for row in summary["stages"]}

    def chains(ending: str) -> list[list[str]]:
        above = [n for n in graph.needs(ending) if n in wall]
        return [[ending]] + [c + [ending] for n in above for c in chains(n)] if above else [[ending]]

    heaviest = max((c for name in wall for c in chains(name)), key=lambda c: sum(wall[n] for n in c))
    path = summary["critical_path"]
    assert path["stages"] == heaviest and heaviest[0] == "ingest"
    assert path["wall_s"] == round(sum(wall[n] for n in heaviest), 1)
    assert path["total_s"] == round(sum(wall.values()), 1) > path["wall_s"]
    md = (eval_dir / "report.md").read_text()
    assert f"Critical path: {' → '.join(heaviest)}, {path['wall_s']} s of the {path['total_s']} s" in md


def test_each_arm_answers_with_the_model_it_claims(evaluated):
    """Swap the two generators: the finetuned arm then answers as the reader arm did (same model,
    same closed-book prompt), and the reader arm as the finetuned arm did."""
    from dataclasses import replace

    from tasks.core.keys import stage_view
    from tasks.core.runner import _context, _inputs
    from tasks.evaluate import build
    from tasks.registry import PIPELINE

    factory, results = evaluated
    spec = factory.load(**{**factory.sections, "eval": {"k": 3, "max_new_tokens": 16, "bootstrap": 300,
                                                        "arms": ["finetuned", "reader"]}})
    row = next(r for r in plan(spec, factory.store) if r.name == "eval")
    stage = PIPELINE.get("eval")
    inputs = _inputs(row, stage, spec, factory.store, PIPELINE, Placement())
    swapped = replace(inputs, finetuned=inputs.reader, reader=inputs.finetuned)
    out = factory.root / "swapped"
    out.mkdir()
    cfg, _, _ = stage_view(stage, spec)
    build(cfg, swapped, out, _context(row, stage, spec, factory.store, factory.root / "work"))
    answers = lambda folder: {r["id"]: {a: v["answer"] for a, v in r["arms"].items()}
                              for r in map(json.loads, (Path(folder) / "answers.jsonl").read_text().splitlines())}
    normal, crossed = answers(results["eval"].path), answers(out)
    assert {q: a["finetuned"] for q, a in crossed.items()} == {q: a["reader"] for q, a in normal.items()}
    assert {q: a["reader"] for q, a in crossed.items()} == {q: a["finetuned"] for q, a in normal.items()}


def test_answers_file_has_every_question_and_arm(evaluated):
    rows = [json.loads(l) for l in (Path(evaluated[1]["eval"].path) / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == evaluated[1]["eval"].record.metrics["questions"]
    for row in rows:
        assert set(row["arms"]) == set(evaluated[1]["eval"].record.metrics["arms"])
        assert all({"answer", "em", "f1", "rouge_l", "contains", "latency_s"} <= set(a) for a in row["arms"].values())
        assert len(row["retrieved"]) == 5  # max(k, 5): recall@5 is always measured


def test_html_report_parses_and_holds_the_table_and_images(evaluated):
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.images, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])

        def handle_data(self, data):
            self.text.append(data)

    page = Collect()
    page.feed((Path(evaluated[1]["eval"].path) / "report.html").read_text())
    text = " ".join(page.text)
    assert page.tags.count("table") >= 4 and "finetuned+rag" in text and "Verdict" in text
    assert len(page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    md = (Path(evaluated[1]["eval"].path) / "report.md").read_text()
    assert "## Where the arms disagree" in md and "## Stages" in md and "## Lineage" in md


def test_eval_on_a_new_question_file_reuses_every_model(evaluated, tmp_path):
    """The path `gristmill eval --questions` takes: only eval builds, keyed by the file."""
    from tasks.core.runner import prepare_run

    factory, _ = evaluated
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "What is the grammar rule for `if_stmt`?", "answer": "\\"if\\" expression"}\n')
    spec_path = factory.write(**{**factory.sections, "eval": {"k": 3, "max_new_tokens": 16, "bootstrap": 300}})
    run = prepare_run(spec_path, str(factory.store.root), only="eval",
                      override=json.dumps({"eval": {"score_questions": str(questions)}}))
    assert [r.name for r in run.stages] == ["eval"] and not run.stages[0].cached
    m = execute(run.stages[0], run.spec, factory.store).record.metrics
    assert m["questions"] == 1


def test_a_later_eval_of_the_same_run_shows_what_changed(evaluated):
    factory, results = evaluated
    spec = factory.load(**{**factory.sections, "eval": {"k": 2, "max_new_tokens": 16, "bootstrap": 300}})
    row = [r for r in plan(spec, factory.store) if r.name == "eval"][0]
    later = execute(row, spec, factory.store)
    from tasks.run_report import publish_run_report

    md = (Path(publish_run_report(factory.store, spec.name, later.fingerprint).location) / "report.md").read_text()
    assert f"## Change since the previous eval of {spec.name}" in md
    earlier = [r.fingerprint for r in factory.store.history("eval") if r.fingerprint != later.fingerprint]
    assert any(f"Against eval {fp}" in md for fp in earlier)  # it names the eval it compares against


def test_the_eval_artifact_holds_no_run_name_and_each_run_report_its_own(evaluated):
    """One fingerprint, one set of bytes: the run's name and the change table live in runs/<name>/."""
    from tasks.run_report import publish_run_report

    factory, results = evaluated
    folder = Path(results["eval"].path)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert (folder / "report.md").read_text().splitlines()[0] == "# gristmill report"
    for name in ("team-a", "team-b"):
        own = Path(publish_run_report(factory.store, name, results["eval"].fingerprint).location)
        md = (own / "report.md").read_text()
        assert md.splitlines()[0] == f"# gristmill report: {name}"
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
