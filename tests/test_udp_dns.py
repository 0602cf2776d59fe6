"""The cluster DNS as Kubernetes has it: reached through its own ClusterIP over UDP and TCP
(kube-dns's shape, the L4 UDP relay in between), and forwarding the names outside the
cluster domain to upstream resolvers (meshproxy/dnsforward.py, CoreDNS's forward plugin)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest
import yaml
from conftest import LoopThread
from proc import Meshproxy, free_port

from meshproxy.dnsforward import Forwarder, resolv_conf_servers
from meshproxy.dnsserver import ClusterDNS


class Upstream:
    """A resolver on 127.0.0.1: answers ``A 192.0.2.<n>`` for every name, counting questions;
    ``mode`` "silent" answers nothing, "noise" first sends an answer with a wrong ID."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.asked: list[tuple[str, str]] = []
        for _ in range(20):               # a UDP port whose TCP twin is free too
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket()
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.tcp.close()
                self.udp.close()
        self.tcp.listen(16)
        threading.Thread(target=self._serve_udp, daemon=True).start()
        threading.Thread(target=self._serve_tcp, daemon=True).start()

    def answer(self, data: bytes, transport: str) -> bytes | None:
        q = dns.message.from_wire(data)
        self.asked.append((q.question[0].name.to_text(), transport))
        if self.mode == "silent":
            return None
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", f"192.0.2.{len(self.asked)}"))
        return r.to_wire()

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            wire = self.answer(data, "udp")
            if wire is not None:
                if self.mode == "noise":
                    self.udp.sendto(bytes([wire[0] ^ 0xFF]) + wire[1:], peer)   # not the query's ID
                self.udp.sendto(wire, peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                return
            with c:
                head = c.recv(2)
                if len(head) < 2:
                    continue
                size = struct.unpack("!H", head)[0]
                data = b""
                while len(data) < size:
                    chunk = c.recv(size - len(data))
                    if not chunk:
                        break
                    data += chunk
                wire = self.answer(data, "tcp")
                if wire is not None:
                    c.sendall(struct.pack("!H", len(wire)) + wire)

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class DnsThread:
    """A ClusterDNS with a forwarder, on a loop in its own thread (conftest.LoopThread), on
    127.0.0.1:0."""

    def __init__(self, upstreams, timeout: float = 0.5, max_concurrent: int = 1000) -> None:
        self.thread = LoopThread()
        self.forwarder = Forwarder(upstreams, timeout=timeout, max_concurrent=max_concurrent)
        self.server = ClusterDNS(lambda: None, "cluster.local", forward=self.forwarder.forward)
        self.thread.run(self.server.start("127.0.0.1", 0))
        self.port = self.server.port

    def stop(self) -> None:
        async def _stop():
            self.server.close()
            await self.server.wait_closed()
        self.thread.run(_stop())
        self.thread.close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


def _a(r: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in r.answer for rd in rrset if rrset.rdtype == 1}


def test_outside_names_are_forwarded_over_the_same_transport(upstream):
    d = DnsThread([("127.0.0.1", upstream.port)])
    try:
        q = dns.message.make_query("example.org", "A")
        r = dns.query.udp(q, "127.0.0.1", port=d.port, timeout=10)
        assert r.rcode() == dns.rcode.NOERROR and r.id == q.id and _a(r) == {"192.0.2.1"}
        assert not r.flags & dns.flags.AA                       # not our zone: the upstream's answer
        q2 = dns.message.make_query("Example.NET", "A")
        r2 = dns.query.tcp(q2, "127.0.0.1", port=d.port, timeout=10)
        assert r2.id == q2.id and _a(r2) == {"192.0.2.2"}
        assert upstream.asked == [("example.org.", "udp"), ("Example.NET.", "tcp")]
        # The cluster domain stays ours: no cluster yet, so SERVFAIL from us, nothing forwarded.
        r3 = dns.query.udp(dns.message.make_query("web.default.svc.cluster.local", "A"), "127.0.0.1", port=d.port, timeout=10)
        assert r3.rcode() == dns.rcode.SERVFAIL and len(upstream.asked) == 2
    finally:
        d.stop()


def test_a_dead_upstream_is_skipped_and_all_dead_is_servfail(upstream):
    dead = Upstream("silent")
    d = DnsThread([("127.0.0.1", dead.port), ("127.0.0.1", upstream.port)], timeout=0.3)
    try:
        for _ in range(4):          # whatever order the upstreams are tried in, the answer comes
            r = dns.query.udp(dns.message.make_query("example.org", "A"), "127.0.0.1", port=d.port, timeout=10)
            assert r.rcode() == dns.rcode.NOERROR and _a(r)
    finally:
        d.stop()
    d = DnsThread([("127.0.0.1", dead.port)], timeout=0.3)
    try:
        q = dns.message.make_query("example.org", "A")
        r = dns.query.udp(q, "127.0.0.1", port=d.port, timeout=10)
        assert r.rcode() == dns.rcode.SERVFAIL and r.id == q.id and r.question == q.question
    finally:
        d.stop()
        dead.close()


def test_answers_that_do_not_match_the_query_are_ignored():
    noisy = Upstream("noise")
    d = DnsThread([("127.0.0.1", noisy.port)])
    try:
        q = dns.message.make_query("example.org", "A")
        r = dns.query.udp(q, "127.0.0.1", port=d.port, timeout=10)
        assert r.id == q.id and _a(r) == {"192.0.2.1"}
    finally:
        d.stop()
        noisy.close()


def test_no_upstream_is_servfail_and_own_address_is_never_an_upstream():
    f = Forwarder([("127.0.0.1", 53), ("10.0.0.2", 53)], own=("127.0.0.1", 53))
    assert f.upstreams == [("10.0.0.2", 53)]
    q = dns.message.make_query("example.org", "A").to_wire()
    r = dns.message.from_wire(asyncio.run(Forwarder([]).forward(q, True)))
    assert r.rcode() == dns.rcode.SERVFAIL


def test_resolv_conf(tmp_path):
    p = tmp_path / "resolv.conf"
    p.write_text("search x\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n")
    assert resolv_conf_servers(str(p)) == [("10.255.255.53", 53), ("fe80::1", 53)]
    assert resolv_conf_servers(str(tmp_path / "missing")) == []


def test_cluster_dns_through_its_own_clusterip(tmp_path, upstream):
    """kube-dns's shape: a Service with a UDP and a TCP port 53-style pair whose endpoint is
    the --dns-listen address; clients ask the ClusterIP, over UDP and TCP."""
    dns_ip = f"127.0.20.{random.randint(2, 250)}"
    dns_port = free_port(dns_ip, udp=True)     # the DNS server binds both, TCP without SO_REUSEPORT
    cip = f"127.96.{random.randint(1, 250)}.{random.randint(2, 250)}"
    port = free_port(cip, udp=True)
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system"},
         "spec": {"clusterIP": cip, "ports": [{"name": "dns", "port": port, "protocol": "UDP", "targetPort": dns_port},
                                              {"name": "dns-tcp", "port": port, "protocol": "TCP", "targetPort": dns_port}]}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "kube-dns", "namespace": "kube-system"},
         "subsets": [{"addresses": [{"ip": dns_ip}],
                      "ports": [{"name": "dns", "port": dns_port, "protocol": "UDP"},
                                {"name": "dns-tcp", "port": dns_port, "protocol": "TCP"}]}]},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"clusterIP": "127.96.0.77", "selector": {"app": "web"}, "ports": [{"port": 80}]}},
    ]
    path = tmp_path / "dns.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    with Meshproxy([str(path)], "--no-health-checks", "--dns-listen", f"{dns_ip}:{dns_port}",
                   "--dns-upstream", f"127.0.0.1:{upstream.port}"):
        name = "web.default.svc.cluster.local"
        r = dns.query.udp(dns.message.make_query(name, "A"), cip, port=port, timeout=10)
        assert _a(r) == {"127.96.0.77"} and r.flags & dns.flags.AA
        r = dns.query.tcp(dns.message.make_query(name, "A"), cip, port=port, timeout=10)
        assert _a(r) == {"127.96.0.77"}
        r = dns.query.udp(dns.message.make_query("example.com", "A"), cip, port=port, timeout=10)
        assert _a(r) == {"192.0.2.1"} and upstream.asked == [("example.com.", "udp")]
