"""The default ``--proxy-mode userspace`` with what loopback cannot show: a dual-stack Service
(an IPv4 and an IPv6 ClusterIP, both listened on) and a UDP Service, in a namespace cluster
(tests/netns.py) whose node has the ClusterIPs on its loopback interface, as a user-space
node proxy needs them."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from netns import netns_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MANIFESTS = """apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.77.0.11}, {type: InternalIP, address: "fd77::11"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v4only, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
status: {podIP: 10.244.1.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-dual, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
status: {podIP: 10.244.1.3, podIPs: [{ip: 10.244.1.3}, {ip: "fd44:1::3"}], conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ipFamilyPolicy: RequireDualStack
  clusterIPs: [10.96.0.10, "fd96::10"]
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: dns, port: 53, targetPort: dns, protocol: UDP}]
"""


def _who(c, where, addr):
    s = c.connect(where, addr, 3)
    try:
        return s.recv(100).decode().split()
    finally:
        s.close()


@pytest.mark.slow
def test_userspace_dual_stack_and_udp(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(MANIFESTS)
    with netns_cluster(MANIFESTS) as c:
        for key, m in c.pods.items():
            name = key.split("/")[1]
            c.start(key, sys.executable, os.path.join(ROOT, "tests", "netns_pod.py"), name,
                    *sum((["--addr", ip] for ip in m.ips), []), "--tcp", "8080", "--udp", "5353")
        c.run("node-a", "ip", "addr", "add", "10.96.0.10/32", "dev", "lo", check=True)
        c.run("node-a", "ip", "addr", "add", "fd96::10/128", "dev", "lo", "nodad", check=True)
        proxy = c.start("node-a", sys.executable, "-m", "meshproxy", "run", "-f", str(path), "--node", "node-a",
                        "--service-cidr", "10.96.0.0/16,fd96::/112", "--admin-listen", "127.0.0.1:9901",
                        "--no-health-checks", cwd=ROOT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if c.http_get("node-a", "127.0.0.1", 9901, "/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert proxy.alive() and time.monotonic() < deadline, proxy.output()
            time.sleep(0.05)
        # Both ClusterIPs are listened on; user space may cross families, so both pods answer both.
        v4 = {_who(c, "node-a", ("10.96.0.10", 80))[0] for _ in range(30)}
        v6 = {_who(c, "node-a", ("fd96::10", 80))[0] for _ in range(30)}
        assert v4 == {"web-v4only", "web-dual"} and v6 == {"web-v4only", "web-dual"}, (v4, v6)
        u = c.socket("node-a", socket.AF_INET6, socket.SOCK_DGRAM)
        u.settimeout(3)
        try:
            u.connect(("fd96::10", 53))
            u.send(b"q")
            name, _peer, data = u.recv(200).decode().split()
            assert data == "q" and name in ("web-v4only", "web-dual")
        finally:
            u.close()
