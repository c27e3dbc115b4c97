"""The ingest filter: drops unreadable records, documents outside the length bounds and those
outside the sample (`corpus.filters.sample`), each with a reason, into the rejects; counts read
and kept documents per source.

A module of its own, imported when ingest builds (tasks/ingest.py): datatrove's filter base class
is slow to import (its package imports every filter, and datatrove.io brings in huggingface_hub),
and planning a run imports the ingest module without running it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import JsonlWriter

from data_specs.schema import Filters
from tasks.train.lm_data import hash_unit

if TYPE_CHECKING:
    from datatrove.data import Document


class IngestFilter(BaseFilter):
    """Drops unreadable records and documents outside the length bounds, with a reason each;
    also counts read and kept documents per source."""

    name = "gristmill ingest filter"

    def __init__(self, filters: Filters, rejects: Path):
        super().__init__(exclusion_writer=JsonlWriter(str(rejects), output_filename="${rank}.jsonl.gz"))
        self.filters = filters

    def _verdict(self, doc: Document) -> bool | tuple[bool, str]:
        if "reject" in doc.metadata:
            return False, doc.metadata.pop("reject")
        if not doc.text:
            return False, "empty_text"
        if len(doc.text) < self.filters.min_chars:
            return False, "too_short"
        if len(doc.text) > self.filters.max_chars:
            return False, "too_long"
        if self.filters.sample < 1 and hash_unit(self.filters.sample_seed, doc.id) >= self.filters.sample:
            return False, "not_sampled"
        return True

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        source = doc.metadata.get("source", "?").split(":", 1)[0]
        verdict = self._verdict(doc)
        self.stat_update(f"read_source_{source}")
        if verdict is True:
            self.stat_update(f"kept_source_{source}")
            self.stat_update(f"chars_source_{source}", value=len(doc.text))
        return verdict
