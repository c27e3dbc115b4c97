"""Regression gates: the spec's `eval.gates` checked against one eval summary, pure functions.

A gate names one figure of the summary (`GateSpec.figure()`: an arm's F1, a latency, a retrieval
recall) and one bound. The run's report (tasks/run_report.py) checks them after eval, shows them
in its Gates table and run.json, and a failed gate fails the run (exit 3) with every artifact kept.

    min: 0.30                   passes when value >= 0.30
    max: 2.0                    passes when value <= 2.0
    max_drop_vs_previous: 0.02  passes when previous - value <= 0.02 (previous: the latest other
                                eval of the same run name); a rise always passes

Choices, stated in every result's message:
- A value equal to its bound passes. Bounds are compared with an absolute tolerance of
  TOLERANCE, so 0.50 -> 0.48 counts as a drop of 0.02 (in floating point it is 0.020000000000000018)
  and a mean of 0.1 + 0.2 (0.30000000000000004) meets `max: 0.3`.
- A figure this eval does not have, or has as null/NaN (an arm that answered no question: `gold`
  without known source passages), FAILS its gate: a gate must never pass on a number that is not
  there.
- A drop gate with nothing to compare with (no previous eval of this run name: the first run; or a
  previous eval without the figure) PASSES, saying "no previous run": a first nightly cannot have
  regressed, and failing it would make every new run name fail once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from data_specs.schema import GateSpec

# Absolute tolerance of every comparison, in the metric's unit: far below any difference a
# gate is meant to catch (F1 is reported to 3 decimals), far above float rounding (~1e-16).
TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateResult:
    """One gate checked: what it says, the value found, the bound it was held to, and why it passed or not."""

    gate: str  # e.g. "finetuned f1 >= 0.3"
    value: float | None  # None: the summary has no value for the figure
    threshold: float | None  # the bound the value must respect; for a drop gate previous - max drop; None without one
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The gate as run.json records it."""
        return asdict(self)


def describe(gate: GateSpec) -> str:
    """The gate in one line: "finetuned f1 >= 0.3", "retrieval.recall@5 >= 0.9", "finetuned f1 drop <= 0.02"."""
    name = f"{gate.arm} {gate.metric}" if gate.arm else gate.metric
    if gate.min is not None:
        return f"{name} >= {_num(gate.min)}"
    if gate.max is not None:
        return f"{name} <= {_num(gate.max)}"
    return f"{name} drop vs previous <= {_num(gate.max_drop_vs_previous)}"


def figure_value(gate: GateSpec, summary: Mapping[str, Any] | None) -> float | None:
    """The gated figure in an eval summary; None when it is not there, null or NaN."""
    node: Any = summary
    for key in gate.figure():
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        return None
    return float(node)


def check_gate(gate: GateSpec, summary: Mapping[str, Any], previous_summary: Mapping[str, Any] | None) -> GateResult:
    """One gate against this eval's summary (and, for a drop gate, the previous eval's of the same run name)."""
    text = describe(gate)
    value = figure_value(gate, summary)
    if value is None:
        where = f"arm {gate.arm!r} has no {gate.metric!r}" if gate.arm else f"no {gate.metric!r}"
        return GateResult(text, None, _bound(gate), False, f"no value in this eval ({where}: the figure is missing, "
                          "null or NaN, e.g. an arm that answered no question); a gate never passes without one")
    if gate.min is not None:
        ok = value >= gate.min - TOLERANCE
        return GateResult(text, value, gate.min, ok, f"{_num(value)} is {'at or above' if ok else 'below'} the "
                          f"minimum {_num(gate.min)}")
    if gate.max is not None:
        ok = value <= gate.max + TOLERANCE
        return GateResult(text, value, gate.max, ok, f"{_num(value)} is {'at or below' if ok else 'above'} the "
                          f"maximum {_num(gate.max)}")
    before = figure_value(gate, previous_summary)
    if before is None:
        why = "no previous run" if previous_summary is None else "no previous run with this figure"
        return GateResult(text, value, None, True, f"{why} of this name to compare with: passes")
    drop, allowed = before - value, gate.max_drop_vs_previous
    ok = drop <= allowed + TOLERANCE
    return GateResult(text, value, before - allowed, ok, f"{_num(before)} -> {_num(value)} (change "
                      f"{-drop:+.4g}); {'within' if ok else 'more than'} the allowed drop of {_num(allowed)}")


def check_gates(gates: Sequence[GateSpec], summary: Mapping[str, Any],
                previous_summary: Mapping[str, Any] | None) -> list[GateResult]:
    """Every gate, in spec order. `previous_summary`: the previous eval of this run name, None for a first run."""
    return [check_gate(g, summary, previous_summary) for g in gates]


def failure_message(results: Sequence[GateResult]) -> str | None:
    """What a failed run says (its Prefect state message, the CLI's last line): each failed gate with
    its value and threshold; None when every gate passed."""
    failed = [r for r in results if not r.passed]
    if not failed:
        return None
    each = "; ".join(f"{r.gate}: value {_num(r.value)}, threshold {_num(r.threshold)} ({r.message})" for r in failed)
    return f"{len(failed)} of {len(results)} regression gate(s) failed (eval.gates): {each}"


def _bound(gate: GateSpec) -> float | None:
    """The bound a gate states itself (a drop gate's depends on the previous value)."""
    return gate.min if gate.min is not None else gate.max


def _num(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"
