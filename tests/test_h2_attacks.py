"""The known HTTP/2 attacks against a real ``meshproxy`` process, each while another client keeps
being served: the proxy stays up, its memory stays bounded and the other client's requests all
succeed. (The limits themselves are checked frame by frame in tests/test_h2_protocol.py.)

Every attack is bounded in connections and bytes; RSS is read from /proc/<pid>/status.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame

import h2_client
from backends import Backend, ingress_yaml, service_yaml
from proc import Meshproxy, free_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
# Growth of the proxy's RSS an attack may cause (the first attack also warms allocator arenas).
RSS_BOUND = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    b = Backend("127.0.70.1", name="pod")
    port = free_port()
    path = os.path.join(str(tmp_path_factory.mktemp("h2attack")), "m.yaml")
    with open(path, "w") as f:
        f.write(service_yaml("web", [b]) + "---\n" + ingress_yaml("web", [(None, "/", "Prefix", "web")]))
    mp = Meshproxy([path], "--ingress-listen", f"127.0.0.1:{port}", "--send-timeout", "2")
    try:
        mp.start()
        yield mp, port
    finally:
        mp.stop()
        b.stop()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Bystander:
    """A well-behaved HTTP/2 client making requests on one connection the whole time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        c = h2_client.Client(self.port)
        try:
            for _ in range(100_000):
                if self._stop.is_set():
                    break
                sid = c.get(b"/echo")
                r = c.response(sid, timeout=5)
                if r.headers.get(b":status") == b"200" and r.ended:
                    self.ok += 1
                else:
                    self.failed.append(repr((r.headers, r.reset, c.goaway)))
                    break
                time.sleep(0.01)
        finally:
            c.close()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=10)


def under_attack(proxy, attack) -> None:
    mp, port = proxy
    pid = mp.proc.pid
    base = rss(pid)
    by = Bystander(port)
    try:
        attack(port)
    finally:
        time.sleep(0.3)
        by.stop()
    assert mp.proc.poll() is None, "the proxy died"
    assert not by.failed and by.ok > 0, by.failed
    grown = rss(pid) - base
    assert grown < RSS_BOUND, f"RSS grew by {grown // 1024} KiB"
    # And a new client is served after the attack.
    c = h2_client.Client(port)
    try:
        assert c.response(c.get(b"/echo")).headers.get(b":status") == b"200"
    finally:
        c.close()


def _blast(port: int, payload: bytes, connections: int, read: bool = False) -> list[bytes]:
    """Send ``payload`` on ``connections`` connections (never reading, unless ``read``); what
    each got back, when read."""
    got = []
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(PREFACE + payload)
            except OSError:
                pass   # closed by the proxy mid-send: fine
            if read:
                data = b""
                s.settimeout(3)
                ended = False
                try:
                    for _ in range(1000):
                        chunk = s.recv(65536)
                        if not chunk:
                            ended = True
                            break
                        data += chunk
                except socket.timeout:
                    pass
                except OSError:
                    ended = True   # reset by the proxy
                got.append(data if ended else b"(still open)")
    return got


