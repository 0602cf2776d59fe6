"""Every refused request and response of the parser tables, through the real proxy process.

Request side: each malformed request gets its status and ``Connection: close`` and the pod
never receives a complete request — for errors in the head not a single byte; for errors in a
body that was already streaming, only a cut-off prefix on a connection the proxy then resets.
Response side: each malformed response becomes 502, and that upstream connection is never
used again.
"""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time

import pytest

from cores import CORES, package
from proc import Meshproxy, free_port
from test_http1 import REQUEST_ERRORS as _PARSER_REQUEST_ERRORS
from test_http1 import RESPONSE_ERRORS

# The HTTP/1.1 parser refuses the HTTP/2 preface (505, tests/test_http1.py); a listener with
# HTTP/2 on hands such a connection to the HTTP/2 shell instead (tests/test_h2_protocol.py; with
# HTTP/2 off, tests/test_http2.py::test_without_http2_the_preface_is_an_http11_505).
REQUEST_ERRORS = [c for c in _PARSER_REQUEST_ERRORS if c[0] != "h2_prior_knowledge_preface"]

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


def _mode(core: str) -> str:
    # Under the "strict" parser mode (conftest.http_parser_mode) each core runs without its fast paths.
    return core + "-strict" if os.environ.get("MESHPROXY_HTTP_PARSER") == "strict" else core


@pytest.fixture(scope="module", params=CORES)
def setup(request, tmp_path_factory, http_parser_mode):
    """One proxy per L7 core (tests/cores.py): every smuggling case runs against both."""
    package(request.param)   # skips / fails when that core is not built
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
                   "--max-body-size", "1000000", "--header-timeout", "3", "--http-parser", _mode(request.param))
    mp.start()
    yield pod, port
    mp.stop()
    pod.close()


def exchange(port: int, data: bytes, half_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if half_close:      # tells the proxy a cut-off body will never be completed
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:   # the proxy already reset the connection (a cut response): read what came
                pass
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


# ---------------------------------------------------------------------------------------------
# What the pod receives for requests that are accepted, but not as the client meant them.

H2C_PROBE = (b"GET /h2c-probe HTTP/1.1\r\nHost: foo.bar.com\r\nUpgrade: h2c\r\n"
             b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade\r\n\r\n")
SWITCH_H2C = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
SWITCH_WS = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
             b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _pod_got(pod: RawPod, marker: bytes) -> bytes:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with pod.lock:
            for b in reversed(pod.conns):
                if marker in bytes(b):
                    return bytes(b)
        time.sleep(0.02)
    return b""


def _head_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in head)]


@pytest.mark.parametrize("answer", [OK_ANSWER, SWITCH_H2C], ids=["pod_200", "pod_101"])
def test_h2c_upgrade_is_not_forwarded(setup, answer):
    """The h2c reproducer: the pod sees a plain GET (no Upgrade, no HTTP2-Settings, no
    Connection: upgrade), so it cannot switch; a pod that answers 101 anyway gets the client a
    502, never a raw HTTP/2 connection to the pod past the path rules."""
    pod, port = setup
    pod.answer = answer
    try:
        out = exchange(port, H2C_PROBE)
        got = _pod_got(pod, b"GET /h2c-probe ")
        assert got, "the request did not reach the pod"
        names = [n for n, _ in _head_fields(got)]
        assert b"upgrade" not in names and b"http2-settings" not in names, got
        assert all(v.lower() != b"upgrade" for n, v in _head_fields(got) if n == b"connection"), got
        if answer is OK_ANSWER:
            assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"ok"), out[:200]
        else:
            assert out.startswith(b"HTTP/1.1 502 "), out[:200]
            assert b"101" not in out.split(b"\r\n", 1)[0]
    finally:
        pod.answer = OK_ANSWER


@pytest.mark.parametrize("request_head", [
    b"POST /upgrade-body HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    b"GET /upgrade-body HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /upgrade-body HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /upgrade-body HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: TLS/1.2, h2c\r\n\r\n",
], ids=["post_with_body", "chunked", "http10", "other_protocols"])
def test_upgrade_that_is_not_a_websocket_handshake_is_a_plain_request(setup, request_head):
    pod, port = setup
    pod.answer = SWITCH_WS
    try:
        out = exchange(port, request_head)
        got = _pod_got(pod, b" /upgrade-body HTTP/1.1")
        assert got and b"upgrade" not in [n for n, _ in _head_fields(got)], got
        assert out.startswith((b"HTTP/1.1 502 ", b"HTTP/1.0 502 ")), out[:200]  # 101 unasked
    finally:
        pod.answer = OK_ANSWER


def test_websocket_offer_is_tunnelled_without_other_protocols(setup):
    pod, port = setup
    pod.answer = SWITCH_WS
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /ws-probe HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                      b"Upgrade: h2c, websocket\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
                      b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            out = b""
            while b"\r\n\r\n" not in out:
                data = s.recv(65536)
                assert data, out
                out += data
            assert out.startswith(b"HTTP/1.1 101 "), out[:200]
            s.sendall(b"\x81\x05hello")
            got = _pod_got(pod, b"\x81\x05hello")
        fields = _head_fields(got)
        assert (b"upgrade", b"websocket") in fields and b"http2-settings" not in [n for n, _ in fields], got
    finally:
        pod.answer = OK_ANSWER


def test_options_asterisk_answered_locally(setup):
    pod, port = setup
    before = pod.total()
    out = exchange(port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", half_close=False)
    head = out.split(b"\r\n\r\n", 1)[0].lower()
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert b"\r\nallow: " in head and b"\r\ncontent-length: 0" in head, out
    time.sleep(0.05)
    assert pod.total() == before  # never routed


def test_http09_request_line_refused_at_once(setup):
    """No blank line ever follows "GET /": 400 at once, not after the 3 s header timeout."""
    pod, port = setup
    before = pod.total()
    for data in (b"GET /\r\n", b"GET /\r\nHost: a\r\n"):
        out = exchange(port, data, half_close=False)
        assert out.startswith(b"HTTP/1.1 400 "), out[:200]   # after the header timeout it would be 408
    assert pod.total() == before


@pytest.mark.parametrize("path", [b"/public/..;/admin", b"/public/%2e%2e;/admin", b"/a/..%3B/b"])
def test_dot_dot_semicolon_path_refused(setup, path):
    pod, port = setup
    before = pod.total()
    out = exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    time.sleep(0.05)
    assert pod.total() == before
