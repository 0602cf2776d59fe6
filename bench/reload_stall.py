"""Data-plane stalls during a big reload: ``python -m bench.reload_stall --pods 45000``.

The question (docs/resilience.md, "Big reloads"): while the control plane takes in a large
change — a manifest of tens of thousands of Pods written over the watched file — do requests
keep being answered? It:

1. starts a small backend (``bench.tcpserver``: echo and HTTP) and the real process,
   ``python -m meshproxy run -f DIR --ingress-listen ...``, on a folder with a canary Service
   (ClusterIP + Ingress host ``canary.test``) pointing at that backend, and a second file,
   ``cluster.yaml``, holding one Pod;
2. runs three probe clients, each sending one request every ``--interval`` seconds and timing
   it: ``GET /healthz`` on the admin port (keep-alive; the answer's ``X-Snapshot-Version``
   tells when the new snapshot is live), an L4 round trip through the canary ClusterIP on a
   new connection each time, and an L7 ``GET`` through the Ingress (keep-alive);
3. after ``--warmup`` seconds, replaces ``cluster.yaml`` (atomic rename, as editors and
   ConfigMap volumes do) with ``--pods`` Pods and ``--services`` Services in the block style
   ``kubectl get -o yaml`` writes (~750 bytes a Pod: 45,000 Pods are ~34 MB);
4. waits until the new snapshot is live, then ``--settle`` seconds more (listeners of the new
   Services are bound after the publish), and reports per probe the longest request latency,
   the 99th percentile and the count, plus the time to apply and peak RSS; and the longest time
   in which no probe at all got an answer, which is the proxy's stall as every client sees it
   (a probe thread the machine did not schedule delays only that probe).

``--repo PATH`` runs the meshproxy code of another checkout (same-run before/after figures).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._util import VENV_PYTHON, Proc, check_loopback, free_port, log, wait_port

REPO = Path(__file__).resolve().parent.parent
BACKEND_IP = "127.0.10.250"
CANARY_IP = "127.96.250.1"


# ---------------------------------------------------------------------------- manifests


def pod_doc(j: int, services: int) -> str:
    svc = j % services
    return f"""apiVersion: v1
kind: Pod
metadata:
  name: app-{j:05d}
  namespace: default
  uid: 6f1c{j:08x}-1d2e-4b5a-9c8d-0e1f2a3b4c5d
  creationTimestamp: "2026-11-02T10:{j % 60:02d}:00Z"
  labels:
    app: svc-{svc:04d}
    pod-template-hash: 7d9f8c6b5{svc % 10}
    tier: backend
  ownerReferences:
  - apiVersion: apps/v1
    kind: ReplicaSet
    name: svc-{svc:04d}-7d9f8c6b5
    uid: 0a1b{svc:08x}-2c3d-4e5f-8a9b-c0d1e2f3a4b5
    controller: true
spec:
  nodeName: node-{j % 50:02d}
  containers:
  - name: app
    image: registry.example.com/app:1.2.{j % 10}
    ports:
    - name: http
      containerPort: 8080
      protocol: TCP
    resources:
      requests: {{cpu: 100m, memory: 128Mi}}
      limits: {{memory: 256Mi}}
status:
  phase: Running
  podIP: 10.{j // 62500 + 1}.{j // 250 % 250}.{j % 250 + 1}
  conditions:
  - type: Ready
    status: "True"
  - type: ContainersReady
    status: "True"
"""


def service_doc(i: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata:
  name: svc-{i:04d}
  namespace: default
spec:
  clusterIP: 127.96.{i // 250 + 1}.{i % 250 + 1}
  selector:
    app: svc-{i:04d}
  ports:
  - name: http
    port: 80
    targetPort: http
"""


def big_manifest(pods: int, services: int) -> str:
    return "---\n".join([service_doc(i) for i in range(services)] + [pod_doc(j, services) for j in range(pods)])


def base_manifest(backend_port: int, svc_port: int) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: canary, namespace: default, labels: {{app: canary}}}}
spec: {{containers: [{{name: tcp, ports: [{{name: tcp, containerPort: {backend_port}}}]}}]}}
status: {{podIP: {BACKEND_IP}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: canary, namespace: default}}
spec:
  clusterIP: {CANARY_IP}
  selector: {{app: canary}}
  ports: [{{name: tcp, port: {svc_port}, targetPort: tcp}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: canary, namespace: default}}
