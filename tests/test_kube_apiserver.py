"""meshproxy against a real kube-apiserver (1.20.2 built from Debian's sources) and etcd.

Runs when the cached binary exists (``scripts/kube-apiserver.sh build``) or when
``MESHPROXY_K8S_TESTS=1`` (then this module builds it: ~20 minutes on 2 cores); otherwise it
skips and says so — except in CI, where ``.ci/run`` builds the binary first and a missing one
fails these tests (``conftest.unavailable``). Objects are created, changed and deleted through the API (plain HTTPS with
the static token); meshproxy runs as a real process with ``--kubeconfig`` and must follow each
change within 1 s (endpoints, listeners, routes in /debug/snapshot, and real traffic). The API
server is killed and restarted while meshproxy runs and while a loop of L4 connections goes
through a ClusterIP: no connection may fail, and meshproxy must end in the right state.

Addresses: pods are backends on 127.0.10.x; ClusterIPs are given explicitly from the test API
server's --service-cluster-ip-range 127.96.0.0/16 (loopback, so meshproxy can bind them).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import unavailable
from proc import ROOT, free_port, http_get, wait_for

SCRIPT = os.path.join(ROOT, "scripts", "kube-apiserver.sh")
CACHE = os.path.join(os.environ.get("MESHPROXY_CACHE") or os.path.expanduser("~/.cache/meshproxy"), "kube-apiserver")
BINARY = os.path.join(CACHE, "bin", "kube-apiserver")
FOLLOW = 1.0          # seconds meshproxy may take to follow a change (the bar)


def _skip_reason() -> str | None:
    if os.path.exists(BINARY):
        return None
    if os.environ.get("MESHPROXY_K8S_TESTS") == "1":
        return None
    return ("no kube-apiserver: build it once with `scripts/kube-apiserver.sh build` (~20 min, cached in "
            f"{CACHE}) or set MESHPROXY_K8S_TESTS=1 to build it here")


pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _apiserver_binary():
    reason = _skip_reason()
    if reason is not None:
        unavailable(reason)


# --------------------------------------------------------------------------------------------
# The API server and a tiny client


class ApiServer:
    """etcd + kube-apiserver started by scripts/kube-apiserver.sh in ``dir``."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.env: dict[str, str] = {}

    def build(self) -> None:
        if not os.path.exists(BINARY):
            subprocess.run(["bash", SCRIPT, "build"], check=True, timeout=3600)

    def start(self) -> ApiServer:
        out = subprocess.run(["bash", SCRIPT, "start", self.dir], check=True, capture_output=True,
                             text=True, timeout=180)
        self.env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        self.server, self.token = self.env["KUBE_SERVER"], self.env["KUBE_TOKEN"]
        self.kubeconfig = self.env["KUBECONFIG"]
        self.ctx = ssl.create_default_context(cafile=os.path.join(self.dir, "ca.crt"))
        return self

    def stop(self) -> None:
        subprocess.run(["bash", SCRIPT, "stop", self.dir], check=False, capture_output=True, timeout=60)

    def kill(self) -> None:
        """SIGKILL the API server: an abrupt crash, no goodbye to its watchers."""
        os.kill(int(self.env["APISERVER_PID"]), signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            for _ in range(50):
                os.kill(int(self.env["APISERVER_PID"]), 0)
                time.sleep(0.1)

    def restart_apiserver(self) -> None:
        """Crash the API server, then start it again on the same ports and etcd data (the
        script starts etcd and the API server together, so etcd is restarted too)."""
        self.kill()
        self.stop()
        self.start()

    def call(self, method: str, path: str, body=None, *, content_type="application/json",
             query: str = "") -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path + (("?" + query) if query else ""), data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type,
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            with e:   # it holds the connection: closed here, not by the garbage collector mid-test
                return e.code, json.loads(e.read() or b"{}")

    def ok(self, method, path, body=None, **kw) -> dict:
        status, doc = self.call(method, path, body, **kw)
        assert 200 <= status < 300, f"{method} {path}: {status} {doc.get('message', doc)}"
        return doc

    def create(self, path, obj) -> dict:
        return self.ok("POST", path, obj)

    def patch(self, path, patch) -> dict:
        return self.ok("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, path) -> dict:
        return self.ok("DELETE", path)


@pytest.fixture(scope="module")
def apiserver():
    directory = tempfile.mkdtemp(prefix="meshproxy-kube-test-")
    api = ApiServer(directory)
    api.build()
    api.start()
    try:
        yield api
    finally:
        api.stop()
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# meshproxy with --kubeconfig (or, until the CLI has the flag, the same wiring in-process)


class Meshproxy:
    def __init__(self, kubeconfig: str, *args: str) -> None:
        self.admin_port = free_port()
        self.cmd = [sys.executable, "-m", "meshproxy", "run", "--kubeconfig", kubeconfig, "--admin-listen", f"127.0.0.1:{self.admin_port}",
                    "--no-health-checks", *args]
        self.log = tempfile.NamedTemporaryFile(prefix="meshproxy-kube-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> Meshproxy:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"meshproxy exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return http_get(self.admin + "/readyz", 1)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout=20.0) -> None:
        wait_for(self.ready, timeout, 0.05, "meshproxy /readyz")

    def snapshot(self) -> dict:
        status, body = http_get(self.admin + "/debug/snapshot")
        assert status == 200, body
        return json.loads(body)

    def metric(self, name: str) -> float | None:
        text = http_get(self.admin + "/metrics")[1].decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else None

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


# --------------------------------------------------------------------------------------------
# Backends standing in for pods


class PodBackend:
    """An HTTP server on a pod IP answering its pod's name (HTTP/1.0, one response per
    connection: good for both the L4 loop and Ingress requests)."""

    def __init__(self, name: str, ip: str) -> None:
        self.name, self.ip = name, ip
        body = name.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((ip, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pod_manifest(name: str, backend: PodBackend, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1",
                                     "ports": [{"name": "http", "containerPort": backend.port}]}]}}


def ready_status(ip: str, ready: bool = True) -> dict:
    return {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def endpoints_of(snap: dict, svc: str) -> list[tuple[str, int, bool]]:
    return sorted((e["ip"], e["port"], e["ready"]) for es in snap["endpoints"]
                  if es["namespace"] == "default" and es["service"] == svc for e in es["endpoints"])


def listeners_of(snap: dict) -> set[str]:
    return {lst["address"] for lst in snap["listeners"]}


def follow(mp: Meshproxy, pred, what: str):
    """Wait until ``pred(snapshot)`` holds and check it took at most FOLLOW seconds."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < 10:
        last = mp.snapshot()
        if pred(last):
            took = time.monotonic() - t0
            assert took <= FOLLOW, f"{what}: meshproxy took {took:.2f}s (more than {FOLLOW}s)"
            return last
        time.sleep(0.02)
    raise AssertionError(f"{what}: not reached in 10 s; snapshot: {json.dumps(last)[:3000]}\n{mp.output()[-3000:]}")


class L4Loop:
    """Connections through a ClusterIP, back to back, in a thread; every one must get a 200."""

    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.ok = 0
        self.failures: list[str] = []
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.addr, timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                if not data.startswith(b"HTTP/1.0 200"):
                    self.failures.append(f"{time.strftime('%X')}: {data[:80]!r}")
                else:
                    self.ok += 1
                    self.seen.add(data.rpartition(b"\r\n\r\n")[2])
            except OSError as exc:
                self.failures.append(f"{time.strftime('%X')}: {exc!r}")
            time.sleep(0.01)

    def __enter__(self) -> L4Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(10)


# --------------------------------------------------------------------------------------------


def _service(name: str, cluster_ip: str, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "selector": {"app": name},
                     "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]}}


def _cluster_ip() -> str:
    # Away from the .0.x addresses other tests use; the API server's range is 127.96.0.0/16.
    return f"127.96.{random.randint(180, 250)}.{random.randint(2, 250)}"


def test_meshproxy_follows_objects_made_through_the_api(apiserver):
    api = apiserver
    ns = "/api/v1/namespaces/default"
    svc_name = f"web{random.randint(1000, 9999)}"
    cip = _cluster_ip()
    port = free_port(cip)
    ingress_port = free_port()
    backends = {f"{svc_name}-{i}": PodBackend(f"{svc_name}-{i}", f"127.0.10.{200 + i}") for i in range(1, 5)}
    labels = {"app": svc_name}
    mp = Meshproxy(api.kubeconfig, "--ingress-listen", f"127.0.0.1:{ingress_port}")
    try:
        api.create(f"{ns}/services", _service(svc_name, cip, port))
        for name in list(backends)[:2]:
            api.create(f"{ns}/pods", pod_manifest(name, backends[name], labels))
            api.patch(f"{ns}/pods/{name}/status", ready_status(backends[name].ip))
        mp.start()
        mp.wait_ready()
        snap = mp.snapshot()
        want = sorted((backends[n].ip, backends[n].port, True) for n in list(backends)[:2])
        assert endpoints_of(snap, svc_name) == want
        assert f"{cip}:{port}" in listeners_of(snap)
        # Real traffic through the ClusterIP.
        with socket.create_connection((cip, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert s.makefile("rb").read().endswith(tuple(n.encode() for n in list(backends)[:2]))

        # Ingress (class meshproxy) -> routes and a request through it.
        api.create("/apis/networking.k8s.io/v1/ingressclasses", {
            "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": f"meshproxy-{svc_name}"}, "spec": {"controller": "meshproxy.dev/ingress"}})
        api.create("/apis/networking.k8s.io/v1/namespaces/default/ingresses", {
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": svc_name, "namespace": "default"},
            "spec": {"ingressClassName": f"meshproxy-{svc_name}", "rules": [{"host": f"{svc_name}.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": svc_name, "port": {"name": "http"}}}}]}}]}})
        follow(mp, lambda s: any(r.get("host") == f"{svc_name}.example" and r.get("backend") == f"default/{svc_name}:http"
                                 for r in s["routes"]), "Ingress route")
        req = urllib.request.Request(f"http://127.0.0.1:{ingress_port}/", headers={"Host": f"{svc_name}.example"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and r.read().decode() in list(backends)[:2]

        # Scale up: a third pod, created then made Ready.
        third = list(backends)[2]
        api.create(f"{ns}/pods", pod_manifest(third, backends[third], labels))
        api.patch(f"{ns}/pods/{third}/status", ready_status(backends[third].ip))
        follow(mp, lambda s: (backends[third].ip, backends[third].port, True) in endpoints_of(s, svc_name),
               "scale up")
        # Not ready -> not serving; ready again.
        api.patch(f"{ns}/pods/{third}/status", ready_status(backends[third].ip, ready=False))
        follow(mp, lambda s: (backends[third].ip, backends[third].port, False) in endpoints_of(s, svc_name),
               "pod not ready")
        api.patch(f"{ns}/pods/{third}/status", ready_status(backends[third].ip))
        follow(mp, lambda s: (backends[third].ip, backends[third].port, True) in endpoints_of(s, svc_name),
               "pod ready again")
        # Scale down: delete the first pod (unscheduled pods are deleted at once, no kubelet).
        first = next(iter(backends))
        api.delete(f"{ns}/pods/{first}")
        follow(mp, lambda s: backends[first].ip not in {e[0] for e in endpoints_of(s, svc_name)}, "scale down")
        # Labels: the second pod leaves the selector, then comes back.
        second = list(backends)[1]
        api.patch(f"{ns}/pods/{second}", {"metadata": {"labels": {"app": "elsewhere"}}})
        follow(mp, lambda s: endpoints_of(s, svc_name) == [(backends[third].ip, backends[third].port, True)],
               "label change removes the pod")
        api.patch(f"{ns}/pods/{second}", {"metadata": {"labels": labels}})
        follow(mp, lambda s: len(endpoints_of(s, svc_name)) == 2, "label change adds the pod back")
        # Delete the Service: its listener goes, its route has no backend any more.
        api.delete(f"{ns}/services/{svc_name}")
        follow(mp, lambda s: f"{cip}:{port}" not in listeners_of(s) and not endpoints_of(s, svc_name),
               "service deleted")
        metrics = http_get(mp.admin + "/metrics")[1].decode()
        assert 'meshproxy_source_events_total{kind="Pod",source="kubernetes",type="ADDED"}' in metrics
        assert 'meshproxy_source_up{source="kubernetes"} 1.0' in metrics
    finally:
        mp.stop()
        for b in backends.values():
            b.close()
        for path in [f"{ns}/services/{svc_name}", f"/apis/networking.k8s.io/v1/namespaces/default/ingresses/{svc_name}",
                     f"/apis/networking.k8s.io/v1/ingressclasses/meshproxy-{svc_name}"] + [
                         f"{ns}/pods/{n}" for n in backends]:
            api.call("DELETE", path)


def _ingress(name: str, cls: str) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"ingressClassName": cls, "rules": [{"host": f"{name}.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": name, "port": {"number": 80}}}}]}}]}}


def test_ingress_status_is_published_for_our_class_only(apiserver):
    """The conformance suite's Background step ("The Ingress status shows the IP address or FQDN
    where it is exposed") and its ingress_class feature (an Ingress of another class gets no
    status from us), against the real API server's status subresource."""
    api = apiserver
    tag = random.randint(1000, 9999)
    ours_cls, ours, foreign = f"meshproxy-st{tag}", f"st-ours{tag}", f"st-foreign{tag}"
    ing_path = "/apis/networking.k8s.io/v1/namespaces/default/ingresses"

    def lb(name):
        return api.ok("GET", f"{ing_path}/{name}").get("status", {}).get("loadBalancer", {}).get("ingress")

    api.create("/apis/networking.k8s.io/v1/ingressclasses", {
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": ours_cls}, "spec": {"controller": "meshproxy.dev/ingress"}})
    api.create(ing_path, _ingress(ours, ours_cls))
    api.create(ing_path, _ingress(foreign, f"other-st{tag}"))
    ingress_port = free_port()
    mp = Meshproxy(api.kubeconfig, "--ingress-listen", f"127.0.0.1:{ingress_port}")
    try:
        # Default address: the --ingress-listen host.
        mp.start()
        mp.wait_ready()
        wait_for(lambda: lb(ours) == [{"ip": "127.0.0.1"}], 5, 0.1, "status of our Ingress")
        assert lb(foreign) is None
        # The flag changes: the status follows (both IP and DNS name forms).
        mp.stop()
        mp = Meshproxy(api.kubeconfig, "--ingress-listen", f"127.0.0.1:{ingress_port}",
                       "--publish-status-address", "127.0.0.42,gw.example.com")
        mp.start()
        mp.wait_ready()
        wait_for(lambda: lb(ours) == [{"ip": "127.0.0.42"}, {"hostname": "gw.example.com"}], 5, 0.1,
                 "status after the flag changed")
        st = mp.snapshot()["kubernetes"]["ingressStatus"]
        assert st["writes"] >= 1 and st["failures"] == 0, st
        # Someone else overwrites it: put back within a few seconds.
        api.ok("PATCH", f"{ing_path}/{ours}/status", {"status": {"loadBalancer": {"ingress": [{"ip": "10.9.9.9"}]}}},
               content_type="application/merge-patch+json")
        wait_for(lambda: lb(ours) == [{"ip": "127.0.0.42"}, {"hostname": "gw.example.com"}], 5, 0.1,
                 "status restored")
        # The server enforces the resourceVersion precondition our merge patches carry.
        code, doc = api.call("PATCH", f"{ing_path}/{ours}/status",
                             {"metadata": {"resourceVersion": "1"}, "status": {"loadBalancer": {"ingress": None}}},
                             content_type="application/merge-patch+json")
        assert code == 409, (code, doc)
        # Our Ingress moves to the other class: the status we set is taken back, and the
        # foreign Ingress never got one.
        api.patch(f"{ing_path}/{ours}", {"spec": {"ingressClassName": f"other-st{tag}"}})
        wait_for(lambda: lb(ours) is None, 5, 0.1, "status cleared after the class change")
        assert lb(foreign) is None
        # --update-status=false: nothing is written.
        mp.stop()
        api.patch(f"{ing_path}/{foreign}", {"spec": {"ingressClassName": ours_cls}})
        mp = Meshproxy(api.kubeconfig, "--ingress-listen", f"127.0.0.1:{ingress_port}", "--update-status=false")
        mp.start()
        mp.wait_ready()
        time.sleep(2.0)
        assert lb(foreign) is None
        assert "ingressStatus" not in mp.snapshot()["kubernetes"]
    finally:
        mp.stop()
        for path in [f"{ing_path}/{ours}", f"{ing_path}/{foreign}",
                     f"/apis/networking.k8s.io/v1/ingressclasses/{ours_cls}"]:
            api.call("DELETE", path)


def test_api_server_restart_under_traffic(apiserver):
    api = apiserver
    ns = "/api/v1/namespaces/default"
    svc_name = f"db{random.randint(1000, 9999)}"
    cip = _cluster_ip()
    port = free_port(cip)
    backends = {f"{svc_name}-{i}": PodBackend(f"{svc_name}-{i}", f"127.0.10.{210 + i}") for i in range(1, 4)}
    labels = {"app": svc_name}
    mp = Meshproxy(api.kubeconfig)
    try:
        api.create(f"{ns}/services", _service(svc_name, cip, port))
        for name in list(backends)[:2]:
            api.create(f"{ns}/pods", pod_manifest(name, backends[name], labels))
            api.patch(f"{ns}/pods/{name}/status", ready_status(backends[name].ip))
        mp.start()
        mp.wait_ready()
        follow(mp, lambda s: len(endpoints_of(s, svc_name)) == 2, "initial endpoints")
        with L4Loop(cip, port) as loop:
            time.sleep(0.5)
            # A write meshproxy does not watch moves etcd's (global) revision past every
            # resourceVersion it holds: the restarted server's watch caches start after them,
            # so its re-watches get 410 and it must relist (what a real restart usually does).
            api.create(f"{ns}/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": svc_name}})
            api.restart_apiserver()           # SIGKILL the API server; etcd restarted too
            # Changes right after the restart, possibly before meshproxy has reconnected: it
            # must see them either way (re-watch, or relist after 410).
            first, third = next(iter(backends)), list(backends)[2]
            api.delete(f"{ns}/pods/{first}")
            api.create(f"{ns}/pods", pod_manifest(third, backends[third], labels))
            api.patch(f"{ns}/pods/{third}/status", ready_status(backends[third].ip))
            want = sorted((backends[n].ip, backends[n].port, True) for n in list(backends)[1:])
            wait_for(lambda: endpoints_of(mp.snapshot(), svc_name) == want, 45, 0.1, "state after the restart")
            # ...and it follows live changes again within the bar.
            api.patch(f"{ns}/pods/{third}/status", ready_status(backends[third].ip, ready=False))
            follow(mp, lambda s: (backends[third].ip, backends[third].port, False) in endpoints_of(s, svc_name),
                   "change after the restart")
            time.sleep(0.3)
        assert loop.failures == [], f"{len(loop.failures)} failed connections of {loop.ok + len(loop.failures)}: {loop.failures[:5]}"
        assert loop.ok > 50
        assert mp.metric('meshproxy_source_up{source="kubernetes"}') == 1.0
        relists = mp.metric('meshproxy_source_relists_total{source="kubernetes"}')
        assert relists is not None and relists >= 1, "no relist after the restart"
        print(f"L4 loop: {loop.ok} connections, 0 failures; relists: {relists}")
    finally:
        mp.stop()
        for b in backends.values():
            b.close()
        for path in [f"{ns}/services/{svc_name}", f"{ns}/configmaps/{svc_name}"] + [
                f"{ns}/pods/{n}" for n in backends]:
            api.call("DELETE", path)


def test_readiness_waits_for_the_initial_sync(apiserver):
    api = apiserver
    api.stop()
    mp = Meshproxy(api.kubeconfig)
    try:
        mp.start()
        time.sleep(2.0)
        assert not mp.ready(), "ready before the API server was reachable"
        api.start()
        mp.wait_ready(60)
    finally:
        mp.stop()
