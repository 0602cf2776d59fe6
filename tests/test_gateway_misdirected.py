"""421 Misdirected Request over HTTP/2, as the conformance test
GatewayHTTPSListenerDetectMisdirectedRequests sends it: one TLS connection (ALPN h2) whose server
name picked one HTTPS listener of a Gateway, then requests whose ``:authority`` belongs to that
listener (served) or to another listener of the same address and port (421, not routed).
tests/test_gateway_e2e.py covers the same rule over HTTP/1.1.
"""

from __future__ import annotations

import json
import ssl

import pytest

import h2_client
from backends import Backend, Proxy, tls_secret_yaml
from conftest import free_port
from gateway_fixtures import CLASS, INFRA, gateway_yaml

GW = "127.0.66.1"
PODS = {"wild-pod": "127.0.66.2", "dflt-pod": "127.0.66.3"}


@pytest.fixture(scope="module")
def gateway():
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    certs = {"wild": ca.issue_cert("*.example.com"), "dflt": ca.issue_cert("default.test")}
    pods = {name: Backend(addr, name=name) for name, addr in PODS.items()}
    port = free_port(GW)
    docs = [f"apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {CLASS}}}\n"
            "spec: {controllerName: meshproxy.dev/gateway-controller}"]
    for name, cert in certs.items():
        docs.append(tls_secret_yaml(name, cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes(), INFRA))
    docs.append(gateway_yaml("https", GW, (
        f"  - {{name: wild, port: {port}, protocol: HTTPS, hostname: '*.example.com', "
        "tls: {certificateRefs: [{name: wild}]}}\n"
        f"  - {{name: dflt, port: {port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: dflt}}]}}}}\n")))
    for listener, (pod, b) in zip(("wild", "dflt"), pods.items()):
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {INFRA}, labels: {{app: {pod}}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {b.port}}}]}}]}}
status: {{podIP: {b.host}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: {pod}, namespace: {INFRA}}}
spec:
  selector: {{app: {pod}}}
  ports: [{{name: http, port: 8080, targetPort: http}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {listener}, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: https, sectionName: {listener}}}]
  rules: [{{backendRefs: [{{name: {pod}, port: 8080}}]}}]""")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    try:
        with Proxy("\n---\n".join(docs) + "\n", plain=False, gateway_addresses=(GW,)) as proxy:
            assert (GW, port) in proxy.snapshot.http_listeners, proxy.snapshot.problems
            yield port, ctx
    finally:
        for b in pods.values():
            b.stop()


def get(client: h2_client.Client, authority: str) -> tuple[int, str]:
    sid = client.request([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                          (b":authority", authority.encode())])
    r = client.response(sid)
    status = int(r.headers[b":status"])
    return status, json.loads(r.data)["backend"] if status == 200 else ""


def test_h2_request_for_another_listener_gets_421(gateway):
    port, ctx = gateway
    c = h2_client.Client(port, host=GW, tls=ctx, server_hostname="a.example.com")
    try:
        assert c.sock.selected_alpn_protocol() == "h2"
        assert get(c, "a.example.com") == (200, "wild-pod")
        assert get(c, "b.example.com") == (200, "wild-pod")      # same listener: served
        assert get(c, "other.test")[0] == 421                     # the default listener's name
        assert get(c, "a.example.com") == (200, "wild-pod")      # the connection stays usable
    finally:
        c.close()
    c = h2_client.Client(port, host=GW, tls=ctx, server_hostname="other.test")
    try:
        assert get(c, "other.test") == (200, "dflt-pod")
        assert get(c, "a.example.com")[0] == 421
    finally:
        c.close()
