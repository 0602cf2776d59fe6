"""ingress-nginx's ``backend-protocol: GRPC`` / ``GRPCS`` over real sockets: grpcio pods (generic
handlers, tests/grpc_pods.py), grpcio clients through an Ingress of class ``nginx`` served by the
in-process proxy (tests/backends.py ``Proxy``). GRPC is HTTP/2 in clear text with prior knowledge
to the pods, GRPCS HTTP/2 over TLS (a trustme pod); the Service ports are named ``http``, so the
annotation alone decides that the pods are spoken to in HTTP/2. ingress-nginx's e2e
(test/e2e/annotations/grpc.go) calls a gRPC service through such an Ingress and reads its answer
and metadata; the calls here do the same and add what meshproxy promises for gRPC (per-call
balancing, trailers-only answers of the proxy). Plus ``meshproxy convert``: such an Ingress
becomes a GRPCRoute (as ingress2gateway writes it), checked by a round trip."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import yaml

from backends import Proxy
from discovery.manifests import load_text
from grpc_pods import SERVICE, GrpcPod, grpc_service_yaml
from meshproxy.core.nginx_convert import convert
from nginx_fixtures import CLASS, ingress, manifests, service
from proc import ROOT, Meshproxy, free_port

trustme = pytest.importorskip("trustme")

HOST = "grpc.foo.com"


def stub(ch: grpc.Channel, method: str, stream: bool = False):
    make = ch.unary_stream if stream else ch.unary_unary
    return make(f"/{SERVICE}/{method}")


def channel(port: int, host: str = HOST) -> grpc.Channel:
    """A cleartext (prior knowledge) channel to the proxy, the Ingress host as :authority."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", host)])


def svc_of(name: str, *pods: GrpcPod) -> str:
    return service(name, [("127.0.0.1", p.port) for p in pods])


@pytest.fixture(scope="module")
def pods():
    out = [GrpcPod("pod-a"), GrpcPod("pod-b")]
    yield out
    for p in out:
        p.stop()


# -- GRPC: h2c to the pods ---------------------------------------------------------------------------

def test_grpc_calls_are_balanced_per_call_and_carry_metadata(pods):
    docs = [svc_of("greeter", *pods), ingress("grpc", HOST, "/", "greeter", {"backend-protocol": "GRPC"})]
    with Proxy(manifests(*docs)) as p:
        assert p.snapshot.backends[("default", "greeter", "http")].l7_protocol == "h2c"
        assert not [f for f in p.builder.ingress_findings if "backend-protocol" in str(f)]
        seen = []
        with channel(p.port) as ch:      # one channel: one HTTP/2 connection to the proxy
            who = stub(ch, "Who")
            for i in range(20):
                answer, call = who.with_call(b"", metadata=(("x-echo", f"v{i}"),), timeout=10)
                seen.append(answer.decode())
                assert dict(call.initial_metadata())["x-echo"] == f"v{i}"
                assert dict(call.trailing_metadata())["x-pod"] == answer.decode()
                assert call.code() == grpc.StatusCode.OK
            assert set(seen) == {"pod-a", "pod-b"}
            # The pod's own status and message reach the client (trailers from the pod).
            with pytest.raises(grpc.RpcError) as e:
                stub(ch, "Fail")(b"5", timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == "failed on purpose"
            # Server streaming goes through message by message.
            assert list(stub(ch, "Count", stream=True)(b"5", timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]


def test_without_the_annotation_the_pods_get_http1_and_the_call_fails(pods):
    """The Service port is named ``http``: only backend-protocol makes the pods h2c, and a change
    of the annotation applies to the next call."""
    plain = [svc_of("greeter", *pods), ingress("grpc", HOST, "/", "greeter")]
    with Proxy(manifests(*plain)) as p:
        assert p.snapshot.backends[("default", "greeter", "http")].l7_protocol == "http/1.1"
        with channel(p.port) as ch:
            with pytest.raises(grpc.RpcError) as e:
                stub(ch, "Who")(b"", timeout=10)
            assert e.value.code() != grpc.StatusCode.OK
        p.update(manifests(svc_of("greeter", *pods),
                           ingress("grpc", HOST, "/", "greeter", {"backend-protocol": "grpc"})))   # case-insensitive
        with channel(p.port) as ch:
            assert stub(ch, "Who")(b"", timeout=10) in (b"pod-a", b"pod-b")


def test_the_proxys_own_answers_are_grpc_statuses(pods):
    docs = [svc_of("greeter", *pods), service("empty", []),
            ingress("grpc", HOST, "/", "greeter", {"backend-protocol": "GRPC"}),
            ingress("none", "empty.foo.com", "/", "empty", {"backend-protocol": "GRPC"}),
            ingress("one", "one.foo.com", f"/{SERVICE}/Who", "greeter", {"backend-protocol": "GRPC"})]
    with Proxy(manifests(*docs)) as p:
        with channel(p.port, "empty.foo.com") as ch:          # a Service without endpoints
            with pytest.raises(grpc.RpcError) as e:
                stub(ch, "Who")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with channel(p.port, "one.foo.com") as ch:
            assert stub(ch, "Who")(b"", timeout=10) in (b"pod-a", b"pod-b")
            with pytest.raises(grpc.RpcError) as e:               # the host's catch-all: 404
                stub(ch, "Fail")(b"5", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_proxy_read_timeout_bounds_a_call(pods):
    """ingress-nginx's e2e: a call slower than proxy-read-timeout fails, a quicker one passes."""
    docs = [svc_of("greeter", *pods), ingress("grpc", HOST, "/", "greeter", {
        "backend-protocol": "GRPC", "proxy-read-timeout": "1", "proxy-connect-timeout": "1"})]
    with Proxy(manifests(*docs)) as p, channel(p.port) as ch:
        assert stub(ch, "Slow")(b"10", timeout=10) == b"slow done"
        with pytest.raises(grpc.RpcError) as e:
            stub(ch, "Slow")(b"3000", timeout=10)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# -- GRPCS: HTTP/2 over TLS to the pods -------------------------------------------------------------

class TlsGrpcPod(GrpcPod):
    """A GrpcPod that only speaks TLS (its certificate from ``ca``)."""

    def __init__(self, name: str, ca) -> None:    # the base's handlers, on a secure port
        cert = ca.issue_cert("pod.local")
        creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())])
        self.name = name
        self.calls = 0
        self._lock = threading.Lock()
        handlers = {"Who": grpc.unary_unary_rpc_method_handler(self._who),
                    "Fail": grpc.unary_unary_rpc_method_handler(self._fail)}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()


