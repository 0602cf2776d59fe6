"""HTTP/2 from clients: the connection shell and one ``Downstream`` per stream.

An ``H2ClientConnection`` takes over a client connection from ``l7.downstream.ClientConnection``
once it is known to speak HTTP/2 (ALPN ``h2``, or the connection preface on the first bytes:
``l7.server.IngressServer.start_h2``). The ``h2`` package turns bytes into events; each request
stream gets an ``H2Stream``, which drives one ``l7.exchange.Exchange`` exactly as an HTTP/1.1
request does and writes what the exchange decides as HEADERS / DATA / trailers. docs/http2.md
describes the behaviour and every limit below.

Invariants of a connection:

* Flow control is the back-pressure. A request body's bytes are acknowledged (stream and
  connection windows reopened) only once the exchange has taken them and its upstream is not
  paused; while it is, the client can send at most the windows it was given. A response's bytes
  go to ``h2`` only within the client's windows; what does not fit waits in the stream (at most
  ``_STREAM_HIGH`` before the exchange stops reading its upstream), and a client that opens no
  window for ``--send-timeout`` is disconnected.
* One write per read: events of one read are handled, then ``h2``'s output is written at once.
  While our transport buffer is full we read nothing from the client (its PINGs and SETTINGS
  would otherwise pile up ACKs).
* Abuse is counted per connection in a window of ``_WINDOW`` seconds: streams the client
  resets (rapid reset, CVE-2023-44487), PING / SETTINGS / PRIORITY frames, empty DATA frames,
  malformed requests. Past a limit the connection gets GOAWAY ENHANCE_YOUR_CALM and is closed.
  Header blocks are bounded by SETTINGS_MAX_HEADER_LIST_SIZE (HPACK bombs) and by the number
  of CONTINUATION frames ``h2`` buffers.
* Graceful end (drain, keep-alive idle, stream ids running out, the client's GOAWAY): GOAWAY
  with the last stream id we took; streams up to it finish, later ones are refused.
* No exception escapes a protocol callback: a bug in one stream answers 500 (or resets that
  stream); a protocol error ends the connection with GOAWAY.
"""

from __future__ import annotations

import asyncio
import logging

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes

from meshproxy.core import metrics

from .downstream import reset
from .exchange import Exchange
from .h2_fields import H2Conn, request_head, send_window
from .h2_stream import BAD_HEAD, STREAM_HIGH, H2Stream
from .http1 import HTTPError

__all__ = ["H2ClientConnection", "LIMITS"]

log = logging.getLogger("meshproxy.l7")

