"""Ingress route table: host -> path -> backend, built once per snapshot, matched per request.

Semantics follow networking.k8s.io/v1 Ingress (API reference and the "Ingress" concept page);
docs/routing.md is the user-facing description and the record of every choice made here.

Invariants this module keeps:

* ``RouteTable.build()`` does all the work; a built table is never mutated (frozen dataclasses,
  ``MappingProxyType``), so one table can be shared by every worker task and swapped by reference.
* ``match()`` does no I/O, never raises for any ``str`` input, allocates only the few substrings
  it probes, and returns precomputed ``RouteMatch`` objects.  Its cost is O(depth of the request
  path) dictionary probes - it does not depend on the number of rules (see ``_PathLevel``).
* Host levels are tried most specific first - exact host, then the ``*.`` wildcard covering
  exactly one label, then rules without host - and a level whose paths do not match falls
  through to the next one.  ``defaultBackend`` only answers when no level matches; ``None``
  means "no route" (the proxy answers 404).
* Within a level: an Exact path matching the whole request path always wins (it is the longest
  possible match and Exact beats Prefix on equal length); otherwise the longest Prefix whose
  path elements are a prefix of the request's elements wins.  ImplementationSpecific is Prefix.
* Rule paths and request paths are compared in one canonical form (``normalize_request_path``):
  percent-escapes of unreserved characters decoded, other escapes upper-cased, runs of ``/``
  merged.  Requests with dot-segments (also ``..;param``), encoded ``/`` ``\\`` or NUL, a raw
  ``\\`` or a broken escape are refused (None -> 400) because backends disagree on what they mean.
* Two entries for the same slot (host, canonical path, Exact vs Prefix-like) from different
  Ingresses: the oldest creationTimestamp wins (unknown sorts last), then namespace/name, then
  input order; every loser is reported in ``RouteTable.conflicts``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType

__all__ = [
    "DEFAULT_PATH_TYPE",
    "PATH_TYPES",
    "RouteEntry",
    "RouteMatch",
    "RouteTable",
    "check_entry",
    "normalize_request_path",
]

PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")
DEFAULT_PATH_TYPE = "Default"  # RouteMatch.path_type when the defaultBackend answered


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """One path of one rule of one Ingress: the input of ``RouteTable.build``."""

    host: str | None  # as written: None/"" = any host; "foo.com"; "*.foo.com"
    path: str  # "/..." ; "" allowed for ImplementationSpecific (means "/")
    path_type: str  # "Exact" | "Prefix" | "ImplementationSpecific"
    backend: object  # opaque to the router, handed back on match
    ingress: str  # "namespace/name"
    created: str = ""  # metadata.creationTimestamp (RFC 3339), "" if unknown


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The entry that won (as written in its Ingress); path_type "Default" for defaultBackend."""

    backend: object
    ingress: str
    host: str | None
    path: str
    path_type: str


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------

# RFC 3986 section 2.3 unreserved characters: their percent-encoded form is equivalent to the
# character itself (section 6.2.2.2), so the canonical form decodes them.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters a path may carry unencoded (pchar minus pct-encoded, plus "/"), RFC 3986 section 3.3.
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
# Printable ASCII that RFC 3986 does not allow in a path but clients do send raw (h11 accepts any
# VCHAR in the request-target); it can only mean its percent-encoded form, so we encode it.
_ENCODE_RAW = frozenset('"<>^`{|}')
_HEX = frozenset("0123456789abcdefABCDEF")
# Escapes that decode to a character backends disagree about: "/" (Envoy's
# path_with_escaped_slashes_action exists because of it), "\" (a separator on Windows servers)
# and NUL (C string truncation).  Requests carrying them are refused rather than guessed at.
_REFUSED_ESCAPES = frozenset({"2F", "5C", "00"})
# The common case - only safe characters, no escapes, no "//", no "/." - is returned as is.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


