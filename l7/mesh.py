"""HTTP in the mesh sidecar: the L7 servers of ``meshproxy run --sidecar`` and the inbound
request filter (authorization per request, ``x-forwarded-client-cert``).

A sidecar has two ``MeshServer``s, one per direction, each the context of the exchanges of its
connections (its own upstream pool and its own request metrics, labelled
``ingress="mesh-outbound"`` / ``"mesh-inbound"``). They bind nothing: the sidecar accepts the
captured connections itself and hands each HTTP one over with ``serve`` (``MeshListener`` is
what a ``ClientConnection`` needs of a listener, for one connection).

Inbound requests go through ``InboundFilter`` (an extension filter, ``Action.filters``):

- the workload's AuthorizationPolicies decide per request with the caller's verified identity
  (``MeshPeer``, fixed when the connection was accepted); denied: 403, counted with the
  caller's identity (``meshproxy_mesh_authz_decisions_total``);
- the request is counted in the golden metrics with the caller's identity (``client_id``: the
  route's stats child of that identity, ``l7.stats.RouteStats.for_client``) and the identity is
  put on the request's span: done here, so that no other server pays a lookup for it;
- ``x-forwarded-client-cert`` is sanitize-and-set: the route removes whatever the client sent
  (``HeaderEdits``), the filter adds ``By=<own ID>;Hash=<caller's leaf SHA-256>;URI=<caller's
  ID>`` for a caller that proved an identity; a plaintext caller's request reaches the
  application without the header.

Invariants: a connection's ``MeshPeer`` is computed once, after its handshake, before any
request is read; a request whose connection has none is refused (never forwarded unchecked);
the policy is read from the snapshot of the exchange, so a policy change applies to the next
request, also on connections that are already open.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Callable

from meshproxy.core.policy import ALLOW_NO_POLICY, HttpRequest, Peer
from meshproxy.core import metrics
from meshproxy.core.routes import PREFIX, Action, BackendRef, HeaderEdits, Route, RouteEntry, RouteTable

from .downstream import ClientConnection
from .server import IngressServer

__all__ = ["MeshServer", "MeshListener", "MeshPeer", "MeshClientConnection", "InboundFilter", "inbound_table",
           "XFCC", "DENIED_BODY"]

log = logging.getLogger("meshproxy.mesh")

XFCC = b"x-forwarded-client-cert"
DENIED_BODY = b"RBAC: access denied\n"     # Envoy's body for a request its RBAC filter denies


@dataclass(frozen=True, slots=True)
class MeshPeer:
    """The caller of one inbound connection, as policy and the application see it."""
    peer: Peer                       # address and verified identity ("" principal: plaintext)
    port: int                        # the workload port the connection was for
    dest_ip: Any                     # the pod address it was for (ipaddress object)
    xfcc: bytes | None               # the x-forwarded-client-cert value, None for plaintext


class MeshListener:
    """The listener side of one captured connection (``ClientConnection`` counts and reads it).
    ``http``: the HTTPListener whose routes serve the next request - looked up again for every
    request with ``lookup`` when given, so a keep-alive connection follows route changes (the
    last one found stays when the address has none any more)."""

    __slots__ = ("tls", "_http", "lookup", "port", "port_b", "local_host")

    def __init__(self, http, host: str, port: int, tls: bool, lookup: Callable[[], Any] | None = None) -> None:
        self.tls = tls
        self._http = http
        self.lookup = lookup
        self.port = port
        self.port_b = b"%d" % port
        self.local_host = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()

    @property
    def http(self):
        lookup = self.lookup
        if lookup is not None:
            current = lookup()
            if current is not None:
                self._http = current
        return self._http

    def opened(self) -> None:
        pass

    def closed(self) -> None:
        pass


class MeshClientConnection(ClientConnection):
    """A client connection of the sidecar: ``opener(conn, transport)`` runs first (after the
    TLS handshake, when there is one) and returns the connection's ``MeshPeer`` - or False to
    refuse the connection before anything is read."""

    __slots__ = ("mesh", "opener")

    def __init__(self, server, listener, opener: Callable[[Any, Any], Any] | None = None) -> None:
        super().__init__(server, listener)
        self.mesh: MeshPeer | None = None
        self.opener = opener

    def connection_made(self, transport) -> None:
        if self.opener is not None:
            try:
                info = self.opener(self, transport)
            except Exception:  # noqa: BLE001 - no exception may escape a protocol callback
                log.exception("mesh: internal error accepting a connection")
                info = False
            if info is False:
                self.transport = transport
                transport.abort()
                return
            self.mesh = info
        super().connection_made(transport)


def _headers(head) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in head.headers:
        k = name.decode("latin-1").lower()
        v = value.decode("latin-1")
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


class InboundFilter:
    """Authorization and x-forwarded-client-cert for inbound requests (module docstring)."""

    __slots__ = ("_children",)

    def __init__(self) -> None:
        self._children: dict[tuple, Any] = {}      # (decision, client_id) -> counter child

    def _count(self, decision, peer: Peer) -> None:
        key = (decision, peer.principal)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 4096:   # identities are bounded; this only guards the memo
                self._children.clear()
            child = self._children[key] = metrics.mesh_authz.labels(
                "http", "allow" if decision.allowed else "deny", decision.reason, decision.policy,
                metrics.client_id_label(peer.client_id))
        child.inc()

    def on_request(self, exchange) -> None:
        info = getattr(exchange.down, "mesh", None)
        snap = exchange.snap
        mesh = getattr(snap, "mesh", None)
        if info is None or mesh is None:
            # Not a connection the sidecar accepted and checked: never forwarded unchecked.
            exchange.answer(403, DENIED_BODY, ((b"Content-Type", b"text/plain"),))
            return
        client_id = info.peer.client_id
        if client_id:
            stats = exchange.stats
            if stats is not None:
                exchange.stats = stats.for_client(client_id)
            trace = exchange.trace
            if trace is not None:
                trace.client_id = client_id
        wp = mesh.policy
        if wp.allows_everything:
            decision = ALLOW_NO_POLICY
        else:
            head = exchange.head
            req = HttpRequest(head.method.decode("latin-1"), head.path.decode("latin-1"),
                              head.host.decode("latin-1"), _headers(head))
            decision = wp.authorize(info.peer, info.port, req, info.dest_ip)
        self._count(decision, info.peer)
        if not decision.allowed:
            exchange.answer(403, DENIED_BODY, ((b"Content-Type", b"text/plain"),))
            return
        if info.xfcc is not None:
            exchange.add_request_header(XFCC, info.xfcc)


_REMOVE_XFCC = HeaderEdits(remove=(XFCC,))


def inbound_table(name: str, source: str, key: tuple[str, str, str], timeout: float,
                  filt: InboundFilter) -> RouteTable:
    """Every request of one inbound port to the application (``key``: its backend), through
    ``filt``, with the client's x-forwarded-client-cert removed. One attempt: the application
    is one local address, nothing else could be tried."""
    action = Action(backends=(BackendRef(key, 1),), timeout=timeout, attempts=1, request_headers=_REMOVE_XFCC,
                    filters=(filt,))
    route = Route(name=name, source=source, host=None, path_kind=PREFIX, path="/", action=action)
    return RouteTable.build([RouteEntry(None, route, ())], label_wildcards=False, host_fallthrough=True)


class MeshServer(IngressServer):
    """The L7 context of one direction of the sidecar (module docstring). ``runtime``: for the
    inbound direction a view whose snapshot also holds the application's ports as backends."""

    def __init__(self, runtime, direction: str) -> None:
        super().__init__(runtime)
        self.direction = direction
        self.stats_label = f"mesh-{direction}"

    def apply(self, snapshot) -> None:
        # Nothing to bind: only the pool follows the snapshot (idle connections to pods that
        # left are closed).
        if self.pool is not None and snapshot is not None:
            self.pool.apply(snapshot)
        if self.h2pool is not None and snapshot is not None:
            self.h2pool.apply(snapshot)

    async def serve(self, sock, listener: MeshListener, ssl_ctx=None, opener=None) -> None:
        """Serve one accepted socket as an HTTP client connection (over TLS with ``ssl_ctx``)."""
        kwargs = {}
        if ssl_ctx is not None:
            kwargs = {"ssl": ssl_ctx, "ssl_handshake_timeout": self.settings.header_timeout}
        await self.loop.connect_accepted_socket(lambda: MeshClientConnection(self, listener, opener), sock, **kwargs)


def ip_object(text: str):
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
