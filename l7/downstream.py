"""The ingress HTTP server: client connections, routing, and the proxied exchange.

``IngressServer(runtime)`` binds ``--ingress-listen`` / ``--ingress-tls-listen`` and serves
every Ingress of the snapshot in force. Each client connection is one ``ClientConnection``
(an ``asyncio.Protocol``); it parses requests with ``l7.http1.RequestParser``, routes each with
the snapshot's ``RouteTable``, and streams it to a pod over a pooled ``l7.upstream``
connection. docs/l7.md describes the behaviour and records each decision.

Invariants of a client connection:

* One request at a time. While a request is in flight, further bytes are only buffered by the
  parser (pipelining) and reading is paused as soon as such bytes arrive; the next request is
  parsed only after the response is complete. So responses go out in request order and at
  most one receive buffer of pipelined input is held.
* The snapshot is read once per request (``runtime.snapshot`` into a local in ``_begin``); a
  request in flight keeps its route, endpoint and upstream connection whatever is published
  meanwhile.
* Bodies are streamed, never accumulated: request body bytes go upstream as they arrive (kept
  for a retry only up to ``_REPLAY_MAX``), response bytes go to the client as they arrive.
  Back-pressure in both directions: a full upstream write buffer pauses reading from the client,
  a full client write buffer pauses reading from the upstream, and a tunnel does both.
* A response byte, once sent to the client, commits the exchange: no retry after that, and an
  upstream failure then aborts the client connection (RST) so that a truncated body can never
  look complete. Before that, upstream failures become 502 / 503 / 504.
* A request the parser refuses is answered with its status and ``Connection: close``, and
  nothing of it reaches an upstream (``HTTPError`` is raised at the head, before routing; a
  framing error in a body that is already streaming aborts the upstream connection).
* One timer per connection, re-armed rather than re-created: ``deadline`` is what must
  happen by when (header read, keep-alive idle, upstream response, client body, tunnel idle),
  and ``send_deadline``, while our write buffer is above its high-water mark, is when the
  client must have taken some of it (``--send-timeout``); the timer fires at the earlier of
  them or before and then re-checks, and it is never armed later than ``header_timeout``
  ahead, so the switch from idle to reading a head (the header deadline counts from the first
  byte) or the start of a send deadline normally needs no new timer.
* No exception escapes an asyncio callback: each entry point catches, logs once, answers 500
  (or aborts when the response has started) and closes.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from bisect import bisect_left as _bisect_left
from typing import Any


from meshproxy.core import metrics, sockets
from meshproxy.core.paths import normalize_request_path

from .accesslog import AccessLog
from .headers import IDEMPOTENT_METHODS, ClientInfo, TrustedProxies, request_headers, response_headers
from .http1 import (
    LAST_CHUNK,
    PAUSED,
    EndOfMessage,
    HTTPError,
    RequestHead,
    RequestParser,
    ResponseHead,
    serialize_response_head,
    serialize_trailers,
)
from .tls import TLSContexts
from .upstream import UpstreamConnection, UpstreamPool

__all__ = ["IngressServer", "ClientConnection"]

log = logging.getLogger("meshproxy.l7")

# Client connection states.
_IDLE, _HEAD, _BUSY, _TUNNEL, _CLOSED = range(5)
# How the response body is framed towards the client.
_M_NONE, _M_RAW, _M_CHUNKED = range(3)
# Reasons to pause reading from the client (bit flags).
_RP_PIPELINE, _RP_UPSTREAM, _RP_CONNECTING, _RP_WRITING = 1, 2, 4, 8

# Request bytes kept for a retry (head + body as sent); beyond this a request is not replayable.
_REPLAY_MAX = 64 * 1024
# Responses from a pod that an idempotent, replayable request is retried on (before any byte of
# them reaches the client): the pod or something in front of it failed, not the request.
_RETRY_STATUSES = frozenset((502, 503, 504))
# Retry budget per backend (Envoy's defaults, retry_budget: budget_percent 20%,
# min_retry_concurrency 3): retries in flight <= max(_BUDGET_MIN, active requests // _BUDGET_DIV).
_BUDGET_MIN = 3
_BUDGET_DIV = 5
# Request bytes queued while the upstream connection is being opened before the client is paused.
_PENDING_HIGH = 256 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Longest request head remembered per connection for the repeated-head shortcut: bounds the
# memory it adds to an idle keep-alive connection (the raw head, its parse and the upstream
# head: a few KiB at most; ~1 KiB for the usual 100-300 byte head).
_MEMO_MAX = 1024
# What the general path's parser would hand over after a bodiless head (read-only: _req_end
# only looks at .trailers of chunked requests).
_END_OF_MESSAGE = EndOfMessage()
# Route decisions cached per snapshot: at most this many, keys (host + path) at most this long,
# so a client sending endless distinct paths costs a bounded amount of memory.
_ROUTE_CACHE_SIZE = 4096
_ROUTE_CACHE_KEY_MAX = 512
_BAD_PATH = (None, None)
# Bytes in a socket's send queue not yet acknowledged by the peer (Linux: SIOCOUTQ ==
# TIOCOUTQ); None elsewhere, then only our own write buffer counts for the send timeout.
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", None)
_INT0 = b"\0\0\0\0"
# SO_LINGER on, 0 s: close() sends RST.
_LINGER_RST = struct.pack("ii", 1, 0)


def _reset(transport) -> None:
    """Close with an RST instead of a FIN: the peer must see an error, not an end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except (OSError, ValueError):  # already gone (ValueError: fd is -1)
            pass
    transport.abort()


_REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 204: b"No Content",
    304: b"Not Modified", 308: b"Permanent Redirect", 400: b"Bad Request", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}

_CHUNKED_FIELD = b"Transfer-Encoding: chunked\r\n"
_FIELD_JOIN = b": ".join   # ("Name", "value") -> b"Name: value": one C call per field


def _request_head(method: bytes, target: bytes, fields, content_length: int | None,
                  chunked: bool) -> bytes:
    """``http1.serialize_request_head`` without its output validation (same bytes: see
    test_l7_unit.py::test_fast_serializers_match_http1). Safe because every input was validated
    by the request parser (method, target, each field) or is built by us from validated parts
    (forwarding fields); the check costs more than the rest of the head building."""
    if chunked:
        framing = _CHUNKED_FIELD
    elif content_length is not None:
        framing = b"Content-Length: %d\r\n" % content_length
    else:
        framing = b""
    if fields:
        return b"".join((method, b" ", target, b" HTTP/1.1\r\n",
                         b"\r\n".join(map(_FIELD_JOIN, fields)), b"\r\n", framing, b"\r\n"))
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n", framing, b"\r\n"))


def _response_head(status: int, reason: bytes, fields, content_length: int | None,
                   chunked: bool) -> bytes:
    """``http1.serialize_response_head`` (HTTP/1.1) without output validation, for responses
    parsed by the response parser (see ``_request_head``)."""
    if chunked:
        framing = _CHUNKED_FIELD
    elif content_length is not None:
        framing = b"Content-Length: %d\r\n" % content_length
    else:
        framing = b""
    if fields:
        return b"".join((b"HTTP/1.1 %d %s\r\n" % (status, reason),
                         b"\r\n".join(map(_FIELD_JOIN, fields)), b"\r\n", framing, b"\r\n"))
    return b"".join((b"HTTP/1.1 %d %s\r\n" % (status, reason), framing, b"\r\n"))