def test_grpcs_speaks_http2_over_tls_to_the_pods():
    ca = trustme.CA()
    pods = [TlsGrpcPod("tls-a", ca), TlsGrpcPod("tls-b", ca)]
    try:
        docs = [svc_of("secure", *pods), ingress("grpcs", HOST, "/", "secure", {"backend-protocol": "GRPCS"})]
        with Proxy(manifests(*docs)) as p:
            key = ("default", "secure", "http")
            assert p.snapshot.backends[key].l7_protocol == "h2c" and key in p.snapshot.upstream_tls
            seen = set()
            with channel(p.port) as ch:
                for i in range(10):
                    answer, call = stub(ch, "Who").with_call(b"", metadata=(("x-echo", str(i)),), timeout=10)
                    seen.add(answer.decode())
                    assert dict(call.trailing_metadata())["x-pod"] == answer.decode()
                    assert dict(call.initial_metadata())["x-echo"] == str(i)
                with pytest.raises(grpc.RpcError) as e:
                    stub(ch, "Fail")(b"7", timeout=10)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert seen == {"tls-a", "tls-b"}
            # The same pods as GRPC (clear text): they only speak TLS, so the call fails -
            # which shows the GRPCS calls above really went over TLS.
            p.update(manifests(svc_of("secure", *pods),
                               ingress("grpcs", HOST, "/", "secure", {"backend-protocol": "GRPC"})))
            assert key not in p.snapshot.upstream_tls
            with channel(p.port) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    stub(ch, "Who")(b"", timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # The pods go first, so the proxy's TLS connections see their end before its loop
            # stops (a TLS close waits for the peer's close_notify).
            for pod in pods:
                pod.stop()
            for _ in range(200):
                if p.call(p.server.h2pool.connection_count) == 0:
                    break
                time.sleep(0.025)
    finally:
        for pod in pods:
            pod.stop()


# -- meshproxy convert ---------------------------------------------------------------------------------

def objects(*docs: str):
    r = load_text("---\n".join((CLASS,) + docs))
    assert not r.errors, r.errors
    return r.objects


def test_convert_writes_a_grpcroute():
    docs, warnings = convert(objects(
        service("web", [("127.0.0.1", 1)]),
        grpc_service_yaml("greeter", [], port_name="grpc", port=80),
        ingress("svc", "g.com", None, "", {"backend-protocol": "GRPC"},
                paths=[("/", "Prefix", "greeter"), (f"/{SERVICE}/Who", "Exact", "greeter"),
                       ("/only.Service", "Prefix", "greeter")]),
        ingress("s", "s.com", "/", "web", {"backend-protocol": "GRPCS"}),
        ingress("bad", "b.com", "/a/b/c", "greeter", {"backend-protocol": "GRPC", "rewrite-target": "/x"}),
        ingress("both", "m.com", None, "", paths=[("/web", "Prefix", "web")]),
        ingress("both-grpc", "m.com", f"/{SERVICE}", "greeter", {"backend-protocol": "GRPC"}),
    ))
    routes = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("GRPCRoute", "HTTPRoute")}
    g = routes["g-com"]
    assert g["kind"] == "GRPCRoute" and g["spec"]["hostnames"] == ["g.com"]
    assert [r.get("matches") for r in g["spec"]["rules"]] == [
        None, [{"method": {"service": SERVICE, "method": "Who"}}], [{"method": {"service": "only.Service"}}]]
    assert g["spec"]["rules"][0]["backendRefs"] == [{"name": "greeter", "port": 80}]
    assert routes["m-com"]["kind"] == "HTTPRoute" and routes["m-com-grpc"]["kind"] == "GRPCRoute"
    assert "b-com" not in routes
    p = "nginx.ingress.kubernetes.io/"
    assert f"Ingress default/s: {p}backend-protocol: GRPCS (HTTP/2 over TLS to the pods) needs a BackendTLSPolicy, " \
           "which meshproxy's Gateway does not implement yet; the route sends h2c" in warnings
    assert f"Ingress default/s: {p}backend-protocol: Service web's port does not say HTTP/2: give it appProtocol: " \
           "kubernetes.io/h2c (or grpc) so that the Gateway speaks h2c to its pods" in warnings
    assert "Ingress default/bad: path: '/a/b/c' is not /SERVICE or /SERVICE/METHOD, which a GRPCRoute matches; " \
           "not converted" in warnings
    assert not [w for w in warnings if "Ingress default/svc" in w or "both-grpc" in w], warnings


