"""What the data plane listens on: L4 listeners (Service ports, Gateway TCP / TLS passthrough
listeners) and L7 listeners (Gateway HTTP / HTTPS listeners, mesh Service ports served per
request). Plain frozen data, built by the snapshot builder and read by ``l4`` and ``l7``.

An ``L4Listener`` forwards each connection to one backend. A Gateway's TCP or TLS listener
may instead carry ``routes`` (``L4Routes``): the backend is chosen per connection among the
weighted backends of the route that matches - for TLS passthrough by the server name of the
ClientHello (SNI), peeked before anything is forwarded. A weighted choice may land on an
invalid reference (a missing Service, a reference without its ReferenceGrant); such a
connection is refused, as the Gateway API asks ("connection rejections must respect weight").
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["HTTPListener", "L4Listener", "L4Routes", "WeightedBackends"]


@dataclass(frozen=True, slots=True)
class WeightedBackends:
    """The backends of one TCPRoute / TLSRoute rule. ``backends``: (backend key or None for an
    invalid reference, weight). ``name`` labels it ("TLSRoute ns/name")."""
    name: str
    backends: tuple[tuple[tuple[str, str, str] | None, int], ...]
    _cumulative: tuple[int, ...] = field(init=False, default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        weights = [max(0, w) for _, w in self.backends]
        object.__setattr__(self, "_cumulative", tuple(accumulate(weights)) if sum(weights) else ())

    def pick(self, rand: float) -> tuple[str, str, str] | None:
        """The backend key for one connection (``rand`` in [0, 1)); None: refuse it."""
        cum = self._cumulative
        if not cum:
            return None
        return self.backends[bisect_right(cum, int(rand * cum[-1]))][0]


@dataclass(frozen=True, slots=True)
class L4Routes:
    """Per-connection choice among routes. ``sni``: peek the TLS ClientHello's server name
    first (TLS passthrough). Without SNI routing only ``default`` applies. With it, a server
    name picks, in order: its exact entry, the longest wildcard suffix (``"*.example.com"``
    covers one or more labels), then ``default`` (a route that accepts any name). None: the
    connection is refused."""
    sni: bool
    default: WeightedBackends | None = None
    exact: Mapping[str, WeightedBackends] = field(default_factory=lambda: MappingProxyType({}))
    wildcard: Mapping[str, WeightedBackends] = field(default_factory=lambda: MappingProxyType({}))
    _lengths: tuple[int, ...] = field(init=False, default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lengths", tuple(sorted({len(k) for k in self.wildcard}, reverse=True)))

    def choose(self, server_name: str | None) -> WeightedBackends | None:
        if not self.sni or not server_name:
            return self.default
        host = server_name.lower().rstrip(".")
        hit = self.exact.get(host)
        if hit is not None:
            return hit
        for n in self._lengths:                      # key: the suffix after "*."
            if len(host) > n + 1 and host[-n - 1] == ".":
                hit = self.wildcard.get(host[-n:])
                if hit is not None:
                    return hit
        return self.default

    def backend_keys(self) -> set[tuple[str, str, str]]:
        out = set()
        for wb in (self.default, *self.exact.values(), *self.wildcard.values()):
            if wb is not None:
                out.update(k for k, _ in wb.backends if k is not None)
        return out


@dataclass(frozen=True, slots=True)
class L4Listener:
    host: str
    port: int
    backend: tuple[str, str, str]
    scope: str                            # "cluster" (ClusterIP), "node" (NodePort), "external" (LB / externalIPs), "gateway"
    local_only: bool                      # traffic policy Local for this scope
    # Gateway TCP / TLS listeners: the backend is chosen per connection (``backend`` is then
    # only the label of the listener's first route, for metrics).
    routes: L4Routes | None = None
    protocol: str = "TCP"                 # TCP (in Snapshot.l4) or UDP (in Snapshot.udp)


@dataclass(frozen=True, slots=True)
class HTTPListener:
    """An address the L7 server serves with its own route table: a Gateway listener (or several
    Gateway listeners on one address and port, their routes merged), or a Service port handled
    per request in the mesh. ``name`` says what it is ("Gateway ns/name", "Service ns/name:port")
    for logs and /debug; ``tls_hosts`` maps an SNI host ("" = default, "*.x" wildcards) to the
    Secret key in ``Snapshot.secrets`` whose certificate answers it (empty for plain text).

    ``routes`` has RouteTable's reading interface (``match(host, path, request)``, ``plain``,
    ``routes()``, ``describe()``): for Gateway listeners it is a
    ``meshproxy.core.gateway_tables.ListenerRouter``, which first picks the Gateway listener
    by the request's host (listener isolation) and then matches in that listener's table."""
    host: str
    port: int
    name: str
    routes: Any
    tls: bool = False
    tls_hosts: Mapping[str, tuple[str, str]] = field(default_factory=lambda: MappingProxyType({}))
