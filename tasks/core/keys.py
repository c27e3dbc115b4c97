"""A stage's cache key, derived from exactly what the stage is given.

The spec part is its section's keyed fields plus the other fields it declared; the inputs part
is the content of every file its content fields name; the resolved part is what its resolver
fixes for the device it will run on, and the artifact a run reference resolved to when the stage
starts from one (tasks/core/references.py). `stage_view` hands `build` the same things, so a
build cannot read a value its key does not hold (data_specs/views.py). `plan_keys` keys a whole
graph in order, each stage from its upstream's fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from data_specs.errors import InputError
from data_specs.schema import RunSpec, cache_value
from data_specs.views import (
    CONTENT,
    RUNTIME,
    KeyedView,
    RuntimeView,
    content_fields,
    content_kind,
    field_kind,
    resolve_path,
)
from tasks.core.fingerprint import code_closure, code_digest, digest_key, file_digest, lib_versions, tree_digest
from tasks.core.graph import Graph
from tasks.core.stage import Stage, Where

# Device files a GPU driver creates (NVIDIA's, and AMD's for ROCm builds of torch, which answer as
# "cuda" too); without any, torch cannot see a GPU and planning need not import it (~3 s on 2 cores).
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
CPUINFO = "/proc/cpuinfo"


@cache
def native_bf16(device: str) -> bool:
    """Whether this machine's `device` computes bf16 in hardware: a CUDA GPU with bf16 (Ampere on),
    or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated and slower than fp32.
    On the demo's 2-core AVX512-BF16 CPU, bf16 autocast is 1.3x fp32 for pretraining (after
    tasks/core/allocator.py) and 1.8x for embedding. On Linux the CPU's answer comes from the
    kernel's flags (what torch.cpu asks cpuinfo for), so planning does not import torch."""
    if device != "cuda":
        flags = cpu_flags()
        if flags is not None:
            return bool(flags & {"avx512_bf16", "amx_tile"})
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_flags() -> set[str] | None:
    """The first CPU's feature flags from /proc/cpuinfo; None where there is no such file."""
    try:
        text = Path(CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


@cache
def local_device() -> str:
    """"cuda" when this machine has a CUDA device, else "cpu" (hardware does not change while a process
    runs). Without a GPU driver's device files there is none, and torch is not imported to say so."""
    if not any(Path(f).exists() for f in GPU_DEVICE_FILES):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Placement:
    """Which device each stage runs on, as far as its key is concerned. Default: this machine's.
    A run that sends GPU stages to a work pool sets `gpu` (that pool's device); the one-stage
    flow on the pool plans with the pipeline's placement, so both compute the same keys."""

    gpu: str | None = None  # the device of the GPU stages' work pool
    data: str | None = None  # the device of the machine running the other stages

    def device(self, stage: Stage) -> str:
        if not (stage.gpu or stage.resolve):
            return "cpu"  # runs no model: the device cannot change its output
        chosen = self.gpu if stage.gpu else self.data
        return chosen or local_device()


def _field(spec: RunSpec, dotted: str) -> tuple[Any, str, str]:
    """(value, kind, what a content field names) of a dotted spec field such as "eval.questions"."""
    obj: Any = spec
    kind, names = "keyed", ""
    for part in dotted.split("."):
        fields = type(obj).model_fields if isinstance(obj, BaseModel) else {}
        name = next((n for n, f in fields.items() if part in (n, f.alias)), None)  # "from" is field from_
        if name is None:
            raise KeyError(f"the spec has no field {dotted!r}")
        kind, names = field_kind(fields[name]), content_kind(fields[name])
        obj = getattr(obj, name)
    return obj, kind, names


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}, so `plan` names changed fields by their dotted path."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def stage_view(stage: Stage, spec: RunSpec) -> tuple[KeyedView | None, RuntimeView | None, dict[str, Any]]:
    """(cfg, ctx.runtime, ctx.fields) of a stage: its section as build sees it, the section's
    runtime settings, and the other spec fields it declared (content fields as absolute paths)."""
    section = getattr(spec, stage.section) if stage.section else None
    cfg = KeyedView(section, stage.section, spec.base_dir) if isinstance(section, BaseModel) else None
    runtime = RuntimeView(section, stage.section, spec.base_dir) if isinstance(section, BaseModel) else None
    fields = {}
    for dotted in stage.key_fields(spec):
        value, kind, _ = _field(spec, dotted)
        if kind == RUNTIME:
            raise KeyError(f"stage {stage.name!r} declares {dotted}, a runtime field: it cannot change the output")
        if kind == CONTENT and value and not isinstance(value, BaseModel):
            value = resolve_path(value, spec.base_dir)
        elif isinstance(value, BaseModel):  # a whole section (or a run reference): read through its keyed view too
            value = KeyedView(value, dotted, spec.base_dir)
        fields[dotted] = value
    return cfg, runtime, fields


def spec_part(stage: Stage, spec: RunSpec) -> dict[str, Any]:
    """The keyed spec values a stage's output depends on, by dotted field."""
    flat: dict[str, Any] = {}
    if stage.section:
        section = getattr(spec, stage.section)
        flat[stage.section] = section.cache_view() if isinstance(section, BaseModel) else cache_value(section)
    for dotted in stage.key_fields(spec):
        value, kind, _ = _field(spec, dotted)
        if kind != CONTENT:
            flat[dotted] = cache_value(value)
    return _nested(flat)


