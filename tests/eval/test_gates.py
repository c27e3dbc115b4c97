"""Regression gates as pure functions: the bounds at their edges, drops against a previous eval,
a first run, missing figures, the failure message, and the gate vocabulary against what eval
really summarizes."""

from __future__ import annotations

import math

import pytest

from data_specs.schema import GATE_ARM_METRICS, EvalSpec, GateSpec
from eval.gates import check_gate, check_gates, describe, failure_message


def gate(**fields) -> GateSpec:
    return GateSpec.model_validate(fields)


def summary(f1: float | None = 0.3, recall5: float = 0.9, latency: float = 2.0) -> dict:
    """The parts of an eval summary (summary.json) a gate reads."""
    return {"arms": {"finetuned": {"f1": f1, "latency_p95_s": latency, "n": 40}},
            "retrieval": {"retriever": "hybrid", "strict": {"recall@1": 0.5, "recall@5": recall5},
                          "lenient": {"recall@5": 0.95}}}


F1_MIN = {"arm": "finetuned", "metric": "f1", "min": 0.3}
F1_DROP = {"arm": "finetuned", "metric": "f1", "max_drop_vs_previous": 0.02}
LATENCY_MAX = {"arm": "finetuned", "metric": "latency_p95_s", "max": 2.0}
RECALL_MIN = {"metric": "retrieval.recall@5", "min": 0.9}


# gate, this eval, previous eval (None: a first run) -> passed
BOUNDARIES = [
    (F1_MIN, summary(f1=0.3), None, True),  # equal to the minimum passes
    (F1_MIN, summary(f1=0.2999), None, False),
    (F1_MIN, summary(f1=0.31), None, True),
    (LATENCY_MAX, summary(latency=2.0), None, True),  # equal to the maximum passes
    (LATENCY_MAX, summary(latency=2.0001), None, False),
    (RECALL_MIN, summary(recall5=0.9), None, True),
    (RECALL_MIN, summary(recall5=0.8999), None, False),
    ({"metric": "retrieval_lenient.recall@5", "min": 0.96}, summary(), None, False),  # lenient is 0.95
    (F1_DROP, summary(f1=0.48), summary(f1=0.50), True),  # a drop of exactly 0.02 (0.0200...18 in floats)
    (F1_DROP, summary(f1=0.28), summary(f1=0.30), True),  # (0.0199...62 in floats)
    ({"arm": "finetuned", "metric": "f1", "max": 0.3}, summary(f1=0.1 + 0.2), None, True),  # 0.30000000000000004
    (F1_DROP, summary(f1=0.2799), summary(f1=0.30), False),
    (F1_DROP, summary(f1=0.45), summary(f1=0.30), True),  # a rise
    (F1_DROP, summary(f1=0.30), summary(f1=0.30), True),
    (F1_DROP, summary(f1=0.0), None, True),  # a first run: nothing to compare with
]


@pytest.mark.parametrize("fields, now, before, passed", BOUNDARIES)
def test_bounds_at_their_edges(fields, now, before, passed):
    result = check_gate(gate(**fields), now, before)
    assert result.passed is passed, result.message
    assert result.value is not None


def test_a_drop_is_held_to_the_previous_value_minus_the_allowed_drop():
    result = check_gate(gate(**F1_DROP), summary(f1=0.25), summary(f1=0.30))
    assert not result.passed
    assert result.value == 0.25 and result.threshold == pytest.approx(0.28)
    assert "0.3 -> 0.25" in result.message and "more than the allowed drop of 0.02" in result.message


def test_a_first_run_passes_a_drop_gate_and_says_why():
    result = check_gate(gate(**F1_DROP), summary(f1=0.1), None)
    assert result.passed and result.threshold is None
    assert result.message.startswith("no previous run")
    # A previous eval without the figure (it did not run the arm) is no baseline either.
    before = {"arms": {}, "retrieval": {"strict": {}, "lenient": {}}}
    result = check_gate(gate(**F1_DROP), summary(f1=0.1), before)
    assert result.passed and result.message.startswith("no previous run with this figure")


@pytest.mark.parametrize("now", [summary(f1=None), summary(f1=math.nan), {"arms": {}, "retrieval": {}}],
                         ids=["null", "nan", "arm-missing"])
