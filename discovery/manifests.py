"""Kubernetes manifests (multi-document YAML) -> typed objects, with errors that name the place.

``load_paths`` reads files and folders; ``load_text`` one text, re-parsing only the documents
that changed when given a cache; ``validate_set`` checks the objects of a load as a whole.
Every problem becomes a ``ConfigError`` carrying ``file:line: Kind/namespace/name: field.path:
message``; all problems of a load are collected and reported together instead of stopping at
the first one.

The work is split along its seams: ``manifest_yaml`` (YAML with line numbers),
``manifest_fields`` (field access with error collection), ``manifest_kinds`` (one document ->
one object, per kind). This module loads files and texts and checks sets; the public names of
all four are importable from here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import yaml

from . import ipfamilies
from . import objects as o
from .manifest_fields import ConfigError
from .manifest_kinds import (INGRESS_PATH_INVALID_SEQUENCES, INGRESS_PATH_INVALID_SUFFIXES, NODE_PORT_MAX,
                             NODE_PORT_MIN, SUPPORTED_KINDS, ingress_path_errors, parse_document)
from .manifest_yaml import LineLoader

__all__ = ["ConfigError", "LoadResult", "load_paths", "load_text", "load_file", "parse_document",
           "iter_manifest_files", "validate_set", "SUPPORTED_KINDS", "ingress_path_errors",
           "NODE_PORT_MIN", "NODE_PORT_MAX", "INGRESS_PATH_INVALID_SEQUENCES",
           "INGRESS_PATH_INVALID_SUFFIXES"]


@dataclass(slots=True)
class LoadResult:
    objects: list
    errors: list[ConfigError]
    skipped: list[str]           # "file:line: apiVersion/Kind" of documents of unknown kinds


# --------------------------------------------------------------------------------------------
# Files


def iter_manifest_files(paths: Iterable[str]) -> Iterator[str]:
    """Files named by PATHs: a file as given, a folder's *.yaml / *.yml / *.json (recursively,
    sorted, dot-files skipped — editors write swap files there)."""
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in files:
                    if not f.startswith(".") and f.endswith((".yaml", ".yml", ".json")):
                        found.append(os.path.join(root, f))
            yield from sorted(found)
        else:
            yield p


def _parse_stream(text: str, file: str, line_offset: int, result: LoadResult) -> None:
    try:
        loader = LineLoader(text)
        try:
            while loader.check_data():
                doc = loader.get_data()
                obj, errors, skipped = parse_document(doc, file, getattr(doc, "line", 1))
                result.errors.extend(errors)
                if skipped:
                    result.skipped.append(skipped)
                if obj is not None:
                    result.objects.append(obj)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        result.errors.append(ConfigError(file, line, "", "", f"invalid YAML: {problem}"))
    if line_offset:
        _shift_lines(result, line_offset)


def _shift_lines(result: LoadResult, offset: int) -> None:
    result.objects = [dataclasses.replace(obj, origin=obj.origin.shifted(offset))
                      for obj in result.objects]
    result.errors = [dataclasses.replace(e, line=e.line + offset) for e in result.errors]
    result.skipped = [_shift_skip(s, offset) for s in result.skipped]


def _shift_skip(text: str, offset: int) -> str:
    file, _, rest = text.rpartition(": ")
    f, _, line = file.rpartition(":")
    return f"{f}:{int(line) + offset}: {rest}" if line.isdigit() else text


_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.M)


def load_text(text: str, file: str = "<input>", cache: dict | None = None) -> LoadResult:
    """Parse a multi-document YAML text.

    With ``cache`` (a dict the caller keeps per file), each document is parsed only when its
    text changed since the last call: a one-pod edit in a file of a thousand pods re-parses
    one document. Documents are split on plain ``---`` lines; a text with YAML directives or
    content after ``---`` is parsed as one stream (line numbers are exact either way).
    """
    result = LoadResult([], [], [])
    if cache is None or "%YAML" in text or "%TAG" in text:
        _parse_stream(text, file, 0, result)
        return result
    pieces = []
    pos, line = 0, 0
    for m in _SEPARATOR.finditer(text):
        pieces.append((line, text[pos:m.start()]))
        line += text.count("\n", pos, m.end()) + 1
        pos = m.end() + 1
    pieces.append((line, text[pos:]))
    new_cache = {}
    for offset, piece in pieces:
        if not piece.strip() or piece.lstrip().startswith("..."):
            continue
        key = (offset, piece)
        part = cache.get(key)
        if part is None:
            part = LoadResult([], [], [])
            _parse_stream(piece, file, offset, part)
        new_cache[key] = part
        result.objects.extend(part.objects)
        result.errors.extend(part.errors)
        result.skipped.extend(part.skipped)
    cache.clear()
    cache.update(new_cache)
    return result


def load_file(path: str, cache: dict | None = None) -> LoadResult:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        return LoadResult([], [ConfigError(path, 0, "", "", f"cannot read: {exc}")], [])
    return load_text(text, path, cache)


def load_paths(paths: Iterable[str], service_cidr: str | None = None) -> LoadResult:
    """Load every manifest under PATHs and check the set as a whole (``validate_set``)."""
    result = LoadResult([], [], [])
    paths = list(paths)
    for p in paths:
        if not os.path.exists(p):
            result.errors.append(ConfigError(p, 0, "", "", "no such file or directory"))
    for f in iter_manifest_files(p for p in paths if os.path.exists(p)):
        r = load_file(f)
        result.objects.extend(r.objects)
        result.errors.extend(r.errors)
        result.skipped.extend(r.skipped)
    result.errors.extend(validate_set(result.objects, service_cidr))
    return result


def validate_set(objs: Iterable[Any], service_cidr: str | None = None) -> list[ConfigError]:
    """Checks across objects: duplicate identities, nodePorts and ClusterIPs, ClusterIPs
    outside the service range."""
    errors: list[ConfigError] = []
    seen: dict[tuple, Any] = {}
    node_ports: dict[tuple[int, str], Any] = {}
    cluster_ips: dict[str, Any] = {}
    nets = ipfamilies.parse_cidrs(service_cidr) if service_cidr else ()
    for obj in objs:
        if obj.key in seen:
            first = seen[obj.key]
            errors.append(ConfigError(obj.origin.file, obj.origin.line, obj.ref, "metadata.name",
                                      f"defined twice (first at {first.origin})"))
            continue
        seen[obj.key] = obj
        if isinstance(obj, o.Service):
            for i, p in enumerate(obj.ports):
                if p.node_port is not None:
                    k = (p.node_port, p.protocol)
                    if k in node_ports:
                        other = node_ports[k]
                        errors.append(ConfigError(obj.origin.file, obj.origin.line_of(f"spec.ports[{i}].nodePort"),
                                                  obj.ref, f"spec.ports[{i}].nodePort",
                                                  f"{p.node_port} is already allocated to {other.ref} ({other.origin})"))
                    else:
                        node_ports[k] = obj
            given = obj.cluster_ips or ((obj.cluster_ip,) if obj.cluster_ip else ())
            for i, ip in enumerate(given):
                if ip == "None":
                    continue
                path = "spec.clusterIP" if i == 0 else f"spec.clusterIPs[{i}]"
                line = obj.origin.line_of("spec.clusterIP")
                if ip in cluster_ips:
                    other = cluster_ips[ip]
                    errors.append(ConfigError(obj.origin.file, line, obj.ref, path,
                                              f"{ip} is already allocated to {other.ref} ({other.origin})"))
                else:
                    cluster_ips[ip] = obj
                addr = ipaddress.ip_address(ip)
                if nets and not any(addr in n for n in nets):
                    ranges = ",".join(str(n) for n in nets)
                    errors.append(ConfigError(obj.origin.file, line, obj.ref, path,
                                              f"{ip} is not in the service range {ranges}"))
    return errors
