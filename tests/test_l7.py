"""L7 ingress through the real process: ``python -m meshproxy run -f DIR --ingress-listen ...``
with pure-Python backends on 127.0.0.0/8 and blocking clients. The in-process suite
(test_l7_unit.py) covers every edge; this one proves the main paths in the shipped binary,
including what only a process has: reload from files, SIGTERM draining, memory (RSS) bounds.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import resource
import signal
import socket
import subprocess
import threading
import time

import pytest

from backends import (
    Backend,
    SockReader,
    ingress_yaml,
    pattern,
    read_response,
    request,
    service_yaml,
    ws_handshake,
    ws_recv,
    ws_send,
)
from conftest import requires
from proc import Meshproxy, free_port, wait_for

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pods():
    bs = {"a1": Backend("127.0.12.1", name="a1"), "a2": Backend("127.0.12.2", name="a2"),
          "b": Backend("127.0.12.3", name="b")}
    yield bs
    for b in bs.values():
        b.stop()


def config(pods, root_service: str = "svc-a") -> str:
    return "---\n".join([
        service_yaml("svc-a", [pods["a1"], pods["a2"]]),
        service_yaml("svc-b", [pods["b"]]),
        service_yaml("svc-down", [pods["b"]], ready=False).replace("name: svc-down-0", "name: down-pod"),
        ingress_yaml("site", [("site.test", "/", "Prefix", root_service), ("site.test", "/b", "Prefix", "svc-b"),
                              ("down.test", "/", "Prefix", "svc-down")]),
        ingress_yaml("slow", [("slow.test", "/", "Prefix", "svc-a")], annotations={"meshproxy.dev/timeout": "500ms"}),
    ])


@pytest.fixture(scope="module")
def mp(pods, tmp_path_factory, http_parser_mode):
    d = tmp_path_factory.mktemp("l7manifests")
    (d / "all.yaml").write_text(config(pods))
    port = free_port()
    log = d / "access.log"
    m = Meshproxy([str(d)], "--ingress-listen", f"127.0.0.1:{port}", "--access-log", str(log),
                  "--no-health-checks")
    m.port = port
    m.dir = d
    m.access_log = log
    with m:
        yield m


def get(port, path, host="site.test", **kw):
    r, data, c = request(port, "GET", path, host, **kw)
    c.close()
    return r, data


def echo(port, path="/echo", host="site.test", **kw):
    r, data = get(port, path, host, **kw)
    assert r.status == 200, (r.status, data)
    return json.loads(data)


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def test_routing_keepalive_and_pool_reuse(mp, pods):
    a_before = pods["a1"].accepts + pods["a2"].accepts
    c = None
    for i in range(20):
        r, body, c = request(mp.port, "GET", f"/echo?i={i}", "site.test", conn=c)
        assert r.status == 200 and json.loads(body)["backend"] in ("a1", "a2")
    c.close()
    assert echo(mp.port, "/b/x")["backend"] == "b"
    # 20 requests over at most one new upstream connection per pod.
    assert pods["a1"].accepts + pods["a2"].accepts - a_before <= 2


def test_error_statuses(mp):
    assert get(mp.port, "/", host="nothing.test")[0].status == 404
    assert get(mp.port, "/", host="down.test")[0].status == 503
    assert get(mp.port, "/malformed?kind=cl-te")[0].status == 502
    assert get(mp.port, "/delay?ms=3000", host="slow.test")[0].status == 504   # not the pod's 200 after 3 s


def test_head_204_304_and_pipelining(mp):
    s = socket.create_connection(("127.0.0.1", mp.port), timeout=5)
    s.sendall(b"HEAD /bytes?n=77 HTTP/1.1\r\nHost: site.test\r\n\r\n"
              b"GET /status/204 HTTP/1.1\r\nHost: site.test\r\n\r\n"
              b"GET /status/304 HTTP/1.1\r\nHost: site.test\r\n\r\n"
              b"GET /echo?last=1 HTTP/1.1\r\nHost: site.test\r\n\r\n")
    st, h, body, rest = read_response(s, head=True)
    assert st == 200 and h["content-length"] == "77" and body == b""
    st, _, body, rest = read_response(s, rest)
    assert st == 204 and body == b""
    st, _, body, rest = read_response(s, rest)
    assert st == 304 and body == b""
    st, _, body, rest = read_response(s, rest)
    assert st == 200 and json.loads(body)["target"] == "/echo?last=1"
    s.close()


def test_expect_100_continue(mp):
    s = socket.create_connection(("127.0.0.1", mp.port), timeout=5)
    s.sendall(b"PUT /upload HTTP/1.1\r\nHost: site.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"data")
    st, _, body, _ = read_response(s)
    assert st == 200 and json.loads(body)["length"] == 4
    s.close()


def test_headers_hop_by_hop_and_forwarded(mp):
    e = echo(mp.port, headers={"Connection": "X-Drop", "X-Drop": "1", "Keep-Alive": "timeout=1",
                               "X-Forwarded-For": "6.6.6.6", "X-Keep": "k"})
    names = {n.lower(): v for n, v in e["headers"]}
    assert "x-drop" not in names and "keep-alive" not in names and "connection" not in names
    assert names["x-forwarded-for"] == "127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == "site.test"
    assert names["forwarded"] == "for=127.0.0.1;host=site.test;proto=http"
    assert names["x-keep"] == "k"


def test_websocket_echo(mp):
    s = socket.create_connection(("127.0.0.1", mp.port), timeout=5)
    head = ws_handshake(s, "site.test", "/ws")
    assert head.startswith(b"HTTP/1.1 101 ")
    reader = SockReader(s)
    reader.buf = head.partition(b"\r\n\r\n")[2]
    ws_send(s, b"through the real process")
    assert ws_recv(reader) == (1, b"through the real process")
    s.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_backend_killed_mid_stream_clean_error(mp, chunked):
    c = http.client.HTTPConnection("127.0.0.1", mp.port, timeout=10)
    c.request("GET", f"/die?after=10000{'&chunked=1' if chunked else ''}", headers={"Host": "site.test"})
    r = c.getresponse()
    with pytest.raises((http.client.IncompleteRead, ConnectionError, http.client.HTTPException)):
        r.read()
    c.close()


def _slow_download(port: int, path: str) -> tuple[int, bytes]:
    """GET with a small receive buffer and pauses between reads; returns (status, de-chunked body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n".encode())
    parts = []
    while True:
        d = s.recv(128 * 1024)
        if not d:
            break
        parts.append(d)
        if len(parts) % 8 == 0:
            time.sleep(0.005)
    s.close()
    data = b"".join(parts)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"Transfer-Encoding: chunked" in head:
        out = []
        pos = 0
        while True:
            eol = body.index(b"\r\n", pos)
            size = int(body[pos:eol], 16)
            if size == 0:
                break
            out.append(body[eol + 2:eol + 2 + size])
            pos = eol + 4 + size
        body = b"".join(out)
    return status, body


def test_10mib_both_ways_bounded_memory(mp):
    n = 10 * MiB
    pid = mp.proc.pid
    for _ in range(2):  # warm up allocator pools and the upstream pool
        get(mp.port, "/bytes?n=100000")
    base = _rss_kb(pid)
    payload = pattern(n)
    digest = hashlib.sha256(payload).hexdigest()
    peak = base
    stop = threading.Event()

    def watch():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_kb(pid))
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        # Downloads, Content-Length and chunked, read slowly.
        for q in ("", "&chunked=1"):
            status, body = _slow_download(mp.port, f"/bytes?n={n}{q}")
            assert status == 200 and len(body) == n and hashlib.sha256(body).hexdigest() == digest
        # Uploads, Content-Length and chunked, to a backend that reads slowly.
        for chunked in (False, True):
            c = http.client.HTTPConnection("127.0.0.1", mp.port, timeout=30)
            if chunked:
                c.request("POST", "/upload?slow=1", body=(payload[i:i + 262144] for i in range(0, n, 262144)),
                          headers={"Host": "site.test"}, encode_chunked=True)
            else:
                c.request("POST", "/upload?slow=1", body=payload, headers={"Host": "site.test"})
            r = c.getresponse()
            res = json.loads(r.read())
            c.close()
            assert res == {"backend": res["backend"], "length": n, "sha256": digest}
    finally:
        stop.set()
        t.join()
    # 40 MiB went through; the proxy's resident memory grew by far less than one body.
    assert (peak - base) * 1024 < 6 * MiB, (base, peak)


