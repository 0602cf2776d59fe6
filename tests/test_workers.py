"""--workers N: one control plane, N data-plane processes sharing the listeners."""

import http.client
import os
import re
import signal
import socket
import subprocess

from meshproxy.control import control_path
from proc import Meshproxy, free_port, wait_for
from test_chaos import Load, Pod, hold, pod_yaml, services_yaml
from test_control_plane import graceful_shutdown, socket_owner


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "meshproxy.workers" in line]


def test_two_workers_serve_sum_metrics_and_are_restarted(tmp_path):
    pods = [Pod("w-1", "127.0.10.171"), Pod("w-2", "127.0.10.172")]
    cip = "127.96.0.171"
    port = free_port(cip, hold=True)
    (tmp_path / "svc.yaml").write_text(services_yaml(cip, port))
    (tmp_path / "pods.yaml").write_text("".join(pod_yaml(p.name, p.ip, "app: web", p.port) for p in pods))
    ingress = free_port(hold=True)
    try:
        with Meshproxy([str(tmp_path)], "--no-health-checks", "--workers", "2",
                       "--ingress-listen", f"127.0.0.1:{ingress}") as mp:
            workers = children(mp.proc.pid)
            assert len(workers) == 2

            def l4_once():
                with socket.create_connection((cip, port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    return s.recv(200)
            for _ in range(40):
                assert l4_once().startswith(b"HTTP/1.1 200")
                c = http.client.HTTPConnection("127.0.0.1", ingress, timeout=5)
                c.request("GET", "/", headers={"Host": "web.test"})
                assert c.getresponse().status == 200
                c.close()
            metrics = mp.metrics()
            total = sum(float(v) for v in re.findall(r'^meshproxy_l4_connections_total\{[^}]*\} (\S+)$', metrics, re.M))
            assert total == 40, metrics       # both workers' counts, added up by the control plane
            # A worker that dies is started again; service goes on meanwhile.
            os.kill(workers[0], signal.SIGKILL)
            wait_for(lambda: len(children(mp.proc.pid)) == 2 and workers[0] not in children(mp.proc.pid), 20,
                     what="worker restarted")
            mp.wait_ready(20)
            for _ in range(20):
                assert l4_once().startswith(b"HTTP/1.1 200")
    finally:
        for p in pods:
            p.stop()


def test_sigterm_with_workers_connection_close_during_the_delay(tmp_path, backend):
    """The workers learn of SIGTERM at once, not after --shutdown-delay: both answer with
    Connection: close while their listeners still accept."""
    def workers(mp):
        pids = wait_for(lambda: len(c := children(mp.proc.pid)) == 2 and c, 20, what="two workers")
        return pids
    graceful_shutdown(tmp_path, backend("127.0.10.173", name="b"), "--workers", "2", data_plane=workers)


def test_takeover_with_workers_under_load(tmp_path):
    """``run --workers 2 --takeover`` replaces a ``--workers 2`` group on the same ports under
    load: the old group drains and exits 0, no request fails, the new workers serve."""
    pods = [Pod("t-1", "127.0.10.174"), Pod("t-2", "127.0.10.175")]
    cip = "127.96.0.174"
    port = free_port(cip, hold=True)
    (tmp_path / "svc.yaml").write_text(services_yaml(cip, port))
    (tmp_path / "pods.yaml").write_text("".join(pod_yaml(p.name, p.ip, "app: web", p.port) for p in pods))
    ingress = free_port(hold=True)
    args = ("--no-health-checks", "--workers", "2", "--ingress-listen", f"127.0.0.1:{ingress}", "--drain-timeout", "5")
    old = Meshproxy([str(tmp_path)], *args).start()
    new = Meshproxy([str(tmp_path)], *args, "--takeover", admin_port=old.admin_port)
    try:
        old_workers = children(old.proc.pid)
        assert len(old_workers) == 2
        with Load(("127.0.0.1", ingress), (cip, port)) as load:
            hold(load, 1.5, 150)
            new.start(wait=False)
            assert old.proc.wait(30) == 0          # the old group drained and left by itself
            new.wait_ready(20)
            hold(load, 1.5, 150)                   # served by the new group alone
        load.check("takeover --workers 2")
        assert load.failures == [] and load.l4_failures == [], (load.failures[:5], load.l4_failures[:5])
        assert not any(os.path.exists(f"/proc/{pid}") for pid in old_workers)
        assert len(children(new.proc.pid)) == 2
        # The new group owns the control socket: the next upgrade finds it.
        assert os.path.exists(control_path(("127.0.0.1", old.admin_port)))
    finally:
        new.stop()
        old.stop()
        for p in pods:
            p.stop()


def test_readiness_probes_run_once_per_pod_not_once_per_worker(tmp_path):
    """Probes belong to the control plane: with --workers 2 every probe of a pod comes from the
    control-plane process, none from a worker (issue 6: "one probe per pod per process"). Each
    probe's connection is traced to the process that holds it while the pod answers it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    probers: list[int | None] = []
    mp: Meshproxy | None = None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/ready" and mp is not None and mp.proc is not None:
                pids = [mp.proc.pid, *children(mp.proc.pid)]
                probers.append(socket_owner(pids, self.client_address[1], self.server.server_address[1]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.10.181", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    cip = "127.96.0.181"
    (tmp_path / "objs.yaml").write_text(f"""\
apiVersion: v1
kind: Pod
metadata: {{name: probed, labels: {{app: probed}}}}
spec:
  containers:
  - name: c
    ports: [{{name: http, containerPort: {port}}}]
    readinessProbe: {{httpGet: {{path: /ready, port: http}}, periodSeconds: 1}}
status: {{podIP: 127.0.10.181, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: probed}}
spec: {{clusterIP: {cip}, selector: {{app: probed}}, ports: [{{name: http, port: {free_port(cip, hold=True)}, targetPort: http}}]}}
""")
    try:
        mp = Meshproxy([str(tmp_path)], "--workers", "2")
        with mp:
            assert len(children(mp.proc.pid)) == 2
            wait_for(lambda: len(probers) >= 4, 30, what="four probes")
            assert probers[:4] == [mp.proc.pid] * 4, (mp.proc.pid, children(mp.proc.pid), probers)
    finally:
        srv.shutdown()
        srv.server_close()