def normalize_request_path(path: str) -> str | None:
    """Return the canonical routing key of a request path, or None when it must get a 400.

    ``path`` is the request-target's path (origin-form); a "?" and what follows is ignored.
    Canonical form (RFC 3986 section 6.2.2 syntax-based normalisation, plus slash merging):

    * percent-encoded unreserved characters are decoded (``/%61pi`` -> ``/api``), other escapes
      keep their encoding with upper-case hex (``%3a`` -> ``%3A``);
    * raw ``" < > ^ ` { | }`` are percent-encoded (their only meaning);
    * runs of "/" are merged into one (what nginx does, and httpd since CVE-2019-0220), so
      ``//admin`` cannot slip past a rule for ``/admin``.

    Refused (None): a path not starting with "/", control characters, space, DEL or non-ASCII,
    a raw "\\" or "#", a "%" not followed by two hex digits, ``%2F`` ``%5C`` ``%00``, and any
    "." or ".." segment (also when spelt with ``%2E``, and with path parameters: ``..;x``,
    ``.;``, ``%2e%2e;``, ``..%3B``).  Legitimate clients remove dot-segments
    before sending (RFC 3986 section 5.2.4); a proxy that routes ``/public/../admin`` one way
    while the backend resolves it another is a classic access-control bypass.

    The function is idempotent, and a rule path goes through it too (``_canonical_rule_path``)
    so both sides of a comparison are in the same form.
    """
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    if _PLAIN_PATH.fullmatch(path) and "//" not in path and "/." not in path:
        return path
    if not path.startswith("/"):
        return None
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        seg = _canonical_segment(seg)
        if seg is None or _is_dot_segment(seg):
            return None
        out.append(seg)
    # Merge slashes: drop empty segments except the last one, which carries a trailing "/".
    last = out.pop()
    out = [s for s in out if s]
    out.append(last)
    return "/" + "/".join(out)


def _is_dot_segment(seg: str) -> bool:
    """``.`` or ``..``, also with path parameters: the part before the first ``;`` (or its
    escape ``%3B``) is a dot-segment.  Tomcat, Jetty and Spring strip ``;params`` from each
    segment before resolving dot-segments, so ``/public/..;/admin`` reaches ``/admin`` there
    while a prefix rule for ``/public`` would match it here (the classic ``..;`` bypass).
    ``seg`` is canonical: escaped unreserved characters (``%2e``) are decoded already."""
    if seg[:1] != ".":
        return False
    name = seg.partition(";")[0]
    p = name.find("%3B")
    if p >= 0:
        name = name[:p]
    return name == "." or name == ".."


def _canonical_segment(seg: str) -> str | None:
    """Canonical form of one path segment (no "/" inside), or None if it must be refused."""
    n = len(seg)
    parts: list[str] = []
    i = 0
    while i < n:
        c = seg[i]
        if c == "%":
            hi = seg[i + 1 : i + 3]
            if len(hi) != 2 or hi[0] not in _HEX or hi[1] not in _HEX:
                return None
            hi = hi.upper()
            if hi in _REFUSED_ESCAPES:
                return None
            ch = chr(int(hi, 16))
            parts.append(ch if ch in _UNRESERVED else "%" + hi)
            i += 3
            continue
        if c in _PATH_SAFE:
            parts.append(c)
        elif c in _ENCODE_RAW:
            parts.append("%%%02X" % ord(c))
        else:  # control, space, DEL, non-ASCII, "\", "#"
            return None
        i += 1
    return "".join(parts)


def _canonical_rule_path(path: str) -> str | None:
    """Canonical form of a path as written in an Ingress, None if no request can ever match it.

    The API allows characters a URL path may not carry ("it can contain characters disallowed
    from the conventional path part of a URL"): those mean their UTF-8 percent-encoding, a "%"
    that does not start a valid escape means a literal "%", "?" and "#" mean %3F / %23 (a
    request path cannot hold them raw).  The result then goes through normalize_request_path.
    """
    if path == "":
        return "/"  # ImplementationSpecific with no path: everything
    out: list[str] = []
    for i, c in enumerate(path):
        if c == "%":
            esc = path[i + 1 : i + 3]
            if len(esc) == 2 and esc[0] in _HEX and esc[1] in _HEX:
                out.append(c)
            else:
                out.append("%25")
        elif c in _PATH_SAFE:
            out.append(c)
        else:
            out.extend("%%%02X" % b for b in c.encode("utf-8"))
    return normalize_request_path("".join(out))


# --------------------------------------------------------------------------------------------
# Validation of entries (what the API server would refuse)
# --------------------------------------------------------------------------------------------

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
# k8s.io/kubernetes pkg/apis/networking/validation: Exact and Prefix paths must not contain
# these (directory traversal and encoded slashes); ImplementationSpecific is not checked.
_API_INVALID_SEQUENCES = ("//", "/./", "/../", "%2f", "%2F")
_API_INVALID_SUFFIXES = ("/..", "/.")


def _rule_host(host: str | None) -> str:
    """Rule host as a table key: "" for any host, lower-case, without a trailing dot."""
    if not host:
        return ""
    h = host.lower()
    return h[:-1] if h.endswith(".") else h


