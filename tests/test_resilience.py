"""Passive outlier detection and probes, end to end through the real process. Pods are
tests/podserver.py processes on port 0; waits are for outcomes, bounded only against a hang."""

import http.client
import re
import socket
import textwrap

from proc import Meshproxy, free_port, wait_for
from test_chaos import Pod, pod_yaml, services_yaml


def get(port: int, path: str = "/") -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers={"Host": "web.test"})
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def ejections(metrics: str) -> float:
    return sum(float(m) for m in re.findall(r'^meshproxy_outlier_ejections_total\{[^}]*\} (\S+)$', metrics, re.M))


def test_a_pod_answering_5xx_is_ejected_and_traffic_avoids_it(tmp_path):
    pods = {"good-1": Pod("good-1", "127.0.10.141"), "good-2": Pod("good-2", "127.0.10.142"),
            "bad": Pod("bad", "127.0.10.143", status=500)}
    cip = "127.96.0.141"
    (tmp_path / "svc.yaml").write_text(services_yaml(cip, free_port(cip, hold=True)))
    (tmp_path / "pods.yaml").write_text("".join(pod_yaml(n, p.ip, "app: web", p.port) for n, p in pods.items()))
    port = free_port(hold=True)
    try:
        with Meshproxy([str(tmp_path)], "--no-health-checks", "--ingress-listen", f"127.0.0.1:{port}") as mp:
            for _ in range(60):
                get(port)
            state = mp.snapshot()["outlier"]
            assert [e["address"] for e in state["ejected"]] == [f"127.0.10.143:{pods['bad'].port}"], state
            assert ejections(mp.metrics()) == 1
            # While ejected, the bad pod gets nothing: every answer comes from a good pod.
            answers = [get(port) for _ in range(40)]
            assert all(st == 200 and body.startswith("good-") for st, body in answers), answers
    finally:
        for p in pods.values():
            p.stop()


def test_l4_endpoint_that_refuses_connections_is_ejected(tmp_path):
    good = Pod("good", "127.0.10.151")
    good_b = Pod("good-b", "127.0.10.153")
    cip = "127.96.0.151"
    port = free_port(cip, hold=True)
    (tmp_path / "svc.yaml").write_text(services_yaml(cip, port))
    # "dead" has an address where nothing listens (a held port): every connect is refused.
    dead_port = free_port("127.0.10.152", hold=True)
    (tmp_path / "pods.yaml").write_text(pod_yaml("good", good.ip, "app: web", good.port)
                                        + pod_yaml("dead", "127.0.10.152", "app: web", dead_port)
                                        + pod_yaml("good-b", good_b.ip, "app: web", good_b.port))
    try:
        with Meshproxy([str(tmp_path)], "--no-health-checks") as mp:
            for _ in range(40):
                with socket.create_connection((cip, port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert s.recv(100).startswith(b"HTTP/1.1 200")     # retried invisibly
            state = mp.snapshot()["outlier"]
            assert f"127.0.10.152:{dead_port}" in [e["address"] for e in state["ejected"]], state
            failures = re.findall(r'^meshproxy_l4_connect_failures_total\{[^}]*\} (\S+)$', mp.metrics(), re.M)
            before = sum(map(float, failures))
            for _ in range(20):
                with socket.create_connection((cip, port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert s.recv(100).startswith(b"HTTP/1.1 200")
            after = sum(map(float, re.findall(r'^meshproxy_l4_connect_failures_total\{[^}]*\} (\S+)$', mp.metrics(), re.M)))
            assert after == before          # the ejected endpoint is not even tried
    finally:
        good.stop()
        good_b.stop()


def test_readiness_probe_failure_removes_a_pod_then_it_returns(tmp_path):
    """Probes run by the real process: a pod whose probe port closes leaves the endpoints."""
    web = Pod("web", "127.0.10.161")
    cip = "127.96.0.161"
    (tmp_path / "svc.yaml").write_text(services_yaml(cip, free_port(cip, hold=True)))
    probe = textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: web, labels: {{app: web}}}}
        spec:
          containers:
          - name: c
            ports: [{{name: http, containerPort: {web.port}}}]
            readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 1, failureThreshold: 1}}
        status: {{podIP: 127.0.10.161, conditions: [{{type: Ready, status: "True"}}]}}
        """)
    (tmp_path / "pods.yaml").write_text(probe)

    def ready(mp):
        return [e["ready"] for es in mp.snapshot()["endpoints"] for e in es["endpoints"]]
    try:
        with Meshproxy([str(tmp_path)]) as mp:
            # periodSeconds 1: each change is seen within a second or two; 20 s only bounds a hang.
            wait_for(lambda: ready(mp) == [True], 20, what="probe passes")
            web.stop()
            wait_for(lambda: ready(mp) == [False], 20, what="probe fails")
            web = Pod("web", "127.0.10.161", web.port)       # back on the port the manifest names
            try:
                wait_for(lambda: ready(mp) == [True], 20, what="probe passes again")
            except AssertionError:
                raise AssertionError(str(mp.snapshot().get("health"))) from None
    finally:
        web.stop()