def test_route_change_under_traffic(mp, pods):
    result = {}

    def slow():
        r, body = get(mp.port, "/delay?ms=1000")
        result["status"], result["backend"] = r.status, json.loads(body)["backend"]

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.2)
    (mp.dir / "all.yaml").write_text(config(pods, root_service="svc-b"))
    wait_for(lambda: echo(mp.port, "/x")["backend"] == "b", timeout=10, what="new route in force")
    t.join(5)
    assert result["status"] == 200 and result["backend"] in ("a1", "a2")
    (mp.dir / "all.yaml").write_text(config(pods))
    wait_for(lambda: echo(mp.port, "/x")["backend"] in ("a1", "a2"), timeout=10, what="route restored")


def test_access_log_and_metrics(mp):
    assert get(mp.port, "/echo?logged=1")[0].status == 200
    wait_for(lambda: mp.access_log.exists() and "/echo?logged=1" in mp.access_log.read_text(),
             timeout=5, what="access log line")
    line = next(x for x in mp.access_log.read_text().splitlines() if "/echo?logged=1" in x)
    assert '"GET /echo?logged=1 HTTP/1.1" 200 ' in line and "ingress=default/site" in line
    text = wait_for(lambda: (lambda t: t if 'meshproxy_http_requests_total{' in t else None)(mp.metrics()),
                    timeout=5, what="metrics")
    assert 'ingress="default/site"' in text
    assert "meshproxy_http_no_route_total" in text


