"""A Kubernetes-shaped cluster made of Linux network namespaces, for tests that need real
routing, NAT and nftables without touching the machine's own network.

Built from the same manifests meshproxy reads: every ``Node`` (``status.addresses``
InternalIP, IPv4 and optionally IPv6) becomes a namespace, every ``Pod`` with a
``spec.nodeName`` and ``status.podIP`` / ``podIPs`` becomes a namespace behind its node, and
one more namespace is the client outside the cluster::

    client ─┐                        ┌─ pod   (eth0: podIP/32, default via 169.254.1.1 / fe80::1)
            ├── switch (bridge br0) ─┤  node  (eth0: InternalIP/24 [/64]; one veth per pod;
    node ───┘   10.77.0.1 / fd77::1  └─ ...    routes to the other nodes' pods via their node)

- the bridge lives in a namespace of its own (``<prefix>-sw``) and holds the nodes' default
  gateway; the node namespaces route (ip_forward on) and reach their pods over point-to-point
  veths (the pod's gateway 169.254.1.1 is answered by proxy ARP, fe80::1 is an address of the
  node's end), so every
  packet between pods, and between a pod and anything else, passes the node's netfilter
  hooks — as with most CNI plugins;
- pods of another node are reached through that node (a route per pod address), the outside
  client reaches only the nodes' addresses (``Cluster.route`` adds more);
- every name starts with a random prefix (``mp<6 hex>``), so parallel runs never collide;
  nothing is created in the machine's own namespace (veth pairs are made inside the switch or
  node namespace and moved to their peer namespace in the same call).

API (``where`` is a node name, ``"namespace/pod"`` or a pod name, or ``"client"``):

- ``run(where, *argv)`` runs a command inside and returns the CompletedProcess;
- ``start(where, *argv)`` starts a long-running process inside (``Proc``: ``.pid``,
  ``.output()``); ``stop(proc_or_pid, sig)`` stops one, by pid; ``close`` stops them all;
- ``socket(where, family, type)`` makes a socket inside (the calling thread switches namespace
  with setns(2) in a short-lived helper thread; the socket stays in its namespace), so test
  code talks from inside with ordinary Python sockets; ``connect`` and ``http_get`` build on it;
- ``capture(where, iface, bpf)`` runs tcpdump on a link for the duration of a ``with`` block;
- ``close()`` (also on error, and the context manager's exit) stops every process it started,
  by pid, and deletes every namespace it made.

``requires_netns()`` skips a test with the reason when the machine cannot do this (not root,
no ``ip``, no network namespaces), and fails it instead when the ``CI`` environment variable
is set: in CI nothing an acceptance test relies on may be skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import yaml
from conftest import requires, unavailable  # requires: re-exported to the netns tests (__all__)

__all__ = ["Cluster", "Proc", "requires", "requires_netns", "netns_cluster", "SWITCH_V4", "SWITCH_V6"]

SWITCH_V4 = ipaddress.ip_network("10.77.0.0/24")
SWITCH_V6 = ipaddress.ip_network("fd77::/64")
GATEWAY_V4, GATEWAY_V6 = "10.77.0.1", "fd77::1"
CLIENT_V4, CLIENT_V6 = "10.77.0.100", "fd77::100"
POD_GW_V4, POD_GW_V6 = "169.254.1.1", "fe80::1"
_CLONE_NEWNET = 0x40000000


# The one "needs X" helper (tests/conftest.py): skip with the reason, fail in CI.
_fail_or_skip = unavailable


_probe: str | None = None


def requires_netns() -> None:
    """Skip (fail in CI) unless this process may create network namespaces."""
    global _probe
    if _probe is None:
        if os.geteuid() != 0:
            _probe = "network namespaces need root"
        elif shutil.which("ip") is None:
            _probe = "the ip program (iproute2) is not installed"
        else:
            name = f"mp{secrets.token_hex(3)}-probe"
            r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if r.returncode != 0:
                _probe = f"cannot create a network namespace: {r.stderr.strip()}"
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                _probe = ""
    if _probe:
        _fail_or_skip(_probe)


@dataclass
class Proc:
    where: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Member:
    ns: str                               # network namespace name
    ips: tuple[str, ...]                  # IPv4 first when it has one
    node: str | None = None               # pods: their node
    ifindex: int = 0                      # pods: number of the node-side veth
    extra: dict = field(default_factory=dict)


class Cluster:
    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"mp{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-sw"
        self.nodes: dict[str, Member] = {}
        self.pods: dict[str, Member] = {}     # "namespace/name" -> member
        self.client = Member(f"{self.prefix}-client", (CLIENT_V4, CLIENT_V6))
        self._namespaces: list[str] = []
        self._procs: list[Proc] = []
        self._tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self._closed = False

    # -- building ----------------------------------------------------------------------------

    def _ip(self, *args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["ip", *(("-n", ns) if ns else ()), *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
        return r

    def _sysctl(self, ns: str, *settings: str) -> None:
        for s in settings:
            r = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", s], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"sysctl {s} in {ns}: {r.stderr.strip()}")

    def _add_ns(self, name: str) -> None:
        self._ip("netns", "add", name)
        self._namespaces.append(name)
        self._ip("link", "set", "lo", "up", ns=name)
        # IPv6 addresses usable at once (no duplicate address detection on private links).
        self._sysctl(name, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    def build(self, manifests: str) -> Cluster:
        """Namespaces for the Nodes and Pods in ``manifests`` (YAML text), plus the switch and
        the outside client."""
        nodes, pods = [], []
        for doc in yaml.safe_load_all(manifests):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Node":
                addrs = [a["address"] for a in doc.get("status", {}).get("addresses", []) if a.get("type") == "InternalIP"]
                nodes.append((doc["metadata"]["name"], addrs))
            elif doc.get("kind") == "Pod":
                meta, status = doc["metadata"], doc.get("status", {})
                ips = [i["ip"] for i in status.get("podIPs", []) if "ip" in i] or ([status["podIP"]] if status.get("podIP") else [])
                node = doc.get("spec", {}).get("nodeName")
                if ips and node:
                    pods.append((f"{meta.get('namespace', 'default')}/{meta['name']}", node, ips))
        self._add_ns(self.switch)
        self._ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        self._ip("link", "set", "br0", "up", ns=self.switch)
        self._ip("addr", "add", f"{GATEWAY_V4}/24", "dev", "br0", ns=self.switch)
        self._ip("addr", "add", f"{GATEWAY_V6}/64", "dev", "br0", "nodad", ns=self.switch)
        for i, (name, addrs) in enumerate(nodes):
            ns = f"{self.prefix}-n{i}"
            self.nodes[name] = Member(ns, tuple(sorted(addrs, key=lambda a: ":" in a)))
            self._add_ns(ns)
            self._attach(ns, f"n{i}", self.nodes[name].ips, default=True)
            self._sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                         "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        self._add_ns(self.client.ns)
        self._attach(self.client.ns, "c0", self.client.ips, default=False)
        counters: dict[str, int] = {}
        for key, node, ips in pods:
            if node not in self.nodes:
                continue
            counters[node] = counters.get(node, 0) + 1
            ns = f"{self.prefix}-p{len(self.pods)}"
            m = Member(ns, tuple(sorted(ips, key=lambda a: ":" in a)), node, counters[node])
            self.pods[key] = m
            self._add_pod(m)
        # Every node reaches every other node's pods through that node.
        for name, n in self.nodes.items():
            for p in self.pods.values():
                if p.node == name:
                    continue
                peer = self.nodes[p.node]
                for ip in p.ips:
                    via = next((a for a in peer.ips if (":" in a) == (":" in ip)), None)
                    if via is not None and any((":" in a) == (":" in ip) for a in n.ips):
                        self._ip("route", "add", ip, "via", via, ns=n.ns)
        return self

    def _attach(self, ns: str, port: str, ips: tuple[str, ...], default: bool) -> None:
        """A veth from the switch's bridge to ``ns`` (as eth0) with ``ips``."""
        self._ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.switch)
        self._ip("link", "set", port, "master", "br0", "up", ns=self.switch)
        self._ip("link", "set", "eth0", "up", ns=ns)
        for ip in ips:
            v6 = ":" in ip
            self._ip("addr", "add", f"{ip}/{64 if v6 else 24}", "dev", "eth0", *(("nodad",) if v6 else ()), ns=ns)
        if default:
            self._ip("route", "add", "default", "via", GATEWAY_V4, ns=ns)
            if any(":" in ip for ip in ips):
                self._ip("-6", "route", "add", "default", "via", GATEWAY_V6, ns=ns)

    def _add_pod(self, m: Member) -> None:
        node = self.nodes[m.node]
        self._add_ns(m.ns)
        host = f"vp{m.ifindex}"
        self._ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", m.ns, ns=node.ns)
        self._ip("link", "set", host, "up", ns=node.ns)
        # The pod's IPv4 gateway is answered by proxy ARP (no address on the node's end, as
        # with Calico), so traffic the node masquerades towards a pod carries the node's
        # address; the IPv6 gateway is a link-local address of the node's end.
        self._sysctl(node.ns, f"net.ipv4.conf.{host}.proxy_arp=1", f"net.ipv4.neigh.{host}.proxy_delay=0")
        self._ip("addr", "add", f"{POD_GW_V6}/64", "dev", host, "nodad", ns=node.ns)
        self._ip("link", "set", "eth0", "up", ns=m.ns)
        for ip in m.ips:
            v6 = ":" in ip
            self._ip("addr", "add", f"{ip}/{128 if v6 else 32}", "dev", "eth0", *(("nodad",) if v6 else ()), ns=m.ns)
            src = next((a for a in node.ips if (":" in a) == v6), None)
            self._ip(*(("-6",) if v6 else ()), "route", "add", ip, "dev", host, *(("src", src) if src else ()), ns=node.ns)
        self._ip("route", "add", POD_GW_V4, "dev", "eth0", "scope", "link", ns=m.ns)
        self._ip("route", "add", "default", "via", POD_GW_V4, "dev", "eth0", ns=m.ns)
        if any(":" in ip for ip in m.ips):
            self._ip("-6", "route", "add", "default", "via", POD_GW_V6, "dev", "eth0", ns=m.ns)

    # -- using --------------------------------------------------------------------------------

    def ns(self, where: str) -> str:
        if where == "client":
            return self.client.ns
        if where == "switch":
            return self.switch
        if where in self.nodes:
            return self.nodes[where].ns
        if where in self.pods:
            return self.pods[where].ns
        if f"default/{where}" in self.pods:
            return self.pods[f"default/{where}"].ns
        raise KeyError(f"no node, pod or client called {where!r}")

    def member(self, where: str) -> Member:
        if where == "client":
            return self.client
        return self.nodes.get(where) or self.pods.get(where) or self.pods[f"default/{where}"]

    def run(self, where: str, *argv: str, check: bool = False, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(["ip", "netns", "exec", self.ns(where), *argv], capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{where}: {' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def start(self, where: str, *argv: str, env: dict | None = None, cwd: str | None = None) -> Proc:
        """Start ``argv`` inside ``where``; its output goes to a log file (``Proc.output``).
        ``ip netns exec`` execs the program, so the pid is the program's own."""
        fd, path = tempfile.mkstemp(prefix="proc-", suffix=".log", dir=self._tmp)
        with os.fdopen(fd, "wb") as log:
            popen = subprocess.Popen(["ip", "netns", "exec", self.ns(where), *argv], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        proc = Proc(where, list(argv), popen, path)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc | int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` to one process this cluster started (by pid) and wait for it."""
        p = proc if isinstance(proc, Proc) else next((x for x in self._procs if x.pid == proc), None)
        if p is None:
            raise KeyError(f"pid {proc} was not started by this cluster")
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            try:
                return p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                return p.popen.wait(5)
        return p.popen.returncode

    def socket(self, where: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket inside ``where``'s network namespace."""
        path = f"/run/netns/{self.ns(where)}"
        out: list = []

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(path, os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({path}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                out.append(socket.socket(family, type))
            except BaseException as exc:     # handed to the caller's thread
                out.append(exc)

        t = threading.Thread(target=make, name=f"setns-{where}")
        t.start()
        t.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def connect(self, where: str, addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        s = self.socket(where, socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except BaseException:
            s.close()
            raise
        return s

    def http_get(self, where: str, host: str, port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = self.connect(where, (host, port), timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    @contextlib.contextmanager
    def capture(self, where: str, iface: str = "eth0", bpf: str = "") -> Iterator[list[str]]:
        """tcpdump on ``iface`` inside ``where`` while the block runs; the list it yields is
        filled with tcpdump's text lines (``-n``) when the block ends."""
        requires("tcpdump")
        path = os.path.join(self._tmp, f"cap-{secrets.token_hex(3)}.pcap")
        proc = self.start(where, "tcpdump", "-Z", "root", "--immediate-mode", "-i", iface, "-n", "-U", "-w", path, *([bpf] if bpf else []))
        lines: list[str] = []
        deadline = time.monotonic() + 5
        while "listening on" not in proc.output() and proc.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            yield lines
        finally:
            time.sleep(0.1)              # let the last packets reach the file
            self.stop(proc, signal.SIGINT)
            r = subprocess.run(["tcpdump", "-n", "-r", path], capture_output=True, text=True)
            lines.extend(r.stdout.splitlines())

    def route(self, where: str, dest: str, via: str) -> None:
        self._ip(*(("-6",) if ":" in dest else ()), "route", "add", dest, "via", via, ns=self.ns(where))

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(5)
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def netns_cluster(manifests: str, prefix: str | None = None) -> Iterator[Cluster]:
    """``with netns_cluster(yaml_text) as cluster:`` — built, and torn down whatever happens."""
    requires_netns()
    cluster = Cluster(prefix)
    try:
        cluster.build(manifests)
        yield cluster
    finally:
        cluster.close()
