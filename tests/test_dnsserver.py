"""Cluster DNS (meshproxy.dnsserver): every record type of the Kubernetes DNS spec that meshproxy
serves, asked over real UDP and TCP sockets on 127.0.0.1 with dnspython and with dig, plus the
negative answers (NXDOMAIN vs NODATA, REFUSED outside the zone), truncation with TCP fallback,
malformed packets, and a fuzz target for the query handler."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import subprocess
import threading

import dns.asyncquery
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import requires

from discovery.manifests import load_text
from discovery.store import ADDED, DELETED, Allocator, EndpointIndex, Event, Store
from meshproxy.dnsserver import ClusterDNS, dashed
from meshproxy.core.settings import Settings
from meshproxy.core.snapshot import SnapshotBuilder

DOMAIN = "cluster.local"


def _pod(name: str, ip: str, app: str, ready: bool = True, ns: str = "default",
         hostname: str | None = None, subdomain: str | None = None) -> str:
    spec = "{containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: pg, containerPort: 5432}]}]}"
    if hostname:
        spec = spec[:-1] + f", hostname: {hostname}" + (f", subdomain: {subdomain}" if subdomain else "") + "}"
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec: {spec}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
"""


MANIFESTS = "".join([
    _pod("web-1", "127.0.10.1", "web"),
    _pod("web-2", "127.0.10.2", "web"),
    _pod("web-3", "127.0.10.3", "web", ready=False),
    _pod("db-0", "127.0.11.1", "db", hostname="db-0", subdomain="db"),
    _pod("db-1", "127.0.11.2", "db", hostname="db-1", subdomain="db"),
    _pod("db-2", "127.0.11.3", "db", ready=False, hostname="db-2", subdomain="db"),
    _pod("db-x", "127.0.11.4", "db", hostname="other-host", subdomain="elsewhere"),
    _pod("peer-0", "127.0.12.1", "peer", ready=False),
    _pod("web-p", "127.0.13.1", "web", ns="prod"),
    *(_pod(f"big-{i}", f"127.0.14.{i + 1}", "big") for i in range(60)),
]) + """---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 127.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 8000, targetPort: http}, {name: metrics, port: 9090, targetPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: auto, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: six, namespace: default}
spec:
  clusterIP: "fd00:96::10"
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432, targetPort: pg}]
---
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: default}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {app: peer}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: None
  selector: {app: nothing}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: big, namespace: default}
spec:
  clusterIP: None
  selector: {app: big}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: upstream.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: default}
spec: {type: ExternalName, externalName: web.default.svc.cluster.local}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 127.96.1.10
  selector: {app: web}
  ports: [{name: http, port: 8000, targetPort: http}]
"""


class Cluster:
    """Store + index + allocator + builder, as the controller holds them."""

    def __init__(self, text: str) -> None:
        self.store = Store()
        self.index = EndpointIndex(self.store)
        self.allocator = Allocator()
        self.builder = SnapshotBuilder(Settings())
        result = load_text(text)
        assert not result.errors, [str(e) for e in result.errors]
        self.snapshot = None
        self.apply([Event(ADDED, o) for o in result.objects])

    def apply(self, events):
        changes = self.store.apply(events)
        self.index.on_changes(changes)
        self.index.recompute()
        self.snapshot = self.builder.build(self.store, self.index, self.allocator)
        return self.snapshot

    def pods(self):
        return self.store.items("Pod")


class ServerThread:
    """A ClusterDNS on 127.0.0.1:0 in its own event loop, so blocking clients (dig, sockets)
    can talk to it from the test thread."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.server = ClusterDNS(lambda: cluster.snapshot, DOMAIN, ttl=5, get_pods=cluster.pods)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self.loop).result(5)
        self.port = self.server.port

    def stop(self) -> None:
        async def _stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def cluster():
    return Cluster(MANIFESTS)


@pytest.fixture(scope="module")
def server(cluster):
    s = ServerThread(cluster)
    yield s
    s.stop()


# -- clients --------------------------------------------------------------------------------------


def udp(server, name, rdtype="A", **kw) -> dns.message.Message:
    """dnspython's asyncio client, one query over UDP."""
    q = dns.message.make_query(name, rdtype, **kw)
    return asyncio.run(dns.asyncquery.udp(q, "127.0.0.1", port=server.port, timeout=2))


