"""HTTP/1.1 from clients: the downstream shell around the exchange.

A ``ClientConnection`` (an ``asyncio.Protocol``) turns a client's bytes into requests with
``l7.http1.RequestParser``, gives each one to a new ``l7.exchange.Exchange``, and writes what
the exchange decides back as HTTP/1.1: response heads with the framing this client needs
(Content-Length, chunked, or close-delimited for HTTP/1.0), bodies, trailers, local answers,
100 Continue, tunnels after a 101. It decides nothing about routing, endpoints, attempts or
upstream timeouts; it keeps what belongs to the client connection: keep-alive, pipelining, the
header, idle and send deadlines, read pausing. docs/l7.md describes the behaviour.

Invariants of a client connection:

* One request at a time. While an exchange is in flight, further bytes are only buffered by
  the parser (pipelining) and reading is paused as soon as such bytes arrive; the next request
  is parsed only after the exchange is done. So responses go out in request order and at most
  one receive buffer of pipelined input is held.
* Back-pressure in both directions: the exchange pauses our reading while the upstream cannot
  take the body (``pause_request``); a full client write buffer pauses the exchange's upstream
  reading (``downstream_paused``); a tunnel does both.
* A request the parser refuses is answered with its status and ``Connection: close``, and
  nothing of it reaches an upstream (the error is raised at the head, before the exchange; a
  framing error in a body that is already streaming ends the exchange's attempt).
* One timer per connection, re-armed rather than re-created. It fires at the earliest of:
  the connection's own deadline (header read, keep-alive idle), the exchange's deadline while
  one is in flight (it only ever reads ``exchange.deadline``, so the exchange can move it later
  without re-arming), and, while our write buffer is above its high-water mark, the send
  deadline by which the client must have taken some of it (``--send-timeout``). It never fires
  later than ``header_timeout`` ahead, so moving a deadline later costs no new timer.
* No exception escapes an asyncio callback: each entry point catches, logs once, answers 500
  (or aborts when the response has started) and closes.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
import time
from typing import Any

from meshproxy.core import metrics

from .exchange import CONNECTING, ROUTING, STREAMING, TUNNEL, WAITING, Exchange
from .h1writer import response_head_bytes  # noqa: F401 - re-exported (tests, older callers)
from .http1 import (
    LAST_CHUNK,
    EndOfMessage,
    HTTPError,
    RequestHead,
    RequestParser,
    serialize_response_head,
    serialize_trailers,
)

__all__ = ["ClientConnection", "H2_PREFACE", "REASONS", "http_date", "reset", "response_head_bytes"]

log = logging.getLogger("meshproxy.l7")

# Client connection states. _FRESH: nothing read yet (HTTP/1.1 or HTTP/2 is decided on the first
# bytes); it sorts after _TUNNEL so the hot path's one state test covers it.
_IDLE, _HEAD, _BUSY, _TUNNEL, _CLOSED, _FRESH = range(6)
# The HTTP/2 connection preface (RFC 9113 §3.4): a client with prior knowledge starts with it.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# This much of it tells the two protocols apart ("PRI * HTTP/2.0" is refused by HTTP/1.1).
_PREFACE_DECIDES = 14
# How the response body is framed towards the client.
_M_NONE, _M_RAW, _M_CHUNKED = range(3)
# Reasons to pause reading from the client (bit flags).
_RP_PIPELINE, _RP_UPSTREAM, _RP_CONNECTING, _RP_WRITING = 1, 2, 4, 8
_PAUSE_FLAGS = {"upstream": _RP_UPSTREAM, "connecting": _RP_CONNECTING}

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_WRITE_HIGH = 16 * 1024
# Pipelined requests started by one _process call: the rest wait for a later loop turn (at once
# if the client takes our answers, else until it does), so a client pipelining thousands of
# requests we answer ourselves (404s, redirects) holds the loop for a bounded time.
_PIPELINE_PER_TURN = 32
# Longest request head remembered per connection for the repeated-head shortcut: bounds the
# memory it adds to an idle keep-alive connection (the raw head, its parse and the upstream
# head: a few KiB at most; ~1 KiB for the usual 100-300 byte head).
_MEMO_MAX = 1024
# Bytes in a socket's send queue not yet acknowledged by the peer (Linux: SIOCOUTQ ==
# TIOCOUTQ); None elsewhere, then only our own write buffer counts for the send timeout.
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", None)
_INT0 = b"\0\0\0\0"
# SO_LINGER on, 0 s: close() sends RST.
_LINGER_RST = struct.pack("ii", 1, 0)
_NEVER = float("inf")


def reset(transport) -> None:
    """Close with an RST instead of a FIN: the peer must see an error, not an end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except (OSError, ValueError):  # already gone (ValueError: fd is -1)
            pass
    transport.abort()


REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 204: b"No Content",
    301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 307: b"Temporary Redirect",
    304: b"Not Modified", 308: b"Permanent Redirect", 400: b"Bad Request", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
    421: b"Misdirected Request",
    414: b"URI Too Long", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}

_date_cache = [0, b""]


def http_date() -> bytes:
    """The Date field value, formatted at most once a second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    return _date_cache[1]


class ClientConnection(asyncio.Protocol):
    """One client connection (see the module docstring for its invariants)."""

    __slots__ = (
        "server", "listener", "loop", "settings", "transport", "parser", "state", "peer_ip", "peer_port",
        "client", "tls", "read_paused", "writing_paused", "processing", "client_eof",
        "timer", "timer_at", "deadline", "send_deadline", "send_left", "idle_at",
        "exchange", "head", "out", "resp_mode", "resp_keep", "fast",
        "memo_raw", "memo_head", "memo_up", "up_eof", "sni", "sniffed",
    )

    def __init__(self, server, listener) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.settings = server.settings
        self.transport: Any = None
        self.parser: RequestParser | None = None
        self.state = _FRESH if server.settings.http2 else _IDLE
        self.sniffed = b""            # the first bytes, while they may still be the HTTP/2 preface
        self.idle_at = self.loop.time()
        self.tls = listener.tls
        self.read_paused = 0
        self.writing_paused = False
        self.processing = False
        self.client_eof = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline = 0.0
        self.send_deadline = 0.0
        self.send_left = 0
        self.exchange: Exchange | None = None
        self.head: RequestHead | None = None
        self.out: list[bytes] = []
        self.resp_mode = _M_NONE
        self.resp_keep = False
        self.fast = server.fast_parse
        # The last request head taken by the fast path, as received and parsed, and its
        # upstream form (``memo_up``, filled by the exchange); only heads up to _MEMO_MAX bytes.
        self.memo_raw = self.memo_head = self.memo_up = None
        self.up_eof = False           # a tunnel's upstream half-closed

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
            self.peer_port = peer[1] if peer else 0
            listener = self.listener
            local_host = listener.local_host
            if local_host is None:  # wildcard listener: which address did the client reach?
                local = transport.get_extra_info("sockname")
                host = local[0] if local else ""
                local_host = (f"[{host}]:{listener.port}" if ":" in host else f"{host}:{listener.port}").encode()
            self.client = server.clients.get(ip, b"https" if self.tls else b"http", listener.port_b, local_host)
            self.sni = None
            if self.tls:
                sslobj = transport.get_extra_info("ssl_object")
                self.sni = getattr(sslobj, "meshproxy_sni", None)
            # No TCP_NODELAY here: uvloop and asyncio set it on every TCP transport already.
            # A client that does not read: we stop reading its response from the pod once 16 KiB
            # wait in our buffer (the kernel's send buffer holds more), so a slow reader costs a
            # bounded amount of our memory (docs/resilience.md, "Slow readers").
            transport.set_write_buffer_limits(high=_WRITE_HIGH)
            self.parser = self.server.impl.RequestParser(settings.max_head_size, settings.max_headers, settings.max_body_size)
            # A new connection must send a head within header_timeout (a silent connection is
            # a slowloris too).
            self._set_deadline(self.loop.time() + settings.header_timeout)
            if self.tls and self.state == _FRESH:
                ssl_obj = transport.get_extra_info("ssl_object")
                if ssl_obj is not None and ssl_obj.selected_alpn_protocol() == "h2":
                    self._hand_over(b"")
        except Exception:  # noqa: BLE001 - no exception may escape a protocol callback
            log.exception("L7: internal error accepting a connection")
            self._close(abort=True)

    def data_received(self, data: bytes) -> None:
        try:
            state = self.state
            if state >= _TUNNEL:
                if state == _TUNNEL:
                    ex = self.exchange
                    if ex is not None:
                        ex.tunnel_data(data)
                    return
                if state == _CLOSED:
                    return
                # _FRESH: the first bytes of the connection.
                data = self._sniff(data)
                if data is None:
                    return
                state = self.state
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
                    # same head, and (in the exchange) the same upstream head, without
                    # parsing or rebuilding. One memcmp when it misses.
                    head = self.memo_head
                else:
                    head = self.parser.parse_whole(data)
                    if head is not None and len(data) <= _MEMO_MAX:
                        self.memo_raw = data
                        self.memo_head = head
                        self.memo_up = None
                if head is not None:
                    # The whole request is here: the exchange sends it (one write) as soon as
                    # it has a connection.
                    self._begin(head, True)
                    return
            self.parser.feed(data)
            if state == _IDLE:
                # First byte of a head: the header deadline counts from here, not from the
                # last byte received, so dribbling bytes cannot extend it.
                self.state = _HEAD
                self._set_deadline(self.loop.time() + self.settings.header_timeout)
            elif state == _BUSY and (self.exchange is None or self.exchange.req == "complete"):
                # Pipelined input while a response is in flight: keep it buffered, read no more.
                self._pause_reading(_RP_PIPELINE)
                return
            self._process()
        except Exception as exc:  # noqa: BLE001 - see module docstring
            self.internal_error(exc)

    def eof_received(self) -> bool:
        try:
            state = self.state
            self.client_eof = True
            ex = self.exchange
            if state == _TUNNEL:
                up = ex.up if ex is not None else None
                if up is not None and up.write_eof():
                    if self.up_eof:   # both sides are done
                        self._close()
                        return False
                    return not self.tls
                self._close()
                return False
            if state == _BUSY and ex is not None and ex.req == "complete" and not self.tls:
                # Half-close after a complete request: answer it, then close.
                return True
            if ex is not None:
                # The client gave up in the middle of its request.
                self.exchange = None
                ex.client_gone("client closed")
            self._close()
        except Exception as exc:  # noqa: BLE001
            self.internal_error(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            ex = self.exchange
            if ex is not None:
                self.exchange = None
                ex.client_gone("client connection lost")
            self.state = _CLOSED
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.out = []
            self.memo_raw = self.memo_head = self.memo_up = None
            self.server.connections.discard(self)
            self.listener.closed()
        except Exception:  # noqa: BLE001
            log.exception("L7: internal error closing a connection")

    def pause_writing(self) -> None:
        self.writing_paused = True
        ex = self.exchange
        try:
            if ex is not None:
                ex.downstream_paused()
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
            self.internal_error(exc)

    def resume_writing(self) -> None:
        self.writing_paused = False
        try:
            if self.read_paused & _RP_WRITING:
                self._resume_reading(_RP_WRITING)
            ex = self.exchange
            if ex is not None:
                ex.downstream_resumed()
            elif self.state == _HEAD and not self.processing and self.parser.buffered:
                self._process()   # pipelined requests left for when the client reads (_defer_pipeline)
        except Exception as exc:  # noqa: BLE001
            self.internal_error(exc)

    # ------------------------------------------------------------------------------------------
    # timer

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        if self.timer is None or when < self.timer_at:
            self._arm(when)

    def set_deadline(self, when: float) -> None:
        """The exchange's deadline moved earlier than the timer might fire (or it is new)."""
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
            ex = self.exchange
            if ex is not None:
                deadline = ex.deadline or _NEVER
                if sending and (ex.state == STREAMING or ex.state == TUNNEL):
                    # The upstream is paused for this client: only the send deadline runs.
                    deadline = self.send_deadline
            else:
                deadline = self.deadline
            if now < deadline:
                # Early: re-check later, never more than header_timeout ahead (see docstring).
                at = now + self.settings.header_timeout
                if sending and poll < at:
                    at = poll
                self._arm(deadline if deadline < at else at)
                return
            if ex is not None:
                if sending and deadline == self.send_deadline:
                    self._send_timed_out()
                    return
                ex.on_deadline(now)
                if self.timer is None and self.state != _CLOSED:
                    self._arm(now + self.settings.header_timeout)
            else:
                self._deadline_passed()
            if sending and self.timer is None and self.writing_paused:
                # Closed gracefully (keep-alive timeout, 408) with bytes still waiting for the
                # client: they must go out within the send timeout too.
                self._arm(poll)
        except Exception as exc:  # noqa: BLE001
            self.internal_error(exc)

    def backlog(self) -> int:
        """Response bytes sent to this client that it has not taken yet (ours and the kernel's)."""
        return self._unsent()

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
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_gone("client send timeout")
        self.state = _CLOSED
        self.writing_paused = False
        self.out = []
        if self.transport is not None:
            # Aborted, also when a graceful close is waiting for the buffer to drain.
            reset(self.transport)

    def _deadline_passed(self) -> None:
        state = self.state
        if state == _IDLE or state == _FRESH:
            self._close()  # keep-alive idle timeout, or nothing sent at all
        elif state == _HEAD:
            metrics.http_bad_requests.labels("408").inc()
            self._answer_error(408, b"request header timeout\n")

    # ------------------------------------------------------------------------------------------
    # HTTP/2 by prior knowledge

    def _sniff(self, data: bytes) -> bytes | None:
        """The first bytes: HTTP/2's preface hands the connection to the HTTP/2 shell (None),
        anything else is HTTP/1.1 (the bytes to parse). A prefix too short to tell waits."""
        if self.sniffed:
            data = self.sniffed + data
            self.sniffed = b""
        n = len(data)
        if n and data[:_PREFACE_DECIDES] == H2_PREFACE[:min(n, _PREFACE_DECIDES)]:
            if n < _PREFACE_DECIDES:
                self.sniffed = data
                return None
            self._hand_over(data)
            return None
        self.state = _IDLE
        return data

    def _hand_over(self, data: bytes) -> None:
        """The client speaks HTTP/2: the connection (its transport and listener slot) goes
        to ``l7.h2_downstream.H2ClientConnection``; this object is done."""
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.connections.discard(self)
        self.server.start_h2(self, data)

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

    def pause_request(self, why: str) -> None:
        self._pause_reading(_PAUSE_FLAGS[why])

    def resume_request(self, why: str) -> None:
        self._resume_reading(_PAUSE_FLAGS[why])

    def _process(self) -> None:
        """Take events from the request parser until it needs data or a request is in flight."""
        parser = self.parser
        self.processing = True
        begun = 0
        try:
            while self.state != _CLOSED:
                if begun and self.exchange is None and (begun >= _PIPELINE_PER_TURN or self.writing_paused):
                    # Between two pipelined requests, this call's share is taken.
                    self._defer_pipeline()
                    break
                try:
                    ev = parser.next_event()
                except HTTPError as exc:
                    self._bad_request(exc)
                    break
                t = type(ev)
                ex = self.exchange
                if t is bytes:
                    if ex is not None:
                        ex.request_data(ev)
                elif t is RequestHead:
                    begun += 1
                    self._begin(ev)
                elif t is EndOfMessage:
                    if ex is not None:
                        ex.request_end(ev.trailers)
                        if self.exchange is not None:
                            break  # the response is pending; the parser would only say PAUSED
                else:  # NEED_DATA, or PAUSED while the response is in flight
                    break
        finally:
            self.processing = False
        ex = self.exchange
        if ex is not None:
            ex.flush()

    def _defer_pipeline(self) -> None:
        """Requests stay buffered for a later turn: the next one when the client takes our
        answers (``resume_writing``), else in the next loop turn."""
        if self.state == _IDLE:
            self.state = _HEAD   # bytes of the next head are here: not the fast path; its deadline runs
            self._set_deadline(self.loop.time() + self.settings.header_timeout)
        if self.writing_paused:
            self._pause_reading(_RP_WRITING)
        else:
            self.loop.call_soon(self._pipeline_next)

    def _pipeline_next(self) -> None:
        try:
            if (self.state == _HEAD and self.exchange is None and not self.processing
                    and not self.writing_paused and self.parser.buffered):
                self._process()
        except Exception as exc:  # noqa: BLE001 - no exception may escape a loop callback
            self.internal_error(exc)

    def _begin(self, head: RequestHead, complete: bool = False) -> None:
        self.state = _BUSY
        self.head = head
        self.resp_mode = _M_NONE
        self.resp_keep = False
        server = self.server
        ex = Exchange(server, self, head, self.loop.time(), self.listener.http, complete)
        self.exchange = ex
        ex.start()

    # ------------------------------------------------------------------------------------------
    # what the exchange sends to the client

    def send_continue(self) -> None:
        self.transport.write(_CONTINUE)

    def send_interim(self, status: int, reason: bytes, fields) -> None:
        self.out.append(self.server.response_head_bytes(status, reason, fields, None, False))

    def _keep(self, complete: bool) -> bool:
        head = self.head
        server = self.server
        return (head.keep_alive and complete and not self.client_eof and not server.draining
                and not server.runtime.draining and head.upgrade is None)

    def send_head(self, status: int, reason: bytes, fields, kind: str, content_length: int | None,
                  chunked_up: bool, complete: bool) -> None:
        """The final response head; ``kind`` is how the upstream delimits the body ("none",
        "length", "chunked", "close")."""
        head = self.head
        client11 = head.version == 11
        keep = self._keep(complete)
        cl = None
        chunked = False
        if kind == "none":
            self.resp_mode = _M_NONE
            if head.method == b"HEAD":
                cl = content_length
                chunked = chunked_up and client11
            elif status == 304:
                cl = content_length
        elif kind == "length":
            self.resp_mode = _M_RAW
            cl = content_length
        elif client11:  # chunked, or delimited by the upstream's close: chunked to the client
            self.resp_mode = _M_CHUNKED
            chunked = True
        else:  # an HTTP/1.0 client: the body ends when we close
            self.resp_mode = _M_RAW
            keep = False
        self.resp_keep = keep
        if not keep:
            fields.append((b"Connection", b"close"))
        elif not client11:
            fields.append((b"Connection", b"keep-alive"))
        self.out.append(self.server.response_head_bytes(status, reason, fields, cl, chunked))

    def send_whole(self, status: int, reason: bytes, fields, content_length: int, body: bytes,
                   complete: bool, cached: bytes | None = None, tail: bytes = b"") -> bytes:
        """A complete Content-Length response: head and body in one write. ``cached``: the head
        as returned by an earlier call for the same response head (``fields`` is then None);
        ``tail``: fields of this response only. Returns the head without the fields that
        depend on the request (tail, Connection) and without its final CRLF."""
        head = self.head
        server = self.server
        keep = (head.keep_alive and complete and not self.client_eof and not server.draining
                and not server.runtime.draining and head.upgrade is None)
        self.resp_keep = keep
        self.resp_mode = _M_RAW
        base = cached if cached is not None else server.response_head_bytes(status, reason, fields, content_length, False)[:-2]
        if not keep:
            tail += b"Connection: close\r\n"
        elif head.version != 11:
            tail += b"Connection: keep-alive\r\n"
        if body and head.method != b"HEAD":
            data = b"".join((base, tail, b"\r\n", body))
        else:
            data = b"".join((base, tail, b"\r\n"))
        out = self.out
        if out:
            out.append(data)
            self.flush()
        else:
            self.transport.write(data)
        return base

    def send_data(self, data: bytes) -> None:
        self.out.append(b"%x\r\n%b\r\n" % (len(data), data) if self.resp_mode == _M_CHUNKED else data)

    def send_end(self, trailers) -> None:
        if self.resp_mode == _M_CHUNKED:
            self.out.append(serialize_trailers(trailers) if trailers else LAST_CHUNK)

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            if self.state != _CLOSED or not self.transport.is_closing():
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def retract(self) -> bool:
        """Drop a response head not written yet (the upstream failed before the end of the read
        that brought it): True when nothing of the response reached the client."""
        if self.out:
            self.out = []
            return True
        return False

    def send_local(self, status: int, body: bytes, extra, keep: bool) -> None:
        """Answer the current request ourselves."""
        head = self.head
        keep = keep and self._keep(True)
        hdrs = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Date", http_date())]
        hdrs.extend(extra)
        if not keep:
            hdrs.append((b"Connection", b"close"))
        elif head.version == 10:
            hdrs.append((b"Connection", b"keep-alive"))
        data = serialize_response_head(status, REASONS.get(status, b"Unknown"), hdrs,
                                       content_length=len(body), chunked=False)
        if head.method != b"HEAD":
            data += body
        self.out.append(data)
        self.flush()
        self.resp_keep = keep

    def start_tunnel(self, status: int, reason: bytes, fields, conn) -> None:
        """After a 101: the head, then bytes either side already buffered, then a plain pump."""
        self.out.append(self.server.response_head_bytes(status, reason, fields, None, False))
        self.flush()
        self.state = _TUNNEL
        trailing = conn.parser.trailing
        if trailing:
            self.transport.write(trailing)
        mine = self.parser.trailing
        if mine:
            conn.tunnel_write(mine)
        self._resume_reading(_RP_PIPELINE)

    def tunnel_write(self, data: bytes) -> None:
        if self.state != _CLOSED:
            self.transport.write(data)

    def tunnel_eof(self) -> bool:
        """The pod half-closed the tunnel: pass it on. True: keep the connection half-open."""
        self.up_eof = True
        if self.client_eof or not self.transport.can_write_eof():
            self._close()
            return False
        self.transport.write_eof()
        return True

    def abort(self) -> None:
        """The response cannot be completed: the client must see an error (RST), never a
        short body that looks complete."""
        self.exchange = None
        self.out = []
        self._close(abort=True)

    def exchange_done(self, keep: bool) -> None:
        """The exchange is over: next request, or close."""
        self.exchange = None
        if self.out:
            self.flush()
        if self.state == _CLOSED:
            return
        self.state = _IDLE
        self.idle_at = now = self.loop.time()
        server = self.server
        if (not keep or not self.resp_keep or self.client_eof or server.draining or server.runtime.draining):
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

    # ------------------------------------------------------------------------------------------
    # errors and closing

    def _answer_error(self, status: int, body: bytes) -> None:
        """Answer outside the normal flow (bad input, timeouts, internal errors) and close."""
        if self.state == _CLOSED:
            return
        self.server.count_local(status)
        data = serialize_response_head(
            status, REASONS.get(status, b"Error"),
            [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Date", http_date()),
             (b"Connection", b"close")],
            content_length=len(body), chunked=False) + body
        self.out = []
        self.transport.write(data)
        self.state = _CLOSED
        self._close()

    def _bad_request(self, exc: HTTPError) -> None:
        metrics.http_bad_requests.labels(str(exc.status)).inc()
        ex = self.exchange
        if ex is not None:
            # A body that turned out malformed (or too large) while streaming: the upstream
            # got part of it; that attempt is over.
            self.exchange = None
            if ex.request_error(exc.status, exc.reason):
                self.out = []
                self._close(abort=True)
                return
            self._write_error(exc.status, exc.reason.encode("latin-1", "replace") + b"\n")
            return
        self._answer_error(exc.status, exc.reason.encode("latin-1", "replace") + b"\n")

    def _write_error(self, status: int, body: bytes) -> None:
        """``_answer_error`` for a request the exchange accounted already."""
        if self.state == _CLOSED:
            return
        data = serialize_response_head(
            status, REASONS.get(status, b"Error"),
            [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Date", http_date()),
             (b"Connection", b"close")],
            content_length=len(body), chunked=False) + body
        self.out = []
        self.transport.write(data)
        self.state = _CLOSED
        self._close()

    def internal_error(self, exc: BaseException) -> None:
        log.error("L7: internal error: %r", exc, exc_info=exc)
        if self.state == _CLOSED:
            return
        try:
            ex = self.exchange
            if ex is not None:
                self.exchange = None
                started = ex.state not in (ROUTING, CONNECTING, WAITING)
                ex.client_gone("internal error")
                if started:
                    self._close(abort=True)
                    return
                self._write_error(500, b"internal error\n")
                return
            self._answer_error(500, b"internal error\n")
        except Exception:  # noqa: BLE001 - last resort: drop the connection
            log.exception("L7: error while handling an internal error")
            self.state = _CLOSED
            if self.transport is not None:
                self.transport.abort()

    def _close(self, abort: bool = False) -> None:
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_gone("connection closed")
        self.state = _CLOSED
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            reset(transport)
        else:
            if self.out:
                self.flush()
            transport.close()

    def close_if_idle(self, grace: float = 0.0) -> None:
        """Draining: a keep-alive connection idle for ``grace`` seconds is closed.

        A client that is still sending gets ``Connection: close`` on its next response
        instead; closing it the moment it goes idle would race with a request already on the
        wire (RFC 9112 §9.3.1: the client would have to retry it)."""
        if (self.state == _IDLE or self.state == _FRESH) and self.loop.time() - self.idle_at >= grace:
            self._close()

    def close_now(self) -> None:
        """Drain deadline passed: reset whatever is left."""
        if self.transport is not None:
            self._close(abort=True)
