"""Route tables of Gateway listeners and mesh Service ports.

One address and port can carry several Gateway listeners that differ by hostname. The
Gateway API requires *listener isolation*: a request is handled by exactly one listener -
the one whose hostname matches the request's host most specifically (exact, then the longest
wildcard suffix, then a listener without hostname) - and only by the routes attached to that
listener; a request that matches none of its routes gets 404 even when another listener's
routes would match. ``ListenerRouter`` is that two-step lookup; it reads like a ``RouteTable``
(``match``, ``plain``, ``routes()``, ``describe()``) so the L7 server uses either the same way.

Within one listener the precedence is the API's: hosts from the most specific (exact, then
longer wildcard suffixes, then routes without hostnames - a host level whose rules do not
match falls through to the next), then Exact path, longest PathPrefix (RegularExpression
paths after Exact and before PathPrefix: implementation-specific, chosen so that a catch-all
prefix does not hide them), then method match, most header matches, most query matches,
then the oldest route, namespace/name, rule order and match order (the ``rank`` each entry
carries). ``*.`` wildcards cover one or more labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from .gateway_rules import CompiledRoute
from .hostnames import ANY
from .listeners import L4Routes, WeightedBackends
from .paths import request_host
from .routes import PREFIX, Action, BackendRef, Route, RouteEntry, RouteTable

__all__ = ["ListenerTable", "ListenerRouter", "build_table", "default_table", "build_l4_routes"]


@dataclass(frozen=True, slots=True, eq=False)
class ListenerTable:
    """The routes of one Gateway listener (``name``: "ns/gateway/listener")."""
    name: str
    hostname: str | None
    table: RouteTable


def _by_host(items: Iterable[tuple[str | None, Any]]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    exact: dict[str, Any] = {}
    wildcard: dict[str, Any] = {}
    default = None
    for host, item in items:
        if not host or host == ANY:
            default = default if default is not None else item
        elif host.startswith("*."):
            wildcard.setdefault(host[2:], item)
        else:
            exact.setdefault(host, item)
    return exact, wildcard, default


def _select(host: str, exact: Mapping[str, Any], wildcard: Mapping[str, Any], lengths: tuple[int, ...],
            default: Any) -> Any:
    hit = exact.get(host)
    if hit is not None:
        return hit
    for n in lengths:                                  # longest suffix first
        if len(host) > n + 1 and host[-n - 1] == ".":
            hit = wildcard.get(host[-n:])
            if hit is not None:
                return hit
    return default


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class ListenerRouter:
    """Picks the Gateway listener by host, then matches in its table (see the module docstring)."""
    exact: Mapping[str, ListenerTable]
    wildcard: Mapping[str, ListenerTable]      # key: the suffix after "*."
    default: ListenerTable | None
    _lengths: tuple[int, ...] = field(init=False, default=())
    plain: bool = field(init=False, default=True)
    conflicts: tuple[str, ...] = field(init=False, default=())
    skipped: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        tables = self.tables()
        object.__setattr__(self, "_lengths", tuple(sorted({len(k) for k in self.wildcard}, reverse=True)))
        object.__setattr__(self, "plain", all(t.table.plain for t in tables))
        object.__setattr__(self, "conflicts", tuple(c for t in tables for c in t.table.conflicts))
        object.__setattr__(self, "skipped", tuple(c for t in tables for c in t.table.skipped))

    @classmethod
    def build(cls, listeners: Iterable[ListenerTable]) -> ListenerRouter:
        exact, wildcard, default = _by_host((lt.hostname, lt) for lt in listeners)
        return cls(MappingProxyType(exact), MappingProxyType(wildcard), default)

    def tables(self) -> list[ListenerTable]:
        out = [*self.exact.values(), *self.wildcard.values()]
        if self.default is not None:
            out.append(self.default)
        return out

    def select(self, host: str) -> ListenerTable | None:
        """The listener a request for ``host`` (a raw Host / :authority or SNI value) belongs to."""
        return _select(request_host(host), self.exact, self.wildcard, self._lengths, self.default)

    def listener_of(self, host: str) -> str | None:
        """Its name: an HTTPS request whose SNI and Host select different listeners is
        misdirected (421)."""
        lt = self.select(host)
        return lt.name if lt is not None else None

    def match(self, host: str, path: str, request: Any = None) -> Route | None:
        lt = self.select(host)
        return lt.table.match(host, path, request) if lt is not None else None

    def routes(self) -> Iterable[Route]:
        for lt in self.tables():
            yield from lt.table.routes()

    def describe(self) -> list[dict]:
        rows = []
        for lt in self.tables():
            for row in lt.table.describe():
                rows.append({"listener": lt.name, **row})
        return rows

    def __len__(self) -> int:
        return sum(len(lt.table) for lt in self.tables())

    def __repr__(self) -> str:
        return f"ListenerRouter(listeners={len(self.tables())}, routes={len(self)})"


def build_table(attachments: Iterable[tuple[CompiledRoute, tuple[str, ...]]], scheme: str, port: int) -> RouteTable:
    """The table of one listener (or mesh Service port) of ``scheme`` on ``port``, from its
    routes and the hostnames each is reached by (ANY: every host)."""
    entries = []
    for compiled, hostnames in attachments:
        base = compiled.rank_base
        kind = compiled.route.kind
        for rule in compiled.rules:
            _, routes = rule.routes_for(scheme, port)
            for m, r in zip(rule.matches, routes):
                method, headers, query = m.counts
                rank = (-method, -headers, -query, *base, kind, rule.index, m.index)
                for h in hostnames:
                    entries.append(RouteEntry(None if h == ANY else h, r, rank))
    return RouteTable.build(entries, label_wildcards=False, host_fallthrough=True, regex_first=True)


def default_table(name: str, key: tuple[str, str, str], timeout: float) -> RouteTable:
    """A mesh Service port served per request with no route governing it: everything to the
    Service itself."""
    action = Action(backends=(BackendRef(key, 1),), timeout=timeout)
    route = Route(name=name, source=f"Service {name}", host=None, path_kind=PREFIX, path="/", action=action)
    return RouteTable.build([RouteEntry(None, route, ())], label_wildcards=False, host_fallthrough=True)


def build_l4_routes(listeners: Iterable[tuple[str | None, list[tuple[str, tuple[str, ...], WeightedBackends]]]],
                    sni: bool) -> L4Routes:
    """The per-connection choice of a TCP or TLS passthrough address. ``listeners``: for each
    Gateway listener there, its hostname and its routes (kind, hostnames, weighted backends),
    oldest route first. With SNI routing the listener is chosen by the server name first
    (listener isolation), then the route by its intersected hostnames; the oldest route keeps
    a hostname claimed twice."""
    per_listener = []
    for hostname, routes in listeners:
        items = []
        for kind, hosts, wb in routes:
            if kind == "TCPRoute" or not sni:
                items.append((ANY, wb))
            else:
                items.extend((h, wb) for h in hosts)
        exact, wildcard, default = _by_host(items)
        inner = L4Routes(sni=sni, default=default, exact=MappingProxyType(exact), wildcard=MappingProxyType(wildcard))
        per_listener.append((hostname, inner))
    if not sni:
        first = per_listener[0][1] if per_listener else L4Routes(sni=False)
        return first
    exact, wildcard, default = _by_host(per_listener)
    return _Nested.build(exact, wildcard, default)


_REFUSE = WeightedBackends("no route for this server name", ())


class _Nested:
    """Flattens listener selection + route selection into one ``L4Routes``: a server name is
    first given to its listener; within it, to that listener's routes. Because each route
    hostname lies within its listener's hostname, the flattened tables can be built per
    listener and then restricted to the names that listener owns."""

    @staticmethod
    def build(exact: dict[str, L4Routes], wildcard: dict[str, L4Routes], default: L4Routes | None) -> L4Routes:
        lengths = tuple(sorted({len(k) for k in wildcard}, reverse=True))

        def owner(host_pattern: str) -> L4Routes | None:
            if host_pattern.startswith("*."):
                # a wildcard name belongs to the listener selected by any name it covers: its suffix
                probe = "x" + host_pattern[1:]
            else:
                probe = host_pattern
            return _select(probe, exact, wildcard, lengths, default)

        out_exact: dict[str, WeightedBackends] = {}
        out_wild: dict[str, WeightedBackends] = {}
        out_default = None
        for lst in (*exact.values(), *wildcard.values(), *((default,) if default is not None else ())):
            for h, wb in lst.exact.items():
                if owner(h) is lst:
                    out_exact.setdefault(h, wb)
            for s, wb in lst.wildcard.items():
                if owner("*." + s) is lst:
                    out_wild.setdefault(s, wb)
        # Every name a listener owns that none of its routes names goes to the listener's
        # catch-all route, or is refused - never to a less specific listener's routes.
        for h, lst in exact.items():
            out_exact.setdefault(h, lst.default or _REFUSE)
        for s, lst in wildcard.items():
            out_wild.setdefault(s, lst.default or _REFUSE)
        if default is not None:
            out_default = default.default
        return L4Routes(sni=True, default=out_default, exact=MappingProxyType(out_exact),
                        wildcard=MappingProxyType(out_wild))
