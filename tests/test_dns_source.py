"""The DNS source (discovery.sources.dns): which Services it looks up, the slices it makes, how it
follows TTLs, and what it does when DNS fails.

Three layers: pure functions (table-driven), a scripted DNS server in the test's event loop for
exact rcodes / TTLs / timeouts, and dnsmasq — a real DNS server on 127.0.0.1 — whose records
change while the source runs, with a SERVFAIL period (a validating dnsmasq in front of the
authoritative one, given a trust anchor no unsigned answer can satisfy) and an outage.

Where a test asserts when refreshes happen (TTL clamping, back-off, negative caching) the
source runs on the ``clock`` fixture (``DnsSource(loop=clocked(clock))``) and the test moves
the clock from one due refresh to the next (``refresh_until``): the schedule is then exact, and
the real time it takes only bounds a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import grp
import signal
import subprocess
import time
from types import MappingProxyType

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from conftest import free_port, requires

from discovery.endpoints import compute_endpoint_sets
from discovery.manifests import load_text
from discovery.objects import Meta, Service, ServicePort
from discovery.sources.dns import (
    ANN_DNS,
    ANN_DNS_QUERY,
    ANN_DNS_SRV,
    ANN_MADE_BY,
    Answer,
    DnsSource,
    Query,
    Target,
    build_slices,
    parse_servers,
    query_for,
    slice_events,
    srv_weight,
)
from discovery.store import ADDED, DELETED, MODIFIED, Store
from meshproxy.core import metrics
from meshproxy.observe import MetricSignals


def service(name: str, *, ns: str = "default", annotations: dict | None = None, type: str = "ClusterIP",
            external_name: str | None = None, ports=(ServicePort("http", 80, 8080),), selector=None) -> Service:
    return Service(meta=Meta(name=name, namespace=ns, annotations=MappingProxyType(annotations or {})),
                   type=type, external_name=external_name, ports=tuple(ports), selector=selector)


# -- pure: what to look up ------------------------------------------------------------------------


@pytest.mark.parametrize("svc,expected", [
    (service("a", annotations={ANN_DNS: "web.example.com"}), Query("A", "web.example.com.")),
    (service("a", annotations={ANN_DNS: "web.example.com."}), Query("A", "web.example.com.")),
    (service("a", annotations={ANN_DNS_SRV: "_http._tcp.api.example.com"}), Query("SRV", "_http._tcp.api.example.com.")),
    (service("a", annotations={ANN_DNS: "x.example", ANN_DNS_SRV: "_h._tcp.y.example"}), Query("SRV", "_h._tcp.y.example.")),
    (service("a", annotations={ANN_DNS: " 127.0.0.9 "}), Query("IP", "127.0.0.9")),
    (service("a", type="ExternalName", external_name="db.example.org", ports=()), Query("A", "db.example.org.")),
    (service("a", type="ExternalName", external_name="db.example.org", annotations={ANN_DNS: "o.example"}), Query("A", "o.example.")),
    (service("a"), None),
    (service("a", annotations={"other": "x"}), None),
])
def test_query_for(svc, expected):
    assert query_for(svc) == expected


@pytest.mark.parametrize("value", ["a..b", "x" * 64 + ".example", "."])
def test_query_for_refuses_names_that_are_not_names(value):
    with pytest.raises(ValueError):
        query_for(service("a", annotations={ANN_DNS: value}))


def test_parse_servers():
    assert parse_servers(["127.0.0.1:5353", "10.0.0.1", "[::1]:53", "fd00::1"]) == [
        ("127.0.0.1", 5353), ("10.0.0.1", 53), ("::1", 53), ("fd00::1", 53)]
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:x"):
        with pytest.raises(ValueError):
            parse_servers([bad])


# -- pure: the slices -------------------------------------------------------------------------------


def test_slices_for_addresses_use_numeric_target_ports_else_the_port():
    svc = service("web", annotations={ANN_DNS: "web.example.com"},
                  ports=(ServicePort("http", 80, 8080), ServicePort("admin", 9000, "admin-port")))
    q = query_for(svc)
    slices = build_slices(svc, Answer((Target("10.0.0.1"), Target("10.0.0.2"), Target("fd00::1")), 30, "NOERROR"), q)
    assert sorted(slices) == ["web-dns", "web-dns-v6"]
    v4, v6 = slices["web-dns"], slices["web-dns-v6"]
    assert (v4.address_type, v6.address_type) == ("IPv4", "IPv6")
    assert [e.addresses for e in v4.endpoints] == [("10.0.0.1",), ("10.0.0.2",)]
    assert [(p.name, p.port) for p in v4.ports] == [("http", 8080), ("admin", 9000)]
    assert v4.service == "web" and v4.namespace == "default"
    assert v4.meta.labels["kubernetes.io/service-name"] == "web"
    assert v4.meta.annotations[ANN_MADE_BY] == "dns"
    assert v4.meta.annotations[ANN_DNS_QUERY] == "A/AAAA web.example.com."
    # endpoints.py reads them like any selector-less service's slices
    sets = compute_endpoint_sets(svc, [], slices.values())
    assert {(e.ip, e.port) for e in sets[0].endpoints} == {("10.0.0.1", 8080), ("10.0.0.2", 8080), ("fd00::1", 8080)}
    assert {(e.ip, e.port) for e in sets[1].endpoints} == {("10.0.0.1", 9000), ("10.0.0.2", 9000), ("fd00::1", 9000)}


def test_slices_for_srv_carry_port_and_weight():
    svc = service("api", annotations={ANN_DNS_SRV: "_http._tcp.api.example.com"})
    q = query_for(svc)
    answer = Answer((Target("10.0.0.1", 8081, 10), Target("10.0.0.2", 8082, 30), Target("10.0.0.3", 8081, 0)), 5, "NOERROR")
    slices = build_slices(svc, answer, q)
    assert sorted(slices) == ["api-dns-p8081", "api-dns-p8082"]
    assert [(e.addresses[0], srv_weight(e.target)) for e in slices["api-dns-p8081"].endpoints] == [("10.0.0.1", 10), ("10.0.0.3", 0)]
    assert [p.port for p in slices["api-dns-p8082"].ports] == [8082]
    sets = compute_endpoint_sets(svc, [], slices.values())
    assert {(e.ip, e.port, srv_weight(e.pod), e.weight) for e in sets[0].endpoints} == {
        ("10.0.0.1", 8081, 10, 10), ("10.0.0.2", 8082, 30, 30), ("10.0.0.3", 8081, 0, 0)}
    # ... and the snapshot's backend is marked weighted, so the balancers honour the weights
    from meshproxy.core.settings import Settings
    from meshproxy.core.snapshot import SnapshotBuilder
    backends = SnapshotBuilder(Settings())._backends_for(svc, sets, None, [])
    assert backends[0].weighted and {e.weight for e in backends[0].usable} == {0, 10, 30}
    one_port = build_slices(svc, Answer((Target("10.0.0.1", 8081, 10),), 5, "NOERROR"), q)
    assert list(one_port) == ["api-dns"]


def test_weights_are_read_only_from_slices_the_dns_source_made():
    """``srv-weight=<w>`` on an endpoint of someone else's slice is a name, not a weight."""
    svc = service("api", annotations={ANN_DNS_SRV: "_http._tcp.api.example.com"})
    answer = Answer((Target("10.0.0.1", 8081, 10), Target("10.0.0.2", 8081, 30)), 5, "NOERROR")
    ours = build_slices(svc, answer, query_for(svc))["api-dns"]
    assert [e.weight for e in compute_endpoint_sets(svc, [], [ours])[0].endpoints] == [10, 30]
    foreign = dataclasses.replace(ours, meta=dataclasses.replace(ours.meta, annotations=MappingProxyType({})))
    assert [e.weight for e in compute_endpoint_sets(svc, [], [foreign])[0].endpoints] == [1, 1]
    # A/AAAA answers carry no weight: 1, and the backend is not weighted
    web = service("web", annotations={ANN_DNS: "web.example.com"})
    sl = build_slices(web, Answer((Target("10.0.0.1"), Target("10.0.0.2")), 5, "NOERROR"), query_for(web))
    assert [e.weight for e in compute_endpoint_sets(web, [], sl.values())[0].endpoints] == [1, 1]