# SETTINGS we announce and the limits we keep (docs/http2.md, "Settings and limits").
MAX_CONCURRENT_STREAMS = 128      # nginx's http2_max_concurrent_streams; gRPC clients queue above it
INITIAL_WINDOW = 65535            # per stream: the RFC default, reopened as the upstream takes bytes
CONNECTION_WINDOW = 1 << 20       # all streams of a connection together
MAX_FRAME_SIZE = 16384            # the RFC minimum: bounds what one frame costs us
_WINDOW = 10.0                    # seconds over which abuse is counted
LIMITS = {
    # kind: events allowed per _WINDOW
    "rapid_reset": 200,           # streams the client reset before their response ended
    "control_flood": 1000,        # PING, SETTINGS, PRIORITY and unknown frames
    "empty_data_flood": 1000,     # DATA frames with no payload that do not end the stream
    "bad_requests": 100,          # streams refused as malformed
}
# Stream ids are 31 bits: past this a client is told to open a new connection (GOAWAY).
_LAST_STREAM_IDS = (1 << 31) - 1 - (1 << 16)
_PREFACE_TIMEOUT_FLOOR = 1.0
_WRITE_HIGH = 256 * 1024


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 client connection (see the module docstring for its invariants)."""

    __slots__ = ("server", "listener", "loop", "settings", "transport", "conn", "streams", "tls", "client",
                 "peer_ip", "peer_port", "sni", "processing", "closed", "goaway_at", "peer_goaway", "timer", "timer_at",
                 "deadline", "idle_at", "writing_paused", "read_paused", "blocked_since", "counts",
                 "window_start", "max_headers", "max_body", "flow_blocked", "last_sid", "fresh", "write_soon")

    def __init__(self, server, listener, client, peer_ip: str, peer_port: int, tls: bool,
                 sni: str | None = None) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.settings = server.settings
        self.transport = None
        cfg = H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False,
                              normalize_outbound_headers=False)
        self.conn = H2Conn(config=cfg)
        self.streams: dict[int, H2Stream] = {}
        self.tls = tls
        self.client = client
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.sni = sni                        # the TLS server name the client asked for
        self.processing = False
        self.closed = False
        self.goaway_at: int | None = None     # last stream id announced in our GOAWAY
        self.peer_goaway = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline = 0.0
        self.idle_at = self.loop.time()
        self.writing_paused = False
        self.read_paused = False
        self.blocked_since = 0.0              # response bytes wait for a window / the socket since
        self.counts = dict.fromkeys(LIMITS, 0)
        self.window_start = self.idle_at
        s = self.settings
        self.max_headers = s.max_headers
        self.max_body = s.max_body_size
        self.flow_blocked: set[H2Stream] = set()
        self.last_sid = 0
        self.fresh = True                     # the client's preface has not been read yet
        self.write_soon = False               # a write is scheduled for the end of this loop turn

    # -- start -----------------------------------------------------------------------------------

    def start(self, transport, data: bytes) -> None:
        """Take the connection over (the caller made us its transport's protocol)."""
        self.transport = transport
        # Room for one turn's responses of many streams before we stop reading the client
        # (the HTTP/1.1 shell's 16 KiB is for one response at a time).
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        self.server.connections.add(self)
        conn = self.conn
        conn.local_settings.update({
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.INITIAL_WINDOW_SIZE: INITIAL_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.settings.max_head_size,
            SettingCodes.ENABLE_PUSH: 0,
        })
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        # The preface and a first request are due within the header timeout.
        self._set_deadline(self.loop.time() + max(self.settings.header_timeout, _PREFACE_TIMEOUT_FLOOR))
        self.write()
        if data:
            self.data_received(data)

    # -- asyncio callbacks -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.processing = True
        try:
            try:
                events = self.conn.receive_data(data)
            except (ProtocolError, FlowControlError) as exc:
                self._protocol_error(exc)
                return
            if self.fresh and events:
                # The preface and SETTINGS are here: from now on the connection may idle for
                # the keep-alive timeout (gRPC channels connect ahead of their first call).
                self.fresh = False
                if not self.streams:
                    self._set_idle(self.loop.time() + self.settings.keepalive_timeout)
            for ev in events:
                if self.closed:
                    break
                self._event(ev)
        except Exception as exc:  # noqa: BLE001 - no exception may escape a protocol callback
            log.error("L7: internal error on an HTTP/2 connection: %r", exc, exc_info=exc)
            self._goaway_close(ErrorCodes.INTERNAL_ERROR)
            return
        finally:
            self.processing = False
        # One write for the whole read; the exchanges' upstream writes go out now too.
        for st in list(self.streams.values()):
            ex = st.exchange
            if ex is not None:
                ex.flush()
        self.write()

    def _event(self, ev) -> None:
        t = type(ev)
        if t is DataReceived:
            st = self.streams.get(ev.stream_id)
            n = ev.flow_controlled_length
            data = ev.data
            if not data and ev.stream_ended is None and self._abuse("empty_data_flood"):
                return
            ex = st.exchange if st is not None else None
            if ex is None:
                if n:
                    self.ack(ev.stream_id, n)   # nobody wants it: keep the connection window open
                return
            if data:
                ex.request_data(data)
            if n:
                if st.req_paused:
                    st.unacked += n
                else:
                    self.ack(ev.stream_id, n)
        elif t is RequestReceived:
            self._request(ev)
        elif t is StreamEnded:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.req_ended = True
                ex = st.exchange
                if ex is not None:
                    ex.request_end(st.req_trailers)
                else:
                    self.maybe_forget(st)
        elif t is TrailersReceived:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.req_trailers = [(n, v) for n, v in ev.headers if b"_" not in n]
        elif t is WindowUpdated:
            self._window_opened(ev.stream_id)
        elif t is StreamReset:
            self._stream_reset(ev.stream_id)
        elif t is PingReceived:
            self._abuse("control_flood")
        elif t is RemoteSettingsChanged:
            if not self._abuse("control_flood") and SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                self._window_opened(0)
        elif t is PriorityUpdated or t is UnknownFrameReceived:
            self._abuse("control_flood")
        elif t is ConnectionTerminated:
            # The client opens no more streams; those in flight finish.
            self.peer_goaway = True
            if not self.streams:
                self._close()

    # -- requests ----------------------------------------------------------------------------------

    def _request(self, ev) -> None:
        sid = ev.stream_id
        end = ev.stream_ended is not None
        metrics.http2_streams.inc()
        self.last_sid = sid
        if self.goaway_at is not None and sid > self.goaway_at:
            self._refuse_stream(sid)
            return
        st = H2Stream(self, sid)
        self.streams[sid] = st
        st.req_ended = end
        if self.timer is not None and self.deadline and len(self.streams) == 1:
            self.deadline = 0.0   # not idle any more (the timer re-checks)
        try:
            head = request_head(ev.headers, end, self.max_headers, self.max_body)
        except HTTPError as exc:
            metrics.http_bad_requests.labels(str(exc.status)).inc()
            self.server.count_local(exc.status)
            st.head = BAD_HEAD
            st.send_local(exc.status, exc.reason.encode("latin-1", "replace") + b"\n", (), False)
            st.status = -1
            self.maybe_forget(st)
            self._abuse("bad_requests")
            return
        st.head = head
        st.grpc = head.grpc
        ex = Exchange(self.server, st, head, self.loop.time(), self.listener.http, end)
        st.exchange = ex
        ex.start()
        if sid >= _LAST_STREAM_IDS and self.goaway_at is None:
            self.goaway(ErrorCodes.NO_ERROR)   # the client must move to a new connection soon

    def _refuse_stream(self, sid: int) -> None:
        try:
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        except (ProtocolError, StreamClosedError):
            pass

    def _stream_reset(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self.flow_blocked.discard(st)
        st.closed = True
        ex = st.exchange
        if ex is not None:
            st.exchange = None
            st.route = ex.route
            ex.client_gone("stream reset")
            if st.grpc:
                st.grpc_status = b"1"   # the client cancelled the call: CANCELLED
                st.count_grpc(ex)
            # Reset before its response ended: the pattern of the rapid-reset attack.
            self._abuse("rapid_reset")
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        self._check_idle()

    # -- writing -----------------------------------------------------------------------------------

    def send_informational(self, sid: int, block) -> None:
        try:
            self.conn.send_headers(sid, block)
        except (ProtocolError, StreamClosedError):
            return
        if not self.processing:
            self.write()

    def push(self, st: H2Stream) -> bool:
        """Hand ``h2`` what of ``st``'s response fits the client's windows. True: something
        was queued for writing."""
        if st.closed or self.closed:
            return False
        conn = self.conn
        sid = st.sid
        wrote = False
        try:
            if st.pending_head is not None:
                block = st.pending_head
                st.pending_head = None
                st.head_sent = True
                end = st.ended and not st.out and not st.trailers
                conn.send_headers(sid, block, end_stream=end)
                wrote = True
                if end:
                    self._finished(st)
                    return True
            if not st.head_sent:
                return wrote
            if st.out:
                sent, last = send_window(conn, sid, st)
                wrote = wrote or sent
                if last:
                    self._finished(st)
                    return True
                if st.out:
                    if st not in self.flow_blocked:
                        self.flow_blocked.add(st)
                        if not self.blocked_since:
                            self.blocked_since = self.loop.time()
                            self._arm_send_timeout()
                elif st in self.flow_blocked:
                    self.flow_blocked.discard(st)
                if st.down_paused and st.out_bytes <= STREAM_HIGH // 2:
                    st.down_paused = False
                    ex = st.exchange
                    if ex is not None:
                        ex.downstream_resumed()
            if not st.out and st.ended:
                if st.trailers:
                    conn.send_headers(sid, st.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                wrote = True
                self._finished(st)
        except StreamClosedError:
            st.closed = True
            self._forget(st)
        return wrote

    def _finished(self, st: H2Stream) -> None:
        """Our side of ``st`` is closed (END_STREAM sent)."""
        st.closed = True
        self.flow_blocked.discard(st)
        if st.reset_after and not st.req_ended:
            try:
                self.conn.reset_stream(st.sid, ErrorCodes.NO_ERROR)
            except (ProtocolError, StreamClosedError):
                pass
            st.req_ended = True
            ex = st.exchange
            if ex is not None:
                # The request's end will not come: the exchange learns it is over.
                st.exchange = None
                ex.client_gone("request not read")
        self.maybe_forget(st)

    def maybe_forget(self, st: H2Stream) -> None:
        if st.closed and st.req_ended and st.exchange is None:
            self._forget(st)

    def _forget(self, st: H2Stream) -> None:
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
        self.flow_blocked.discard(st)
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        self._check_idle()

    def _check_idle(self) -> None:
        if self.streams or self.closed:
            return
        if self.peer_goaway or self.goaway_at is not None:
            self._close()
            return
        self.idle_at = now = self.loop.time()
        self._set_deadline(now + self.settings.keepalive_timeout)

    def reset_stream(self, st: H2Stream, code) -> None:
        if not st.closed:
            st.closed = True
            try:
                self.conn.reset_stream(st.sid, code)
            except (ProtocolError, StreamClosedError):
                pass
        st.req_ended = True
        st.out = []
        st.out_bytes = 0
        self._forget(st)
        if not self.processing:
            self.write()

    def ack(self, sid: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, sid)
        except (ProtocolError, StreamClosedError):
            return
        if not self.processing:
            self.write()

    def write(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def write_later(self) -> None:
        """Write at the end of this turn of the loop: the responses of all the upstream reads
        handled in it go out in one write (streams of one connection answer together)."""
        if not self.write_soon and not self.processing:
            self.write_soon = True
            self.loop.call_soon(self._write_now)

    def _write_now(self) -> None:
        self.write_soon = False
        try:
            self.write()
        except Exception as exc:  # noqa: BLE001 - no exception may escape a loop callback
            log.error("L7: internal error writing to an HTTP/2 client: %r", exc, exc_info=exc)
            self.close_now()

    def _window_opened(self, sid: int) -> None:
        """The client opened a window (0: the connection's, or all streams' initial one)."""
        if sid and sid in self.streams:
            targets = [self.streams[sid]]
        else:
            targets = list(self.flow_blocked)
        for st in targets:
            self.push(st)
        if not self.flow_blocked:
            self.blocked_since = 0.0
        elif targets:
            self.blocked_since = self.loop.time()   # progress: the send timeout starts again

    # -- write back-pressure -----------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.writing_paused = True
        try:
            if not self.read_paused and not self.closed:
                # Read no more until the client takes what we have (bounds the ACKs a PING
                # flood makes us queue, and the responses a request flood would).
                self.read_paused = True
                self.transport.pause_reading()
            for st in self.streams.values():
                ex = st.exchange
                if ex is not None and not st.down_paused:
                    ex.downstream_paused()
            if not self.blocked_since:
                self.blocked_since = self.loop.time()
                self._arm_send_timeout()
        except Exception as exc:  # noqa: BLE001
            log.error("L7: internal error pausing an HTTP/2 connection: %r", exc, exc_info=exc)

    def resume_writing(self) -> None:
        self.writing_paused = False
        try:
            if self.read_paused and not self.closed:
                self.read_paused = False
                self.transport.resume_reading()
            for st in list(self.streams.values()):
                ex = st.exchange
                if ex is not None and not st.down_paused:
                    ex.downstream_resumed()
            self.blocked_since = self.loop.time() if self.flow_blocked else 0.0
        except Exception as exc:  # noqa: BLE001
            log.error("L7: internal error resuming an HTTP/2 connection: %r", exc, exc_info=exc)

    def _arm_send_timeout(self) -> None:
        timeout = self.settings.send_timeout
        if timeout:
            self._arm_at(self.blocked_since + timeout)

    # -- timer ---------------------------------------------------------------------------------------

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        self._arm_at(when)

    def _set_idle(self, when: float) -> None:
        """A later idle deadline than the one armed: the timer re-checks when it fires."""
        self.deadline = when
        if self.timer is None:
            self._arm_at(when)

    def _arm_at(self, when: float) -> None:
        if self.timer is None or when < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = when
            self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed:
            return
        try:
            now = self.loop.time()
            timeout = self.settings.send_timeout
            if self.blocked_since and timeout:
                if now >= self.blocked_since + timeout:
                    metrics.http_send_timeouts.inc()
                    log.debug("L7: HTTP/2 send timeout: %s opened no window for %.1f s", self.peer_ip, timeout)
                    self.close_now()
                    return
                self._arm_at(self.blocked_since + timeout)
            if self.deadline and not self.streams:
                if now >= self.deadline:
                    # Keep-alive idle (or no request after the preface): say goodbye.
                    self.deadline = 0.0
                    self._goaway_close(ErrorCodes.NO_ERROR)
                    return
                self._arm_at(self.deadline)
        except Exception as exc:  # noqa: BLE001
            log.error("L7: internal error in an HTTP/2 timer: %r", exc, exc_info=exc)
            self.close_now()

    # -- abuse ----------------------------------------------------------------------------------------

    def _abuse(self, kind: str) -> bool:
        """Count one event of ``kind``; True when the connection was ended for it."""
        now = self.loop.time()
        counts = self.counts
        if now - self.window_start >= _WINDOW:
            self.window_start = now
            for k in counts:
                counts[k] = 0
        n = counts[kind] = counts[kind] + 1
        if n <= LIMITS[kind]:
            return False
        metrics.http2_abuse.labels(kind).inc()
        log.info("L7: HTTP/2 client %s: %s (%d in %.0f s): GOAWAY ENHANCE_YOUR_CALM", self.peer_ip, kind, n, _WINDOW)
        self._goaway_close(ErrorCodes.ENHANCE_YOUR_CALM)
        return True

    def _protocol_error(self, exc: Exception) -> None:
        log.debug("L7: HTTP/2 protocol error from %s: %s", self.peer_ip, exc)
        metrics.http2_abuse.labels("protocol").inc()
        code = getattr(exc, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
        self._goaway_close(code)

    # -- closing -------------------------------------------------------------------------------------

    def goaway(self, code) -> None:
        """GOAWAY with the last stream we took: those finish, later ones are refused."""
        if self.goaway_at is not None or self.closed:
            return
        self.goaway_at = self.last_sid
        try:
            self.conn.goaway(code, self.last_sid)
        except ProtocolError:
            pass
        self.write()

    def _goaway_close(self, code) -> None:
        if self.closed:
            return
        if self.goaway_at is None:
            self.goaway_at = self.last_sid
            try:
                self.conn.goaway(code, self.last_sid)
            except ProtocolError:
                pass
            try:
                data = self.conn.data_to_send()
            except Exception:  # noqa: BLE001 - closing anyway
                data = b""
            if data:
                self.transport.write(data)
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self._end_streams("connection closed")
        try:
            self.write()   # what is queued (a last response, a GOAWAY) goes out before the FIN
        except Exception:  # noqa: BLE001 - closing anyway
            log.debug("L7: HTTP/2 connection closed with output lost", exc_info=True)
        self.closed = True
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def _end_streams(self, why: str) -> None:
        for st in list(self.streams.values()):
            ex = st.exchange
            if ex is not None:
                st.exchange = None
                ex.client_gone(why)
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
        self.streams.clear()
        self.flow_blocked.clear()

    def close_if_idle(self, grace: float = 0.0) -> None:
        """Draining: GOAWAY now (streams in flight finish), close once none is left."""
        if self.closed:
            return
        try:
            self.goaway(ErrorCodes.NO_ERROR)
            if not self.streams:
                self._close()
        except Exception:  # noqa: BLE001
            log.exception("L7: error draining an HTTP/2 connection")
            self.close_now()

    def close_now(self) -> None:
        if self.transport is None:
            return
        self._end_streams("connection reset")
        self.closed = True
        reset(self.transport)

    def eof_received(self) -> bool:
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._end_streams("client connection lost")
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.server.connections.discard(self)
            self.listener.closed()
        except Exception:  # noqa: BLE001
            log.exception("L7: internal error closing an HTTP/2 connection")
