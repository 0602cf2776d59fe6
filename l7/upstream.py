"""HTTP/1.1 to pods: keep-alive connections, pooled per endpoint, driven by an exchange.

An ``UpstreamConnection`` is an ``asyncio.Protocol`` owned either by the pool (idle) or by one
exchange (``l7.exchange``) for the duration of one request. It is a thin shell: it serializes
what the exchange sends (``send_head`` / ``send_data`` / ``send_end``, queued and written by
``flush`` in one write), parses the pod's response with its own ``ResponseParser`` (reused
across responses with ``start_next``) and reports what it finds (``response_whole``,
``response_head``, ``response_data``, ``response_end``, ``upstream_failed``). It makes no
decision of its own.

Invariants:

* A connection is in exactly one state: connecting, active (``exchange`` set), idle (in
  ``_idle[addr]``, ``exchange`` None) or closed. Only ``release`` puts one into the pool and
  only ``take`` takes one out; a closed or closing transport is never handed out.
* An idle connection keeps reading: a FIN or RST from the pod removes it from the pool at
  once, and bytes arriving while no request is outstanding close it (the pod broke the
  protocol; nothing can be trusted on that connection any more).
* One read is handled per ``data_received`` and then control goes back to the loop: the
  parser's work per call is bounded by the read size, however the pod frames its bytes.
* The pool is bounded per endpoint (``settings.upstream_pool_size`` idle connections; the
  most recently used is reused first, so surplus ones age out), idle connections are closed
  after ``settings.upstream_idle_timeout``, and ``apply(snapshot)`` closes idle connections to
  endpoints that are no longer usable; active ones to such endpoints finish their request and
  are then closed instead of pooled.
* Security (``UpstreamPool.security``, None: every pod is plain text): a callable that says, per
  pod address, how a new connection is secured (``UpstreamSecurity``: an SSL context, the server
  name, a check of the peer after the handshake - the mesh's expected SPIFFE ID) or None for
  plain text. Idle connections are pooled by address *and* the security's ``key`` (plain-text
  connections by the bare address), so a request never rides a connection made for another
  peer identity or in the clear; a failed handshake or peer check is a connect failure.
  Ingress-nginx's HTTPS pods (``snapshot.upstream_tls``: an Ingress said with backend-protocol
  that the Service port speaks HTTPS) are one such security, applied when the callable says
  nothing: TLS 1.2+, the pod's certificate not verified and no SNI - nginx's proxy_ssl
  defaults, which ingress-nginx keeps unless told otherwise. An address whose security
  changes closes what it pooled before.
* Connection counts per (namespace, service) and state live in plain ints and are exported
  to the ``meshproxy_upstream_connections`` gauge by ``export_metrics`` (called once a second):
  the hot path does integer arithmetic, not metric calls.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from meshproxy.core import metrics

from .h1impl import select as select_implementation
from .h1writer import request_head_bytes  # noqa: F401 - re-exported (tests, older callers)
from .http1 import LAST_CHUNK, PAUSED, EndOfMessage, HTTPError, ResponseHead, serialize_trailers

__all__ = ["HTTP1", "UpstreamConnection", "UpstreamPool", "UpstreamSecurity", "request_head_bytes"]

log = logging.getLogger("meshproxy.l7")

_CONNECTING, _ACTIVE, _IDLE, _CLOSED = range(4)

# What an exchange checks before reusing serialized head bytes (``UpstreamConnection.kind``).
HTTP1 = "http/1.1"

# Response bytes read per read call (BufferedProtocol): a response starts with small reads and
# they double while the client takes what we send (its socket's queue is short), up to
# _READ_MAX; a client that stops reading (our buffer for it is full) brings them back to
# _READ_MIN. So a client that reads slowly holds about one small read in our memory, not one
# 256 KiB read (uvloop's default), and a fast client's 1 MiB body takes only a few more reads.
_READ_MIN = 32 * 1024
# Longest response head remembered per connection for the repeated-head shortcut.
_MEMO_MAX = 1024
_READ_MAX = 256 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamSecurity:
    """How new connections to one pod address are secured (``UpstreamPool.security``).

    ``key``: what pooled connections are told apart by (e.g. the peer identity a mesh expects);
    two addresses' connections never mix anyway. ``context``: the TLS client context for the
    *next* connection (None: no context can be had, e.g. no workload identity yet: the connect
    fails). ``server_name``: SNI ("" sends none). ``check(ssl_object)``: called after the
    handshake; raising ``ValueError`` / ``OSError`` refuses the peer (a connect failure).
    ``identity``: what ``check`` makes the peer prove (a SPIFFE ID; "" for none), told to the
    attempt's span once the connection is up."""
    key: Hashable
    context: ssl.SSLContext | None
    server_name: str = ""
    check: Callable[[Any], None] | None = None
    identity: str = ""