def tcp(server, name, rdtype="A", **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    return asyncio.run(dns.asyncquery.tcp(q, "127.0.0.1", port=server.port, timeout=2))


def values(msg: dns.message.Message, rdtype: str, section: str = "answer") -> set[str]:
    t = dns.rdatatype.from_text(rdtype)
    return {rd.to_text() for rrset in getattr(msg, section) if rrset.rdtype == t for rd in rrset}


def dig_path() -> str:
    return requires("dig")


class DigResult:
    def __init__(self, out: str) -> None:
        self.text = out
        m = re.search(r"status: (\w+)", out)
        self.status = m.group(1) if m else None
        m = re.search(r";; flags: ([^;]*);", out)
        self.flags = set(m.group(1).split()) if m else set()
        self.sections: dict[str, list[list[str]]] = {"answer": [], "authority": [], "additional": []}
        current = None
        for line in out.splitlines():
            head = re.match(r";; (ANSWER|AUTHORITY|ADDITIONAL) SECTION:", line)
            if head:
                current = head.group(1).lower()
            elif line and not line.startswith(";") and current:
                self.sections[current].append(line.split(None, 4))

    def rdata(self, rdtype: str, section: str = "answer") -> set[str]:
        return {r[4] for r in self.sections[section] if len(r) == 5 and r[3] == rdtype}


def dig(server, name: str, rdtype: str = "A", *opts: str) -> DigResult:
    out = subprocess.run(
        [dig_path(), "@127.0.0.1", "-p", str(server.port), "+time=2", "+tries=1", "+noall", "+comments",
         "+answer", "+authority", "+additional", *opts, name, rdtype],
        capture_output=True, text=True, timeout=20)
    return DigResult(out.stdout)


def svc(name: str, ns: str = "default") -> str:
    return f"{name}.{ns}.svc.{DOMAIN}"


# -- positive answers -------------------------------------------------------------------------------


def test_clusterip_a_record(server):
    r = udp(server, svc("web"))
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and not r.flags & dns.flags.RA
    assert values(r, "A") == {"127.96.0.10"}
    assert {rrset.ttl for rrset in r.answer} == {5}
    assert values(udp(server, svc("web", "prod")), "A") == {"127.96.1.10"}


def test_allocated_cluster_ip_is_served(server, cluster):
    ip = cluster.snapshot.allocated["default/auto"]
    assert values(udp(server, svc("auto")), "A") == {ip}


def test_aaaa_of_ipv4_service_is_nodata_with_soa(server):
    r = udp(server, svc("web"), "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert values(r, "SOA", "authority"), "a negative answer carries the SOA (RFC 2308)"


def test_ipv6_service_has_aaaa_and_no_a(server):
    assert values(udp(server, svc("six"), "AAAA"), "AAAA") == {"fd00:96::10"}
    r = udp(server, svc("six"), "A")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_headless_a_lists_ready_pods_only(server):
    assert values(udp(server, svc("db")), "A") == {"127.0.11.1", "127.0.11.2", "127.0.11.4"}


def test_headless_publish_not_ready_addresses(server):
    assert values(udp(server, svc("peers")), "A") == {"127.0.12.1"}


def test_headless_without_ready_pods_is_nodata(server):
    r = udp(server, svc("empty"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_srv_of_clusterip_service(server):
    r = udp(server, f"_http._tcp.{svc('web')}", "SRV")
    assert values(r, "SRV") == {f"0 100 8000 {svc('web')}."}
    assert values(r, "A", "additional") == {"127.96.0.10"}
    assert values(udp(server, f"_metrics._tcp.{svc('web')}", "SRV"), "SRV") == {f"0 100 9090 {svc('web')}."}


def test_srv_of_headless_service_names_each_ready_pod(server):
    r = udp(server, f"_pg._tcp.{svc('db')}", "SRV")
    targets = {rd.split()[3] for rd in values(r, "SRV")}
    assert targets == {f"db-0.{svc('db')}.", f"db-1.{svc('db')}.", f"127-0-11-4.{svc('db')}."}
    assert {rd.split()[2] for rd in values(r, "SRV")} == {"5432"}      # the pods' target port
    glue = {rrset.name.to_text(): {rd.to_text() for rd in rrset} for rrset in r.additional if rrset.rdtype == dns.rdatatype.A}
    assert glue == {f"db-0.{svc('db')}.": {"127.0.11.1"}, f"db-1.{svc('db')}.": {"127.0.11.2"},
                    f"127-0-11-4.{svc('db')}.": {"127.0.11.4"}}


def test_per_pod_hostname_subdomain(server):
    assert values(udp(server, f"db-0.{svc('db')}"), "A") == {"127.0.11.1"}
    assert values(udp(server, f"db-1.{svc('db')}"), "A") == {"127.0.11.2"}
    # not ready: no name; subdomain naming another service: only the dashed-address name
    assert udp(server, f"db-2.{svc('db')}").rcode() == dns.rcode.NXDOMAIN
    assert udp(server, f"other-host.{svc('db')}").rcode() == dns.rcode.NXDOMAIN
    assert values(udp(server, f"127-0-11-4.{svc('db')}"), "A") == {"127.0.11.4"}


def test_pod_a_records(server):
    assert values(udp(server, f"127-0-10-1.default.pod.{DOMAIN}"), "A") == {"127.0.10.1"}
    assert values(udp(server, f"127-0-13-1.prod.pod.{DOMAIN}"), "A") == {"127.0.13.1"}
    # verified: the address must belong to a pod of that namespace
    assert udp(server, f"127-0-13-1.default.pod.{DOMAIN}").rcode() == dns.rcode.NXDOMAIN
    assert udp(server, f"10-9-9-9.default.pod.{DOMAIN}").rcode() == dns.rcode.NXDOMAIN
    assert dashed("fd00::1") == "fd00-0000-0000-0000-0000-0000-0000-0001"


def test_externalname_is_a_cname(server):
    for rdtype in ("A", "AAAA", "CNAME"):
        r = udp(server, svc("ext"), rdtype)
        assert r.rcode() == dns.rcode.NOERROR
        assert values(r, "CNAME") == {"upstream.example.com."}
        assert not values(r, "A")          # not chased: outside the zone


def test_externalname_inside_the_zone_is_chased(server):
    r = udp(server, svc("alias"))
    assert values(r, "CNAME") == {f"{svc('web')}."}
    assert values(r, "A") == {"127.96.0.10"}
    r = udp(server, svc("alias"), "AAAA")
    assert values(r, "CNAME") == {f"{svc('web')}."} and not values(r, "AAAA")


def test_zone_apex_soa_and_ns(server):
    r = udp(server, DOMAIN, "SOA")
    assert len(values(r, "SOA")) == 1
    r = udp(server, DOMAIN, "NS")
    assert values(r, "NS") == {f"ns.dns.{DOMAIN}."}
    assert values(r, "A", "additional") == {"127.0.0.1"}


def test_names_are_case_insensitive_and_echoed(server):
    r = udp(server, "WeB.DeFault.SVC.Cluster.LOCAL")
    assert values(r, "A") == {"127.96.0.10"}
    assert r.question[0].name.to_text() == "WeB.DeFault.SVC.Cluster.LOCAL."


# -- negative answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    f"default.svc.{DOMAIN}",                   # empty non-terminals
    f"svc.{DOMAIN}",
    f"_tcp.{svc('web')}",
    f"default.pod.{DOMAIN}",
])
def test_empty_non_terminal_is_nodata(server, name):
    r = udp(server, name)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert values(r, "SOA", "authority")


@pytest.mark.parametrize("name", [
    svc("nope"),
    f"web.nope.svc.{DOMAIN}",
    f"_nope._tcp.{svc('web')}",
    f"x.{svc('web')}",
    f"nope.{DOMAIN}",
    # what a pod's search path makes of a fully qualified name without the trailing dot
    f"{svc('web')}.default.svc.{DOMAIN}",
    f"{svc('web')}.svc.{DOMAIN}",
    f"{svc('web')}.{DOMAIN}",
])
def test_missing_name_is_nxdomain_with_soa(server, name):
    r = udp(server, name)
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.flags & dns.flags.AA
    assert values(r, "SOA", "authority")


@pytest.mark.parametrize("name,rdtype", [
    ("example.com", "A"), ("local", "A"), ("10.0.96.127.in-addr.arpa", "PTR"), (".", "NS"),
    ("other.local", "A"),
])
def test_outside_the_zone_is_refused(server, name, rdtype):
    r = udp(server, name, rdtype)
    assert r.rcode() == dns.rcode.REFUSED
    assert not r.answer and not r.flags & dns.flags.AA and not r.flags & dns.flags.RA


def test_zone_transfer_is_refused(server):
    assert tcp(server, DOMAIN, "AXFR").rcode() == dns.rcode.REFUSED


def test_other_opcode_is_notimp(server):
    q = dns.message.make_query(svc("web"), "A")
    q.set_opcode(dns.opcode.STATUS)
    r = asyncio.run(dns.asyncquery.udp(q, "127.0.0.1", port=server.port, timeout=2))
    assert r.rcode() == dns.rcode.NOTIMP


def test_unknown_edns_version_is_badvers(server):
    r = udp(server, svc("web"), use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS


# -- transports ---------------------------------------------------------------------------------------


def test_large_answer_is_truncated_over_udp_and_complete_over_tcp(server):
    r = udp(server, svc("big"))                             # no EDNS: 512 bytes
    assert r.flags & dns.flags.TC
    r = udp(server, svc("big"), use_edns=0, payload=1232)   # 60 A records take ~1 kB
    assert not r.flags & dns.flags.TC and len(values(r, "A")) == 60
    r = tcp(server, svc("big"))
    assert not r.flags & dns.flags.TC
    assert values(r, "A") == {f"127.0.14.{i + 1}" for i in range(60)}
    q = dns.message.make_query(svc("big"), "A")
    r, used_tcp = dns.query.udp_with_fallback(q, "127.0.0.1", port=server.port, timeout=2)
    assert used_tcp and len(values(r, "A")) == 60
    # the same over UDP with room for it: the small answers are never cut
    assert not udp(server, svc("db")).flags & dns.flags.TC


def test_srv_glue_is_dropped_before_the_answer_is_cut(server):
    r = udp(server, f"_http._tcp.{svc('big')}", "SRV", use_edns=0, payload=4096)
    assert r.flags & dns.flags.TC                           # 60 SRV records do not fit 1232
    r = udp(server, f"_pg._tcp.{svc('db')}", "SRV")         # 3 SRV fit 512, their glue too
    assert not r.flags & dns.flags.TC and len(values(r, "A", "additional")) == 3
    r = tcp(server, f"_http._tcp.{svc('big')}", "SRV")
    assert len(values(r, "SRV")) == 60 and len(values(r, "A", "additional")) == 60


def _tcp_exchange(port: int, payload: bytes, expect: int, timeout: float = 2.0) -> list[dns.message.Message]:
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while len(out) < expect:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                n = int.from_bytes(buf[:2], "big")
                out.append(dns.message.from_wire(buf[2:2 + n]))
                buf = buf[2 + n:]
    return out


def _framed(msg: dns.message.Message) -> bytes:
    wire = msg.to_wire()
    return len(wire).to_bytes(2, "big") + wire


def test_tcp_several_queries_per_connection(server):
    qs = [dns.message.make_query(svc(n), "A") for n in ("web", "db", "nope")]
    answers = _tcp_exchange(server.port, b"".join(_framed(q) for q in qs), 3)
    assert [a.id for a in answers] == [q.id for q in qs]
    assert [a.rcode() for a in answers] == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN]


def test_tcp_query_split_into_single_bytes(server):
    q = dns.message.make_query(svc("web"), "A")
    data = _framed(q)
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in data:
            s.sendall(bytes([b]))
        n = int.from_bytes(s.recv(2), "big")
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
    assert values(dns.message.from_wire(body), "A") == {"127.96.0.10"}


# -- malformed input --------------------------------------------------------------------------------


def _udp_raw(port: int, data: bytes, timeout: float = 0.3) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def test_malformed_udp_packets(server):
    # shorter than a header: nothing to answer to
    assert _udp_raw(server.port, b"\x12\x34\x01") is None
    # a header promising a question that is not there: FORMERR with the same ID
    wire = _udp_raw(server.port, struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0))
    assert wire is not None
    qid, flags = struct.unpack_from("!HH", wire)
    assert qid == 0xBEEF and flags & 0x8000 and flags & 0xF == dns.rcode.FORMERR
    # a label pointing outside the packet
    bad = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\xff\x00\x01\x00\x01"
    assert struct.unpack_from("!HH", _udp_raw(server.port, bad))[1] & 0xF == dns.rcode.FORMERR
    # trailing junk after a valid query
    q = dns.message.make_query(svc("web"), "A").to_wire() + b"junk"
    assert struct.unpack_from("!HH", _udp_raw(server.port, q))[1] & 0xF == dns.rcode.FORMERR
    # a response is never answered (two servers must not loop)
    resp = dns.message.make_response(dns.message.make_query(svc("web"), "A")).to_wire()
    assert _udp_raw(server.port, resp) is None
    # two questions
    q = dns.message.make_query(svc("web"), "A")
    q.question.append(dns.message.make_query(svc("db"), "A").question[0])
    assert dns.message.from_wire(_udp_raw(server.port, q.to_wire())).rcode() == dns.rcode.FORMERR
    # and the server still answers
    assert values(udp(server, svc("web")), "A") == {"127.96.0.10"}


def test_malformed_tcp_message_then_a_good_one(server):
    junk = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x05ab"
    q = dns.message.make_query(svc("web"), "A")
    answers = _tcp_exchange(server.port, len(junk).to_bytes(2, "big") + junk + _framed(q), 2)
    assert answers[0].id == 0x4242 and answers[0].rcode() == dns.rcode.FORMERR
    assert answers[1].id == q.id and values(answers[1], "A") == {"127.96.0.10"}


def test_tcp_frame_too_short_for_a_header_closes(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(b"\x00\x03abc")
        assert s.recv(10) == b""


@pytest.fixture(scope="module")
def handler(cluster):
    """The query handler without sockets."""
    return ClusterDNS(lambda: cluster.snapshot, DOMAIN, get_pods=cluster.pods)


_SAMPLE_QUERIES = [dns.message.make_query(n, t, use_edns=e).to_wire()
                   for n, t, e in [(svc("web"), "A", None), (f"_pg._tcp.{svc('db')}", "SRV", 0),
                                   (svc("ext"), "AAAA", 0), ("example.com", "A", None)]]


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from(_SAMPLE_QUERIES), st.integers(0, 400), st.integers(0, 255)).map(
        lambda t: t[0][:t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]),
))
def test_fuzz_any_packet_gets_an_answer_or_nothing_never_an_exception(handler, data):
    """Invariant: ``handle`` never raises; what it returns parses, keeps the ID, has QR set,
    and fits 1232 bytes over UDP."""
    server = handler
    for udp_flag in (True, False):
        wire = server.handle(data, udp_flag)
        if wire is None:
            continue
        assert wire[:2] == data[:2]
        assert wire[2] & 0x80
        dns.message.from_wire(wire)
        if udp_flag:
            assert len(wire) <= 1232


