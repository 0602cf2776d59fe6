"""One HTTP/2 request stream of a client connection: the ``l7.contracts.Downstream`` of its exchange.

``H2Stream`` turns what the exchange sends into what ``l7.h2_downstream.H2ClientConnection``
writes: the response head (kept until the next flush, so a failure in the same upstream read can
still retract it), body bytes queued until the client's windows take them, trailers, answers made
by the proxy (gRPC clients get a trailers-only response, l7/grpc.py), and the stream's own timer
for the exchange's deadline. The connection decides when bytes go out (``push``) and keeps every
connection-wide limit; the stream keeps what belongs to one request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from h2.errors import ErrorCodes

from . import grpc
from .downstream import http_date
from .exchange import CONNECTING, ROUTING, WAITING, Exchange
from .h2_fields import h1_head_fields, response_block, tail_fields, trailer_block

__all__ = ["BAD_HEAD", "STREAM_HIGH", "H2Stream"]

log = logging.getLogger("meshproxy.l7")

# Response bytes waiting for the client's window, per stream, before the exchange stops reading
# its upstream.
STREAM_HIGH = 64 * 1024
_STREAM_HIGH = STREAM_HIGH


class H2Stream:
    """One request stream: the ``l7.contracts.Downstream`` of its exchange. ``shell``: its
    ``l7.h2_downstream.H2ClientConnection``."""

    __slots__ = ("shell", "sid", "exchange", "head", "tls", "client", "peer_ip", "peer_port", "sni", "memo_head", "memo_up",
                 "pending_head", "head_sent", "out", "out_bytes", "ended", "trailers", "closed", "req_ended",
                 "unacked", "req_paused", "down_paused", "timer", "timer_at", "req_trailers", "grpc",
                 "grpc_status", "route", "status", "reset_after")

    def __init__(self, shell: Any, sid: int) -> None:
        self.shell = shell
        self.sid = sid
        self.exchange: Exchange | None = None
        self.head = None
        self.tls = shell.tls
        self.client = shell.client
        self.peer_ip = shell.peer_ip
        self.peer_port = shell.peer_port
        self.sni = shell.sni
        self.memo_head = self.memo_up = None
        self.pending_head: list | None = None   # the response head, sent at the next flush
        self.head_sent = False
        self.out: list[bytes] = []              # response bytes waiting for the client's window
        self.out_bytes = 0
        self.ended = False                      # the response's end is queued
        self.trailers: list | None = None
        self.closed = False                     # our side of the stream is closed (or reset)
        self.req_ended = False
        self.unacked = 0                        # request bytes taken but not acknowledged yet
        self.req_paused = 0                     # reasons the exchange paused the request
        self.down_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.req_trailers = None
        self.grpc = False
        self.grpc_status: bytes | None = None
        self.route = None
        self.status = 0
        self.reset_after = False                # RST_STREAM(NO_ERROR) once the response is out

    @property
    def processing(self) -> bool:
        return self.shell.processing

    # -- what the exchange sends -------------------------------------------------------------

    def send_continue(self) -> None:
        self.shell.send_informational(self.sid, [(b":status", b"100")])

    def send_interim(self, status: int, reason: bytes, fields) -> None:
        self.shell.send_informational(self.sid, response_block(status, fields, None))

    def send_head(self, status: int, reason: bytes, fields, kind: str, content_length: int | None,
                  chunked_up: bool, complete: bool) -> None:
        cl = None
        if kind == "length":
            cl = content_length
        elif kind == "none":
            if self.head.method == b"HEAD" or status == 304:
                cl = content_length
            self.ended = True
        self.status = status
        self.pending_head = response_block(status, fields, cl)
        if self.grpc:
            self._note_grpc(fields)

    def send_whole(self, status: int, reason: bytes, fields, content_length: int, body: bytes,
                   complete: bool, cached: bytes | None = None, tail: bytes = b"") -> None:
        """A complete response. ``cached``: the HTTP/1.1 head the upstream connection remembered
        for this response head (another client of that pooled connection got it; ``fields`` is
        then None): its fields are taken back from it. Returns None: nothing for the exchange to
        remember (an HTTP/2 head depends on this connection's HPACK state)."""
        if fields is None:
            fields = h1_head_fields(cached or b"")
        if tail:
            fields = fields + tail_fields(tail)
        self.status = status
        self.pending_head = response_block(status, fields, content_length)
        if self.grpc:
            self._note_grpc(fields)
        if body and self.head.method != b"HEAD":
            self.out.append(body)
            self.out_bytes += len(body)
        self.ended = True
        self.flush()

    def send_data(self, data: bytes) -> None:
        if not data or self.closed:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > _STREAM_HIGH and not self.down_paused:
            self.down_paused = True
            ex = self.exchange
            if ex is not None:
                ex.downstream_paused()

    def send_end(self, trailers) -> None:
        self.ended = True
        if trailers:
            self.trailers = trailer_block(trailers)
            if self.grpc:
                self._note_grpc(self.trailers)

    def flush(self) -> None:
        if self.shell.push(self):
            self.shell.write_later()

    def retract(self) -> bool:
        if self.pending_head is not None and not self.head_sent:
            self.pending_head = None
            self.out = []
            self.out_bytes = 0
            self.ended = False
            self.trailers = None
            return True
        return False

    def send_local(self, status: int, body: bytes, extra, keep: bool) -> None:
        """An answer made by the proxy: a gRPC client gets it as a trailers-only response."""
        self.status = status
        if self.grpc:
            block = grpc.trailers_only(status, body)
            self.grpc_status = block[2][1]
            block += [(n.lower(), v) for n, v in extra if n.lower() == b"x-request-id"]
            self.pending_head = block
        else:
            fields = [(b"content-type", b"text/plain; charset=utf-8"), (b"date", http_date())]
            fields += [(n.lower(), v) for n, v in extra]
            self.pending_head = response_block(status, fields, len(body))
            if body and self.head.method != b"HEAD":
                self.out.append(body)
                self.out_bytes += len(body)
        self.ended = True
        if not keep and not self.req_ended:
            # The request body is not wanted any more (RFC 9113 §8.1: a complete response
            # may come first; RST_STREAM NO_ERROR tells the client to stop sending).
            self.reset_after = True
        self.flush()

    def backlog(self) -> int:
        """Response bytes of this stream waiting for the client's window, plus what the
        connection's socket buffer holds (shared by all its streams)."""
        t = self.shell.transport
        return self.out_bytes + (t.get_write_buffer_size() if t is not None else 0)

    def pause_request(self, why: str) -> None:
        self.req_paused |= 1 if why == "upstream" else 2

    def resume_request(self, why: str) -> None:
        self.req_paused &= ~(1 if why == "upstream" else 2)
        if not self.req_paused and self.unacked:
            n, self.unacked = self.unacked, 0
            self.shell.ack(self.sid, n)

    def start_tunnel(self, status: int, reason: bytes, fields, conn) -> None:
        raise RuntimeError("no tunnels over HTTP/2")   # heads from h2 streams never ask for one

    def tunnel_write(self, data: bytes) -> None:
        pass

    def tunnel_eof(self) -> bool:
        return False

    def set_deadline(self, when: float) -> None:
        if self.timer is None or when < self.timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.shell.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        ex = self.exchange
        if ex is None:
            return
        try:
            now = self.shell.loop.time()
            deadline = ex.deadline
            if not deadline:
                return
            if now < deadline:
                self._arm(deadline)
                return
            ex.on_deadline(now)
        except Exception as exc:  # noqa: BLE001 - no exception may escape a timer callback
            self.internal_error(exc)

    def abort(self) -> None:
        """The response cannot be completed. A gRPC client whose response head went out gets
        an error status in trailers (it then never takes the call for a success); others get
        RST_STREAM."""
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            self.route = ex.route
        if self.grpc and (self.head_sent or self.pending_head is not None) and not self.closed:
            code = grpc.DEADLINE_EXCEEDED if ex is not None and ex.flags == "UT" else grpc.UNAVAILABLE
            self.trailers = [(b"grpc-status", b"%d" % code), (b"grpc-message", b"upstream failed mid-response")]
            self.grpc_status = b"%d" % code
            self.ended = True
            self.reset_after = not self.req_ended
            self.count_grpc(ex)
            self.flush()
            return
        self.count_grpc(ex)
        self.shell.reset_stream(self, ErrorCodes.INTERNAL_ERROR)

    def exchange_done(self, keep: bool) -> None:
        ex = self.exchange
        if ex is not None:
            self.route = ex.route
            self.exchange = None
        self.count_grpc(ex)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not keep and not self.req_ended:
            self.reset_after = True
        self.flush()
        self.shell.maybe_forget(self)

    def internal_error(self, exc: BaseException) -> None:
        log.error("L7: internal error on an HTTP/2 stream: %r", exc, exc_info=exc)
        ex = self.exchange
        try:
            if ex is not None:
                self.exchange = None
                started = ex.state not in (ROUTING, CONNECTING, WAITING) or self.head_sent
                ex.client_gone("internal error")
                if not started:
                    self.retract()
                    self.send_local(500, b"internal error\n", (), False)
                    return
            self.shell.reset_stream(self, ErrorCodes.INTERNAL_ERROR)
        except Exception:  # noqa: BLE001 - last resort: the whole connection
            log.exception("L7: error while handling an internal error")
            self.shell.close_now()

    # -- gRPC accounting ---------------------------------------------------------------------

    def _note_grpc(self, fields) -> None:
        for n, v in fields:
            if len(n) == 11 and n.lower() == b"grpc-status":
                self.grpc_status = v
                return

    def count_grpc(self, ex=None) -> None:
        """Count the call once (``ex``: its exchange, when it was already let go)."""
        if not self.grpc or self.status < 0:
            return
        if ex is None:
            ex = self.exchange
        route = ex.route if ex is not None else self.route
        stats = ex.stats if ex is not None else None
        backend = ex.backend if ex is not None else None
        svc, method = grpc.route_labels(route)
        ns = backend.namespace if backend is not None else (stats.labels[0] if stats is not None else "")
        name = backend.service if backend is not None else (stats.labels[2] if stats is not None else "")
        status = grpc.status_label(self.grpc_status)
        self.shell.server.grpc_call(ns, name, svc, method, status)
        self.status = -1   # counted once


class BadHead:
    """The head of a stream refused before it had one (its local answer reads ``method``)."""
    method = b"GET"


BAD_HEAD = BadHead()
