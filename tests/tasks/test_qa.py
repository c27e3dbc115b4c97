"""qa: rule answers sit verbatim at their spans, train and eval never share a question, a
reviewer's file replaces the held-out split, and a bad line in it names the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_specs.errors import InputError
from eval.questions import load_questions
from tasks.core.artifacts import iter_documents
from tasks.core.runner import execute, plan
from tasks.qagen.common import Pair, normalize_question, reject_reason
from tasks.qagen.rules import paraphrases, rule_pairs
from tests.tasks.test_pretrain import tiny_project

QA = {"per_doc": 6, "paraphrases": 2}


def run_qa(factory, **overrides):
    spec = factory.load(**{**factory.sections, **overrides})
    out = {}
    for row in plan(spec, factory.store):
        if row.name in ("ingest", "dedup", "qa"):
            out[row.name] = execute(row, spec, factory.store)
    return out


def rows(result, name: str) -> list[dict]:
    return [json.loads(l) for l in (Path(result.path) / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    factory = tiny_project(tmp_path_factory.mktemp("qa"), qa=QA)
    return run_qa(factory)


def test_rule_answers_are_verbatim_at_their_spans(qa_run):
    docs = {d["id"]: d["text"] for d in iter_documents(Path(qa_run["dedup"].path) / "documents")}
    for row in rows(qa_run["qa"], "train.jsonl") + rows(qa_run["qa"], "eval.jsonl"):
        start, end = row["span"]
        assert docs[row["doc_id"]][start:end] == row["answer"], row


def test_train_and_eval_questions_are_disjoint(qa_run):
    train = {normalize_question(r["question"]) for r in rows(qa_run["qa"], "train.jsonl")}
    held = {normalize_question(r["question"]) for r in rows(qa_run["qa"], "eval.jsonl")}
    assert held and train and not train & held


def test_metrics_and_files(qa_run):
    m = qa_run["qa"].record.metrics
    assert m["documents"] == 30
    assert m["pairs_kept"] == m["pairs_generated"] - sum(
        v for k, v in m["rejected_by_reason"].items() if not k.startswith("matches_eval_"))
    assert m["train"] == len(rows(qa_run["qa"], "train.jsonl")) and m["eval"] == len(rows(qa_run["qa"], "eval.jsonl"))
    originals = m["train"] - m["paraphrases"]
    assert m["paraphrases"] > 0 and originals + m["eval"] + sum(m["decontaminated_by_key"].values()) == m["pairs_kept"]
    assert set(m["leakage"]) == {"eval_questions", "sharing_document", "sharing_span", "sharing_answer"}
    for row in rows(qa_run["qa"], "train.jsonl"):
        assert set(row) >= {"id", "question", "answer", "doc_id", "span", "generator", "split"}
        assert row["split"] == "train"
    assert all(r["reason"] for r in rows(qa_run["qa"], "rejects.jsonl"))
    per_doc = {}
    for r in rows(qa_run["qa"], "train.jsonl") + rows(qa_run["qa"], "eval.jsonl"):
        if "paraphrase_of" not in r:
            per_doc[r["doc_id"]] = per_doc.get(r["doc_id"], 0) + 1
    assert max(per_doc.values()) <= QA["per_doc"]


def test_split_is_deterministic_and_seeded(tmp_path, qa_run):
    again = run_qa(tiny_project(tmp_path / "a", qa=QA))
    assert rows(again["qa"], "eval.jsonl") == rows(qa_run["qa"], "eval.jsonl")
    other = run_qa(tiny_project(tmp_path / "b", qa={**QA, "seed": 7}))
    assert rows(other["qa"], "eval.jsonl") != rows(qa_run["qa"], "eval.jsonl")


def test_split_by_document_keeps_documents_whole(tmp_path):
    result = run_qa(tiny_project(tmp_path, qa={**QA, "split_by": "document", "eval_fraction": 0.3}))["qa"]
    train_docs = {r["doc_id"] for r in rows(result, "train.jsonl")}
    eval_docs = {r["doc_id"] for r in rows(result, "eval.jsonl")}
    assert eval_docs and not train_docs & eval_docs


def test_holdout_from_training_keeps_the_held_out_documents_out_of_pretraining(tmp_path):
    """With qa.holdout_from_training, pretrain reads no document that qa held out, and only those
    are left out (the same hash of the document id as qa's split); its metrics count them."""
    from tasks.core.keys import stage_view
    from tasks.registry import PIPELINE
    from tasks.train.lm_data import training_documents

    factory = tiny_project(tmp_path, qa={**QA, "split_by": "document", "eval_fraction": 0.3,
                                         "holdout_from_training": True})
    result = run_qa(factory)
    eval_docs = {r["doc_id"] for r in rows(result["qa"], "eval.jsonl")}
    train_docs = {r["doc_id"] for r in rows(result["qa"], "train.jsonl")}
    docs = list(iter_documents(Path(result["dedup"].path) / "documents"))
    _, _, fields = stage_view(PIPELINE.get("pretrain"), factory.load(**factory.sections))
    kept, left_out = training_documents(docs, fields)
    kept_ids = {str(d["id"]) for d in kept}
    assert eval_docs and not kept_ids & eval_docs and train_docs <= kept_ids
    assert left_out == len(docs) - len(kept) > 0
    spec = factory.load(**factory.sections)
    built = {r.name: execute(r, spec, factory.store) for r in plan(spec, factory.store)
             if r.name in ("tokenizer", "pretrain")}
    assert built["pretrain"].record.metrics["held_out_documents_left_out"] == left_out


def test_holdout_from_training_needs_split_by_document(tmp_path):
    with pytest.raises(InputError, match="holdout_from_training needs split_by: document"):
        tiny_project(tmp_path).load(qa={"holdout_from_training": True})


def test_reviewer_questions_replace_the_split(tmp_path, qa_run):
    factory = tiny_project(tmp_path, qa=QA)
    taken = rows(qa_run["qa"], "train.jsonl")[0]
    (tmp_path / "questions.jsonl").write_text(
        json.dumps({"question": taken["question"].upper(), "answers": [taken["answer"]], "doc_id": taken["doc_id"]}) + "\n"
        + json.dumps({"id": "mine", "question": "What is a reviewer question?", "answer": "this one"}) + "\n")
    result = run_qa(factory, eval={"questions": "questions.jsonl"})["qa"]
    held = rows(result, "eval.jsonl")
    assert [r["id"] for r in held] == ["q1", "mine"] and held[1]["answers"] == ["this one"]
    train = rows(result, "train.jsonl")
    assert normalize_question(taken["question"]) not in {normalize_question(r["question"]) for r in train}
    assert result.record.metrics["decontaminated"] >= 1


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('{"answers": ["x"]}', "`question` must be a non-empty string"),
    ('{"question": "q?"}', "needs `answers`"),
    ('{"question": "q?", "answers": []}', "needs `answers`"),
    ('{"question": "q?", "answer": 3}', "needs `answers`"),
    ('[1]', "expected a JSON object"),
])
def test_bad_question_file_line_is_named(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "fine?", "answer": "yes"}\n\n' + line + "\n")
    with pytest.raises(InputError, match=f"{path}:3: .*{message}"):
        load_questions(path)


