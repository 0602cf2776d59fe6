"""Small pure-Python HTTP/1.1 backends for the L7 tests (threads and raw sockets, no framework).

``Backend(host, name=...)`` listens on ``host:0`` (use 127.0.10.x for pods) and serves every
connection in its own thread, keep-alive, with behaviour chosen by the request path:

==========================  ====================================================================
path                        behaviour
==========================  ====================================================================
``/status/NNN``             that status; a short body except for 1xx/204/304 (304 has an ETag)
``/delay?ms=N[&only=B]``    sleep N ms (only on the backend named B, if given; ``stop()`` cuts it short), then echo
``/bytes?n=N[&chunked=1]``  N bytes of a fixed pattern (``pattern(n)``), Content-Length or chunked
``/upload[?slow=1]``        read the body (slowly: small recvs with sleeps) and report its
                            length and sha256 (JSON)
``/trailers``               chunked body with a trailer section
``/early-hints``            a 103 interim response, then 200
``/http10``                 an HTTP/1.0 response delimited by closing the connection
``/ws``                     WebSocket handshake (101) then frame echo (RFC 6455, enough for
                            websocat and the tests' own client); ``/ws-raw``: 101, raw byte echo
``/malformed?kind=K``       a response the proxy must refuse (K: cl-te, bad-status, bad-cl,
                            obs-fold, bare-lf, huge-chunk)
``/die?after=N[&chunked=1]``  head promising 1 MB, N body bytes, then RST
``/die-before``             read the request, close without answering
``/close-after``            answer (keep-alive per the headers) and close right after
``/smuggle-304``            a 304 followed by bytes that look like a second response
``/expect-reject``          answer 417 to ``Expect: 100-continue`` without reading the body
anything else               echo: JSON with backend name, method, target, version, headers (list of
                            [name, value]), body length, sha256 and the first 2,000 body bytes
==========================  ====================================================================

``accepts`` counts accepted connections, ``requests`` requests; ``seen`` keeps the last heads
(method, target, headers) for assertions. Everything is bounded: sockets have timeouts and
``stop()`` closes every connection and joins the threads.

Also here: manifest builders for these backends (``service_yaml``, ``ingress_yaml``,
``tls_secret_yaml``), ``Proxy`` - an in-process ``IngressServer`` on its own uvloop thread fed
with snapshots built from manifest text, so tests use plain blocking clients from the test
thread - and small blocking client helpers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import socket
import struct
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import uvloop

from discovery.manifests import load_text
from discovery.store import ADDED, DELETED, Allocator, EndpointIndex, Event, Store
from l7.server import IngressServer
from meshproxy.core.runtime import Runtime
from meshproxy.core.settings import Settings
from meshproxy.core.snapshot import SnapshotBuilder

__all__ = ["Backend", "SockReader", "pattern", "ws_handshake", "ws_send", "ws_recv", "service_yaml",
           "ingress_yaml", "tls_secret_yaml", "ScriptedBackend", "Proxy", "request", "get", "echo", "raw", "read_response"]

_PATTERN = bytes(range(256)) * 4096  # 1 MiB


def pattern(n: int, offset: int = 0) -> bytes:
    """The bytes ``/bytes?n=N`` serves (repeating 0..255), from ``offset``."""
    out = bytearray()
    while len(out) < n:
        start = (offset + len(out)) % 256
        take = min(n - len(out), len(_PATTERN) - start)
        out += _PATTERN[start:start + take]
    return bytes(out)


class _Conn:
    """Buffered reader over a socket for the request side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_until(self, sep: bytes, limit: int = 1 << 20) -> bytes | None:
        while sep not in self.buf:
            if len(self.buf) > limit:
                return None
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n: int, slow: bool = False) -> bytes:
        parts = [self.buf[:n]]
        got = len(parts[0])
        self.buf = self.buf[n:]
        while got < n:
            data = self.sock.recv(min(n - got, 16384 if slow else 1 << 20))
            if not data:
                raise ConnectionError("eof in body")
            parts.append(data)
            got += len(data)
            if slow:
                time.sleep(0.002)
        return b"".join(parts)

    def read_some(self) -> bytes:
        if self.buf:
            out, self.buf = self.buf, b""
            return out
        return self.sock.recv(65536)


