"""Tracing (l7.tracing): sampling decisions as tables, and the export through the real
OpenTelemetry exporter to a real OTLP/HTTP receiver on 127.0.0.1 that decodes what arrives
with the OpenTelemetry protobuf definitions (opentelemetry-proto)."""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import zlib

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from l7.tracecontext import parse_traceparent
from l7.tracing import Tracing

TID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT = 0x00F067AA0BA902B7
TP_SAMPLED = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP_UNSAMPLED = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


class Collector:
    """An OTLP/HTTP receiver: POST /v1/traces with a protobuf ExportTraceServiceRequest.
    While ``answer`` is clear it reads each request and holds it unanswered (``posted`` counts
    them): an exporter posting to it waits."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict, ExportTraceServiceRequest]] = []
        self.lock = threading.Lock()
        self.answer = threading.Event()
        self.answer.set()
        self.posted = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.posted += 1
                outer.answer.wait(60)
                enc = self.headers.get("Content-Encoding", "")
                if enc == "gzip":
                    body = gzip.decompress(body)
                elif enc == "deflate":
                    body = zlib.decompress(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with outer.lock:
                    outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, req))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list:
        out = []
        with self.lock:
            for _, _, req in self.requests:
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        out.extend(ss.spans)
        return out

    def close(self) -> None:
        self.answer.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


class Recorder:
    """A span processor that keeps what it is given (for the sampling tables)."""

    def __init__(self) -> None:
        self.spans = []

    def on_end(self, span) -> None:
        self.spans.append(span)

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        which = v.WhichOneof("value")
        if which == "array_value":
            out[kv.key] = [x.string_value for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, which)
    return out


def test_spans_reach_a_real_otlp_receiver_with_ids_parentage_and_attributes(collector):
    tracing = Tracing(f"http://127.0.0.1:{collector.port}", 1.0)
    try:
        assert tracing.endpoint == f"http://127.0.0.1:{collector.port}/v1/traces"
        t0 = 1000.0
        trace = tracing.start_request(TP_SAMPLED, b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", b"GET",
                                      b"/api/items?id=7", b"shop.test:8080", t0, peer=("127.0.0.9", 40000))
        first = parse_traceparent(trace.attempt("10.1.0.1:8080", t0 + 0.001))
        trace.attempt_done(t0 + 0.004, status=503)
        second = parse_traceparent(trace.attempt("10.1.0.2:8080", t0 + 0.005))
        trace.finish(200, t0 + 0.020, {"http.route": "shop.test/api", "meshproxy.route": "shop.test/api",
                                       "meshproxy.backend": "default/shop:80",
                                       "http.request.header.x-request-id": ("abc",)})
        assert trace.tracestate == b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        # Sent with the attempts: the incoming trace id and flags, a new parent id each time.
        for tp in (first, second):
            assert tp.trace_id == TID and tp.sampled and tp.parent_id != PARENT
        assert first.parent_id != second.parent_id
        # Without shutdown or flush: the batch processor's own schedule (a batch leaves at most
        # 1 s after its first span; 20 s only bounds a hang).
        deadline = time.monotonic() + 20
        while len(collector.spans()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        tracing.shutdown()
    spans = collector.spans()
    assert len(spans) == 3, spans
    assert {p for p, _, _ in collector.requests} == {"/v1/traces"}
    assert all(h.get("content-type") == "application/x-protobuf" for _, h, _ in collector.requests)
    resource = {kv.key: kv.value.string_value for kv in collector.requests[0][2].resource_spans[0].resource.attributes}
    assert resource["service.name"] == "meshproxy"

    server = next(s for s in spans if s.kind == s.SPAN_KIND_SERVER)
    clients = sorted((s for s in spans if s.kind == s.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
    assert len(clients) == 2
    for s in spans:
        assert int.from_bytes(s.trace_id, "big") == TID
        assert s.trace_state == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert int.from_bytes(server.parent_span_id, "big") == PARENT          # the caller's span
    sid = int.from_bytes(server.span_id, "big")
    for c, tp in zip(clients, (first, second)):
        assert int.from_bytes(c.parent_span_id, "big") == sid              # child of the server span
        assert int.from_bytes(c.span_id, "big") == tp.parent_id            # the id the pod saw
    assert server.name == "GET shop.test/api"
    assert server.end_time_unix_nano - server.start_time_unix_nano == pytest.approx(20_000_000, abs=2)
    a = _attrs(server)
    assert a["http.request.method"] == "GET" and a["url.path"] == "/api/items"
    assert a["http.response.status_code"] == 200 and isinstance(a["http.response.status_code"], int)
    assert a["server.address"] == "shop.test" and a["server.port"] == 8080
    assert a["network.peer.address"] == "127.0.0.9" and a["client.address"] == "127.0.0.9"
    assert a["meshproxy.route"] == "shop.test/api" and a["meshproxy.backend"] == "default/shop:80"
    assert a["meshproxy.retries"] == 1
    assert a["http.request.header.x-request-id"] == ["abc"]
    assert server.status.code != server.status.STATUS_CODE_ERROR
    c1, c2 = _attrs(clients[0]), _attrs(clients[1])
    assert c1["server.address"] == "10.1.0.1" and c1["server.port"] == 8080
    assert c1["http.response.status_code"] == 503 and c1["error.type"] == "503"
    assert clients[0].status.code == clients[0].status.STATUS_CODE_ERROR
    assert "http.request.resend_count" not in c1 and c2["http.request.resend_count"] == 1
    assert c2["http.response.status_code"] == 200 and c2["server.address"] == "10.1.0.2"
    assert clients[0].end_time_unix_nano - clients[0].start_time_unix_nano == pytest.approx(3_000_000, abs=2)


def test_a_stalled_collector_does_not_block_requests(collector):
    """The collector takes each export and never answers: spans are queued and handed to the
    exporter's thread, and the requests' calls return meanwhile. Had one of them sent inline,
    it would still be waiting for the collector (the thread below would not end)."""
    collector.answer.clear()
    tracing = Tracing(f"http://127.0.0.1:{collector.port}", 1.0)
    try:
        def requests():
            for i in range(200):
                tr = tracing.start_request(None, None, b"GET", b"/", b"x", float(i))
                tr.attempt("10.0.0.1:80", float(i))
                tr.finish(200, float(i) + 0.001)
        caller = threading.Thread(target=requests, daemon=True)
        caller.start()
        caller.join(30)                 # bounds a hang only
        assert not caller.is_alive(), "a request waited for the collector"
        assert tracing.recorded == 200
        # The 400 spans were queued, not lost: once the collector answers, they arrive.
        deadline = time.monotonic() + 30
        while collector.posted == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert collector.posted >= 1    # the exporter's thread is the one waiting
        collector.answer.set()
    finally:
        tracing.shutdown(10)
    assert len(collector.spans()) == 400


@pytest.mark.parametrize("incoming,ratio,recorded", [
    (TP_SAMPLED, 0.0, True),        # parent-based: the caller's decision wins over the ratio
    (TP_UNSAMPLED, 1.0, False),
    (None, 1.0, True),              # new traces: the ratio
    (None, 0.0, False),
    (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", 0.0, False),   # invalid -> a new trace, ratio decides
    (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", 1.0, True),
])
def test_sampling_is_parent_based_with_a_ratio_for_new_traces(incoming, ratio, recorded):
    rec = Recorder()
    tracing = Tracing("http://127.0.0.1:9", ratio, processor=rec)
    trace = tracing.start_request(incoming, b"k=v", b"GET", b"/", b"h", 0.0)
    out = parse_traceparent(trace.attempt("10.0.0.1:80", 0.0))
    trace.finish(200, 0.001)
    assert out.sampled is recorded
    assert bool(rec.spans) is recorded
    if incoming is not None and parse_traceparent(incoming) is not None:
        assert out.trace_id == TID and out.parent_id not in (0, PARENT)
        assert trace.tracestate == b"k=v"
    else:
        assert out.trace_id != 0 and trace.tracestate is None     # restarted: tracestate dropped


def test_ratio_decides_on_the_trace_id_like_trace_id_ratio_based():
    rec = Recorder()
    tracing = Tracing("http://127.0.0.1:9", 0.25, processor=rec)
    n = 4000
    recorded = 0
    for _ in range(n):
        trace = tracing.start_request(None, None, b"GET", b"/", b"h", 0.0)
        expected = (trace.trace_id & ((1 << 64) - 1)) < (1 << 62)
        assert trace.sampled is expected
        recorded += expected
    assert 0.2 * n < recorded < 0.3 * n     # binomial(4000, 0.25): 6 standard deviations either side


def test_finish_twice_exports_once_and_unsampled_requests_reuse_one_header():
    rec = Recorder()
    tracing = Tracing("http://127.0.0.1:9", 1.0, processor=rec)
    trace = tracing.start_request(TP_SAMPLED, None, b"GET", b"/", b"h", 0.0)
    trace.finish(502, 0.1)
    trace.finish(502, 0.2)
    assert len(rec.spans) == 1 and rec.spans[0].attributes["error.type"] == "502"
    un = tracing.start_request(TP_UNSAMPLED, None, b"GET", b"/", b"h", 0.0)
    assert un.attempt("a:1", 0.0) is un.attempt("b:2", 0.1)
    assert un.trace_id_hex == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_from_settings_is_none_without_an_endpoint():
    from meshproxy.core.settings import Settings
    assert Tracing.from_settings(Settings()) is None
    t = Tracing.from_settings(Settings(otlp_endpoint="http://127.0.0.1:4318/", trace_sampling=0.5))
    try:
        assert t.endpoint == "http://127.0.0.1:4318/v1/traces" and t.ratio == 0.5
    finally:
        t.processor.shutdown()
