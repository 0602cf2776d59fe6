"""``meshproxy capture`` in network namespaces this test creates: a "pod" namespace and a
"peer" namespace joined by a veth pair. The rules are applied only inside the pod namespace
(``ip netns exec``); the machine's own ruleset is read before and after and must not change.

In the pod namespace an agent listens on the sidecar ports (15001 on loopback, 15006 on the
pod address) and answers each connection with its SO_ORIGINAL_DST (``original_dst``); other
listeners answer with their own name, so every answer says whether the connection was
captured and where it was going.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest
from conftest import requires, requires_root
from proc import ROOT

from meshproxy import capture

AGENT = os.path.join(ROOT, "tests", "netns_agent.py")
POD4, PEER4, POD6, PEER6 = "10.231.0.1", "10.231.0.2", "fd31::1", "fd31::2"
SVC4, SVC6 = "10.96.7.10", "fd96::10"         # "ClusterIPs", served directly by the peer namespace
PROXY_UID = 1337
EXCLUDED = 9000


def sh(*cmd: str, check: bool = True, ns: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(full)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


@pytest.fixture(scope="module")
def cluster():
    requires_root()
    requires("ip", "nft")
    host_rules = sh("nft", "list", "ruleset").stdout
    tag = secrets.token_hex(3)
    pod, peer = f"mpcap-{tag}-pod", f"mpcap-{tag}-peer"
    made: list[str] = []
    agents: list[subprocess.Popen] = []
    try:
        for ns in (pod, peer):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", ns=ns)
        va, vb = f"mpc{tag}a", f"mpc{tag}b"
        sh("ip", "link", "add", va, "netns", pod, "type", "veth", "peer", "name", vb, "netns", peer)
        for ns, dev, a4, a6 in ((pod, va, POD4, POD6), (peer, vb, PEER4, PEER6)):
            sh("ip", "addr", "add", f"{a4}/24", "dev", dev, ns=ns)
            sh("ip", "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
        # The pod reaches everything through its one interface, as a pod does.
        sh("ip", "route", "add", "default", "via", PEER4, ns=pod)
        sh("ip", "-6", "route", "add", "default", "via", PEER6, ns=pod)
        sh("ip", "addr", "add", f"{SVC4}/32", "dev", "lo", ns=peer)
        sh("ip", "-6", "addr", "add", f"{SVC6}/128", "dev", "lo", "nodad", ns=peer)
        specs = {
            pod: [f"orig:outbound:127.0.0.1:{capture.DEFAULT_OUTBOUND_PORT}",
                  f"orig:outbound:::1:{capture.DEFAULT_OUTBOUND_PORT}",
                  f"orig:inbound:{POD4}:{capture.DEFAULT_INBOUND_PORT}",
                  f"orig:inbound:{POD6}:{capture.DEFAULT_INBOUND_PORT}",
                  f"tcp:pod-excluded:{POD4}:{EXCLUDED}", "tcp:pod-loopback:127.0.0.1:7000",
                  f"orig:inbound-dual-stack:::ffff:{POD4}:15999"],
            peer: [f"tcp:direct-80:{SVC4}:80", f"tcp:direct-80:{SVC6}:80", f"tcp:direct-53:{SVC4}:53",
                   f"udp:direct-udp-53:{SVC4}:53", f"tcp:direct-{EXCLUDED}:{SVC4}:{EXCLUDED}"],
        }
        for ns, spec in specs.items():
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, AGENT, "serve", *spec],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            agents.append(p)
            line = p.stdout.readline().strip()
            assert line == "ready", f"agent in {ns}: {line!r} {p.stderr.read() if p.poll() is not None else ''}"
        yield {"pod": pod, "peer": peer}
    finally:
        for p in agents:
            p.kill()
            p.communicate(timeout=10)
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)
        assert sh("nft", "list", "ruleset").stdout == host_rules, "the machine's own nftables ruleset changed"


def call(ns: str, host: str, port: int, *extra: str) -> dict:
    r = sh(sys.executable, AGENT, "connect", host, str(port), *extra, ns=ns)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_capture(ns: str, *args: str) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "meshproxy", "capture", *args, ns=ns, check=False)


def test_capture_redirects_and_leaves_alone_what_it_must(cluster):
    pod, peer = cluster["pod"], cluster["peer"]
    # Before: the "ClusterIP" answers directly, the pod's port 8080 has no listener.
    assert call(pod, SVC4, 80) == {"listener": "direct-80"}
    assert call(peer, POD4, 8080) == {"error": "ConnectionRefusedError"}

    r = run_capture(pod, "--proxy-uid", str(PROXY_UID), "--exclude-ports", str(EXCLUDED))
    assert r.returncode == 0, r.stderr
    # Exit 0 means the rules are in force, with nothing to wait for.
    assert call(pod, SVC4, 80) == {"listener": "outbound", "original": [SVC4, 80]}
    assert call(pod, SVC6, 80) == {"listener": "outbound", "original": [SVC6, 80]}
    assert call(pod, SVC4, 12345) == {"listener": "outbound", "original": [SVC4, 12345]}
    assert call(pod, PEER4, 8080) == {"listener": "outbound", "original": [PEER4, 8080]}   # pod IPs too
    # The sidecar's own traffic, excluded ports, DNS (TCP and UDP) and loopback are left alone.
    assert call(pod, SVC4, 80, "--uid", str(PROXY_UID)) == {"listener": "direct-80"}
    assert call(pod, SVC6, 80, "--uid", str(PROXY_UID)) == {"listener": "direct-80"}
    assert call(pod, SVC4, EXCLUDED) == {"listener": f"direct-{EXCLUDED}"}
    assert call(pod, SVC4, 53) == {"listener": "direct-53"}
    assert call(pod, SVC4, 53, "--udp") == {"listener": "direct-udp-53"}
    assert call(pod, "127.0.0.1", 7000) == {"listener": "pod-loopback"}
    # Inbound: any port of the pod reaches the inbound port, which learns the original one.
    assert call(peer, POD4, 8080) == {"listener": "inbound", "original": [POD4, 8080]}
    assert call(peer, POD6, 443) == {"listener": "inbound", "original": [POD6, 443]}
    assert call(peer, POD4, EXCLUDED) == {"listener": "pod-excluded"}

    # Idempotent: applying again leaves exactly the same table.
    before = sh("nft", "list", "table", "inet", capture.TABLE, ns=pod).stdout
    assert run_capture(pod, "--proxy-uid", str(PROXY_UID), "--exclude-ports", str(EXCLUDED)).returncode == 0
    assert sh("nft", "list", "table", "inet", capture.TABLE, ns=pod).stdout == before
    assert before.count("redirect to :15001") == 1 and before.count("redirect to :15006") == 1

    # --remove restores direct traffic, and removing twice is fine.
    assert run_capture(pod, "--remove").returncode == 0
    assert call(pod, SVC4, 80) == {"listener": "direct-80"}
    assert call(peer, POD4, 8080) == {"error": "ConnectionRefusedError"}
    r = run_capture(pod, "--remove")
    assert r.returncode == 0, r.stderr
    assert sh("nft", "list", "ruleset", ns=pod).stdout.strip() == ""


def test_ports_are_configurable(cluster):
    pod = cluster["pod"]
    try:
        r = run_capture(pod, "--outbound-port", "7000", "--inbound-port", "15999", "--proxy-uid", "4242")
        assert r.returncode == 0, r.stderr
        # Outbound now lands on the loopback listener at 7000 (standing in for a sidecar there).
        assert call(pod, SVC4, 80) == {"listener": "pod-loopback"}
        assert call(pod, SVC4, 80, "--uid", "4242") == {"listener": "direct-80"}
        assert call(pod, SVC4, 80, "--uid", str(PROXY_UID)) == {"listener": "pod-loopback"}
        # An IPv4 connection accepted on an AF_INET6 socket: original_dst still reads it.
        assert call(cluster["peer"], POD4, 8080) == {"listener": "inbound-dual-stack", "original": [POD4, 8080]}
    finally:
        run_capture(pod, "--remove")


def test_original_dst_without_nat_is_an_error(cluster):
    # A namespace without NAT rules keeps no NAT entry for a connection: original_dst says so.
    peer = cluster["peer"]
    out = json.loads(sh(sys.executable, AGENT, "no-nat", ns=peer).stdout)
    assert "error" in out, out


@pytest.mark.parametrize("args,message", [
    (["--exclude-ports", "http"], "'http' is not a port"),
    (["--exclude-ports", "9000-8000"], "the range is reversed"),
    (["--outbound-port", "15006"], "must differ"),
    (["--inbound-port", "70000"], "is not a port"),
])
def test_bad_arguments_are_refused_before_touching_anything(args, message):
    r = subprocess.run([sys.executable, "-m", "meshproxy", "capture", "--dry-run", *args], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_ruleset_shape():
    text = capture.ruleset(exclude_ports=capture.parse_ports("15090, 8000-8100"), proxy_uid=1000)
    assert text.startswith("table inet meshproxy_capture\ndelete table inet meshproxy_capture\n")
    assert "meta skuid 1000 return" in text
    assert "tcp dport { 15001, 15006, 15090, 8000-8100 } return" in text     # inbound
    assert "tcp dport { 53, 15090, 8000-8100 } return" in text               # outbound
    assert 'oifname "lo" return' in text and "meta l4proto != tcp return" in text
    assert capture.removal() == "table inet meshproxy_capture\ndelete table inet meshproxy_capture\n"