def content_digest(spec: RunSpec, dotted: str, value: str, kind: str) -> dict[str, str]:
    """{dotted: sha256 of what a content field names}; a missing or unreadable one is bad input naming the field."""
    return {dotted: _digest(spec, dotted, value, kind)}


def _digest(spec: RunSpec, dotted: str, value: str, kind: str) -> str:
    """sha256 of what a content field names; a missing or unreadable one is bad input naming the field."""
    path = resolve_path(value, spec.base_dir)
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        raise InputError(f"{spec.spec_path}: {dotted}: {path} is not a folder" if kind == "folder"
                         else f"{spec.spec_path}: {dotted}: {path} not found")
    try:
        return tree_digest(path) if kind == "folder" else file_digest(path)
    except OSError as e:  # a file in it we may not read, or one removed while it is hashed
        raise InputError(f"{spec.spec_path}: {dotted}: cannot read {e.filename or path} ({e.strerror or e})") from None


def content_inputs(stage: Stage, spec: RunSpec) -> dict[str, str]:
    """{dotted field: sha256 of its content} of every file or folder the stage's fields name, plus
    the stage's own external inputs (corpus globs). Paths never enter a key, contents do."""
    found: list[tuple[str, str, str]] = []
    if stage.section and isinstance(getattr(spec, stage.section), BaseModel):
        found += content_fields(getattr(spec, stage.section), stage.section)
    for dotted in stage.key_fields(spec):
        value, kind, names = _field(spec, dotted)
        if kind == CONTENT and value and not isinstance(value, BaseModel):  # a run reference names no file
            found.append((dotted, str(value), names))
    digests = {dotted: _digest(spec, dotted, value, kind) for dotted, value, kind in found if kind != "glob"}
    if stage.external_inputs:
        digests.update(stage.external_inputs(spec))
    return digests


def resolved_part(stage: Stage, spec: RunSpec, device: str) -> dict[str, Any]:
    """The values fixed where the stage runs that change its output."""
    if stage.resolve is None:
        return {"device": device} if stage.gpu else {}
    cfg, runtime, fields = stage_view(stage, spec)
    return stage.resolve(cfg, Where(device, runtime, getattr(spec.resources, stage.name, None), fields))


def stage_key(stage: Stage, spec: RunSpec, upstream: dict[str, str], device: str,
              started: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Everything that determines a stage's output (see tasks/core/fingerprint.py). `started`:
    {spec field: {stage, fingerprint}} of the artifact a run reference resolved to, when the stage
    starts from one (tasks/core/references.py); it is resolved at plan time, so it is keyed with
    the other resolved values. Without one the key is what it always was."""
    _, third_party = code_closure(stage.module, *stage.also_runs)
    return {
        "stage": stage.name,
        "code": code_digest(stage.module, *stage.also_runs),
        "libs": lib_versions(third_party | set(stage.libs)),
        "spec": spec_part(stage, spec),
        "resolved": {**resolved_part(stage, spec, device), **(started or {})},
        "inputs": content_inputs(stage, spec),
        "upstream": upstream,
    }


def spec_value(spec: RunSpec, dotted: str) -> Any:
    """The value of a dotted spec field such as "pretrain.from" (aliases allowed)."""
    return _field(spec, dotted)[0]


@dataclass(frozen=True)
class StageKey:
    """A stage's key in a plan, and what its lineage holds."""

    stage: Stage
    key: dict[str, Any]
    fingerprint: str
    ancestry: dict[str, str]  # {stage: fingerprint} of every stage it reads, directly or not
    # {spec field: (stage, fingerprint)} of the other runs' artifacts it or a stage it reads starts from.
    references: dict[str, tuple[str, str]]


def reads(graph: Graph, stage: Stage, started: bool) -> dict[str, str]:
    """{role: producing stage} of what a stage reads: the graph's wiring, less the roles it leaves
    unread when it starts from another run's artifact (`Stage.unread_when_started`)."""
    roles = graph.upstream(stage.name)
    return {r: p for r, p in roles.items() if not (started and r in stage.unread_when_started)}


def plan_keys(spec: RunSpec, graph: Graph, placement: Placement, starts: Mapping[str, tuple[str, str]],
              last: str | None = None) -> list[StageKey]:
    """The key of every stage of `graph` in order (up to `last`), each from its upstream's
    fingerprints. `starts`: {spec field: (stage, fingerprint)} the run references resolved to; a
    stage whose `start_from` field is among them is keyed by it. Call inside `fresh()`."""
    done: dict[str, StageKey] = {}
    for stage in graph:
        start = starts.get(stage.start_from) if stage.start_from else None
        producers = set(reads(graph, stage, start is not None).values())
        needs = [n for n in graph.names() if n in producers]
        started = {stage.start_from: {"stage": start[0], "fingerprint": start[1]}} if start else None
        key = stage_key(stage, spec, {n: done[n].fingerprint for n in needs}, placement.device(stage), started)
        above = {a for n in needs for a in (n, *done[n].ancestry)}
        references = {f: r for n in needs for f, r in done[n].references.items()}
        if start is not None:
            references[stage.start_from] = start
        done[stage.name] = StageKey(stage, key, digest_key(key), {a: done[a].fingerprint for a in graph.names()
                                                                   if a in above}, references)
        if stage.name == last:
            break
    return list(done.values())
