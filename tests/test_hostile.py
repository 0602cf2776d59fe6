"""Hostile pods and clients against the real process: one bad peer must not stall the proxy for
everyone (docs/resilience.md, "Hostile peers").

Each test runs the attack while a probe client keeps asking the admin server and a healthy route,
and asserts what the probe saw (its worst latency, no failure) besides what the attacker got.
The latency bound is generous - the machine running the suite may be busy - and the attacks
used to stall the proxy for the whole route timeout (60 s), so a bound of a second still tells
the two apart.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from backends import Backend, get, ingress_yaml, raw, service_yaml
from conftest import requires
from proc import Meshproxy, http_get

PROBE_BOUND = 1.0     # worst probe latency while an attack runs, seconds


class FloodBackend:
    """Reads a request head, then writes ``chunk`` again and again until the proxy goes away."""

    def __init__(self, host: str, chunk: bytes) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.chunk = chunk
        self.sent = 0
        self.closed_by_peer = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        with c:
            c.settimeout(5)
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            data = self.chunk * max(1, 16384 // len(self.chunk))
            deadline = time.monotonic() + 20
            try:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    c.sendall(data)
                    self.sent += len(data)
            except OSError:
                self.closed_by_peer.set()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


class Probe:
    """Asks /healthz and a healthy route every 20 ms; records the worst latency and failures."""

    def __init__(self, admin: str, port: int, host: str) -> None:
        self.admin, self.port, self.host = admin, port, host
        self.worst = 0.0
        self.failures: list[str] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(10_000):
            if self._stop.is_set():
                return
            for what in ("admin", "route"):
                t0 = time.monotonic()
                try:
                    if what == "admin":
                        status, _ = http_get(self.admin + "/healthz", timeout=10)
                    else:
                        r, _ = get(self.port, "/echo", host=self.host, timeout=10)
                        status = r.status
                    if status != 200:
                        self.failures.append(f"{what}: {status}")
                except OSError as exc:
                    self.failures.append(f"{what}: {exc!r}")
                self.worst = max(self.worst, time.monotonic() - t0)
                self.count += 1
            time.sleep(0.02)

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture
def cluster(tmp_path):
    good = Backend("127.0.12.1", name="good")
    floods = {
        "cont": FloodBackend("127.0.12.2", b"HTTP/1.1 100 Continue\r\n\r\n"),
        "hints": FloodBackend("127.0.12.3", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"),
    }
    docs = [service_yaml("good", [good]), service_yaml("cont", [floods["cont"]]),
            service_yaml("hints", [floods["hints"]]),
            ingress_yaml("ing", [("good.test", "/", "Prefix", "good"), ("cont.test", "/", "Prefix", "cont"),
                                 ("hints.test", "/", "Prefix", "hints")])]
    path = tmp_path / "cluster.yaml"
    path.write_text("---\n".join(docs))
    port = _free_port()
    m = Meshproxy([str(path)], "--ingress-listen", f"127.0.0.1:{port}").start()
    try:
        yield m, port, floods
    finally:
        m.stop()
        good.stop()
        for f in floods.values():
            f.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flood, limit", [("cont", 0), ("hints", 16)])
def test_interim_flood_is_cut_and_does_not_stall_others(cluster, flood, limit):
    m, port, floods = cluster
    with Probe(m.admin, port, "good.test") as probe:
        t0 = time.monotonic()
        data = raw(port, f"GET /x HTTP/1.1\r\nHost: {flood}.test\r\nConnection: close\r\n\r\n".encode(), timeout=10)
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
    final = data.split(b"HTTP/1.1 ")
    statuses = [p[:3] for p in final if p]
    assert statuses and statuses[-1] == b"502", f"no 502 for the attacker: got {data[-300:]!r}"
    assert statuses.count(b"103") <= limit and b"100" not in statuses
    assert elapsed < 5, f"the attacker's own request took {elapsed:.1f} s"
    assert floods[flood].closed_by_peer.wait(5), "the flooding connection must be closed by the proxy"
    assert not probe.failures, probe.failures
    assert probe.count >= 4 and probe.worst < PROBE_BOUND, f"worst probe latency {probe.worst:.3f} s"


def test_client_leaving_closes_the_upstream_connection(cluster):
    m, port, floods = cluster
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /x HTTP/1.1\r\nHost: cont.test\r\n\r\n")
    s.close()   # gone before any answer
    assert floods["cont"].closed_by_peer.wait(5)


@pytest.mark.parametrize("buffered", [True, False])
def test_slow_request_bodies_hold_no_upstream_connection_when_buffered(tmp_path, buffered):
    """--request-buffer-size: 100 clients that send a head and then dribble their bodies hold no
    connection to the pod; the one that finishes its body is forwarded whole. Without it, each
    opens (and holds) an upstream connection at once, the issue this option exists for."""
    pod = Backend("127.0.12.5", name="pod")
    path = tmp_path / "c.yaml"
    path.write_text(service_yaml("up", [pod]) + "---\n" + ingress_yaml("up", [("up.test", "/", "Prefix", "up")]))
    port = _free_port()
    args = ["--ingress-listen", f"127.0.0.1:{port}"] + (["--request-buffer-size", "65536"] if buffered else [])
    m = Meshproxy([str(path)], *args).start()
    clients = []
    try:
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: up.test\r\nContent-Length: 10\r\n\r\nab")
            clients.append(s)
        time.sleep(0.5)
        held = pod.accepts
        if buffered:
            assert held == 0, f"{held} upstream connections for unfinished bodies"
            clients[0].sendall(b"cdefghij")
            reply = clients[0].recv(65536)
            assert reply.startswith(b"HTTP/1.1 200") and pod.accepts == 1
        else:
            assert held >= 50, held
    finally:
        for s in clients:
            s.close()
        m.stop()
        pod.stop()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def test_slow_readers_cost_bounded_memory_and_give_it_back(tmp_path):
    """slowhttptest's slow-read attack (-X): 1,000 connections ask for 1 MiB each, pipelined
    three deep, with a 512-1024 byte receive window, and read 32 bytes every 5 s. Each may cost
    the proxy some buffer, bounded; once they are gone the memory goes back to the system. Before
    the fix each cost ~385 KiB and the process kept its peak (+385 MiB) after they left."""
    tool = requires("slowhttptest")
    pod = Backend("127.0.12.6", name="big")
    path = tmp_path / "c.yaml"
    path.write_text(service_yaml("big", [pod]) + "---\n" + ingress_yaml("big", [(None, "/", "Prefix", "big")]))
    port = _free_port()
    m = Meshproxy([str(path)], "--ingress-listen", f"127.0.0.1:{port}").start()
    n = 1000
    attack = None
    try:
        start = _rss_mib(m.proc.pid)
        attack = subprocess.Popen(
            [tool, "-X", "-c", str(n), "-r", "1000", "-w", "512", "-y", "1024", "-n", "5", "-z", "32",
             "-k", "3", "-l", "15", "-u", f"http://127.0.0.1:{port}/bytes?n=1048576"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = start
        for _ in range(14):
            time.sleep(1)
            peak = max(peak, _rss_mib(m.proc.pid))
        attack.wait(60)
        attack = None
        after = peak
        for _ in range(50):                     # the server gives memory back from its ticker
            time.sleep(0.2)
            after = _rss_mib(m.proc.pid)
            if after < start + 15:
                break
        per_client_kib = (peak - start) * 1024 / n
        assert peak - start > 5, "the attack did not reach the proxy"
        assert per_client_kib < 120, f"{per_client_kib:.0f} KiB per slow reader (peak {peak:.0f} MiB)"
        assert after < start + 15, f"RSS {after:.0f} MiB after the slow readers left (start {start:.0f}, peak {peak:.0f})"
    finally:
        if attack is not None:
            attack.kill()
            attack.wait()
        m.stop()
        pod.stop()
