"""L4 through the real ``meshproxy run`` process: manifests on disk, pods as pure-Python TCP
servers (threads) on 127.0.10.x port 0, clients with plain blocking sockets.

Each test starts its own proxy with a random admin port; ClusterIPs are random in 127.96/16
and ports are checked free, so runs in parallel with other suites do not collide. Node
addresses are the issue's 127.0.1.1 (node-a) and 127.0.1.2 (node-b).
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
from proc import Meshproxy, wait_for

NODE_A, NODE_B = "127.0.1.1", "127.0.1.2"


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


def free_port_on(host: str, lo: int = 20000, hi: int = 29999) -> int:
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port on {host}")


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
    port = free_port_on(cip)
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
    port = free_port_on(cip)
    write(str(tmp_path), [svc_doc("bulk", cip, port), pod_doc(src)])
    with proxy(str(tmp_path)) as mp:
        whoami(cip, port)                    # warm up: imports, first connection
        time.sleep(0.2)                      # (its pod thread stops on the reset)
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
    np_local = free_port_on(NODE_A, 30000, 32767)
    np_cluster = free_port_on(NODE_A, 30000, 32767)
    while (np_cluster == np_local or not _free(NODE_B, np_local) or not _free(NODE_B, np_cluster)
           or not _free("127.0.0.1", np_local)):
        np_local = free_port_on(NODE_A, 30000, 32767)
        np_cluster = free_port_on(NODE_A, 30000, 32767)
    cip1, cip2 = rand_cluster_ip(), rand_cluster_ip()
    write(str(tmp_path), [node_doc("node-a", NODE_A), node_doc("node-b", NODE_B)] +
          [pod_doc(p, node="node-a") for p in a] + [pod_doc(p, node="node-b") for p in b] +
          [svc_doc("local", cip1, free_port_on(cip1), "NodePort", np_local, etp="Local"),
           svc_doc("cluster", cip2, free_port_on(cip2), "NodePort", np_cluster, etp="Cluster")])
    with proxy(str(tmp_path), "node-a") as pa, proxy(str(tmp_path), "node-b") as pb:
        # Each node listens for NodePorts on its own address only.
        la = {x["address"] for x in pa.snapshot()["listeners"]}
        assert f"{NODE_A}:{np_local}" in la and f"{NODE_B}:{np_local}" not in la
        lb = {x["address"] for x in pb.snapshot()["listeners"]}
        assert f"{NODE_B}:{np_local}" in lb and f"{NODE_A}:{np_local}" not in lb
        # ... and nothing listens on any other address for it (with --node, not 127.0.0.1).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", np_local), timeout=2).close()
        # Local: only the pods of the node that took the connection.
        assert {whoami(NODE_A, np_local) for _ in range(30)} == {"a-0", "a-1"}
        assert {whoami(NODE_B, np_local) for _ in range(10)} == {"b-0"}
        # Cluster: every pod, from either node.
        assert {whoami(NODE_A, np_cluster) for _ in range(60)} == {"a-0", "a-1", "b-0"}
        assert {whoami(NODE_B, np_cluster) for _ in range(60)} == {"a-0", "a-1", "b-0"}


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def test_client_ip_affinity_and_pod_removal(tmp_path, pods):
    ps = [pods(f"web-{i}") for i in range(3)]
    cip = rand_cluster_ip()
    port = free_port_on(cip)
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
        # New connections avoid the removed pod within 2 s, and the client is pinned again.
        wait_for(lambda: whoami(cip, port, src=c0) != gone, timeout=2.0, what="affinity to move")
        assert len({whoami(cip, port, src=c0) for _ in range(10)}) == 1


def test_no_endpoints_closes_within_one_second(tmp_path):
    cip = rand_cluster_ip()
    port = free_port_on(cip)
    write(str(tmp_path), [svc_doc("empty", cip, port, selector={"app": "none"})])
    with proxy(str(tmp_path)):
        for _ in range(3):
            t0 = time.monotonic()
            try:
                s = socket.create_connection((cip, port), timeout=5)
            except ConnectionResetError:
                pass                       # the reset can overtake connect() itself: also closed
            else:
                with s:
                    assert closed_within(s, 1.0)
            assert time.monotonic() - t0 < 1.0


def test_removed_pod_drains_until_deadline_and_connect_failures_are_retried(tmp_path, pods):
    ps = [pods("web-0"), pods("web-1")]
    dead_ip = f"127.0.10.{random.randint(2, 250)}"
    dead = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "dead", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "tcp", "containerPort": free_port_on(dead_ip)}]}]},
            "status": {"podIP": dead_ip, "conditions": [{"type": "Ready", "status": "True"}]}}
    cip = rand_cluster_ip()
    port = free_port_on(cip)
    svc = svc_doc("web", cip, port)
    write(str(tmp_path), [svc, dead] + [pod_doc(p) for p in ps])
    with proxy(str(tmp_path), None, "--drain-timeout", "1.0", "--lb-policy", "round_robin") as mp:
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
            write(str(tmp_path), [svc, dead, pod_doc(ps[1])])       # web-0 removed
            t_removed = time.monotonic()
            wait_for(lambda: all(whoami(cip, port) == "web-1" for _ in range(5)), timeout=2.0,
                     what="new connections to avoid the removed pod")
            old.sendall(b"still here")
            old.settimeout(1)
            assert old.recv(100) == b"still here"          # works before the deadline
            assert closed_within(old, 3.0)                 # and is closed after it
            elapsed = time.monotonic() - t_removed
            assert 0.7 <= elapsed <= 3.5, elapsed


def test_reset_is_passed_on(tmp_path, pods):
    p = pods("web-0")
    cip = rand_cluster_ip()
    port = free_port_on(cip)
    write(str(tmp_path), [svc_doc("web", cip, port), pod_doc(p)])
    with proxy(str(tmp_path)):
        s = socket.create_connection((cip, port), timeout=5)
        s.makefile("rb").readline()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        # The pod side is reset too, not closed cleanly.
        wait_for(lambda: p.ends, timeout=2.0, what="the pod connection to end")
        assert p.ends == ["ConnectionResetError"], p.ends