def test_curl_upload_and_keepalive(mp, tmp_path):
    f = tmp_path / "b"
    f.write_bytes(b"z" * 1500000)
    out = subprocess.run([requires("curl"), "-sS", "--http1.1", "-H", "Host: site.test", "--data-binary", f"@{f}",
                          f"http://127.0.0.1:{mp.port}/upload", "-o", "-", f"http://127.0.0.1:{mp.port}/upload",
                          "-w", " %{num_connects}"], capture_output=True, timeout=15)
    assert out.returncode == 0, out.stderr
    first = out.stdout.split(b"}", 1)[0] + b"}"
    assert json.loads(first)["length"] == 1500000
    assert out.stdout.endswith(b" 0")


def test_sigterm_drains_in_flight_request(pods, tmp_path):
    (tmp_path / "m.yaml").write_text(config(pods))
    port = free_port()
    with Meshproxy([str(tmp_path)], "--ingress-listen", f"127.0.0.1:{port}", "--no-health-checks",
                   "--drain-timeout", "5") as m:
        result = {}

        def slow():
            r, body = get(port, "/delay?ms=800")
            result["status"], result["connection"] = r.status, r.getheader("Connection")

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        m.send(signal.SIGTERM)
        t.join(5)
        assert result == {"status": 200, "connection": "close"}
        assert m.proc.wait(10) == 0
        # The listener is gone.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def _raise_nofile(need: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to at least ``need`` (the meshproxy started
    afterwards inherits it); skip the test when the hard limit does not allow it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _metric(text: str, line_prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_slowloris_1000_connections_do_not_stop_others(pods, tmp_path):
    """1,000 connections each dribbling a head byte every 2.5 s, all open at once for several
    seconds (header timeout 10 s): a normal client keeps getting answers, each within a second,
    and every slow one gets 408 once the header deadline (from its first byte) passes."""
    n_slow = 1000
    period = 2.5
    _raise_nofile(4096)
    (tmp_path / "m.yaml").write_text(config(pods))
    port = free_port()
    with Meshproxy([str(tmp_path)], "--ingress-listen", f"127.0.0.1:{port}", "--no-health-checks",
                   "--header-timeout", "10") as m:
        head = b"GET / HTTP/1.1\r\nHost: site.test\r\nX-Slow: " + b"a" * 100
        slow = []
        try:
            t_first = time.monotonic()
            for _ in range(n_slow):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.setblocking(False)
                s.send(head[:1])   # the header deadline runs from this byte
                slow.append(s)
            sent = [1] * n_slow
            latencies = []
            open_seen = 0.0
            t0 = time.monotonic()
            next_turn = t0
            turn = 0
            turns = 25   # a byte per connection every `period` s: 1/25 of them every 0.1 s
            last_normal = 0.0
            while time.monotonic() - t_first < 8.0:   # < the 10 s deadline of the first ones
                now = time.monotonic()
                if now >= next_turn:
                    for i in range(turn % turns, n_slow, turns):
                        try:
                            slow[i].send(head[sent[i]:sent[i] + 1])
                            sent[i] += 1
                        except OSError:
                            pass
                    turn += 1
                    next_turn += period / turns
                if now - last_normal >= 0.25:
                    last_normal = now
                    t1 = time.monotonic()
                    assert get(port, "/echo")[0].status == 200
                    latencies.append(time.monotonic() - t1)
                    # Open client connections, as the proxy counts them (exported once a second).
                    v = _metric(m.metrics(), "meshproxy_http_downstream_connections")
                    open_seen = max(open_seen, v or 0.0)
                time.sleep(0.01)
            assert len(latencies) >= 20 and max(latencies) < 1.0, latencies
            # All 1,000 were open at the same time, and none was answered or closed early.
            assert open_seen >= n_slow, open_seen
            for s in slow:
                with pytest.raises(BlockingIOError):
                    s.recv(100)
            assert min(sent) >= 3   # each sent a byte every 2.5 s all along
            # Then each gets 408 and is closed, 10 s after its first byte.
            answered = 0
            for s in slow:
                s.setblocking(True)
                s.settimeout(max(0.1, t_first + 13.0 - time.monotonic()))
                try:
                    data = s.recv(100)
                except OSError:
                    data = b""
                answered += data.startswith(b"HTTP/1.1 408 ")
            assert answered == n_slow
            assert time.monotonic() - t_first < 13.5
            assert m.proc.poll() is None
            assert get(port, "/echo")[0].status == 200
        finally:
            for s in slow:
                s.close()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the /metrics text (0.0 when absent); ``labels`` must be all
    of the sample's labels (in any order: the workers' aggregation sorts them)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if got == labels:
            return float(value)
    return 0.0