def _goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY frame in raw server bytes."""
    i = 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        if data[i + 3] == 7 and i + 9 + 8 <= len(data):
            return int.from_bytes(data[i + 13:i + 17], "big")
        i += 9 + length
    return None


def _headers(sid: int, end_stream: bool = True, path: bytes = b"/echo") -> bytes:
    # Literal header fields without indexing (no HPACK state needed across frames).
    def lit(n: bytes, v: bytes) -> bytes:
        return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
    block = lit(b":method", b"GET") + lit(b":scheme", b"http") + lit(b":path", path) + lit(b":authority", b"example.com")
    flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
    return HeadersFrame(sid, data=block, flags=flags).serialize()


def test_rapid_reset(proxy):
    """CVE-2023-44487: streams opened and reset at once, thousands per connection."""
    def attack(port):
        rst = bytes.fromhex("000004030000000000")
        payload = b"".join(_headers(sid) + rst[:5] + sid.to_bytes(4, "big") + (8).to_bytes(4, "big")
                           for sid in range(1, 2 * 2000, 2))
        got = _blast(port, payload, 10, read=True)
        assert all(_goaway_code(g) == 11 for g in got), [g[-40:] for g in got]   # ENHANCE_YOUR_CALM
    under_attack(proxy, attack)


def test_continuation_flood(proxy):
    def attack(port):
        frames = HeadersFrame(1, data=b"\x82").serialize() + b"".join(
            ContinuationFrame(1, data=b"\x00" * 16000).serialize() for _ in range(400))
        got = _blast(port, frames, 10, read=True)
        assert all(_goaway_code(g) is not None for g in got)
    under_attack(proxy, attack)


def test_hpack_bomb(proxy):
    def attack(port):
        # Insert a 4 KiB field into the dynamic table (literal with incremental indexing), then
        # reference it (index 62) thousands of times: 1 byte each on the wire.
        name, value = b"x-bomb", b"a" * 4000
        first = (b"\x40" + bytes([len(name)]) + name + b"\x7f" + _int7(len(value) - 127) + value)
        lit = b"\x82\x86\x84\x01\x0bexample.com"   # :method GET, :scheme http, :path /, :authority
        frames = HeadersFrame(1, data=lit + first, flags=["END_HEADERS", "END_STREAM"]).serialize()
        frames += HeadersFrame(3, data=lit + b"\xbe" * 15000, flags=["END_HEADERS", "END_STREAM"]).serialize()
        got = _blast(port, frames, 10, read=True)
        assert all(_goaway_code(g) is not None for g in got)
    under_attack(proxy, attack)


def _int7(n: int) -> bytes:
    out = b""
    while n >= 128:
        out += bytes([(n % 128) + 128])
        n //= 128
    return out + bytes([n])


def test_settings_and_ping_floods(proxy):
    def attack(port):
        pings = b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize() for i in range(20000))
        settings = SettingsFrame(0, settings={4: 65535}).serialize() * 20000
        got = _blast(port, pings, 5, read=True) + _blast(port, settings, 5, read=True)
        # Each connection is ended: GOAWAY ENHANCE_YOUR_CALM, or - when the flood filled our
        # output with ACKs the client did not read, so we stopped reading it - the send timeout.
        assert all(g != b"(still open)" and _goaway_code(g) in (11, None) for g in got), [g[-40:] for g in got]
        _blast(port, pings, 5, read=False)   # and never reading the ACKs at all
    under_attack(proxy, attack)


def test_empty_data_flood(proxy):
    def attack(port):
        payload = _headers(1, end_stream=False, path=b"/upload") + DataFrame(1, data=b"").serialize() * 20000
        got = _blast(port, payload, 10, read=True)
        assert all(_goaway_code(g) == 11 for g in got)
    under_attack(proxy, attack)


def test_zero_window_client_that_never_reads(proxy):
    """Asks for 5 MB with a zero window and reads nothing: the proxy holds a bounded amount
    and drops the connection at the send timeout (2 s here)."""
    def attack(port):
        socks = []
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0, settings={4: 0}).serialize()
                      + b"".join(_headers(sid, path=b"/bytes?n=5000000") for sid in (1, 3, 5)))
            socks.append(s)
        time.sleep(4.0)                  # past the send timeout
        for s in socks:
            s.settimeout(2)
            data = b""
            try:
                for _ in range(100):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass                     # reset by the proxy
            s.close()
            assert len(data) < 1_000_000   # only heads, SETTINGS and the like ever reached us
    under_attack(proxy, attack)


def test_stream_id_exhaustion(proxy):
    def attack(port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(PREFACE + _headers((1 << 31) - 1))
            s.settimeout(3)
            data = b""
            try:
                for _ in range(100):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            assert _goaway_code(data) == 0     # NO_ERROR: move to a new connection
            assert b":status" not in data      # (HPACK-encoded; the response is there:)
            assert len(data) > 50
    under_attack(proxy, attack)