def check_entry(entry: RouteEntry) -> str | None:
    """Why the API server would refuse this entry (None when it is acceptable).

    For the config validator, which adds file/line; ``RouteTable.build`` raises ValueError
    with the same text.  Hosts are checked after lower-casing (we compare case-insensitively).
    """
    if entry.path_type not in PATH_TYPES:
        return f"pathType: unsupported value {entry.path_type!r} (one of {', '.join(PATH_TYPES)})"
    path = entry.path
    if entry.path_type == "ImplementationSpecific":
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
    host = _rule_host(entry.host)
    if host:
        if not (entry.host or "").isascii():  # lower() folds e.g. KELVIN SIGN to "k"
            return f"host {entry.host!r}: must be a DNS name"
        name = host[2:] if host.startswith("*.") else host
        if len(host) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            what = "a wildcard ('*.' then a DNS name)" if "*" in host else "a DNS name"
            return f"host {entry.host!r}: must be {what}"
    return None


# --------------------------------------------------------------------------------------------
# Precedence between entries competing for the same slot
# --------------------------------------------------------------------------------------------


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


def _name_key(ingress: str) -> tuple[str, str]:
    namespace, _, name = ingress.partition("/")
    return (namespace, name)


@dataclass(frozen=True, slots=True)
class _Candidate:
    entry: RouteEntry
    rank: tuple[tuple[int, float], tuple[str, str], int]  # (age, namespace/name, input order)


def _loss_reason(winner: _Candidate, loser: _Candidate) -> str:
    if winner.rank[0] != loser.rank[0]:
        if loser.entry.created:
            return "older Ingress wins"
        return "Ingress without creationTimestamp loses"
    if winner.entry.ingress != loser.entry.ingress:
        return "same age, namespace/name order"
    return "listed twice in the same Ingress, first one wins"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PathLevel:
    """The paths of one host level.

    ``exact`` maps a canonical path to its match.  ``prefix`` maps a canonical prefix without
    its trailing "/" ("/" becomes "") to its match; a request probes the element-boundary
    prefixes of its own path, longest first, so the first hit is the longest match.  Probing
    starts at the longest prefix key present (``longest``), which bounds the work for a deep
    or very long path by the rules that exist, not by what the client sent.
    """

    exact: Mapping[str, RouteMatch]
    prefix: Mapping[str, RouteMatch]
    longest: int  # length of the longest key in ``prefix``; -1 when there is none

    def lookup(self, path: str) -> RouteMatch | None:
        m = self.exact.get(path)
        if m is not None:
            return m  # nothing can beat it: see the module docstring
        limit = self.longest
        if limit < 0:
            return None
        prefix = self.prefix
        key = path[:-1] if path.endswith("/") else path
        if len(key) > limit:
            # Longest element-boundary prefix not longer than any key: key[cut] is a "/".
            cut = key.rfind("/", 0, limit + 1)
            key = key[:cut] if cut > 0 else ""
        while True:
            m = prefix.get(key)
            if m is not None:
                return m
            if not key:
                return None
            cut = key.rfind("/")
            key = key[:cut] if cut > 0 else ""


