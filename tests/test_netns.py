"""The namespace cluster fixture itself (tests/netns.py): built from manifests, routed like a
cluster, isolated from the machine, and gone afterwards whatever happened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from netns import Cluster, netns_cluster, requires_netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MANIFESTS = """
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.77.0.21}, {type: InternalIP, address: "fd77::21"}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 10.77.0.22}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p1}
spec: {nodeName: n1}
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd44:1::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: other}
spec: {nodeName: n2}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: unscheduled}
status: {podIP: 10.244.9.9}
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _who(c: Cluster, where: str, addr: tuple[str, int]) -> str:
    s = c.connect(where, addr, 3)
    try:
        return s.recv(100).decode().strip()
    finally:
        s.close()


def _serve(c: Cluster, where: str, name: str):
    m = c.member(where)
    proc = c.start(where, sys.executable, os.path.join(ROOT, "tests", "netns_pod.py"), name,
                   *sum((["--addr", ip] for ip in m.ips), []), "--tcp", "7000")
    deadline = time.monotonic() + 10
    while "ready" not in proc.output():
        assert proc.alive() and time.monotonic() < deadline, proc.output()
        time.sleep(0.02)
    return proc


def test_members_come_from_the_manifests():
    requires_netns()
    with netns_cluster(MANIFESTS) as c:
        assert set(c.nodes) == {"n1", "n2"}
        assert c.nodes["n1"].ips == ("10.77.0.21", "fd77::21")
        assert set(c.pods) == {"default/p1", "other/p2"}        # a pod without a node has no place
        assert c.pods["default/p1"].ips == ("10.244.1.10", "fd44:1::10")
        assert c.ns("p1") == c.pods["default/p1"].ns and c.ns("other/p2") == c.pods["other/p2"].ns
        mine = {c.switch, c.client.ns} | {m.ns for m in c.nodes.values()} | {m.ns for m in c.pods.values()}
        assert mine <= _namespaces() and all(n.startswith(c.prefix + "-") for n in mine)
        # Nothing of it in the machine's own namespace.
        assert c.prefix not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


def test_pods_nodes_and_the_client_reach_each_other():
    requires_netns()
    with netns_cluster(MANIFESTS) as c:
        _serve(c, "p1", "p1")
        _serve(c, "other/p2", "p2")
        assert _who(c, "other/p2", ("10.244.1.10", 7000)) == "p1 10.244.2.10"   # pod to pod across nodes
        assert _who(c, "n2", ("10.244.1.10", 7000)) == "p1 10.77.0.22"           # node to a remote pod
        assert _who(c, "n1", ("fd44:1::10", 7000)) == "p1 fd77::21"              # IPv6, node to its own pod
        r = c.run("client", "ip", "route", check=True)
        assert "default" not in r.stdout                                         # outside: the nodes' LAN only
        with pytest.raises(OSError):
            c.connect("client", ("10.244.1.10", 7000), 1).close()
        c.route("client", "10.244.1.0/24", "10.77.0.21")
        assert _who(c, "client", ("10.244.1.10", 7000)) == "p1 10.77.0.100"


def test_processes_are_stopped_by_pid_and_captures_see_the_link():
    requires_netns()
    with netns_cluster(MANIFESTS) as c:
        proc = _serve(c, "p1", "p1")
        with c.capture("n1", "vp1", "tcp port 7000") as lines:
            _who(c, "n1", ("10.244.1.10", 7000))
        assert any("10.244.1.10.7000" in ln for ln in lines), lines
        assert c.stop(proc.pid, signal.SIGTERM) == 0
        assert not proc.alive()
        with pytest.raises(KeyError):
            c.stop(os.getpid())                   # only what it started


def test_torn_down_even_when_the_test_fails():
    requires_netns()
    made = set()
    with pytest.raises(RuntimeError, match="boom"):
        with netns_cluster(MANIFESTS) as c:
            proc = _serve(c, "p1", "p1")
            made = {c.switch, c.client.ns} | {m.ns for m in c.nodes.values()}
            raise RuntimeError("boom")
    assert made and not (made & _namespaces())
    assert not proc.alive()


def test_two_clusters_side_by_side_do_not_collide():
    requires_netns()
    with netns_cluster(MANIFESTS) as a, netns_cluster(MANIFESTS) as b:
        assert a.prefix != b.prefix
        _serve(a, "p1", "in-a")
        _serve(b, "p1", "in-b")
        assert _who(a, "n1", ("10.244.1.10", 7000)).startswith("in-a")
        assert _who(b, "n1", ("10.244.1.10", 7000)).startswith("in-b")