class Backend:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, name: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.name = name or f"{host}:{self.port}"
        self.accepts = 0
        self.requests = 0
        self.seen: list[tuple[str, str, list[list[str]]]] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._stopping = threading.Event()      # ends a /delay sleep at stop()
        self._thread = threading.Thread(target=self._accept_loop, name=f"backend-{self.name}", daemon=True)
        self._thread.start()

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- lifecycle ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopped = True
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._thread.join(timeout=5)
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepts += 1
                self._conns.add(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock)
        try:
            while not self._stopped:
                if not self._one(conn):
                    break
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    # -- one request -------------------------------------------------------------------------------

    def _one(self, conn: _Conn) -> bool:
        raw = conn.read_until(b"\r\n\r\n")
        if raw is None:
            return False
        lines = raw[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append([name, value.strip()])
        h = {n.lower(): v for n, v in headers}
        with self._lock:
            self.requests += 1
            self.seen.append((method, target, headers))
            del self.seen[:-50]
        url = urlsplit(target)
        path = url.path
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        keep = h.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        sock = conn.sock

        if path == "/expect-reject" and h.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return False
        if h.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        # Request body.
        slow = q.get("slow") == "1"
        if "transfer-encoding" in h:
            body = self._read_chunked(conn, slow)
        else:
            body = conn.read_exact(int(h.get("content-length", "0") or 0), slow=slow)

        if path == "/die-before":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            if code < 200 or code in (204, 304):
                extra = "ETag: \"v1\"\r\n" if code == 304 else ""
                sock.sendall(f"HTTP/1.1 {code} X\r\n{extra}X-Backend: {self.name}\r\n\r\n".encode())
            else:
                data = f"status {code}\n".encode()
                self._send(sock, code, data, keep, [("X-Backend", self.name)], method)
            return keep
        if path == "/delay" and q.get("only", self.name) == self.name:
            self._stopping.wait(int(q.get("ms", "100")) / 1000)
        if path == "/bytes":
            n = int(q.get("n", "0"))
            if q.get("chunked") == "1":
                sock.sendall(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Backend: {self.name}\r\n\r\n".encode())
                if method != "HEAD":
                    sent = 0
                    step = int(q.get("chunk", "65536"))
                    while sent < n:
                        part = pattern(min(step, n - sent), sent)
                        sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
                        sent += len(part)
                    sock.sendall(b"0\r\n\r\n")
            else:
                sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nX-Backend: {self.name}\r\n\r\n".encode())
                if method != "HEAD":
                    sent = 0
                    while sent < n:
                        part = pattern(min(1 << 20, n - sent), sent)
                        sock.sendall(part)
                        sent += len(part)
            return keep
        if path == "/upload":
            data = json.dumps({"backend": self.name, "length": len(body),
                               "sha256": hashlib.sha256(body).hexdigest()}).encode()
            self._send(sock, 200, data, keep, [("Content-Type", "application/json")], method)
            return keep
        if path == "/trailers":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                         b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n")
            return keep
        if path == "/early-hints":
            sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            self._send(sock, 200, b"after hints\n", keep, [], method)
            return keep
        if path == "/http10":
            sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body\n")
            return False
        if path in ("/ws", "/ws-raw"):
            if h.get("upgrade", "").lower() != "websocket":
                self._send(sock, 426, b"upgrade required\n", keep, [], method)
                return keep
            key = h.get("sec-websocket-key", "")
            accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
            if path == "/ws-raw":
                while True:
                    data = conn.read_some()
                    if not data:
                        return False
                    sock.sendall(data)
            while True:
                frame = ws_recv(conn)
                if frame is None:
                    return False
                opcode, payload = frame
                if opcode == 8:
                    ws_send(sock, payload, opcode=8, mask=False)
                    return False
                ws_send(sock, payload, opcode=opcode, mask=False)
        if path == "/malformed":
            kind = q.get("kind", "cl-te")
            raw_resp = {
                "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
                "bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
                "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",
                "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
                "huge-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
                "garbage": b"NOT HTTP AT ALL\r\n\r\n",
            }[kind]
            sock.sendall(raw_resp)
            return False
        if path == "/die":
            after = int(q.get("after", "1000"))
            if q.get("chunked") == "1":
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                sock.sendall(b"%x\r\n" % after + pattern(after) + b"\r\n")
            else:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + pattern(after))
            time.sleep(0.05)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if path == "/smuggle-304":
            # A 304 followed by bytes that look like a whole second response: a proxy that pools
            # this connection would serve "smuggled" to the next request.
            sock.sendall(b"HTTP/1.1 304 Not Modified\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
            return keep
        if path == "/close-after":
            self._send(sock, 200, b"closing now\n", True, [("X-Backend", self.name)], method)
            return False

        # Echo.
        data = json.dumps({
            "backend": self.name, "method": method, "target": target, "version": version,
            "headers": headers, "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
            "body": body[:2000].decode("latin-1"),
        }).encode()
        self._send(sock, 200, data, keep, [("Content-Type", "application/json"), ("X-Backend", self.name)], method)
        return keep

    @staticmethod
    def _read_chunked(conn: _Conn, slow: bool = False) -> bytes:
        parts = []
        while True:
            line = conn.read_until(b"\r\n")
            if line is None:
                raise ConnectionError("eof in chunked body")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers
                    t = conn.read_until(b"\r\n")
                    if t is None or t == b"\r\n":
                        break
                return b"".join(parts)
            parts.append(conn.read_exact(size, slow=slow))
            conn.read_exact(2)

    @staticmethod
    def _send(sock, code: int, body: bytes, keep: bool, extra, method: str) -> None:
        head = [f"HTTP/1.1 {code} X", f"Content-Length: {len(body)}"]
        head += [f"{n}: {v}" for n, v in extra]
        if not keep:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode()
        sock.sendall(data if method == "HEAD" else data + body)


# -- a minimal WebSocket (RFC 6455) client/server framing, for the tests -------------------------

def ws_handshake(sock: socket.socket, host: str, path: str = "/ws") -> bytes:
    """Send an Upgrade request on ``sock``; return the raw response head (through CRLFCRLF)
    and leave anything after it in the returned value's attribute-free tail (tests read on)."""
    key = base64.b64encode(b"0123456789abcdef").decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            break
        buf += data
    return buf


def ws_send(sock: socket.socket, payload: bytes, opcode: int = 1, mask: bool = True) -> None:
    n = len(payload)
    head = bytes([0x80 | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask:
        key = b"\x01\x02\x03\x04"
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    sock.sendall(head + payload)


def ws_recv(conn) -> tuple[int, bytes] | None:
    """Read one frame from a ``_Conn`` or a socket wrapped by ``_SockReader``."""
    def exact(n: int) -> bytes:
        return conn.read_exact(n)
    try:
        b0, b1 = exact(2)
    except (ConnectionError, ValueError):
        return None
    opcode = b0 & 0x0F
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exact(8))[0]
    key = exact(4) if b1 & 0x80 else None
    payload = exact(n) if n else b""
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload


class SockReader(_Conn):
    """Public name of the buffered reader (tests use it on client sockets)."""


# -- manifests for the backends ----------------------------------------------------------------------

def service_yaml(name: str, backends: list[Backend], namespace: str = "default", *, ready: bool = True,
                 annotations: dict[str, str] | None = None, port: int = 80) -> str:
    """Pods (one per backend, at its address, container port named ``http``) and a Service
    ``name`` selecting them with port ``port`` -> targetPort ``http``."""
    docs = []
    for i, b in enumerate(backends):
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}-{i}, namespace: {namespace}, labels: {{app: {name}}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {b.port}}}]}}]}}
status: {{podIP: {b.host}, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
""")
    ann = ""
    if annotations:
        ann = ", annotations: {" + ", ".join(f'"{k}": "{v}"' for k, v in annotations.items()) + "}"
    docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}{ann}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: {port}, targetPort: http}}]
""")
    return "---\n".join(docs)


def ingress_yaml(name: str, rules: list[tuple[str | None, str, str, str]], namespace: str = "default", *,
                 annotations: dict[str, str] | None = None, tls: list[tuple[list[str], str]] | None = None,
                 default_service: str | None = None, port: int = 80) -> str:
    """An Ingress; ``rules``: (host or None, path, pathType, service name)."""
    ann = ""
    if annotations:
        ann = ", annotations: {" + ", ".join(f'"{k}": "{v}"' for k, v in annotations.items()) + "}"
    by_host: dict[str | None, list[str]] = {}
    for host, path, ptype, svc in rules:
        by_host.setdefault(host, []).append(
            f"      - {{path: {path}, pathType: {ptype}, backend: {{service: {{name: {svc}, port: {{number: {port}}}}}}}}}")
    lines = [f"apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: {namespace}{ann}}}\nspec:"]
    if default_service:
        lines.append(f"  defaultBackend: {{service: {{name: {default_service}, port: {{number: {port}}}}}}}")
    if tls:
        lines.append("  tls:")
        for hosts, secret in tls:
            lines.append(f"  - {{hosts: [{', '.join(hosts)}], secretName: {secret}}}")
    if by_host:
        lines.append("  rules:")
        for host, paths in by_host.items():
            lines.append(f"  - host: {host}" if host else "  - http:")
            if host:
                lines.append("    http:")
            lines.append("      paths:" if host else "      paths:")
            lines.extend(paths)
    return "\n".join(lines) + "\n"


def tls_secret_yaml(name: str, cert_pem: bytes, key_pem: bytes, namespace: str = "default") -> str:
    return f"""apiVersion: v1
kind: Secret
type: kubernetes.io/tls
metadata: {{name: {name}, namespace: {namespace}}}
data:
  tls.crt: {base64.b64encode(cert_pem).decode()}
  tls.key: {base64.b64encode(key_pem).decode()}
"""


# -- in-process proxy -------------------------------------------------------------------------------


class Proxy:
    """``Proxy(yaml_text, **settings)``: start; ``update(yaml_text)`` replaces the objects;
    ``close()`` drains and stops. ``port`` / ``tls_port`` are the bound ports."""

    def __init__(self, manifests: str, *, tls: bool = False, plain: bool = True, **settings: Any) -> None:
        opts = dict(ingress_listen=("127.0.0.1", 0) if plain else None, health_checks=False,
                    header_timeout=5.0, keepalive_timeout=30.0)
        if tls:
            opts["ingress_tls_listen"] = ("127.0.0.1", 0)
        opts.update(settings)
        self.settings = Settings(**opts)
        self.store = Store()
        self.index = EndpointIndex(self.store)
        self.allocator = Allocator(self.settings.service_cidr, self.settings.node_port_range)
        self.builder = SnapshotBuilder(self.settings)
        self.runtime = Runtime(self.settings)
        self._objects: dict = {}
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True)
        self._thread.start()
        self.call(self._publish_text, manifests)
        self.server = IngressServer(self.runtime)
        self.run(self.server.start())
        self.call(self.runtime.subscribe, self.server.apply)
        ports = self.server.ports
        self.port = ports[0] if plain else 0
        self.tls_port = self.server.tls_port

    # -- running things on the proxy's loop ----------------------------------------------------

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        async def _do():
            return fn(*args)
        return self.run(_do())

    # -- configuration -------------------------------------------------------------------------

    def _publish_text(self, text: str) -> None:
        result = load_text(text)
        if result.errors:
            raise ValueError("; ".join(str(e) for e in result.errors))
        new = {obj.key: obj for obj in result.objects}
        events = [Event(DELETED, old) for key, old in self._objects.items() if key not in new]
        events += [Event(ADDED, obj) for obj in new.values()]
        self._objects = new
        changes = self.store.apply(events)
        self.index.on_changes(changes)
        self.index.recompute()
        snap = self.builder.build(self.store, self.index, self.allocator)
        self.runtime.publish(snap)

    def update(self, manifests: str) -> None:
        self.call(self._publish_text, manifests)

    @property
    def snapshot(self):
        return self.runtime.snapshot

    # -- observing the proxy's buffers (runs on the proxy loop, so it is race-free) ----------------

    def start_sampler(self, interval: float = 0.002) -> None:
        self.max_buffered = 0
        self._sampling = True

        def sample() -> None:
            if not self._sampling:
                return
            total = 0
            for c in list(self.server.connections):
                t = c.transport
                if t is not None and not t.is_closing():
                    total += t.get_write_buffer_size()
                if c.parser is not None:
                    total += len(c.parser.trailing)
                ex = c.exchange
                if ex is not None:
                    total += ex.pending_bytes
                    up = ex.up
                    if up is not None and up.transport is not None and not up.transport.is_closing():
                        total += up.transport.get_write_buffer_size() + len(up.parser.trailing)
            self.max_buffered = max(self.max_buffered, total)
            self.loop.call_later(interval, sample)

        self.loop.call_soon_threadsafe(sample)

    def stop_sampler(self) -> int:
        self._sampling = False
        return self.max_buffered

    def close(self) -> None:
        try:
            self.run(self.server.stop_accepting())
            self.run(self.server.drain(0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            self.loop.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- clients ----------------------------------------------------------------------------------------

def request(port: int, method: str, path: str, host: str = "example.com", body=None,
            headers: dict | None = None, conn: http.client.HTTPConnection | None = None,
            timeout: float = 10.0):
    """One request with http.client; returns (response, body bytes, connection)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = {"Host": host}
    hdrs.update(headers or {})
    c.request(method, path, body=body, headers=hdrs)
    r = c.getresponse()
    data = r.read()
    return r, data, c


def get(port: int, path: str, host: str = "example.com", **kw):
    r, data, c = request(port, "GET", path, host, **kw)
    if "conn" not in kw:
        c.close()
    return r, data


def echo(port: int, path: str = "/echo", host: str = "example.com", **kw) -> dict:
    r, data = get(port, path, host, **kw)
    assert r.status == 200, (r.status, data)
    return json.loads(data)


def raw(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True,
        half_close: bool = False) -> bytes:
    """Send raw bytes (then shut down our sending side if ``half_close``); return everything
    received until the proxy closes (or timeout); a reset is marked ``<RST>``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                out += b"<RST>"
                break
            if not chunk:
                break
            out += chunk
            if not read_until_close:
                break
        return out
    finally:
        s.close()


def read_response(sock: socket.socket, buf: bytes = b"", head: bool = False) -> tuple[int, dict, bytes, bytes]:
    """Read one Content-Length- or chunked-framed response from a socket (simple test parser);
    ``head``: it answers a HEAD request (no body). Returns (status, lowercased headers, body,
    leftover bytes)."""
    while b"\r\n\r\n" not in buf:
        d = sock.recv(65536)
        if not d:
            raise ConnectionError("closed before a response head: %r" % buf)
        buf += d
    first, buf = buf.split(b"\r\n\r\n", 1)
    lines = first.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        n, _, v = line.partition(":")
        hdrs[n.strip().lower()] = v.strip()
    if status < 200 or status in (204, 304) or head:
        return status, hdrs, b"", buf
    if "content-length" in hdrs:
        n = int(hdrs["content-length"])
        while len(buf) < n:
            d = sock.recv(65536)
            if not d:
                raise ConnectionError("short body")
            buf += d
        return status, hdrs, buf[:n], buf[n:]
    if hdrs.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            line, buf = buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + buf:
                    buf += sock.recv(65536)
                _, buf = (b"\r\n" + buf).split(b"\r\n\r\n", 1)
                return status, hdrs, body, buf
            while len(buf) < size + 2:
                d = sock.recv(65536)
                if not d:
                    raise ConnectionError("short chunk")
                buf += d
            body += buf[:size]
            buf = buf[size + 2:]
    body = buf
    while True:
        d = sock.recv(65536)
        if not d:
            return status, hdrs, body, b""
        body += d


class ScriptedBackend:
    """Answers every request (its head is read, a body is not) with the raw bytes in ``script``,
    then closes the connection. For feeding the proxy arbitrary upstream responses."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.script = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.settimeout(2)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        break
                    buf += d
                c.sendall(self.script)
                c.shutdown(socket.SHUT_WR)
                c.settimeout(0.2)
                try:
                    while c.recv(65536):
                        pass
                except OSError:
                    pass
            except OSError:
                pass
            finally:
                c.close()

    def stop(self) -> None:
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)