def _sections(wire: bytes) -> tuple:
    m = dns.message.from_wire(wire)
    return (m.id, m.flags, m.rcode(), m.question[0].name.to_text(),
            *(sorted(line for rrset in sec for line in rrset.to_text().splitlines())
              for sec in (m.answer, m.authority, m.additional)))


@pytest.mark.parametrize("name,rdtype,edns,payload", [
    (svc("web"), "A", -1, 0), (svc("web"), "AAAA", 0, 1232), (svc("db"), "A", -1, 0),
    (f"_http._tcp.{svc('web')}", "SRV", 0, 4096), (f"_pg._tcp.{svc('db')}", "SRV", 0, 512),
    (svc("nope"), "A", 0, 1232), ("example.com", "MX", -1, 0), (svc("alias"), "A", -1, 0),
    (f"127-0-10-1.default.pod.{DOMAIN}", "A", 0, 1400),
])
def test_cached_answers_equal_fresh_ones(cluster, name, rdtype, edns, payload):
    """Repeated questions (another ID, other letter case) are answered from the response
    cache; they must say what a fresh server says, byte for byte when order cannot differ."""
    cached_server = ClusterDNS(lambda: cluster.snapshot, DOMAIN, get_pods=cluster.pods)
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(name))
    for udp_flag in (True, False):
        for _ in range(10):       # past the orders kept of a multi-record answer
            cached_server.handle(dns.message.make_query(name, rdtype, use_edns=edns, payload=payload).to_wire(), udp_flag)
        second = dns.message.make_query(mixed, rdtype, use_edns=edns, payload=payload)
        got = cached_server.handle(second.to_wire(), udp_flag)
        fresh = ClusterDNS(lambda: cluster.snapshot, DOMAIN, get_pods=cluster.pods).handle(second.to_wire(), udp_flag)
        assert _sections(got) == _sections(fresh)
        if not any(len(rrset) > 1 for rrset in dns.message.from_wire(fresh).answer):
            assert got == fresh
        assert dns.message.from_wire(got).question[0].name.to_text() == mixed + "."


