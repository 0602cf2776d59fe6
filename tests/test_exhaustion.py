"""Running out of file descriptors, seen and survived (docs/resilience.md, "Exhaustion").

The real process runs with RLIMIT_NOFILE 256 (set in the child only) while the test opens
1,000 idle connections to a ClusterIP. With the default ``--max-connections`` (derived from
that limit) the process never runs out: the connections past the limit wait in the backlog.
With the limit lifted it does run out: the failed accepts are logged and counted, accepting
pauses, ``/healthz`` and ``/readyz`` are still answered through the spare descriptor, and
everything works again once the idle connections are gone. The admin server's spare
descriptor is tested in a process that has none left at all.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket

import pytest

from meshproxy.core.accept import AcceptErrors, LogLimiter, ReserveFd, connection_limits
from meshproxy.core.settings import Settings
from proc import Meshproxy, free_port, http_get, wait_for
from test_chaos import Pod, pod_yaml, service_yaml

NOFILE = 256
IDLE = 1000


# -- the pieces, on a fake clock -----------------------------------------------------------------


@pytest.mark.parametrize("soft, settings, expected", [
    (256, {}, (32, None)),                                   # (256 - 64) // 6
    (256, {"ingress_listen": ("127.0.0.1", 80)}, (16, 48)),   # 192 split: 96 // 6, 96 // 2
    (1024, {}, (160, None)),                                 # (1024 - 64) // 6
    (65536, {"ingress_tls_listen": ("127.0.0.1", 443)}, (5120, 15360)),   # reserve 65536 // 16 = 4096
    (65536, {"max_connections": 100}, (100, 100)),           # the flag wins, for each kind
    (16, {}, (1, None)),                                     # never 0: one connection at a time
])
def test_default_max_connections_from_the_descriptor_limit(soft, settings, expected):
    assert connection_limits(Settings(**settings), soft) == expected


class FakeLog:
    def __init__(self):
        self.lines: list[str] = []

    def error(self, fmt, *args):
        self.lines.append(fmt % args)

    warning = error


def test_accept_errors_are_counted_logged_once_per_interval_and_pause():
    from meshproxy.core import metrics
    now = [100.0]
    log = FakeLog()
    errs = AcceptErrors("test", log, clock=lambda: now[0])
    counter = metrics.accept_errors.labels("test", "EMFILE")
    before = counter._value.get()
    emfile = OSError(24, "Too many open files")
    assert errs.failed(emfile, "127.0.0.1:80") is True
    for _ in range(5):
        now[0] += 1
        assert errs.failed(emfile, "127.0.0.1:80") is True
    assert counter._value.get() - before == 6
    assert log.lines == ["test: accept on 127.0.0.1:80: out of file descriptors: Too many open files (EMFILE); "
                         "accepting paused, retried every 0.1s"]
    now[0] += 10
    errs.failed(emfile, "127.0.0.1:80")
    assert log.lines[-1].endswith("retried every 0.1s (5 more since the last message)")
    errs.succeeded("127.0.0.1:80")
    errs.succeeded("127.0.0.1:80")
    assert log.lines[-1] == "test: accepting on 127.0.0.1:80 again after 7 failed attempts" and len(log.lines) == 3
    # The peer's doing is neither counted nor a reason to pause; unknown errors are counted.
    assert errs.failed(OSError(103, "Software caused connection abort"), "x") is False   # ECONNABORTED
    assert errs.failed(OSError(22, "Invalid argument"), "x") is False
    assert metrics.accept_errors.labels("test", "other")._value.get() >= 1
    limiter = LogLimiter(10.0, clock=lambda: now[0])
    assert limiter.allow("k") == "" and limiter.allow("k") is None


def test_reserve_fd_is_given_up_and_taken_back():
    r = ReserveFd()
    assert r.fd is not None
    assert r.release() is True and r.fd is None and r.release() is False
    assert r.take() is True and r.fd is not None
    r.close()


# -- the real process ------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster(tmp_path, *args):
    pod = Pod("pod-a", "127.0.10.231")
    cip = "127.96.0.231"
    port = free_port(cip)
    (tmp_path / "m.yaml").write_text(service_yaml("web", cip, port) + pod_yaml("pod-a", pod.ip, "app: web", pod.port))
    mp = Meshproxy([str(tmp_path)], "--no-health-checks", *args, nofile=NOFILE)
    try:
        with mp:
            yield mp, (cip, port)
    finally:
        pod.stop()


def idle_connections(addr: tuple[str, int], n: int) -> list[socket.socket]:
    """``n`` connections that send nothing. The kernel completes them whether or not the proxy
    accepts them (the backlog is 4096). Out of descriptors, the proxy resets a connection it
    accepted but cannot open the pod's socket for: when that reset lands before ``connect()``
    has returned (a busy machine), that one is left out."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(addr)
        except ConnectionResetError:
            s.close()
            continue
        out.append(s)
    return out