def test_metrics_move_as_requests_go(pods, tmp_path):
    """The L7 metrics of the real process (exported once a second): the duration histogram
    counts each request once, in the right bucket, under (namespace, ingress, service);
    active requests and upstream connections by state follow a request in flight; an Ingress
    whose TLS Secret is missing shows in /debug/snapshot problems and meshproxy_config_problems.
    With promtool installed, the /metrics text passes `promtool check metrics`."""
    broken = ingress_yaml("broken-tls", [("broken.test", "/", "Prefix", "svc-a")],
                          tls=[(["broken.test"], "no-such-secret")])
    (tmp_path / "m.yaml").write_text(config(pods) + "---\n" + broken)
    port = free_port()
    svc = {"namespace": "default", "ingress": "default/site", "service": "svc-a", "route": "site.test/", "client_id": ""}
    hist = "meshproxy_http_request_duration_seconds"
    with Meshproxy([str(tmp_path)], "--ingress-listen", f"127.0.0.1:{port}", "--no-health-checks") as m:
        # The broken TLS Secret: reported, and the Ingress's route is served anyway.
        problems = m.snapshot()["problems"]
        assert any("default/broken-tls" in p and "no-such-secret" in p for p in problems), problems
        assert _sample(m.metrics(), "meshproxy_config_problems") >= 1
        assert echo(port, "/x", host="broken.test")["backend"] in ("a1", "a2")

        before = m.metrics()
        fast = 5
        for i in range(fast):
            assert get(port, f"/echo?i={i}")[0].status == 200
        assert get(port, "/delay?ms=300")[0].status == 200
        total = fast + 1
        base = _sample(before, hist + "_count", **svc)
        text = wait_for(lambda: (lambda t: t if _sample(t, hist + "_count", **svc) >= base + total else None)(m.metrics()),
                        timeout=5, what="the histogram flushed")

        def delta(name: str, **labels: str) -> float:
            return _sample(text, name, **labels) - _sample(before, name, **labels)

        assert delta(hist + "_count", **svc) == total
        assert delta(hist + "_bucket", **svc, le="+Inf") == total
        assert delta(hist + "_bucket", **svc, le="0.25") == fast       # the 300 ms one is above
        assert delta(hist + "_bucket", **svc, le="1.0") == total
        # The loop's clock counts whole milliseconds and the sums are floats that grow over the
        # run: the 300 ms request's share can come out as 0.29999999999927 after the subtraction.
        assert 0.3 - 1e-6 <= delta(hist + "_sum", **svc) < 0.3 + fast * 0.25
        assert delta("meshproxy_http_requests_total", **svc, code="2xx") == total
        # The histogram's labels are exactly namespace, ingress, service, route, client_id (no code).
        assert not re.search(hist + r"_count\{[^}]*code=", text)

        # A request in flight: active 1, its upstream connection active; afterwards 0 and idle.
        def up(t: str, state: str) -> float:
            return _sample(t, "meshproxy_upstream_connections", namespace="default", service="svc-a", state=state)

        result = {}
        t = threading.Thread(target=lambda: result.update(status=get(port, "/delay?ms=2500")[0].status))
        t.start()
        try:
            during = wait_for(lambda: (lambda x: x if _sample(x, "meshproxy_http_active_requests") == 1 else None)(m.metrics()),
                              timeout=2.4, what="active requests 1")
            assert up(during, "active") == 1
        finally:
            t.join(10)
        assert result == {"status": 200}
        after = wait_for(lambda: (lambda x: x if _sample(x, "meshproxy_http_active_requests") == 0
                                  and up(x, "active") == 0 else None)(m.metrics()),
                         timeout=3, what="active requests back to 0")
        assert up(after, "idle") >= 1   # kept for reuse


