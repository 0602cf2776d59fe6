"""Chaos under load: nothing is lost when pods die, roll, flip, or the proxy reloads / upgrades.

Each scenario runs the real meshproxy process with pod processes (tests/podserver.py) on
127.0.10.x and a bounded, continuous load of idempotent HTTP requests: through the Ingress
(keep-alive clients) and through a ClusterIP (L4 clients, one request per connection and
long-lived connections carrying many requests, each remembering the pod that answered it).
Each scenario reports elapsed time, request rate and sent / succeeded / failed. The acceptance
bar is 0 failed requests and 0 broken L4 connections that were not to a killed pod, under
continuous load: every phase of a scenario runs until both a minimum time has passed and a
minimum number of requests went through (``hold``), so a slow machine makes a phase longer,
never a test fail. The rate (a few hundred requests per second on a quiet machine) is printed,
not asserted. Pods listen on port 0 (the kernel's choice, read back from the pod process).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from proc import ROOT, Meshproxy, free_port, wait_for

# L7 requests each scenario carries at least: the minimums of its phases (hold) add up to this
# or more, so a slow machine makes a scenario longer, never short of it.
MIN_L7_REQUESTS = 300


class Pod:
    """tests/podserver.py in its own process, on ``ip`` and ``port`` (0: the kernel chooses;
    ``port`` is the bound one once it is ready)."""

    def __init__(self, name: str, ip: str, port: int = 0, status: int = 200) -> None:
        self.name, self.ip = name, ip
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "podserver.py"), name, ip, str(port),
                                      str(status)],
                                     stdout=subprocess.PIPE, text=True)
        word, bound = self.proc.stdout.readline().split()
        assert word == "ready"
        self.port = int(bound)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def pod_yaml(name: str, ip: str, labels: str, port: int, terminating: bool = False) -> str:
    meta_extra = ", deletionTimestamp: '2024-01-01T00:00:00Z'" if terminating else ""
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, labels: {{{labels}}}{meta_extra}}}
        spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {port}}}]}}]}}
        status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
        ---
        """)


def service_yaml(name: str, cluster_ip: str, port: int, selector: str = "app: web") -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}}}
        spec: {{clusterIP: {cluster_ip}, selector: {{{selector}}}, ports: [{{name: http, port: {port}, targetPort: http}}]}}
        ---
        """)


def services_yaml(cluster_ip: str, port: int, selector: str = "app: web") -> str:
    return service_yaml("web", cluster_ip, port, selector) + textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: web}
        spec:
          rules:
          - host: web.test
            http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}]}
        """)


