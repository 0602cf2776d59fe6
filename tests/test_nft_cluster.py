"""``--proxy-mode nftables`` on a cluster of network namespaces (tests/netns.py).

Two nodes, each running ``meshproxy run --proxy-mode nftables --node <name>`` in its own
namespace, pods behind them, and a client outside the cluster. What a user sees is checked
from the pods and the client with real sockets: which pod answered and which client address
it saw. The tests run in file order and share one cluster: the last ones kill, restart and
clean up the proxy of node-b.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import dns.message
import dns.query
import pytest

from netns import Cluster, netns_cluster, requires

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN = ("127.0.0.1", 9901)
CIDR = "10.96.0.0/16,fd96::/112"
WEB = ("web-a1", "web-a2", "web-b1")


def _pod(name: str, node: str, ip4: str, ip6: str, labels: str, ready: bool = True) -> str:
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{{labels}}}}}
spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}
status: {{podIP: {ip4}, podIPs: [{{ip: {ip4}}}, {{ip: "{ip6}"}}], conditions: [{{type: Ready, status: "{ready}"}}]}}
"""


def manifests(*, a1: bool = True, a3_web: bool = False, dns: tuple[str, ...] = ("dns-a", "dns-b")) -> str:
    nodes = """apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.77.0.11}, {type: InternalIP, address: "fd77::11"}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.77.0.12}, {type: InternalIP, address: "fd77::12"}]}
"""
    pods = [
        _pod("web-a1", "node-a", "10.244.1.2", "fd44:1::2", "app: web, zone: a") if a1 else "",
        _pod("web-a2", "node-a", "10.244.1.3", "fd44:1::3", "app: web, zone: a"),
        _pod("web-a3", "node-a", "10.244.1.4", "fd44:1::4", "app: web, zone: a" if a3_web else "app: spare"),
        _pod("web-b1", "node-b", "10.244.2.2", "fd44:2::2", "app: web"),
        _pod("web-nr", "node-b", "10.244.2.3", "fd44:2::3", "app: web", ready=False),
        _pod("client-b", "node-b", "10.244.2.9", "fd44:2::9", "app: client"),
        _pod("dns-a", "node-a", "10.244.1.53", "fd44:1::53", "app: dns" if "dns-a" in dns else "app: idle"),
        _pod("dns-b", "node-b", "10.244.2.53", "fd44:2::53", "app: dns" if "dns-b" in dns else "app: idle"),
    ]
    services = """---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd96::10"]
  ipFamilyPolicy: RequireDualStack
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-local}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: web-zone-a}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  externalTrafficPolicy: Local
  selector: {app: web, zone: a}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30082}]
---
apiVersion: v1
kind: Service
metadata: {name: web-ext}
spec:
  clusterIP: 10.96.0.14
  externalIPs: [192.0.2.80]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-aff}
spec:
  clusterIP: 10.96.0.12
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  clusterIP: 10.96.0.53
  selector: {app: dns}
  ports: [{name: dns, port: 53, targetPort: dns, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.2
  ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP}, {name: dns-tcp, port: 53, targetPort: 5353}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: kube-dns, namespace: kube-system}
subsets:
- addresses: [{ip: 10.77.0.11, nodeName: node-a}]
  ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: 10.96.0.99
  selector: {app: nothing}
  ports: [{name: http, port: 80}]
"""
    return nodes + "".join(pods) + services