def test_converted_grpcroute_routes_the_same_calls_the_same_way(tmp_path, pods):
    common = grpc_service_yaml("greeter", pods, port_name="h2", app_protocol="kubernetes.io/h2c", port=80)
    source = tmp_path / "ingresses.yaml"
    source.write_text("---\n".join([CLASS, common, ingress("grpc", HOST, f"/{SERVICE}/Who", "greeter",
                                                           {"backend-protocol": "GRPC"}, ptype="Exact")]))
    gw_port = free_port()
    conv = subprocess.run([sys.executable, "-m", "meshproxy", "convert", "-f", str(source), "--http-port",
                           str(gw_port), "--address", "127.0.0.1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert conv.returncode == 0, conv.stderr
    assert {d["kind"] for d in yaml.safe_load_all(conv.stdout)} == {"GatewayClass", "Gateway", "GRPCRoute"}
    converted = tmp_path / "gateway.yaml"
    converted.write_text(common + "---\n" + conv.stdout)
    ingress_port = free_port()

    def calls(port: int) -> list:
        out = []
        with channel(port) as ch:
            for method, req in (("Who", b""), ("Who", b""), ("Fail", b"5")):
                try:
                    answer, call = stub(ch, method).with_call(req, timeout=10)
                    out.append(("OK", dict(call.trailing_metadata())["x-pod"] == answer.decode()))
                except grpc.RpcError as e:
                    out.append((e.code().name, None))
        return out
    with Meshproxy([str(source)], "--ingress-listen", f"127.0.0.1:{ingress_port}", "--no-health-checks") as a, \
            Meshproxy([str(converted)], "--no-health-checks") as b:
        assert b.snapshot()["problems"] == [] and a.snapshot()["problems"] == []
        want = calls(ingress_port)
        assert want == [("OK", True), ("OK", True), ("UNIMPLEMENTED", None)]
        assert calls(gw_port) == want


def test_with_http2_off_the_pods_stay_http1_and_a_problem_says_so(pods):
    docs = [svc_of("greeter", *pods), ingress("grpc", HOST, "/", "greeter", {"backend-protocol": "GRPC"})]
    with Proxy(manifests(*docs), http2=False) as p:
        assert p.snapshot.backends[("default", "greeter", "http")].l7_protocol == "http/1.1"
        assert "default/greeter:http: an Ingress says backend-protocol GRPC or GRPCS, but HTTP/2 is off (--http2); " \
               "its pods are spoken to in HTTP/1.1" in p.snapshot.problems