def test_question_file_problems_reach_the_cli_as_input_errors(tmp_path):
    factory = tiny_project(tmp_path, qa=QA)
    with pytest.raises(InputError, match="eval.questions: .*missing.jsonl not found"):
        run_qa(factory, eval={"questions": "missing.jsonl"})


def test_quality_filters():
    pair = lambda q, a: Pair(q, a, "d", None, "rule:member")
    assert reject_reason(pair("What does x do?", ""), 3, 300) == "empty_answer"
    assert reject_reason(pair("What does x do?", "ab"), 3, 300) == "answer_too_short"
    assert reject_reason(pair("What does x do?", "a" * 301), 3, 300) == "answer_too_long"
    assert reject_reason(pair("What is the grammar rule for `x`?", "x"), 1, 300) == "answer_in_question"
    assert reject_reason(pair("What does x do?", "Returns y."), 3, 300) is None


def test_rule_generator_patterns_and_paraphrases():
    text = ("# bisect\n\nBisection algorithms.\n\n## insort(a, x, lo=0)\n\nInsert item x in list a.\n\n"
            "   if_stmt ::= \"if\" expression \":\" suite\n\nA list is a mutable sequence of items.\n")
    pairs = {p.generator: p for p in rule_pairs("module:bisect", text)}
    assert pairs["rule:module"].answer == "Bisection algorithms."
    assert pairs["rule:member"].question == "What does `bisect.insort()` do?"
    assert pairs["rule:member"].answer == "Insert item x in list a."
    assert pairs["rule:signature"].answer == "a, x, lo=0"
    assert pairs["rule:grammar"].answer == '"if" expression ":" suite'
    assert pairs["rule:definition"].question == "What is a list?"
    for p in pairs.values():
        assert text[p.span[0]:p.span[1]] == p.answer
    assert paraphrases(pairs["rule:member"], 2) == ["What is `bisect.insort()` used for?", "Explain what `bisect.insort()` does."]


