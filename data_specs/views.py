"""What a stage sees of its spec section, split by what the cache key holds.

Every field of a section is one of three kinds, declared where the field is (data_specs/schema.py):

    keyed    (a plain `Field`)   its value enters the stage's cache key
    content  (`content_keyed()`) a path; the *content* of what it names enters the key, and the
                                 stage reads it as an absolute path (relative to the spec file);
                                 `pretrain.from` may instead hold a run reference, which names no
                                 file: what it resolves to is keyed (tasks/core/references.py)
    runtime  (`runtime()`)       provably output-neutral (checkpoint cadence, worker counts,
                                 timeouts); left out of the key

A stage's `build` gets its section as a `KeyedView`: reading a runtime field through it raises
`UnkeyedFieldError`, so a stage cannot depend on a value its fingerprint does not hold. The
runtime fields reach it separately, through `RuntimeView` (ctx.runtime), where every read says
"this does not change the output".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

KEYED, CONTENT, RUNTIME = "keyed", "content", "runtime"


class UnkeyedFieldError(AttributeError):
    """A stage read a field that is not in its cache key (a bug in the stage, not bad input)."""


def field_kind(info: FieldInfo) -> str:
    """keyed, content or runtime, from the marker the schema put on the field."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    mark = extra.get("cache_key", True)
    if mark is False:
        return RUNTIME
    return CONTENT if mark == CONTENT else KEYED


def content_kind(info: FieldInfo) -> str:
    """What a content field names: "file", "folder" or "glob"."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("content", "folder"))


def content_fields(section: BaseModel, where: str) -> Iterator[tuple[str, str, str]]:
    """(dotted field, path as written, file|folder|glob) of every set content field, recursively."""
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        dotted = f"{where}.{info.alias or name}" if where else (info.alias or name)
        if field_kind(info) == CONTENT:
            if value and not isinstance(value, BaseModel):  # a run reference names no file (keyed as resolved)
                yield dotted, str(value), content_kind(info)
        elif isinstance(value, BaseModel):
            yield from content_fields(value, dotted)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from content_fields(item, f"{dotted}.{i}")


class _View:
    """Shared plumbing of the two views: the section, its dotted name, the spec's folder."""

    __slots__ = ("_section", "_where", "_base")

    def __init__(self, section: BaseModel, where: str, base: Path):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_base", base)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._where} is read-only")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where}: {self._section!r})"

    def _wrap(self, value: Any, where: str) -> Any:
        if isinstance(value, BaseModel):
            return type(self)(value, where, self._base)
        if isinstance(value, tuple):
            return tuple(self._wrap(v, f"{where}.{i}") for i, v in enumerate(value))
        return value


class KeyedView(_View):
    """A spec section as `build` sees it: keyed fields as they are, content fields as absolute
    paths, and no runtime field (reading one raises UnkeyedFieldError). Methods of the section
    (e.g. `ModelSpec.dims()`) work as usual."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        fields = type(self._section).model_fields
        if name not in fields:
            return getattr(self._section, name)  # a method or property of the section
        where = f"{self._where}.{fields[name].alias or name}"
        kind = field_kind(fields[name])
        if kind == RUNTIME:
            raise UnkeyedFieldError(
                f"{where} is not in this stage's cache key (a runtime setting), so its build must not depend "
                f"on it: read it from ctx.runtime if it provably does not change the output, else key it")
        value = getattr(self._section, name)
        if kind == CONTENT and not isinstance(value, BaseModel):  # a run reference is read as a section
            return resolve_path(value, self._base) if value else value
        return self._wrap(value, where)

    def unwrap(self) -> BaseModel:
        """The section itself (to hand a whole section to another process, never to read from)."""
        return self._section


class RuntimeView(_View):
    """The runtime fields of a section (and of its sub-sections): settings that do not change the
    output, such as checkpoint cadence or request concurrency. Keyed fields are not here."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        fields = type(self._section).model_fields
        if name not in fields:
            raise AttributeError(f"{self._where} has no field {name!r}")
        value = getattr(self._section, name)
        if isinstance(value, BaseModel) or (isinstance(value, tuple) and value and isinstance(value[0], BaseModel)):
            return self._wrap(value, f"{self._where}.{name}")
        if field_kind(fields[name]) != RUNTIME:
            raise UnkeyedFieldError(f"{self._where}.{name} is keyed: read it from the stage's cfg")
        return value


def resolve_path(value: str | Path, base: Path) -> Path:
    """A spec path made absolute: relative paths are relative to the spec file's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
