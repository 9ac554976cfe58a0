"""The configuration file as written: YAML with line numbers, duplicated keys, and errors told as sentences.

pydantic validates the values; this module keeps where each value came from, so that an error
reads ``relayd.yaml: communes[1].insee (line 12): ...``: the file, a 1-based path as a person
counts, and the line; in relayd's words rather than pydantic's.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

#: a key path as pydantic gives it: mapping keys, and 0-based list indices
Loc = tuple[str | int, ...]


@dataclass
class Source:
    """A parsed YAML file: its data, the line of every key path, and the keys written twice."""

    path: Path
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    duplicates: list[tuple[Loc, int, int]] = field(default_factory=list)
    scalars: list[tuple[Loc, str]] = field(default_factory=list)

    def line(self, loc: Loc) -> int | None:
        """The 1-based line of ``loc``, or of the nearest enclosing key that is in the file."""
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None

    def where(self, loc: Loc) -> str:
        """``file: path (line N)``, the start of an error about ``loc``."""
        line = self.line(loc)
        text = f"{self.path}: {dotted(loc)}" if loc else str(self.path)
        return f"{text} (line {line})" if line is not None and loc else text


def dotted(loc: Loc) -> str:
    """``("communes", 0, "insee")`` as ``communes[1].insee``: list positions count from 1."""
    out = ""
    for part in loc:
        out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class SourceError(Exception):
    """The file cannot be read or is not YAML; the message names the file and the line."""


def read_source(path: Path) -> Source:
    """Parse ``path``, keeping the line of every key and noting any key written twice in one mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SourceError(f"{path}: is not UTF-8 text") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise SourceError(f"{where}: this is not valid YAML ({what})") from None
    except yaml.YAMLError as exc:
        raise SourceError(f"{path}: this is not valid YAML ({exc})") from None
    finally:
        loader.dispose()
    source = Source(path, data)
    if node is not None:
        _walk(node, (), source)
    return source


def _walk(node: yaml.Node, loc: Loc, source: Source) -> None:
    source.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in seen:
                source.duplicates.append(((*loc, key), seen[key], line))
            seen[key] = line
            source.lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), source)
    elif isinstance(node, yaml.ScalarNode):
        source.scalars.append((loc, str(node.value)))


# -- pydantic's errors, as sentences ------------------------------------------------------------------

_HINTS = {
    "insee": "an INSEE code is 5 characters, digits (Corsica: 2A… or 2B…); quote it so that YAML keeps the zeros",
    "username": "a user name is lower-case letters, digits, '_', '.' or '-', starting with a letter or '_'",
    "file_mode": 'a mode is three octal digits in quotes, e.g. "0640"',
}


def explain(err: dict[str, Any], model: type[BaseModel]) -> str:
    """One pydantic error as a sentence a person can act on (never echoing the value: it may be a secret)."""
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    name = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        known = fields_at(model, loc[:-1])
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; the keys here are: {', '.join(known)}" if known else "")
        return f"{name!r} is not a setting relayd knows{hint}"
    if kind == "missing":
        return "this setting is required and missing"
    if kind == "string_pattern_mismatch":
        return "this value does not have the expected form" + (f": {_HINTS[name]}" if name in _HINTS else "")
    if kind == "literal_error":
        return f"this must be one of {ctx.get('expected', '')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than",
                 "less_than_equal": "at most"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"this must be {words} {bound}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "this must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "this must be a number"
    if kind in ("bool_parsing", "bool_type"):
        return "this must be true or false"
    if kind in ("string_type",):
        return "this must be text (put it in quotes)"
    if kind in ("list_type", "tuple_type"):
        return "this must be a list (lines starting with '- ', or [a, b])"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "this must be a mapping of settings (key: value lines)"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"this needs at least {n} entr{'y' if n == 1 else 'ies'}"
    if kind in ("ip_v4_network", "ip_v6_network", "ip_any_network") or "network" in kind:
        return "this must be an address or a network, e.g. 192.0.2.10 or 203.0.113.0/24"
    message = str(err["msg"]).removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


_LEADING_PATH = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): ")


def leading_loc(message: str) -> Loc | None:
    """The key path that a cross-check names at the start of its message (``communes[2].returns: ...``)."""
    match = _LEADING_PATH.match(message)
    if match is None:
        return None
    loc: list[str | int] = []
    for part in re.findall(r"([a-z_]+)|\[(\d+)\]", match[1]):
        loc.append(part[0] if part[0] else int(part[1]) - 1)
    return tuple(loc)


def fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The setting names a mapping at ``loc`` may hold, following the models' annotations."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` as ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
