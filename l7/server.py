"""The L7 data plane of one process: listeners, and what every exchange shares.

``IngressServer(runtime)`` binds ``--ingress-listen`` / ``--ingress-tls-listen`` (serving the
Ingress route table, ``snapshot.routes``) and every ``snapshot.http_listeners`` entry (Gateway
listeners and mesh Service ports, each with its own route table), reconciled on each publish
like the L4 listeners. It is also the context each ``l7.exchange.Exchange`` works in: the
snapshot in force, balancers, the upstream pool, retry budgets, route lookup with its cache,
metrics and the access log.

Route lookup is cached per snapshot and route table for short (host, path) keys when the table
is "plain" (no route has conditions): the same few hosts and paths come again and again, and
normalisation + matching is the costliest part of routing. Tables with conditions (methods,
headers, query parameters) are matched per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import unquote_plus

from meshproxy.core import metrics, sockets
from meshproxy.core.accept import LogLimiter, connection_limits
from meshproxy.core.accesslog import AccessLog
from meshproxy.core.memory import release_free_memory
from meshproxy.core.paths import normalize_request_path

from .downstream import ClientConnection
from .h2_downstream import H2ClientConnection
from .h2_upstream import H2Pool
from .h1impl import MODES as PARSER_MODES
from .h1impl import select as select_implementation
from .headers import ClientInfoCache, TrustedProxies
from .passthrough import Sniffer
from .stats import RouteStats
from .subrequest import subrequest
from .tls import TLSContexts
from .tracing import Tracing
from .upstream import UpstreamPool

__all__ = ["IngressServer", "Listener", "PARSER_MODES", "parser_mode"]

log = logging.getLogger("meshproxy.l7")

# Route decisions cached per snapshot and table: at most this many, keys (host + path) at most
# this long, so a client sending endless distinct paths costs a bounded amount of memory.
_ROUTE_CACHE_SIZE = 4096
_ROUTE_CACHE_KEY_MAX = 512
_BAD_PATH = (None, None)


def parser_mode(settings) -> str:
    """``Settings.http_parser`` as asked; "auto" defers to $MESHPROXY_HTTP_PARSER (so test
    suites can be run under each mode) and resolves to "compiled" when the compiled core runs,
    else "fast" (the pure fast paths). l7.h1impl describes every mode."""
    mode = getattr(settings, "http_parser", "auto") or "auto"
    if mode == "auto":
        mode = os.environ.get("MESHPROXY_HTTP_PARSER", "auto") or "auto"
    if mode not in PARSER_MODES:
        raise ValueError(f"http_parser: {mode!r} is not one of {', '.join(PARSER_MODES)}")
    if mode == "auto":
        return select_implementation("auto").name.replace("python", "fast")
    return mode


class RequestView:
    """What route conditions look at (``meshproxy.core.routes.Conditions.holds``), computed
    lazily from a request head: only tables with conditions build one."""

    __slots__ = ("head", "method", "_query", "_cookies")

    def __init__(self, head) -> None:
        self.head = head
        self.method = head.method
        self._query: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    def header(self, name: bytes) -> bytes | None:
        vals = [v for n, v in self.head.headers if n.lower() == name]
        if not vals:
            if name == b"host":
                return self.head.host
            return None
        return vals[0] if len(vals) == 1 else b", ".join(vals)

    def query_param(self, name: str) -> str | None:
        q = self._query
        if q is None:
            q = self._query = {}
            for part in self.head.query.decode("latin-1").split("&"):
                if not part:
                    continue
                k, _, v = part.partition("=")
                q.setdefault(unquote_plus(k), unquote_plus(v))
        return q.get(name)

    def cookie(self, name: str) -> str | None:
        c = self._cookies
        if c is None:
            c = self._cookies = {}
            for n, v in self.head.headers:
                if n.lower() == b"cookie":
                    for part in v.decode("latin-1").split(";"):
                        k, eq, val = part.strip().partition("=")
                        if eq:
                            c.setdefault(k, val)
        return c.get(name)


class Listener:
    """One listening socket, with accept paused (not refused) while the server is at its
    connection limit (``IngressServer.max_connections``, all L7 listeners together).

    The socket is bound once; serving it is an asyncio server over a ``dup()`` of it, so
    pausing closes only that server while the kernel keeps queueing connections in the
    backlog of the original socket until we resume. ``http`` is the HTTPListener whose routes
    it serves (None: the Ingress table of the snapshot in force).
    """

    def __init__(self, server: IngressServer, host: str, port: int, ssl_ctx, http=None, sniff: bool = False) -> None:
        self.server = server
        self.tls = ssl_ctx is not None
        self.ssl_ctx = ssl_ctx
        self.http = http
        self.contexts: TLSContexts | None = None   # a Gateway HTTPS listener's certificates
        # ssl-passthrough: accept here and peek at SNI before terminating (l7.passthrough).
        self.sniff = sniff
        self.sniffer: Sniffer | None = None
        self.aserver = None
        self.paused = server.accept_paused
        self.stopped = False
        self._starting = False
        # SO_REUSEADDR|SO_REUSEPORT, and the inherited socket on `run --takeover`.
        sock = sockets.listen(host, port, 1024)
        self.sock = sock
        self.host = host
        self.port = port = sock.getsockname()[1]
        self.port_b = b"%d" % port
        # "host:port" the clients reach (the default Host for requests without one); for a
        # wildcard address it depends on the connection.
        wildcard = host in ("", "0.0.0.0", "::")
        self.local_host = None if wildcard else (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()

    async def start(self) -> None:
        if self.sniff:
            if not self.stopped and not self.paused and self.sniffer is None:
                self.sniffer = Sniffer(self.server, self)
                self.sniffer.start(self.sock.dup())
            return
        if self.stopped or self.aserver is not None or self._starting:
            return
        self._starting = True
        try:
            kwargs = {}
            if self.ssl_ctx is not None:
                kwargs["ssl"] = self.ssl_ctx
                kwargs["ssl_handshake_timeout"] = self.server.settings.header_timeout
            self.aserver = await self.server.loop.create_server(
                self._factory, sock=self.sock.dup(), backlog=1024, **kwargs)
        finally:
            self._starting = False
        if self.stopped or self.paused:
            self._stop_server()

    def _factory(self) -> ClientConnection:
        return ClientConnection(self.server, self)

    def new_connection(self) -> ClientConnection:
        """The protocol of one client connection (l7.passthrough hands sockets over)."""
        return ClientConnection(self.server, self)

    def opened(self) -> None:
        # Counted in connection_made (after a TLS handshake): a failed handshake never
        # reaches the protocol, so counting in the factory would leak.
        self.server.connection_opened()

    def closed(self) -> None:
        self.server.connection_closed()

    def pause(self) -> None:
        """Stop accepting; the kernel keeps queueing new connections in the backlog."""
        if not self.paused:
            self.paused = True
            self._stop_server()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.stopped and self.aserver is None:
                self.server.loop.create_task(self.start())

    def _stop_server(self) -> None:
        sniffer = self.sniffer
        if sniffer is not None:
            self.sniffer = None
            sniffer.stop()
        srv = self.aserver
        if srv is not None:
            self.aserver = None
            srv.close()

    def stop(self) -> None:
        self.stopped = True
        self._stop_server()
        try:
            sockets.release(self.sock)
            self.sock.close()
        except OSError:
            pass


class IngressServer:
    """The L7 data plane of one process (see the module docstring)."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.settings = settings = runtime.settings
        self.balancers = runtime.balancers
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool: UpstreamPool | None = None
        self.h2pool: H2Pool | None = None
        self._grpc_stats: dict[tuple[str, ...], object] = {}
        self.connections: set[ClientConnection] = set()
        self.listeners: list[Listener] = []
        self.http_listeners: dict[tuple[str, int], Listener] = {}
        self.trusted = TrustedProxies(settings.trusted_proxies)
        # Open client connections of every L7 listener together, and the limit at which all of
        # them stop accepting (meshproxy.core.accept.connection_limits: --max-connections, else
        # a share of RLIMIT_NOFILE; None: no limit).
        self.open_connections = 0
        self.max_connections: int | None = connection_limits(settings)[1]
        self.accept_paused = False
        self._limit_log = LogLimiter()   # the "limit reached" line, at most once per 10 s
        self.parser_mode = parser_mode(settings)
        # The per-message work: the compiled core or the pure-Python reference (l7.h1impl), with
        # the parse_whole fast paths (same strictness, see docs/http.md) unless "strict".
        self.impl = impl = select_implementation(self.parser_mode)
        self.fast_parse = impl.fast_parse
        self.request_headers = impl.request_headers
        self.response_headers = impl.response_headers
        self.response_head_bytes = impl.response_head_bytes
        # The forwarding facts of each client address, built once (l7.headers.ClientInfoCache).
        self.clients = ClientInfoCache(self.trusted, impl.ClientInfo)
        # The process's access log (meshproxy.dataplane opens it); an embedded server without
        # one (tests) opens its own from the settings.
        self.access_log = runtime.access_log
        self._own_log = False
        if self.access_log is None and settings.access_log:
            self.access_log = AccessLog(settings.access_log, getattr(settings, "access_log_format", "text"))
            self._own_log = True
        self.buffer_bodies = settings.request_buffer_size > 0
        # Tracing (--otlp-endpoint): None when off.
        self.tracing = Tracing.from_settings(settings)
        self.tls: TLSContexts | None = None
        self.tls_port = 0
        self.via: bytes | None = None   # b"1.1 meshproxy" to add Via (off by default)
        self.active = 0
        self.draining = False
        # Retry budgets by backend key: [active requests, retries in flight]; entries at
        # [0, 0] are pruned once a second. Overflows: retries refused by a budget.
        self.budgets: dict[tuple[str, str, str], list[int]] = {}
        self.retry_budget_overflows = 0
        self.interim_floods = 0
        self.no_route_stats = RouteStats("", "", "")
        # The "ingress" label of the request metrics; None: the route's source object. The
        # mesh sidecar's servers say their direction there (l7.mesh).
        self.stats_label: str | None = None
        self._stats: dict[tuple[str, str, str, str], RouteStats] = {}
        self._stats_by_route: dict[int, RouteStats] = {}
        self._stats_snap = None
        self._route_snap = None
        self._route_caches: dict[int, dict] = {}
        self._last_table = None            # the table of the last lookup, and its cache
        self._last_cache: dict = {}
        self._ticker: asyncio.TimerHandle | None = None
        self._peak_connections = 0
        self._secrets_seen = None
        self.now = None   # the loop's clock, set in start()
        # What extension filters keep across requests and snapshots (rate-limit buckets,
        # concurrency counts, checked passwords), by keys the filters derive from their config.
        self.filter_state: dict = {}
        self._side_tasks: set = set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.now = loop.time
        settings = self.settings
        self.pool = UpstreamPool(loop, settings)
        self.h2pool = H2Pool(loop, settings)
        if self.runtime.snapshot is not None:
            self.pool.apply(self.runtime.snapshot)
            self.h2pool.apply(self.runtime.snapshot)
        if settings.ingress_listen:
            host, port = settings.ingress_listen
            self.listeners.append(Listener(self, host, port, None))
        if settings.ingress_tls_listen:
            self.tls = TLSContexts(http2=settings.http2)
            self._update_tls(self.runtime.snapshot)
            host, port = settings.ingress_tls_listen
            lst = Listener(self, host, port, self.tls.listener_context, sniff=settings.ssl_passthrough)
            self.tls_port = lst.port
            self.listeners.append(lst)
        for lst in self.listeners:
            await lst.start()
        self._ticker = loop.call_later(1.0, self._tick)

    # -- the connection limit ----------------------------------------------------------------------

    def connection_opened(self) -> None:
        self.open_connections += 1
        limit = self.max_connections
        if limit and self.open_connections >= limit and not self.accept_paused:
            self._pause_all()

    def _pause_all(self) -> None:
        self.accept_paused = True
        for lst in self._all_listeners():
            lst.pause()
        extra = self._limit_log.allow("full")
        if extra is not None:
            log.warning("l7: %d open connections, the limit (--max-connections, see docs/resilience.md): "
                        "new connections wait in the backlog%s", self.open_connections, extra)

    def connection_closed(self) -> None:
        self.open_connections -= 1
        if self.accept_paused:
            self._maybe_resume()

    def _maybe_resume(self) -> None:
        limit = self.max_connections
        if not limit or self.open_connections < limit:
            self.accept_paused = False
            for lst in self._all_listeners():
                lst.resume()

    def _all_listeners(self) -> list[Listener]:
        return [*self.listeners, *self.http_listeners.values()]

    def limits_changed(self) -> None:
        """``--max-connections`` changed (a live setting): the new limit applies at once."""
        self.max_connections = connection_limits(self.settings)[1]
        limit = self.max_connections
        if self.accept_paused:
            self._maybe_resume()
        elif limit and self.open_connections >= limit:
            self._pause_all()

    def trusted_changed(self) -> None:
        """``--trusted-proxies`` changed: new connections are judged by the new list."""
        self.trusted = TrustedProxies(self.settings.trusted_proxies)
        self.clients = ClientInfoCache(self.trusted, self.impl.ClientInfo)

    @property
    def ports(self) -> list[int]:
        """Bound ports, plain listener first (tests bind port 0)."""
        return [lst.port for lst in self.listeners]

    def apply(self, snapshot) -> None:
        """A new snapshot is in force: drop idle pooled connections to endpoints that left,
        rebuild TLS contexts whose Secret changed, bind / close the HTTP listeners it wants."""
        if self.pool is not None:
            self.pool.apply(snapshot)
        if self.h2pool is not None and snapshot is not None:
            self.h2pool.apply(snapshot)
        if self.tls is not None:
            self._update_tls(snapshot)
        if snapshot is not None and (snapshot.http_listeners or self.http_listeners):
            self._reconcile_http(snapshot)

    def _reconcile_http(self, snapshot) -> None:
        wanted = snapshot.http_listeners
        for key in [k for k in self.http_listeners if k not in wanted]:
            self.http_listeners.pop(key).stop()
        for key, spec in wanted.items():
            lst = self.http_listeners.get(key)
            if lst is not None and lst.tls == spec.tls:
                lst.http = spec   # same socket, new routes: new requests use them
                if lst.contexts is not None:
                    # New certificates or names: handshakes from now on use them (contexts
                    # of unchanged Secrets are kept, see TLSContexts.update).
                    lst.contexts.update(spec.tls_hosts, snapshot.secrets)
                continue
            if lst is not None:
                self.http_listeners.pop(key).stop()
            ssl_ctx = ctxs = None
            if spec.tls:
                # Gateway listener hostnames: "*." covers any number of labels.
                ctxs = TLSContexts(label_wildcards=False, http2=self.settings.http2)
                ctxs.update(spec.tls_hosts, snapshot.secrets)
                ssl_ctx = ctxs.listener_context
            try:
                lst = Listener(self, spec.host, spec.port, ssl_ctx, spec)
                lst.contexts = ctxs
            except OSError as exc:
                log.error("L7: cannot listen on %s:%d for %s: %s", spec.host, spec.port, spec.name, exc)
                continue
            self.http_listeners[key] = lst
            self.loop.create_task(lst.start())

    def _update_tls(self, snapshot) -> None:
        if snapshot is None:
            return
        seen = (snapshot.tls_hosts, snapshot.secrets)
        if self._secrets_seen is not None and self._secrets_seen[0] is seen[0] and self._secrets_seen[1] is seen[1]:
            return
        self._secrets_seen = seen
        self.tls.update(snapshot.tls_hosts, snapshot.secrets)

    async def stop_accepting(self) -> None:
        for lst in self.listeners:
            lst.stop()
        for lst in self.http_listeners.values():
            lst.stop()

    async def drain(self, timeout: float) -> None:
        """Finish requests in flight (their responses carry ``Connection: close``), close idle
        connections, and after ``timeout`` close whatever is left."""
        self.draining = True
        grace = min(1.0, timeout / 4)
        deadline = self.loop.time() + max(0.0, timeout)
        for conn in list(self.connections):
            conn.close_if_idle(grace)
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            for conn in list(self.connections):
                conn.close_if_idle(grace)
        for conn in list(self.connections):
            conn.close_now()
        if self.pool is not None:
            self.pool.close()
        if self.h2pool is not None:
            self.h2pool.close()
        # Let the loop run the connection_lost callbacks of what was just closed.
        for _ in range(3):
            await asyncio.sleep(0)
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self._tick_metrics()
        if self._own_log:
            self.access_log.close()
        if self.tracing is not None:
            tracing, self.tracing = self.tracing, None
            await self.loop.run_in_executor(None, tracing.shutdown)

    # -- housekeeping ------------------------------------------------------------------------------

    def _tick(self) -> None:
        try:
            self._tick_metrics()
            budgets = self.budgets
            for key in [k for k, v in budgets.items() if not v[0] and not v[1]]:
                del budgets[key]
            if self.pool is not None:
                self.pool.sweep()
            self._give_back_memory()
            if self.h2pool is not None:
                self.h2pool.sweep()
        except Exception:  # noqa: BLE001 - housekeeping must keep running
            log.exception("L7: housekeeping failed")
        self._ticker = self.loop.call_later(1.0, self._tick)

    def _give_back_memory(self) -> None:
        """After many connections closed, ask the C allocator to return freed pages to the
        system (glibc's malloc_trim): the buffers of thousands of closed connections otherwise
        stay in the process's heap, free but resident."""
        n = len(self.connections)
        if n > self._peak_connections:
            self._peak_connections = n
        elif self._peak_connections - n >= 256 and n <= self._peak_connections // 2:
            self._peak_connections = n
            release_free_memory()

    def state(self) -> dict:
        """For /debug and tests: retry budgets in use and overflows so far."""
        return {
            "active": self.active,
            "retry_budget_overflows": self.retry_budget_overflows,
            "retry_budgets": {"/".join(k): {"active": a, "retries_in_flight": r}
                              for k, (a, r) in self.budgets.items()},
            "open_connections": self.open_connections,
            "max_connections": self.max_connections,
        }

    def _tick_metrics(self) -> None:
        for stats in self._stats.values():
            stats.flush()
        self.no_route_stats.flush()
        metrics.http_active.set(self.active)
        metrics.http_downstream_connections.set(len(self.connections))
        if self.pool is not None:
            self.pool.export_metrics()
        if self.h2pool is not None:
            self.h2pool.export_metrics()

    # -- HTTP/2 ------------------------------------------------------------------------------------

    def start_h2(self, conn: ClientConnection, data: bytes) -> None:
        """``conn`` turned out to speak HTTP/2 (ALPN h2, or the preface in ``data``, its first
        bytes): its transport goes to an HTTP/2 shell."""
        shell = H2ClientConnection(self, conn.listener, conn.client, conn.peer_ip, conn.peer_port, conn.tls,
                                   conn.sni)
        transport = conn.transport
        transport.set_protocol(shell)
        shell.start(transport, data)

    def grpc_call(self, namespace: str, service: str, grpc_service: str, grpc_method: str, status: str) -> None:
        key = (namespace, service, grpc_service, grpc_method, status)
        child = self._grpc_stats.get(key)
        if child is None:
            child = self._grpc_stats[key] = metrics.grpc_requests.labels(*key)
        child.inc()

    # -- what exchanges call -----------------------------------------------------------------------

    def subrequest(self, url: str, method: bytes, fields: list, connect_timeout: float, read_timeout: float,
                   done) -> None:
        """For filters: an HTTP request of our own (l7.subrequest); ``done`` gets the answer."""
        subrequest(self.loop, url, method, fields, connect_timeout, read_timeout, done, self._side_tasks)

    def offload(self, fn, args: tuple, done) -> None:
        """For filters: ``fn(*args)`` in a thread (a slow password hash must not stall every
        client); ``done(result, None)`` or ``done(None, exc)`` runs on the loop."""
        fut = self.loop.run_in_executor(None, fn, *args)

        def finished(f) -> None:
            exc = f.exception() if not f.cancelled() else None
            try:
                done(None if exc is not None or f.cancelled() else f.result(), exc)
            except Exception:  # noqa: BLE001 - a filter's bug must not go unnoticed, nor kill the loop
                log.exception("L7: filter callback failed")
        fut.add_done_callback(finished)

    def bad_request(self, status: int) -> None:
        metrics.http_bad_requests.labels(str(status)).inc()

    def no_route(self) -> None:
        metrics.http_no_route.inc()

    def interim_flood(self) -> None:
        self.interim_floods += 1
        metrics.http_interim_floods.inc()

    def count_local(self, status: int) -> None:
        """A request answered by the shell outside any exchange (bad input, timeouts)."""
        self.no_route_stats.done(status, 0.0)

    def route(self, snap, table, head, exchange):
        """(route, stats) for a request; (None, stats) no route (404); (None, None) the path
        is refused (400). See the module docstring for the cache."""
        if snap is not self._route_snap:
            self._route_snap = snap
            self._route_caches = {}
            self._last_table = None
        host = head.host
        path = head.path
        if table.plain:
            if table is self._last_table:
                cache = self._last_cache
            else:
                cache = self._route_caches.get(id(table))
                if cache is None:
                    cache = self._route_caches[id(table)] = {}
                self._last_table = table
                self._last_cache = cache
            key = (host, path)
            hit = cache.get(key)
            if hit is not None:
                return hit
            npath = normalize_request_path(path.decode("latin-1"))
            if npath is None:
                hit = _BAD_PATH
            else:
                r = table.match(host.decode("latin-1"), npath)
                hit = (r, self.route_stats(snap, r)) if r is not None else (None, self.no_route_stats)
            if len(host) + len(path) <= _ROUTE_CACHE_KEY_MAX:
                if len(cache) >= _ROUTE_CACHE_SIZE:
                    cache.clear()
                cache[key] = hit
            return hit
        npath = normalize_request_path(path.decode("latin-1"))
        if npath is None:
            return _BAD_PATH
        r = table.match(host.decode("latin-1"), npath, RequestView(head))
        return (r, self.route_stats(snap, r)) if r is not None else (None, self.no_route_stats)

    def route_stats(self, snap, route) -> RouteStats:
        if snap is not self._stats_snap:
            self._stats_snap = snap
            self._stats_by_route = {}
        s = self._stats_by_route.get(id(route))
        if s is None:
            ref = route.action.backends[0] if route.action.backends else None
            source = route.source.partition(" ")[2]
            ns = source.partition("/")[0]
            service = ""
            if ref is not None and ref.key is not None:
                ns, service = ref.key[0], ref.key[1]
            key = (ns, self.stats_label or source, service, route.name)
            s = self._stats.get(key)
            if s is None:
                s = self._stats[key] = RouteStats(*key)
            self._stats_by_route[id(route)] = s
        return s
