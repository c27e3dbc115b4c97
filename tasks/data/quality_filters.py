"""The quality stage's datatrove blocks, made from its spec section: datatrove's own filters with
the parameters the spec names, plus three small blocks it lacks.

- `KeepText` runs a filter for its verdict only (C4's filter rewrites the text it keeps);
- `ReasonedRegex` is datatrove's RegexFilter with a reason, so its rejects say why;
- `CountingPII` is datatrove's PIIFormatter counting the replacements it makes, by kind;
- `Tally` counts documents and characters per source and a length histogram as they pass.

Everything counted goes through datatrove's stats, so a sharded or resumed run merges the
counts of every rank (tasks/data/engine.py: merged_stats).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    RegexFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.writers.disk_base import DiskWriter

from data_specs.schema import (
    C4QualitySpec,
    FineWebQualitySpec,
    GopherQualitySpec,
    GopherRepetitionSpec,
    PIISpec,
    RegexFilterSpec,
    Section,
)

# Upper edges of the length histogram's bins, in characters (the last bin is open-ended): roughly
# logarithmic, so a one-line stub and a 100k-character reference page both fall in a bin of their own.
LENGTH_EDGES = (100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000)


class KeepText(BaseFilter):
    """Another filter's verdict, with the document's text left as it was. C4's filter rewrites
    every document it keeps (lines without terminal punctuation dropped, each line stripped),
    which would strip code blocks and their indentation from technical docs."""

    def __init__(self, inner: BaseFilter, exclusion_writer: DiskWriter | None = None):
        self.name = inner.name  # before the base class names its stats after it
        super().__init__(exclusion_writer)
        self.inner = inner

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        verdict = self.inner.filter(doc)
        doc.text = text
        return verdict


class ReasonedRegex(RegexFilter):
    """datatrove's RegexFilter, removing with `reason` (its own removes without one)."""

    def __init__(self, pattern: str, reason: str, exclusion_writer: DiskWriter | None = None):
        super().__init__(pattern, exclusion_writer)
        self.reason = reason

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return True if super().filter(doc) else (False, self.reason)


class CountingPII(PIIFormatter):
    """datatrove's PIIFormatter; each replacement it makes is counted as pii_emails or pii_ips.
    The count rides on the replacers' validators, which datatrove calls once per match before
    replacing it, so the text is scanned once, as without counting."""

    def __init__(self, spec: PIISpec):
        super().__init__(remove_emails=spec.emails, remove_ips=spec.ips, only_remove_public_ips=spec.public_ips_only)
        self._validators: dict[str, Callable[[str], bool] | None] = {
            "emails": self.emails_replacer.validator, "ips": self.ip_replacer.validator}
        # Bound methods, not closures: the executor deep-copies each rank's pipeline, and a closure
        # would keep counting into the original step, whose stats are never saved.
        self.emails_replacer.validator = functools.partial(self._counted, "emails")
        self.ip_replacer.validator = functools.partial(self._counted, "ips")

    def _counted(self, kind: str, match: str) -> bool:
        validator = self._validators[kind]
        replaced = validator is None or validator(match)
        if replaced:
            self.stat_update(f"pii_{kind}")
        return replaced


def source_of(doc: Document) -> str:
    """The corpus source a document came from: the index ingest put before the colon."""
    return str(doc.metadata.get("source", "?")).split(":", 1)[0]


def length_bin(chars: int) -> int:
    """The histogram bin of a document of `chars` characters (len(LENGTH_EDGES) is the open one)."""
    return next((i for i, edge in enumerate(LENGTH_EDGES) if chars < edge), len(LENGTH_EDGES))


class Tally(PipelineStep):
    """Pass-through counter: documents and characters, per source and in total, and the length
    histogram, of what passes this point of the pipeline."""

    name = "gristmill tally"
    type = "📊 - STATS"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            chars, source = len(doc.text), source_of(doc)
            self.stat_update("documents", f"documents_source_{source}", f"length_bin_{length_bin(chars)}")
            self.stat_update("chars", f"chars_source_{source}", value=chars)
            yield doc


def _fields(spec: Section) -> dict[str, Any]:
    """A filter spec's parameters under datatrove's names (the spec uses them as they are)."""
    return {k: v for k, v in spec.model_dump().items() if k != "name"}


def make_filter(spec: Section, language: str, exclusion_writer: DiskWriter) -> BaseFilter:
    """The datatrove filter a spec entry names, writing what it removes with `exclusion_writer`."""
    kw = _fields(spec)
    if isinstance(spec, GopherRepetitionSpec):
        return GopherRepetitionFilter(**kw, exclusion_writer=exclusion_writer, language=language)
    if isinstance(spec, GopherQualitySpec):
        kw["stop_words"] = list(kw["stop_words"]) if kw["stop_words"] is not None else None
        return GopherQualityFilter(**kw, exclusion_writer=exclusion_writer, language=language)
    if isinstance(spec, C4QualitySpec):
        return KeepText(C4QualityFilter(**kw, language=language), exclusion_writer)
    if isinstance(spec, FineWebQualitySpec):
        return FineWebQualityFilter(**kw, exclusion_writer=exclusion_writer, language=language)
    if isinstance(spec, RegexFilterSpec):
        return ReasonedRegex(spec.pattern, spec.reason, exclusion_writer)
    raise TypeError(f"no datatrove filter for {type(spec).__name__}")


def bare_filter(spec: Section, language: str, c4_rewrites: bool = False) -> BaseFilter:
    """The same datatrove filter with the same parameters and nothing around it (no exclusion
    writer, no reason for a regex): what bench/quality.py runs bare. C4 gives its verdict only, as
    in the stage, unless `c4_rewrites` (datatrove's own behaviour: it shortens what it keeps)."""
    if isinstance(spec, C4QualitySpec) and c4_rewrites:
        return C4QualityFilter(**_fields(spec), language=language)
    if isinstance(spec, RegexFilterSpec):
        return RegexFilter(spec.pattern)
    return make_filter(spec, language, None)