def test_externalname_service_takes_its_endpoints_from_the_dns_slices():
    from discovery.store import EndpointIndex, Event
    svc = service("search", type="ExternalName", external_name="search.example.com",
                  ports=(ServicePort("http", 80, 9200),))
    store = Store()
    index = EndpointIndex(store)
    slices = build_slices(svc, Answer((Target("10.0.0.5"), Target("10.0.0.6")), 5, "NOERROR"), query_for(svc))
    index.on_changes(store.apply([Event(ADDED, svc), *(Event(ADDED, sl) for sl in slices.values())]))
    index.recompute()
    sets = index.sets[("default", "search")]
    assert [(e.ip, e.port) for e in sets[0].usable] == [("10.0.0.5", 9200), ("10.0.0.6", 9200)]


def test_no_address_is_one_empty_slice():
    svc = service("web", annotations={ANN_DNS: "gone.example.com"})
    slices = build_slices(svc, Answer((), 5, "NXDOMAIN"), query_for(svc))
    assert list(slices) == ["web-dns"] and slices["web-dns"].endpoints == ()
    assert compute_endpoint_sets(svc, [], slices.values())[0].endpoints == ()


def test_slice_events():
    svc = service("web", annotations={ANN_DNS: "w.example"})
    q = query_for(svc)
    a = build_slices(svc, Answer((Target("10.0.0.1"),), 5, "NOERROR"), q)
    b = build_slices(svc, Answer((Target("10.0.0.2"), Target("fd00::2")), 5, "NOERROR"), q)
    assert [(e.type, e.obj.name) for e in slice_events({}, a)] == [(ADDED, "web-dns")]
    assert slice_events(a, dict(a)) == []
    assert sorted((e.type, e.obj.name) for e in slice_events(a, b)) == [(ADDED, "web-dns-v6"), (MODIFIED, "web-dns")]
    assert [(e.type, e.obj.name) for e in slice_events(b, {})] == [(DELETED, "web-dns"), (DELETED, "web-dns-v6")]


def test_source_refuses_bad_ttl_bounds():
    for lo, hi in ((0, 5), (5, 1), (-1, 1)):
        with pytest.raises(ValueError):
            DnsSource(lambda ev: None, [("127.0.0.1", 53)], lo, hi)


# -- a scripted DNS server -----------------------------------------------------------------------


