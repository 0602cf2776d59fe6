"""Field checks shared by the Gateway API parsers (``discovery.gateway_api`` and
``discovery.gateway_route_kinds``): the API's string types as patterns, and small readers over
the document context of ``discovery.manifests`` that report a field's problem the way the API
server words it. Also the lines of list items (for ``Origin.fields``) and the GEP-2257
duration format."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

from . import gateway_objects as g
from . import objects as o

__all__ = [
    "LABEL", "SUBDOMAIN", "HOSTNAME_RX", "PRECISE_HOSTNAME_RX", "GROUP_RX", "KIND_RX", "NAMESPACE_RX", "SECTION_RX",
    "CONTROLLER_RX", "PROTOCOL_RX", "ADDRESS_TYPE_RX", "HEADER_NAME_RX", "PATH_CHARS_RX", "ANNOTATION_KEY_RX",
    "is_hostname", "parse_duration", "item_line", "Fields", "with_fields", "generation", "read_pattern", "read_hostname",
    "read_items", "read_mapping", "read_port", "read_object_ref",
]

# The API's string types (apis/v1/shared_types.go)

LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
SUBDOMAIN = rf"{LABEL}(\.{LABEL})*"
HOSTNAME_RX = re.compile(rf"(\*\.)?{SUBDOMAIN}\Z")
PRECISE_HOSTNAME_RX = re.compile(rf"{SUBDOMAIN}\Z")
GROUP_RX = re.compile(rf"({SUBDOMAIN})?\Z")
KIND_RX = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?\Z")
NAMESPACE_RX = re.compile(rf"{LABEL}\Z")
SECTION_RX = re.compile(rf"{SUBDOMAIN}\Z")
CONTROLLER_RX = re.compile(rf"{SUBDOMAIN}/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+\Z")
PROTOCOL_RX = re.compile(rf"([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?|{SUBDOMAIN}/[A-Za-z0-9]+)\Z")
ADDRESS_TYPE_RX = re.compile(rf"(Hostname|IPAddress|NamedAddress|{SUBDOMAIN}/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+)\Z")
HEADER_NAME_RX = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+\Z")
DURATION_RX = re.compile(r"([0-9]{1,5}(h|m|s|ms)){1,4}\Z")
DURATION_PART_RX = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
PATH_CHARS_RX = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+\Z")
ANNOTATION_KEY_RX = re.compile(rf"({SUBDOMAIN}/)?([A-Za-z0-9][-A-Za-z0-9_.]{{0,61}})?[A-Za-z0-9]\Z")



def is_hostname(value: str, precise: bool = False) -> bool:
    """The API's ``Hostname`` (``PreciseHostname``: no wildcard), IPs excluded."""
    if not value or len(value) > 253:
        return False
    if not (PRECISE_HOSTNAME_RX if precise else HOSTNAME_RX).match(value):
        return False
    try:
        ipaddress.ip_address(value)
        return False
    except ValueError:
        return True


def parse_duration(text: str) -> float | None:
    """A GEP-2257 duration (``1h30m``, ``500ms``, ``0s``) in seconds; None when malformed."""
    if not isinstance(text, str) or not DURATION_RX.match(text):
        return None
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * unit[u] for n, u in DURATION_PART_RX.findall(text))


# --------------------------------------------------------------------------------------------
# Small helpers over the document context


def item_line(container: Any, index: int) -> int | None:
    lines = getattr(container, "item_lines", None)
    return lines[index] if lines is not None and index < len(lines) else None


class Fields:
    """Collects (field path, line) pairs for the object's Origin."""
    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []

    def add(self, path: str, container: Any, index: int) -> None:
        line = item_line(container, index)
        if line is not None:
            self.items.append((path, line))


def with_fields(origin: o.Origin, fields: Fields) -> o.Origin:
    return dataclasses.replace(origin, fields=tuple(fields.items)) if fields.items else origin


def generation(doc: dict) -> int:
    meta = doc.get("metadata")
    gen = meta.get("generation") if isinstance(meta, dict) else None
    return gen if isinstance(gen, int) and not isinstance(gen, bool) else 0


def read_pattern(ctx, parent: dict, key: str, path: str, rx: re.Pattern, what: str, *, required: bool = False,
             default: str | None = None, lo: int = 1, hi: int = 253) -> str | None:
    value = ctx.str(parent, key, path, required=required, default=default)
    if value is None or (value == default and key not in parent):
        return value
    if not lo <= len(value) <= hi:
        ctx.error(path, f"{value!r} must be {lo}-{hi} characters long", parent, key)
        return None
    if not rx.match(value):
        ctx.error(path, f"{value!r} is not a valid {what}", parent, key)
        return None
    return value


def read_hostname(ctx, parent: dict, key: str, path: str, *, precise: bool = False, required: bool = False) -> str | None:
    value = ctx.str(parent, key, path, required=required)
    if value is None:
        return None
    if not is_hostname(value, precise):
        what = "precise hostname (no wildcard)" if precise else "hostname (a DNS name, optionally '*.' first)"
        ctx.error(path, f"{value!r} is not a valid {what}; IP addresses are not allowed", parent, key)
        return None
    return value


def read_items(ctx, parent: dict, key: str, path: str, *, lo: int = 0, hi: int, required: bool = False) -> list:
    raw = parent.get(key) if isinstance(parent, dict) else None
    if raw is None:
        if required or lo:
            ctx.error(path, "required field is missing", parent)
        return []
    items = ctx.list(parent, key, path)
    if not isinstance(raw, list):
        return []
    if len(items) < lo:
        ctx.error(path, f"must have at least {lo} item{'s' if lo > 1 else ''}", parent, key)
    if len(items) > hi:
        ctx.error(path, f"must have at most {hi} items", parent, key)
    return items


def read_mapping(ctx, items: list, i: int, path: str) -> dict | None:
    item = items[i]
    if not isinstance(item, dict):
        ctx.error(path, "must be a mapping", items, i)
        return None
    return item


def read_port(ctx, parent: dict, key: str, path: str, *, required: bool = False) -> int | None:
    return ctx.int(parent, key, path, required=required, lo=1, hi=65535)


def read_object_ref(ctx, r: dict, p: str, default_kind: str, default_group: str = "") -> g.ObjectRef | None:
    grp = read_pattern(ctx, r, "group", f"{p}.group", GROUP_RX, "API group", default=default_group, lo=0)
    kind = read_pattern(ctx, r, "kind", f"{p}.kind", KIND_RX, "kind", default=default_kind, hi=63)
    name = ctx.str(r, "name", f"{p}.name", required=True)
    if name is not None and not 1 <= len(name) <= 253:
        ctx.error(f"{p}.name", "must be 1-253 characters long", r, "name")
    ns = read_pattern(ctx, r, "namespace", f"{p}.namespace", NAMESPACE_RX, "namespace", hi=63)
    if name is None or kind is None or grp is None:
        return None
    return g.ObjectRef(grp, kind, name, ns)


