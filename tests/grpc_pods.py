"""gRPC pods for tests: grpcio servers with generic handlers (no generated code), and manifests.

Each ``GrpcPod`` serves ``test.Echo`` on 127.0.0.1 (its own port):

* ``Who``: answers its pod name; echoes request metadata ``x-echo`` as initial metadata and
  sets trailing metadata ``x-pod`` (its name);
* ``Slow``: sleeps the number of milliseconds in the request (bytes of an int), then answers;
* ``Count``: a server stream of N messages (N from the request), each ``b"%d" % i``;
* ``Fail``: ends with the status code in the request (an int) and message "failed on purpose".
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

__all__ = ["GrpcPod", "grpc_service_yaml"]

SERVICE = "test.Echo"


class GrpcPod:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self._lock = threading.Lock()
        handlers = {
            "Who": grpc.unary_unary_rpc_method_handler(self._who),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
            "Count": grpc.unary_stream_rpc_method_handler(self._count),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _seen(self) -> None:
        with self._lock:
            self.calls += 1

    def _who(self, request: bytes, context) -> bytes:
        self._seen()
        md = dict(context.invocation_metadata())
        if "x-echo" in md:
            context.send_initial_metadata((("x-echo", md["x-echo"]),))
        context.set_trailing_metadata((("x-pod", self.name),))
        return self.name.encode()

    def _slow(self, request: bytes, context) -> bytes:
        self._seen()
        deadline = time.monotonic() + int(request or b"0") / 1000
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        return b"slow done"

    def _count(self, request: bytes, context):
        self._seen()
        for i in range(int(request)):
            yield b"%d" % i

    def _fail(self, request: bytes, context) -> bytes:
        self._seen()
        context.abort(grpc.StatusCode(_code(int(request))), "failed on purpose")

    def stop(self) -> None:
        self.server.stop(grace=None)


def _code(n: int):
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c.value
    raise ValueError(n)


def grpc_service_yaml(name: str, pods: list[GrpcPod], *, port_name: str = "grpc", app_protocol: str | None = "grpc",
                      namespace: str = "default", port: int = 50051) -> str:
    docs = []
    for i, p in enumerate(pods):
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}-{i}, namespace: {namespace}, labels: {{app: {name}}}}}
spec: {{containers: [{{name: c, ports: [{{name: {port_name}, containerPort: {p.port}}}]}}]}}
status: {{podIP: 127.0.0.1, conditions: [{{type: Ready, status: "True"}}]}}
""")
    ap = f", appProtocol: {app_protocol}" if app_protocol else ""
    docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: {port_name}, port: {port}, targetPort: {port_name}{ap}}}]
""")
    return "---\n".join(docs)