class Env:
    def __init__(self, cluster: Cluster, path: str) -> None:
        self.c = cluster
        self.path = path
        self.proxies: dict[str, object] = {}

    def start_proxy(self, node: str):
        # node-a also serves the cluster DNS (hostNetwork style: its endpoint is the node's address).
        extra = ["--dns-listen", "10.77.0.11:5353", "--dns-upstream", "10.77.0.1:53"] if node == "node-a" else []
        p = self.c.start(node, sys.executable, "-m", "meshproxy", "run", "-f", self.path, "--node", node,
                         "--proxy-mode", "nftables", "--service-cidr", CIDR, "--admin-listen", "%s:%d" % ADMIN,
                         "--no-health-checks", *extra, cwd=ROOT)
        self.proxies[node] = p
        self.wait(node, lambda d: True)
        return p

    def debug(self, node: str) -> dict | None:
        try:
            st, body = self.c.http_get(node, *ADMIN, "/debug/snapshot", timeout=2)
        except OSError:
            return None
        return json.loads(body) if st == 200 else None

    def wait(self, node: str, pred, timeout: float = 20.0) -> dict:
        """Until node's proxy has the snapshot in force in the kernel and ``pred`` holds on it."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            p = self.proxies.get(node)
            if p is not None and not p.alive():
                raise AssertionError(f"meshproxy on {node} exited:\n{p.output()[-3000:]}")
            d = self.debug(node)
            if d is not None and d.get("nftables", {}).get("version") == d["version"] and pred(d):
                try:
                    if self.c.http_get(node, *ADMIN, "/readyz", timeout=2)[0] == 200:
                        return d
                except OSError:
                    pass
            last = d
            time.sleep(0.05)
        out = self.proxies[node].output()[-3000:] if node in self.proxies else ""
        raise AssertionError(f"{node}: not applied in {timeout}s (nftables state {last and last.get('nftables')}):\n{out}")

    def write(self, text: str, want: set[str]) -> None:
        """Replace the manifests and wait until every running proxy has them in the kernel,
        ``want`` being the pods that then serve the web service."""
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)
        for node, p in self.proxies.items():
            if p.alive():
                self.wait(node, lambda d: _pods_of(d, "web") == want)


def _pods_of(d: dict, service: str) -> set[str]:
    return {e["pod"] for es in d["endpoints"] if es["service"] == service for e in es["endpoints"] if e["ready"]}


def who(c: Cluster, where: str, addr: tuple[str, int], timeout: float = 3.0) -> tuple[str, str]:
    s = c.connect(where, addr, timeout)
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(200)
            if not chunk:
                break
            line += chunk
    finally:
        s.close()
    name, peer = line.decode().split()
    return name, peer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    requires("nft")
    path = str(tmp_path_factory.mktemp("nftcluster") / "cluster.yaml")
    with open(path, "w") as f:
        f.write(manifests())
    with netns_cluster(manifests()) as c:
        servers = []
        for key, m in c.pods.items():
            name = key.split("/")[1]
            if name == "client-b":
                continue
            args = sum((["--addr", ip] for ip in m.ips), [])
            servers.append(c.start(key, sys.executable, os.path.join(ROOT, "tests", "netns_pod.py"), name, *args,
                                   "--tcp", "8080", "--udp", "5353"))
        deadline = time.monotonic() + 15
        while not all("ready" in s.output() for s in servers):
            assert time.monotonic() < deadline, [s.output() for s in servers]
            time.sleep(0.05)
        e = Env(c, path)
        e.start_proxy("node-a")
        e.start_proxy("node-b")
        yield e


def test_clusterip_spreads_over_ready_pods(env):
    seen = [who(env.c, "client-b", ("10.96.0.10", 80)) for _ in range(60)]
    names = {n for n, _ in seen}
    assert names == set(WEB), seen           # web-nr (not ready) never; every ready one
    assert {p for _, p in seen} == {"10.244.2.9"}   # ClusterIP traffic keeps the client's address


def test_ipv6_clusterip_of_a_dual_stack_service(env):
    seen = [who(env.c, "client-b", ("fd96::10", 80)) for _ in range(30)]
    assert {n for n, _ in seen} <= set(WEB) and len({n for n, _ in seen}) >= 2, seen
    assert {p for _, p in seen} == {"fd44:2::9"}


def test_nodeport_from_the_outside_client(env):
    for node_ip in ("10.77.0.11", "10.77.0.12", "fd77::11"):
        seen = [who(env.c, "client", (node_ip, 30080)) for _ in range(30)]
        assert {n for n, _ in seen} == set(WEB), (node_ip, seen)
        # Cluster policy: the endpoint may be on the other node, so the proxy masquerades.
        assert {p for _, p in seen} == {node_ip}, (node_ip, seen)


def test_local_policy_answers_from_local_pods_with_the_client_address(env):
    a = [who(env.c, "client", ("10.77.0.11", 30081)) for _ in range(30)]
    assert {n for n, _ in a} == {"web-a1", "web-a2"}, a
    b = [who(env.c, "client", ("10.77.0.12", 30081)) for _ in range(10)]
    assert {n for n, _ in b} == {"web-b1"}, b
    assert {p for _, p in a + b} == {"10.77.0.100"}   # the pod sees the real client


def test_local_policy_without_local_endpoint_is_refused(env):
    # web-zone-a selects pods of node-a only: node-b has no local endpoint for it.
    assert {who(env.c, "client", ("10.77.0.11", 30082))[0] for _ in range(10)} <= {"web-a1", "web-a2"}
    with pytest.raises(ConnectionRefusedError):
        env.c.connect("client", ("10.77.0.12", 30082), 1.0).close()


def test_external_ip_from_the_outside_client(env):
    # The client's router sends the external IP to node-a (as a load balancer would).
    if "192.0.2.80" not in env.c.run("client", "ip", "route").stdout:
        env.c.route("client", "192.0.2.80", "10.77.0.11")
    seen = [who(env.c, "client", ("192.0.2.80", 80)) for _ in range(30)]
    assert {n for n, _ in seen} == set(WEB), seen
    assert {p for _, p in seen} == {"10.77.0.11"}        # Cluster policy: masqueraded by node-a


def test_client_ip_affinity_keeps_one_pod(env):
    first = {who(env.c, "client-b", ("10.96.0.12", 80))[0] for _ in range(20)}
    assert len(first) == 1, first
    sets = env.c.run("node-b", "nft", "-j", "list", "sets", "inet", check=True).stdout
    assert "affinity-" in sets


def test_udp_through_a_clusterip(env):
    s = env.c.socket("client-b", socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.connect(("10.96.0.53", 53))
        replies = set()
        for i in range(5):
            s.send(b"ping%d" % i)
            name, peer, data = s.recv(200).decode().split()
            assert data == f"ping{i}" and peer == "10.244.2.9"
            replies.add(name)
        assert len(replies) == 1 and replies <= {"dns-a", "dns-b"}   # one flow, one pod (conntrack)
    finally:
        s.close()


def test_cluster_dns_through_its_clusterip_over_udp_and_tcp(env):
    name = "web.default.svc.cluster.local"
    u = env.c.socket("client-b", socket.AF_INET, socket.SOCK_DGRAM)
    t = env.c.connect("client-b", ("10.96.0.2", 53), 3)
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), "10.96.0.2", port=53, timeout=3, sock=u)
        assert {rd.to_text() for rrset in r.answer for rd in rrset} == {"10.96.0.10"}
        r = dns.query.tcp(dns.message.make_query(name, "AAAA"), "10.96.0.2", port=53, timeout=3, sock=t)
        assert {rd.to_text() for rrset in r.answer for rd in rrset} == {"fd96::10"}
    finally:
        u.close()
        t.close()


def test_no_endpoint_is_rejected_within_a_second(env):
    # The socket timeout bounds the wait: a drop would time out, the reject refuses at once.
    with pytest.raises(ConnectionRefusedError):
        env.c.connect("client-b", ("10.96.0.99", 80), 1.0).close()
    with pytest.raises(ConnectionRefusedError):
        env.c.connect("client", ("10.77.0.11", 30099), 1.0).close()


def test_udp_flow_moves_when_its_endpoint_leaves(env):
    """conntrack keeps a UDP flow on its pod; when that pod leaves the Service the entry is
    deleted and the same client socket reaches the remaining pod."""
    s = env.c.socket("client-b", socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.connect(("10.96.0.53", 53))
        s.send(b"x")
        first = s.recv(200).split()[0].decode()
        other = "dns-b" if first == "dns-a" else "dns-a"
        env.write(manifests(dns=(other,)), set(WEB))
        for node in ("node-a", "node-b"):
            d = env.wait(node, lambda d: _pods_of(d, "echo") == {other})
            assert d["nftables"]["lastVia"] == "netlink"      # changes after the first sync
        s.send(b"y")
        assert s.recv(200).split()[0].decode() == other
    finally:
        s.close()
        env.write(manifests(), set(WEB))


def test_sigkill_keeps_traffic_and_a_restart_reconciles(env):
    c = env.c
    c.stop(env.proxies["node-b"], signal.SIGKILL)
    # The kernel keeps translating without the process.
    assert {who(c, "client-b", ("10.96.0.10", 80))[0] for _ in range(30)} == set(WEB)
    # Endpoints change while node-b's proxy is down: web-a1 goes, web-a3 joins.
    env.write(manifests(a1=False, a3_web=True), {"web-a2", "web-a3", "web-b1"})
    assert {who(c, "client-b", ("10.96.0.10", 80))[0] for _ in range(30)} <= set(WEB)   # still the old rules
    env.start_proxy("node-b")
    env.wait("node-b", lambda d: _pods_of(d, "web") == {"web-a2", "web-a3", "web-b1"})
    seen = {who(c, "client-b", ("10.96.0.10", 80))[0] for _ in range(60)}
    assert seen == {"web-a2", "web-a3", "web-b1"}, seen
    # The chains of the endpoint that left are deleted (a second after they were emptied).
    deadline = time.monotonic() + 5
    while "10.244.1.2/8080" in c.run("node-b", "nft", "list", "chains", "inet").stdout:
        assert time.monotonic() < deadline, "the chains of web-a1 are still there"
        time.sleep(0.1)


def test_rules_stay_after_exit_and_cleanup_removes_the_table(env):
    c = env.c
    assert c.stop(env.proxies["node-b"], signal.SIGTERM) == 0
    assert "meshproxy" in c.run("node-b", "nft", "list", "tables", check=True).stdout
    assert who(c, "client-b", ("10.96.0.10", 80))[0] in {"web-a2", "web-a3", "web-b1"}
    r = c.run("node-b", sys.executable, "-m", "meshproxy", "cleanup", check=True)
    assert "deleted" in r.stderr
    assert "meshproxy" not in c.run("node-b", "nft", "list", "tables", check=True).stdout
    with pytest.raises(OSError):
        c.connect("client-b", ("10.96.0.10", 80), 1.0).close()
    # Running it again finds nothing to delete and still succeeds.
    assert "not present" in c.run("node-b", sys.executable, "-m", "meshproxy", "cleanup", check=True).stderr