def test_metrics_text_passes_promtool(mp):
    assert get(mp.port, "/echo?promtool=1")[0].status == 200
    assert get(mp.port, "/", host="nothing.test")[0].status == 404
    text = wait_for(lambda: (lambda t: t if "meshproxy_http_request_duration_seconds_bucket{" in t else None)(mp.metrics()),
                    timeout=5, what="metrics")
    out = subprocess.run([requires("promtool"), "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_send_timeout_flag_closes_a_client_that_stops_reading(pods, tmp_path):
    """`--send-timeout 1`: a client that reads nothing of a 64 MiB response is reset after about
    a second (not the 60 s route timeout) and counted; other clients are served meanwhile."""
    (tmp_path / "m.yaml").write_text(config(pods))
    port = free_port()
    with Meshproxy([str(tmp_path)], "--ingress-listen", f"127.0.0.1:{port}", "--no-health-checks",
                   "--send-timeout", "1") as m:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        t0 = time.monotonic()
        s.sendall(b"GET /bytes?n=67108864 HTTP/1.1\r\nHost: site.test\r\n\r\n")
        latencies = []
        while time.monotonic() - t0 < 2.5:
            t1 = time.monotonic()
            assert get(port, "/echo")[0].status == 200
            latencies.append(time.monotonic() - t1)
            time.sleep(0.05)
        assert max(latencies) < 0.5, latencies
        # By now (1 s, polled every 0.25 s) the proxy has reset it: read what the kernel holds.
        got = 0
        with pytest.raises(ConnectionResetError):
            while got < 64 * MiB:
                d = s.recv(1 << 20)
                if not d:
                    break
                got += len(d)
        s.close()
        assert got < 64 * MiB
        wait_for(lambda: _sample(m.metrics(), "meshproxy_http_send_timeouts_total") == 1, timeout=3,
                 what="the send timeout counted")
