"""--workers N: one control plane, N data-plane processes sharing the listeners."""

import http.client
import os
import re
import signal
import socket
import subprocess

from proc import Meshproxy, free_port, wait_for
from test_chaos import Pod, pod_yaml, services_yaml


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "meshproxy.workers" in line]


def test_two_workers_serve_sum_metrics_and_are_restarted(tmp_path):
    pods = [Pod("w-1", "127.0.10.171"), Pod("w-2", "127.0.10.172")]
    cip = "127.96.0.171"
    port = free_port(cip)
    (tmp_path / "svc.yaml").write_text(services_yaml(cip, port))
    (tmp_path / "pods.yaml").write_text("".join(pod_yaml(p.name, p.ip, "app: web") for p in pods))
    ingress = free_port()
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
            wait_for(lambda: len(children(mp.proc.pid)) == 2 and workers[0] not in children(mp.proc.pid), 10,
                     what="worker restarted")
            wait_for(lambda: mp.metrics() and True, 1)
            mp.wait_ready(10)
            for _ in range(20):
                assert l4_once().startswith(b"HTTP/1.1 200")
    finally:
        for p in pods:
            p.stop()
