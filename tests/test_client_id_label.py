"""The caller's identity on the golden metrics and on spans, without sockets: the per-process cap
of ``client_id`` values (a table), the route stats' per-caller children and what reaches
``/metrics`` after a flush, the inbound mesh filter choosing them, and the span attributes.
The same through a real cluster of meshed pods: tests/test_mesh_identity_metrics.py."""

from __future__ import annotations

import ipaddress
import itertools
from types import SimpleNamespace

import pytest

from l7.mesh import InboundFilter, MeshPeer
from l7.stats import RouteStats
from l7.tracing import Tracing
from meshproxy.core import metrics
from meshproxy.core.identity import SpiffeId
from meshproxy.core.policy import Peer

ID_A = "spiffe://cluster.local/ns/shop/sa/a"
ID_B = "spiffe://cluster.local/ns/shop/sa/b"
ID_C = "spiffe://cluster.local/ns/shop/sa/c"
_route_names = itertools.count()


@pytest.mark.parametrize("limit, seen, expected", [
    # Each row: the values in order, and the labels they get.
    (2, [ID_A, ID_B, ID_C], [ID_A, ID_B, "other"]),
    (2, [ID_A, ID_A, ID_B, ID_A, ID_C, ID_B], [ID_A, ID_A, ID_B, ID_A, "other", ID_B]),   # admitted stay admitted
    (1, ["", ID_A, "", ID_B], ["", ID_A, "", "other"]),                               # "" takes no place
    (0, [ID_A, ""], ["other", ""]),
    (64, [f"spiffe://td/ns/n/sa/s{i}" for i in range(70)],
     [f"spiffe://td/ns/n/sa/s{i}" for i in range(64)] + ["other"] * 6),
])
def test_bounded_label_admits_the_first_values_then_other(limit, seen, expected):
    label = metrics.BoundedLabel(limit, "other")
    assert [label(v) for v in seen] == expected
    assert len(label.seen) <= limit


def test_the_process_cap_is_64_and_the_golden_metrics_have_the_label():
    assert metrics.CLIENT_ID_LIMIT == 64 and metrics.client_id_label.limit == 64
    assert metrics.client_id_label.other == metrics.CLIENT_ID_OTHER == "other"
    assert metrics.http_requests._labelnames == ("namespace", "ingress", "service", "route", "client_id", "code")
    assert metrics.http_duration._labelnames == ("namespace", "ingress", "service", "route", "client_id")


def _value(name: str, route: str, client_id: str, **extra) -> float:
    v = metrics.REGISTRY.get_sample_value(name, {"namespace": "shop", "ingress": "mesh-inbound", "service": "server",
                                                 "route": route, "client_id": client_id, **extra})
    return v or 0.0


@pytest.fixture
def small_cap(monkeypatch):
    cap = metrics.BoundedLabel(2, "other")
    monkeypatch.setattr(metrics, "client_id_label", cap)
    return cap


def test_route_stats_count_each_caller_apart_up_to_the_cap_and_flush_with_the_route(small_cap):
    route = f"inbound-{next(_route_names)}"
    stats = RouteStats("shop", "mesh-inbound", "server", route)
    assert stats.for_client("") is stats
    a = stats.for_client(ID_A)
    assert a is not stats and a.labels == ("shop", "mesh-inbound", "server", route, ID_A)
    assert stats.for_client(ID_A) is a                      # one child per identity
    b = stats.for_client(ID_B)
    other = stats.for_client(ID_C)
    assert other.labels[4] == "other"
    assert stats.for_client("spiffe://cluster.local/ns/x/sa/y") is other
    assert len(stats.clients) == 3                           # bounded: the cap + "other"
    for s, status in ((stats, 200), (a, 200), (a, 503), (b, 404), (other, 200), (other, 200)):
        s.done(status, 0.003)
    stats.flush()                                            # the route flushes its children
    req = "meshproxy_http_requests_total"
    assert _value(req, route, "", code="2xx") == 1
    assert _value(req, route, ID_A, code="2xx") == 1 and _value(req, route, ID_A, code="5xx") == 1
    assert _value(req, route, ID_B, code="4xx") == 1
    assert _value(req, route, "other", code="2xx") == 2
    assert _value(req, route, ID_C, code="2xx") == 0
    assert _value("meshproxy_http_request_duration_seconds_count", route, ID_A) == 2
    assert _value("meshproxy_http_request_duration_seconds_bucket", route, "other", le="0.005") == 2
    a.done(200, 0.001)
    stats.flush()
    assert _value(req, route, ID_A, code="2xx") == 2


