"""HTTP/2 to pods (h2c, prior knowledge): multiplexed connections, one ``Upstream`` per stream.

A request to a backend whose ``l7_protocol`` is HTTP/2 (``meshproxy.core.snapshot.backend_protocol``)
runs as one stream (``H2UpstreamStream``, the ``l7.contracts.Upstream`` of one attempt) on an
``H2UpstreamConnection`` to the chosen endpoint, from the ``H2Pool``. Every request picks its
endpoint on its own (the exchange's balancer), so the calls of one long-lived client channel
spread over all pods; connections are shared by the requests that go to the same pod.

Invariants:

* A connection carries at most the pod's SETTINGS_MAX_CONCURRENT_STREAMS streams (counting
  those taken but not started yet); ``take`` finds one with room, else the exchange asks for a
  new one - and while one to that endpoint is being opened, requests wait for it rather than
  open more (up to what it is assumed to take before its SETTINGS arrive).
* A connection that got GOAWAY, or whose stream ids run out, takes no new stream; its streams
  in flight finish (those above the GOAWAY's last stream id fail as never processed, which the
  exchange may retry like a stale keep-alive connection) and it closes when empty.
* Flow control is the back-pressure: response bytes are acknowledged to the pod only while the
  exchange reads (``pause_reading`` holds them, so the pod can send at most its windows), and
  request bytes go to ``h2`` only within the pod's windows; the rest waits in the stream and,
  past ``_STREAM_HIGH``, pauses the client (``upstream_paused``).
* Connection counts per (namespace, service) are plain ints exported once a second, as for
  HTTP/1.1 (``meshproxy_upstream_connections``: active = carrying streams).
* Security as in ``l7.upstream``: ``H2Pool.security`` (None: plain text) says per pod address
  how a new connection is secured (``UpstreamSecurity``: TLS context, server name, a check of
  the peer after the handshake, e.g. the mesh's SPIFFE ID); connections are told apart by
  address and the security's key, so a stream never rides a connection made for another peer
  identity or in the clear. HTTP/2 then runs over that TLS connection (prior knowledge: our
  own sidecar on the other end recognises the preface whatever ALPN said). Ingress-nginx's
  GRPCS pods (``snapshot.upstream_tls`` keys whose backend speaks HTTP/2) are one more such
  security, applied when the callable says nothing: TLS 1.2+ offering ALPN h2, the pod's
  certificate not verified and no SNI, as ``l7.upstream`` does for backend-protocol HTTPS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Callable

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes

from meshproxy.core import metrics

from .downstream import REASONS
from .h2_fields import H2Conn, request_block, response_head, send_window, tail_fields, trailer_block
from .http1 import HTTPError
from .upstream import UpstreamSecurity

__all__ = ["H2C", "H2Pool", "H2UpstreamConnection", "H2UpstreamStream"]

log = logging.getLogger("meshproxy.l7")

H2C = "h2c"
_CONNECTION_WINDOW = 1 << 20
_STREAM_WINDOW = 1 << 18          # what a pod may send ahead of a slow client, per stream
_STREAM_HIGH = 64 * 1024          # request bytes waiting for the pod's window before the client pauses
_ASSUMED_STREAMS = 100            # what a new connection is assumed to take before its SETTINGS
_LAST_STREAM_ID = (1 << 31) - 1 - (1 << 16)
_HTTP = b"http"


class H2UpstreamStream:
    """One attempt on an HTTP/2 connection (``l7.contracts.Upstream``)."""

    __slots__ = ("pool", "conn", "sid", "addr", "kind", "reused", "received", "exchange", "out", "out_bytes",
                 "ended", "trailers", "reading_paused", "unacked", "got_head", "done", "paused_up", "closed",
                 "resp_trailers", "started", "gone")

    def __init__(self, conn: H2UpstreamConnection) -> None:
        self.pool = conn.pool
        self.conn = conn
        self.sid = 0
        self.addr = conn.addr
        self.kind = H2C
        self.reused = conn.streams_started > 0
        self.received = False
        self.exchange = None
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.ended = False            # the request's end is queued
        self.trailers: list | None = None
        self.reading_paused = False
        self.unacked = 0
        self.got_head = False
        self.done = False             # the response ended
        self.paused_up = False        # we paused the client (upstream_paused)
        self.closed = False           # our side is closed or the stream was reset
        self.resp_trailers = None
        self.started = False
        self.gone = False             # no longer counted on its connection

    def send_head(self, exchange, target: bytes, fields, cached, tail: bytes, end: bool):
        """Start the stream with the request head (HTTP/1.1-form ``fields`` translated); the
        translated block is returned for the repeated-head shortcut (``cached``)."""
        self.exchange = exchange
        head = exchange.head
        if cached is not None:
            block = cached
        else:
            block = request_block(head.method, target, _HTTP, fields,
                                  head.version == 20 and head.te_trailers)
        send = block + tail_fields(tail) if tail else block
        self.ended = end
        self.conn.start_stream(self, send, end)
        if end:
            self.closed = True    # END_STREAM went with the head
        return block

    def send_data(self, data: bytes) -> None:
        if data and not self.closed:
            self.out.append(data)
            self.out_bytes += len(data)

    def send_end(self, trailers) -> None:
        self.ended = True
        if trailers:
            self.trailers = trailer_block(trailers)

    def flush(self) -> None:
        conn = self.conn
        conn.push(self)
        conn.write_later()   # also the head and end queued by send_head

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.conn.ack(self.sid, n)

    def discard_rest(self) -> bool:
        return self.done

    def tunnel_write(self, data: bytes) -> None:
        pass

    def write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        """The exchange drops this attempt: RST_STREAM(CANCEL) unless the stream is over."""
        self.exchange = None
        self.conn.cancel(self)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to a pod (see the module docstring)."""

    __slots__ = ("pool", "addr", "labels", "counts", "transport", "conn", "streams", "reserved", "draining",
                 "closed", "idle_since", "blocked", "streams_started", "active", "writing_paused", "settled",
                 "write_soon", "pool_key")

    def __init__(self, pool: H2Pool, addr: tuple[str, int], labels: tuple[str, str]) -> None:
        self.pool = pool
        self.addr = addr
        self.labels = labels
        self.counts = pool.counts_for(labels)   # [active, idle]
        self.transport = None
        cfg = H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                              normalize_outbound_headers=False)
        self.conn = H2Conn(config=cfg)
        self.streams: dict[int, H2UpstreamStream] = {}
        self.reserved = 0             # streams taken (take/connect) and not ended
        self.draining = False         # no new streams (GOAWAY, ids running out, endpoint gone)
        self.closed = False
        self.idle_since = pool.now
        self.blocked: set[H2UpstreamStream] = set()
        self.streams_started = 0
        self.active = False           # counted as active (carrying streams) in counts
        self.writing_paused = False
        self.settled = False          # the pod's SETTINGS arrived (its stream limit is known)
        self.write_soon = False
        self.pool_key: Any = addr     # the address, or (address, security key)

    # -- capacity -------------------------------------------------------------------------------

    def room(self) -> bool:
        if self.draining or self.closed:
            return False
        limit = self.conn.remote_settings.max_concurrent_streams if self.settled else _ASSUMED_STREAMS
        return self.reserved < limit

    def new_stream(self) -> H2UpstreamStream:
        self.reserved += 1
        if not self.active:
            self.active = True
            self.counts[0] += 1
            self.counts[1] -= 1
        return H2UpstreamStream(self)

    # -- streams -------------------------------------------------------------------------------

    def start_stream(self, st: H2UpstreamStream, block, end: bool) -> None:
        if self.closed:
            st.closed = True
            return
        conn = self.conn
        sid = conn.get_next_available_stream_id()
        st.sid = sid
        st.started = True
        self.streams[sid] = st
        self.streams_started += 1
        conn.send_headers(sid, block, end_stream=end)
        if sid >= _LAST_STREAM_ID:
            self.draining = True   # ids run out: new requests go to a new connection

    def push(self, st: H2UpstreamStream) -> bool:
        """Hand ``h2`` the request bytes that fit the pod's windows. True: something queued."""
        if st.closed or self.closed or not st.started:
            return False
        conn = self.conn
        sid = st.sid
        wrote = False
        try:
            out = st.out
            if out:
                wrote, last = send_window(conn, sid, st)
                if last:
                    st.closed = True
                    st.ended = False
                if out:
                    self.blocked.add(st)
                    ex = st.exchange
                    if st.out_bytes > _STREAM_HIGH and not st.paused_up and ex is not None:
                        st.paused_up = True
                        ex.upstream_paused()
                    return wrote
                self.blocked.discard(st)
                if st.paused_up:
                    st.paused_up = False
                    ex = st.exchange
                    if ex is not None:
                        ex.upstream_resumed()
            if st.ended and not st.closed:
                if st.trailers:
                    conn.send_headers(sid, st.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                st.closed = True
                wrote = True
        except StreamClosedError:
            st.closed = True
        return wrote

    def cancel(self, st: H2UpstreamStream) -> None:
        if st.started and not (st.done and st.closed):
            try:
                self.conn.reset_stream(st.sid, ErrorCodes.CANCEL)
            except (ProtocolError, StreamClosedError):
                pass
            self.write()
        st.closed = True
        self._forget(st)

    def release(self, st: H2UpstreamStream) -> None:
        st.exchange = None
        self._forget(st)

    def _forget(self, st: H2UpstreamStream) -> None:
        if st.gone:
            return
        st.gone = True
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
        self.blocked.discard(st)
        self.reserved -= 1
        if self.reserved <= 0:
            self.reserved = 0
            self.idle_since = self.pool.now
            if self.active:
                self.active = False
                self.counts[0] -= 1
                self.counts[1] += 1
            if self.draining:
                self.close()

    def ack(self, sid: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, sid)
        except (ProtocolError, StreamClosedError):
            return
        self.write()

    def write(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def write_later(self) -> None:
        """Write at the end of this loop turn: the requests of one client read that go to
        this pod leave in one write."""
        if not self.write_soon:
            self.write_soon = True
            self.pool.loop.call_soon(self._write_now)

    def _write_now(self) -> None:
        self.write_soon = False
        try:
            self.write()
        except Exception as exc:  # noqa: BLE001 - no exception may escape a loop callback
            log.error("L7: internal error writing to an HTTP/2 pod: %r", exc, exc_info=exc)
            self.abort()

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        conn = self.conn
        conn.local_settings.update({
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.pool.max_head,
        })
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        transport.write(conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except (ProtocolError, FlowControlError) as exc:
            log.debug("L7: HTTP/2 protocol error from %s:%d: %s", self.addr[0], self.addr[1], exc)
            self._fail_all("protocol")
            self.close()
            return
        except Exception as exc:  # noqa: BLE001 - no exception may escape a protocol callback
            log.error("L7: internal error on an upstream HTTP/2 connection: %r", exc, exc_info=exc)
            self._fail_all("reset")
            self.close()
            return
        touched: list[H2UpstreamStream] = []
        for ev in events:
            try:
                self._event(ev, touched)
            except Exception as exc:  # noqa: BLE001
                st = self.streams.get(getattr(ev, "stream_id", 0) or 0)
                ex = st.exchange if st is not None else None
                if ex is not None:
                    ex.internal_error(exc)
                else:
                    log.error("L7: internal error on an upstream HTTP/2 stream: %r", exc, exc_info=exc)
        for st in touched:
            ex = st.exchange
            if ex is not None:
                try:
                    ex.response_batch(st)
                except Exception as exc:  # noqa: BLE001
                    ex.internal_error(exc)
        self.write()

    def _event(self, ev, touched: list) -> None:
        t = type(ev)
        if t is DataReceived:
            st = self.streams.get(ev.stream_id)
            n = ev.flow_controlled_length
            ex = st.exchange if st is not None else None
            if ex is None:
                if n:
                    self.conn.acknowledge_received_data(n, ev.stream_id)
                return
            if ev.data:
                ex.response_data(st, ev.data)
            if n:
                if st.reading_paused:
                    st.unacked += n
                else:
                    self.conn.acknowledge_received_data(n, ev.stream_id)
            if st not in touched:
                touched.append(st)
        elif t is ResponseReceived or t is InformationalResponseReceived:
            st = self.streams.get(ev.stream_id)
            ex = st.exchange if st is not None else None
            if ex is None:
                return
            st.received = True
            try:
                head = response_head(ev.headers, ev.stream_ended is not None, REASONS)
            except HTTPError as exc:
                log.debug("L7: bad response from %s:%d: %s", self.addr[0], self.addr[1], exc)
                ex.upstream_failed(st, "protocol")
                return
            if head.status >= 200:
                st.got_head = True
            ex.response_head(st, head)
            if st not in touched:
                touched.append(st)
        elif t is TrailersReceived:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.resp_trailers = [(n, v) for n, v in ev.headers if n[:1] != b":"]
        elif t is StreamEnded:
            st = self.streams.get(ev.stream_id)
            if st is None:
                return
            st.done = True
            ex = st.exchange
            if ex is not None:
                ex.response_end(st, st.resp_trailers)
        elif t is StreamReset:
            st = self.streams.get(ev.stream_id)
            if st is None:
                return
            st.closed = True
            ex = st.exchange
            if ex is not None:
                # REFUSED_STREAM: the pod did not process it (RFC 9113 §8.7): safe to retry.
                stale = ev.error_code == ErrorCodes.REFUSED_STREAM and not st.received
                ex.upstream_failed(st, "reset", stale=stale)
            else:
                self._forget(st)
        elif t is WindowUpdated:
            if ev.stream_id:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    self.push(st)
            else:
                for st in list(self.blocked):
                    self.push(st)
        elif t is RemoteSettingsChanged:
            self.settled = True
            if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                for st in list(self.blocked):
                    self.push(st)
        elif t is ConnectionTerminated:
            self.draining = True
            last = ev.last_stream_id if ev.last_stream_id is not None else 0
            for st in [s for s in self.streams.values() if s.sid > last]:
                ex = st.exchange
                st.closed = True
                if ex is not None:
                    # Never processed (above the last stream id): retried like a stale connection.
                    ex.upstream_failed(st, "reset", stale=not st.received)
                else:
                    self._forget(st)
            if not self.streams:
                self.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail_all("reset")
        self.pool.lost(self)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True
        for st in list(self.streams.values()):
            ex = st.exchange
            if ex is not None and not st.paused_up:
                st.paused_up = True
                ex.upstream_paused()

    def resume_writing(self) -> None:
        self.writing_paused = False
        for st in list(self.streams.values()):
            ex = st.exchange
            if ex is not None and st.paused_up and st.out_bytes <= _STREAM_HIGH:
                st.paused_up = False
                ex.upstream_resumed()

    def _fail_all(self, kind: str) -> None:
        for st in list(self.streams.values()):
            st.closed = True
            ex = st.exchange
            if ex is not None:
                try:
                    ex.upstream_failed(st, kind, stale=kind == "reset" and st.reused and not st.received)
                except Exception as e:  # noqa: BLE001
                    ex.internal_error(e)
        self.streams.clear()
        self.blocked.clear()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.draining = True
            if self.transport is not None:
                try:
                    self.conn.close_connection()
                    self.transport.write(self.conn.data_to_send())
                except (ProtocolError, OSError, RuntimeError):
                    pass
                self.transport.close()
        self.pool.lost(self)

    def abort(self) -> None:
        self.closed = True
        self.draining = True
        if self.transport is not None:
            self.transport.abort()
        self.pool.lost(self)


class H2Pool:
    """HTTP/2 connections per endpoint address (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings) -> None:
        self.loop = loop
        self.idle_timeout = settings.upstream_idle_timeout
        self.connect_timeout = settings.connect_timeout
        self.max_head = settings.max_head_size
        self._conns: dict[Any, list[H2UpstreamConnection]] = {}   # by pool key
        # Requests waiting for a connection being opened: addr -> (connection, [(exchange, token)]).
        self._opening: dict[Any, tuple[H2UpstreamConnection, list]] = {}
        # Per address: how to secure a new connection, or None (plain text); None here:
        # everything in plain text (module docstring).
        self.security: Callable[[tuple[str, int]], UpstreamSecurity | None] | None = None
        self._tls_addrs: frozenset[tuple[str, int]] = frozenset()   # GRPCS pods (ingress-nginx)
        self._grpcs_pod: UpstreamSecurity | None = None
        self._live: frozenset[tuple[str, int]] | None = None
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.now = loop.time()
        self.connects = 0

    def counts_for(self, labels: tuple[str, str]) -> list[int]:
        c = self._counts.get(labels)
        if c is None:
            c = self._counts[labels] = [0, 0]
        return c

    def take(self, addr: tuple[str, int]) -> H2UpstreamStream | None:
        key = addr if self.security is None and not self._tls_addrs else self._key(addr)[0]
        for conn in self._conns.get(key, ()):
            if conn.room():
                return conn.new_stream()
        return None

    def connect(self, addr: tuple[str, int], labels: tuple[str, str], exchange, token: int) -> None:
        """A stream on a new connection to ``addr``: ``exchange.connected(token, stream, None)``
        or ``(token, None, exc)``, from the event loop. Requests arriving while one connection
        to ``addr`` is being opened wait for it."""
        key, sec = (addr, None) if self.security is None and not self._tls_addrs else self._key(addr)
        opening = self._opening.get(key)
        if opening is not None and len(opening[1]) < _ASSUMED_STREAMS:
            opening[1].append((exchange, token))
            return
        conn = H2UpstreamConnection(self, addr, labels)
        conn.pool_key = key
        waiters = [(exchange, token)]
        self._opening[key] = (conn, waiters)
        task = self.loop.create_task(self._connect(conn, waiters, sec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _key(self, addr: tuple[str, int]):
        sec = self.security(addr) if self.security is not None else None
        if sec is None and addr in self._tls_addrs:
            sec = self._grpcs_pod
            if sec is None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.set_alpn_protocols(["h2"])
                sec = self._grpcs_pod = UpstreamSecurity("grpcs", ctx)
        return (addr if sec is None else (addr, sec.key)), sec

    async def _connect(self, conn: H2UpstreamConnection, waiters: list, sec: UpstreamSecurity | None = None) -> None:
        addr = conn.addr
        try:
            async with asyncio.timeout(self.connect_timeout):
                if sec is None:
                    await self.loop.create_connection(lambda: conn, addr[0], addr[1])
                else:
                    if sec.context is None:
                        raise ConnectionRefusedError(f"no TLS context to reach {addr[0]}:{addr[1]} with")
                    await self.loop.create_connection(lambda: conn, addr[0], addr[1], ssl=sec.context,
                                                      server_hostname=sec.server_name,
                                                      ssl_handshake_timeout=self.connect_timeout)
                    if sec.check is not None:
                        sec.check(conn.transport.get_extra_info("ssl_object"))
        except (OSError, TimeoutError, ValueError) as exc:
            # ValueError: the peer check refused the peer (e.g. the wrong SPIFFE ID).
            if conn.transport is not None:
                conn.transport.abort()
            self._done_opening(conn)
            for exchange, token in waiters:
                self._report(exchange, token, None, exc)
            return
        except asyncio.CancelledError:
            self._done_opening(conn)
            if conn.transport is not None:
                conn.transport.abort()
            raise
        self._done_opening(conn)
        self.connects += 1
        if conn.closed:
            exc = ConnectionResetError("connection lost right after connect")
            for exchange, token in waiters:
                self._report(exchange, token, None, exc)
            return
        self.adopt(conn)
        for exchange, token in waiters:
            st = conn.new_stream() if conn.room() else None
            if st is None:
                # More waiters than it takes: they ask again (take, or another connection).
                self._report(exchange, token, None, ConnectionResetError("no stream available"))
                continue
            self._report(exchange, token, st, None)

    def adopt(self, conn: H2UpstreamConnection) -> None:
        """A connection just opened joins the pool (counted idle until a stream uses it)."""
        conn.counts[1] += 1
        self._conns.setdefault(conn.pool_key, []).append(conn)

    def _done_opening(self, conn: H2UpstreamConnection) -> None:
        opening = self._opening.get(conn.pool_key)
        if opening is not None and opening[0] is conn:
            del self._opening[conn.pool_key]

    @staticmethod
    def _report(exchange, token: int, st, exc) -> None:
        try:
            exchange.connected(token, st, exc)
        except Exception as e:  # noqa: BLE001 - the exchange logs and answers; the task must not die
            exchange.internal_error(e)

    def release(self, st: H2UpstreamStream) -> None:
        """The exchange is done with a stream whose request and response are complete."""
        st.conn.release(st)

    def lost(self, conn: H2UpstreamConnection) -> None:
        conns = self._conns.get(conn.pool_key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if conn.active:
                conn.active = False
                conn.counts[0] -= 1
            else:
                conn.counts[1] -= 1
            if not conns:
                del self._conns[conn.pool_key]

    def apply(self, snapshot) -> None:
        """Connections to endpoints that are no longer usable take no new streams; idle ones
        close now."""
        live = set()
        for backend in snapshot.backends.values():
            for ep in backend.usable:
                live.add((ep.ip, ep.port))
        self._live = frozenset(live)
        tls_keys = getattr(snapshot, "upstream_tls", ())
        tls = frozenset((ep.ip, ep.port) for k in tls_keys if k in snapshot.backends
                        for ep in snapshot.backends[k].endpoints)
        changed = tls.symmetric_difference(self._tls_addrs)
        self._tls_addrs = tls
        for key in list(self._conns):
            for conn in list(self._conns.get(key, ())):
                if conn.addr in live and conn.addr not in changed:
                    continue
                conn.draining = True
                if not conn.reserved:
                    conn.close()

    def sweep(self) -> None:
        self.now = now = self.loop.time()
        limit = now - self.idle_timeout
        for conns in list(self._conns.values()):
            for conn in list(conns):
                if not conn.reserved and conn.idle_since <= limit:
                    conn.close()

    def connection_count(self, addr: tuple[str, int] | None = None) -> int:
        if addr is not None:
            return sum(len(c) for k, c in self._conns.items() if k == addr or (type(k) is tuple and k[0] == addr))
        return sum(len(c) for c in self._conns.values())

    def export_metrics(self) -> None:
        gauge = metrics.upstream_connections
        for (ns, svc), (active, idle) in self._counts.items():
            gauge.labels(ns, svc, "h2_active").set(active)
            gauge.labels(ns, svc, "h2_idle").set(idle)

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()          # GOAWAY, written at once
                if conn.transport is not None:
                    # Shutdown: no waiting for a TLS pod's close_notify (up to 30 s in uvloop)
                    # with the loop about to stop under the transport.
                    conn.transport.abort()
        self._conns.clear()
