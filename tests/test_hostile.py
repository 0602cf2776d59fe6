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
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from backends import Backend, Proxy, ScriptedBackend, get, ingress_yaml, raw, service_yaml
from conftest import requires
from proc import Meshproxy, http_get

PROBE_BOUND = 1.0     # worst probe latency while an attack runs, seconds
# A 103 head the proxy counts as 20,040 bytes against its 64 KiB interim bound (32 per head, name
# + value + 4 per field): three pass (60,120 bytes), the fourth does not - far under the bound
# of 16 heads, so only the byte bound can stop them.
BIG_HINT = b"HTTP/1.1 103 Early Hints\r\nLink: <" + b"a" * 19998 + b">\r\n\r\n"


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
        "big": FloodBackend("127.0.12.4", BIG_HINT),
    }
    few = ScriptedBackend("127.0.12.7")    # three big hints, then the answer: under both bounds
    few.script = BIG_HINT * 3 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    docs = [service_yaml("good", [good]), service_yaml("cont", [floods["cont"]]),
            service_yaml("hints", [floods["hints"]]), service_yaml("big", [floods["big"]]),
            service_yaml("few", [few]),
            ingress_yaml("ing", [("good.test", "/", "Prefix", "good"), ("cont.test", "/", "Prefix", "cont"),
                                 ("hints.test", "/", "Prefix", "hints"), ("big.test", "/", "Prefix", "big"),
                                 ("few.test", "/", "Prefix", "few")])]
    path = tmp_path / "cluster.yaml"
    path.write_text("---\n".join(docs))
    port = _free_port()
    m = Meshproxy([str(path)], "--ingress-listen", f"127.0.0.1:{port}").start()
    try:
        yield m, port, floods
    finally:
        m.stop()
        good.stop()
        few.stop()
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


def test_big_interim_heads_are_cut_by_bytes_under_the_count_bound(cluster):
    """A pod sending 20 KB 103 heads: three are relayed, the fourth passes 64 KiB in all (while
    the count, 4, is far under 16) and the client gets 502; the pod's connection is closed and
    the probe client is served throughout."""
    m, port, floods = cluster
    with Probe(m.admin, port, "good.test") as probe:
        data = raw(port, b"GET /x HTTP/1.1\r\nHost: big.test\r\nConnection: close\r\n\r\n", timeout=10)
        time.sleep(0.3)
    statuses = [p[:3] for p in data.split(b"HTTP/1.1 ") if p]
    assert statuses == [b"103"] * 3 + [b"502"], f"got {statuses} ({data[-300:]!r})"
    assert data.count(b"a" * 19998) == 3            # relayed whole
    assert floods["big"].closed_by_peer.wait(5)
    assert not probe.failures, probe.failures
    assert probe.count >= 4 and probe.worst < PROBE_BOUND, f"worst probe latency {probe.worst:.3f} s"


def test_big_interim_heads_under_both_bounds_are_relayed(cluster):
    """Three 20 KB 103 heads (60,120 of 65,536 bytes, 3 of 16 heads) then the answer: all
    relayed as sent."""
    m, port, _ = cluster
    data = raw(port, b"GET /x HTTP/1.1\r\nHost: few.test\r\nConnection: close\r\n\r\n", timeout=10)
    statuses = [p[:3] for p in data.split(b"HTTP/1.1 ") if p]
    assert statuses == [b"103"] * 3 + [b"200"], f"got {statuses} ({data[-300:]!r})"
    assert data.count(b"a" * 19998) == 3 and data.endswith(b"\r\n\r\nok")


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


# -- the loop budget ------------------------------------------------------------------------------

# The attackers of test_loop_budget_holds_under_attack, in a process of their own so that none of
# their Python runs under the proxy's interpreter lock: the lag measured is the proxy's alone.
# argv: MODE PROXY_PORT SECONDS POD_FD. The pod listens on the inherited socket POD_FD; two
# clients attack until SECONDS pass; prints how many responses the clients received.
_ATTACK = r'''
import socket, sys, threading, time
mode, port, secs, pod_fd = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + secs
got = [0]
INTERIM = {"interim-100": b"HTTP/1.1 100 Continue\r\n\r\n",
           "interim-103": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

def pod_conn(c):
    with c:
        c.settimeout(2)
        try:
            if mode in INTERIM:          # read a head, then 1xx until the proxy hangs up
                buf = b""
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                data = INTERIM[mode] * (16384 // len(INTERIM[mode]))
                while time.monotonic() < end:
                    c.sendall(data)
            else:                        # a keep-alive pod: one answer per request head
                buf = b""
                while time.monotonic() < end:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                    n = buf.count(b"\r\n\r\n")
                    buf = buf[buf.rfind(b"\r\n\r\n") + 4:] if n else buf
                    c.sendall(OK * n)
        except OSError:
            pass

def pod():
    s = socket.socket(fileno=pod_fd)
    s.settimeout(0.2)
    while time.monotonic() < end:
        try:
            c, _ = s.accept()
        except OSError:
            continue
        threading.Thread(target=pod_conn, args=(c,), daemon=True).start()

def client():
    if mode == "pipelined-local":    # no rule for this host: the proxy answers 404 itself
        req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    else:
        req = b"GET / HTTP/1.1\r\nHost: pod.test\r\n\r\n"
    blob = req * (256000 // len(req)) if mode.startswith("pipelined") else req
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(blob)
                for _ in range(100000):
                    d = s.recv(1 << 20)
                    if not d:
                        break
                    got[0] += d.count(b"HTTP/1.1 ")
                    if mode.startswith("interim") and b" 502 " in d:
                        break
        except OSError:
            pass

threading.Thread(target=pod, daemon=True).start()
cs = [threading.Thread(target=client, daemon=True) for _ in range(2)]
for t in cs:
    t.start()
for t in cs:
    t.join(secs + 5)
print(got[0], flush=True)
'''

