"""``meshproxy demo``: a small cluster on loopback, served by a real meshproxy.

Demo pods are tiny HTTP echo servers bound to 127.0.10.x (Linux routes all of 127.0.0.0/8 to
loopback, so each pod gets an address of its own). The manifests (written to a temporary
folder) declare them with readiness probes, a ClusterIP service, a NodePort service and an
Ingress with two hosts and a prefix fan-out. ``--check`` runs the tour itself: balancing,
NodePort, host/path routing, 404, and a pod failing over.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import socket
import sys
import tempfile
import textwrap

from .core.settings import Settings
from .process import Process, install_uvloop

__all__ = ["run_demo", "MANIFESTS"]

PODS = [("web-1", "127.0.10.1", "web"), ("web-2", "127.0.10.2", "web"), ("web-3", "127.0.10.3", "web"),
        ("api-1", "127.0.10.11", "api"), ("api-2", "127.0.10.12", "api")]
POD_PORT = 18080


def _pod_yaml(name: str, ip: str, app: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}
        spec:
          nodeName: local
          containers:
          - name: {app}
            ports: [{{name: http, containerPort: {POD_PORT}}}]
            readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 1, failureThreshold: 1}}
        status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
        """)


MANIFESTS = "---\n".join([_pod_yaml(*p) for p in PODS] + [textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: demo}
    spec:
      clusterIP: 127.96.0.10
      selector: {app: web}
      ports: [{name: http, port: 8000, targetPort: http}]
    """), textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web-public, namespace: demo}
    spec:
      type: NodePort
      clusterIP: 127.96.0.11
      selector: {app: web}
      ports: [{name: http, port: 8000, targetPort: http, nodePort: 30080}]
    """), textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: api, namespace: demo}
    spec:
      clusterIP: 127.96.0.12
      selector: {app: api}
      ports: [{name: http, port: 8000, targetPort: http}]
    """), textwrap.dedent("""\
    apiVersion: networking.k8s.io/v1
    kind: Ingress
    metadata: {name: demo, namespace: demo}
    spec:
      rules:
      - host: web.demo.local
        http:
          paths:
          - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
      - host: shop.demo.local
        http:
          paths:
          - {path: /api, pathType: Prefix, backend: {service: {name: api, port: {number: 8000}}}}
          - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8000}}}}
    """)])


class _PodServer(asyncio.Protocol):
    """Answers every request with ``<pod name> <path>``; enough HTTP for curl and probes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
            body = f"{self.name} {path}\n".encode()
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))


async def _start_pods() -> dict[str, asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    servers = {}
    for name, ip, _ in PODS:
        servers[name] = await loop.create_server(lambda n=name: _PodServer(n), ip, POD_PORT, reuse_address=True)
    return servers


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(host: str, port: int, path: str = "/", host_header: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host_header or f"{host}:{port}", "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace").strip()
    finally:
        conn.close()


def _tour(ingress: tuple[str, int]) -> list[tuple[bool, str]]:
    results = []

    def check(ok: bool, what: str) -> None:
        results.append((ok, what))
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)

    seen = {_get("127.96.0.10", 8000)[1].split()[0] for _ in range(12)}
    check(len(seen) >= 2 and seen <= {"web-1", "web-2", "web-3"}, f"ClusterIP 127.96.0.10:8000 balances over web pods: {sorted(seen)}")
    st, body = _get("127.0.0.1", 30080, "/np")
    check(st == 200 and body.startswith("web-"), f"NodePort 127.0.0.1:30080 answers: {body!r}")
    h, p = ingress
    st, body = _get(h, p, "/", "web.demo.local")
    check(st == 200 and body.startswith("web-"), f"Ingress host web.demo.local -> {body!r}")
    st, body = _get(h, p, "/api/orders", "shop.demo.local")
    check(st == 200 and body.startswith("api-"), f"Ingress shop.demo.local/api/orders -> {body!r}")
    st, body = _get(h, p, "/cart", "shop.demo.local")
    check(st == 200 and body.startswith("web-"), f"Ingress shop.demo.local/cart -> {body!r}")
    st, _ = _get(h, p, "/", "nobody.demo.local")
    check(st == 404, f"unknown host -> {st}")
    return results


async def _demo(check: bool, admin: tuple[str, int], ingress: tuple[str, int]) -> int:
    tmp = tempfile.mkdtemp(prefix="meshproxy-demo-")
    with open(os.path.join(tmp, "demo.yaml"), "w") as f:
        f.write(MANIFESTS)
    pods = await _start_pods()
    settings = Settings(paths=[tmp], admin_listen=admin, ingress_listen=ingress, log_level="warning")
    proc = Process(settings)
    if not await proc.start():
        return 1
    # Let the first readiness probes pass (period 1 s).
    for _ in range(50):
        snap = proc.runtime.snapshot
        if snap and all(len(b.usable) == (3 if b.service.startswith("web") else 2) for b in snap.backends.values()):
            break
        await asyncio.sleep(0.1)
    h, p = ingress
    print(f"meshproxy demo: manifests in {tmp}; admin http://{admin[0]}:{proc.admin.port}/debug/snapshot")
    print(textwrap.dedent(f"""\
        Try:
          curl http://127.96.0.10:8000/                               # ClusterIP, balanced over web-1..3
          curl http://127.0.0.1:30080/                              # NodePort
          curl -H 'Host: web.demo.local' http://{h}:{p}/            # Ingress, host rule
          curl -H 'Host: shop.demo.local' http://{h}:{p}/api/x      # Ingress, prefix fan-out -> api
          curl -H 'Host: shop.demo.local' http://{h}:{p}/cart       # Ingress, prefix fan-out -> web
          curl http://{admin[0]}:{proc.admin.port}/metrics | grep meshproxy_
        Pod web-2 stops answering in 10 s; its readiness probe fails and traffic fails over.
        Ctrl-C stops the demo."""), flush=True)
    loop = asyncio.get_running_loop()
    ok = True
    try:
        if check:
            results = await loop.run_in_executor(None, _tour, (h, p))
            print("  web-2 goes down ...", flush=True)
            pods["web-2"].close()
            await asyncio.sleep(2.5)
            seen = set()
            failures = 0
            for _ in range(12):
                st, body = await loop.run_in_executor(None, _get, "127.96.0.10", 8000)
                if st != 200:
                    failures += 1
                else:
                    seen.add(body.split()[0])
            fo = failures == 0 and "web-2" not in seen and len(seen) >= 1
            print(f"  [{'ok' if fo else 'FAIL'}] after web-2 died: 12 requests, {failures} failed, served by {sorted(seen)}")
            results.append((fo, "failover"))
            ok = all(r for r, _ in results)
            print("demo check:", "PASSED" if ok else "FAILED")
        else:
            await asyncio.sleep(10)
            pods["web-2"].close()
            print("web-2 stopped: watch `curl http://127.96.0.10:8000/` skip it", flush=True)
            await asyncio.Event().wait()
    finally:
        await proc.close()
        for s in pods.values():
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def run_demo(args) -> int:
    install_uvloop()
    admin, ingress = args.admin_listen, args.ingress_listen
    if args.check:
        admin = (admin[0], _free_port(admin[0]))
        ingress = (ingress[0], _free_port(ingress[0]))
    try:
        return asyncio.run(_demo(args.check, admin, ingress))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"meshproxy demo: {exc}", file=sys.stderr)
        return 1