class Scripted(asyncio.DatagramProtocol):
    """Answers from ``records``: (name, type) -> (ttl, [rdata text]). A name with a CNAME is
    followed like a recursive resolver would. ``mode``: "ok", "servfail", "drop"; ``fail``:
    (name, type) pairs answered SERVFAIL. Negative answers carry an SOA whose minimum is
    ``negative_ttl``."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.mode = "ok"
        self.fail: set[tuple[str, str]] = set()
        self.negative_ttl = 1
        self.queries: list[tuple[str, str, float]] = []     # (name, type, clock() when asked)
        self.clock = time.monotonic
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def count(self, name: str, rdtype: str, since: float = 0.0) -> int:
        return sum(1 for n, t, at in self.queries if n == name and t == rdtype and at >= since)

    def datagram_received(self, data, addr):
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text().lower()
        rdtype = dns.rdatatype.to_text(q.question[0].rdtype)
        self.queries.append((name, rdtype, self.clock()))
        if self.mode == "drop":
            return
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        if self.mode == "servfail" or (name, rdtype) in self.fail:
            r.set_rcode(dns.rcode.SERVFAIL)
            self.transport.sendto(r.to_wire(), addr)
            return
        current = name
        for _ in range(8):
            if (current, "CNAME") in self.records and rdtype != "CNAME":
                ttl, values = self.records[(current, "CNAME")]
                r.answer.append(dns.rrset.from_text_list(current, ttl, "IN", "CNAME", values))
                current = values[0].lower()
                continue
            break
        if (current, rdtype) in self.records:
            ttl, values = self.records[(current, rdtype)]
            r.answer.append(dns.rrset.from_text_list(current, ttl, "IN", rdtype, values))
            if rdtype == "SRV":
                for v in values:
                    target = v.split()[3].lower()
                    if (target, "A") in self.records and ("glue", target) in self.records:
                        gttl, gv = self.records[(target, "A")]
                        r.additional.append(dns.rrset.from_text_list(target, gttl, "IN", "A", gv))
        else:
            exists = any(n == current for n, _ in self.records)
            if not exists:
                r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(dns.rrset.from_text("example.", self.negative_ttl + 100, "IN", "SOA",
                                                   f"ns.example. h.example. 1 2 3 4 {self.negative_ttl}"))
        self.transport.sendto(r.to_wire(), addr)


async def scripted_server() -> Scripted:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(Scripted, local_addr=("127.0.0.1", 0))
    proto.port = proto.transport.get_extra_info("sockname")[1]
    return proto


class Sink:
    """Collects what the source emits, into a Store like the controller's."""

    def __init__(self) -> None:
        self.store = Store()
        self.events: list = []

    def __call__(self, events) -> None:
        self.events.extend(events)
        self.store.apply(events)

    def slices(self, svc: str, ns: str = "default"):
        return [s for (sns, _), s in self.store.items("EndpointSlice").items() if sns == ns and s.service == svc]

    def addresses(self, svc: str, ns: str = "default") -> set:
        out = set()
        for s in self.slices(svc, ns):
            for e in s.endpoints:
                out.add((e.addresses[0], s.ports[0].port if s.ports else None, srv_weight(e.target)))
        return out

    def count(self, svc: str) -> int:
        return sum(1 for e in self.events if e.obj.service == svc)


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Wait for ``predicate()``; ``timeout`` only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def lookup_state(src: DnsSource, svc: str, ns: str = "default") -> dict:
    return next(x for x in src.state()["lookups"] if x["service"] == f"{ns}/{svc}")


def clocked(clock):
    """The running loop with ``clock``'s time and timers, for ``DnsSource(loop=...)``."""
    return clock.on(asyncio.get_running_loop())


async def settle(src: DnsSource, clock) -> None:
    """Wait until every refresh due by ``clock`` has run and been applied."""
    await wait_for(lambda: not src._inflight and (not src._heap or src._heap[0][0] > clock()),
                   what="the refreshes due to run")


async def refresh_until(src: DnsSource, clock, end: float) -> None:
    """Move the clock from one due refresh to the next (a microsecond past it: the clock's
    float arithmetic must not leave it a hair early), running each, up to ``end``."""
    await settle(src, clock)
    while src._heap and src._heap[0][0] <= end:
        clock.advance(src._heap[0][0] - clock() + 1e-6)
        await settle(src, clock)
    if end > clock():
        clock.advance(end - clock())


