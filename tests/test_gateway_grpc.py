"""GRPCRoute and gRPC mesh ports end to end: ``meshproxy run -f`` (a real process) with a Gateway
HTTP listener on its own 127.0.x.y address, GRPCRoutes matching by service and method, a mesh
Service port with ``appProtocol: grpc`` on its ClusterIP, and grpcio clients and pods.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

from gateway_fixtures import INFRA, gateway_yaml, http_listener
from grpc_pods import GrpcPod, grpc_service_yaml
from proc import Meshproxy, free_port

GW = "127.0.62.1"
MESH_IP = "127.96.62.1"


def grpcroute(name: str, body: str) -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: {name}, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: grpc-gw}}]
{body}"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pods_a = [GrpcPod("a-0"), GrpcPod("a-1")]
    pods_b = [GrpcPod("b-0")]
    pods_m = [GrpcPod(f"m-{i}") for i in range(3)]
    port = free_port(GW)
    mesh_svc = grpc_service_yaml("mesh-echo", pods_m, namespace=INFRA).replace(
        "spec:\n  selector", f"spec:\n  clusterIP: {MESH_IP}\n  selector")
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {INFRA}}}",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: meshproxy}\n"
        "spec: {controllerName: meshproxy.dev/gateway-controller}",
        grpc_service_yaml("echo-a", pods_a, namespace=INFRA, port=50051),
        grpc_service_yaml("echo-b", pods_b, namespace=INFRA, port=50051),
        mesh_svc,
        gateway_yaml("grpc-gw", GW, http_listener(port, "Same")).replace("gatewayClassName: gateway-conformance",
                                                                          "gatewayClassName: meshproxy"),
        grpcroute("by-method", """  rules:
  - matches: [{method: {service: test.Echo, method: Count}}]
    backendRefs: [{name: echo-b, port: 50051}]
  - matches: [{method: {service: test.Echo}}]
    backendRefs: [{name: echo-a, port: 50051}]
"""),
    ]
    path = os.path.join(str(tmp_path_factory.mktemp("grpc")), "grpc.yaml")
    with open(path, "w") as f:
        f.write("\n---\n".join(docs))
    mp = Meshproxy([path], "--service-cidr", "127.96.0.0/16")
    try:
        mp.start()
        yield port, pods_a, pods_b, pods_m, mp
    finally:
        mp.stop()
        for p in pods_a + pods_b + pods_m:
            p.stop()


def test_grpcroute_matches_service_and_method(cluster):
    port, pods_a, pods_b, _, mp = cluster
    with grpc.insecure_channel(f"{GW}:{port}") as ch:
        names = {ch.unary_unary("/test.Echo/Who")(b"", timeout=5) for _ in range(20)}
        assert names == {b"a-0", b"a-1"}
        before = pods_b[0].calls
        assert list(ch.unary_stream("/test.Echo/Count")(b"3", timeout=5)) == [b"0", b"1", b"2"]
        assert pods_b[0].calls == before + 1
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/other.Svc/Who")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    st = {(s["kind"], s["name"]): s["status"] for s in mp.snapshot()["gatewayStatus"]}
    parents = st[("GRPCRoute", "by-method")]["parents"]
    assert {c["type"]: c["status"] for c in parents[0]["conditions"]}["Accepted"] == "True"


def test_mesh_grpc_port_is_balanced_per_call(cluster):
    _, _, _, pods_m, _ = cluster
    with grpc.insecure_channel(f"{MESH_IP}:50051") as ch:
        seen: dict[bytes, int] = {}
        for _ in range(90):
            name = ch.unary_unary("/test.Echo/Who")(b"", timeout=5)
            seen[name] = seen.get(name, 0) + 1
    assert sorted(seen) == [b"m-0", b"m-1", b"m-2"] and min(seen.values()) >= 15, seen


def test_sigterm_lets_calls_in_flight_finish(tmp_path):
    """Drain: on SIGTERM an HTTP/2 client connection gets GOAWAY; the call in flight on it
    finishes with its answer, and the process exits once it has."""
    import signal
    import threading
    pod = GrpcPod("drain")
    port = free_port()
    path = tmp_path / "m.yaml"
    path.write_text(grpc_service_yaml("echo", [pod]) + "---\n" + """apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: g, namespace: default}
spec:
  rules:
  - http:
      paths:
      - {path: /test.Echo/, pathType: Prefix, backend: {service: {name: echo, port: {number: 50051}}}}
""")
    mp = Meshproxy([str(path)], "--ingress-listen", f"127.0.0.1:{port}", "--drain-timeout", "10")
    try:
        mp.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert ch.unary_unary("/test.Echo/Who")(b"", timeout=5) == b"drain"
            result: dict = {}

            def slow() -> None:
                try:
                    result["answer"] = ch.unary_unary("/test.Echo/Slow")(b"1500", timeout=10)
                except grpc.RpcError as exc:
                    result["error"] = exc.code()

            t = threading.Thread(target=slow)
            t.start()
            deadline = time.monotonic() + 5
            while pod.calls < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pod.calls == 2, "the slow call did not reach the pod"
            mp.proc.send_signal(signal.SIGTERM)
            t.join(timeout=15)
            assert result == {"answer": b"slow done"}, result
        assert mp.proc.wait(timeout=15) == 0
    finally:
        if mp.proc is not None and mp.proc.poll() is None:
            mp.stop()
        pod.stop()
