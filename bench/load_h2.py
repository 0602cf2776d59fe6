"""HTTP/2 and gRPC unary load for ``python -m bench.load --http2`` (closed loop).

``-c`` connections (HTTP/2 with prior knowledge), each keeping ``--streams`` requests in flight:
a stream that ends is replaced at once. ``--grpc`` sends each request as a gRPC unary call
(POST, content-type application/grpc, te: trailers, the body framed as one gRPC message) and
counts a call whose grpc-status is not 0 (or missing) as an error of kind ``grpc``. Latency is
per stream, from its HEADERS being queued to its end. The result has the shape of
``bench.load``'s, so the same merging and report apply. The ``h2`` package does the framing: this
driver is for checking behaviour and for moderate rates; h2load (nghttp2) is the headline driver.
"""

from __future__ import annotations

import asyncio
import collections
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from bench.hist import Histogram

__all__ = ["H2Generator", "grpc_frame"]

_perf = time.perf_counter


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class _H2Conn(asyncio.Protocol):
    def __init__(self, g: H2Generator) -> None:
        self.g = g
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.transport = None
        self.started: dict[int, float] = {}
        self.status: dict[int, int] = {}
        self.grpc_ok: dict[int, bool] = {}
        self.alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(1 << 24)
        transport.write(self.conn.data_to_send())
        self.g.connected(self)

    def open_streams(self) -> None:
        g = self.g
        while self.alive and g.running and len(self.started) < g.streams and g.may_issue():
            sid = self.conn.get_next_available_stream_id()
            body = g.body
            self.conn.send_headers(sid, g.headers, end_stream=not body)
            if body:
                self.conn.send_data(sid, body, end_stream=True)
            self.started[sid] = _perf()
            g.issued += 1
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        g = self.g
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            g.errors["parse"] += 1
            self._lost()
            return
        for ev in events:
            t = type(ev)
            if t is h2.events.ResponseReceived:
                hd = dict(ev.headers)
                self.status[ev.stream_id] = int(hd.get(b":status", b"0"))
                if b"grpc-status" in hd:
                    self.grpc_ok[ev.stream_id] = hd[b"grpc-status"] == b"0"
            elif t is h2.events.DataReceived:
                g.body_bytes += len(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif t is h2.events.TrailersReceived:
                hd = dict(ev.headers)
                self.grpc_ok[ev.stream_id] = hd.get(b"grpc-status") == b"0"
            elif t is h2.events.StreamEnded:
                self._done(ev.stream_id, None)
            elif t is h2.events.StreamReset:
                self._done(ev.stream_id, "read")
            elif t is h2.events.ConnectionTerminated:
                self.alive = False
        self.open_streams()

    def _done(self, sid: int, error: str | None) -> None:
        g = self.g
        t0 = self.started.pop(sid, None)
        if t0 is None:
            return
        status = self.status.pop(sid, 0)
        ok = self.grpc_ok.pop(sid, None)
        if not g.running and not g.counting_tail:
            return
        if error is not None:
            g.errors[error] += 1
            return
        g.completed += 1
        g.status[status] = g.status.get(status, 0) + 1
        if g.grpc and not ok:
            g.errors["grpc"] += 1
        g.hist.record(int((_perf() - t0) * 1e6))

    def _lost(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.alive = False
        for _sid in list(self.started):
            if self.g.running:
                self.g.errors["read"] += 1
        self.started.clear()


class H2Generator:
    """One process's HTTP/2 load (the same result keys as bench.load's generator)."""

    def __init__(self, opts: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.host, self.port = opts["ip"], opts["port"]
        self.nconns = opts["connections"]
        self.streams = max(1, opts.get("streams", 10))
        self.grpc = opts.get("grpc", False)
        self.max_requests = opts["requests"]
        self.body = opts["body"]
        self.headers = opts["h2_headers"]
        self.hist = Histogram()
        self.status: dict[int, int] = {}
        self.errors = collections.Counter({"connect": 0, "read": 0, "timeout": 0, "parse": 0, "grpc": 0})
        self.completed = self.issued = self.body_bytes = 0
        self.conns: list[_H2Conn] = []
        self.running = False
        self.counting_tail = False
        self.t_start = self.t_end = 0.0

    def may_issue(self) -> bool:
        return not self.max_requests or self.issued < self.max_requests

    def connected(self, c: _H2Conn) -> None:
        if self.running:
            c.open_streams()

    async def run(self, start_at: float, duration: float) -> dict:
        for _ in range(self.nconns):
            try:
                _t, c = await self.loop.create_connection(lambda: _H2Conn(self), self.host, self.port)
                self.conns.append(c)
            except OSError:
                self.errors["connect"] += 1
        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.running = True
        self.t_start = _perf()
        for c in self.conns:
            c.open_streams()
        end = self.loop.time() + duration
        while self.loop.time() < end and (not self.max_requests or self.completed < self.max_requests):
            await asyncio.sleep(0.05)
        self.running = False
        self.t_end = _perf()
        for c in self.conns:
            c.alive = False
            if c.transport is not None:
                c.transport.abort()
        return {
            "requests": self.completed, "issued": self.issued, "duration_s": self.t_end - self.t_start,
            "body_bytes": self.body_bytes, "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": dict(self.errors), "hist": self.hist.to_json(), "lag": Histogram().to_json(),
        }