def test_answers_follow_ttl_clamped_to_bounds(run, clock):
    async def main():
        dns_ = await scripted_server()
        dns_.clock = clock
        dns_.records[("long.example.", "A")] = (3600, ["10.0.0.1"])
        dns_.records[("zero.example.", "A")] = (0, ["10.0.0.2"])
        dns_.negative_ttl = 3600             # the AAAA NODATA must not shorten the refresh
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.3, max_ttl=1.0, timeout=0.5,
                        loop=clocked(clock))
        src.sync({("default", "long"): service("long", annotations={ANN_DNS: "long.example"}),
                  ("default", "zero"): service("zero", annotations={ANN_DNS: "zero.example"})})
        src.start()
        try:
            await settle(src, clock)
            assert sink.addresses("long") and sink.addresses("zero")
            t0 = clock()
            long_state = lookup_state(src, "long")
            assert long_state["ttl"] == 3600 and long_state["nextRefreshIn"] == 1.0   # max_ttl
            assert lookup_state(src, "zero")["nextRefreshIn"] == 0.3                 # min_ttl
            await refresh_until(src, clock, t0 + 1.25)
            # ttl 0 -> every min_ttl (0.3 s): 4 lookups in 1.25 s; ttl 3600 -> every max_ttl: 1
            assert [round(at - t0, 3) for n, t, at in dns_.queries if n == "zero.example." and t == "A"] == \
                [0.0, 0.3, 0.6, 0.9, 1.2]
            assert [round(at - t0, 3) for n, t, at in dns_.queries if n == "long.example." and t == "A"] == [0.0, 1.0]
            assert sink.count("zero") == 1          # unchanged answers emit nothing
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_servfail_keeps_the_last_good_answer_and_retries_within_min_ttl(run, clock):
    async def main():
        dns_ = await scripted_server()
        dns_.clock = clock
        dns_.records[("web.example.", "A")] = (0, ["10.0.0.1", "10.0.0.2"])
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.8, max_ttl=5, timeout=0.5,
                        signals=MetricSignals(), loop=clocked(clock))
        src.sync({("default", "web"): service("web", annotations={ANN_DNS: "web.example"})})
        src.start()
        try:
            await settle(src, clock)
            assert sink.addresses("web") == {("10.0.0.1", 8080, None), ("10.0.0.2", 8080, None)}
            emitted = len(sink.events)
            dns_.mode = "servfail"
            dns_.records[("web.example.", "A")] = (0, ["10.0.0.3"])
            t0 = clock()
            await refresh_until(src, clock, t0 + 0.8 + 2.5)      # the refresh, then ~5 retries
            st = lookup_state(src, "web")
            assert st["state"] == "stale" and "SERVFAIL" in st["lastError"], st
            assert src.state()["up"] is False
            assert metrics.REGISTRY.get_sample_value("meshproxy_source_up", {"source": "dns"}) == 0
            assert len(sink.events) == emitted, "a failure must not change the endpoints"
            assert sink.addresses("web") == {("10.0.0.1", 8080, None), ("10.0.0.2", 8080, None)}
            # back-off: 0.25 s, doubled per failure, never over min_ttl (0.8 s), each shortened
            # by up to a fifth of itself (jitter)
            times = [at for n, t, at in dns_.queries if n == "web.example." and t == "A" and at > t0]
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert len(gaps) >= 4, gaps
            for i, gap in enumerate(gaps[:4]):
                full = min(0.8, 0.25 * 2 ** i)
                assert 0.8 * full - 1e-3 <= gap <= full + 1e-3, (i, gaps)
            dns_.mode = "ok"
            await refresh_until(src, clock, clock() + 0.8)
            assert sink.addresses("web") == {("10.0.0.3", 8080, None)}
            assert lookup_state(src, "web")["state"] == "ok" and src.state()["up"] is True
            assert metrics.REGISTRY.get_sample_value("meshproxy_source_up", {"source": "dns"}) == 1
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_timeouts_keep_the_last_good_answer(run):
    async def main():
        dns_ = await scripted_server()
        dns_.records[("web.example.", "A")] = (0, ["10.0.0.1"])
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.2, max_ttl=5, timeout=0.3)
        src.sync({("default", "web"): service("web", annotations={ANN_DNS: "web.example"})})
        src.start()
        try:
            await wait_for(lambda: sink.addresses("web"))
            dns_.mode = "drop"
            await wait_for(lambda: lookup_state(src, "web")["failures"] >= 2, timeout=10)
            assert lookup_state(src, "web")["lastError"] == "timeout"
            assert sink.addresses("web") == {("10.0.0.1", 8080, None)} and sink.count("web") == 1
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_nxdomain_and_nodata_give_an_empty_endpoint_set_refreshed_by_the_soa(run, clock):
    async def main():
        dns_ = await scripted_server()
        dns_.records[("web.example.", "A")] = (0, ["10.0.0.1"])
        dns_.records[("v6only.example.", "AAAA")] = (0, ["fd00::1"])
        dns_.negative_ttl = 2
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.1, max_ttl=10, timeout=0.5,
                        loop=clocked(clock))
        src.sync({("default", "web"): service("web", annotations={ANN_DNS: "web.example"}),
                  ("default", "six"): service("six", annotations={ANN_DNS: "v6only.example"})})
        src.start()
        try:
            await settle(src, clock)
            assert sink.addresses("six") == {("fd00::1", 8080, None)}       # A: NODATA, AAAA: answer
            del dns_.records[("web.example.", "A")]
            await refresh_until(src, clock, clock() + 0.1)                   # ttl 0: min_ttl
            assert sink.slices("web") and not sink.addresses("web")
            st = lookup_state(src, "web")
            assert st["rcode"] == "NXDOMAIN" and st["failures"] == 0
            assert st["nextRefreshIn"] == 2.0, "negative answers are cached for the SOA minimum"
            assert [s.name for s in sink.slices("web")] == ["web-dns"]
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_cname_chain_ttl_is_the_smallest(run):
    async def main():
        dns_ = await scripted_server()
        dns_.records[("alias.example.", "CNAME")] = (2, ["real.example."])
        dns_.records[("real.example.", "A")] = (300, ["10.0.0.7"])
        dns_.negative_ttl = 3600
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.1, max_ttl=100, timeout=0.5)
        src.sync({("default", "ext"): service("ext", type="ExternalName", external_name="alias.example", ports=())})
        src.start()
        try:
            await wait_for(lambda: lookup_state(src, "ext")["state"] == "ok")
            st = lookup_state(src, "ext")
            assert st["targets"] == ["10.0.0.7"] and st["ttl"] == 2
            # an ExternalName service without ports: one slice, no ports, the address kept
            assert [(s.name, s.ports, s.endpoints[0].addresses) for s in sink.slices("ext")] == [("ext-dns", (), ("10.0.0.7",))]
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_one_address_family_failing_keeps_its_last_addresses(run):
    async def main():
        dns_ = await scripted_server()
        dns_.records[("web.example.", "A")] = (0, ["10.0.0.1"])
        dns_.records[("web.example.", "AAAA")] = (0, ["fd00::1"])
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.2, max_ttl=5, timeout=0.5)
        src.sync({("default", "web"): service("web", annotations={ANN_DNS: "web.example"})})
        src.start()
        try:
            await wait_for(lambda: {a[0] for a in sink.addresses("web")} == {"10.0.0.1", "fd00::1"})
            dns_.fail.add(("web.example.", "AAAA"))
            dns_.records[("web.example.", "A")] = (1, ["10.0.0.2"])
            await wait_for(lambda: {a[0] for a in sink.addresses("web")} == {"10.0.0.2", "fd00::1"}, timeout=10)
            assert lookup_state(src, "web")["failures"] >= 1
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_srv_uses_the_lowest_priority_group_that_has_addresses(run):
    async def main():
        dns_ = await scripted_server()
        dns_.records[("_http._tcp.api.example.", "SRV")] = (0, [
            "0 10 8081 a.example.", "0 30 8082 b.example.", "10 5 8083 c.example."])
        dns_.records[("a.example.", "A")] = (60, ["10.0.1.1"])
        dns_.records[("glue", "a.example.")] = (0, [])          # a's address goes in the additional section
        dns_.records[("b.example.", "A")] = (60, ["10.0.1.2"])
        dns_.records[("c.example.", "A")] = (60, ["10.0.1.3"])
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.2, max_ttl=5, timeout=0.5)
        src.sync({("default", "api"): service("api", annotations={ANN_DNS_SRV: "_http._tcp.api.example"})})
        src.start()
        try:
            await wait_for(lambda: sink.addresses("api"))
            assert sink.addresses("api") == {("10.0.1.1", 8081, 10), ("10.0.1.2", 8082, 30)}
            assert dns_.count("a.example.", "A") == 0, "the additional section's address is used"
            assert dns_.count("b.example.", "A") >= 1 and dns_.count("c.example.", "A") == 0
            # group 0's targets fail: that group may have addresses we cannot see -> keep the last answer
            dns_.fail.update({("b.example.", "A"), ("b.example.", "AAAA")})
            del dns_.records[("glue", "a.example.")]
            del dns_.records[("a.example.", "A")]
            before = sink.count("api")
            await wait_for(lambda: lookup_state(src, "api")["failures"] >= 2, timeout=10)
            assert sink.count("api") == before and "b.example" in lookup_state(src, "api")["lastError"]
            # group 0's targets are gone (NXDOMAIN): group 10 takes over
            dns_.fail.clear()
            del dns_.records[("b.example.", "A")]
            await wait_for(lambda: sink.addresses("api") == {("10.0.1.3", 8083, 5)}, timeout=10)
            assert [s.name for s in sink.slices("api")] == ["api-dns"]
            # the SRV name itself goes away: empty
            del dns_.records[("_http._tcp.api.example.", "SRV")]
            await wait_for(lambda: not sink.addresses("api"), timeout=10)
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_sync_starts_changes_and_stops_lookups(run):
    async def main():
        dns_ = await scripted_server()
        dns_.records[("one.example.", "A")] = (30, ["10.0.0.1"])
        dns_.records[("two.example.", "A")] = (30, ["10.0.0.2"])
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=0.2, max_ttl=60, timeout=0.5)
        src.start()
        try:
            web = service("web", annotations={ANN_DNS: "one.example"})
            plain = service("plain", selector=MappingProxyType({"app": "x"}))
            src.sync({("default", "web"): web, ("default", "plain"): plain})
            await wait_for(lambda: sink.addresses("web") == {("10.0.0.1", 8080, None)})
            assert [x["service"] for x in src.state()["lookups"]] == ["default/web"]
            # a port change re-slices at once, without asking DNS again
            asked = len(dns_.queries)
            web2 = service("web", annotations={ANN_DNS: "one.example"}, ports=(ServicePort("http", 80, 9090),))
            src.sync({("default", "web"): web2})
            assert sink.addresses("web") == {("10.0.0.1", 9090, None)} and len(dns_.queries) == asked
            assert sink.events[-1].type == MODIFIED
            # another name: looked up now; the old slices stay until it answers
            src.sync({("default", "web"): service("web", annotations={ANN_DNS: "two.example"})})
            assert sink.addresses("web") == {("10.0.0.1", 8080, None)} or sink.addresses("web") == {("10.0.0.1", 9090, None)}
            await wait_for(lambda: sink.addresses("web") == {("10.0.0.2", 8080, None)})
            # the annotation goes: the slices go
            src.sync({("default", "web"): service("web")})
            assert sink.slices("web") == [] and sink.events[-1].type == DELETED
            assert src.state()["lookups"] == []
            # a selector with the annotation: reported, since endpoints.py ignores the slices
            src.sync({("default", "sel"): service("sel", annotations={ANN_DNS: "one.example"},
                                                   selector=MappingProxyType({"app": "x"}))})
            assert any("has a selector" in p for p in src.state()["problems"])
            src.sync({("default", "bad"): service("bad", annotations={ANN_DNS: "a..b"})})
            assert any("Service/default/bad" in p for p in src.state()["problems"])
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_through_the_controller_to_the_snapshot(run):
    """The source wired as the lead wires it: emit -> Controller.apply_events(source="dns"),
    sync with the store's Services; the snapshot's backend gets the DNS addresses."""
    from meshproxy.controller import Controller
    from meshproxy.core.settings import Settings
    from discovery.store import Event

    async def main():
        dns_ = await scripted_server()
        dns_.records[("web.mesh.test.", "A")] = (0, ["127.0.30.1", "127.0.30.2"])
        controller = Controller(Settings(), publish=lambda snap: None)
        src = DnsSource(lambda events: controller.apply_events(events, source="dns"),
                        [("127.0.0.1", dns_.port)], min_ttl=0.1, max_ttl=5, timeout=0.5)
        objs = load_text(MANIFEST).objects
        controller.apply_events([Event(ADDED, o) for o in objs])
        src.sync(controller.store.items("Service"))
        src.start()
        before = metrics.REGISTRY.get_sample_value(
            "meshproxy_source_events_total", {"source": "dns", "kind": "EndpointSlice", "type": "ADDED"}) or 0
        try:
            def usable():
                snap = controller.snapshot
                b = snap.backends.get(("default", "web", "http")) if snap else None
                return {e.addr for e in b.usable} if b else set()
            await wait_for(lambda: usable() == {("127.0.30.1", 8080), ("127.0.30.2", 8080)}, what="backend endpoints")
            assert metrics.REGISTRY.get_sample_value(
                "meshproxy_source_events_total", {"source": "dns", "kind": "EndpointSlice", "type": "ADDED"}) > before
            dns_.records[("web.mesh.test.", "A")] = (0, ["127.0.30.3"])
            await wait_for(lambda: usable() == {("127.0.30.3", 8080)}, what="the changed address")
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


