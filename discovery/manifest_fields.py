"""Field access with error collection, shared by the per-kind manifest parsers.

A ``DocContext`` knows which document it reads (file, line, Kind/namespace/name) and collects
every problem as a ``ConfigError`` instead of stopping at the first, so one load reports all
of them: ``file:line: Kind/namespace/name: field.path: message``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable

from . import objects as o
from .manifest_yaml import line_of

__all__ = ["ConfigError", "DocContext", "type_name", "frozen_map"]


@dataclass(frozen=True, slots=True)
class ConfigError:
    file: str
    line: int
    ref: str          # Kind/namespace/name, or "" when the document has no usable identity
    field: str        # dotted field path, or ""
    message: str

    def __str__(self) -> str:
        parts = [f"{self.file}:{self.line}"]
        if self.ref:
            parts.append(self.ref)
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


class DocContext:
    """Parsing context for one document: knows where it is and collects errors."""

    __slots__ = ("file", "line", "ref", "errors")

    def __init__(self, file: str, line: int, ref: str):
        self.file, self.line, self.ref = file, line, ref
        self.errors: list[ConfigError] = []

    def error(self, path: str, message: str, container: Any = None, key: Any = None) -> None:
        line = line_of(container, key) if container is not None else None
        self.errors.append(ConfigError(self.file, line or self.line, self.ref, path, message))

    def map(self, parent: Any, key: str, path: str, *, required: bool = False) -> dict | None:
        value = parent.get(key) if isinstance(parent, dict) else None
        if value is None:
            if required:
                self.error(path, "required field is missing", parent)
            return None
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, not {type_name(value)}", parent, key)
            return None
        return value

    def list(self, parent: Any, key: str, path: str) -> list:
        value = parent.get(key) if isinstance(parent, dict) else None
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, not {type_name(value)}", parent, key)
            return []
        return value

    def str(self, parent: Any, key: str, path: str, *, required: bool = False,
            default: str | None = None, choices: Iterable[str] | None = None) -> str | None:
        value = parent.get(key) if isinstance(parent, dict) else None
        if value is None:
            if required:
                self.error(path, "required field is missing", parent)
            return default
        if not isinstance(value, str):
            self.error(path, f"must be a string, not {type_name(value)}", parent, key)
            return default
        if choices is not None and value not in choices:
            self.error(path, f"unsupported value {value!r}: must be one of {', '.join(choices)}",
                       parent, key)
            return default
        return value

    def int(self, parent: Any, key: str, path: str, *, required: bool = False,
            default: int | None = None, lo: int | None = None, hi: int | None = None) -> int | None:
        value = parent.get(key) if isinstance(parent, dict) else None
        if value is None:
            if required:
                self.error(path, "required field is missing", parent)
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, not {type_name(value)}", parent, key)
            return default
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.error(path, f"{value} is outside {lo}-{hi}", parent, key)
            return default
        return value

    def bool(self, parent: Any, key: str, path: str, default: bool = False) -> bool:
        value = parent.get(key) if isinstance(parent, dict) else None
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, not {type_name(value)}", parent, key)
            return default
        return value

    def string_map(self, parent: Any, key: str, path: str) -> dict[str, str] | None:
        value = self.map(parent, key, path)
        if value is None:
            return None
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)) or isinstance(v, bool):
                if not isinstance(k, str) or not isinstance(v, str):
                    self.error(f"{path}.{k}", f"must be a string (quote it), not {type_name(v)}",
                               value, k)
                    continue
            out[k] = str(v)
        return out


def type_name(v: Any) -> str:
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    return type(v).__name__


def frozen_map(m: dict[str, str] | None):
    return MappingProxyType(dict(m)) if m else o.EMPTY_MAP