spec:
  rules:
  - host: canary.test
    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: canary, port: {{number: {svc_port}}}}}}}}}]}}
"""


# ---------------------------------------------------------------------------- probes


class Probe(threading.Thread):
    """Sends one request every ``interval`` seconds; records (sent at, latency, extra)."""

    def __init__(self, name: str, interval: float) -> None:
        super().__init__(name=f"probe-{name}", daemon=True)
        self.label = name
        self.interval = interval
        self.samples: list[tuple[float, float, object]] = []
        self.errors: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def once(self) -> object:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                extra = self.once()
                self.samples.append((t0, time.monotonic() - t0, extra))
            except OSError as exc:
                self.errors.append((t0, str(exc)))
                self.reset()
            time.sleep(self.interval)

    def reset(self) -> None:
        pass


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
    """One Content-Length response from a keep-alive socket: (head, body)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end])
    n = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    while len(buf) < end + 4 + n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    body = bytes(buf[end + 4:end + 4 + n])
    del buf[:end + 4 + n]
    return head, body


class HttpProbe(Probe):
    def __init__(self, name: str, interval: float, addr: tuple[str, int], host: str, path: str) -> None:
        super().__init__(name, interval)
        self.addr, self.host, self.path = addr, host, path
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buf = bytearray()

    def once(self) -> object:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=120)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head, _ = _read_response(self.sock, self.buf)
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"x-snapshot-version":
                return int(v)
        return None


class L4Probe(Probe):
    """A new connection through the ClusterIP each time: accept, pick, connect, echo."""

    def __init__(self, name: str, interval: float, addr: tuple[str, int]) -> None:
        super().__init__(name, interval)
        self.addr = addr

    def once(self) -> object:
        with socket.create_connection(self.addr, timeout=120) as s:
            s.sendall(b"EEEE")
            got = b""
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                if not chunk:
                    raise ConnectionError("closed before the echo")
                got += chunk
        return None


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------- run


