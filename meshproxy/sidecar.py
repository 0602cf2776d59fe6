"""The mesh data path of ``meshproxy run --sidecar``: the outbound port (15001) and the inbound
port (15006) that ``meshproxy capture`` sends a pod's TCP to (docs/mesh.md, "The data path").

Outbound (connections the application makes; the destination comes from SO_ORIGINAL_DST):

- a ClusterIP port served per request (``appProtocol: http`` or an HTTPRoute attached to the
  Service) -> the outbound ``MeshServer``: one exchange per request, an endpoint per request,
  pooled keep-alive connections - over mutual TLS to meshed pods (``UpstreamPool.security``,
  keyed by the identity the pod must have), in plain text to the others;
- any other ClusterIP port -> an endpoint per connection, opaque bytes (``l4.relay``), inside
  mutual TLS when the endpoint's pod is meshed;
- a pod address -> that pod, opaque, mutual TLS when it is meshed;
- an unused address of ``--service-cidr`` -> refused; anything else -> passed through as is.

Inbound (connections to the pod's ports): the first bytes are peeked. A TLS ClientHello is the
mesh's mutual TLS unless the port's mode is DISABLE; its ALPN (``meshproxy.core.mesh``) says
whether HTTP or opaque bytes follow (without ALPN, the port's own appProtocol says). Plain text
is refused under STRICT. Then AuthorizationPolicy: per request for HTTP (403, inside the
``InboundFilter`` which also sets x-forwarded-client-cert), once per connection for TCP (closed
when denied). What passes goes to the application at the address and port it was sent to.

Invariants:
- a connection's decisions use the snapshot read when it was accepted, except HTTP requests,
  which read the snapshot in force per request (a policy change applies to the next request);
- the TLS contexts are rebuilt from each new SVID (``IdentityStore.subscribe``); connections
  keep the context they were made with, so a rotation drops nothing;
- nothing is forwarded to a meshed destination in plain text: without an identity, or when the
  peer's certificate names another identity, the connection fails;
- our own outgoing connections are remembered by local address while open, so a connection
  that comes back to the outbound port from one of them (capture not skipping our uid) is
  refused instead of looping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import socket
from types import MappingProxyType

from discovery.endpoints import Endpoint
from l4.relay import RelayError, Side, accept_side, connect_side, link
from l7.mesh import InboundFilter, MeshListener, MeshPeer, MeshServer, inbound_table, ip_object
from l7.upstream import UpstreamSecurity

from .core import metrics
from .core.identity import IdentityError, MeshTls, client_context, is_tls_client_hello, peer_identity, \
    server_context, xfcc_value
from .core.listeners import HTTPListener
from .core.mesh import (
    ALPN_HTTP,
    ALPN_TCP,
    HTTP,
    INCOMPLETE,
    LOOP,
    PASSTHROUGH,
    POD,
    REJECT,
    TCP,
    client_hello_alpn,
    classify,
    looks_like_http,
)
from .core.policy import DISABLE, STRICT, Peer
from .core.runtime import Runtime
from .core.snapshot import Backend
from .core.sockets import original_dst

__all__ = ["Sidecar", "MeshContexts"]

log = logging.getLogger("meshproxy.mesh")

_MAX_HELLO = 2 * (16384 + 5)
_CONNECT_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True, slots=True)
class MeshContexts:
    """The TLS contexts of one SVID: per direction, one per ALPN (HTTP or opaque TCP)."""
    own: object                 # our SpiffeId
    server_http: object
    server_tcp: object
    client_http: object
    client_tcp: object
    version: int


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def _listen(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)   # IPv4 has its own socket
        s.bind((host, port))
        s.listen(1024)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class InboundView:
    """The runtime as the inbound L7 server sees it: the snapshot in force plus one backend per
    inbound HTTP port of the application (its own address), derived lazily and cached until the
    snapshot or the set of ports changes."""

    def __init__(self, runtime: Runtime, filt: InboundFilter) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.balancers = runtime.balancers
        self.identity = runtime.identity
        self.filter = filt
        self.ports: dict[tuple[str, int], HTTPListener] = {}     # (app address, port) -> its listener
        self._base = None
        self._derived = None
        self.on_change = None             # called with each new derived snapshot

    @property
    def access_log(self):
        return self.runtime.access_log

    @property
    def draining(self) -> bool:
        return self.runtime.draining

    def _key(self, addr: tuple[str, int]) -> tuple[str, str, str]:
        mesh = self._base.mesh if self._base is not None else None
        ns = mesh.me.namespace if mesh is not None else (self.settings.pod_namespace or "default")
        return (ns, "inbound", f"{addr[0]}:{addr[1]}")

    def listener(self, addr: tuple[str, int]) -> HTTPListener:
        """The HTTP listener (route table) of an inbound address; added on first use."""
        lst = self.ports.get(addr)
        if lst is None:
            key = self._key(addr)
            name = f"inbound:{addr[1]}"
            table = inbound_table(name, f"Inbound {key[0]}/{self.settings.pod_name or ''}", key,
                                  self.settings.upstream_timeout, self.filter)
            lst = self.ports[addr] = HTTPListener(addr[0], addr[1], f"Inbound {name}", table)
            self._derived = None
        return lst

    @property
    def snapshot(self):
        base = self.runtime.snapshot
        derived = self._derived
        if base is self._base and derived is not None:
            return derived
        self._base = base
        if base is None:
            return None
        backends = dict(base.backends)
        for addr in self.ports:
            key = self._key(addr)
            ep = Endpoint(addr[0], addr[1], self.settings.pod_name)
            backends[key] = Backend(key, key[0], key[1], key[2], addr[1], (ep,), (ep,), (ep,))
        derived = self._derived = dataclasses.replace(base, backends=MappingProxyType(backends))
        if self.on_change is not None:
            self.on_change(derived)
        return derived


class Sidecar:
    """The two captured ports of one pod and everything behind them (module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = s = runtime.settings
        self.loop = asyncio.get_running_loop()
        self.filter = InboundFilter()
        self.outbound = MeshServer(runtime, "outbound")
        self.view = InboundView(runtime, self.filter)
        self.inbound = MeshServer(self.view, "inbound")
        self.contexts: MeshContexts | None = None
        self.listeners: list[tuple[socket.socket, str]] = []
        self.own_listen: set[tuple[str, int]] = set()
        self.own_out: set[tuple[str, int]] = set()      # local addresses of our open outgoing relays
        self.relays: set[Side] = set()
        self.tasks: set[asyncio.Task] = set()
        self._security: dict[tuple[str, int], UpstreamSecurity | None] = {}
        self.stopped = False
        self.timeout = s.connect_timeout
        if s.proxy_uid is not None and hasattr(os, "getuid") and os.getuid() != s.proxy_uid:
            log.warning("--proxy-uid %d but this process runs as uid %d: capture will send the sidecar's own "
                        "connections back to it (they are refused as loops)", s.proxy_uid, os.getuid())

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self.outbound.start()
        await self.inbound.start()
        self.outbound.pool.security = self.upstream_security
        # Streams to h2c / grpc ports go over the same mutual TLS (l7.h2_upstream).
        self.outbound.h2pool.security = self.upstream_security
        self.view.on_change = self.inbound.apply
        outbound_hosts = [s.outbound_host] + (["::1"] if s.outbound_host == "127.0.0.1" else [])
        for host in outbound_hosts:
            self._bind(host, s.outbound_port, "outbound", required=host == s.outbound_host)
        if s.inbound_host in ("::", ""):
            # Every address, one socket per family (a dual-stack socket would show IPv4 callers
            # as ::ffff:a.b.c.d to policy ipBlocks and in X-Forwarded-For).
            self._bind("0.0.0.0", s.inbound_port, "inbound", required=True)
            self._bind("::", s.inbound_port, "inbound", required=False)
        else:
            self._bind(s.inbound_host, s.inbound_port, "inbound", required=True)
        self.runtime.identity.subscribe(self._on_identity)
        if self.runtime.identity.current is not None:
            self._on_identity(self.runtime.identity.current)
        self.runtime.subscribe(self.apply)

    def _bind(self, host: str, port: int, kind: str, required: bool) -> None:
        try:
            sock = _listen(host, port)
        except OSError as exc:
            if required:
                raise OSError(exc.errno, f"sidecar {kind} port {host}:{port}: {exc.strerror}") from None
            log.info("sidecar: %s port not bound on %s:%d (%s)", kind, host, port, exc.strerror)
            return
        bound = sock.getsockname()[:2]
        self.own_listen.add((bound[0], bound[1]))
        if host in ("::", "0.0.0.0"):
            self.own_listen.add(("0.0.0.0", bound[1]))
            self.own_listen.add(("::", bound[1]))
        self.listeners.append((sock, kind))
        handler = self._on_outbound if kind == "outbound" else self._on_inbound
        self.loop.add_reader(sock.fileno(), self._accept, sock, handler)
        log.info("sidecar: %s port %s:%d", kind, host, bound[1])

    def ports(self) -> dict[str, int]:
        return {kind: sock.getsockname()[1] for sock, kind in self.listeners}

    def apply(self, snap) -> None:
        self._security.clear()
        self.outbound.apply(snap)
        # the inbound view derives its snapshot lazily; touch it so the pool follows now
        self.view.snapshot  # noqa: B018

    def _on_identity(self, tls: MeshTls) -> None:
        svid = tls.svid
        try:
            self.contexts = MeshContexts(svid.spiffe_id, server_context(svid, (ALPN_HTTP, ALPN_TCP)),
                                         server_context(svid, (ALPN_TCP,)), client_context(svid, (ALPN_HTTP,)),
                                         client_context(svid, (ALPN_TCP,)), tls.version)
        except (OSError, ValueError) as exc:
            log.error("sidecar: TLS refused the new SVID %s (%s); keeping the previous one", svid.spiffe_id, exc)
            return
        # New connections present the new SVID. Requests in flight finish on the connections
        # they have; idle pooled connections made with an older SVID are closed, so the next
        # requests handshake with the new one (pool keys carry the SVID version).
        self._security.clear()
        pool = self.outbound.pool
        if pool is not None:
            version = tls.version
            pool.drop_idle(lambda key: not isinstance(key[1], tuple) or key[1][1] == version)
        log.info("sidecar: identity %s serial %s in force for new connections", svid.spiffe_id, svid.serial)

    async def stop_accepting(self) -> None:
        self.stopped = True
        for sock, _ in self.listeners:
            try:
                self.loop.remove_reader(sock.fileno())
            except (OSError, ValueError):
                pass
            sock.close()
        self.listeners = []

    async def drain(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while self.relays and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for side in list(self.relays):
            side.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(self.outbound.drain(max(0.0, deadline - self.loop.time())),
                             self.inbound.drain(max(0.0, deadline - self.loop.time())), return_exceptions=True)

    # -- accepting ------------------------------------------------------------------------------

    def _accept(self, lsock: socket.socket, handler) -> None:
        for _ in range(64):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("sidecar: accept: %s", exc.strerror)
                return
            sock.setblocking(False)
            task = self.loop.create_task(handler(sock, peer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _peek(self, sock: socket.socket, size: int, timeout: float) -> bytes | None:
        """The bytes waiting on ``sock`` (not consumed): b"" when none came within ``timeout``,
        None when the client closed or reset."""
        loop = self.loop
        deadline = loop.time() + timeout
        fd = sock.fileno()
        while True:
            try:
                data = sock.recv(size, socket.MSG_PEEK)
                return data if data else None
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return None
            left = deadline - loop.time()
            if left <= 0:
                return b""
            fut = loop.create_future()
            loop.add_reader(fd, fut.set_result, None)
            try:
                async with asyncio.timeout(left):
                    await fut
            except TimeoutError:
                return b""
            finally:
                loop.remove_reader(fd)

    async def _client_hello(self, sock: socket.socket, first: bytes, timeout: float) -> tuple[str, ...] | None:
        """The ALPN names of the ClientHello waiting on ``sock`` (peeked whole)."""
        deadline = self.loop.time() + timeout
        data = first
        while True:
            offers = client_hello_alpn(data)
            if offers is not INCOMPLETE:
                return offers
            if self.loop.time() >= deadline:
                return None
            await asyncio.sleep(0.005)      # the rest of a split ClientHello is on its way
            data = await self._peek(sock, _MAX_HELLO, max(0.0, deadline - self.loop.time()))
            if data is None:
                return None

    # -- outbound -------------------------------------------------------------------------------

    async def _on_outbound(self, sock: socket.socket, peer) -> None:
        try:
            await self._outbound(sock, peer)
        except Exception:  # noqa: BLE001 - one connection's bug must not stop the sidecar
            log.exception("sidecar: internal error on an outbound connection")
            _reset(sock)

    async def _outbound(self, sock: socket.socket, peer) -> None:
        try:
            dst = self._original(sock)
        except OSError as exc:
            log.warning("sidecar: outbound connection from %s without an original destination (%s)", peer[0], exc)
            _reset(sock)
            return
        if (peer[0].removeprefix("::ffff:"), peer[1]) in self.own_out:
            dst = None
        snap = self.runtime.snapshot
        d = classify(snap, dst[0], dst[1], self.own_listen) if dst is not None and snap is not None else None
        kind = d.kind if d is not None else LOOP
        if kind in (LOOP, REJECT):
            if kind == LOOP:
                log.warning("sidecar: a connection to %s came back to the outbound port: refused (is the sidecar "
                            "running as --proxy-uid?)", dst)
            self._count("outbound", "tcp", "plaintext", "refused")
            _reset(sock)
            return
        if kind == HTTP:
            self._count("outbound", "http", "-", "accepted")
            runtime = self.runtime
            await self.outbound.serve(sock, MeshListener(
                d.listener, dst[0], dst[1], False,
                lambda: runtime.snapshot.http_listeners.get(dst) if runtime.snapshot is not None else None))
            return
        mesh = snap.mesh
        if kind == TCP:
            backend = snap.backends.get(d.backend_key)
            await self._outbound_tcp(sock, peer, backend, mesh)
            return
        pod = d.pod if kind == POD else None
        tls = mesh is not None and mesh.mtls_to(pod, dst[1])
        if await self._relay_out(sock, dst, pod if tls else None, None) is False:
            self._count("outbound", "tcp", "mtls" if tls else "plaintext", "no_endpoint")
            _reset(sock)          # the destination refused: so does the connection it came for
        elif kind == PASSTHROUGH:
            log.debug("sidecar: %s:%d passed through", *dst)

    async def _outbound_tcp(self, sock: socket.socket, peer, backend, mesh) -> None:
        balancers = self.runtime.balancers
        tried: frozenset = frozenset()
        for _ in range(_CONNECT_ATTEMPTS):
            ep = balancers.pick(backend, peer[0], False, tried) if backend is not None and backend.usable else None
            if ep is None:
                break
            pod = mesh.pods_by_ip.get(ep.ip) if mesh is not None else None
            tls = mesh is not None and mesh.mtls_to(pod, ep.port)
            balancers.acquire(ep)
            try:
                ok = await self._relay_out(sock, (ep.ip, ep.port), pod if tls else None, ep,
                                           release=functools.partial(balancers.release, ep))
            except BaseException:
                balancers.release(ep)
                raise
            if ok is None:                 # the client left while we connected
                balancers.release(ep)
                return
            if ok:
                return                     # linked: released when the relay ends
            balancers.release(ep)
            balancers.report_failure(ep, backend)
            tried = tried | {ep.addr}
        self._count("outbound", "tcp", "-", "no_endpoint")
        _reset(sock)

    async def _relay_out(self, sock: socket.socket, addr: tuple[str, int], pod, ep, release=None):
        """Relay the client's socket to ``addr`` (mutual TLS with ``pod``'s identity when
        ``pod`` is given). False: the connect failed (another endpoint may be tried) and the
        client socket is untouched; otherwise the relay owns it."""
        tls = pod is not None
        ctx = self.contexts
        if tls and ctx is None:
            log.warning("sidecar: no workload identity yet: %s:%d is meshed, refusing to reach it in plain text", *addr)
            return False
        try:
            up = await connect_side(self.loop, addr, self.timeout, f"to {addr[0]}:{addr[1]}", self._remember)
        except (OSError, TimeoutError) as exc:
            log.debug("sidecar: connect to %s:%d failed: %s", addr[0], addr[1], exc)
            return False
        self.relays.add(up)
        if tls:
            try:
                obj = await up.handshake(ctx.client_tcp, False, self.timeout)
                peer_identity(obj, self.settings.trust_domain, expected=pod.identity)
            except (RelayError, IdentityError, OSError) as exc:
                log.warning("sidecar: mutual TLS to %s:%d (%s/%s) refused: %s", addr[0], addr[1], pod.namespace,
                            pod.name, exc)
                up.abort()
                self._forget(up)
                return False
        try:
            down = await accept_side(self.loop, sock, "client")
        except OSError:
            up.abort()
            self._forget(up)
            return None
        self.relays.add(down)
        self._count("outbound", "tcp", "mtls" if tls else "plaintext", "accepted")

        def done(a: Side, b: Side) -> None:
            self.relays.discard(a)
            self._forget(b)
            if release is not None:
                release()
        link(down, up, done)
        return True

    def _remember(self, side: Side) -> None:
        local = side.transport.get_extra_info("sockname")
        if local:
            side.name = f"{side.name} from {local[0]}:{local[1]}"
            self.own_out.add((local[0], local[1]))

    def _forget(self, side: Side) -> None:
        self.relays.discard(side)
        t = side.transport
        local = t.get_extra_info("sockname") if t is not None else None
        if local:
            self.own_out.discard((local[0], local[1]))

    def upstream_security(self, addr: tuple[str, int]) -> UpstreamSecurity | None:
        """How the outbound HTTP pool reaches ``addr`` (``UpstreamPool.security``)."""
        try:
            return self._security[addr]
        except KeyError:
            pass
        snap = self.runtime.snapshot
        mesh = snap.mesh if snap is not None else None
        pod = mesh.pods_by_ip.get(addr[0]) if mesh is not None else None
        sec = None
        if mesh is not None and mesh.mtls_to(pod, addr[1]):
            ctx = self.contexts
            sec = UpstreamSecurity((pod.identity.uri, ctx.version if ctx is not None else 0),
                                   ctx.client_http if ctx is not None else None, "",
                                   functools.partial(self._check_peer, pod.identity), pod.identity.uri)
        if len(self._security) > 65536:
            self._security.clear()
        self._security[addr] = sec
        return sec

    def _check_peer(self, expected, ssl_object) -> None:
        if ssl_object is None:
            raise IdentityError("no TLS on the connection")
        peer_identity(ssl_object, self.settings.trust_domain, expected=expected)

    # -- inbound --------------------------------------------------------------------------------

    async def _on_inbound(self, sock: socket.socket, peer) -> None:
        try:
            await self._inbound(sock, peer)
        except Exception:  # noqa: BLE001
            log.exception("sidecar: internal error on an inbound connection")
            _reset(sock)

    async def _inbound(self, sock: socket.socket, peer) -> None:
        try:
            dst = self._original(sock)
        except OSError as exc:
            log.warning("sidecar: inbound connection from %s without an original destination (%s)", peer[0], exc)
            _reset(sock)
            return
        if dst in self.own_listen or dst[1] == self.settings.inbound_port:
            _reset(sock)           # reached directly, not redirected: nothing to forward to
            return
        snap = self.runtime.snapshot
        mesh = snap.mesh if snap is not None else None
        if mesh is None:
            _reset(sock)
            return
        port = dst[1]
        mode = mesh.policy.mtls_mode(port)
        peer_ip = peer[0].removeprefix("::ffff:")
        if mode == DISABLE:
            first = b""
        else:
            # A peer sidecar sends its ClientHello as soon as it is connected; a caller silent
            # for the detection window is a plaintext client of a server-first protocol:
            # refused under STRICT, served in plain text under PERMISSIVE.
            first = await self._peek(sock, 8, self.settings.mesh_detect_timeout)
            if first is None:
                sock.close()
                return
        tls = is_tls_client_hello(first) and mode != DISABLE
        if not tls and mode == STRICT:
            metrics.mesh_peer_auth.labels(mode, "plaintext", "refused").inc()
            log.debug("sidecar: plaintext from %s to port %d refused (STRICT)", peer_ip, port)
            _reset(sock)
            return
        metrics.mesh_peer_auth.labels(mode, "mtls" if tls else "plaintext", "accepted").inc()
        http = port in mesh.http_ports
        if not http and not tls and port not in mesh.service_ports and looks_like_http(first):
            # A port no Service describes, and the client has spoken HTTP already: per request
            # (x-forwarded-client-cert is removed from what a plaintext caller sent).
            http = True
        ctx = self.contexts
        if tls:
            offers = await self._client_hello(sock, first, self.settings.header_timeout)
            if offers is None:
                _reset(sock)
                return
            # The peer sidecar parsed HTTP (ALPN http/1.1), or relays the application's bytes
            # as they are (ALPN_TCP: a pod addressed directly, a port it takes as opaque). A
            # port this pod's Services declare HTTP is served per request either way: its
            # bytes are HTTP, and so its requests get their authorization and their
            # x-forwarded-client-cert whatever path they came by.
            if ALPN_HTTP in offers:
                http = True
            if ctx is None:
                log.warning("sidecar: mutual TLS from %s refused: no workload identity yet", peer_ip)
                _reset(sock)
                return
        dest_ip = ip_object(dst[0])
        if http:
            self._count("inbound", "http", "mtls" if tls else "plaintext", "accepted")
            lst = self.view.listener(dst)
            opener = functools.partial(self._open_http, port, dest_ip, ctx.own if tls else None)
            await self.inbound.serve(sock, MeshListener(lst, dst[0], port, tls), ctx.server_http if tls else None,
                                     opener)
            return
        await self._inbound_tcp(sock, peer_ip, dst, dest_ip, ctx.server_tcp if tls else None)

    def _open_http(self, port: int, dest_ip, own, conn, transport):
        """The ``MeshPeer`` of an inbound HTTP connection (after its handshake), or False."""
        peername = transport.get_extra_info("peername")
        ip = peername[0].removeprefix("::ffff:") if peername else ""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return MeshPeer(Peer.of(ip), port, dest_ip, None)
        try:
            pid = peer_identity(ssl_object, self.settings.trust_domain)
        except IdentityError as exc:
            log.info("sidecar: mutual TLS from %s refused: %s", ip, exc)
            return False
        return MeshPeer(Peer.of(ip, pid.spiffe_id), port, dest_ip, xfcc_value(own, pid).encode())

    async def _inbound_tcp(self, sock: socket.socket, peer_ip: str, dst, dest_ip, server_ctx) -> None:
        try:
            down = await accept_side(self.loop, sock, f"from {peer_ip}")
        except OSError:
            sock.close()
            return
        self.relays.add(down)
        caller = Peer.of(peer_ip)
        tls = server_ctx is not None
        if tls:
            try:
                obj = await down.handshake(server_ctx, True, self.settings.header_timeout)
                pid = peer_identity(obj, self.settings.trust_domain)
            except (RelayError, IdentityError, OSError) as exc:
                log.info("sidecar: mutual TLS from %s refused: %s", peer_ip, exc)
                down.abort()
                self.relays.discard(down)
                return
            caller = Peer.of(peer_ip, pid.spiffe_id)
        snap = self.runtime.snapshot
        mesh = snap.mesh
        decision = mesh.policy.authorize(caller, dst[1], None, dest_ip)
        metrics.mesh_authz.labels("tcp", "allow" if decision.allowed else "deny", decision.reason,
                                  decision.policy, metrics.client_id_label(caller.client_id)).inc()
        if not decision.allowed:
            log.debug("sidecar: TCP from %s to port %d denied (%s %s)", caller.client_id or peer_ip, dst[1],
                      decision.reason, decision.policy)
            self._count("inbound", "tcp", "mtls" if tls else "plaintext", "denied")
            down.finish(self.settings.header_timeout)
            self.relays.discard(down)
            return
        try:
            up = await connect_side(self.loop, dst, self.timeout, f"app {dst[1]}")
        except (OSError, TimeoutError) as exc:
            log.debug("sidecar: the application at %s:%d refused: %s", dst[0], dst[1], exc)
            down.abort()
            self.relays.discard(down)
            return
        self.relays.add(up)
        self._count("inbound", "tcp", "mtls" if tls else "plaintext", "accepted")

        def done(a: Side, b: Side) -> None:
            self.relays.discard(a)
            self.relays.discard(b)
        link(down, up, done)

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _original(sock: socket.socket) -> tuple[str, int]:
        host, port = original_dst(sock)
        return host.removeprefix("::ffff:"), port

    @staticmethod
    def _count(direction: str, protocol: str, tls: str, result: str) -> None:
        metrics.mesh_connections.labels(direction, protocol, tls, result).inc()

