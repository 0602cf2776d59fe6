"""L4 through the real ``meshproxy run`` process: manifests on disk, pods as pure-Python TCP
servers (threads) on 127.0.10.x port 0, clients with plain blocking sockets.

Each test starts its own proxy; ClusterIPs are random in 127.96/16, node addresses random in
127.0.1/24, and every port is chosen by the kernel (conftest.free_port, held until the test
ends) or, for NodePorts, by the proxy's allocator and read back from /debug/snapshot, so runs
in parallel with other suites do not collide. Timer semantics (drain deadlines, idle and
connect timeouts) are tested on a fake clock in test_l4_unit.py; here only that they are
wired, with bounds that do not depend on how busy the machine is.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pytest
import yaml
from proc import Meshproxy, free_port, wait_for


# -- pods ----------------------------------------------------------------------------------------

class Pod:
    """A pod: greets with ``name\\n``, then echoes; mode "source" streams ``source_bytes``
    instead. Each connection gets a thread; everything is closed by ``stop()``."""

    def __init__(self, name: str, mode: str = "echo", source_bytes: int = 0) -> None:
        self.name, self.mode, self.source_bytes = name, mode, source_bytes
        self.ip = f"127.0.10.{random.randint(2, 250)}"
        self.sock = socket.socket()
        self.sock.bind((self.ip, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.sent = 0
        self.ends: list[str] = []             # how each echo connection ended: "eof" or an error
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(20)
        try:
            c.sendall(self.name.encode() + b"\n")
            if self.mode == "source":
                chunk = b"x" * 65536
                mine = 0
                while mine < self.source_bytes:
                    c.sendall(chunk)
                    mine += len(chunk)
                    self.sent += len(chunk)
                c.shutdown(socket.SHUT_WR)
                return
            while True:
                data = c.recv(65536)
                if not data:
                    self.ends.append("eof")
                    c.shutdown(socket.SHUT_WR)      # half-close answered with our FIN
                    return
                c.sendall(data)
        except OSError as exc:
            self.ends.append(type(exc).__name__)

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.close()
                except OSError:
                    pass


@pytest.fixture
def pods():
    made: list[Pod] = []

    def make(*args, **kw) -> Pod:
        p = Pod(*args, **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.stop()


# -- manifests ------------------------------------------------------------------------------------

def rand_cluster_ip() -> str:
    return f"127.96.{random.randint(1, 250)}.{random.randint(2, 250)}"


def service_port(host: str) -> int:
    """A port for a Service on ``host``, held until the test ends (the proxy binds beside it)."""
    return free_port(host, hold=True)


def node_port(mp: Meshproxy, service: str) -> int:
    """The NodePort the proxy's allocator gave ``service``: the manifests leave it out, since a
    number chosen here in 30000-32767 (below the kernel's ephemeral range) could be taken."""
    return next(int(x["address"].rsplit(":", 1)[1]) for x in mp.snapshot()["listeners"]
                if x["backend"] == f"default/{service}:tcp" and x["scope"] == "node")


def pod_doc(p: Pod, ready: bool = True, node: str | None = None) -> dict:
    spec: dict = {"containers": [{"name": "c", "ports": [{"name": "tcp", "containerPort": p.port}]}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": "default", "labels": {"app": "web"}},
            "spec": spec,
            "status": {"podIP": p.ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def svc_doc(name: str, cip: str, port: int, type_: str = "ClusterIP", node_port: int | None = None,
            etp: str | None = None, affinity: bool = False, selector: dict | None = None) -> dict:
    p: dict = {"name": "tcp", "port": port, "targetPort": "tcp"}
    if node_port:
        p["nodePort"] = node_port
    spec: dict = {"type": type_, "clusterIP": cip, "selector": selector or {"app": "web"}, "ports": [p]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def node_doc(name: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def write(dir_: str, docs: list[dict]) -> None:
    """Replace the manifests atomically (the proxy never sees half a file)."""
    path = os.path.join(dir_, "objects.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump_all(docs, f)
    os.replace(tmp, path)


def proxy(dir_: str, node: str | None = None, *flags: str) -> Meshproxy:
    args = list(flags) + ["--no-health-checks"]
    if node:
        args += ["--node", node]
    return Meshproxy([dir_], *args)


# -- clients --------------------------------------------------------------------------------------

def whoami(host: str, port: int, src: str | None = None) -> str:
    with socket.create_connection((host, port), timeout=5, source_address=(src, 0) if src else None) as s:
        f = s.makefile("rb")
        return f.readline().decode().strip()


def closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- tests ----------------------------------------------------------------------------------------


def test_cluster_ip_spreads_over_ready_pods_and_echoes_through_half_close(tmp_path, pods):
    ps = [pods(f"web-{i}") for i in range(4)]
    cip = rand_cluster_ip()
    port = service_port(cip)
    write(str(tmp_path), [svc_doc("web", cip, port)] + [pod_doc(p, ready=(i < 3)) for i, p in enumerate(ps)])
    with proxy(str(tmp_path)) as mp:
        names = [whoami(cip, port) for _ in range(300)]
        counts = {p.name: names.count(p.name) for p in ps}
        assert counts["web-3"] == 0 and ps[3].accepted == 0, counts
        assert all(50 <= counts[f"web-{i}"] <= 150 for i in range(3)), counts

        payload = os.urandom(1 << 20)
        with socket.create_connection((cip, port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline().strip() in (b"web-0", b"web-1", b"web-2")
            sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            sender.start()
            echoed = f.read()                # to EOF: the pod's FIN, passed on by the proxy
            sender.join(10)
        assert echoed == payload
        m = mp.metrics()
        assert 'meshproxy_l4_connections_total{namespace="default",port="tcp",service="web"} 301.0' in m


def test_slow_reader_keeps_proxy_memory_bounded(tmp_path, pods):
    total = 48 << 20
    src = pods("src", mode="source", source_bytes=total)
    cip = rand_cluster_ip()
    port = service_port(cip)
    write(str(tmp_path), [svc_doc("bulk", cip, port), pod_doc(src)])
    with proxy(str(tmp_path)) as mp:
        whoami(cip, port)                    # warm up: imports, first connection
        wait_for(lambda: src.ends, 20, what="the pod to see the warm-up connection end")
        src.sent = 0
        base = rss_kib(mp.proc.pid)
        with socket.create_connection((cip, port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            time.sleep(0.6)                  # read nothing while the pod pushes as fast as it can
            grown = rss_kib(mp.proc.pid) - base
            stalled = src.sent
            print(f"stalled reader: proxy RSS +{grown} KiB, pod sent {stalled >> 20} MiB before being pushed back")
            assert grown < 16 * 1024, f"proxy RSS grew {grown} KiB with a stalled reader"
            assert stalled < 24 << 20, f"the pod was not pushed back: {stalled} bytes sent"
            got = 0
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        assert got == total + len("src\n")
        assert rss_kib(mp.proc.pid) - base < 16 * 1024


def test_two_nodes_external_traffic_policy_local_and_cluster(tmp_path, pods):
    a = [pods("a-0"), pods("a-1")]
    b = [pods("b-0")]
    node_a, node_b = random.sample([f"127.0.1.{i}" for i in range(2, 251)], 2)
    cip1, cip2 = rand_cluster_ip(), rand_cluster_ip()
    write(str(tmp_path), [node_doc("node-a", node_a), node_doc("node-b", node_b)] +
          [pod_doc(p, node="node-a") for p in a] + [pod_doc(p, node="node-b") for p in b] +
          [svc_doc("local", cip1, service_port(cip1), "NodePort", etp="Local"),
           svc_doc("cluster", cip2, service_port(cip2), "NodePort", etp="Cluster")])
    with proxy(str(tmp_path), "node-a") as pa, proxy(str(tmp_path), "node-b") as pb:
        # Both proxies read the same manifests: the allocator gives the same numbers.
        np_local, np_cluster = node_port(pa, "local"), node_port(pa, "cluster")
        assert (node_port(pb, "local"), node_port(pb, "cluster")) == (np_local, np_cluster)
        # Each node listens for NodePorts on its own address only.
        la = {x["address"] for x in pa.snapshot()["listeners"]}
        assert f"{node_a}:{np_local}" in la and f"{node_b}:{np_local}" not in la
        lb = {x["address"] for x in pb.snapshot()["listeners"]}
        assert f"{node_b}:{np_local}" in lb and f"{node_a}:{np_local}" not in lb
        # ... and nothing listens on any other address for it (with --node, not 127.0.0.1).
        assert f"127.0.0.1:{np_local}" not in la | lb
        # Local: only the pods of the node that took the connection.
        assert {whoami(node_a, np_local) for _ in range(30)} == {"a-0", "a-1"}
        assert {whoami(node_b, np_local) for _ in range(10)} == {"b-0"}
        # Cluster: every pod, from either node.
        assert {whoami(node_a, np_cluster) for _ in range(60)} == {"a-0", "a-1", "b-0"}
        assert {whoami(node_b, np_cluster) for _ in range(60)} == {"a-0", "a-1", "b-0"}


def test_client_ip_affinity_and_pod_removal(tmp_path, pods):
    ps = [pods(f"web-{i}") for i in range(3)]
    cip = rand_cluster_ip()
    port = service_port(cip)
    svc = svc_doc("sticky", cip, port, affinity=True)
    # round_robin: without the affinity table every client would go round the pods, so a
    # client that stays on one pod shows the table at work (random's first pick is a hash of
    # the client address and would stay put by itself).
    svc["metadata"]["annotations"] = {"meshproxy.dev/lb-policy": "round_robin"}
    write(str(tmp_path), [svc] + [pod_doc(p) for p in ps])
    with proxy(str(tmp_path)):
        clients = [f"127.0.50.{random.randint(2, 250)}" for _ in range(4)]
        pinned = {}
        for c in clients:
            got = {whoami(cip, port, src=c) for _ in range(10)}
            assert len(got) == 1, (c, got)
            pinned[c] = got.pop()
        c0 = clients[0]
        gone = pinned[c0]
        write(str(tmp_path), [svc] + [pod_doc(p) for p in ps if p.name != gone])
        # New connections avoid the removed pod once the change is read, and the client is
        # pinned again.
        wait_for(lambda: whoami(cip, port, src=c0) != gone, timeout=20, what="affinity to move")
        assert len({whoami(cip, port, src=c0) for _ in range(10)}) == 1


def test_no_endpoints_closes_at_once(tmp_path):
    """Closed on accept, not by a timer: the proxy's idle and connect timeouts are set far above
    the 10 s this test waits at most, so nothing but the accept path can have closed them."""
    cip = rand_cluster_ip()
    port = service_port(cip)
    write(str(tmp_path), [svc_doc("empty", cip, port, selector={"app": "none"})])
    with proxy(str(tmp_path), None, "--idle-timeout", "3600", "--connect-timeout", "3600") as mp:
        for _ in range(3):
            try:
                s = socket.create_connection((cip, port), timeout=10)
            except ConnectionResetError:
                pass                       # the reset can overtake connect() itself: also closed
            else:
                with s:
                    assert closed_within(s, 10)
        assert 'meshproxy_l4_no_endpoints_total{namespace="default",port="tcp",service="empty"} 3.0' in mp.metrics()


def test_removed_pod_drains_until_deadline_and_connect_failures_are_retried(tmp_path, pods):
    ps = [pods("web-0"), pods("web-1")]
    dead_ip = f"127.0.10.{random.randint(2, 250)}"
    dead = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "dead", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "tcp", "containerPort": service_port(dead_ip)}]}]},
            "status": {"podIP": dead_ip, "conditions": [{"type": "Ready", "status": "True"}]}}
    cip = rand_cluster_ip()
    port = service_port(cip)
    svc = svc_doc("web", cip, port)
    write(str(tmp_path), [svc, dead] + [pod_doc(p) for p in ps])
    # The drain timeout is 20 times what the steps between the removal and the echo below take
    # on a quiet machine (~0.1 s), so "it still works before the deadline" holds on a busy one.
    drain = 2.0
    with proxy(str(tmp_path), None, "--drain-timeout", str(drain), "--lb-policy", "round_robin") as mp:
        # A third of the first choices hit the dead pod: every connection still works.
        names = [whoami(cip, port) for _ in range(12)]
        assert set(names) == {"web-0", "web-1"}, names
        assert 'meshproxy_l4_connect_failures_total{namespace="default",port="tcp",service="web"} 0.0' not in mp.metrics()

        old = None
        while old is None:
            s = socket.create_connection((cip, port), timeout=5)
            if s.makefile("rb").readline().strip() == b"web-0":
                old = s
            else:
                s.close()
        with old:
            t0 = time.monotonic()                          # before the change: the deadline comes later
            write(str(tmp_path), [svc, dead, pod_doc(ps[1])])       # web-0 removed
            wait_for(lambda: all(whoami(cip, port) == "web-1" for _ in range(5)), timeout=20,
                     what="new connections to avoid the removed pod")
            old.sendall(b"still here")
            old.settimeout(10)
            assert old.recv(100) == b"still here"          # works before the deadline
            assert closed_within(old, 30)                  # and is reset after it ...
            assert time.monotonic() - t0 >= drain          # ... not before (time only grows)
            wait_for(lambda: "drain deadline passed" in mp.output(), 10, what="the drain logged")


def test_reset_is_passed_on(tmp_path, pods):
    p = pods("web-0")
    cip = rand_cluster_ip()
    port = service_port(cip)
    write(str(tmp_path), [svc_doc("web", cip, port), pod_doc(p)])
    with proxy(str(tmp_path)):
        s = socket.create_connection((cip, port), timeout=5)
        s.makefile("rb").readline()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        # The pod side is reset too, not closed cleanly.
        wait_for(lambda: p.ends, timeout=2.0, what="the pod connection to end")
        assert p.ends == ["ConnectionResetError"], p.ends