def answered(addr: tuple[str, int], timeout: float = 5.0) -> bool:
    """One HTTP request through the ClusterIP on a new connection: answered by the pod?"""
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            data = b""
            while b"pod-a /\n" not in data:     # the pod keeps the connection: read the answer only
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def metric(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly these labels (in any order); 0 when absent."""
    for m in re.finditer(r"^%s\{([^}]*)\} (\S+)$" % re.escape(name), text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


@pytest.mark.slow
def test_default_limit_keeps_the_process_inside_its_descriptors(tmp_path):
    """RLIMIT_NOFILE 256, no --max-connections: 32 L4 connections at most (docs/resilience.md);
    1,000 idle ones never exhaust the process, /healthz and /metrics keep answering, and the
    waiting connections are served as the idle ones leave."""
    with cluster(tmp_path) as (mp, addr):
        conns = idle_connections(addr, IDLE)
        try:
            wait_for(lambda: "l4: 32 open connections, the limit" in mp.output(), 5, what="limit logged")
            assert http_get(mp.admin + "/healthz", 2) == (200, b"ok\n")
            text = mp.metrics()
            assert metric(text, "meshproxy_l4_active_connections", namespace="default", service="web", port="http") == 32
            assert "meshproxy_accept_errors_total{" not in text, re.findall(r"^meshproxy_accept_errors_total.*$", text, re.M)
        finally:
            for s in conns:
                s.close()
        wait_for(lambda: answered(addr, 2), 20, what="served again")
        assert "Traceback" not in mp.output()


@pytest.mark.slow
def test_out_of_descriptors_is_logged_counted_survived_and_recovered(tmp_path):
    """RLIMIT_NOFILE 256 with the limit lifted: 1,000 idle connections exhaust the process."""
    with cluster(tmp_path, "--max-connections", "100000") as (mp, addr):
        conns = idle_connections(addr, IDLE)
        try:
            # Either accept() itself or the pod socket of a connection just accepted finds no
            # descriptor; both are counted and logged the same way.
            wait_for(lambda: re.search(r"l4: (accept|pod socket for a connection accepted) on 127\.96\.0\.231:\d+: "
                                       r"out of file descriptors: Too many open files \(EMFILE\); accepting paused",
                                       mp.output()), 10, what="EMFILE logged")
            # Answered through the spare descriptor (or a normal accept, when one was free).
            assert http_get(mp.admin + "/healthz", 3) == (200, b"ok\n")
            assert http_get(mp.admin + "/readyz", 3) == (200, b"ready\n")
        finally:
            for s in conns:
                s.close()
        wait_for(lambda: answered(addr, 2), 20, what="served again")
        wait_for(lambda: re.search(r"l4: accepting on 127\.96\.0\.231:\d+ again after \d+ failed attempts", mp.output()),
                 5, what="recovery logged")
        text = mp.metrics()
        assert metric(text, "meshproxy_accept_errors_total", listener="l4", reason="EMFILE") > 0
        # Log lines are rate-limited: a handful, not one per failed accept.
        assert len(re.findall(r"l4: .* on 127\.96\.0\.231:\d+: out of file descriptors", mp.output())) <= 6
        assert "Traceback" not in mp.output()


ADMIN_EXHAUSTED = """
import asyncio, os, sys
from meshproxy.admin import AdminServer

async def main():
    admin = AdminServer("127.0.0.1", 0, is_ready=lambda: True, snapshot_json=lambda: {})
    await admin.start()
    hog = []
    while True:                      # every descriptor the process may still open
        try:
            hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    print(admin.port, len(hog), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_admin_answers_health_from_the_spare_descriptor_when_none_is_left():
    """The admin server in a process with no descriptor left at all: /healthz and /readyz are
    still answered (the spare descriptor accepts them), anything else gets a 503 that says
    why, and the failed accepts are logged."""
    import subprocess
    import sys

    from proc import ROOT

    proc = subprocess.Popen([sys.executable, "-c", ADMIN_EXHAUSTED], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    try:
        port, hogged = map(int, proc.stdout.readline().split())
        assert hogged > 0
        admin = f"http://127.0.0.1:{port}"
        for _ in range(3):           # again and again: the spare is taken back each time
            assert http_get(admin + "/healthz", 3) == (200, b"ok\n")
            assert http_get(admin + "/readyz", 3) == (200, b"ready\n")
        assert http_get(admin + "/metrics", 3) == (503, b"out of file descriptors: only /healthz and /readyz are answered now\n")
    finally:
        proc.kill()
        proc.wait()
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert "admin: accept on 127.0.0.1:" in err and "(EMFILE); accepting paused" in err, err