class UpstreamConnection(asyncio.BufferedProtocol):
    __slots__ = ("pool", "addr", "labels", "counts", "transport", "parser", "exchange", "state",
                 "idle_since", "reused", "received", "reading_paused", "requests", "pending",
                 "chunked", "got_head", "tunnel", "kind", "read_size", "memo_in", "memo_out", "pool_key", "peer_id")

    def __init__(self, pool: UpstreamPool, addr: tuple[str, int], labels: tuple[str, str]) -> None:
        self.pool = pool
        self.addr = addr
        self.labels = labels
        self.counts = pool.counts_for(labels)   # [active, idle]
        self.transport: asyncio.Transport | None = None
        self.parser = pool.response_parser(pool.max_head, pool.max_headers)
        self.exchange = None          # the exchange this connection serves, or None
        self.state = _CONNECTING
        self.idle_since = 0.0
        self.reused = False           # served a request before the current one
        self.received = False         # got a byte for the current request
        self.reading_paused = False
        self.requests = 0             # requests started on this connection
        self.pending: list[bytes] = []
        self.chunked = False          # the current request body goes out chunked
        self.got_head = False         # the final response head of the current request arrived
        self.tunnel = False
        self.kind = HTTP1
        self.read_size = _READ_MIN
        # The last whole response head read on this connection (raw bytes up to the body, its
        # parse, the body's length), and what the exchange built from it for the client; the
        # same bytes next time reuse both (see data_received). Heads up to _MEMO_MAX bytes.
        self.memo_in = None
        self.memo_out = None
        self.pool_key: Any = addr      # where it idles in the pool: the address, or (address, security key)
        self.peer_id = ""              # the identity the peer proved at the handshake (UpstreamSecurity.identity)

    # -- what the exchange sends -----------------------------------------------------------------

    def send_head(self, exchange, target: bytes, fields, cached: bytes | None, tail: bytes, end: bool) -> bytes:
        """Serve ``exchange`` (the connection is active, fresh or taken from the pool): queue
        its request head, with the message's end when ``end`` (nothing else follows).
        ``tail``: fields of this request only (with their CRLFs), written last. Returns the head
        without its final CRLF and tail, which a later identical request passes back as
        ``cached`` (then ``fields`` is None)."""
        self.exchange = exchange
        self.received = False
        self.got_head = False
        self.read_size = _READ_MIN
        self.requests += 1
        head = exchange.head
        self.parser.set_request_method(head.method)
        chunked = self.chunked = head.chunked
        base = cached if cached is not None else self.pool.request_head_bytes(
            head.method, target, fields, head.content_length, chunked)[:-2]
        data = b"".join((base, tail, b"\r\n")) if tail else base + b"\r\n"
        self.pending.append(data + LAST_CHUNK if end and chunked else data)
        return base

    def send_data(self, data: bytes) -> None:
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self.pending.append(data)

    def send_end(self, trailers) -> None:
        if self.chunked:
            self.pending.append(serialize_trailers(trailers) if trailers else LAST_CHUNK)

    def flush(self) -> None:
        pending = self.pending
        if pending and self.state != _CLOSED:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        self.pending = []

    def tunnel_write(self, data: bytes) -> None:
        if self.state != _CLOSED:
            self.transport.write(data)

    def discard_rest(self) -> bool:
        """The exchange drops this response: read it to its end if it is already here. True
        when it ended cleanly (the connection may be pooled then)."""
        p = self.parser
        try:
            for _ in range(1 << 20):   # bounded: one event per buffered piece
                ev = p.next_event()
                if type(ev) is bytes:
                    continue
                # PAUSED: the fast path returned the whole response already.
                return ev.__class__ is EndOfMessage or ev is PAUSED
        except HTTPError:
            pass
        return False

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for every upstream connection of the loop: callbacks never overlap, and
        # buffer_updated copies what arrived out of it before returning.
        return self.pool.read_view[:self.read_size]

    def buffer_updated(self, nbytes: int) -> None:
        ex = self.exchange
        if ex is not None and nbytes == self.read_size and self.got_head:
            # A body is streaming and filled the read: read more next time only if the client
            # has taken (nearly) all we sent it before this read - its socket's queue included,
            # so a slow reader stays at small reads even while the kernel accepts our writes.
            if ex.down_paused:
                self.read_size = _READ_MIN
            elif nbytes < _READ_MAX and ex.down.backlog() < _READ_MIN:
                self.read_size = nbytes * 2
        self.data_received(self.pool.read_view[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # No request outstanding: the pod sent something we never asked for.
            log.debug("upstream %s:%d sent %d unsolicited bytes; closing", *self.addr, len(data))
            self.abort()
            return
        try:
            if self.tunnel:
                ex.response_data(self, data)
                return
            self.received = True
            p = self.parser
            if not self.got_head and ex.ctx.fast_parse:
                # Fast path: the read is exactly one complete Content-Length response (see
                # ResponseParser.parse_whole); declined -> the general path, nothing consumed.
                memo = self.memo_in
                if (memo is not None and len(data) == memo[2] and data.startswith(memo[0])
                        and p.repeat_whole()):
                    # The same head bytes as this connection's previous response (a pod
                    # answers the same way again and again): the same parse, by construction.
                    head = memo[1]
                    body = data[len(memo[0]):]
                else:
                    whole = p.parse_whole(data)
                    if whole is None:
                        head = None
                    else:
                        head, body = whole
                        n = len(data) - len(body)
                        if n <= _MEMO_MAX:
                            self.memo_in = (data[:n], head, len(data))
                            self.memo_out = None
                if head is not None:
                    self.got_head = True
                    if not ex.response_whole(self, head, body):
                        self.abort()
                    return
            # Body bytes straight from the read when nothing is buffered (no copies; see
            # ResponseParser.take_body); the loop below then finds only what followed them.
            body = p.take_body(data) if self.got_head else None
            if body is None:
                p.feed(data)
            else:
                ex.response_data(self, body)
            while ex.up is self:
                try:
                    ev = p.next_event()
                except HTTPError as exc:
                    log.debug("L7: bad response from %s:%d: %s", self.addr[0], self.addr[1], exc)
                    ex.upstream_failed(self, "protocol")
                    return
                t = type(ev)
                if t is bytes:
                    ex.response_data(self, ev)
                elif t is ResponseHead:
                    status = ev.status
                    if status >= 200:
                        self.got_head = True
                    elif status == 101:
                        self.got_head = self.tunnel = True
                    ex.response_head(self, ev)
                    if self.tunnel:
                        return   # the rest of the bytes belong to the tunnel (start_tunnel)
                elif t is EndOfMessage:
                    ex.response_end(self, ev.trailers)
                    return
                else:
                    break
            ex.response_batch(self)
        except Exception as exc:  # noqa: BLE001 - no exception may escape a protocol callback
            ex.internal_error(exc)

    def eof_received(self) -> bool:
        ex = self.exchange
        if ex is None:
            return False
        try:
            if self.tunnel:
                return ex.upstream_eof(self)
            if not self.got_head:
                # Closed before a (final) response head: nothing of the response went out, so
                # this is retryable like a reset. On a reused pooled connection with not a
                # byte received it is the keep-alive race: the pod closed it as we reused it.
                ex.upstream_failed(self, "eof", stale=self.reused and not self.received)
                return False
            self.parser.feed_eof()
            # A close-delimited body ends here; a body cut short raises HTTPError.
            self.data_received(b"")
            if ex.up is self:
                ex.upstream_failed(self, "eof")
        except Exception as exc:  # noqa: BLE001
            ex.internal_error(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            try:
                if self.tunnel:
                    ex.tunnel_closed()
                else:
                    ex.upstream_failed(self, "reset", stale=self.reused and not self.received)
            except Exception as e:  # noqa: BLE001
                ex.internal_error(e)

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_paused()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_resumed()

    # -- helpers ---------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.state != _CLOSED:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.state != _CLOSED:
            self.reading_paused = False
            self.transport.resume_reading()

    def write_eof(self) -> bool:
        """Half-close towards the pod (tunnels). False when the transport cannot."""
        t = self.transport
        if self.state == _CLOSED or t is None or not t.can_write_eof():
            return False
        t.write_eof()
        return True

    def abort(self) -> None:
        """Close at once (no reuse); connection_lost follows."""
        self.exchange = None
        self.pending = []
        if self.transport is not None and self.state != _CLOSED:
            self.transport.abort()
        self.pool.lost(self)


class UpstreamPool:
    """Idle keep-alive connections per endpoint address, and new connections on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings) -> None:
        self.loop = loop
        self.max_idle = max(0, settings.upstream_pool_size)
        self.idle_timeout = settings.upstream_idle_timeout
        self.connect_timeout = settings.connect_timeout
        self.max_head = settings.max_head_size
        self.max_headers = settings.max_headers
        # The compiled core's parser or the pure one, as the server's (l7.h1impl).
        impl = select_implementation(getattr(settings, "http_parser", None))
        self.response_parser = impl.ResponseParser
        self.request_head_bytes = impl.request_head_bytes
        self._idle: dict[Any, list[UpstreamConnection]] = {}   # by pool key (see UpstreamConnection.pool_key)
        # Per address: how to secure a new connection (UpstreamSecurity) or None (plain text);
        # None here: everything in plain text (module docstring).
        self.security: Callable[[tuple[str, int]], UpstreamSecurity | None] | None = None
        # Addresses that may get new requests (usable endpoints of the snapshot in force);
        # None until the first apply(): then every address is allowed.
        self._live: frozenset[tuple[str, int]] | None = None
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._tls_addrs: frozenset[tuple[str, int]] = frozenset()   # HTTPS pods (ingress-nginx)
        self._https_pod: UpstreamSecurity | None = None
        self._tls_ctx: ssl.SSLContext | None = None
        self._closed = False
        # Coarse clock for idle_since, refreshed by sweep() once a second: the idle timeout
        # needs no better precision and a loop.time() call per request is saved.
        self.now = loop.time()
        self.connects = 0             # connections opened so far (tests and /debug)
        self.read_view = memoryview(bytearray(_READ_MAX))   # see UpstreamConnection.get_buffer

    # -- lookups -------------------------------------------------------------------------------

    def counts_for(self, labels: tuple[str, str]) -> list[int]:
        c = self._counts.get(labels)
        if c is None:
            c = self._counts[labels] = [0, 0]
        return c

    def _key(self, addr: tuple[str, int]):
        """(pool key, UpstreamSecurity or None) of a new connection to ``addr``."""
        resolve = self.security
        sec = resolve(addr) if resolve is not None else None
        if sec is None and addr in self._tls_addrs:
            sec = self._https_pod
            if sec is None:
                sec = self._https_pod = UpstreamSecurity("https", self._client_tls())
        return (addr if sec is None else (addr, sec.key)), sec

    def take(self, addr: tuple[str, int]) -> UpstreamConnection | None:
        """An idle connection to ``addr`` (now active, owned by the caller), or None."""
        # (Plain-text pools, the common case, cost one test.)
        stack = self._idle.get(addr if self.security is None and not self._tls_addrs else self._key(addr)[0])
        while stack:
            conn = stack.pop()
            conn.counts[1] -= 1
            if conn.transport.is_closing():
                conn.state = _CLOSED
                continue
            conn.state = _ACTIVE
            conn.counts[0] += 1
            conn.reused = True
            return conn
        return None

    def connect(self, addr: tuple[str, int], labels: tuple[str, str], exchange, token: int) -> None:
        """Open a new connection; ``exchange.connected(token, conn, None)`` (conn active, owned
        by the exchange) or ``exchange.connected(token, None, exc)`` is called from the event
        loop, never synchronously."""
        conn = UpstreamConnection(self, addr, labels)
        sec = None
        if self.security is not None or self._tls_addrs:
            conn.pool_key, sec = self._key(addr)
        task = self.loop.create_task(self._connect(conn, exchange, token, sec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _client_tls(self) -> ssl.SSLContext:
        ctx = self._tls_ctx
        if ctx is None:
            ctx = self._tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def _connect(self, conn: UpstreamConnection, exchange, token: int, sec: UpstreamSecurity | None = None) -> None:
        # The route's own connect timeout (ingress-nginx's proxy-connect-timeout), else ours.
        action = getattr(exchange, "action", None)
        timeout = (action.connect_timeout if action is not None else None) or self.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                if sec is None:
                    await self.loop.create_connection(lambda: conn, conn.addr[0], conn.addr[1])
                else:
                    await self._connect_secure(conn, sec)
        except (OSError, TimeoutError, ValueError) as exc:
            # OSError: refused / unreachable / reset during connect, a failed TLS handshake
            # (ssl.SSLError); ValueError: the peer check refused the peer (e.g. the wrong
            # SPIFFE ID); TimeoutError: our deadline.
            if conn.transport is not None:
                conn.transport.abort()
            conn.state = _CLOSED
            self._report(exchange, token, None, exc)
            return
        except asyncio.CancelledError:
            conn.state = _CLOSED
            if conn.transport is not None:
                conn.transport.abort()
            raise
        self.connects += 1
        if conn.state == _CLOSED:  # lost already (reset right after connect)
            self._report(exchange, token, None, ConnectionResetError("connection lost right after connect"))
            return
        conn.state = _ACTIVE
        conn.counts[0] += 1
        # (TCP_NODELAY: uvloop and asyncio set it on every TCP transport already.)
        self._report(exchange, token, conn, None)

    async def _connect_secure(self, conn: UpstreamConnection, sec: UpstreamSecurity) -> None:
        if sec.context is None:
            raise ConnectionRefusedError(f"no TLS context to reach {conn.addr[0]}:{conn.addr[1]} with")
        await self.loop.create_connection(lambda: conn, conn.addr[0], conn.addr[1], ssl=sec.context,
                                          server_hostname=sec.server_name,
                                          ssl_handshake_timeout=self.connect_timeout)
        if sec.check is not None:
            sec.check(conn.transport.get_extra_info("ssl_object"))
            conn.peer_id = sec.identity

    @staticmethod
    def _report(exchange, token: int, conn, exc) -> None:
        try:
            exchange.connected(token, conn, exc)
        except Exception as e:  # noqa: BLE001 - the exchange logs and answers; the task must not die
            exchange.internal_error(e)

    def release(self, conn: UpstreamConnection) -> None:
        """The owner is done with an active connection that may be reused (the response was
        complete and keep-alive, the whole request was sent): pool it, or close it."""
        if conn.state != _ACTIVE:
            return
        conn.exchange = None
        conn.counts[0] -= 1
        live = self._live
        stack = self._idle.get(conn.pool_key)
        if (self._closed or conn.transport.is_closing() or (live is not None and conn.addr not in live)
                or (stack is not None and len(stack) >= self.max_idle) or not self.max_idle or conn.tunnel):
            conn.state = _CLOSED
            conn.transport.close()
            return
        if conn.requests:
            if conn.parser.buffered:
                # Bytes after the end of the response (e.g. a body sent with a HEAD or 304
                # response): reusing the connection would read them as the next response.
                conn.state = _CLOSED
                conn.transport.close()
                return
            conn.parser.start_next()
        if conn.reading_paused:
            conn.resume_reading()
        conn.state = _IDLE
        conn.idle_since = self.now
        conn.counts[1] += 1
        if stack is None:
            self._idle[conn.pool_key] = [conn]
        else:
            stack.append(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        """``conn`` is closed (by us or the pod): forget it."""
        state = conn.state
        if state == _CLOSED:
            return
        conn.state = _CLOSED
        if state == _ACTIVE:
            conn.counts[0] -= 1
        elif state == _IDLE:
            conn.counts[1] -= 1
            stack = self._idle.get(conn.pool_key)
            if stack is not None:
                try:
                    stack.remove(conn)
                except ValueError:
                    pass
                if not stack:
                    del self._idle[conn.pool_key]

    # -- maintenance ---------------------------------------------------------------------------

    def apply(self, snapshot) -> None:
        """Close idle connections to endpoints that are not usable any more."""
        live = set()
        for backend in snapshot.backends.values():
            for ep in backend.usable:
                live.add((ep.ip, ep.port))
        self._live = frozenset(live)
        tls_keys = getattr(snapshot, "upstream_tls", ())
        tls = frozenset((ep.ip, ep.port) for k in tls_keys if k in snapshot.backends
                        for ep in snapshot.backends[k].endpoints)
        if tls != self._tls_addrs:
            # An address that changed protocol must not reuse what it pooled before.
            changed = tls.symmetric_difference(self._tls_addrs)
            self._tls_addrs = tls
            for key in [k for k, stack in self._idle.items() if stack and stack[0].addr in changed]:
                for conn in list(self._idle.get(key, ())):
                    conn.abort()
        for key in [k for k, stack in self._idle.items() if stack and stack[0].addr not in live]:
            for conn in list(self._idle.get(key, ())):
                conn.abort()

    def drop_idle(self, keep: Callable[[Any], bool]) -> int:
        """Close idle connections whose pool key ``keep`` refuses (e.g. after the identity a
        peer must have changed); returns how many."""
        n = 0
        for key in [k for k in self._idle if not keep(k)]:
            for conn in list(self._idle.get(key, ())):
                conn.abort()
                n += 1
        return n

    def sweep(self) -> None:
        """Close connections idle for longer than the idle timeout (oldest sit at the bottom)."""
        self.now = now = self.loop.time()
        limit = now - self.idle_timeout
        for stack in list(self._idle.values()):
            while stack and stack[0].idle_since <= limit:
                stack[0].abort()   # lost() removes it from the stack

    def idle_count(self, addr: tuple[str, int] | None = None) -> int:
        if addr is not None:
            return sum(len(s) for s in self._idle.values() if s and s[0].addr == addr)
        return sum(len(s) for s in self._idle.values())

    def export_metrics(self) -> None:
        gauge = metrics.upstream_connections
        for (ns, svc), (active, idle) in self._counts.items():
            gauge.labels(ns, svc, "active").set(active)
            gauge.labels(ns, svc, "idle").set(idle)

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for stack in list(self._idle.values()):
            for conn in list(stack):
                conn.abort()
        self._idle.clear()
