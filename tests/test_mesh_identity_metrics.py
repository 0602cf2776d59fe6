"""The caller's identity in what the server's sidecar reports, on the cluster of network
namespaces of tests/test_mesh_cluster.py (its fixture and helpers, imported: this module gets a
cluster of its own): after a meshed call the inbound request metrics count it under the client's
SPIFFE ID, a plaintext caller's under ""; the server span exported over OTLP to a real receiver
(tests/test_tracing.py's, listening inside the server pod) carries the caller's identity.
The pure logic (the cap, the children, the attributes): tests/test_client_id_label.py."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_mesh_cluster import PODS, SERVER_IP, SVC, TD, _wait
from test_mesh_cluster import mesh as mesh  # noqa: F401 - the fixture (its cluster), used by name
from test_tracing import Collector, _attrs

pytestmark = pytest.mark.slow

# tests/run_as.py imports, as root, what a sidecar loads later (the interpreter is not readable by
# the proxy uid); the OpenTelemetry SDK, loaded only with --otlp-endpoint, is not among them:
# this runs it after loading the SDK and its exporter the way l7.tracing does.
_RUN_AS_TRACED = """
import sys
from l7.tracing import Tracing
Tracing("http://127.0.0.1:9", 1.0).shutdown(0.1)
import opentelemetry.exporter.otlp.proto.common.trace_encoder
import run_as
sys.exit(run_as.main())
"""

CLIENT_ID = f"spiffe://{TD}/ns/shop/sa/client"
OTHER_ID = f"spiffe://{TD}/ns/shop/sa/other"


def _inbound_requests(text: str) -> dict[tuple[str, str], float]:
    """meshproxy_http_requests_total of the inbound side: (client_id, code) -> value, summed
    over routes."""
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "meshproxy_http_requests_total" and s.labels.get("ingress") == "mesh-inbound":
                key = (s.labels["client_id"], s.labels["code"])
                out[key] = out.get(key, 0.0) + s.value
    return out


def _inbound_latency_counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "meshproxy_http_request_duration_seconds_count" and s.labels.get("ingress") == "mesh-inbound":
                out[s.labels["client_id"]] = out.get(s.labels["client_id"], 0.0) + s.value
    return out


def test_inbound_golden_metrics_count_each_caller_under_its_spiffe_id(mesh):
    before = _inbound_requests(mesh.metrics("server"))
    for _ in range(3):
        code, body = mesh.curl("client", f"http://{SVC}/who")
        assert code == 200, body
    code, body = mesh.curl("other", f"http://{SVC}/who")
    assert code == 200, body
    # Not meshed: no sidecar, plaintext to the pod address (PERMISSIVE: accepted).
    code, body = mesh.curl("legacy", f"http://{SERVER_IP}:8080/who")
    assert code == 200, body

    def counted():
        now = _inbound_requests(mesh.metrics("server"))
        d = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in now}
        return d if d.get((CLIENT_ID, "2xx")) == 3 and d.get((OTHER_ID, "2xx")) == 1 and d.get(("", "2xx")) == 1 \
            else None

    d = _wait(counted, "the server sidecar counted the three callers (metrics are flushed once a second)")
    assert {k for k, v in d.items() if v} == {(CLIENT_ID, "2xx"), (OTHER_ID, "2xx"), ("", "2xx")}
    text = mesh.metrics("server")
    assert _inbound_latency_counts(text)[CLIENT_ID] >= 3
    # The client's own sidecar serves no inbound request of this call: its outbound series
    # carry no caller identity.
    for fam in text_string_to_metric_families(mesh.metrics("client")):
        for s in fam.samples:
            if s.name == "meshproxy_http_requests_total":
                assert s.labels["client_id"] == "" and s.labels["ingress"] == "mesh-outbound", s


@pytest.fixture
def traced_server(mesh, monkeypatch):
    """The server's sidecar restarted with --otlp-endpoint to a receiver in its own pod (it
    runs as the proxy uid, so its export is not captured)."""
    cluster = mesh.cluster
    col = Collector()
    col.server.shutdown()                       # re-served on a socket inside the pod
    col.server.socket.close()
    sock = cluster.socket("shop/server")
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    col.server.socket = sock
    col.server.server_address = sock.getsockname()
    col.port = sock.getsockname()[1]
    col.thread = threading.Thread(target=col.server.serve_forever, daemon=True)
    col.thread.start()
    start = cluster.start

    def start_traced(where, python, run_as, *argv, **kw):
        assert run_as.endswith("run_as.py"), run_as
        return start(where, python, "-c", _RUN_AS_TRACED, *argv, "--otlp-endpoint", f"http://127.0.0.1:{col.port}",
                     "--trace-sampling", "1", **kw)

    try:
        cluster.stop(mesh.sidecars["server"])
        monkeypatch.setattr(cluster, "start", start_traced)
        mesh.start_sidecar("server")
        monkeypatch.setattr(cluster, "start", start)
        mesh.wait_ready("server")
        yield col
    finally:
        col.close()


def test_the_server_span_carries_the_callers_spiffe_id(mesh, traced_server):
    # The client's sidecar may hold pooled connections to the sidecar that was replaced: the
    # first request can fail on one; a few tries bound it.
    _wait(lambda: mesh.curl("client", f"http://{SVC}/traced")[0] == 200, "a call through the restarted sidecar")
    mesh.curl("legacy", f"http://{SERVER_IP}:8080/plain")

    def exported():
        spans = [s for s in traced_server.spans() if s.kind == s.SPAN_KIND_SERVER]
        paths = {_attrs(s).get("url.path") for s in spans}
        return spans if {"/traced", "/plain"} <= paths else None

    spans = _wait(exported, "server spans exported (a batch leaves within a second)")
    traced = [_attrs(s) for s in spans if _attrs(s).get("url.path") == "/traced"]
    assert traced and all(a["meshproxy.client_id"] == CLIENT_ID for a in traced), traced
    plain = [_attrs(s) for s in spans if _attrs(s).get("url.path") == "/plain"]
    assert plain and all("meshproxy.client_id" not in a for a in plain), plain
    assert all(a["client.address"] == PODS["legacy"][1] for a in plain)
