"""HTTP/2 and gRPC end to end: real grpcio clients and servers, curl, over real sockets.

The proxy runs in process (tests/backends.py ``Proxy``, uvloop on a thread); pods are grpcio
servers with generic handlers (tests/grpc_pods.py) or the HTTP/1.1 echo backend. What is
asserted is what the client sees: which pod answered, statuses, metadata, messages, timings
bounded from above only.
"""

from __future__ import annotations

import ssl
import subprocess
import time

import grpc
import pytest
import trustme

from backends import Backend, Proxy, ingress_yaml, service_yaml, tls_secret_yaml
from grpc_pods import GrpcPod, grpc_service_yaml
from conftest import requires

GRPC_PORT = 50051


@pytest.fixture(scope="module")
def pods():
    ps = [GrpcPod(f"pod-{i}") for i in range(3)]
    yield ps
    for p in ps:
        p.stop()


@pytest.fixture(scope="module")
def proxy(pods):
    y = "---\n".join([
        grpc_service_yaml("echo", pods),
        grpc_service_yaml("empty", []),
        ingress_yaml("grpc", [(None, "/test.Echo/", "Prefix", "echo"), (None, "/test.Empty/", "Prefix", "empty")],
                     port=GRPC_PORT),
    ])
    with Proxy(y) as p:
        yield p


@pytest.fixture
def channel(proxy):
    ch = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    yield ch
    ch.close()


def test_unary_calls_of_one_channel_are_balanced_per_call(channel, pods):
    """300 unary calls on one channel (one HTTP/2 connection) reach each of 3 pods >= 50 times."""
    who = channel.unary_unary("/test.Echo/Who")
    seen: dict[bytes, int] = {}
    for _ in range(300):
        name = who(b"", timeout=5)
        seen[name] = seen.get(name, 0) + 1
    assert sorted(seen) == [b"pod-0", b"pod-1", b"pod-2"], seen
    assert min(seen.values()) >= 50, seen


def test_server_stream_of_2000_messages_arrives_complete_and_in_order(channel):
    count = channel.unary_stream("/test.Echo/Count")
    got = list(count(b"2000", timeout=20))
    assert got == [b"%d" % i for i in range(2000)]


def test_deadline_against_a_slow_method_ends_deadline_exceeded(channel):
    slow = channel.unary_unary("/test.Echo/Slow")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        slow(b"5000", timeout=0.3)
    elapsed = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5, elapsed


def test_grpc_timeout_bounds_the_attempt_at_the_proxy(proxy):
    """The proxy itself ends the call at the client's grpc-timeout: a raw HTTP/2 client that
    sends grpc-timeout 200m and then waits gets a trailers-only DEADLINE_EXCEEDED from us."""
    import h2_client
    c = h2_client.Client(proxy.port)
    sid = c.request([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/test.Echo/Slow"),
                     (b":authority", b"example.com"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                     (b"grpc-timeout", b"200m")], body=b"\x00\x00\x00\x00\x045000", end=True)
    resp = c.response(sid, timeout=3.0)
    assert resp.headers[b":status"] == b"200"
    assert resp.headers[b"grpc-status"] == b"4", resp.headers
    c.close()


def test_service_without_endpoints_gives_unavailable(channel):
    call = channel.unary_unary("/test.Empty/Who")
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no endpoint" in err.value.details()


def test_no_route_gives_unimplemented(channel):
    call = channel.unary_unary("/other.Service/Who")
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metadata_and_trailing_metadata_pass_both_ways(channel):
    who = channel.unary_unary("/test.Echo/Who")
    resp, call = who.with_call(b"", timeout=5, metadata=(("x-echo", "hello"),))
    initial = dict(call.initial_metadata())
    trailing = dict(call.trailing_metadata())
    assert initial.get("x-echo") == "hello"
    assert trailing.get("x-pod") == resp.decode()


def test_error_status_from_the_pod_passes_through(channel):
    fail = channel.unary_unary("/test.Echo/Fail")
    with pytest.raises(grpc.RpcError) as err:
        fail(b"9", timeout=5)   # FAILED_PRECONDITION
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "failed on purpose"


def test_grpc_metrics_by_route_service_and_status(channel, proxy):
    from meshproxy.core import metrics
    who = channel.unary_unary("/test.Echo/Who")
    who(b"", timeout=5)
    text = metrics.render()[1].decode() if hasattr(metrics, "render") else _render()
    line = [ln for ln in text.splitlines() if ln.startswith("meshproxy_grpc_requests_total{")
            and 'grpc_service="test.Echo"' in ln and 'grpc_status="0"' in ln]
    assert line, text[:2000]


def _render() -> str:
    from prometheus_client import generate_latest
    from meshproxy.core.metrics import REGISTRY
    return generate_latest(REGISTRY).decode()


# -- curl: h2 and HTTP/1.1 on the same ports --------------------------------------------------------

@pytest.fixture(scope="module")
def web():
    b = Backend()
    ca = trustme.CA()
    cert = ca.issue_cert("example.com")
    y = "---\n".join([service_yaml("web", [b]),
                      tls_secret_yaml("web-tls", cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()),
                      ingress_yaml("web", [("example.com", "/", "Prefix", "web")], tls=[(["example.com"], "web-tls")])])
    with Proxy(y, tls=True) as p:
        yield p, ca
    b.stop()


def _curl(*args: str) -> tuple[str, str]:
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", *args],
                       capture_output=True, text=True, timeout=20)
    return r.stdout, r.stderr


def test_curl_h2_and_http11_on_the_same_ports(web, tmp_path):
    requires("curl")
    p, ca = web
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    plain = f"http://127.0.0.1:{p.port}/echo"
    tls = f"https://example.com:{p.tls_port}/echo"
    resolve = f"example.com:{p.tls_port}:127.0.0.1"
    assert _curl("--http2-prior-knowledge", "-H", "Host: example.com", plain)[0] == "2 200"
    assert _curl("--http1.1", "-H", "Host: example.com", plain)[0] == "1.1 200"
    assert _curl("--http2", "--cacert", str(ca_file), "--resolve", resolve, tls)[0] == "2 200"
    assert _curl("--http1.1", "--cacert", str(ca_file), "--resolve", resolve, tls)[0] == "1.1 200"


def test_tls_alpn_offers_h2_then_http11(web):
    p, ca = web
    import socket
    for offered, expected in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1"), (["h2"], "h2")):
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        ctx.set_alpn_protocols(offered)
        with socket.create_connection(("127.0.0.1", p.tls_port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="example.com") as t:
                assert t.selected_alpn_protocol() == expected


def test_without_http2_the_preface_is_an_http11_505():
    from backends import raw
    b = Backend()
    try:
        y = service_yaml("web", [b]) + "---\n" + ingress_yaml("web", [(None, "/", "Prefix", "web")])
        with Proxy(y, http2=False) as p:
            out = raw(p.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 505 "), out
        assert b.requests == 0
    finally:
        b.stop()