# ---------------------------------------------------------------- leakage

def _pair(q, a, doc, span):
    return {"question": q, "answer": a, "doc_id": doc, "span": span}


def test_leakage_counts_on_a_constructed_case():
    from tasks.qagen.leakage import shared_counts

    eval_rows = [_pair("What does `f` do?", "It returns one.", "d1", [10, 25]),    # doc + span + answer shared
                 _pair("What is g?", "A thing.", "d2", [0, 8]),                    # doc shared, span apart
                 _pair("Define h.", "The answer", "d3", [5, 15]),                  # answer shared only
                 _pair("Why k?", "Because.", "d4", None)]                          # nothing shared
    train_rows = [_pair("Explain f.", "it returns ONE", "d1", [12, 30]),
                  _pair("What is g2?", "Other.", "d2", [20, 30]),
                  _pair("What is x?", "answer", "d9", [0, 6])]
    assert shared_counts(eval_rows, train_rows) == {"eval_questions": 4, "sharing_document": 2, "sharing_span": 1,
                                                   "sharing_answer": 2}


@pytest.mark.parametrize("keys, expected", [
    (("question",), "question"), (("answer",), "answer"), (("span",), "span"), ((), None),
])
def test_decontamination_matches_on_the_chosen_keys(keys, expected):
    from tasks.qagen.leakage import PairIndex

    held = PairIndex.of([_pair("What does `f` do?", "It returns one.", "d1", [10, 25])])
    probes = {"question": ("what does f do", "Something else", "d7", None),
              "answer": ("Another question?", "it returns one", "d7", None),
              "span": ("Another question?", "Other answer", "d1", [20, 40])}
    for key, probe in probes.items():
        assert held.match(*probe, keys) == (key if key in keys else None)
    assert held.match("Unrelated?", "Unrelated.", "d1", [25, 30], ("span",)) is None  # touching, not overlapping
    assert held.match("What does `f` do?", "x", None, None, keys) == ("question" if "question" in keys else None)
    assert expected in (None, *keys)


def test_answers_that_normalise_to_empty_are_rejected():
    from tasks.qagen.common import Pair, reject_reason

    assert reject_reason(Pair("What is it?", "The", "d", (0, 3), "rule"), 3, 300) == "answer_normalises_empty"
    assert reject_reason(Pair("What is it?", "The cat", "d", (0, 7), "rule"), 3, 300) is None