@pytest.mark.parametrize("fields", [F1_MIN, F1_DROP, {"arm": "finetuned", "metric": "f1", "max": 1.0}])
def test_a_missing_figure_fails_its_gate(now, fields):
    result = check_gate(gate(**fields), now, summary(f1=0.3))
    assert not result.passed and result.value is None
    assert "no value in this eval" in result.message and "arm 'finetuned' has no 'f1'" in result.message


def test_describe():
    assert describe(gate(**F1_MIN)) == "finetuned f1 >= 0.3"
    assert describe(gate(**LATENCY_MAX)) == "finetuned latency_p95_s <= 2"
    assert describe(gate(**F1_DROP)) == "finetuned f1 drop vs previous <= 0.02"
    assert describe(gate(**RECALL_MIN)) == "retrieval.recall@5 >= 0.9"


def test_the_failure_message_names_each_failed_gate_its_value_and_threshold():
    results = check_gates([gate(**F1_MIN), gate(**RECALL_MIN), gate(**LATENCY_MAX)],
                          summary(f1=0.212, latency=3.5), None)
    assert [r.passed for r in results] == [False, True, False]
    message = failure_message(results)
    assert message.startswith("2 of 3 regression gate(s) failed")
    assert "finetuned f1 >= 0.3: value 0.212, threshold 0.3" in message
    assert "finetuned latency_p95_s <= 2: value 3.5, threshold 2" in message
    assert "recall" not in message
    assert failure_message(check_gates([gate(**RECALL_MIN)], summary(), None)) is None
    assert failure_message([]) is None


def test_results_are_plain_json_for_run_json():
    import json

    (result,) = check_gates([gate(**F1_MIN)], summary(f1=0.25), None)
    assert json.loads(json.dumps(result.to_dict())) == {
        "gate": "finetuned f1 >= 0.3", "value": 0.25, "threshold": 0.3, "passed": False,
        "message": "0.25 is below the minimum 0.3"}


# ---------------------------------------------------------------- the vocabulary is what eval gives

def test_every_numeric_figure_of_an_arm_is_gateable_and_nothing_else():
    """GATE_ARM_METRICS (data_specs, which cannot import eval) is exactly the numeric figures
    eval/scoring.py's summarize gives an arm: a figure added there must be added here."""
    from eval.arms import Answer, EvalQuestion
    from eval.scoring import score, summarize

    qs = [EvalQuestion(f"q{i}", "what?", ("yes",), f"d{i % 2}") for i in range(4)]
    answers = {"finetuned": [Answer("yes" if i % 2 else "no", 0.1, 3) for i in range(4)]}
    scores = {"finetuned": [score(q, a) for q, a in zip(qs, answers["finetuned"])]}
    arm = summarize(qs, answers, scores, 100, 0, 24)["finetuned"]
    numeric = {k for k, v in arm.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(GATE_ARM_METRICS)
    for metric in GATE_ARM_METRICS:
        result = check_gate(gate(arm="finetuned", metric=metric, min=-1e9), {"arms": {"finetuned": arm}}, None)
        assert result.passed, result.message


def test_every_recall_eval_measures_is_gateable_and_no_other_depth():
    """eval/hits.py's recall measures recall@1, @5, @k and @seen; a gate may name those, at eval.k."""
    from eval.hits import recall
    from eval.questions import Question
    from eval.rag import Chunk

    chunks = [Chunk(i, f"d{i}", 0, 10, f"answer{i} text") for i in range(6)]
    qs = [Question(f"q{i}", "?", (f"answer{i}",), f"d{i}") for i in range(2)]
    found = recall(qs, [[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]], chunks, k=3, seen=[3, 3])
    assert set(found.strict) == set(found.lenient) == {"recall@1", "recall@3", "recall@5", "recall@seen"}
    now = {"retrieval": {"strict": found.strict, "lenient": found.lenient}}
    for key in found.strict:
        for kind in ("retrieval", "retrieval_lenient"):
            spec = EvalSpec.model_validate({"k": 3, "gates": [{"metric": f"{kind}.{key}", "min": 0}]})
            assert check_gate(spec.gates[0], now, None).passed
    for depth in (2, 4, 10):
        with pytest.raises(ValueError, match=f"eval measures recall at 1, 5, 3 \\(eval.k\\) and seen, not at {depth}"):
            EvalSpec.model_validate({"k": 3, "gates": [{"metric": f"retrieval.recall@{depth}", "min": 0}]})