def _exchange(stats, trace, mesh_peer):
    snap = SimpleNamespace(mesh=SimpleNamespace(policy=SimpleNamespace(allows_everything=True)))
    ex = SimpleNamespace(down=SimpleNamespace(mesh=mesh_peer), snap=snap, stats=stats, trace=trace, added=[])
    ex.add_request_header = lambda name, value: ex.added.append((name, value))
    return ex


def test_the_inbound_filter_counts_a_verified_caller_under_its_identity_and_a_plaintext_one_under_none():
    route = f"inbound-{next(_route_names)}"
    stats = RouteStats("shop", "mesh-inbound", "server", route)
    filt = InboundFilter()
    meshed = MeshPeer(Peer.of("10.244.1.10", SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")), 8080,
                      ipaddress.ip_address("10.244.2.10"), b"By=...")
    ex = _exchange(stats, None, meshed)
    filt.on_request(ex)
    assert ex.stats is stats.for_client("spiffe://cluster.local/ns/shop/sa/client")
    plain = MeshPeer(Peer.of("10.244.1.12"), 8080, ipaddress.ip_address("10.244.2.10"), None)
    ex = _exchange(stats, None, plain)
    filt.on_request(ex)
    assert ex.stats is stats


class _Recorder:
    def __init__(self) -> None:
        self.spans = []

    def on_end(self, span) -> None:
        self.spans.append(span)


def test_spans_carry_the_callers_identity_and_the_server_identity_of_an_attempt():
    rec = _Recorder()
    tracing = Tracing("http://127.0.0.1:9", 1.0, processor=rec)
    filt = InboundFilter()
    meshed = MeshPeer(Peer.of("10.244.1.10", SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")), 8080,
                      ipaddress.ip_address("10.244.2.10"), b"By=...")
    trace = tracing.start_request(None, None, b"GET", b"/", b"server", 0.0)
    filt.on_request(_exchange(None, trace, meshed))
    trace.attempt("10.244.2.10:8080", 0.001, server_id="spiffe://cluster.local/ns/shop/sa/server")
    trace.attempt("10.244.2.11:8080", 0.002)
    trace.finish(200, 0.01)
    server, first, second = rec.spans
    assert server.attributes["meshproxy.client_id"] == "spiffe://cluster.local/ns/shop/sa/client"
    assert "meshproxy.client_id" not in first.attributes
    assert first.attributes["meshproxy.server_id"] == "spiffe://cluster.local/ns/shop/sa/server"
    assert "meshproxy.server_id" not in second.attributes
    # A request without a mesh caller: no identity attribute at all.
    plain = tracing.start_request(None, None, b"GET", b"/", b"server", 0.0)
    filt.on_request(_exchange(None, plain, MeshPeer(Peer.of("10.244.1.12"), 8080, ipaddress.ip_address("10.244.2.10"),
                                                    None)))
    plain.finish(200, 0.01)
    assert "meshproxy.client_id" not in rec.spans[-1].attributes


def test_top_adds_the_callers_of_a_route_into_one_row():
    from meshproxy import top

    def series(name, client_id, value, **extra):
        lab = {"namespace": "shop", "ingress": "mesh-inbound", "service": "server", "route": "r", "client_id": client_id,
               **extra}
        return "%s{%s} %s\n" % (name, ",".join('%s="%s"' % kv for kv in lab.items()), value)

    def text(a, b, plain):
        return ("# TYPE meshproxy_http_requests_total counter\n"
                + series("meshproxy_http_requests_total", ID_A, a, code="2xx")
                + series("meshproxy_http_requests_total", ID_B, b, code="5xx")
                + series("meshproxy_http_requests_total", "", plain, code="2xx"))

    rows = top.compute(top.parse(text(10, 0, 5), 0.0), top.parse(text(16, 2, 7), 2.0))
    (route,) = rows["routes"]
    assert route.key == ("r", "mesh-inbound", "shop/server")
    assert route.total == 10 and route.errors == 2 and route.rate == 5.0
    (backend,) = rows["backends"]
    assert backend.total == 10
