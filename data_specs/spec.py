"""The typed run spec: one YAML file per run, validated here at the flow boundary.

Config flows one way: YAML -> `RunSpec` (frozen) -> stages. Unknown fields and wrong types
are errors that name the field and the spec file. Relative paths are relative to the spec
file. Fields that do not change a stage's output (executor, worker counts, store location)
are marked with `unkeyed()` and left out of the cache key. Source paths are unkeyed too: sources enter a
key through the content (and relative names) of the files they match, not the glob text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tasks.errors import InputError

# A spec is a few kilobytes; anything far larger is a mistake (or a YAML alias bomb).
MAX_SPEC_BYTES = 1_000_000


def unkeyed(default: Any = ..., **kwargs: Any) -> Any:
    """A field that does not change any output, so it stays out of the cache key."""
    return Field(default, json_schema_extra={"cache_key": False}, **kwargs)


class Section(BaseModel):
    """Base of every spec section: frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def cache_view(self) -> dict[str, Any]:
        """The fields that change the output, as plain JSON data (unkeyed fields dropped)."""
        view: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("cache_key") is False:
                continue
            view[name] = _cache_value(getattr(self, name))
        return view


def _cache_value(value: Any) -> Any:
    """Recursively turns a field value into canonical JSON data for the cache key."""
    if isinstance(value, Section):
        return value.cache_view()
    if isinstance(value, (list, tuple)):
        return [_cache_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _cache_value(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- corpus sources


class JsonlSource(Section):
    """JSON Lines files: one JSON object per line."""

    kind: Literal["jsonl"]
    path: str = unkeyed(description="Glob of .jsonl files (plain or .gz), relative to the spec file.")
    text_field: str = Field("text", description="Key of the document text in each object.")
    id_field: str | None = Field(None, description="Key of the document id; a content hash when absent.")


class ParquetSource(Section):
    """Parquet files, one row per document."""

    kind: Literal["parquet"]
    path: str = unkeyed(description="Glob of .parquet files, relative to the spec file.")
    text_field: str = Field("text", description="Column holding the document text.")
    id_field: str | None = Field(None, description="Column holding the document id; a content hash when absent.")


class TextSource(Section):
    """A folder of text files, one document per file."""

    kind: Literal["text"]
    path: str = unkeyed(description="Folder (or glob) of text files, relative to the spec file.")
    extensions: tuple[str, ...] = Field((".txt", ".md"), description="File name endings read from the folder.")


class HFDatasetSource(Section):
    """A folder written by `datasets.Dataset.save_to_disk` (never a hub download)."""

    kind: Literal["hf_dataset"]
    path: str = unkeyed(description="Folder written by save_to_disk, relative to the spec file.")
    split: str | None = Field(None, description="Split to read when the folder holds a DatasetDict.")
    text_field: str = Field("text", description="Column holding the document text.")
    id_field: str | None = Field(None, description="Column holding the document id; a content hash when absent.")


class PythonDocsSource(Section):
    """The built-in corpus: the reference documentation shipped with the running CPython."""

    kind: Literal["python_docs"]


Source = Annotated[
    JsonlSource | ParquetSource | TextSource | HFDatasetSource | PythonDocsSource,
    Field(discriminator="kind"),
]


class Filters(Section):
    """Length bounds applied after normalisation; rejected documents are kept with their reason."""

    min_chars: int = Field(50, ge=0, description="Shortest document kept, in characters.")
    max_chars: int = Field(200_000, ge=1, description="Longest document kept, in characters.")

    @model_validator(mode="after")
    def _ordered(self) -> Filters:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class CorpusSpec(Section):
    """Where the documents come from and which ones are kept."""

    sources: tuple[Source, ...] = Field(min_length=1, description="One or more document sources, read in order.")
    filters: Filters = Filters()


# ---------------------------------------------------------------- dedup


class NearDedupSpec(Section):
    """MinHash near-duplicate removal (datatrove's four-step MinHash pipeline)."""

    threshold: float = Field(
        0.8, gt=0.0, lt=1.0,
        description="Jaccard similarity of word n-gram sets at which a pair counts as duplicate "
        "(the midpoint of the LSH S-curve; bands and rows are chosen to match it).",
    )
    ngrams: int = Field(5, ge=1, le=32, description="Shingle size, in words.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")


class DedupSpec(Section):
    """Exact and near duplicate removal."""

    exact: bool = Field(True, description="Remove documents whose normalised text is identical.")
    near: NearDedupSpec | None = Field(NearDedupSpec(), description="MinHash near-dedup; null to skip.")
    language: str = Field("eng", description="ISO 639-3 code of the language datatrove's word tokenizer "
                          "splits shingles for (datatrove.utils.typeshelper.Languages).")


# ---------------------------------------------------------------- execution


class ExecutorSpec(Section):
    """How datatrove runs the data stages. Only `tasks` changes the output (how files are sharded)."""

    kind: Literal["local", "slurm", "ray"] = unkeyed("local", description="datatrove executor.")
    tasks: int = Field(1, ge=1, description="Shards the data stages split their input into.")
    workers: int = unkeyed(1, ge=1, description="Shards processed at once on this machine (local executor).")


class RunSpec(Section):
    """A whole run: its name, its corpus and the settings of every stage."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name.")
    store: str | None = unkeyed(None, description="Artifact store folder or fsspec URL; default ./.gristmill.")
    corpus: CorpusSpec
    dedup: DedupSpec = DedupSpec()
    executor: ExecutorSpec = ExecutorSpec()

    _spec_path: Path = PrivateAttr(default=Path("spec.yaml"))

    @property
    def spec_path(self) -> Path:
        """Absolute path of the YAML file this spec was read from."""
        return self._spec_path

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the spec are relative to."""
        return self._spec_path.parent

    def resolve(self, path: str) -> Path:
        """A spec path made absolute (relative paths are relative to the spec file)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def load_spec(path: str | Path) -> RunSpec:
    """Reads and validates a spec file; every problem is an `InputError` naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: spec file not found")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise InputError(f"{path}: spec file is {size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a spec is a YAML mapping with at least `name` and `corpus`")
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as e:
        raise InputError(f"{path}: invalid spec\n{format_validation_error(e)}") from None
    spec._spec_path = path.resolve()
    return spec


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: the dotted field path, then pydantic's message."""
    lines = []
    for item in error.errors():
        # Discriminated unions add the tag (e.g. "jsonl") to the location; it names no field.
        loc = ".".join(str(p) for p in item["loc"])
        lines.append(f"  {loc or '<root>'}: {item['msg']}")
    return "\n".join(lines)