def read_answer(sock: socket.socket, buf: bytearray) -> tuple[int, str]:
    """One HTTP/1.1 response (Content-Length framed, as podserver sends) from a kept-alive
    socket: (status, first word of the body = the pod's name)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the answer" if not buf else "closed in the middle of the answer")
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    if m is None:
        raise ConnectionError(f"answer without Content-Length: {head[:80]!r}")
    end = len(head) + 4 + int(m.group(1))
    while len(buf) < end:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the middle of the answer")
        buf += chunk
    body = bytes(buf[len(head) + 4:end])
    del buf[:end]
    return int(head.split(b" ", 2)[1]), (body.split() or [b""])[0].decode()


class Load:
    """Bounded closed-loop load on the Ingress (keep-alive L7 clients) and the ClusterIP (L4).

    L4 clients open a connection, then send ``l4_long_requests`` requests on it (``l4_short``
    clients: one). Every L4 connection has an id and remembers the pod that answered it
    first (it must never be another one later); a connection that breaks is recorded in
    ``l4_failures`` as (id, pod, error). ``no_new_l4()`` holds back new L4 connections and
    waits until every open one has been answered, so that at that instant each open L4
    connection is known by its pod: a failure can be attributed to a pod without guessing.
    """

    def __init__(self, ingress: tuple[str, int], cluster: tuple[str, int], l7_clients: int = 4, l4_short: int = 1,
                 l4_long: int = 2, l4_long_requests: int = 40, max_seconds: float = 90.0) -> None:
        self.ingress, self.cluster = ingress, cluster
        self.stop_at = time.monotonic() + max_seconds
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.sent = self.ok = 0
        self.failures: list[str] = []
        self.served: dict[str, int] = {}
        self.l7_answered: list[tuple[float, str]] = []        # (monotonic time it was sent, pod), answered ones
        self.l4_conns = self.l4_sent = self.l4_ok = 0
        self.l4_failures: list[tuple[int, str, str]] = []     # (connection id, pod that answered it or "", error)
        self.l4_open: dict[int, str] = {}                     # open connection id -> pod ("" until answered)
        self.l4_opened: list[tuple[float, str]] = []          # (monotonic time it was opened, pod), answered ones
        self.l4_gate = False                                  # no_new_l4() in force
        self.l4_unanswered = 0                                # open connections not answered yet
        self._ids = itertools.count(1)
        self.started = self.ended = 0.0
        self.threads = [threading.Thread(target=self._l7, daemon=True) for _ in range(l7_clients)]
        self.threads += [threading.Thread(target=self._l4, args=(1,), daemon=True) for _ in range(l4_short)]
        self.threads += [threading.Thread(target=self._l4, args=(l4_long_requests,), daemon=True)
                         for _ in range(l4_long)]

    def __enter__(self) -> "Load":
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        with self.cond:
            self.cond.notify_all()
        for t in self.threads:
            t.join(15)
        self.ended = time.monotonic()

    def running(self) -> bool:
        return not self.stopped.is_set() and time.monotonic() < self.stop_at

    @contextlib.contextmanager
    def no_new_l4(self):
        """While in force no L4 connection is opened; on entry every open one has been answered.
        Yields {connection id: pod} of the L4 connections open at that instant."""
        with self.cond:
            self.l4_gate = True
            settled = self.cond.wait_for(lambda: self.l4_unanswered == 0, 10)
            open_now = dict(self.l4_open)
        try:
            assert settled, "L4 connections still unanswered after 10 s"
            assert all(open_now.values()), open_now
            yield open_now
        finally:
            with self.cond:
                self.l4_gate = False
                self.cond.notify_all()

    def _l7(self) -> None:
        conn = None
        while self.running():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(*self.ingress, timeout=10)
                sent_at = time.monotonic()
                conn.request("GET", "/x", headers={"Host": "web.test"})
                resp = conn.getresponse()
                body = resp.read().decode()
                with self.lock:
                    self.sent += 1
                    if resp.status == 200:
                        self.ok += 1
                        who = body.split()[0]
                        self.served[who] = self.served.get(who, 0) + 1
                        self.l7_answered.append((sent_at, who))
                    else:
                        self.failures.append(f"{resp.status} {body.strip()[:80]}")
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.sent += 1
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.003)
        if conn is not None:
            conn.close()

    def _l4(self, requests_per_conn: int) -> None:
        while self.running():
            with self.cond:
                while self.l4_gate and self.running():
                    self.cond.wait(0.1)
                if not self.running():
                    return
                cid = next(self._ids)
                self.l4_conns += 1
                self.l4_unanswered += 1
                self.l4_open[cid] = ""
            opened, who, sock, buf = time.monotonic(), "", None, bytearray()
            try:
                sock = socket.create_connection(self.cluster, timeout=10)
                for _ in range(requests_per_conn):
                    with self.lock:
                        self.l4_sent += 1
                    sock.sendall(b"GET /l4 HTTP/1.1\r\nHost: x\r\n\r\n")
                    status, pod = read_answer(sock, buf)
                    if status != 200:
                        raise ConnectionError(f"status {status} from {pod}")
                    with self.cond:
                        self.l4_ok += 1
                        if not who:
                            who = self.l4_open[cid] = pod
                            self.l4_unanswered -= 1
                            self.l4_opened.append((opened, pod))
                            self.cond.notify_all()
                    if pod != who:
                        raise ConnectionError(f"answered by {pod} on a connection to {who}")
                    if not self.running():
                        break
                    time.sleep(0.005)
            except OSError as exc:
                with self.lock:
                    self.l4_failures.append((cid, who, f"{type(exc).__name__}: {exc}"))
            finally:
                if sock is not None:
                    sock.close()
                with self.cond:
                    if not who:
                        self.l4_unanswered -= 1
                    del self.l4_open[cid]
                    self.cond.notify_all()
            time.sleep(0.005)

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        return (self.sent + self.l4_sent) / self.elapsed

    def report(self, name: str) -> str:
        line = (f"{name}: {self.elapsed:.1f} s, {self.rate:.0f} req/s "
                f"(L7 {self.sent / self.elapsed:.0f}/s, L4 {self.l4_sent / self.elapsed:.0f}/s); "
                f"L7 sent {self.sent} ok {self.ok} failed {len(self.failures)}; "
                f"L4 requests sent {self.l4_sent} ok {self.l4_ok} failed {self.l4_sent - self.l4_ok}, "
                f"connections {self.l4_conns} broken {len(self.l4_failures)}; served by {self.served}")
        print(line)
        return line

    def check(self, name: str) -> None:
        """Report, then the bar every scenario shares: load held for a few seconds (a lower
        bound: time only grows), on both the L7 and the L4 path, MIN_L7_REQUESTS at least."""
        line = self.report(name)
        assert self.elapsed >= 2.5 and self.sent >= MIN_L7_REQUESTS and self.l4_ok, line


@pytest.fixture
def cluster(tmp_path):
    """Three web pods, a ClusterIP service and an Ingress, served by a meshproxy."""
    ips = [f"127.0.10.{i}" for i in (101, 102, 103)]
    pods = {f"web-{i}": Pod(f"web-{i}", ip) for i, ip in enumerate(ips, 1)}
    cip = "127.96.0.200"
    port = free_port(cip, hold=True)
    conf = tmp_path / "manifests"           # the watched folder (-f); tmp_path itself is not watched
    conf.mkdir()
    (conf / "svc.yaml").write_text(services_yaml(cip, port))
    (conf / "pods.yaml").write_text("".join(pod_yaml(n, p.ip, "app: web", p.port) for n, p in pods.items()))
    ingress_port = free_port(hold=True)
    mp = Meshproxy([str(conf)], "--no-health-checks", "--ingress-listen", f"127.0.0.1:{ingress_port}",
                   "--drain-timeout", "5")
    state = {"tmp": tmp_path, "dir": conf, "pods": pods, "mp": mp, "ingress": ("127.0.0.1", ingress_port),
             "cluster": (cip, port)}
    try:
        mp.start()
        yield state
    finally:
        mp.stop()
        state["mp"].stop()
        for p in state["pods"].values():
            p.stop(signal.SIGKILL)


def hold(load: Load, seconds: float, min_requests: int = 50, timeout: float = 60.0) -> None:
    """Keep the load running through ``seconds`` more, and at least ``min_requests`` more L7
    requests and some L4 ones (``timeout`` only bounds a hang)."""
    start, start_l4, until = load.sent, load.l4_ok, time.monotonic() + seconds
    wait_for(lambda: time.monotonic() >= until and load.sent - start >= min_requests and load.l4_ok > start_l4,
             timeout, interval=0.01, what=f"{seconds} s / {min_requests} requests of load")


def write_pods(c, pods: dict[str, tuple[str, bool]]) -> None:
    """The pods file: ``{name: (labels, terminating)}`` of pods in ``c["pods"]``."""
    text = "".join(pod_yaml(name, c["pods"][name].ip, labels, c["pods"][name].port, term)
                   for name, (labels, term) in pods.items())
    tmp = c["dir"] / ".pods.tmp"
    tmp.write_text(text)
    os.replace(tmp, c["dir"] / "pods.yaml")


def endpoint_pods(c) -> set[str]:
    return {e["pod"] for es in c["mp"].snapshot()["endpoints"] for e in es["endpoints"]}


def test_a_pod_killed_with_sigkill(cluster):
    c = cluster
    killed = "web-2"
    with Load(c["ingress"], c["cluster"], l4_long=3) as load:
        hold(load, 1.0)
        # Kill at an instant when a long-lived L4 connection is open to the victim (so a broken
        # connection really is exercised) and every open L4 connection is known by its pod.
        on_killed: set[int] = set()
        for _ in range(200):
            with load.no_new_l4() as open_now:
                on_killed = {cid for cid, pod in open_now.items() if pod == killed}
                if on_killed:
                    c["pods"][killed].stop(signal.SIGKILL)
                    break
            time.sleep(0.02)
        assert on_killed, "no L4 connection was ever open to the pod to kill"
        hold(load, 1.5, 300)
        # The pod is then removed from the manifests, as the kubelet/controller would.
        write_pods(c, {n: ("app: web", False) for n in c["pods"] if n != killed})
        wait_for(lambda: killed not in endpoint_pods(c), 20, what=f"{killed} removed")
        hold(load, 1.0)
    load.check("(a) SIGKILL")
    print(f"(a) L4 connections open to {killed} when killed: {len(on_killed)}, broken: {len(load.l4_failures)}")
    assert load.failures == [], load.failures[:5]
    # Only L4 connections that were open to the killed pod at that instant may break (each at
    # most once): none to another pod, none opened afterwards, none never answered.
    assert all(cid in on_killed and pod == killed for cid, pod, _ in load.l4_failures), load.l4_failures


def test_b_rolling_update(cluster):
    c = cluster
    current = {n: ("app: web", False) for n in c["pods"]}
    # One L4 connection per request: a pod exiting gracefully closes its idle keep-alive
    # connections, which a long-lived raw L4 client could not tell from a failure.
    with Load(c["ingress"], c["cluster"], l4_short=2, l4_long=0) as load:
        hold(load, 0.5)
        for i, old in enumerate(["web-1", "web-2", "web-3"], 1):
            new = f"web-new-{i}"
            c["pods"][new] = Pod(new, f"127.0.10.{110 + i}")
            current[new] = ("app: web", False)
            write_pods(c, current)
            hold(load, 0.4)
            current[old] = ("app: web", True)                       # terminating
            write_pods(c, current)
            hold(load, 0.4)
            c["pods"].pop(old).stop(signal.SIGTERM)                 # the pod exits gracefully
            del current[old]
            write_pods(c, current)
            hold(load, 0.4)
    load.check("(b) rolling update")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
    assert set(load.served) >= {"web-new-1", "web-new-2", "web-new-3"}


def test_c_selector_flip_blue_to_green(cluster):
    c = cluster
    green = {f"green-{i}": Pod(f"green-{i}", f"127.0.10.{120 + i}") for i in (1, 2)}
    c["pods"].update(green)
    pods = {n: ("app: web, version: blue", False) for n in c["pods"] if n.startswith("web")}
    pods.update({n: ("app: web, version: green", False) for n in green})
    write_pods(c, pods)
    svc = c["dir"] / "svc.yaml"
    svc.write_text(services_yaml(*c["cluster"], selector="app: web, version: blue"))
    wait_for(lambda: not any(p.startswith("green") for p in endpoint_pods(c)), 20, what="blue only")
    with Load(c["ingress"], c["cluster"]) as load:
        hold(load, 1.5, 150)
        svc.write_text(services_yaml(*c["cluster"], selector="app: web, version: green"))
        wait_for(lambda: endpoint_pods(c) == set(green), 20, what="green only")
        flipped = time.monotonic()            # the snapshot in force sends to green only
        hold(load, 1.5, 150)
    load.check("(c) blue/green")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
    new_l7 = [pod for t, pod in load.l7_answered if t > flipped]
    assert new_l7 and set(new_l7) <= set(green), set(new_l7)    # new requests only to green
    new_l4 = [pod for t, pod in load.l4_opened if t > flipped]
    assert new_l4 and set(new_l4) <= set(green), new_l4           # new L4 connections only to green


def reloads(mp: Meshproxy) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r'^meshproxy_config_reloads_total\{result="(\w+)"\} (\S+)$',
                                                   mp.metrics(), re.M)}


def test_d_ten_sighup_reloads(cluster):
    c = cluster
    # The file that changes is a symlink in the watched folder to a file outside it: inotify
    # watches the folder, so rewriting the target is seen by nothing but the SIGHUP re-read.
    # Each reload adds or removes a second Service and so its ClusterIP listener.
    hup = c["tmp"] / "hup"
    hup.mkdir()
    target = hup / "extra.yaml"
    target.write_text("# no second service yet\n")
    extra_ip = "127.96.0.201"
    extra = (extra_ip, free_port(extra_ip, hold=True))

    def rewrite(with_service: bool) -> None:
        tmp = hup / ".extra.tmp"
        tmp.write_text(service_yaml("web-extra", *extra) if with_service else "# no second service\n")
        os.replace(tmp, target)

    def listeners() -> set[str]:
        return {lst["address"] for lst in c["mp"].snapshot()["listeners"]}

    (c["dir"] / "extra.yaml").symlink_to(target)
    wait_for(lambda: reloads(c["mp"]).get("ok", 0) >= 2, 20, what="the symlink's file loaded")
    cluster_addr = "%s:%d" % c["cluster"]
    extra_addr = "%s:%d" % extra
    with Load(c["ingress"], c["cluster"]) as load:
        hold(load, 0.5)
        before = reloads(c["mp"])
        for i in range(10):
            present = i % 2 == 0
            v = c["mp"].snapshot()["version"]
            rewrite(present)
            time.sleep(0.05)                 # a watcher would have reloaded by now: nothing must change
            assert c["mp"].snapshot()["version"] == v, "the file change was applied without a SIGHUP"
            c["mp"].send(signal.SIGHUP)
            wait_for(lambda v=v: c["mp"].snapshot()["version"] > v, 20, what=f"reload {i + 1} applied")
            assert (extra_addr in listeners()) == present and cluster_addr in listeners()
            if present:                      # the new listener serves at once
                with socket.create_connection(extra, timeout=5) as s:
                    s.sendall(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert read_answer(s, bytearray()) in {(200, n) for n in c["pods"]}
            else:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(extra, timeout=5).close()
            hold(load, 0.25, 30)
        after = reloads(c["mp"])
    load.check("(d) SIGHUP x10")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
    # Exactly ten reloads, all good: one per SIGHUP and none from a file watcher.
    assert after.get("ok", 0) - before.get("ok", 0) == 10 and after.get("error", 0) == before.get("error", 0), \
        (before, after)


def test_e_binary_replaced_via_takeover(cluster):
    c = cluster
    old = c["mp"]
    new = Meshproxy([str(c["dir"])], "--no-health-checks", "--ingress-listen", f"{c['ingress'][0]}:{c['ingress'][1]}",
                    "--drain-timeout", "5", "--takeover", admin_port=old.admin_port)
    c["mp"] = new                              # the fixture stops both
    with Load(c["ingress"], c["cluster"]) as load:
        hold(load, 1.5, 150)
        new.start(wait=False)
        assert old.proc.wait(30) == 0          # the old process drained and left by itself
        new.wait_ready(20)
        hold(load, 1.5, 150)
    load.check("(e) takeover")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