def measure(pods: int, services: int, repo: Path, interval: float, warmup: float, settle: float,
            workdir: Path, timeout: float = 600.0) -> dict:
    check_loopback(BACKEND_IP)
    check_loopback(CANARY_IP)
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")
    env.pop("PYTHONWARNINGS", None)
    backend_port = free_port(BACKEND_IP)
    backend = Proc("tcpserver", [VENV_PYTHON, "-m", "bench.tcpserver", "--listen", f"{BACKEND_IP}:{backend_port}"],
                   workdir / "tcpserver.log", cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)))
    svc_port = free_port(CANARY_IP)
    admin_port, ingress_port = free_port(), free_port()
    mdir = workdir / "manifests"
    mdir.mkdir()
    (mdir / "base.yaml").write_text(base_manifest(backend_port, svc_port))
    (mdir / "cluster.yaml").write_text(pod_doc(0, 1))
    big = big_manifest(pods, services)
    proxy = Proc("meshproxy", [VENV_PYTHON, "-m", "meshproxy", "run", "-f", str(mdir), "--no-health-checks",
                               "--admin-listen", f"127.0.0.1:{admin_port}", "--ingress-listen", f"127.0.0.1:{ingress_port}"],
                 workdir / "meshproxy.log", cwd=repo, env=env)
    probes: list[Probe] = []
    try:
        if not wait_port(BACKEND_IP, backend_port, 10, backend) or not wait_port("127.0.0.1", admin_port, 30, proxy):
            raise RuntimeError(f"did not start; see {workdir}")
        probes = [HttpProbe("healthz", interval, ("127.0.0.1", admin_port), "admin", "/healthz"),
                  L4Probe("l4", interval, (CANARY_IP, svc_port)),
                  HttpProbe("l7", interval, ("127.0.0.1", ingress_port), "canary.test", "/")]
        for p in probes:
            p.start()
        time.sleep(warmup)
        v0 = next((s[2] for s in reversed(probes[0].samples) if s[2] is not None), 0)
        rss0 = rss_kib(proxy.pid)
        staging = workdir / "staging"
        staging.mkdir()
        (staging / "cluster.yaml").write_text(big)
        t_write = time.monotonic()
        os.replace(staging / "cluster.yaml", mdir / "cluster.yaml")
        peak = rss0
        t_live = None
        while time.monotonic() - t_write < timeout:
            peak = max(peak, rss_kib(proxy.pid))
            live = [s for s in probes[0].samples if s[0] >= t_write and s[2] is not None and s[2] > v0]
            if live:
                t_live = live[0][0] + live[0][1]
                break
            time.sleep(0.05)
        if t_live is None:
            raise RuntimeError(f"the new snapshot did not go live within {timeout:.0f}s; see {workdir}")
        end = time.monotonic() + settle
        while time.monotonic() < end:
            peak = max(peak, rss_kib(proxy.pid))
            time.sleep(0.05)
    finally:
        for p in probes:
            p.stop.set()
        for p in probes:
            p.join(130)
            p.reset()
        proxy.stop()
        backend.stop()
    out: dict = {"pods": pods, "services": services, "bytes": len(big), "apply_s": round(t_live - t_write, 2),
                 "rss_before_mib": round(rss0 / 1024), "rss_peak_mib": round(peak / 1024), "probes": {}}
    window = (t_write - interval, time.monotonic())
    # The proxy's stall as all clients see it: the longest time in which no probe got an
    # answer. A loop that does not turn delays every probe at once; one probe thread that the
    # machine did not schedule (this process runs beside the proxy) delays only itself.
    done = sorted(s[0] + s[1] for p in probes for s in p.samples if window[0] <= s[0] <= window[1])
    edges = [window[0], *done]
    out["stall_ms"] = round(max((b - a for a, b in zip(edges, edges[1:])), default=0.0) * 1000, 1)
    for p in probes:
        lat = [s[1] for s in p.samples if window[0] <= s[0] <= window[1]]
        errs = [e for e in p.errors if window[0] <= e[0] <= window[1]]
        out["probes"][p.label] = {
            "requests": len(lat), "errors": len(errs), "first_error": errs[0][1] if errs else None,
            "max_ms": round(max(lat) * 1000, 1) if lat else None,
            "p99_ms": round(statistics.quantiles(lat, n=100)[98] * 1000, 1) if len(lat) >= 100 else None,
            "median_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        }
    return out


def report(r: dict) -> str:
    lines = [f"{r['pods']} Pods, {r['services']} Services, {r['bytes'] / 1e6:.1f} MB written over the watched file; "
             f"new snapshot live after {r['apply_s']} s; RSS {r['rss_before_mib']} -> peak {r['rss_peak_mib']} MiB",
             f"longest time no probe got an answer (the proxy's stall): {r['stall_ms']} ms",
             "", "| probe | requests | errors | longest request ms | p99 ms | median ms |", "|---|---|---|---|---|---|"]
    for name, p in r["probes"].items():
        lines.append(f"| {name} | {p['requests']} | {p['errors']} | {p['max_ms']} | {p['p99_ms']} | {p['median_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reload_stall", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=45000)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose meshproxy runs (default: this one)")
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between a probe's requests")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds measured after the snapshot is live")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep-log", type=Path, help="copy meshproxy's log here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshproxy-reload-stall-") as d:
        log(f"writing {args.pods} pods over the watched manifest of {args.repo}")
        try:
            r = measure(args.pods, args.services, args.repo.resolve(), args.interval, args.warmup, args.settle, Path(d))
        finally:
            if args.keep_log is not None and (Path(d) / "meshproxy.log").exists():
                args.keep_log.write_bytes((Path(d) / "meshproxy.log").read_bytes())
    print(json.dumps(r, indent=1) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