def test_literal_addresses_need_no_dns(run):
    async def main():
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", 9)], min_ttl=1, max_ttl=60)
        src.sync({("default", "ip"): service("ip", annotations={ANN_DNS: "127.0.0.42"})})
        src.start()
        try:
            await wait_for(lambda: sink.addresses("ip") == {("127.0.0.42", 8080, None)})
        finally:
            await src.stop()
    run(main())


def test_one_scheduler_task_for_many_names(run):
    async def main():
        dns_ = await scripted_server()
        services = {}
        for i in range(100):
            dns_.records[(f"n{i}.example.", "A")] = (1, [f"10.1.{i // 256}.{i % 256}"])
            services[("default", f"s{i}")] = service(f"s{i}", annotations={ANN_DNS: f"n{i}.example"})
        sink = Sink()
        before = len(asyncio.all_tasks())
        src = DnsSource(sink, [("127.0.0.1", dns_.port)], min_ttl=5, max_ttl=60, timeout=1)
        src.sync(services)
        src.start()
        try:
            await wait_for(lambda: sum(1 for sl in sink.store.items("EndpointSlice").values() if sl.endpoints) == 100)
            await wait_for(lambda: not src._inflight, what="the lookups to end")
            await asyncio.sleep(0)
            assert len(asyncio.all_tasks()) == before + 1, "idle: only the scheduler task lives"
        finally:
            await src.stop()
            dns_.transport.close()
    run(main())


