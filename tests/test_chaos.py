"""Chaos under load: nothing is lost when pods die, roll, flip, or the proxy reloads / upgrades.

Each scenario runs the real meshproxy process with pod processes (tests/podserver.py) on
127.0.10.x, a bounded load of idempotent HTTP requests through the Ingress (keep-alive
clients) and through a ClusterIP (one L4 connection per request), and reports
sent / succeeded / failed. The acceptance bar: 0 failed requests and 0 broken L4
connections that were not to a killed pod.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from proc import ROOT, Meshproxy, free_port, wait_for

POD_PORT = 18300


class Pod:
    def __init__(self, name: str, ip: str, port: int = POD_PORT, status: int = 200) -> None:
        self.name, self.ip, self.port = name, ip, port
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "podserver.py"), name, ip, str(port),
                                      str(status)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def pod_yaml(name: str, ip: str, labels: str, terminating: bool = False) -> str:
    meta_extra = ", deletionTimestamp: '2024-01-01T00:00:00Z'" if terminating else ""
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, labels: {{{labels}}}{meta_extra}}}
        spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {POD_PORT}}}]}}]}}
        status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
        ---
        """)


def services_yaml(cluster_ip: str, port: int, selector: str = "app: web") -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: web}}
        spec: {{clusterIP: {cluster_ip}, selector: {{{selector}}}, ports: [{{name: http, port: {port}, targetPort: http}}]}}
        ---
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {{name: web}}
        spec:
          rules:
          - host: web.test
            http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{name: http}}}}}}}}]}}
        """)


class Load:
    """Bounded closed-loop load: L7 keep-alive clients and L4 one-connection-per-request clients."""

    def __init__(self, ingress: tuple[str, int], cluster: tuple[str, int], l7_clients: int = 4, l4_clients: int = 2,
                 max_seconds: float = 60.0) -> None:
        self.ingress, self.cluster = ingress, cluster
        self.stop_at = time.monotonic() + max_seconds
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.sent = self.ok = 0
        self.failures: list[str] = []
        self.l4_sent = self.l4_ok = 0
        self.l4_failures: list[tuple[str, str]] = []     # (served-by or "", error)
        self.served: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._l7, daemon=True) for _ in range(l7_clients)]
        self.threads += [threading.Thread(target=self._l4, daemon=True) for _ in range(l4_clients)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(15)

    def running(self) -> bool:
        return not self.stopped.is_set() and time.monotonic() < self.stop_at

    def _l7(self) -> None:
        conn = None
        while self.running():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(*self.ingress, timeout=10)
                conn.request("GET", "/x", headers={"Host": "web.test"})
                resp = conn.getresponse()
                body = resp.read().decode()
                with self.lock:
                    self.sent += 1
                    if resp.status == 200:
                        self.ok += 1
                        who = body.split()[0]
                        self.served[who] = self.served.get(who, 0) + 1
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

    def _l4(self) -> None:
        while self.running():
            who = ""
            try:
                with socket.create_connection(self.cluster, timeout=10) as s:
                    s.sendall(b"GET /l4 HTTP/1.1\r\nHost: x\r\n\r\n")
                    data = b""
                    while b"\n" not in data.partition(b"\r\n\r\n")[2]:
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionError("closed before the answer")
                        data += chunk
                    who = data.partition(b"\r\n\r\n")[2].split()[0].decode()
                with self.lock:
                    self.l4_sent += 1
                    self.l4_ok += 1
            except OSError as exc:
                with self.lock:
                    self.l4_sent += 1
                    self.l4_failures.append((who, f"{type(exc).__name__}: {exc}"))
            time.sleep(0.005)

    def report(self, name: str) -> str:
        line = (f"{name}: L7 sent {self.sent} ok {self.ok} failed {len(self.failures)}; "
                f"L4 sent {self.l4_sent} ok {self.l4_ok} failed {len(self.l4_failures)}; served by {self.served}")
        print(line)
        return line


@pytest.fixture
def cluster(tmp_path):
    """Three web pods, a ClusterIP service and an Ingress, served by a meshproxy."""
    ips = [f"127.0.10.{i}" for i in (101, 102, 103)]
    pods = {f"web-{i}": Pod(f"web-{i}", ip) for i, ip in enumerate(ips, 1)}
    cip = "127.96.0.200"
    port = free_port(cip)
    (tmp_path / "svc.yaml").write_text(services_yaml(cip, port))
    (tmp_path / "pods.yaml").write_text("".join(pod_yaml(n, p.ip, "app: web") for n, p in pods.items()))
    ingress_port = free_port()
    mp = Meshproxy([str(tmp_path)], "--no-health-checks", "--ingress-listen", f"127.0.0.1:{ingress_port}",
                   "--drain-timeout", "5")
    mp.start()
    state = {"dir": tmp_path, "pods": pods, "mp": mp, "ingress": ("127.0.0.1", ingress_port), "cluster": (cip, port)}
    try:
        yield state
    finally:
        mp.stop()
        state["mp"].stop()
        for p in state["pods"].values():
            p.stop(signal.SIGKILL)


def wait_requests(load: Load, n: int, timeout: float = 20.0) -> None:
    start = load.sent
    wait_for(lambda: load.sent - start >= n and load.l4_sent > 0, timeout, what=f"{n} requests")


def write_pods(c, pods: dict[str, tuple[str, str, bool]]) -> None:
    text = "".join(pod_yaml(name, ip, labels, term) for name, (ip, labels, term) in pods.items())
    tmp = c["dir"] / ".pods.tmp"
    tmp.write_text(text)
    os.replace(tmp, c["dir"] / "pods.yaml")


def test_a_pod_killed_with_sigkill(cluster):
    c = cluster
    with Load(c["ingress"], c["cluster"]) as load:
        wait_requests(load, 200)
        c["pods"]["web-2"].stop(signal.SIGKILL)
        wait_requests(load, 300)
        # The pod is then removed from the manifests, as the kubelet/controller would.
        write_pods(c, {n: (p.ip, "app: web", False) for n, p in c["pods"].items() if n != "web-2"})
        wait_requests(load, 200)
    load.report("(a) SIGKILL")
    assert load.failures == [], load.failures[:5]
    # Only connections open to the killed pod at that instant may break: at most one per L4 client,
    # and none of them had been answered by another pod.
    assert len(load.l4_failures) <= 2 and all(who in ("", "web-2") for who, _ in load.l4_failures), load.l4_failures


def test_b_rolling_update(cluster):
    c = cluster
    current = {n: (p.ip, "app: web", False) for n, p in c["pods"].items()}
    with Load(c["ingress"], c["cluster"]) as load:
        wait_requests(load, 100)
        for i, old in enumerate(["web-1", "web-2", "web-3"], 1):
            new = f"web-new-{i}"
            c["pods"][new] = Pod(new, f"127.0.10.{110 + i}")
            current[new] = (c["pods"][new].ip, "app: web", False)
            write_pods(c, current)
            wait_requests(load, 50)
            current[old] = (current[old][0], "app: web", True)     # terminating
            write_pods(c, current)
            wait_requests(load, 50)
            c["pods"].pop(old).stop(signal.SIGTERM)                 # the pod exits gracefully
            del current[old]
            write_pods(c, current)
            wait_requests(load, 50)
    load.report("(b) rolling update")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
    assert set(load.served) >= {"web-new-1", "web-new-2", "web-new-3"}


def test_c_selector_flip_blue_to_green(cluster):
    c = cluster
    green = {f"green-{i}": Pod(f"green-{i}", f"127.0.10.{120 + i}") for i in (1, 2)}
    c["pods"].update(green)
    pods = {n: (p.ip, "app: web, version: blue", False) for n, p in c["pods"].items() if n.startswith("web")}
    pods.update({n: (p.ip, "app: web, version: green", False) for n, p in green.items()})
    write_pods(c, pods)
    svc = c["dir"] / "svc.yaml"
    svc.write_text(services_yaml(*c["cluster"], selector="app: web, version: blue"))
    wait_for(lambda: all(not e["pod"].startswith("green") for es in c["mp"].snapshot()["endpoints"] for e in es["endpoints"]),
             5, what="blue only")
    with Load(c["ingress"], c["cluster"]) as load:
        wait_requests(load, 150)
        svc.write_text(services_yaml(*c["cluster"], selector="app: web, version: green"))
        wait_for(lambda: {e["pod"] for es in c["mp"].snapshot()["endpoints"] for e in es["endpoints"]} == set(green),
                 5, what="green only")
        before = dict(load.served)
        wait_requests(load, 150)
    load.report("(c) blue/green")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
    after = {k: v - before.get(k, 0) for k, v in load.served.items()}
    assert {k for k, v in after.items() if v} <= set(green)      # new requests only to green


def test_d_ten_sighup_reloads(cluster):
    c = cluster
    with Load(c["ingress"], c["cluster"]) as load:
        wait_requests(load, 100)
        for _ in range(10):
            v = c["mp"].snapshot()["version"]
            c["mp"].send(signal.SIGHUP)
            wait_for(lambda v=v: c["mp"].snapshot()["version"] >= v, 3, what="reload")
            wait_requests(load, 30)
    load.report("(d) SIGHUP x10")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])


def test_e_binary_replaced_via_takeover(cluster):
    c = cluster
    old = c["mp"]
    new = Meshproxy([str(c["dir"])], "--no-health-checks", "--ingress-listen", f"{c['ingress'][0]}:{c['ingress'][1]}",
                    "--drain-timeout", "5", "--takeover", admin_port=old.admin_port)
    c["mp"] = new                              # the fixture stops both
    with Load(c["ingress"], c["cluster"]) as load:
        wait_requests(load, 150)
        new.start(wait=False)
        assert old.proc.wait(20) == 0          # the old process drained and left by itself
        new.wait_ready(10)
        wait_requests(load, 150)
    load.report("(e) takeover")
    assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
