"""Reading a spec file: a hardened YAML loader, then validation into a `RunSpec`.

Every problem is an `InputError` naming the file and the field: a file too large, not UTF-8,
YAML with Python tags, an alias bomb, a lone surrogate, `trust_remote_code` set in a file,
unknown fields and wrong types (pydantic's errors, one line each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from data_specs.errors import InputError
from data_specs.schema import REMOTE_CODE_FIELD, RunSpec

# A spec is a few kilobytes; anything far larger is a mistake (or a YAML alias bomb).
MAX_SPEC_BYTES = 1_000_000
# Values a spec holds once YAML aliases are expanded: a real one has a few hundred. A
# "billion laughs" (aliases of aliases) is refused before anything walks the expanded tree.
MAX_SPEC_VALUES = 100_000
# Shown per invalid spec; the rest are counted (a generated spec can have thousands).
MAX_ERRORS_SHOWN = 20


def _merge(base: dict, top: dict) -> dict:
    """`top` laid over `base`, key by key (nested mappings merged, everything else replaced)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_spec(path: str | Path, override: dict[str, Any] | None = None) -> RunSpec:
    """Reads and validates a spec file (with `override` fields laid over it); every problem is an
    `InputError` naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: spec file not found" if not path.exists() else f"{path}: not a file")
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise InputError(f"{path}: spec file is {size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise InputError(f"{path}: spec file cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raw = parse_yaml(text, path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a spec is a YAML mapping with at least `name` and `corpus`")
    if override:
        raw = _merge(raw, override)
    _check_values(raw, path)
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as e:
        raise InputError(f"{path}: invalid spec\n{format_validation_error(e)}") from None
    spec._spec_path = path.resolve()
    return spec


def parse_yaml(text: str, path: Path) -> Any:
    """YAML's safe subset (no Python tags), refusing documents that aliases would expand past
    MAX_SPEC_VALUES values or that nest deeper than Python's stack."""
    values, data = 0, None
    try:
        loader = yaml.SafeLoader(text)  # checks for unprintable characters (a NUL byte) at once
        try:
            node = loader.get_single_node()
            values = 0 if node is None else _expanded_size(node)
            if node is not None and values <= MAX_SPEC_VALUES:
                data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML: {e}") from None
    except RecursionError:
        raise InputError(f"{path}: invalid YAML: nested too deeply") from None
    except Exception as e:  # PyYAML's constructors leak ValueError, KeyError, AttributeError on bad
        # scalars: a date like 2001-13-45, an int past 4300 digits, `!!bool x`, `!!timestamp x`
        raise InputError(f"{path}: invalid YAML: {type(e).__name__}: {e}") from None
    if values > MAX_SPEC_VALUES:
        raise InputError(f"{path}: YAML aliases expand this spec to more than {MAX_SPEC_VALUES} values "
                         f"(an alias bomb?); write the values out")
    return data


def _expanded_size(root: yaml.Node) -> int:
    """How many values the document holds with every alias expanded (a "billion laughs" holds
    billions in a few hundred bytes), counted over shared nodes without expanding them; it
    stops past MAX_SPEC_VALUES. An alias inside its own anchor is an InputError-worthy cycle."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()  # the nodes whose children are being counted: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = [n for item in node.value for n in (item if isinstance(item, tuple) else (item,))] \
            if isinstance(node, yaml.CollectionNode) else []
        if done:
            entered.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(k)] for k in kids), MAX_SPEC_VALUES + 1)
            continue
        if id(node) in sizes:
            continue
        if id(node) in entered:
            return MAX_SPEC_VALUES + 1  # an alias of an enclosing anchor: it never ends
        entered.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids)
    return sizes[id(root)]


def _check_values(raw: dict[str, Any], path: Path) -> None:
    """Refuses what pydantic would not name well: `trust_remote_code` anywhere (only the CLI
    flag may set it), and text with a lone surrogate (YAML's "\\ud800"; it has no UTF-8 form)."""
    todo: list[tuple[str, Any]] = [("", raw)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                field = f"{where}.{key}" if where else str(key)
                if key == REMOTE_CODE_FIELD:
                    raise InputError(f"{path}: {field}: a spec cannot allow remote code; pass --trust-remote-code "
                                     "to `gristmill run` (or `gristmill eval`) to let model folders run their own "
                                     "Python code")
                todo += [(field, key), (field, item)]
        elif isinstance(value, list):
            todo += [(f"{where}.{i}", item) for i, item in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{path}: {where or '<root>'}: not valid Unicode (a lone surrogate)") from None


def format_validation_error(error: ValidationError) -> str:
    """One line per problem (the first MAX_ERRORS_SHOWN): the dotted field path, then pydantic's message."""
    lines = []
    items = error.errors()
    for item in items[:MAX_ERRORS_SHOWN]:
        # Discriminated unions add the tag (e.g. "jsonl") to the location; it names no field.
        loc = ".".join(str(p) for p in item["loc"])
        lines.append(f"  {loc or '<root>'}: {item['msg']}")
    if len(items) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(items) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)