# -- dnsmasq ---------------------------------------------------------------------------------------


# A root trust anchor no answer can satisfy: the validating dnsmasq turns every answer from
# the (unsigned) authoritative one into SERVFAIL ("DNSSEC Bogus").
BOGUS_ANCHOR = "trust-anchor=.,12345,8,2,49FD46E6C4B45C55D4AC69CBD3CD34AC1AFE51DE6B2A0D7A1E5C9E2F8F3D7E11"


class Dnsmasq:
    """One dnsmasq process on 127.0.0.1:port with a config file; stopped by its own pid."""

    def __init__(self, binary: str, workdir, name: str, lines: list[str], port: int | None = None) -> None:
        self.binary = binary
        self.dir = workdir
        self.name = name
        self.port = port or free_port("127.0.0.1", udp=True)     # dnsmasq binds both, without SO_REUSEPORT
        self.conf = workdir / f"{name}.conf"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.write(lines)

    def write(self, lines: list[str]) -> None:
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--no-daemon", f"--port={self.port}", "--listen-address=127.0.0.1",
                 "--bind-interfaces", f"--conf-file={self.conf}", f"--pid-file={self.dir / (self.name + '.pid')}",
                 # stay this user: dnsmasq must re-read files in the test's private directory on SIGHUP
                 f"--user={user}", f"--group={group}", "--log-queries"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20       # bounds a hang: dnsmasq answers within ms
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                dns.query.udp(dns.message.make_query("probe.invalid.", "A"), "127.0.0.1", port=self.port, timeout=0.2)
                return
            except (dns.exception.Timeout, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"dnsmasq {self.name} does not answer: {self.log.read_text()[-2000:]}")

    def reload(self) -> None:
        """SIGHUP: dnsmasq re-reads its hosts files (not its config)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, lines: list[str] | None = None) -> None:
        self.stop()
        if lines is not None:
            self.write(lines)
        self.start()


@pytest.fixture
def dnsmasq_bin():
    return requires("dnsmasq")


MANIFEST = """
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  annotations: {meshproxy.dev/dns: web.mesh.test}
spec:
  clusterIP: 127.96.5.1
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: default
  annotations: {meshproxy.dev/dns-srv: _http._tcp.api.mesh.test}