# The loop budget, seconds; see test_loop_budget_holds_under_attack.
LOOP_TURN_CPU_BOUND = 0.020   # CPU time of the proxy's loop thread between two probe ticks
LOOP_LAG_BOUND = 0.250        # how late a probe tick may run (wall clock)


class LoopLag:
    """A callback on ``loop`` every millisecond. ``worst`` is the longest it came late; ``worst_cpu``
    the most CPU time the loop's thread used between two ticks - the work of the turns in
    between, without the time the kernel gave to other processes."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.worst = self.worst_cpu = 0.0
        self.ticks = 0
        self._due = self._cpu = 0.0
        self._stop = False
        loop.call_soon_threadsafe(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        cpu = time.thread_time()
        if self._due:
            self.worst = max(self.worst, now - self._due)
            self.worst_cpu = max(self.worst_cpu, cpu - self._cpu)
            self.ticks += 1
        if not self._stop:
            self._due = time.perf_counter() + 0.001
            self._cpu = time.thread_time()
            self.loop.call_later(0.001, self._tick)

    def reset(self) -> None:
        self.worst = self.worst_cpu = 0.0
        self.ticks = 0

    def stop(self) -> None:
        self._stop = True


@pytest.mark.parametrize("mode", [
    "interim-100", "interim-103", "pipelined-to-pod", "pipelined-local",
])
def test_loop_budget_holds_under_attack(mode):
    """The loop budget (docs/resilience.md, "Loop budget"): while a pod floods 1xx heads or a
    client pipelines 256,000-byte reads of requests, the proxy's loop keeps turning - measured by
    a callback scheduled every millisecond on the loop of an in-process proxy (the attackers run
    in another process, so none of their Python takes the proxy's interpreter lock).

    Two bounds. LOOP_TURN_CPU_BOUND, 20 ms of the loop thread's CPU time between two ticks, is
    the budget itself: the work per turn is a few ms (one pod read of at most 16 KiB before the
    head, at most 16 interim heads per request, one exchange per pipelined request); 20 ms
    leaves room for a slower CPU. CPU time is used because wall time on the shared 2-core CI
    machine includes the slices the kernel gives to other jobs (an idle proxy's ticks come up to
    5 ms late there, under attack up to ~50 ms, with ~0.3 ms of it garbage collection).
    LOOP_LAG_BOUND, 250 ms of wall time, is what clients feel, with that noise allowed for - the
    bound docs/resilience.md gives for big reloads too. The attacks these bounds are for held
    the loop for 60 s (the route timeout: issue 20); pipelined requests the proxy answers itself
    held it 0.1-0.8 s per read (85-150 ms of it CPU time) before they were taken 32 per turn."""
    pod = socket.socket()
    pod.bind(("127.0.12.8", 0))
    pod.listen(64)
    addr = SimpleNamespace(host="127.0.12.8", port=pod.getsockname()[1])
    manifests = service_yaml("pod", [addr]) + "---\n" + ingress_yaml("ing", [("pod.test", "/", "Prefix", "pod")])
    proxy = Proxy(manifests)
    lag = LoopLag(proxy.loop)
    attack = None
    try:
        time.sleep(0.2)
        proxy.call(lag.reset)
        attack = subprocess.Popen([sys.executable, "-c", _ATTACK, mode, str(proxy.port), "1.5", str(pod.fileno())],
                                  pass_fds=[pod.fileno()], stdout=subprocess.PIPE, text=True)
        out, _ = attack.communicate(timeout=30)
        attack = None
        worst, cpu, ticks = proxy.call(lambda: (lag.worst, lag.worst_cpu, lag.ticks))
        responses = int(out.split()[-1])
        seen = (f"{mode}: worst tick {worst * 1000:.0f} ms late, {cpu * 1000:.1f} ms of loop CPU between "
                f"two ticks ({ticks} ticks, {responses} responses)")
        assert responses >= 10, f"the attack did not reach the proxy: {seen}"
        assert ticks >= 100, seen
        assert cpu < LOOP_TURN_CPU_BOUND and worst < LOOP_LAG_BOUND, seen
    finally:
        if attack is not None:
            attack.kill()
            attack.wait()
        proxy.call(lag.stop)
        proxy.close()
        pod.close()
