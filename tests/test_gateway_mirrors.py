"""RequestMirror over real sockets, beyond the single mirror of tests/test_gateway_e2e.py:
several mirrors on one rule, ``percent`` / ``fraction``, and the request body in the copy.
A Gateway served by the in-process L7 server (tests/backends.py ``Proxy``), a pod and two
mirror pods, each a tests/backends.py ``Backend`` that counts the requests it receives.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time

import pytest

from backends import Backend, Proxy
from conftest import free_port
from gateway_fixtures import CLASS, INFRA, gateway_yaml, http_listener
from meshproxy.core import metrics

GW = "127.0.65.1"
PODS = {"main": "127.0.65.2", "m1": "127.0.65.3", "m2": "127.0.65.4"}


def manifests(pods: dict[str, Backend], port: int) -> str:
    docs = [f"apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {CLASS}}}\n"
            "spec: {controllerName: meshproxy.dev/gateway-controller}",
            gateway_yaml("mirrors", GW, http_listener(port))]
    for name, b in pods.items():
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}-0, namespace: {INFRA}, labels: {{app: {name}}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {b.port}}}]}}]}}
status: {{podIP: {b.host}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {INFRA}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080, targetPort: http}}]""")

    def rule(tag: str, mirrors: str) -> str:
        return (f"  - matches: [{{path: {{type: PathPrefix, value: /{tag}}}}}]\n"
                f"    filters:\n{mirrors}"
                "    backendRefs: [{name: main, port: 8080}]\n")

    def mirror(svc: str, extra: str = "") -> str:
        return f"    - {{type: RequestMirror, requestMirror: {{backendRef: {{name: {svc}, port: 8080}}{extra}}}}}\n"

    docs.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mirrors, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: mirrors}}]
  rules:
""" + rule("both", mirror("m1") + mirror("m2"))
        + rule("half", mirror("m1", ", fraction: {numerator: 1, denominator: 2}") + mirror("m2"))
        + rule("never", mirror("m1", ", percent: 0") + mirror("m2")))
    return "\n---\n".join(docs) + "\n"


@pytest.fixture(scope="module")
def gateway():
    pods = {name: Backend(addr, name=name) for name, addr in PODS.items()}
    port = free_port(GW)
    try:
        with Proxy(manifests(pods, port), plain=False, gateway_addresses=(GW,)) as proxy:
            assert (GW, port) in proxy.snapshot.http_listeners, proxy.snapshot.problems
            yield pods, port
    finally:
        for b in pods.values():
            b.stop()


def call(port: int, method: str, path: str, body: bytes | None = None) -> dict:
    conn = http.client.HTTPConnection(GW, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": "example.com"})
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200, data[:200]
        return json.loads(data)
    finally:
        conn.close()


def wait_for(pod: Backend, count: int) -> None:
    deadline = time.monotonic() + 10
    while pod.requests < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pod.requests == count, (pod.name, pod.requests, count)


def settled(pod: Backend) -> int:
    """``pod``'s request count once it stopped changing for 0.3 s (at most 5 s)."""
    last, since = pod.requests, time.monotonic()
    deadline = since + 5
    while time.monotonic() < deadline and time.monotonic() - since < 0.3:
        time.sleep(0.02)
        if pod.requests != last:
            last, since = pod.requests, time.monotonic()
    return last


def mirrored_ok() -> float:
    return metrics.REGISTRY.get_sample_value("meshproxy_http_mirror_requests_total", {"result": "ok"}) or 0.0


def test_every_mirror_of_a_rule_gets_the_copy_with_its_body(gateway):
    pods, port = gateway
    m1, m2 = pods["m1"].requests, pods["m2"].requests
    ok = mirrored_ok()
    body = bytes(range(256)) * 40
    seen = call(port, "POST", "/both/x?q=1", body)
    assert seen["backend"] == "main" and seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    wait_for(pods["m1"], m1 + 1)
    wait_for(pods["m2"], m2 + 1)
    for name in ("m1", "m2"):
        method, target, headers = pods[name].seen[-1]
        assert (method, target) == ("POST", "/both/x?q=1")
        assert ["content-length", str(len(body))] in [[k.lower(), v] for k, v in headers]
    # Both copies were answered: the mirror pods read the whole body before they answer (a
    # copy without its body would wait until the proxy cut it, counted as a timeout).
    deadline = time.monotonic() + 10
    while mirrored_ok() < ok + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mirrored_ok() == ok + 2


def test_percent_and_fraction_decide_per_request(gateway):
    pods, port = gateway
    n = 200
    m1, m2 = pods["m1"].requests, pods["m2"].requests
    for _ in range(n):
        call(port, "GET", "/half")
    wait_for(pods["m2"], m2 + n)                # the unconditional mirror: every request
    got = settled(pods["m1"]) - m1
    # 1/2 of 200: 100 expected, 4 standard deviations is +-28.
    assert 72 <= got <= 128, got
    m1, m2 = pods["m1"].requests, pods["m2"].requests
    for _ in range(20):
        call(port, "GET", "/never")
    wait_for(pods["m2"], m2 + 20)
    assert settled(pods["m1"]) == m1            # percent: 0 - never
