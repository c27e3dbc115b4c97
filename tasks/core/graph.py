"""The pipeline as a graph: each stage wired to the artifacts it reads, by role.

    Graph(
        Wire(ingest.STAGE),
        Wire(dedup.STAGE, documents="ingest", provides="corpus"),
        Wire(tokenizer.STAGE, documents="corpus"),
        ...
    )

A wire names, for every role of its stage's inputs, an earlier *binding*: a stage's name, or
the name an earlier wire `provides`. Bindings read like variables in a script: a later wire
that provides the same name rebinds it for the lines below, so a filter inserted after dedup
(`Wire(quality.STAGE, documents="corpus", provides="corpus")`) is read by every consumer of
"corpus" below it: one module and one line. The graph is checked when it is built: known
stages, each name once, every role bound to an earlier producer of the right type (so the
order is topological and there is no cycle).

An `optional` stage is skipped when the spec sets its section to null (`quality: null`): the
graph for that spec (`for_spec`) leaves its wire out, so the name it provides stays bound to
the stage above it and its consumers read that stage instead. The graph is checked both ways
when it is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from data_specs.errors import InputError
from data_specs.schema import RunSpec
from tasks.core.stage import Stage


def critical_path(seconds: Mapping[str, float], needs: Mapping[str, Iterable[str]]) -> tuple[list[str], float]:
    """The chain of stages whose seconds add up most (the least wall time the stages can take with
    any number of them running at once), and that sum. `seconds` lists the stages in a
    topological order (each after what it needs); a need not in it takes no time."""
    finish: dict[str, float] = {}
    before: dict[str, str | None] = {}
    for name, s in seconds.items():
        prior = max((n for n in needs.get(name, ()) if n in finish), key=finish.__getitem__, default=None)
        before[name] = prior
        finish[name] = (finish[prior] if prior else 0.0) + max(s, 0.0)
    last = max(reversed(finish), key=finish.__getitem__, default=None)  # on a tie, the later stage: a longer chain
    path = []
    while last is not None:
        path.append(last)
        last = before[last]
    path.reverse()
    return path, (finish[path[-1]] if path else 0.0)


class GraphError(Exception):
    """A pipeline wired wrongly: a bug in the graph's definition, found when it is built."""


@dataclass(frozen=True)
class Wire:
    """One stage and, for each role it reads, the binding that fills it."""

    stage: Stage
    sources: tuple[tuple[str, str], ...]  # (role, binding name)
    provides: str | None

    def __init__(self, stage: Stage, *, provides: str | None = None, **roles: str):
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "sources", tuple(sorted(roles.items())))
        object.__setattr__(self, "provides", provides)


