"""The stage contract every stage module in `tasks/` implements.

    @dataclass(frozen=True)
    class SFTInputs:                 # the roles it reads, each a typed handle (core/artifacts.py)
        model: Model
        pairs: Pairs
        documents: Documents

    def build(cfg: SFTSpec, inputs: SFTInputs, out: Path, ctx: RunContext) -> Metrics:
        '''Reads its typed inputs, writes only under `out`, returns metrics.'''

    STAGE = Stage("sft", build, output=Model, inputs=SFTInputs, section="sft", gpu=True)

`cfg` is the stage's spec section as a `KeyedView` (data_specs/views.py): exactly the fields
its fingerprint holds; `ctx` carries the rest (scratch folder, runtime settings, the values
resolved for where it runs). Which artifact fills each role is decided in one place, the
graph (tasks/registry.py), never in the stage. A stage never reads environment variables,
global paths or another stage's folder by name. The machinery around `build` (fingerprint,
cache, lock, temp folder, publish, record) is tasks/core/runner.py.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_specs.schema import ExecutorSpec, RunSpec
from data_specs.views import KeyedView, RuntimeView
from tasks.core.artifacts import Artifact
from tasks.core.store import ArtifactRecord

Metrics = dict[str, Any]


@dataclass(frozen=True)
class RunContext:
    """What a build gets besides its config and inputs. Nothing here changes the output
    except `resolved` and `fields`, which are in the fingerprint."""

    work: Path  # scratch kept across attempts of this fingerprint (checkpoints), never published
    trust_remote_code: bool  # the CLI's --trust-remote-code (a spec file cannot set it)
    spec_path: Path  # for messages that name the spec file
    # Values fixed for where the stage runs (device, precision, processes): keyed.
    resolved: Mapping[str, Any] = field(default_factory=dict)
    # Spec fields of other sections the stage declared (Stage.fields), by dotted name: keyed.
    fields: Mapping[str, Any] = field(default_factory=dict)
    runtime: RuntimeView | None = None  # the section's runtime settings (not keyed)
    resources: Any = None  # resources.<stage> (time limit, gpus, strategy), when the spec has one
    executor: ExecutorSpec | None = None  # how datatrove runs (data stages only; its `tasks` is keyed)
    # The records of every stage upstream of this one, for reports (wall times, counts).
    lineage: Mapping[str, ArtifactRecord] = field(default_factory=dict)
    # (stage, file in its artifact) -> a local copy of that file, for a stage in `lineage`.
    fetch: Callable[[str, str], Path | None] = lambda stage, rel: None
    # The other run's artifact the stage starts from (its `start_from` field holds a run reference
    # that resolved to one), on a local folder with its sha256 checked; keyed as resolved[field].
    start: Artifact | None = None

    @property
    def device(self) -> str:
        """"cuda" or "cpu": where the planner decided this stage runs."""
        return self.resolved.get("device", "cpu")

    def shared_cache(self) -> Path:
        """A folder every fingerprint of a stage shares (e.g. an API response cache, so a rerun with
        a changed spec does not pay for the same request twice); never part of an artifact."""
        path = self.work.parent / "_shared"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Where:
    """What a resolver knows of where and how a stage runs."""

    device: str  # "cuda" or "cpu", as planned
    runtime: RuntimeView | None  # the section's runtime settings
    resources: Any  # resources.<stage>, when the spec has one
    fields: Mapping[str, Any]  # the other spec fields the stage declared


# resolve(cfg, where) -> the values fixed where the stage runs that change its output.
Resolver = Callable[[KeyedView, Where], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One box of the pipeline: what it builds, what it reads, and what enters its key."""

    name: str
    build: Callable[..., Metrics]
    output: type[Artifact]
    # A frozen dataclass whose fields are the roles it reads, typed by handle; None: no inputs.
    inputs: type | None = None
    # The spec section build gets as `cfg` (None: a stage without settings).
    section: str | None = None
    # Dotted spec fields of other sections it reads (ctx.fields); keyed like its section.
    fields: tuple[str, ...] = ()
    # More such fields, keyed only when the spec turns on what reads them: (spec) -> dotted fields.
    fields_when: Callable[[Any], tuple[str, ...]] | None = None
    # Values resolved where it runs that change its output (device, precision, packing...).
    resolve: Resolver | None = None
    # Content digests of files outside the store it reads beyond its section's content fields
    # (ingest's corpus sources, which are globs).
    external_inputs: Callable[[RunSpec], dict[str, str]] | None = None
    # Runs on the GPU work pool under `--gpu-deployment` (it trains or runs a model).
    gpu: bool = False
    # Skipped when the spec sets its section to null: the graph for that spec leaves its wire out,
    # so the name it `provides` stays bound to the stage above it (tasks/core/graph.py).
    optional: bool = False
    # Runs datatrove pipelines: gets ctx.executor, and `executor.tasks` (sharding) is keyed.
    uses_executor: bool = False
    # Modules it starts by name (not imported), e.g. the torchrun worker: in its code digest.
    also_runs: tuple[str, ...] = ()
    # A spec field that may hold a run reference ({run: NAME}, data_specs/schema.py: RunRef): resolved
    # when the run is planned (tasks/core/references.py), keyed as resolved[field], given as ctx.start.
    start_from: str | None = None
    # Roles it does not read when it starts from another run's artifact (they leave its key): the
    # tokenizer copies that model's tokenizer instead of training one on the corpus.
    unread_when_started: tuple[str, ...] = ()
    # Import names of libraries its code does not import but whose version changes its output
    # (used through another library: spaCy and xxhash inside datatrove's MinHash). The ones it
    # imports are found from its code.
    libs: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """Where its code lives (entered into the fingerprint with everything it imports)."""
        return self.build.__module__

    def roles(self) -> dict[str, type[Artifact]]:
        """{role: handle type} of what it reads, from its inputs dataclass."""
        if self.inputs is None:
            return {}
        hints = typing.get_type_hints(self.inputs)
        return {f.name: _handle(hints[f.name]) for f in dataclasses.fields(self.inputs)}

    def key_fields(self, spec: Any = None) -> tuple[str, ...]:
        """Dotted spec fields outside its section that its key holds (for `spec`, with those of
        `fields_when` it turns on)."""
        extra = self.fields_when(spec) if self.fields_when is not None and spec is not None else ()
        return self.fields + tuple(extra) + (("executor.tasks",) if self.uses_executor else ())


def _handle(hint: Any) -> type[Artifact]:
    """The handle type of a role: `Documents | None` (a role left unread in some runs) is Documents."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)]
    return kinds[0] if kinds else hint