_date_cache = [0, b""]


def _http_date() -> bytes:
    """The Date field value, formatted at most once a second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    return _date_cache[1]


PARSER_MODES = ("auto", "strict", "fast")


def parser_mode(settings) -> str:
    """``Settings.http_parser``; "auto" defers to $MESHPROXY_HTTP_PARSER (so test suites can be
    run under each mode) and means "fast" when that is unset. "strict": the general parser
    only; "fast": its ``parse_whole`` fast paths for complete simple messages in one read."""
    mode = getattr(settings, "http_parser", "auto") or "auto"
    if mode == "auto":
        mode = os.environ.get("MESHPROXY_HTTP_PARSER", "auto") or "auto"
    if mode not in PARSER_MODES:
        # "httptools" included: measured, not wired in (docs/http.md, "Fast path").
        raise ValueError(f"http_parser: {mode!r} is not one of auto, strict, fast")
    return "fast" if mode == "auto" else mode


class _RouteStats:
    """Metric children of one (namespace, ingress, service), counted in plain ints on the
    request path and pushed to prometheus-client by ``flush`` (once a second from the server's
    ticker, and at drain). Why: a Counter.inc plus a Histogram.observe take three locks and
    about a dozen Python calls per request, ~5% of the proxy's CPU at keep-alive rates; an
    int increment and a bisect do the same bookkeeping. Errors and retries are rare and still
    go straight to their counters."""
    __slots__ = ("labels", "codes", "duration", "errors", "retries", "counts", "bounds",
                 "buckets", "seconds", "dirty")

    def __init__(self, namespace: str, ingress: str, service: str, route: str = "") -> None:
        self.labels = (namespace, ingress, service, route)
        self.codes: list[Any] = [None] * 6
        self.duration = metrics.http_duration.labels(namespace, ingress, service, route)
        self.errors: dict[str, Any] = {}
        self.retries = None
        self.counts = [0] * 6          # requests by status class since the last flush
        # The histogram's upper bounds (+Inf last): bisect_left gives the bucket observe() picks
        # (the first bound >= the value).
        self.bounds = tuple(getattr(self.duration, "_upper_bounds", ()))
        self.buckets = [0] * len(self.bounds)
        self.seconds = 0.0
        self.dirty = False

    def done(self, status: int, seconds: float) -> None:
        self.counts[status // 100] += 1
        bounds = self.bounds
        if bounds:
            self.buckets[_bisect_left(bounds, seconds)] += 1
            self.seconds += seconds
        else:  # a prometheus-client without the attributes flush() relies on
            self.duration.observe(seconds)
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        counts = self.counts
        for cls in range(6):
            n = counts[cls]
            if n:
                counts[cls] = 0
                child = self.codes[cls]
                if child is None:
                    child = self.codes[cls] = metrics.http_requests.labels(*self.labels, "%dxx" % cls)
                child.inc(n)
        if self.bounds:
            # Histogram.observe() is "_sum.inc(v); _buckets[i].inc(1)"; the same, n at a time.
            duration = self.duration
            buckets = self.buckets
            for i, n in enumerate(buckets):
                if n:
                    buckets[i] = 0
                    duration._buckets[i].inc(n)
            duration._sum.inc(self.seconds)
            self.seconds = 0.0

    def error(self, kind: str) -> None:
        child = self.errors.get(kind)
        if child is None:
            child = self.errors[kind] = metrics.upstream_errors.labels(self.labels[0], self.labels[2], kind)
        child.inc()

    def retry(self) -> None:
        if self.retries is None:
            self.retries = metrics.http_retries.labels(self.labels[0], self.labels[2])
        self.retries.inc()


class ClientConnection(asyncio.Protocol):
    """One client connection (see the module docstring for its invariants)."""

    __slots__ = (
        # connection
        "server", "listener", "loop", "settings", "transport", "parser", "state", "peer_ip",
        "client", "trusted", "tls", "proto",
        "read_paused", "writing_paused", "processing", "client_eof", "close_after",
        "timer", "timer_at", "deadline", "send_deadline", "send_left",
        # the request in flight
        "head", "method", "t0", "match", "target", "backend", "stats", "ep", "held", "upstream",
        "attempts", "connect_failures", "tried", "token", "connecting", "req_done", "req_chunked",
        "sent", "sent_bytes", "pending", "pending_bytes", "resp_started", "resp_done",
        "resp_status", "resp_bytes", "resp_mode", "resp_keep", "up_keep", "timeout",
        "got_head", "up_eof", "idle_at", "budget", "retrying", "fast",
        "memo_raw", "memo_head", "memo_up", "memo_via",
    )

    def __init__(self, server: IngressServer, listener: _Listener) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.settings = server.settings
        self.transport: Any = None
        self.parser: RequestParser | None = None
        self.state = _IDLE
        self.idle_at = self.loop.time()
        self.tls = listener.tls
        self.proto = b"https" if listener.tls else b"http"
        self.read_paused = 0
        self.writing_paused = False
        self.processing = False
        self.client_eof = False
        self.close_after = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline = 0.0
        self.send_deadline = 0.0
        self.send_left = 0
        self.upstream: UpstreamConnection | None = None
        self.head: RequestHead | None = None
        self.ep = None
        self.held = None
        self.stats: _RouteStats | None = None
        self.match = None
        self.connecting = False
        self.token = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.budget: list[int] | None = None
        self.retrying = False
        self.fast = server.fast_parse
        # The last request head taken by the fast path, as received, parsed and as sent
        # upstream (see data_received); only heads up to _MEMO_MAX bytes are kept.
        self.memo_raw = self.memo_head = self.memo_up = self.memo_via = None

    # ------------------------------------------------------------------------------------------
    # asyncio callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        try:
            server = self.server
            settings = self.settings
            server.connections.add(self)
            self.listener.opened()
            peer = transport.get_extra_info("peername")
            ip = peer[0] if peer else ""
            self.peer_ip = ip
            self.trusted = trusted = server.trusted.contains(ip) if server.trusted else False
            listener = self.listener
            local_host = listener.local_host
            if local_host is None:  # wildcard listener: which address did the client reach?
                local = transport.get_extra_info("sockname")
                host = local[0] if local else ""
                local_host = (f"[{host}]:{listener.port}" if ":" in host else f"{host}:{listener.port}").encode()
            self.client = ClientInfo(ip, trusted, self.proto, listener.port_b, local_host)
            # No TCP_NODELAY here: uvloop and asyncio set it on every TCP transport already.
            self.parser = RequestParser(settings.max_head_size, settings.max_headers, settings.max_body_size)
            # A new connection must send a head within header_timeout (a silent connection is
            # a slowloris too).
            self._set_deadline(self.loop.time() + settings.header_timeout)
        except Exception:  # noqa: BLE001 - no exception may escape a protocol callback
            log.exception("L7: internal error accepting a connection")
            self._close(abort=True)

    def data_received(self, data: bytes) -> None:
        try:
            state = self.state
            if state == _TUNNEL:
                up = self.upstream
                if up is not None:
                    up.transport.write(data)
                    self.deadline = self.loop.time() + self.settings.idle_timeout
                return
            if state == _CLOSED:
                return
            if self.writing_paused and (state == _IDLE or state == _HEAD):
                # Between requests, while the client does not take our answers: no more input
                # (pipelined requests answered by us would otherwise pile up responses in our
                # buffer without bound). What arrived is still handled.
                self._pause_reading(_RP_WRITING)
            if state == _IDLE and self.fast:
                # Fast path (docs/http.md "parse_whole"): the read is exactly one bodiless
                # request head. Same strict checks; anything else is declined and takes the
                # general path below with nothing consumed.
                if data == self.memo_raw and self.parser.repeat_whole():
                    # The same bytes as this connection's previous request (health checks,
                    # pollers, load generators, API clients repeat their heads exactly): the
                    # same head, and below the same upstream head, without parsing or
                    # rebuilding. One memcmp when it misses.
                    head = self.memo_head
                else:
                    head = self.parser.parse_whole(data)
                    if head is not None and len(data) <= _MEMO_MAX:
                        self.memo_raw = data
                        self.memo_head = head
                        self.memo_up = None
                if head is not None:
                    self.processing = True
                    try:
                        self._begin(head)
                        if self.state == _BUSY:
                            self._req_end(_END_OF_MESSAGE)
                    finally:
                        self.processing = False
                    if self.pending and self.upstream is not None:
                        self._flush_up()
                    return
            self.parser.feed(data)
            if state == _IDLE:
                # First byte of a head: the header deadline counts from here, not from the
                # last byte received, so dribbling bytes cannot extend it.
                self.state = _HEAD
                self._set_deadline(self.loop.time() + self.settings.header_timeout)
            elif state == _BUSY and self.req_done:
                # Pipelined input while a response is in flight: keep it buffered, read no more.
                self._pause_reading(_RP_PIPELINE)
                return
            self._process()
        except Exception as exc:  # noqa: BLE001 - see module docstring
            self._internal_error(exc)

    def eof_received(self) -> bool:
        try:
            state = self.state
            self.client_eof = True
            if state == _TUNNEL:
                up = self.upstream
                if up is not None and up.transport.can_write_eof():
                    up.transport.write_eof()
                    if self.up_eof:
                        self._close()
                        return False
                    return not self.tls
                self._close()
                return False
            if state == _BUSY and self.req_done and not self.tls:
                # Half-close after a complete request: answer it, then close.
                return True
            if state == _BUSY:
                # The client gave up in the middle of its request.
                self._abort_exchange("client closed")
            self._close()
        except Exception as exc:  # noqa: BLE001
            self._internal_error(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            state = self.state
            if state == _BUSY or state == _TUNNEL:
                self._abort_exchange("client connection lost")
            self.state = _CLOSED
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.server.connections.discard(self)
            self.listener.closed()
        except Exception:  # noqa: BLE001
            log.exception("L7: internal error closing a connection")

    def pause_writing(self) -> None:
        self.writing_paused = True
        up = self.upstream
        if up is not None:
            up.pause_reading()
        try:
            # Send timeout: from now on the client must take bytes from our buffer within
            # send_timeout (checked by the connection's timer, see _on_timer).
            timeout = self.settings.send_timeout
            if timeout and self.transport is not None:
                self.send_left = self._unsent()
                now = self.loop.time()
                self.send_deadline = now + timeout
                poll = now + timeout / 4
                if self.timer is None or poll < self.timer_at:
                    self._arm(poll)
        except Exception as exc:  # noqa: BLE001
            self._internal_error(exc)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.read_paused & _RP_WRITING:
            self._resume_reading(_RP_WRITING)
        up = self.upstream
        if up is not None:
            up.resume_reading()
            state = self.state
            # The upstream was paused for the client: its read gap (or the tunnel's idle time)
            # counts from now, not from before the pause.
            if state == _BUSY:
                if self.got_head:
                    self.deadline = self.loop.time() + self.target.timeout
            elif state == _TUNNEL:
                self.deadline = self.loop.time() + self.settings.idle_timeout

    # ------------------------------------------------------------------------------------------
    # timer

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        if self.timer is None or when < self.timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        try:
            now = self.loop.time()
            sending = self.writing_paused and self.send_deadline > 0.0
            if sending:
                # Send timeout, polled every quarter period while our buffer stays full: the
                # client must take some bytes within send_timeout (nginx's send_timeout: the
                # time between two successful writes; here what the kernel sent counts too).
                left = self._unsent()
                if left < self.send_left:
                    self.send_left = left
                    self.send_deadline = now + self.settings.send_timeout
                elif now >= self.send_deadline:
                    self._send_timed_out()
                    return
                poll = now + self.settings.send_timeout / 4
                if poll > self.send_deadline:
                    poll = self.send_deadline
            state = self.state
            if state == _CLOSED:
                if sending:  # closing after the last response: it must still go out in time
                    self._arm(poll)
                return
            deadline = self.deadline
            if sending and state == _BUSY:
                # The upstream is paused for this client: only the send deadline runs.
                deadline = self.send_deadline
            if now < deadline:
                # Early: re-check later, never more than header_timeout ahead (see docstring).
                at = now + self.settings.header_timeout
                if sending and poll < at:
                    at = poll
                self._arm(deadline if deadline < at else at)
                return
            self._deadline_passed()
            if sending and self.timer is None and self.writing_paused:
                # Closed gracefully (keep-alive timeout, 408) with bytes still waiting for the
                # client: they must go out within the send timeout too.
                self._arm(poll)
        except Exception as exc:  # noqa: BLE001
            self._internal_error(exc)

    def _unsent(self) -> int:
        """Response bytes the client has not taken yet: our write buffer plus the socket's
        unacknowledged send queue (so a client that reads slowly but steadily counts as
        progressing even while the kernel buffer is too full for us to write)."""
        transport = self.transport
        n = transport.get_write_buffer_size()
        if _SIOCOUTQ is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    n += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, _INT0))[0]
                except (OSError, ValueError):
                    pass
        return n

    def _send_timed_out(self) -> None:
        """The client read nothing of what we have for it for send_timeout: a slow reader
        would hold the connection and, mid-response, an upstream connection (which cannot be
        reused with a response half read: it is closed)."""
        metrics.http_send_timeouts.inc()
        log.debug("L7: send timeout: %s read nothing for %.1f s, closed", self.peer_ip,
                  self.settings.send_timeout)
        state = self.state
        if state == _BUSY or state == _TUNNEL:
            self._abort_exchange("client send timeout")
        self.state = _CLOSED
        self.writing_paused = False
        if self.transport is not None:
            # Aborted, also when a graceful close is waiting for the buffer to drain.
            _reset(self.transport)

    def _deadline_passed(self) -> None:
        state = self.state
        if state == _IDLE:
            self._close()  # keep-alive idle timeout
        elif state == _HEAD:
            metrics.http_bad_requests.labels("408").inc()
            self._answer_error(408, b"request header timeout\n")
        elif state == _TUNNEL:
            self._abort_exchange("tunnel idle timeout")
            self._close()
        elif state == _BUSY:
            if (not self.req_done and not self.connecting and not self.resp_started
                  and not (self.read_paused & _RP_UPSTREAM)):
                # We are waiting for the client's body, not for the upstream.
                self._detach(reuse=False)
                self._answer_error(408, b"request body timeout\n")
            elif self.upstream is not None or self.connecting:
                self._upstream_failed("timeout", 504, b"upstream timed out\n")
            else:
                self._close(abort=True)

    # ------------------------------------------------------------------------------------------
    # request side

    def _pause_reading(self, flag: int) -> None:
        if not self.read_paused and self.state != _CLOSED:
            self.transport.pause_reading()
        self.read_paused |= flag

    def _resume_reading(self, flag: int) -> None:
        if self.read_paused & flag:
            self.read_paused &= ~flag
            if not self.read_paused and self.state != _CLOSED:
                self.transport.resume_reading()

    def _process(self) -> None:
        """Take events from the request parser until it needs data or a request is in flight."""
        parser = self.parser
        self.processing = True
        try:
            while self.state != _CLOSED:
                try:
                    ev = parser.next_event()
                except HTTPError as exc:
                    self._bad_request(exc)
                    break
                t = type(ev)
                if t is bytes:
                    self._req_body(ev)
                elif t is RequestHead:
                    self._begin(ev)
                elif t is EndOfMessage:
                    self._req_end(ev)
                    if self.state == _BUSY:
                        break  # the response is pending; the parser would only say PAUSED
                else:  # NEED_DATA, or PAUSED while the response is in flight
                    break
        finally:
            self.processing = False
        if self.pending and self.upstream is not None:
            self._flush_up()

    def _begin(self, head: RequestHead) -> None:
        # Per-request state. Not reset here because the end of the previous request left it
        # so: upstream / held / connecting (_detach), pending (flushed or dropped).
        server = self.server
        self.state = _BUSY
        self.head = head
        self.method = head.method
        self.t0 = now = self.loop.time()
        self.match = self.stats = self.ep = self.tried = self.sent = None
        self.attempts = self.connect_failures = self.resp_status = self.resp_bytes = 0
        self.req_done = self.resp_started = self.resp_done = self.resp_keep = False
        self.up_keep = self.got_head = self.up_eof = False
        self.req_chunked = head.chunked
        self.resp_mode = _M_NONE
        server.active += 1

        snap = server.runtime.snapshot
        if head.method == b"CONNECT":
            return self._local(405, b"CONNECT is not supported here\n", close=True)
        if head.path == b"*":  # "OPTIONS *" (the parser allows "*" for OPTIONS only): about
            # the server itself, RFC 9112 §3.2.4 - answered here, never routed (docs/routing.md)
            return self._local(200, b"", extra=((b"Allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),))
        if snap is None:
            return self._local(503, b"no configuration yet\n")
        m, stats = server.route(snap, head.host, head.path)
        if m is None:
            if stats is None:
                metrics.http_bad_requests.labels("400").inc()
                return self._local(400, b"invalid request path\n")
            metrics.http_no_route.inc()
            self.stats = stats
            return self._local(404, b"404 page not found: no Ingress rule matches this host and path\n")
        self.match = m
        target = m.action
        self.stats = stats
        if target.redirect is not None and not self.tls and not self._forwarded_https(head):
            return self._redirect_https(head)
        key = target.backends[0].key
        backend = snap.backends.get(key) if key is not None else None
        if backend is None or not backend.usable:
            stats.error("no_endpoints")
            return self._local(503, b"no endpoint available for this route\n")
        usable = backend.usable
        if len(usable) == 1 and backend.affinity_timeout is None:
            ep = usable[0]  # nothing to choose (and no affinity pin to record)
        else:
            ep = server.balancers.pick(backend, self.peer_ip, policy=backend.l7_policy)
        if ep is None:
            stats.error("no_endpoints")
            return self._local(503, b"no endpoint available for this route\n")
        self.backend = backend
        self.target = target
        self.timeout = target.per_try_timeout or target.timeout
        # Retry budget of this backend: [active requests, retries in flight] (see _may_retry).
        budget = server.budgets.get(key)
        if budget is None:
            budget = server.budgets[key] = [0, 0]
        budget[0] += 1
        self.budget = budget

        # The upstream head: original method, target and Host; hop-by-hop fields removed,
        # forwarding fields set; framing re-written from the parsed fields.
        tgt = head.target
        if tgt[0] == 47:  # origin-form: forwarded as sent
            authority = None
        else:  # absolute-form: origin-form upstream, the target's authority as Host
            tgt = head.path + (b"?" + head.query if head.query else b"")
            authority = head.host
        if head is self.memo_head and self.memo_up is not None and self.memo_via is server.via:
            data = self.memo_up  # a repeated head (see data_received): built already
        else:
            hdrs = request_headers(head.headers, head.connection_tokens, self.client,
                                   head.upgrade is not None, authority, server.via)
            data = _request_head(head.method, tgt, hdrs, head.content_length, head.chunked)
            if head is self.memo_head:
                self.memo_up = data
                self.memo_via = server.via
        self.sent = [data]
        self.sent_bytes = self.pending_bytes = len(data)
        self.pending = [data]
        if head.expect_continue:
            # We answer the expectation ourselves once the request is routed (nginx and Envoy
            # do the same); Expect is not forwarded. A request refused before this point gets
            # its final status without a 100 and the connection is closed.
            self.transport.write(_CONTINUE)
        self._set_deadline(now + self.timeout)
        self._start_attempt(ep)

    def _forwarded_https(self, head: RequestHead) -> bool:
        if not self.trusted:
            return False
        for name, value in head.headers:
            if name.lower() == b"x-forwarded-proto":
                return value.strip().lower() == b"https"
        return False

    def _redirect_https(self, head: RequestHead) -> None:
        host = head.host
        if host.startswith(b"["):
            host = host[: host.find(b"]") + 1]
        else:
            host = host.partition(b":")[0]
        tls_port = self.server.tls_port
        if tls_port and tls_port != 443:
            host += b":%d" % tls_port
        tgt = head.target if head.target[:1] == b"/" else head.path + (b"?" + head.query if head.query else b"")
        self._local(308, b"", extra=((b"Location", b"https://" + host + tgt),))

    def _req_body(self, data: bytes) -> None:
        if self.upstream is None and not self.connecting:
            return  # answered locally or failed: the body is discarded (we close after)
        if self.req_chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        n = len(data)
        self.pending.append(data)
        self.pending_bytes += n
        sent = self.sent
        if sent is not None:
            self.sent_bytes += n
            if self.sent_bytes <= _REPLAY_MAX:
                sent.append(data)
            else:
                self.sent = None  # too big to keep: this request cannot be retried any more
        if self.pending_bytes > _PENDING_HIGH:
            if self.connecting:
                self._pause_reading(_RP_CONNECTING)
            else:
                self._flush_up()
        if self.resp_started or self.got_head:
            return
        self.deadline = self.loop.time() + self.timeout

    def _req_end(self, ev: EndOfMessage) -> None:
        self.req_done = True
        if self.req_chunked and (self.upstream is not None or self.connecting):
            data = serialize_trailers(ev.trailers) if ev.trailers else LAST_CHUNK
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.sent is not None:
                self.sent.append(data)
        if self.resp_done:
            self._finish()

    def _flush_up(self) -> None:
        up = self.upstream
        if up is None or self.connecting:
            return
        pending = self.pending
        if len(pending) == 1:
            up.transport.write(pending[0])
        else:
            up.transport.write(b"".join(pending))
        self.pending = []
        self.pending_bytes = 0

    # ------------------------------------------------------------------------------------------
    # attempts

    def _start_attempt(self, ep, fresh: bool = False) -> None:
        server = self.server
        self.ep = self.held = ep
        self.attempts += 1
        server.balancers.acquire(ep)
        addr = (ep.ip, ep.port)
        conn = None if fresh else server.pool.take(addr)
        if conn is not None:
            self._attach(conn)
            if not self.processing:
                # A retry from a callback; inside _process the loop's end flushes (one write
                # for head and body).
                self._flush_up()
            return
        self._connect(addr)

    def _connect(self, addr) -> None:
        self.connecting = True
        self.token += 1
        token = self.token
        backend = self.backend
        self.server.pool.connect(addr, (backend.namespace, backend.service),
                                 lambda conn, exc: self._connected(token, conn, exc))

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.client = self
        conn.received = False
        conn.requests += 1
        conn.parser.set_request_method(self.method)
        if self.writing_paused:
            conn.pause_reading()

    def _connected(self, token: int, conn: UpstreamConnection | None, exc: BaseException | None) -> None:
        try:
            if token != self.token or self.state == _CLOSED or not self.connecting:
                # Nobody waits for it any more: keep a good new connection for later.
                if conn is not None:
                    self.server.pool.release(conn)
                return
            self.connecting = False
            if conn is None:
                self._connect_failed(exc)
                return
            conn.reused = False
            self._attach(conn)
            self._flush_up()
            self._resume_reading(_RP_CONNECTING)
        except Exception as e:  # noqa: BLE001
            self._internal_error(e)

    def _connect_failed(self, exc: BaseException | None) -> None:
        server = self.server
        ep = self.ep
        log.debug("L7: connect to %s:%d failed: %s", ep.ip, ep.port, exc)
        self._detach(reuse=False)
        server.balancers.report_failure(ep, self.backend)
        self.stats.error("connect")
        self.connect_failures += 1
        self._add_tried(ep)
        # Nothing was sent: another endpoint may always be tried (at least one other, and up
        # to the route's attempts).
        if self.connect_failures < max(self.target.attempts, 2):
            nxt = server.balancers.pick(self.backend, self.peer_ip, exclude=self.tried,
                                        policy=self.backend.l7_policy)
            if nxt is not None:
                self.stats.retry()
                self.attempts -= 1  # connect failures have their own budget
                self._start_attempt(nxt)
                return
        self._fail_local(503, b"no endpoint could be reached\n")

    def _add_tried(self, ep) -> None:
        addr = (ep.ip, ep.port)
        self.tried = frozenset((addr,)) if self.tried is None else self.tried | {addr}

    def _detach(self, reuse: bool) -> None:
        """End the current attempt's hold on its upstream connection and endpoint."""
        up = self.upstream
        if up is not None:
            self.upstream = None
            if reuse:
                self.server.pool.release(up)
            else:
                up.abort()
            self._resume_reading(_RP_UPSTREAM)
        self.connecting = False
        self.token += 1
        held = self.held
        if held is not None:
            self.held = None
            self.server.balancers.release(held)

    def _upstream_failed(self, kind: str, status: int, body: bytes, stale: bool = False) -> None:
        """The current attempt failed (reset, timeout, protocol error). Retry or answer."""
        server = self.server
        ep = self.ep
        self._detach(reuse=False)
        if not stale:  # a pod closing an idle keep-alive connection is not a failing pod
            server.balancers.report_failure(ep, self.backend)
        self.stats.error(kind)
        if self.resp_started:
            # Part of the response is out: the client must see an error, never a short body
            # that looks complete.
            self._account(self.resp_status or 502)
            self._close(abort=True)
            return
        self._add_tried(ep)
        if self._may_retry(kind, stale):
            self.stats.retry()
            self.pending = list(self.sent)
            self.pending_bytes = self.sent_bytes
            self.got_head = False
            self._set_deadline(self.loop.time() + self.timeout)
            if stale:
                # The pooled connection was closed by the pod meanwhile: same endpoint, fresh
                # connection; this does not count as an attempt.
                self.attempts -= 1
                self._start_attempt(ep, fresh=True)
                return
            nxt = server.balancers.pick(self.backend, self.peer_ip, exclude=self.tried,
                                        policy=self.backend.l7_policy)
            if nxt is None:
                nxt = server.balancers.pick(self.backend, self.peer_ip, policy=self.backend.l7_policy)
            if nxt is not None:
                self._start_attempt(nxt)
                return
        self._fail_local(status, body)

    def _may_retry(self, kind: str, stale: bool) -> bool:
        if self.sent is None or self.resp_started or kind == "protocol":
            return False
        if self.method not in IDEMPOTENT_METHODS:
            return False
        if stale:
            return True  # the keep-alive race, not a failing pod: outside the budget
        if kind == "timeout" and self.target.per_try_timeout is None:
            return False  # the route's whole timeout is spent
        return self.attempts < self.target.attempts and self._take_budget()

    def _take_budget(self) -> bool:
        """A slot of the backend's retry budget for this request (Envoy's retry budget): retries
        in flight <= max(3, 20% of the backend's active requests). A request holds at most one
        slot (its retries run one after the other) from its first budgeted retry until it is
        accounted. Over budget: no retry, the failure goes to the client, and the overflow is
        counted (``meshproxy_upstream_errors_total{kind="retry_budget"}``). Without it a failing
        backend would get up to ``attempts`` times its normal load exactly when it is least
        able to take it (a retry storm)."""
        if self.retrying:
            return True
        budget = self.budget
        if budget is None:
            return False
        active = budget[0]
        if budget[1] >= (active // _BUDGET_DIV if active >= _BUDGET_MIN * _BUDGET_DIV else _BUDGET_MIN):
            self.stats.error("retry_budget")
            self.server.retry_budget_overflows += 1
            return False
        budget[1] += 1
        self.retrying = True
        return True

    def _retry_response(self, conn: UpstreamConnection, head: ResponseHead) -> bool:
        """A 502/503/504 head from the pod, nothing of it sent to the client yet: retry the
        request on another endpoint when it may be retried (idempotent, replayable, completely
        read from the client, attempts left, a different endpoint to try, budget). The discarded
        response is read to its end if it is already here (then the connection is pooled when
        keep-alive), else that connection is closed. False: relay the response as is."""
        if (self.sent is None or not self.req_done or self.resp_started
                or self.attempts >= self.target.attempts or self.state != _BUSY
                or self.method not in IDEMPOTENT_METHODS):
            return False
        server = self.server
        ep = self.ep
        self._add_tried(ep)
        nxt = server.balancers.pick(self.backend, self.peer_ip, exclude=self.tried,
                                    policy=self.backend.l7_policy)
        if nxt is None or (nxt.ip, nxt.port) in self.tried or not self._take_budget():
            return False
        # Discard the rest of this response: reuse the connection only if it ended cleanly
        # with what we already have and the pod keeps it alive.
        complete = False
        p = conn.parser
        try:
            while True:
                ev = p.next_event()
                if type(ev) is bytes:
                    continue
                # PAUSED: the fast path returned the whole response already.
                complete = ev.__class__ is EndOfMessage or ev is PAUSED
                break
        except HTTPError:
            complete = False
        self._detach(reuse=complete and head.keep_alive)
        server.balancers.report_failure(ep, self.backend)  # outlier detection counts 5xx
        self.stats.retry()
        self.pending = list(self.sent)
        self.pending_bytes = self.sent_bytes
        self.got_head = False
        self.resp_status = 0
        self.up_keep = False
        self.resp_mode = _M_NONE
        self._set_deadline(self.loop.time() + self.timeout)
        self._start_attempt(nxt)
        return True

    # ------------------------------------------------------------------------------------------
    # response side (called by UpstreamConnection)

    def upstream_data(self, conn: UpstreamConnection, data: bytes) -> None:
        try:
            if conn is not self.upstream:
                conn.abort()
                return
            if self.state == _TUNNEL:
                self.transport.write(data)
                self.deadline = self.loop.time() + self.settings.idle_timeout
                return
            conn.received = True
            p = conn.parser
            if self.fast and not self.got_head and self.state == _BUSY:
                # Fast path: the read is exactly one complete Content-Length response (see
                # ResponseParser.parse_whole); declined -> the general path, nothing consumed.
                whole = p.parse_whole(data)
                if whole is not None:
                    head, body = whole
                    if head.status in _RETRY_STATUSES and self._retry_response(conn, head):
                        return
                    out = self._resp_head(conn, head)
                    if body:
                        self.resp_bytes = len(body)
                        out += body  # one write for head and body
                    self.resp_started = True
                    self.transport.write(out)
                    self._resp_end(conn)
                    return
            out: list[bytes] = []
            # Body bytes straight from the read when nothing is buffered (no copies; see
            # ResponseParser.take_body); the loop below then finds only what followed them.
            body = p.take_body(data) if self.got_head else None
            if body is None:
                p.feed(data)
            else:
                self.resp_bytes += len(body)
                out.append(b"%x\r\n%b\r\n" % (len(body), body) if self.resp_mode == _M_CHUNKED else body)
            while True:
                try:
                    ev = p.next_event()
                except HTTPError as exc:
                    # Whatever is still in ``out`` is dropped: if the head is among it, the
                    # client gets a clean 502 instead of a head followed by a reset.
                    log.debug("L7: bad response from %s:%d: %s", conn.addr[0], conn.addr[1], exc)
                    self._upstream_failed("protocol", 502, b"bad response from upstream\n")
                    return
                t = type(ev)
                if t is bytes:
                    self.resp_bytes += len(ev)
                    if self.resp_mode == _M_CHUNKED:
                        out.append(b"%x\r\n%b\r\n" % (len(ev), ev))
                    else:
                        out.append(ev)
                elif t is ResponseHead:
                    if ev.status in _RETRY_STATUSES and self._retry_response(conn, ev):
                        # Retried: what is in ``out`` (at most interim 1xx heads, which a
                        # client may do without) is dropped with the failed attempt.
                        return
                    data = self._resp_head(conn, ev)
                    if data is not None:
                        out.append(data)
                    if self.state != _BUSY or self.upstream is not conn:
                        if out and self.state != _CLOSED:
                            self._write(out)
                        if self.state == _TUNNEL:
                            self._tunnel_start(conn)
                        return
                elif t is EndOfMessage:
                    if self.resp_mode == _M_CHUNKED:
                        out.append(serialize_trailers(ev.trailers) if ev.trailers else LAST_CHUNK)
                    if out:
                        self._write(out)
                    self._resp_end(conn)
                    return
                else:
                    break
            if out:
                self._write(out)
            if self.got_head:
                # Refresh the read deadline (upstream idle between body reads).
                self.deadline = self.loop.time() + self.target.timeout
        except Exception as exc:  # noqa: BLE001
            self._internal_error(exc)

    def _write(self, out: list[bytes]) -> None:
        self.resp_started = True
        if len(out) == 1:
            self.transport.write(out[0])
        else:
            self.transport.write(b"".join(out))

    def _resp_head(self, conn: UpstreamConnection, head: ResponseHead) -> bytes | None:
        status = head.status
        req = self.head
        if status < 200:
            if status == 101:
                if req.upgrade is None:
                    self._upstream_failed("protocol", 502, b"upstream switched protocols unasked\n")
                    return None
                self.got_head = True
                self.resp_status = 101
                self.state = _TUNNEL
                hdrs = response_headers(head.headers, head.connection_tokens, True, self.server.via)
                return _response_head(101, head.reason, hdrs, None, False)
            if status == 100 or req.version == 10:
                return None  # our own 100 went out already; HTTP/1.0 clients get no 1xx
            hdrs = response_headers(head.headers, head.connection_tokens, False, self.server.via)
            return _response_head(status, head.reason, hdrs, None, False)
        self.got_head = True
        self.resp_status = status
        self.up_keep = head.keep_alive
        method = self.method
        client11 = req.version == 11
        server = self.server
        keep = (req.keep_alive and self.req_done and not self.client_eof
                and not server.draining and not server.runtime.draining and req.upgrade is None)
        kind = head.body_kind(method)
        cl = None
        chunked = False
        if kind == "none":
            self.resp_mode = _M_NONE
            if method == b"HEAD":
                cl = head.content_length
                chunked = head.chunked and client11
            elif status == 304:
                cl = head.content_length
        elif kind == "length":
            self.resp_mode = _M_RAW
            cl = head.content_length
        elif client11:  # chunked, or delimited by the upstream's close: chunked to the client
            self.resp_mode = _M_CHUNKED
            chunked = True
        else:  # an HTTP/1.0 client: the body ends when we close
            self.resp_mode = _M_RAW
            keep = False
        self.resp_keep = keep
        hdrs = response_headers(head.headers, head.connection_tokens, False, server.via)
        if not keep:
            hdrs.append((b"Connection", b"close"))
        elif not client11:
            hdrs.append((b"Connection", b"keep-alive"))
        self.deadline = self.loop.time() + self.target.timeout
        return _response_head(status, head.reason, hdrs, cl, chunked)

    def _resp_end(self, conn: UpstreamConnection) -> None:
        self.resp_done = True
        server = self.server
        ep = self.ep
        self._detach(reuse=self.up_keep and self.req_done)
        balancers = server.balancers
        if self.resp_status >= 500:
            # Outlier detection counts 5xx answers as failures (Envoy's consecutive_5xx).
            balancers.report_failure(ep, self.backend)
        elif balancers.failures:  # only an endpoint with failures has anything to reset
            balancers.report_success(ep, self.backend)
        if not self.req_done:
            # The response is complete before the request: the rest of the body is not read.
            self.resp_keep = False
        self._finish()

    def upstream_eof(self, conn: UpstreamConnection) -> bool:
        try:
            if conn is not self.upstream:
                return False
            if self.state == _TUNNEL:
                self.up_eof = True
                if self.client_eof or not self.transport.can_write_eof():
                    self._close()
                    return False
                self.transport.write_eof()
                return True
            if not self.got_head:
                # Closed before a (final) response head: nothing of the response went out, so
                # this is retryable like a reset. On a reused pooled connection with not a
                # byte received it is the keep-alive race: the pod closed it as we reused it.
                self._upstream_failed("reset", 502, b"upstream closed the connection\n",
                                      stale=conn.reused and not conn.received)
                return False
            conn.parser.feed_eof()
            # A close-delimited body ends here; a body cut short raises HTTPError (502 path,
            # which aborts the client connection because the head is out).
            self.upstream_data(conn, b"")
            if self.upstream is conn:
                self._upstream_failed("reset", 502, b"upstream closed the connection\n")
        except Exception as exc:  # noqa: BLE001
            self._internal_error(exc)
        return False

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        try:
            if conn is not self.upstream:
                return
            if self.state == _TUNNEL:
                self._close()
                return
            self._upstream_failed("reset", 502, b"upstream connection reset\n",
                                  stale=conn.reused and not conn.received)
        except Exception as e:  # noqa: BLE001
            self._internal_error(e)

    def upstream_pause_writing(self) -> None:
        try:
            self._pause_reading(_RP_UPSTREAM)
        except Exception as exc:  # noqa: BLE001
            self._internal_error(exc)

    def upstream_resume_writing(self) -> None:
        try:
            self._resume_reading(_RP_UPSTREAM)
        except Exception as exc:  # noqa: BLE001
            self._internal_error(exc)

    def _tunnel_start(self, conn: UpstreamConnection) -> None:
        """After a 101: bytes either side already buffered go first, then a plain byte pump."""
        trailing = conn.parser.trailing
        if trailing:
            self.transport.write(trailing)
        mine = self.parser.trailing
        if mine:
            conn.transport.write(mine)
        self._resume_reading(_RP_PIPELINE)
        self.deadline = self.loop.time() + self.settings.idle_timeout

    # ------------------------------------------------------------------------------------------
    # ending a request

    def _account(self, status: int) -> None:
        """Count the request in flight once: metrics, access log, active gauge."""
        head = self.head
        if head is None:
            return
        self.head = None
        server = self.server
        server.active -= 1
        budget = self.budget
        if budget is not None:
            self.budget = None
            budget[0] -= 1
            if self.retrying:
                self.retrying = False
                budget[1] -= 1
        dt = self.loop.time() - self.t0
        stats = self.stats
        if stats is not None:
            stats.done(status, dt)
        if server.access_log is not None:
            m = self.match
            ep = self.ep
            server.access_log.log(
                self.peer_ip, head.method, head.target, head.version, status, self.resp_bytes, dt,
                f"{ep.ip}:{ep.port}" if ep is not None else "",
                m.source.partition(" ")[2] if m is not None else "",
                m.name if m is not None else "",
                self.attempts)

    def _finish(self) -> None:
        """Request and response are both complete."""
        self._account(self.resp_status)
        self.match = None
        self.state = _IDLE
        self.idle_at = now = self.loop.time()
        if (not self.resp_keep or self.close_after or self.client_eof or self.server.draining
                or self.server.runtime.draining):
            self._close()
            return
        parser = self.parser
        parser.start_next()
        self._set_deadline(now + self.settings.keepalive_timeout)
        if self.read_paused:
            self._resume_reading(_RP_PIPELINE)
        # Inside _process the loop goes on with the next pipelined request itself; otherwise
        # parse what was pipelined meanwhile (usually nothing: skip the parser call then).
        if not self.processing and parser.buffered:
            self._process()
            if self.state == _IDLE and parser.buffered:
                self.state = _HEAD  # part of the next head is here: its deadline runs
                self._set_deadline(self.loop.time() + self.settings.header_timeout)

    def _local(self, status: int, body: bytes, close: bool = False, extra=()) -> None:
        """Answer the current request ourselves."""
        head = self.head
        has_body = head.chunked or bool(head.content_length)
        server = self.server
        keep = (not close and head.keep_alive and (self.req_done or not has_body)
                and not self.client_eof and not server.draining and not server.runtime.draining
                and head.upgrade is None)
        hdrs = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Date", _http_date())]
        hdrs.extend(extra)
        if not keep:
            hdrs.append((b"Connection", b"close"))
        elif head.version == 10:
            hdrs.append((b"Connection", b"keep-alive"))
        data = serialize_response_head(status, _REASONS.get(status, b"Unknown"), hdrs,
                                       content_length=len(body), chunked=False)
        if head.method != b"HEAD":
            data += body
        self.transport.write(data)
        self.resp_status = status
        self.resp_bytes = len(body)
        self.resp_done = True
        self.resp_keep = keep
        self.resp_started = True
        if not keep or self.req_done:
            self._finish()

    def _fail_local(self, status: int, body: bytes) -> None:
        """An upstream failure before any response byte: answer it; close if the request body
        was not read completely (it cannot be skipped safely)."""
        self._local(status, body, close=not self.req_done)

    def _answer_error(self, status: int, body: bytes) -> None:
        """Answer outside the normal flow (bad input, timeouts, internal errors) and close."""
        if self.state == _CLOSED:
            return
        self.resp_status = status
        self._account(status)
        data = serialize_response_head(
            status, _REASONS.get(status, b"Error"),
            [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Date", _http_date()),
             (b"Connection", b"close")],
            content_length=len(body), chunked=False) + body
        self.transport.write(data)
        self.state = _CLOSED
        self._close()

    def _bad_request(self, exc: HTTPError) -> None:
        metrics.http_bad_requests.labels(str(exc.status)).inc()
        if self.state == _BUSY:
            # A body that turned out malformed (or too large) while streaming: the upstream
            # got part of it; that connection is finished.
            self._detach(reuse=False)
            if self.resp_started:
                self._account(self.resp_status or exc.status)
                self._close(abort=True)
                return
        self._answer_error(exc.status, exc.reason.encode("latin-1", "replace") + b"\n")

    def _abort_exchange(self, why: str) -> None:
        """The connection ends while a request is in flight: drop the upstream attempt and
        count the request (499: the client went away, nginx's convention)."""
        state = self.state
        if state != _BUSY and state != _TUNNEL:
            return
        log.debug("L7: %s during a request", why)
        self._detach(reuse=False)
        if state == _TUNNEL:
            self._account(101)
        else:
            self._account(self.resp_status if self.resp_done else 499)
        self.state = _CLOSED

    def _internal_error(self, exc: BaseException) -> None:
        log.error("L7: internal error: %r", exc, exc_info=exc)
        if self.state == _CLOSED:
            return
        try:
            state = self.state
            if (state == _BUSY and not self.resp_started) or state == _HEAD or state == _IDLE:
                if state == _BUSY:
                    self._detach(reuse=False)
                self._answer_error(500, b"internal error\n")
            else:
                self._close(abort=True)
        except Exception:  # noqa: BLE001 - last resort: drop the connection
            log.exception("L7: error while handling an internal error")
            self.state = _CLOSED
            if self.transport is not None:
                self.transport.abort()

    def _close(self, abort: bool = False) -> None:
        state = self.state
        if state == _BUSY or state == _TUNNEL:
            self._abort_exchange("connection closed")
        self.state = _CLOSED
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            _reset(transport)
        else:
            transport.close()

    def close_if_idle(self, grace: float = 0.0) -> None:
        """Draining: a keep-alive connection idle for ``grace`` seconds is closed.

        A client that is still sending gets ``Connection: close`` on its next response
        instead; closing it the moment it goes idle would race with a request already on the
        wire (RFC 9112 §9.3.1: the client would have to retry it)."""
        if self.state == _IDLE and self.loop.time() - self.idle_at >= grace:
            self._close()


class _Listener:
    """One listening socket, with accept paused (not refused) at ``--max-connections``.

    The socket is bound once; serving it is an asyncio server over a ``dup()`` of it, so
    pausing closes only that server while the kernel keeps queueing connections in the
    backlog of the original socket until we resume.
    """

    def __init__(self, server: IngressServer, host: str, port: int, ssl_ctx) -> None:
        self.server = server
        self.tls = ssl_ctx is not None
        self.ssl_ctx = ssl_ctx
        self.count = 0
        self.limit = server.settings.max_connections
        self.aserver = None
        self.paused = False
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

    def opened(self) -> None:
        # Counted in connection_made (after a TLS handshake): a failed handshake never
        # reaches the protocol, so counting in the factory would leak.
        self.count += 1
        if self.limit and self.count >= self.limit and not self.paused:
            self.paused = True
            self._stop_server()

    def closed(self) -> None:
        self.count -= 1
        if self.paused and not self.stopped and (not self.limit or self.count < self.limit):
            self.paused = False
            if self.aserver is None:
                self.server.loop.create_task(self.start())

    def _stop_server(self) -> None:
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
        self.connections: set[ClientConnection] = set()
        self.listeners: list[_Listener] = []
        self.trusted = TrustedProxies(settings.trusted_proxies)
        self.parser_mode = parser_mode(settings)
        # The parse_whole fast paths (same strictness, see docs/http.md) unless "strict".
        self.fast_parse = self.parser_mode != "strict"
        self.access_log = AccessLog(settings.access_log) if settings.access_log else None
        self.tls = None
        self.tls_port = 0
        self.via: bytes | None = None   # b"1.1 meshproxy" to add Via (off by default)
        self.active = 0
        self.draining = False
        # Retry budgets by backend key: [active requests, retries in flight]; entries at
        # [0, 0] are pruned once a second. Overflows: retries refused by a budget.
        self.budgets: dict[tuple[str, str, str], list[int]] = {}
        self.retry_budget_overflows = 0
        self.no_route_stats = _RouteStats("", "", "")
        self._stats: dict[tuple[str, str, str, str], _RouteStats] = {}
        self._stats_by_match: dict[int, _RouteStats] = {}
        self._stats_snap = None
        self._route_snap = None
        self._route_cache: dict[tuple[bytes, bytes], tuple] = {}
        self._ticker: asyncio.TimerHandle | None = None
        self._secrets_seen = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        settings = self.settings
        self.pool = UpstreamPool(self.loop, settings)
        if self.runtime.snapshot is not None:
            self.pool.apply(self.runtime.snapshot)
        if settings.ingress_listen:
            host, port = settings.ingress_listen
            self.listeners.append(_Listener(self, host, port, None))
        if settings.ingress_tls_listen:
            self.tls = TLSContexts()
            self._update_tls(self.runtime.snapshot)
            host, port = settings.ingress_tls_listen
            lst = _Listener(self, host, port, self.tls.listener_context)
            self.tls_port = lst.port
            self.listeners.append(lst)
        for lst in self.listeners:
            await lst.start()
        self._ticker = self.loop.call_later(1.0, self._tick)

    @property
    def ports(self) -> list[int]:
        """Bound ports, plain listener first (tests bind port 0)."""
        return [lst.port for lst in self.listeners]

    def apply(self, snapshot) -> None:
        """A new snapshot is in force: drop idle pooled connections to endpoints that left,
        rebuild TLS contexts whose Secret changed."""
        if self.pool is not None:
            self.pool.apply(snapshot)
        if self.tls is not None:
            self._update_tls(snapshot)

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
            if conn.transport is not None:
                conn._close(abort=True)
        if self.pool is not None:
            self.pool.close()
        # Let the loop run the connection_lost callbacks of what was just closed.
        for _ in range(3):
            await asyncio.sleep(0)
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self._tick_metrics()
        if self.access_log is not None:
            self.access_log.close()

    # -- housekeeping ------------------------------------------------------------------------------

    def _tick(self) -> None:
        try:
            self._tick_metrics()
            budgets = self.budgets
            for key in [k for k, v in budgets.items() if not v[0] and not v[1]]:
                del budgets[key]
            if self.pool is not None:
                self.pool.sweep()
            if self.access_log is not None:
                self.access_log.flush()
        except Exception:  # noqa: BLE001 - housekeeping must keep running
            log.exception("L7: housekeeping failed")
        self._ticker = self.loop.call_later(1.0, self._tick)

    def state(self) -> dict:
        """For /debug and tests: retry budgets in use and overflows so far."""
        return {
            "active": self.active,
            "retry_budget_overflows": self.retry_budget_overflows,
            "retry_budgets": {"/".join(k): {"active": a, "retries_in_flight": r}
                              for k, (a, r) in self.budgets.items()},
        }

    def _tick_metrics(self) -> None:
        for stats in self._stats.values():
            stats.flush()
        self.no_route_stats.flush()
        metrics.http_active.set(self.active)
        metrics.http_downstream_connections.set(len(self.connections))
        if self.pool is not None:
            self.pool.export_metrics()

    def route(self, snap, host: bytes, path: bytes):
        """(match, stats) for a request; (None, stats) no route (404); (None, None) the path is
        refused (400). Cached per snapshot for short keys: the same few hosts and paths come
        again and again, and normalisation + matching is the costliest part of routing."""
        if snap is not self._route_snap:
            self._route_snap = snap
            self._route_cache = {}
        key = (host, path)
        hit = self._route_cache.get(key)
        if hit is not None:
            return hit
        npath = normalize_request_path(path.decode("latin-1"))
        if npath is None:
            hit = _BAD_PATH
        else:
            m = snap.routes.match(host.decode("latin-1"), npath)
            hit = (m, self.route_stats(snap, m)) if m is not None else (None, self.no_route_stats)
        if len(host) + len(path) <= _ROUTE_CACHE_KEY_MAX:
            cache = self._route_cache
            if len(cache) >= _ROUTE_CACHE_SIZE:
                cache.clear()
            cache[key] = hit
        return hit

    def route_stats(self, snap, match) -> _RouteStats:
        if snap is not self._stats_snap:
            self._stats_snap = snap
            self._stats_by_match = {}
        s = self._stats_by_match.get(id(match))
        if s is None:
            ref = match.action.backends[0] if match.action.backends else None
            ingress = match.source.partition(" ")[2]
            ns, _, _ = ingress.partition("/")
            service = ref.key[1] if ref is not None and ref.key is not None else ""
            if ref is not None and ref.key is not None:
                ns = ref.key[0]
            key = (ns, ingress, service, match.name)
            s = self._stats.get(key)
            if s is None:
                s = self._stats[key] = _RouteStats(*key)
            self._stats_by_match[id(match)] = s
        return s