class Graph:
    """Stages in pipeline order with their inputs resolved to producing stages."""

    def __init__(self, *wires: Wire, skipped: dict[str, str] | None = None):
        self.wires: tuple[Wire, ...] = wires
        self.skipped: dict[str, str] = dict(skipped or {})  # stage left out by a spec -> its null section
        self._stages: dict[str, Stage] = {}
        self._upstream: dict[str, dict[str, str]] = {}  # stage -> {role: producing stage}
        bound: dict[str, str] = {}  # binding name -> producing stage
        for wire in wires:
            stage = wire.stage
            if stage.name in self._stages:
                raise GraphError(f"stage {stage.name!r} is wired twice")
            self._check_section(stage)
            self._upstream[stage.name] = self._bind(wire, bound)
            self._stages[stage.name] = stage
            bound[stage.name] = stage.name
            if wire.provides:
                bound[wire.provides] = stage.name
        if skipped is None:  # the full graph: each optional stage must be skippable
            for wire in wires:
                if wire.stage.optional:
                    self._check_skippable(wire)

    def _check_skippable(self, wire: Wire) -> None:
        """An optional stage needs a section (null skips it) and a name it `provides` that a stage
        above it already provides, and the graph must hold together without it."""
        stage = wire.stage
        before = self.wires[: self.wires.index(wire)]
        if not stage.section or not wire.provides or \
                not any(w.provides == wire.provides or w.stage.name == wire.provides for w in before):
            raise GraphError(f"optional stage {stage.name!r} needs a section and must rebind a name a stage above it "
                             f"provides (e.g. provides=\"corpus\"), so its consumers can read that stage instead")
        try:
            Graph(*(w for w in self.wires if w is not wire), skipped={stage.name: stage.section})
        except GraphError as e:
            raise GraphError(f"skipping optional stage {stage.name!r} breaks the graph: {e}") from None

    def for_spec(self, spec: RunSpec) -> Graph:
        """The graph a spec runs: without the optional stages whose section it sets to null."""
        off = {w.stage.name: w.stage.section for w in self.wires
               if w.stage.optional and getattr(spec, w.stage.section) is None}
        if not off:
            return self
        return Graph(*(w for w in self.wires if w.stage.name not in off), skipped={**self.skipped, **off})

    @staticmethod
    def _check_section(stage: Stage) -> None:
        names = [stage.section] if stage.section else []
        names += [f.split(".")[0] for f in (*stage.fields, *([stage.start_from] if stage.start_from else []))]
        for name in names:
            if name not in RunSpec.model_fields:
                raise GraphError(f"stage {stage.name!r}: the spec has no section {name!r}")

    def _bind(self, wire: Wire, bound: dict[str, str]) -> dict[str, str]:
        """{role: producing stage} of one wire, checked against what is bound above it."""
        stage, given = wire.stage, dict(wire.sources)
        roles = stage.roles()
        if set(given) != set(roles):
            missing, extra = sorted(set(roles) - set(given)), sorted(set(given) - set(roles))
            raise GraphError(f"stage {stage.name!r} reads roles {sorted(roles)}; the wire "
                             f"{'misses ' + ', '.join(missing) if missing else ''}"
                             f"{' and ' if missing and extra else ''}{'names unknown ' + ', '.join(extra) if extra else ''}")
        out = {}
        for role, name in given.items():
            if name not in bound:
                raise GraphError(f"stage {stage.name!r} reads {role} from {name!r}, which no stage above it "
                                 f"provides (stages must come after what they read)")
            producer = self._stages[bound[name]]
            if not issubclass(producer.output, roles[role]):
                raise GraphError(f"stage {stage.name!r} reads {role} ({roles[role].__name__}) from {name!r}, "
                                 f"which makes {producer.output.__name__}")
            out[role] = producer.name
        return out

    # ------------------------------------------------------------ queries

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages.values())

    def names(self) -> list[str]:
        """Every stage's name, in pipeline order."""
        return list(self._stages)

    def get(self, name: str) -> Stage:
        """The stage called `name`; an unknown name is bad input that lists the known ones."""
        if name in self.skipped:
            raise InputError(f"stage {name!r} is skipped: the spec sets `{self.skipped[name]}: null`")
        if name not in self._stages:
            raise InputError(f"unknown stage {name!r}; stages are: {', '.join(self._stages)}")
        return self._stages[name]

    def upstream(self, name: str) -> dict[str, str]:
        """{role: producing stage} of a stage."""
        return dict(self._upstream[name])

    def needs(self, name: str) -> list[str]:
        """The stages a stage reads directly (each once, in pipeline order)."""
        producers = set(self._upstream[name].values())
        return [n for n in self._stages if n in producers]

    def ancestors(self, name: str) -> set[str]:
        """Every stage that `name` reads, directly or not."""
        out: set[str] = set()
        todo = list(self.needs(name))
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.needs(n))
        return out

    def with_dependents(self, names: Iterable[str]) -> set[str]:
        """The named stages and every stage downstream of one of them."""
        names = set(names)
        for n in names:
            self.get(n)  # raises InputError for an unknown stage
        return {s for s in self._stages if s in names or self.ancestors(s) & names}

    def gpu_stages(self) -> list[str]:
        """The stages that train or run a model (the GPU work pool's, under --gpu-deployment)."""
        return [s.name for s in self if s.gpu]

    def inserted(self, after: str, wire: Wire) -> Graph:
        """This graph with `wire` placed right after stage `after` (tests and experiments)."""
        wires: Sequence[Wire] = self.wires
        i = next(i for i, w in enumerate(wires) if w.stage.name == after)
        return Graph(*wires[: i + 1], wire, *wires[i + 1:], skipped=self.skipped or None)
