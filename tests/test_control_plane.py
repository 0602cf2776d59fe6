"""The real process: file watch, reloads, admin endpoints, CLI exit codes.

Waits here are for events (a new snapshot, a refused connection, an exit) and their bounds
only keep a broken build from hanging; where a test shows that something happens without
waiting for a timer, the timer is configured far beyond any such bound."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from backends import ingress_yaml, request, service_yaml
from proc import ROOT, Meshproxy, free_port, http_get, wait_for

POD = textwrap.dedent("""\
    apiVersion: v1
    kind: Pod
    metadata: {{name: {name}, labels: {{app: web}}}}
    spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}
    status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{ready}"}}]}}
    """)
SVC = textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {{name: web}}
    spec: {{clusterIP: 127.96.0.{n}, selector: {{app: web}}, ports: [{{name: http, port: {port}, targetPort: http}}]}}
    """)


def endpoints_of(snap, svc="web"):
    return sorted((e["ip"], e["ready"]) for es in snap["endpoints"] if es["service"] == svc for e in es["endpoints"])


def reloads(metrics: str, result: str) -> float:
    m = re.search(r'^meshproxy_config_reloads_total\{result="%s"\} (\S+)$' % result, metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_edit_is_applied_and_a_bad_edit_keeps_the_last_snapshot(tmp_path):
    port = free_port("127.96.0.77", hold=True)
    (tmp_path / "svc.yaml").write_text(SVC.format(n=77, port=port))
    (tmp_path / "pods.yaml").write_text(POD.format(name="a", ip="127.0.10.1", ready="True"))
    with Meshproxy([str(tmp_path)], "--no-health-checks") as mp:
        snap = mp.snapshot()
        v1 = snap["version"]
        assert endpoints_of(snap) == [("127.0.10.1", True)]
        assert any(lst["address"] == f"127.96.0.77:{port}" for lst in snap["listeners"])
        metrics = mp.metrics()
        assert 'meshproxy_endpoints{namespace="default",service="web",state="ready"} 1.0' in metrics
        assert reloads(metrics, "ok") == 1

        # A change to a watched file shows in /debug/snapshot and /metrics, without a signal.
        (tmp_path / "pods.yaml").write_text(POD.format(name="a", ip="127.0.10.1", ready="True") + "---\n"
                                            + POD.format(name="b", ip="127.0.10.2", ready="False"))
        snap = wait_for(lambda: (s := mp.snapshot())["version"] > v1 and s, 20, what="new snapshot")
        assert endpoints_of(snap) == [("127.0.10.1", True), ("127.0.10.2", False)]
        metrics = mp.metrics()
        assert 'meshproxy_endpoints{namespace="default",service="web",state="not_ready"} 1.0' in metrics
        assert f"meshproxy_snapshot_version {float(snap['version'])}" in metrics

        # A broken file: the reload is refused and counted, the old snapshot stays.
        v2 = snap["version"]
        (tmp_path / "pods.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: [\n")
        wait_for(lambda: reloads(mp.metrics(), "error") >= 1, 20, what="reload error counted")
        snap = mp.snapshot()
        assert snap["version"] == v2
        assert endpoints_of(snap) == [("127.0.10.1", True), ("127.0.10.2", False)]
        assert "pods.yaml:3" in mp.output() or "pods.yaml:4" in mp.output()

        # New file in the folder; then a deletion.
        (tmp_path / "pods.yaml").write_text(POD.format(name="a", ip="127.0.10.1", ready="True"))
        (tmp_path / "more.yaml").write_text(POD.format(name="c", ip="127.0.10.3", ready="True"))
        wait_for(lambda: endpoints_of(mp.snapshot()) == [("127.0.10.1", True), ("127.0.10.3", True)], 20,
                 what="new file applied")
        (tmp_path / "more.yaml").unlink()
        wait_for(lambda: endpoints_of(mp.snapshot()) == [("127.0.10.1", True)], 20, what="deleted file applied")
        assert reloads(mp.metrics(), "ok") >= 3


def test_sighup_rereads_and_admin_endpoints(tmp_path):
    f = tmp_path / "c.yaml"
    port = free_port("127.96.0.78", hold=True)
    f.write_text(SVC.format(n=78, port=port) + "---\n" + POD.format(name="a", ip="127.0.10.1", ready="True"))
    with Meshproxy([str(f)], "--no-health-checks", env={"MESHPROXY_NO_INOTIFY": "1"}) as mp:
        assert http_get(mp.admin + "/healthz") == (200, b"ok\n")
        assert http_get(mp.admin + "/nope")[0] == 404
        v = mp.snapshot()["version"]
        f.write_text(SVC.format(n=78, port=port) + "---\n" + POD.format(name="a", ip="127.0.10.1", ready="False"))
        mp.send(signal.SIGHUP)
        snap = wait_for(lambda: (s := mp.snapshot())["version"] > v and s, 20, what="SIGHUP reload")
        assert endpoints_of(snap) == [("127.0.10.1", False)]


# Long enough for what graceful_shutdown checks inside it (~0.1 s on a quiet machine) thirty
# times over: a busy machine does not make those checks miss the window.
SHUTDOWN_DELAY = 3.0


def socket_owner(pids: list[int], port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the accepted (server) side of the connection 127.0.0.1:client_port
    -> :port; None while it is not accepted yet."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    inodes = {r[9] for r in rows if int(r[1].split(":")[1], 16) == port and int(r[2].split(":")[1], 16) == client_port}
    targets = {f"socket:[{i}]" for i in inodes if i != "0"}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    return pid
            except OSError:
                pass
    return None


def connect(port: int, pids: list[int]) -> tuple[http.client.HTTPConnection, int]:
    """A new keep-alive connection to the ingress and the pid that accepted it."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.connect()
    cport = c.sock.getsockname()[1]
    return c, wait_for(lambda: socket_owner(pids, port, cport), 10, what="connection accepted")


def connections_on_every(port: int, pids: list[int]) -> list[tuple[http.client.HTTPConnection, int]]:
    """New connections until each of ``pids`` (the processes sharing the listener) has one."""
    conns = []
    while {pid for _, pid in conns} != set(pids):
        assert len(conns) < 40, f"the kernel never gave {pids} a connection each: {[p for _, p in conns]}"
        conns.append(connect(port, pids))
    return conns


def graceful_shutdown(tmp_path, b, *args: str, data_plane=lambda mp: [mp.proc.pid]) -> None:
    """SIGTERM with --shutdown-delay: /readyz 503 at once; during the delay the listener still
    accepts, and every response (on connections open before SIGTERM and on new ones, in every
    process that serves) carries Connection: close; after it new connections are refused; exit 0.
    ``b``: the backend (conftest ``backend``) the Ingress sends to."""
    (tmp_path / "m.yaml").write_text(service_yaml("web", [b]) + "---\n" + ingress_yaml("web", [("web.test", "/", "Prefix", "web")]))
    port = free_port(hold=True)
    mp = Meshproxy([str(tmp_path)], "--no-health-checks", "--ingress-listen", f"127.0.0.1:{port}",
                   "--shutdown-delay", str(SHUTDOWN_DELAY), "--drain-timeout", "5", *args).start()
    try:
        pids = data_plane(mp)
        before = connections_on_every(port, pids)
        for c, _ in before:
            r, _, _ = request(port, "GET", "/", "web.test", conn=c)
            assert r.status == 200 and r.getheader("Connection") is None   # keep-alive as usual
        mp.send(signal.SIGTERM)
        wait_for(lambda: http_get(mp.admin + "/readyz", 1)[0] == 503, SHUTDOWN_DELAY, interval=0.01,
                 what="readyz 503")
        # Still within the shutdown delay (the listener accepts: after it, it refuses): readyz
        # said 503 before the delay was over, and the listener answers, with Connection: close.
        during = connections_on_every(port, pids)
        for c, pid in before + during:
            r, _, _ = request(port, "GET", "/", "web.test", conn=c)
            assert (r.status, r.getheader("Connection")) == (200, "close"), f"pid {pid}"
        assert mp.proc.poll() is None

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False
        wait_for(refused, SHUTDOWN_DELAY + 20, what="listener closed after the delay")
        assert mp.proc.wait(20) == 0
        assert all(c.sock is None for c, _ in before + during)   # the client closed each after Connection: close
    finally:
        mp.stop()


def test_sigterm_readyz_at_once_connection_close_during_delay_then_exit(tmp_path, backend):
    graceful_shutdown(tmp_path, backend("127.0.10.191", name="b"))


@pytest.mark.parametrize("workers", [1, 2])
def test_sigint_stops_at_once_with_a_request_in_flight(tmp_path, workers, backend):
    """SIGINT does not drain: the process exits with a request in flight that would take a
    minute, under a drain timeout of a minute, in less than the 20 s this test waits."""
    b = backend("127.0.10.192", name="b")
    (tmp_path / "m.yaml").write_text(service_yaml("web", [b]) + "---\n" + ingress_yaml("web", [("web.test", "/", "Prefix", "web")]))
    port = free_port(hold=True)
    mp = Meshproxy([str(tmp_path)], "--no-health-checks", "--ingress-listen", f"127.0.0.1:{port}",
                   "--drain-timeout", "60", "--workers", str(workers)).start()
    try:
        idle = request(port, "GET", "/", "web.test")[2]     # an idle keep-alive connection stays open
        result = {}

        def slow():
            try:
                result["status"] = request(port, "GET", "/delay?ms=60000", "web.test", timeout=90)[0].status
            except (OSError, http.client.HTTPException) as exc:
                result["error"] = exc
        t = threading.Thread(target=slow)
        t.start()
        wait_for(lambda: b.requests >= 2, 10, what="request in flight")
        mp.send(signal.SIGINT)
        mp.proc.wait(20)                 # raises if the exit waited for the request or a drain
        t.join(20)
        assert "error" in result, result # the request in flight was cut off
        idle.close()
    finally:
        mp.stop()


def test_run_refuses_invalid_config_with_located_messages(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: NodePort\n"
                 "  ports: [{port: 80, nodePort: 1}]\n")
    r = subprocess.run([sys.executable, "-m", "meshproxy", "run", "-f", str(f), "--admin-listen", f"127.0.0.1:{free_port()}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert f"{f}:6: Service/default/s: spec.ports[0].nodePort: 1 is outside 30000-32767" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_and_get_commands(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(SVC.format(n=10, port=80) + "---\n" + POD.format(name="a", ip="127.0.10.1", ready="True"))
    r = subprocess.run([sys.executable, "-m", "meshproxy", "validate", "-f", str(good)], cwd=ROOT,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: Bad}\nspec: {ports: [{port: 0}]}\n")
    r = subprocess.run([sys.executable, "-m", "meshproxy", "validate", "-f", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines == [f"{bad}:3: Service/default/Bad: metadata.name: 'Bad' is not a valid DNS-1035 label (lowercase letters, digits, '-', starting with a letter)",
                     f"{bad}:4: Service/default/Bad: spec.ports[0].port: 0 is outside 1-65535"]
    r = subprocess.run([sys.executable, "-m", "meshproxy", "get", "endpoints", "-f", str(good), "-o", "json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0
    assert json.loads(r.stdout) == [{"namespace": "default", "service": "web", "port": "http", "endpoints": [
        {"ip": "127.0.10.1", "port": 8080, "pod": "a", "node": None, "ready": True, "serving": True, "terminating": False}]}]
    r = subprocess.run([sys.executable, "-m", "meshproxy", "get", "services", "-f", str(good)],
                       cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and "127.96.0.10" in r.stdout and "web" in r.stdout


def test_cluster_dns_served_by_the_process(tmp_path):
    import dns.message
    import dns.query
    import dns.rdatatype
    (tmp_path / "c.yaml").write_text(SVC.format(n=81, port=free_port("127.96.0.81", hold=True)))
    dns_port = free_port(udp=True)      # the DNS server binds both, its TCP side without SO_REUSEPORT
    with Meshproxy([str(tmp_path)], "--no-health-checks", "--dns-listen", f"127.0.0.1:{dns_port}"):
        q = dns.message.make_query("web.default.svc.cluster.local", dns.rdatatype.A)
        r = dns.query.udp(q, "127.0.0.1", timeout=3, port=dns_port)
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["127.96.0.81"]


def test_admin_closes_after_connection_close_and_reports_version(tmp_path):
    import socket as s
    (tmp_path / "c.yaml").write_text(SVC.format(n=82, port=free_port("127.96.0.82", hold=True)))
    with Meshproxy([str(tmp_path)], "--no-health-checks") as mp:
        with s.create_connection(("127.0.0.1", mp.admin_port), timeout=3) as c:
            c.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):      # ends only if the server closes
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"x-snapshot-version: 1" in data.lower()


def test_control_socket_is_removed_on_exit_but_not_after_a_takeover(tmp_path):
    """The control socket file goes away with the process that made it. After ``--takeover``
    the new process owns the same path: the old one leaving must not delete it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "svc.yaml").write_text(SVC.format(n=81, port=free_port("127.96.0.81", hold=True)))
    env = {"XDG_RUNTIME_DIR": str(run_dir)}
    # --shutdown-delay: the old process is still running when the new one has made its socket.
    old = Meshproxy([str(tmp_path / "m")], "--no-health-checks", "--shutdown-delay", "0.5", env=env)
    path = run_dir / f"meshproxy-127.0.0.1-{old.admin_port}.sock"
    new = Meshproxy([str(tmp_path / "m")], "--no-health-checks", "--takeover", admin_port=old.admin_port, env=env)
    try:
        old.start()
        wait_for(path.exists, what="control socket")
        new.start(wait=False)
        assert old.proc.wait(20) == 0                  # drained and left by itself
        new.wait_ready(10)
        assert path.exists(), "the old process removed the new one's socket"
        with socket.socket(socket.AF_UNIX) as s:       # and it is the new process's, listening
            s.connect(str(path))
        assert new.stop(signal.SIGTERM) == 0
        assert not path.exists(), sorted(os.listdir(run_dir))
    finally:
        old.stop()
        new.stop()


def config_problems(metrics: str) -> float:
    m = re.search(r"^meshproxy_config_problems (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else -1.0


def test_a_refused_reload_is_shown_where_operators_look_until_a_good_one(tmp_path):
    """Invalid YAML written over the manifest: the last good snapshot stays and /readyz stays
    200 (as Envoy and ingress-nginx do), and the refusal is a problem in /debug/snapshot and in
    meshproxy_config_problems, worded as `validate` and `get` word it; a good reload clears it."""
    port = free_port("127.96.0.79", hold=True)
    f = tmp_path / "c.yaml"
    good = SVC.format(n=79, port=port) + "---\n" + POD.format(name="a", ip="127.0.10.1", ready="True")
    f.write_text(good)
    with Meshproxy([str(tmp_path)], "--no-health-checks") as mp:
        v = mp.snapshot()["version"]
        assert mp.snapshot()["problems"] == [] and config_problems(mp.metrics()) == 0
        f.write_text(good + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: [\n")
        wait_for(lambda: reloads(mp.metrics(), "error") >= 1, 20, what="reload refused")
        snap = mp.snapshot()
        assert snap["version"] == v and endpoints_of(snap) == [("127.0.10.1", True)]
        (problem,) = snap["problems"]
        assert problem.startswith(f"config: refused reload: {f}:15: invalid YAML: "), problem
        assert config_problems(mp.metrics()) == 1
        assert http_get(mp.admin + "/readyz") == (200, b"ready\n")
        # The same words from the commands an operator runs on the same file.
        detail = problem.removeprefix("config: refused reload: ")
        r = subprocess.run([sys.executable, "-m", "meshproxy", "validate", "-f", str(f)], cwd=ROOT,
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and r.stdout.splitlines() == [detail], r.stdout + r.stderr
        r = subprocess.run([sys.executable, "-m", "meshproxy", "get", "services", "-f", str(f)], cwd=ROOT,
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and r.stderr.splitlines() == [detail], r.stdout + r.stderr

        f.write_text(SVC.format(n=79, port=port) + "---\n" + POD.format(name="a", ip="127.0.10.1", ready="False"))
        snap = wait_for(lambda: (s := mp.snapshot())["version"] > v and s, 20, what="good reload")
        assert snap["problems"] == [] and config_problems(mp.metrics()) == 0