def test_headless_answers_rotate(server):
    firsts = set()
    for _ in range(40):
        r = udp(server, svc("db"))
        firsts.add(r.answer[0][0].to_text())
    assert len(firsts) > 1


# -- snapshots --------------------------------------------------------------------------------------


SMALL = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 127.96.0.10
  ports: [{name: http, port: 8000}]
"""


def test_zone_is_built_once_per_snapshot_version_and_follows_changes():
    c = Cluster(SMALL)
    server = ClusterDNS(lambda: c.snapshot, DOMAIN, get_pods=c.pods)
    z1 = server.zone()
    assert server.zone() is z1
    q = dns.message.make_query(svc("web"), "A").to_wire()
    assert dns.message.from_wire(server.handle(q, True)).rcode() == dns.rcode.NOERROR
    web = c.store.get("Service", "default", "web")
    c.apply([Event(DELETED, web)])
    assert server.zone() is not z1
    assert dns.message.from_wire(server.handle(q, True)).rcode() == dns.rcode.NXDOMAIN


def test_no_snapshot_yet_is_servfail():
    server = ClusterDNS(lambda: None)
    q = dns.message.make_query(svc("web"), "A").to_wire()
    assert dns.message.from_wire(server.handle(q, True)).rcode() == dns.rcode.SERVFAIL
    q = dns.message.make_query("example.com", "A").to_wire()
    assert dns.message.from_wire(server.handle(q, True)).rcode() == dns.rcode.REFUSED


def test_other_cluster_domain(cluster):
    c = cluster
    server = ClusterDNS(lambda: c.snapshot, "corp.internal.")
    q = dns.message.make_query("web.default.svc.corp.internal", "A").to_wire()
    assert values(dns.message.from_wire(server.handle(q, True)), "A") == {"127.96.0.10"}
    q = dns.message.make_query(svc("web"), "A").to_wire()
    assert dns.message.from_wire(server.handle(q, True)).rcode() == dns.rcode.REFUSED


# -- the same with dig --------------------------------------------------------------------------------


DIG_CASES = [
    # name, type, extra options, status, expected answer rdata of that type (None: not checked)
    (svc("web"), "A", (), "NOERROR", {"127.96.0.10"}),
    (svc("web"), "AAAA", (), "NOERROR", set()),
    (svc("six"), "AAAA", (), "NOERROR", {"fd00:96::10"}),
    (svc("db"), "A", (), "NOERROR", {"127.0.11.1", "127.0.11.2", "127.0.11.4"}),
    (f"_http._tcp.{svc('web')}", "SRV", (), "NOERROR", {f"0 100 8000 {svc('web')}."}),
    (f"_pg._tcp.{svc('db')}", "SRV", (), "NOERROR",
     {f"0 33 5432 db-0.{svc('db')}.", f"0 33 5432 db-1.{svc('db')}.", f"0 33 5432 127-0-11-4.{svc('db')}."}),
    (f"db-0.{svc('db')}", "A", (), "NOERROR", {"127.0.11.1"}),
    (f"127-0-10-2.default.pod.{DOMAIN}", "A", (), "NOERROR", {"127.0.10.2"}),
    (svc("ext"), "CNAME", (), "NOERROR", None),
    (svc("nope"), "A", (), "NXDOMAIN", set()),
    (f"default.svc.{DOMAIN}", "A", (), "NOERROR", set()),
    ("example.com", "A", (), "REFUSED", set()),
    (svc("web"), "A", ("+tcp",), "NOERROR", {"127.96.0.10"}),
]


@pytest.mark.parametrize("name,rdtype,opts,status,expected", DIG_CASES)
def test_dig(server, name, rdtype, opts, status, expected):
    r = dig(server, name, rdtype, *opts)
    assert r.status == status, r.text
    if expected is not None:
        assert r.rdata(rdtype) == expected, r.text
    if status in ("NXDOMAIN",) or (status == "NOERROR" and expected == set()):
        assert r.rdata("SOA", "authority"), r.text
    if status != "REFUSED":
        assert "aa" in r.flags


def test_dig_externalname_cname(server):
    r = dig(server, svc("ext"), "A")
    assert r.rdata("CNAME") == {"upstream.example.com."}, r.text


def test_dig_truncation_and_tcp_fallback(server):
    r = dig(server, svc("big"), "A", "+ignore", "+noedns")
    assert "tc" in r.flags, r.text
    r = dig(server, svc("big"), "A", "+noedns")          # dig retries over TCP by itself
    assert "tc" not in r.flags and len(r.rdata("A")) == 60, r.text
    srv = f"_http._tcp.{svc('big')}"
    r = dig(server, srv, "SRV", "+ignore")               # EDNS 1232 is not enough for 60 SRV
    assert "tc" in r.flags, r.text
    r = dig(server, srv, "SRV")
    assert "tc" not in r.flags and len(r.rdata("SRV")) == 60, r.text
