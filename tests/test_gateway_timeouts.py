"""HTTPRoute ``timeouts`` and the FaultInjection delay, over real sockets: a Gateway on its own
loopback address served by an in-process L7 server (tests/backends.py ``Proxy``), a pod whose
``/delay?ms=N`` path answers after N ms.

Only lower bounds on time are asserted (a delay of D makes the answer take at least D); that
a timeout cut a slow pod short is shown by the status (504, where the pod answers 200), not
by an upper bound on the elapsed time.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from backends import Backend, Proxy
from conftest import free_port
from gateway_fixtures import CLASS, INFRA, gateway_yaml, http_listener

GW = "127.0.63.1"
POD = "127.0.63.2"
SLOW = 10_000        # ms: longer than any timeout below, so a 200 from these paths means no timeout fired


def manifests(pod: Backend, port: int) -> str:
    # Rules are told apart by an ``x-rule`` header: the pod's behaviour is chosen by the path.
    rule = "  - matches: [{{headers: [{{name: x-rule, value: {name}}}]}}]\n{extra}    backendRefs: [{{name: pod, port: 8080}}]\n"
    rules = [
        ("request", "    timeouts: {request: 300ms}\n"),
        ("backend", "    timeouts: {backendRequest: 300ms}\n"),
        ("roomy", "    timeouts: {request: 5s}\n"),
        ("unbounded", "    timeouts: {request: 0s}\n"),
        ("default", ""),
        ("slow-start", "    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, kind: FaultInjection, "
                        "name: delay}}]\n"),
        ("slow-start-bounded", "    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, "
                                "kind: FaultInjection, name: long-delay}}]\n    timeouts: {request: 2s}\n"),
    ]
    return "\n---\n".join([
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {CLASS}}}\n"
        "spec: {controllerName: meshproxy.dev/gateway-controller}",
        f"""apiVersion: v1
kind: Pod
metadata: {{name: pod-0, namespace: {INFRA}, labels: {{app: pod}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {pod.port}}}]}}]}}
status: {{podIP: {pod.host}, conditions: [{{type: Ready, status: "True"}}]}}""",
        f"""apiVersion: v1
kind: Service
metadata: {{name: pod, namespace: {INFRA}}}
spec:
  selector: {{app: pod}}
  ports: [{{name: http, port: 8080, targetPort: http}}]""",
        f"""apiVersion: meshproxy.dev/v1alpha1
kind: FaultInjection
metadata: {{name: delay, namespace: {INFRA}}}
spec: {{delay: {{fixedDelay: 300ms, percentage: 100}}}}""",
        f"""apiVersion: meshproxy.dev/v1alpha1
kind: FaultInjection
metadata: {{name: long-delay, namespace: {INFRA}}}
spec: {{delay: {{fixedDelay: 1s}}}}""",
        gateway_yaml("timeouts", GW, http_listener(port)),
        f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: timeouts, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: timeouts}}]
  rules:
""" + "".join(rule.format(name=n, extra=e) for n, e in rules),
    ]) + "\n"


@pytest.fixture(scope="module")
def gateway():
    pod = Backend(POD, name="pod")
    port = free_port(GW)
    try:
        # A 1 s default response timeout: the rules with their own timeouts must not get it.
        with Proxy(manifests(pod, port), plain=False, upstream_timeout=1.0, gateway_addresses=(GW,)) as proxy:
            assert (GW, port) in proxy.snapshot.http_listeners, proxy.snapshot.problems
            yield proxy, pod, port
    finally:
        pod.stop()       # also ends the pod's sleeps that the proxy gave up on


def timed_get(port: int, rule: str, path: str) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection(GW, port, timeout=30)
    try:
        start = time.monotonic()
        conn.request("GET", path, headers={"Host": "example.com", "X-Rule": rule})
        r = conn.getresponse()
        body = r.read()
        return r.status, body, time.monotonic() - start
    finally:
        conn.close()


def test_request_timeout_answers_504_instead_of_waiting_for_the_pod(gateway):
    _, pod, port = gateway
    status, body, elapsed = timed_get(port, "request", f"/delay?ms={SLOW}")
    assert status == 504, body
    assert elapsed >= 0.3


def test_backend_request_timeout_answers_504(gateway):
    _, pod, port = gateway
    status, body, elapsed = timed_get(port, "backend", f"/delay?ms={SLOW}")
    assert status == 504, body
    assert elapsed >= 0.3


def test_a_request_timeout_longer_than_the_pod_lets_it_answer(gateway):
    _, _, port = gateway
    status, body, elapsed = timed_get(port, "roomy", "/delay?ms=1500")
    # 1.5 s is past the proxy's 1 s default: the rule's own timeout replaces the default.
    assert status == 200, body
    assert json.loads(body)["backend"] == "pod"
    assert elapsed >= 1.5


def test_zero_request_timeout_disables_the_default(gateway):
    _, _, port = gateway
    status, body, elapsed = timed_get(port, "unbounded", "/delay?ms=1500")
    assert status == 200, body
    assert elapsed >= 1.5


def test_without_timeouts_the_proxy_default_applies(gateway):
    _, _, port = gateway
    status, body, elapsed = timed_get(port, "default", f"/delay?ms={SLOW}")
    assert status == 504, body
    assert elapsed >= 1.0


def test_fault_delay_holds_the_request_before_forwarding(gateway):
    _, pod, port = gateway
    before = pod.requests
    with socket.create_connection((GW, port), timeout=10) as s:
        sent = time.monotonic()
        s.sendall(b"GET /x HTTP/1.1\r\nHost: example.com\r\nX-Rule: slow-start\r\nConnection: close\r\n\r\n")
        # Until 300 ms after we sent it, the request must not have reached the pod: the count
        # is read first, the clock second, so a count read "early" really was early.
        for _ in range(20):
            count = pod.requests
            if time.monotonic() - sent >= 0.3:
                break
            assert count == before, "the request reached the pod before the fault delay ended"
            time.sleep(0.01)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        elapsed = time.monotonic() - sent
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", head
    assert json.loads(body)["target"] == "/x"
    assert pod.requests == before + 1
    assert elapsed >= 0.3


def test_fault_delay_counts_against_the_request_timeout(gateway):
    # The request timeout runs from the request's arrival (the specification's "from when the
    # gateway receives the request"), so the 1 s fault delay uses half of the 2 s.
    _, _, port = gateway
    # 1 s of delay and a pod that answers in 0.5 s fit (and the rule's own timeout, not the
    # 1 s default, bounds the pod).
    status, body, elapsed = timed_get(port, "slow-start-bounded", "/delay?ms=500")
    assert status == 200, body
    assert elapsed >= 1.5
    # 1 s of delay and a pod that answers in 1.5 s do not: the pod alone would fit in 2 s.
    status, body, elapsed = timed_get(port, "slow-start-bounded", "/delay?ms=1500")
    assert status == 504, body
    assert elapsed >= 2.0
