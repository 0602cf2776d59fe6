"""The route model: what every L7 rule compiles into, and the table requests are matched in.

Ingress rules (``meshproxy.core.ingress``), and the other L7 configuration kinds, compile into
the same three things:

* a **Route**: where it applies (host, path match, optional conditions on method, headers,
  query parameters and cookies) and what it does (its ``Action``); its ``name`` is the label
  metrics and access logs use for it;
* an **Action**: weighted backend references and the rule's filters - request / response
  header changes, redirect, rewrite, mirrors, timeouts, retry policy, extension filters;
* a **RouteTable**: the routes of one listener (or of the Ingress class), grouped by host and
  indexed by path, built once per snapshot and never mutated.

Precedence is data. Every entry handed to ``RouteTable.build`` carries a ``rank`` (a tuple, lower
wins) that orders entries competing for the same request; the table keeps candidates in that
order and the first one whose conditions hold answers. What differs between rule kinds is only
the rank they compute and two table options: how a ``*.`` host wildcard matches (one label for
Ingress, any suffix for Gateway API) and whether a host whose paths do not match falls through
to the less specific hosts (Ingress) or answers 404 (Gateway API).

Invariants this module keeps:

* ``match()`` does no I/O, never raises for any input, and allocates only the substrings it
  probes; for path-only tables it returns one of the precomputed ``Route`` objects after
  O(path depth) dict probes, independent of the number of rules.
* Within a host: Exact candidates for the whole path first, then RegularExpression candidates
  where the table says so, then Prefix candidates from the longest matching prefix to the
  shortest, each group in rank order. So an Exact match always beats a Prefix one, a longer
  prefix beats a shorter one, and among equal paths the rank (conditions count, age, name,
  order) decides.
* Two entries with the same host, path match and conditions: the lower rank wins and the other
  is reported in ``RouteTable.conflicts``; it can never answer.
* Paths are compared in one canonical form (``meshproxy.core.paths``).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from types import MappingProxyType
from typing import Any

from .paths import canonical_rule_path, request_host, rule_host

__all__ = [
    "EXACT",
    "PREFIX",
    "REGEX",
    "DEFAULT",
    "Action",
    "BackendRef",
    "Conditions",
    "CookieMatch",
    "Fault",
    "HeaderEdits",
    "HeaderMatch",
    "Mirror",
    "QueryMatch",
    "Redirect",
    "Rewrite",
    "Route",
    "RouteEntry",
    "RouteTable",
]

# Path match kinds.
EXACT = "Exact"
PREFIX = "Prefix"
REGEX = "RegularExpression"
DEFAULT = "Default"   # the route that answers when nothing matches (Ingress defaultBackend)


# --------------------------------------------------------------------------------------------
# Conditions beyond host and path
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A request header's value: exactly ``value``, or (``regex`` set) matched by it in full.
    ``name`` is lower-case bytes. Several fields of the same name are joined by ", " first
    (RFC 9110 §5.3), which is how a client may legally have split them."""

    name: bytes
    value: bytes = b""
    regex: re.Pattern | None = None
    invert: bool = False

    def test(self, value: bytes | None) -> bool:
        if value is None:
            ok = False
        elif self.regex is not None:
            ok = self.regex.fullmatch(value.decode("latin-1")) is not None
        else:
            ok = value == self.value
        return ok is not self.invert


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """A query parameter (name compared exactly, the first occurrence counts): its value
    exactly ``value``, or matched in full by ``regex``."""

    name: str
    value: str = ""
    regex: re.Pattern | None = None

    def test(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return value == self.value


@dataclass(frozen=True, slots=True)
class CookieMatch:
    """A cookie's value: exactly ``value``, or matched in full by ``regex``."""

    name: str
    value: str = ""
    regex: re.Pattern | None = None

    def test(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return value == self.value


@dataclass(frozen=True, slots=True)
class Conditions:
    """Everything a route requires besides host and path; all must hold."""

    method: bytes | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    cookies: tuple[CookieMatch, ...] = ()

    def holds(self, request: Any) -> bool:
        """``request`` offers ``method`` (bytes), ``header(name)`` (bytes | None),
        ``query_param(name)`` and ``cookie(name)`` (str | None); see l7's RequestView."""
        if self.method is not None and request.method != self.method:
            return False
        for h in self.headers:
            if not h.test(request.header(h.name)):
                return False
        for q in self.query:
            if not q.test(request.query_param(q.name)):
                return False
        for c in self.cookies:
            if not c.test(request.cookie(c.name)):
                return False
        return True

    @property
    def count(self) -> tuple[int, int, int]:
        """(method, headers, query) counts: what Gateway API precedence compares."""
        return (1 if self.method is not None else 0, len(self.headers), len(self.query))


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Header changes, applied in the order remove, set, add. Names are lower-case bytes; a
    ``set`` replaces every field of that name, an ``add`` appends one more."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: tuple[bytes, ...] = ()

    def apply(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = set(self.remove)
        drop.update(n for n, _ in self.set)
        if drop:
            fields = [f for f in fields if f[0].lower() not in drop]
        else:
            fields = list(fields)
        fields.extend(self.set)
        fields.extend(self.add)
        return fields


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer with a redirect instead of forwarding. Unset parts keep the request's own.
    ``path_kind``: None (keep), "ReplaceFullPath" or "ReplacePrefixMatch" (the matched prefix
    is replaced by ``path``)."""

    status: int = 302
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path_kind: str | None = None
    path: str = ""
    # Only on a plain-text listener (Ingress ssl-redirect: an HTTPS request is forwarded).
    only_plaintext: bool = False


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Change what is forwarded. ``path_kind``: None, "ReplaceFullPath", "ReplacePrefixMatch",
    or "RegexReplace" (``path`` is a template with ``$1``.. for the groups of the route's
    regular expression, as ingress-nginx's rewrite-target)."""

    hostname: str | None = None
    path_kind: str | None = None
    path: str = ""


@dataclass(frozen=True, slots=True)
class Mirror:
    """Send a copy of the request to ``backend`` (responses ignored) for ``percent`` of them."""

    backend: tuple[str, str, str]
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Fault:
    """Injected faults for load testing (the ``FaultInjection`` extension filter): for
    ``delay_percent`` of requests wait ``delay`` seconds before forwarding; for ``abort_percent``
    answer ``abort_status`` without forwarding. Percentages in [0, 100]."""

    delay: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0
    abort_percent: float = 0.0


_NO_INTERCEPTS: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class BackendRef:
    """One weighted destination of an action. ``key`` is the snapshot's backend key
    (namespace, service, port); None when the reference is invalid (``error`` says why), in
    which case the requests that pick it are answered with the action's ``invalid_status``."""

    key: tuple[str, str, str] | None
    weight: int = 1
    error: str | None = None
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None

    def __str__(self) -> str:
        if self.key is None:
            return f"<{self.error}>"
        return f"{self.key[0]}/{self.key[1]}:{self.key[2]}"


@dataclass(frozen=True, slots=True)
class Action:
    """What a matched route does. Timeouts in seconds (None: none); ``attempts`` counts the
    first try (1 = no retry); ``retry_on``: response statuses an idempotent request is retried
    on (connect failures and resets before a response are always retryable)."""

    backends: tuple[BackendRef, ...] = ()
    timeout: float | None = 60.0          # upstream response timeout of one attempt (read gaps)
    request_timeout: float | None = None  # the whole exchange, all attempts (Gateway timeouts.request)
    per_try_timeout: float | None = None
    attempts: int = 2
    retry_on: frozenset[int] = frozenset((502, 503, 504))
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None
    # Further extension filters in order (rule kinds may add their own): objects with the l7
    # filter interface, see l7/filters.py.
    filters: tuple[Any, ...] = ()
    invalid_status: int = 503             # a picked backend reference is invalid
    connect_timeout: float | None = None  # upstream connect timeout of this route (None: the proxy's)
    # The answer when no pod of the route could be connected to: (after a connect timeout, after
    # any other connect failure). None: 503 for both (Envoy's "no healthy upstream" family);
    # ingress-nginx's locations answer 504 / 502, as nginx's proxy module does.
    connect_error_statuses: tuple[int, int] | None = None
    # Response statuses answered by another request instead (ingress-nginx's custom-http-errors):
    # (status, action) pairs; the exchange discards the pod's response and sends the request
    # with that action (its first backend, its rewrite and header edits, its filters'
    # on_request, which may only add header fields).
    intercept: tuple[tuple[int, Action], ...] = ()
    # Cumulative weights for the pick (computed): empty when every weight is 0.
    _cumulative: tuple[int, ...] = field(init=False, default=(), repr=False, compare=False)
    # Statuses that need a look before relaying (computed): retry_on plus the intercepted ones,
    # so the common response costs one set probe whatever the route asks for.
    special_statuses: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)
    intercepts: Mapping[int, Action] = field(init=False, default_factory=lambda: _NO_INTERCEPTS, repr=False,
                                             compare=False)
    # Computed: nothing changes the forwarded request / the relayed response head (the common
    # case, checked with one attribute read per request).
    plain_request: bool = field(init=False, default=True, compare=False)
    plain_response: bool = field(init=False, default=True, compare=False)

    def __post_init__(self) -> None:
        weights = [max(0, b.weight) for b in self.backends]
        object.__setattr__(self, "_cumulative", tuple(accumulate(weights)) if sum(weights) else ())
        object.__setattr__(self, "plain_request", self.request_headers is None and self.rewrite is None
                           and all(b.request_headers is None for b in self.backends))
        object.__setattr__(self, "plain_response", self.response_headers is None and not self.filters
                           and all(b.response_headers is None for b in self.backends))
        object.__setattr__(self, "special_statuses", self.retry_on | frozenset(c for c, _ in self.intercept))
        if self.intercept:
            object.__setattr__(self, "intercepts", MappingProxyType(dict(self.intercept)))

    def pick_backend(self, rand: float) -> BackendRef | None:
        """The backend reference for one request; ``rand`` in [0, 1). None when there is none
        (no references, or every weight is 0)."""
        cum = self._cumulative
        if not cum:
            return None
        if len(cum) == 1:
            return self.backends[0]
        return self.backends[bisect_right(cum, int(rand * cum[-1]))]


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One path match of one rule, with its action (a rule with several matches gives several
    routes sharing one action). ``name`` labels it in metrics and access logs; ``source`` names
    the object it came from ("Ingress default/web"). ``path`` is as written; ``regex`` is the
    compiled form of a RegularExpression path (``regex_prefix``: matched from the start only and
    the rest of the path may follow, as nginx's ``~*`` locations; else a full match)."""

    name: str
    source: str
    host: str | None
    path_kind: str
    path: str
    action: Action
    conditions: Conditions | None = None
    regex: re.Pattern | None = None
    regex_prefix: bool = False
    written_kind: str = ""    # the kind as the source object wrote it, when it differs (display)

    def matched_prefix(self, path: str) -> str:
        """The part of ``path`` (canonical) this route's Prefix match covers ("" for "/")."""
        if self.path_kind != PREFIX:
            return path if self.path_kind == EXACT else ""
        canon = canonical_rule_path(self.path) or "/"
        key = canon.rstrip("/")
        return path[: len(key)]

    def __repr__(self) -> str:
        return f"Route({self.name!r}, {self.path_kind} {self.path!r})"


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """Input of ``RouteTable.build``: a route, the host it is reached by (as written: None or ""
    for any host, "*.example.com" for a wildcard), and its rank among competitors (lower
    wins)."""

    host: str | None
    route: Route
    rank: tuple = ()


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _VirtualHost:
    """The routes of one host key.

    ``exact`` maps a canonical path to its candidates; ``prefix`` maps a canonical prefix
    without its trailing "/" ("/" becomes "") to its candidates; a request probes the
    element-boundary prefixes of its own path, longest first. Probing starts at the longest
    key present (``longest``), which bounds the work for a deep or long path by the rules that
    exist, not by what the client sent. ``regex`` holds RegularExpression routes in rank order.
    ``plain``: no candidate has conditions and there are no regex routes, so the first candidate
    found is the answer and ``lookup`` needs no request.
    """

    exact: Mapping[str, tuple[Route, ...]]
    prefix: Mapping[str, tuple[Route, ...]]
    longest: int
    regex: tuple[Route, ...]
    plain: bool

    def lookup(self, path: str, request: Any, regex_first: bool) -> Route | None:
        routes = self.exact.get(path)
        if routes is not None:
            for r in routes:
                if r.conditions is None or (request is not None and r.conditions.holds(request)):
                    return r
        if regex_first and self.regex:
            r = self._regex(path, request)
            if r is not None:
                return r
        limit = self.longest
        if limit >= 0:
            prefix = self.prefix
            key = path[:-1] if path.endswith("/") else path
            if len(key) > limit:
                # Longest element-boundary prefix not longer than any key: key[cut] is a "/".
                cut = key.rfind("/", 0, limit + 1)
                key = key[:cut] if cut > 0 else ""
            while True:
                routes = prefix.get(key)
                if routes is not None:
                    for r in routes:
                        if r.conditions is None or (request is not None and r.conditions.holds(request)):
                            return r
                if not key:
                    break
                cut = key.rfind("/")
                key = key[:cut] if cut > 0 else ""
        if not regex_first and self.regex:
            return self._regex(path, request)
        return None

    def _regex(self, path: str, request: Any) -> Route | None:
        for r in self.regex:
            m = r.regex.match(path) if r.regex_prefix else r.regex.fullmatch(path)
            if m is not None and (r.conditions is None or (request is not None and r.conditions.holds(request))):
                return r
        return None


def _slot_key(path_kind: str, canonical: str, conditions: Conditions | None) -> tuple:
    return (path_kind, canonical, conditions)


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class RouteTable:
    """Routes grouped by host, built with ``RouteTable.build``; see the module docstring."""

    _exact_hosts: Mapping[str, _VirtualHost]
    _wildcard_hosts: Mapping[str, _VirtualHost]   # key: suffix after "*."
    _wildcard_lengths: tuple[int, ...]            # suffix-mode: key lengths, longest first
    _any_host: _VirtualHost | None
    _default: Route | None
    _rows: tuple[Mapping[str, object], ...]
    label_wildcards: bool = True    # "*." covers exactly one label (Ingress) or any suffix
    host_fallthrough: bool = True   # a host whose routes do not match falls to less specific ones
    regex_first: bool = False       # RegularExpression candidates before Prefix ones
    plain: bool = True              # no route has conditions or a regex: match(host, path) decides
    conflicts: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()   # routes no request can reach (e.g. a path with "%2F")

    @classmethod
    def build(cls, entries: Iterable[RouteEntry], *, default: Route | None = None,
              label_wildcards: bool = True, host_fallthrough: bool = True,
              regex_first: bool = False) -> RouteTable:
        """Group, order and index ``entries``. Entries are taken as valid (the compilers check
        their objects first); a path no request can match is reported in ``skipped``."""
        # slots[(level, host key)][slot key] -> [(rank, index, route)]
        slots: dict[tuple[int, str], dict[tuple, list[tuple[tuple, int, Route]]]] = {}
        skipped: list[str] = []
        for index, e in enumerate(entries):
            host = rule_host(e.host)
            if not host:
                level_key = (2, "")
            elif host.startswith("*."):
                level_key = (1, host[2:])
            else:
                level_key = (0, host)
            r = e.route
            if r.path_kind == REGEX:
                canonical = r.path
            else:
                canonical = canonical_rule_path(r.path)
                if canonical is None:
                    skipped.append(f"{r.source}: host {host or '*'} {r.path_kind} {r.path!r}: no request "
                                   f"path can match it (dot-segment, encoded '/', '\\' or NUL); ignored")
                    continue
                if r.path_kind == PREFIX:
                    canonical = canonical.rstrip("/")
            slots.setdefault(level_key, {}).setdefault(_slot_key(r.path_kind, canonical, r.conditions), []).append(
                (e.rank, index, r))

        conflicts: list[str] = []
        hosts: dict[tuple[int, str], _VirtualHost] = {}
        rows: list[dict[str, object]] = []
        plain_table = True
        for level_key in sorted(slots):
            level, host = level_key
            shown = None if level == 2 else ("*." + host if level == 1 else host)
            exact: dict[str, list[tuple[tuple, int, Route]]] = {}
            prefix: dict[str, list[tuple[tuple, int, Route]]] = {}
            regex: list[tuple[tuple, int, Route]] = []
            for (kind, canonical, _cond), cands in slots[level_key].items():
                cands.sort(key=lambda c: (c[0], c[1]))
                winner = cands[0]
                for loser in cands[1:]:
                    lr = loser[2]
                    conflicts.append(f"host {shown or '*'} {lr.path_kind} {lr.path!r}: {lr.source} ignored, "
                                     f"{winner[2].source} wins ({_loss_reason(winner, loser)})")
                target = exact if kind == EXACT else prefix if kind == PREFIX else None
                if target is None:
                    regex.append(winner)
                else:
                    target.setdefault(canonical, []).append(winner)
            def ordered(cands: list) -> tuple[Route, ...]:
                cands.sort(key=lambda c: (c[0], c[1]))
                return tuple(c[2] for c in cands)
            ex = {k: ordered(v) for k, v in exact.items()}
            px = {k: ordered(v) for k, v in prefix.items()}
            rx = ordered(regex)
            plain = not rx and all(r.conditions is None for rs in (*ex.values(), *px.values()) for r in rs)
            plain_table = plain_table and plain
            hosts[level_key] = _VirtualHost(MappingProxyType(ex), MappingProxyType(px),
                                            max(map(len, px), default=-1), rx, plain)
            # describe(): evaluation order within the host (longest first, Exact before Prefix).
            listed = [(k, EXACT, rs) for k, rs in ex.items()] + [(k, PREFIX, rs) for k, rs in px.items()]
            listed.sort(key=lambda t: (-len(t[0]), t[1] != EXACT, t[0]))
            if regex_first:
                listed = [t for t in listed if t[1] == EXACT] + [("", REGEX, rx)] + [t for t in listed if t[1] != EXACT]
            else:
                listed.append(("", REGEX, rx))
            for _k, _kind, rs in listed:
                for r in rs:
                    rows.append(_row(shown, r))
        if default is not None:
            rows.append(_row(None, default))
        wild = {h: v for (lvl, h), v in hosts.items() if lvl == 1}
        return cls(
            MappingProxyType({h: v for (lvl, h), v in hosts.items() if lvl == 0}),
            MappingProxyType(wild),
            tuple(sorted({len(h) for h in wild}, reverse=True)),
            hosts.get((2, "")),
            default,
            tuple(MappingProxyType(r) for r in rows),
            label_wildcards, host_fallthrough, regex_first, plain_table,
            tuple(conflicts), tuple(skipped),
        )

    @classmethod
    def empty(cls) -> RouteTable:
        return cls.build(())

    def match(self, host: str, path: str, request: Any = None) -> Route | None:
        """Route one request.

        ``host``: the raw Host / :authority value (any case, maybe ":port", maybe a trailing
        dot). ``path``: the canonical path from ``normalize_request_path``. ``request``: what
        conditions are tested against (see ``Conditions.holds``); may be None for a ``plain``
        table. None: no route and no default -> 404.
        """
        h = request_host(host)
        rf = self.regex_first
        fall = self.host_fallthrough
        if h:
            vh = self._exact_hosts.get(h)
            if vh is not None:
                r = vh.lookup(path, request, rf)
                if r is not None or not fall:
                    return r if r is not None else self._default
            if self._wildcard_hosts:
                if self.label_wildcards:
                    dot = h.find(".")
                    if dot > 0:  # "*.foo.com" covers exactly one non-empty label
                        vh = self._wildcard_hosts.get(h[dot + 1:])
                        if vh is not None:
                            r = vh.lookup(path, request, rf)
                            if r is not None or not fall:
                                return r if r is not None else self._default
                else:
                    # "*.foo.com" covers any name ending in ".foo.com"; the longest suffix wins.
                    for n in self._wildcard_lengths:
                        if len(h) > n + 1 and h[-n - 1] == ".":
                            vh = self._wildcard_hosts.get(h[-n:])
                            if vh is not None:
                                r = vh.lookup(path, request, rf)
                                if r is not None or not fall:
                                    return r if r is not None else self._default
        vh = self._any_host
        if vh is not None:
            r = vh.lookup(path, request, rf)
            if r is not None:
                return r
        return self._default

    def routes(self) -> Iterable[Route]:
        """Every route that can answer, default last (for metrics, describe, pools)."""
        seen: set[int] = set()
        for vh in (*self._exact_hosts.values(), *self._wildcard_hosts.values(),
                   *((self._any_host,) if self._any_host is not None else ())):
            for rs in (*vh.exact.values(), *vh.prefix.values(), vh.regex):
                for r in rs:
                    if id(r) not in seen:
                        seen.add(id(r))
                        yield r
        if self._default is not None:
            yield self._default

    def describe(self) -> list[dict]:
        """JSON-able rows in evaluation order: exact hosts, wildcards, any host, default."""
        return [dict(r) for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"RouteTable(routes={len(self._rows)}, hosts={len(self._exact_hosts)}, "
                f"wildcards={len(self._wildcard_hosts)}, conflicts={len(self.conflicts)})")


def _row(host: str | None, r: Route) -> dict[str, object]:
    row: dict[str, object] = {"host": host, "path": r.path, "pathType": r.written_kind or r.path_kind, "route": r.name,
                              "source": r.source,
                              "backend": ", ".join(str(b) for b in r.action.backends) or "-"}
    if r.conditions is not None:
        c = r.conditions
        if c.method is not None:
            row["method"] = c.method.decode()
        if c.headers:
            row["headers"] = [h.name.decode() for h in c.headers]
        if c.query:
            row["query"] = [q.name for q in c.query]
    if r.action.redirect is not None:
        row["redirect"] = r.action.redirect.status
    return row


def _loss_reason(winner: tuple, loser: tuple) -> str:
    """Why ``winner`` (rank, index, route) beat ``loser`` for the same slot."""
    if winner[2].source == loser[2].source:
        return "listed twice in the same object, first one wins"
    return "the older one wins, then namespace/name order"
