"""Ingress (networking.k8s.io/v1) compiled into the route model of ``meshproxy.core.routes``.

Semantics follow the Ingress API reference and the "Ingress" concept page; docs/routing.md is
the user-facing description and the record of every choice made here:

* Hosts: exact first, then a ``*.`` wildcard covering exactly one label, then rules without a
  host; a host level whose paths do not match falls through to the next one (``label_wildcards``
  and ``host_fallthrough`` of the table). ``defaultBackend`` answers only when no level matches.
* Paths: Exact (whole path), Prefix (element-wise), ImplementationSpecific = Prefix. The longest
  match wins; on equal length Exact beats Prefix.
* Two Ingresses claiming the same host + path + type: the oldest ``creationTimestamp`` wins
  (unknown sorts last), then namespace/name, then the order within the Ingress; every loser is
  reported (``RouteTable.conflicts``).
* A route's name, for metrics and the access log, is ``host/path`` as written (``/path`` without
  a host); its source is ``Ingress namespace/name``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from .paths import rule_host
from .routes import DEFAULT, EXACT, PREFIX, Action, BackendRef, Redirect, Route, RouteEntry

__all__ = ["PATH_TYPES", "check_path", "ingress_rank", "ingress_route", "https_redirect"]

PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
# k8s.io/kubernetes pkg/apis/networking/validation: Exact and Prefix paths must not contain
# these (directory traversal and encoded slashes); ImplementationSpecific is not checked.
_API_INVALID_SEQUENCES = ("//", "/./", "/../", "%2f", "%2F")
_API_INVALID_SUFFIXES = ("/..", "/.")

# The redirect of ``meshproxy.dev/ssl-redirect``: plain-text requests go to HTTPS (308 keeps the
# method and body), on the TLS listener's port.
https_redirect = Redirect(status=308, scheme="https", only_plaintext=True)


def check_path(host: str | None, path: str, path_type: str) -> str | None:
    """Why the API server would refuse this host + path (None when it is acceptable). Hosts
    are checked after lower-casing (they are compared case-insensitively)."""
    if path_type not in PATH_TYPES:
        return f"pathType: unsupported value {path_type!r} (one of {', '.join(PATH_TYPES)})"
    if path_type == "ImplementationSpecific":
        if path and not path.startswith("/"):
            return f"path {path!r}: must be an absolute path"
    else:
        if not path.startswith("/"):
            return f"path {path!r}: must be an absolute path"
        for seq in _API_INVALID_SEQUENCES:
            if seq in path:
                return f"path {path!r}: must not contain {seq!r}"
        for suffix in _API_INVALID_SUFFIXES:
            if path.endswith(suffix):
                return f"path {path!r}: cannot end with {suffix!r}"
    h = rule_host(host)
    if h:
        if not (host or "").isascii():  # lower() folds e.g. KELVIN SIGN to "k"
            return f"host {host!r}: must be a DNS name"
        name = h[2:] if h.startswith("*.") else h
        if len(h) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            what = "a wildcard ('*.' then a DNS name)" if "*" in h else "a DNS name"
            return f"host {host!r}: must be {what}"
    return None


def _age_key(created: str) -> tuple[int, float]:
    """Older first; unknown or unparseable timestamps sort after every known one."""
    if created:
        try:
            dt = datetime.fromisoformat(created.strip().upper())
        except ValueError:
            return (1, 0.0)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return (0, dt.timestamp())
    return (1, 0.0)


def ingress_rank(created: str, ingress: str) -> tuple:
    """Rank of an Ingress's routes against another Ingress's for the same slot."""
    namespace, _, name = ingress.partition("/")
    return (_age_key(created), (namespace, name))


def ingress_route(host: str | None, path: str, path_type: str, action: Action, ingress: str,
                  created: str = "") -> RouteEntry:
    """One path of one rule of ``ingress`` ("namespace/name") as a table entry. The caller has
    checked it with ``check_path``."""
    if path_type == "Exact":
        kind = EXACT
    elif path_type == DEFAULT:
        kind = DEFAULT
    else:
        kind = PREFIX
    route = Route(name=f"{host or ''}{path}", source=f"Ingress {ingress}", host=host, path_kind=kind,
                  path=path if path or kind != PREFIX else "", action=action,
                  written_kind="" if path_type == kind else path_type)
    return RouteEntry(host, route, ingress_rank(created, ingress))


def default_route(action: Action, ingress: str) -> Route:
    """``spec.defaultBackend`` of ``ingress``."""
    return Route(name="", source=f"Ingress {ingress}", host=None, path_kind=DEFAULT, path="", action=action)


def backend_action(key: tuple[str, str, str] | None, error: str | None, *, timeout: float,
                   attempts: int, per_try_timeout: float | None, ssl_redirect: bool) -> Action:
    """The action of an Ingress path: one backend (or why there is none), its timeouts, retries
    and the ssl-redirect annotation."""
    return Action(backends=(BackendRef(key, 1, error),), timeout=timeout, per_try_timeout=per_try_timeout,
                  attempts=attempts, redirect=https_redirect if ssl_redirect else None, invalid_status=503)
