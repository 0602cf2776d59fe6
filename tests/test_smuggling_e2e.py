"""Every refused request and response of the parser tables, through the real proxy process.

Request side: each malformed request gets its status and ``Connection: close`` and the pod
never receives a complete request — for errors in the head not a single byte; for errors in a
body that was already streaming, only a cut-off prefix on a connection the proxy then resets.
Response side: each malformed response becomes 502, and that upstream connection is never
used again.
"""

from __future__ import annotations

import socket
import textwrap
import threading
import time

import pytest

from proc import Meshproxy, free_port
from test_http1 import REQUEST_ERRORS, RESPONSE_ERRORS

POD_IP = "127.0.10.201"


class RawPod:
    """Records every byte per connection; answers each request with ``self.answer``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((POD_IP, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[bytearray] = []
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.close_after = False      # end the connection after answering (EOF cases)
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            buf = bytearray()
            with self.lock:
                self.conns.append(buf)
            threading.Thread(target=self._serve, args=(c, buf), daemon=True).start()

    def _serve(self, c: socket.socket, buf: bytearray) -> None:
        with c:
            c.settimeout(10)
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                if b"\r\n\r\n" in bytes(buf):
                    try:
                        c.sendall(self.answer)
                    except OSError:
                        return
                    if self.close_after:
                        return

    def total(self) -> int:
        with self.lock:
            return sum(len(b) for b in self.conns)

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pod = RawPod()
    d = tmp_path_factory.mktemp("smuggle")
    (d / "c.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: raw, labels: {{app: raw}}}}
        spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {pod.port}}}]}}]}}
        status: {{podIP: {POD_IP}, conditions: [{{type: Ready, status: "True"}}]}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: raw}}
        spec: {{clusterIP: 127.96.0.201, selector: {{app: raw}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
        ---
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {{name: raw}}
        spec: {{defaultBackend: {{service: {{name: raw, port: {{number: 80}}}}}}}}
        """))
    port = free_port()
    mp = Meshproxy([str(d)], "--no-health-checks", "--ingress-listen", f"127.0.0.1:{port}",
                   "--max-body-size", "1000000", "--header-timeout", "3")
    mp.start()
    yield pod, port
    mp.stop()
    pod.close()


def exchange(port: int, data: bytes, half_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if half_close:      # tells the proxy a cut-off body will never be completed
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def _error_in_head(data: bytes) -> bool:
    """Whether the parser refuses ``data`` before it has a complete request head."""
    from l7.http1 import NEED_DATA, PAUSED, HTTPError, RequestHead, RequestParser
    p = RequestParser(max_body=1000000)
    p.feed(data)
    try:
        while True:
            ev = p.next_event()
            if isinstance(ev, RequestHead):
                return False
            if ev is NEED_DATA or ev is PAUSED:
                return True
    except HTTPError:
        return True


@pytest.mark.parametrize("case", REQUEST_ERRORS, ids=[c[0] for c in REQUEST_ERRORS])
def test_refused_request_never_reaches_the_pod_complete(setup, case):
    name, data, status = case
    pod, port = setup
    before = len(pod.conns)
    # A pipelined pair must not be half-closed: a client that says it is done gets its first
    # answer with "Connection: close" and the second request is never read.
    out = exchange(port, data, half_close=not name.startswith("pipelined"))
    last = out[out.rfind(b"HTTP/1.1 "):]        # pipelined cases: earlier valid requests are answered
    assert last.startswith(b"HTTP/1.1 %d " % status), out[:300]
    assert b"\r\nconnection: close" in last.split(b"\r\n\r\n", 1)[0].lower()
    time.sleep(0.05)
    with pod.lock:
        seen = [bytes(b) for b in pod.conns[before:]]
    if out.count(b"HTTP/1.1 ") > 1:
        seen = [g[g.rfind(b"GET "):] if g.count(b" HTTP/1.1\r\n") > 1 else b"" for g in seen]
    if _error_in_head(data) or out.count(b"HTTP/1.1 ") > 1:
        assert all(not b for b in seen), seen           # not one byte went upstream
    else:
        # The head was valid and streaming had begun: the pod saw at most a re-serialized
        # head and part of the body, never the end of the message (a zero-size chunk).
        for got in seen:
            body = got.split(b"\r\n\r\n", 1)[-1]
            assert not body.endswith(b"0\r\n\r\n"), got


@pytest.mark.parametrize("case", RESPONSE_ERRORS, ids=[c[0] for c in RESPONSE_ERRORS])
def test_malformed_response_is_502_and_connection_not_reused(setup, case):
    pod, port = setup
    name, answer = case[0], case[1]
    pod.answer, pod.close_after = answer, name.startswith("eof")
    try:
        out = exchange(port, b"GET /bad HTTP/1.1\r\nHost: a\r\n\r\n")
        if name in ("eof_mid_length_body", "eof_mid_chunked_body"):
            # The head was already relayed: the client connection is cut, and what it got can
            # never pass for a complete response.
            head, _, body = out.partition(b"\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 502 ") or (
                out.startswith(b"HTTP/1.1 200 ") and (b"content-length: 10" in head.lower() and len(body) < 10
                                                     or not body.endswith(b"0\r\n\r\n"))), out
        else:
            assert out.startswith(b"HTTP/1.1 502 "), out[:200]
        with pod.lock:
            bad_conn = next(b for b in reversed(pod.conns) if b"GET /bad " in bytes(b))
        pod.answer, pod.close_after = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False
        out = exchange(port, b"GET /good HTTP/1.1\r\nHost: a\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"ok"), out[:200]
        with pod.lock:
            good_conn = next(b for b in reversed(pod.conns) if b"GET /good " in bytes(b))
        assert good_conn is not bad_conn      # the connection that misbehaved was not reused
    finally:
        pod.answer, pod.close_after = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False