spec:
  clusterIP: 127.96.5.2
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: ext.mesh.test}
"""


def test_against_dnsmasq_record_changes_servfail_period_and_outage(dnsmasq_bin, tmp_path, run):
    hosts = tmp_path / "hosts"

    def set_hosts(entries: dict[str, list[str]]) -> None:
        hosts.write_text("".join(f"{ip} {name}\n" for name, ips in entries.items() for ip in ips))

    records = {"web.mesh.test": ["127.0.20.1", "127.0.20.2"], "ext.mesh.test": ["127.0.22.1"],
               "a.mesh.test": ["127.0.21.1"], "b.mesh.test": ["127.0.21.2"], "c.mesh.test": ["127.0.21.3"]}
    set_hosts(records)
    srv = ["srv-host=_http._tcp.api.mesh.test,a.mesh.test,8081,0,10",
           "srv-host=_http._tcp.api.mesh.test,b.mesh.test,8082,0,30",
           "srv-host=_http._tcp.api.mesh.test,c.mesh.test,8083,10,5"]
    # The authoritative server: names from the hosts file and SRV records, TTL 1 s, NXDOMAIN
    # for other names in mesh.test (--local), never asks anyone.
    auth_lines = ["no-resolv", "no-hosts", f"addn-hosts={hosts}", "local=/mesh.test/", "local-ttl=1", *srv]
    auth = Dnsmasq(dnsmasq_bin, tmp_path, "auth", auth_lines)
    # The resolver meshproxy asks: forwards to the authoritative one, caches nothing.
    plain_resolver = ["no-resolv", "no-hosts", f"server=127.0.0.1#{auth.port}", "cache-size=0"]
    failing_resolver = ["no-resolv", "no-hosts", f"server=127.0.0.1#{auth.port}", "dnssec", BOGUS_ANCHOR]
    resolver = Dnsmasq(dnsmasq_bin, tmp_path, "resolver", plain_resolver)
    objs = {(o.namespace, o.name): o for o in load_text(MANIFEST).objects}

    async def main():
        sink = Sink()
        src = DnsSource(sink, [("127.0.0.1", resolver.port)], min_ttl=0.2, max_ttl=0.5, timeout=0.4)
        src.sync(objs)
        src.start()
        try:
            # 1. first answers
            await wait_for(lambda: sink.addresses("web") and sink.addresses("api") and sink.addresses("ext"),
                           what="first answers")
            assert sink.addresses("web") == {("127.0.20.1", 8080, None), ("127.0.20.2", 8080, None)}
            assert sink.addresses("ext") == {("127.0.22.1", None, None)}
            assert sink.addresses("api") == {("127.0.21.1", 8081, 10), ("127.0.21.2", 8082, 30)}
            sets = compute_endpoint_sets(objs[("default", "web")], [], sink.slices("web"))
            assert {e.addr for e in sets[0].usable} == {("127.0.20.1", 8080), ("127.0.20.2", 8080)}

            # 2. a record changes on the server: followed within a TTL or two
            records["web.mesh.test"] = ["127.0.20.2", "127.0.20.3"]
            set_hosts(records)
            auth.reload()
            await wait_for(lambda: sink.addresses("web") == {("127.0.20.2", 8080, None), ("127.0.20.3", 8080, None)},
                           timeout=4, what="the changed A records")

            # 3. SERVFAIL period: the resolver answers SERVFAIL for everything, while the
            #    records change behind it. Nothing changes in meshproxy meanwhile.
            resolver.restart(failing_resolver)
            out = dns.query.udp(dns.message.make_query("web.mesh.test.", "A"), "127.0.0.1", port=resolver.port, timeout=2)
            assert out.rcode() == dns.rcode.SERVFAIL, "the resolver must be failing now"
            emitted = len(sink.events)
            records["web.mesh.test"] = ["127.0.20.4"]
            set_hosts(records)
            auth.reload()
            await wait_for(lambda: all(lookup_state(src, s)["failures"] >= 2 for s in ("web", "api", "ext")),
                           timeout=4, what="failing lookups")
            await asyncio.sleep(0.6)                 # more refresh periods of failure
            assert len(sink.events) == emitted, [(e.type, e.obj.name) for e in sink.events[emitted:]]
            assert sink.addresses("web") == {("127.0.20.2", 8080, None), ("127.0.20.3", 8080, None)}
            assert sink.addresses("api") == {("127.0.21.1", 8081, 10), ("127.0.21.2", 8082, 30)}
            assert "SERVFAIL" in lookup_state(src, "web")["lastError"], lookup_state(src, "web")
            assert lookup_state(src, "web")["state"] == "stale"
            assert src.state()["up"] is False

            # 4. the resolver is back: the change made meanwhile arrives
            resolver.restart(plain_resolver)
            await wait_for(lambda: sink.addresses("web") == {("127.0.20.4", 8080, None)}, timeout=10,
                           what="the records after the SERVFAIL period")
            await wait_for(lambda: src.state()["up"], timeout=10, what="source up again")

            # 5. outage: no server at all (refused / timeouts) -> last answer kept
            resolver.stop()
            emitted = len(sink.events)
            await wait_for(lambda: lookup_state(src, "web")["failures"] >= 2, timeout=10, what="failing lookups")
            assert len(sink.events) == emitted and sink.addresses("web") == {("127.0.20.4", 8080, None)}
            resolver.start()

            # 6. SRV: the priority-0 targets lose their addresses -> the priority-10 group
            del records["a.mesh.test"], records["b.mesh.test"]
            set_hosts(records)
            auth.reload()
            await wait_for(lambda: sink.addresses("api") == {("127.0.21.3", 8083, 5)}, timeout=10,
                           what="SRV fallback to priority 10")
            # ... and the SRV records change (dnsmasq reads them from its config: restart it)
            auth.restart(auth_lines[:-3] + ["srv-host=_http._tcp.api.mesh.test,c.mesh.test,9000,0,50"])
            await wait_for(lambda: sink.addresses("api") == {("127.0.21.3", 9000, 50)}, timeout=10,
                           what="changed SRV records")

            # 7. the name goes away: NXDOMAIN -> an empty endpoint set, emitted
            del records["web.mesh.test"]
            set_hosts(records)
            auth.reload()
            await wait_for(lambda: sink.slices("web") and not sink.addresses("web"), timeout=10, what="NXDOMAIN")
            assert lookup_state(src, "web")["rcode"] == "NXDOMAIN"
        finally:
            await src.stop()

    auth.start()
    try:
        resolver.start()
        try:
            run(main(), timeout=60)
        finally:
            resolver.stop()
    finally:
        auth.stop()


SPLIT_MANIFEST = """
apiVersion: v1
kind: Service
metadata:
  name: split
  namespace: default
  annotations: {{meshproxy.dev/dns-srv: _http._tcp.split.mesh.test}}
