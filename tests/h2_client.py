"""A blocking HTTP/2 client for tests, on the ``h2`` package, over a real socket.

``Client(port)`` connects (prior knowledge; ``tls=ctx`` for h2 over TLS), ``request(headers,
body, end)`` opens a stream, ``response(sid)`` reads until that stream ends or is reset, and
``raw(bytes)`` writes anything at all (hand-made frames for the attack tests). Every wait is
bounded by its timeout.
"""

from __future__ import annotations

import socket
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["Client", "Response"]


class Response:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.informational: list[dict[bytes, bytes]] = []
        self.data = b""
        self.trailers: dict[bytes, bytes] = {}
        self.ended = False
        self.reset: int | None = None


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1", tls=None, server_hostname: str = "example.com",
                 window: int | None = None, timeout: float = 5.0) -> None:
        s = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            s = tls.wrap_socket(s, server_hostname=server_hostname)
        self.sock = s
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=cfg)
        if window is not None:
            self.conn.local_settings.initial_window_size = window
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.auto_ack = True

    def request(self, headers, body: bytes = b"", end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self.responses[sid] = Response()
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def get(self, path: bytes = b"/echo", authority: bytes = b"example.com") -> int:
        return self.request([(b":method", b"GET"), (b":scheme", b"http"), (b":path", path),
                             (b":authority", authority)])

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def pump(self, timeout: float = 0.2) -> bool:
        """Read once (up to ``timeout``) and handle the events. False: the connection ended."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        for ev in events:
            r = self.responses.setdefault(getattr(ev, "stream_id", 0) or 0, Response())
            if isinstance(ev, h2.events.ResponseReceived):
                r.headers = dict(ev.headers)
            elif isinstance(ev, h2.events.InformationalResponseReceived):
                r.informational.append(dict(ev.headers))
            elif isinstance(ev, h2.events.DataReceived):
                r.data += ev.data
                if self.auto_ack:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                r.trailers = dict(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                r.reset = int(ev.error_code)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        out = self.conn.data_to_send()
        if out:
            try:
                self.sock.sendall(out)
            except OSError:
                pass
        return True

    def response(self, sid: int, timeout: float = 5.0) -> Response:
        deadline = time.monotonic() + timeout
        r = self.responses.setdefault(sid, Response())
        while not r.ended and r.reset is None and time.monotonic() < deadline:
            if not self.pump(min(0.2, max(0.01, deadline - time.monotonic()))):
                break
        return r

    def wait_closed(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pump(0.1):
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