def _request_host(host: str) -> str:
    """Host header -> lookup key: port removed, lower case, one trailing dot removed.

    A non-ASCII value gives "" (it can match no rule host; ``str.lower`` would otherwise fold
    e.g. KELVIN SIGN to "k").  ``[v6]:port`` keeps the brackets.
    """
    if not host:
        return ""
    if host[0] == "[":
        end = host.find("]")
        if end > 0:
            host = host[: end + 1]
    else:
        colon = host.rfind(":")
        if colon >= 0:
            host = host[:colon]
    if host.endswith("."):
        host = host[:-1]
    if not host.isascii():
        return ""
    return host.lower()


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class RouteTable:
    """Merged Ingress rules of one snapshot.  Build with ``RouteTable.build``."""

    _exact_hosts: Mapping[str, _PathLevel]
    _wildcard_hosts: Mapping[str, _PathLevel]  # key: suffix after "*."
    _any_host: _PathLevel | None
    _default: RouteMatch | None
    _rows: tuple[Mapping[str, object], ...]
    conflicts: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # entries no request can reach (e.g. path with "%2F")

    @classmethod
    def build(
        cls,
        entries: Iterable[RouteEntry],
        default_backend: object | None = None,
        default_ingress: str = "",
    ) -> RouteTable:
        """Merge entries into a table.  Raises ValueError for an entry ``check_entry`` refuses."""
        # slots[(level, host key)][(is_exact, canonical key)] -> candidates
        slots: dict[tuple[int, str], dict[tuple[bool, str], list[_Candidate]]] = {}
        skipped: list[str] = []
        for index, entry in enumerate(entries):
            problem = check_entry(entry)
            if problem is not None:
                raise ValueError(f"Ingress {entry.ingress}: {problem}")
            host = _rule_host(entry.host)
            if not host:
                level_key = (2, "")
            elif host.startswith("*."):
                level_key = (1, host[2:])
            else:
                level_key = (0, host)
            canonical = _canonical_rule_path(entry.path)
            if canonical is None:
                skipped.append(
                    f"Ingress {entry.ingress}: host {host or '*'} {entry.path_type} "
                    f"{entry.path!r}: no request path can match it (dot-segment, encoded "
                    f"'/', '\\' or NUL); ignored"
                )
                continue
            is_exact = entry.path_type == "Exact"
            key = canonical if is_exact else canonical.rstrip("/")
            rank = (_age_key(entry.created), _name_key(entry.ingress), index)
            slots.setdefault(level_key, {}).setdefault((is_exact, key), []).append(
                _Candidate(entry, rank)
            )

        conflicts: list[str] = []
        levels: dict[tuple[int, str], _PathLevel] = {}
        rows: list[dict[str, object]] = []
        for level_key in sorted(slots):
            level, host = level_key
            shown_host = None if level == 2 else ("*." + host if level == 1 else host)
            exact: dict[str, RouteMatch] = {}
            prefix: dict[str, RouteMatch] = {}
            # Precedence order (longest first, Exact before Prefix) is also describe()'s order.
            ordered = sorted(
                slots[level_key].items(), key=lambda kv: (-len(kv[0][1]), not kv[0][0], kv[0][1])
            )
            for (is_exact, key), candidates in ordered:
                candidates.sort(key=lambda c: c.rank)
                winner = candidates[0]
                for loser in candidates[1:]:
                    e = loser.entry
                    conflicts.append(
                        f"host {shown_host or '*'} {e.path_type} {e.path!r}: Ingress {e.ingress} "
                        f"ignored, Ingress {winner.entry.ingress} wins "
                        f"({_loss_reason(winner, loser)})"
                    )
                e = winner.entry
                m = RouteMatch(e.backend, e.ingress, e.host, e.path, e.path_type)
                (exact if is_exact else prefix)[key] = m
                rows.append(
                    {
                        "host": shown_host,
                        "path": e.path,
                        "pathType": e.path_type,
                        "ingress": e.ingress,
                        "backend": str(e.backend),
                    }
                )
            levels[level_key] = _PathLevel(
                MappingProxyType(exact),
                MappingProxyType(prefix),
                max(map(len, prefix), default=-1),
            )

        default = None
        if default_backend is not None:
            default = RouteMatch(default_backend, default_ingress, None, "", DEFAULT_PATH_TYPE)
            rows.append(
                {
                    "host": None,
                    "path": "",
                    "pathType": DEFAULT_PATH_TYPE,
                    "ingress": default_ingress,
                    "backend": str(default_backend),
                }
            )
        return cls(
            MappingProxyType({h: lv for (lvl, h), lv in levels.items() if lvl == 0}),
            MappingProxyType({h: lv for (lvl, h), lv in levels.items() if lvl == 1}),
            levels.get((2, "")),
            default,
            tuple(MappingProxyType(r) for r in rows),
            tuple(conflicts),
            tuple(skipped),
        )

    def match(self, host: str, path: str) -> RouteMatch | None:
        """Route one request.

        ``host``: the raw Host header value (any case, maybe ":port", maybe a trailing dot).
        ``path``: the canonical path from ``normalize_request_path`` (a raw path still works,
        it is then compared exactly as sent).  None: no rule and no defaultBackend -> 404.

        Cost: at most three host levels, each one dict probe for Exact plus one per path
        element for Prefix - O(path depth), independent of the number of rules.
        """
        h = _request_host(host)
        if h:
            level = self._exact_hosts.get(h)
            if level is not None:
                m = level.lookup(path)
                if m is not None:
                    return m
            dot = h.find(".")
            if dot > 0:  # "*.foo.com" covers exactly one non-empty label
                level = self._wildcard_hosts.get(h[dot + 1 :])
                if level is not None:
                    m = level.lookup(path)
                    if m is not None:
                        return m
        level = self._any_host
        if level is not None:
            m = level.lookup(path)
            if m is not None:
                return m
        return self._default

    def describe(self) -> list[dict]:
        """JSON-able rows in evaluation order: exact hosts, wildcards, any host, default."""
        return [dict(r) for r in self._rows]

    def __repr__(self) -> str:
        return (
            f"RouteTable(routes={len(self._rows)}, hosts={len(self._exact_hosts)}, "
            f"wildcards={len(self._wildcard_hosts)}, conflicts={len(self.conflicts)})"
        )