spec:
  clusterIP: {cip}
  ports: [{{name: http, port: {port}}}]
"""


def test_srv_weights_split_connections_through_the_listener(dnsmasq_bin, tmp_path, run):
    """dnsmasq serves SRV records with weights 10 and 30 (and a priority-10 fallback); the
    DNS source feeds the controller, the snapshot reaches an L4 listener on the ClusterIP, and
    connections through it land about 1:3 on the two pods — none on the fallback."""
    import random as _random

    from l4 import L4Manager
    from meshproxy.controller import Controller
    from meshproxy.core.runtime import Runtime
    from meshproxy.core.settings import Settings
    from discovery.store import Event

    block = f"127.0.{_random.randint(100, 250)}"
    ips = {"a": f"{block}.1", "b": f"{block}.2", "c": f"{block}.3"}
    cip = f"127.96.{_random.randint(100, 250)}.{_random.randint(2, 250)}"
    port = free_port(cip, hold=True)
    picks = 800

    async def pod(name: str) -> asyncio.AbstractServer:
        async def greet(r, w):
            w.write(name.encode() + b"\n")
            try:
                await w.drain()
                await r.read()          # until the client closes
            except OSError:
                pass
            w.close()
        return await asyncio.start_server(greet, ips[name], 0)

    async def whoami() -> str:
        r, w = await asyncio.open_connection(cip, port)
        try:
            return (await r.readline()).decode().strip()
        finally:
            w.close()

    async def main():
        pods = {n: await pod(n) for n in ips}
        ports = {n: srv.sockets[0].getsockname()[1] for n, srv in pods.items()}
        (tmp_path / "hosts").write_text("".join(f"{ip} {n}.mesh.test\n" for n, ip in ips.items()))
        auth = Dnsmasq(dnsmasq_bin, tmp_path, "auth", [
            "no-resolv", "no-hosts", f"addn-hosts={tmp_path / 'hosts'}", "local=/mesh.test/", "local-ttl=1",
            f"srv-host=_http._tcp.split.mesh.test,a.mesh.test,{ports['a']},0,10",
            f"srv-host=_http._tcp.split.mesh.test,b.mesh.test,{ports['b']},0,30",
            f"srv-host=_http._tcp.split.mesh.test,c.mesh.test,{ports['c']},10,100"])
        auth.start()
        settings = Settings(drain_timeout=5.0, connect_timeout=2.0)
        runtime = Runtime(settings)
        controller = Controller(settings, publish=runtime.publish)
        mgr = L4Manager(runtime)
        runtime.subscribe(mgr.apply)
        src = DnsSource(lambda events: controller.apply_events(events, source="dns"),
                        [("127.0.0.1", auth.port)], min_ttl=0.5, max_ttl=5, timeout=1)
        try:
            controller.apply_events([Event(ADDED, o) for o in load_text(SPLIT_MANIFEST.format(cip=cip, port=port)).objects])
            src.sync(controller.store.items("Service"))
            src.start()

            def backend():
                snap = runtime.snapshot
                return snap.backends.get(("default", "split", "http")) if snap else None
            await wait_for(lambda: backend() is not None and len(backend().usable) == 2, what="SRV endpoints")
            assert backend().weighted
            assert {(e.ip, e.port, e.weight) for e in backend().usable} == {
                (ips["a"], ports["a"], 10), (ips["b"], ports["b"], 30)}
            assert backend().policy == "random"          # the default: what users get
            names: list[str] = []
            for _ in range(picks // 50):
                names += await asyncio.gather(*(whoami() for _ in range(50)))
            counts = {n: names.count(n) for n in ips}
            assert sum(counts.values()) == picks and counts["c"] == 0, counts
            # expected 200 : 600; binomial sd ~12, so +-60 is 5 sd
            assert 140 <= counts["a"] <= 260, counts
        finally:
            await src.stop()
            await mgr.stop_accepting()
            await mgr.drain(0)
            for srv in pods.values():
                srv.close()
            auth.stop()

    run(main(), timeout=60)
