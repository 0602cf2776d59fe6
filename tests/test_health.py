"""Readiness probes (discovery.health): the pure parts table-driven, then the kubelet semantics
against real listeners on 127.0.0.1 (port 0), then the flat-cost property of the scheduler.

Periods are fractions of a second here (the checker takes floats; the manifest parser gives
whole seconds) and the start-up jitter is injected. Where a test counts attempts, or times an
initial delay or a timeout, the checker runs on the ``clock`` fixture (``checker(loop=...)``):
its wake-ups and probe timeouts fire only when the test advances the clock, and ``settle``
waits (in real time, bounded) until every probe due has run. So the counts are exact and
nothing depends on how fast the machine is; the other tests only wait for an outcome."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import ssl
import time

import pytest
import uvloop

from discovery import objects as o
from discovery.health import (
    _SLACK,
    _SLACK_SHARE,
    HealthChecker,
    ProbeError,
    ResponseReader,
    Thresholds,
    build_request,
)
from discovery.signals import Signals

# -- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("success,failure,results,expect", [
    # (thresholds, results fed in order, readiness after each)
    (1, 3, "S", [True]),
    (2, 3, "SS", [False, True]),
    (2, 3, "SFSS", [False, False, False, True]),          # the run restarts after a failure
    (1, 3, "SFFF", [True, True, True, False]),
    (1, 3, "SFFSFFF", [True, True, True, True, True, True, False]),
    (1, 1, "SFS", [True, False, True]),
    (3, 1, "FFSSS", [False, False, False, False, True]),  # starts not ready; failures change nothing
])
def test_thresholds(success, failure, results, expect):
    t = Thresholds(success, failure)
    got = []
    for r in results:
        t.record(r == "S")
        got.append(t.ready)
    assert got == expect


def test_thresholds_report_flips_only():
    t = Thresholds(1, 2)
    assert [t.record(ok) for ok in (False, True, True, False, False, False, True)] == \
        [False, True, False, False, True, False, True]


def test_request_defaults_like_the_kubelet():
    req = build_request("/healthz", "10.0.0.5:8080").decode()
    assert req == ("GET /healthz HTTP/1.1\r\nHost: 10.0.0.5:8080\r\nUser-Agent: kube-probe/meshproxy\r\n"
                   "Accept: */*\r\nConnection: close\r\n\r\n")


def test_request_headers_override_host_user_agent_and_accept():
    req = build_request("/", "10.0.0.5:80", (("host", "app.example"), ("User-Agent", "me"),
                                             ("Accept", "text/plain"), ("X-A", "1"), ("X-A", "2"))).decode()
    assert "Host: app.example\r\n" in req and "10.0.0.5" not in req
    assert "User-Agent: me\r\n" in req and "kube-probe" not in req
    assert "Accept: text/plain\r\n" in req and "*/*" not in req
    assert "X-A: 1\r\nX-A: 2\r\n" in req


@pytest.mark.parametrize("path,target", [
    ("/healthz", "/healthz"),
    ("healthz", "/healthz"),
    ("/a b", "/a%20b"),
    ("/q?x=1&y=a b", "/q?x=1&y=a%20b"),
    ("/already%20escaped", "/already%20escaped"),
    ("/frag#part", "/frag"),
    ("/ünï", "/%C3%BCn%C3%AF"),
])
def test_request_target_is_escaped(path, target):
    assert build_request(path, "h:1").split(b" ")[1].decode() == target


@pytest.mark.parametrize("name,value", [("Bad Name", "v"), ("", "v"), ("X", "a\r\nInjected: 1"), ("X", "a\nb")])
def test_request_refuses_headers_that_would_break_the_head(name, value):
    with pytest.raises(ProbeError):
        build_request("/", "h:1", ((name, value),))


READER_CASES = [
    # (response bytes, eof after them, done, ok)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False, True, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", False, False, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", True, True, False),       # truncated body
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, True, True),
    (b"HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n", False, True, True),
    (b"HTTP/1.1 399 Odd\r\nContent-Length: 0\r\n\r\n", False, True, True),
    (b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n", False, True, False),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False, True, False),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\nbad", False, True, False),
    (b"HTTP/1.1 199 Odd\r\n\r\n", True, True, False),                            # interim, then nothing
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, True, True),
    (b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n", False, True, False),
    (b"HTTP/1.0 200 OK\r\n\r\nbody until close", False, False, False),
    (b"HTTP/1.0 200 OK\r\n\r\nbody until close", True, True, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;x=y\r\nabc\r\n0\r\n\r\n", False, True, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nTrailer: 1\r\n\r\n", False, True, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", True, True, False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, True, False),
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", False, True, True),               # bare LF, as Go accepts
    (b"HTTP/1.1 2000 OK\r\n\r\n", False, True, False),
    (b"SSH-2.0-OpenSSH\r\n\r\n", False, True, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", False, True, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False, True, False),
    (b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n", False, True, False),
    (b"", True, True, False),                                                     # closed at once
    (b"HTTP/1.1 200 OK\r\n", True, True, False),                                  # head cut short
]


@pytest.mark.parametrize("data,eof,done,ok", READER_CASES)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_response_reader(data, eof, done, ok, split):
    r = ResponseReader()
    finished = False
    pieces = [data] if split == "whole" else [data[i:i + 1] for i in range(len(data))]
    for p in pieces:
        finished = r.feed(p) or finished
    if eof and not finished:
        finished = r.feed_eof()
    assert finished == done
    if done:
        assert r.ok == ok


def test_response_reader_stops_after_10_kib_of_body():
    r = ResponseReader()
    assert not r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10000)
    assert r.feed(b"x" * 300)
    assert r.ok
    r = ResponseReader()
    assert r.feed(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 20000)    # close-delimited: no need for EOF
    assert r.ok


def test_response_reader_refuses_an_endless_head():
    r = ResponseReader()
    done = r.feed(b"HTTP/1.1 200 OK\r\n")
    while not done:
        done = r.feed(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    assert not r.ok

# -- helpers for the socket tests ------------------------------------------------------------------


# Servers and checkers a test opened; closing() closes them even when the test fails. Without
# that, uvloop hangs in loop.close() on an unclosed server while warnings are errors (the
# ResourceWarning it raises there is turned into an exception mid-close): a failing test
# would hang instead of failing.
_OPEN: list = []


async def closing(coro):
    try:
        return await coro
    finally:
        while _OPEN:
            obj = _OPEN.pop()
            try:
                await (obj.stop() if isinstance(obj, HealthChecker) else obj.close())
            except Exception:
                pass


class Counter(Signals):
    """Counts probe results so tests see exactly their own probes."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def probe(self, result):
        self.values[result] = self.values.get(result, 0) + 1


class NoJitter:
    @staticmethod
    def random() -> float:
        return 0.0


class HttpBackend(asyncio.Protocol):
    """A pod's HTTP server: answers with ``status`` (changeable at any time) after ``delay``
    seconds, or never when ``answer`` is False; records request heads and connection counts.
    It closes after each response (the probe asks for Connection: close)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.delay = 0.0
        self.answer = True
        self.heads: list[bytes] = []
        self.arrivals: list[float] = []       # clock() at each request (set clock to a FakeClock)
        self.clock = time.monotonic
        self.served: dict[int, int] = {}
        self.open = self.peak = self.total = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "HttpBackend":
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _HttpConn(self), host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        _OPEN.append(self)
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class _HttpConn(asyncio.Protocol):
    def __init__(self, backend: HttpBackend) -> None:
        self.b = backend
        self.buf = b""
        self.transport = None
        self.counted = False
        self.timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        b = self.b
        b.open += 1
        b.total += 1
        b.peak = max(b.peak, b.open)
        self.counted = True

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.b.open -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf or self.timer is not None:
            return
        self.b.heads.append(self.buf.split(b"\r\n\r\n", 1)[0])
        self.b.arrivals.append(self.b.clock())
        if not self.b.answer:
            return
        if self.b.delay:
            self.timer = asyncio.get_running_loop().call_later(self.b.delay, self._respond)
        else:
            self._respond()

    def _respond(self) -> None:
        status = self.b.status
        self.b.served[status] = self.b.served.get(status, 0) + 1
        body = b"status %d\n" % status
        extra = b"Location: /elsewhere\r\n" if 300 <= status < 400 else b""
        self.transport.write(b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (status, extra, len(body), body))
        # Uncount before closing: the prober frees its slot only after reading this response,
        # so "open here" never runs ahead of "in flight there".
        self._uncount()
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self._uncount()


class TcpBackend(asyncio.Protocol):
    """A bare TCP listener that can be closed and reopened on the same port."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def __call__(self):
        self.accepted += 1
        return asyncio.Protocol()

    async def start(self, port: int = 0) -> "TcpBackend":
        self.server = await asyncio.get_running_loop().create_server(self, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        _OPEN.append(self)
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def pod(name: str, probe: o.Probe, ip: str = "127.0.0.1", ports=(), uid: str = "", labels=None) -> o.Pod:
    meta = o.Meta(name=name, namespace="default", uid=uid or f"uid-{name}", labels=labels or o.EMPTY_MAP)
    return o.Pod(meta=meta, ports=tuple(ports), readiness_probe=probe, pod_ip=ip)


def http_probe(port, **kw) -> o.Probe:
    kw.setdefault("period", 0.05)
    kw.setdefault("timeout", 1.0)
    return o.Probe(action="http", port=port, **kw)


class Recorder:
    """on_change target: the sequence of (name, readiness) flips, with a hook per flip."""

    def __init__(self, results: dict, hook=None) -> None:
        self.results = results
        self.flips: list[tuple[str, bool]] = []
        self.hook = hook

    def __call__(self, ns: str, name: str) -> None:
        self.flips.append((name, self.results[(ns, name)]))
        if self.hook:
            self.hook(name, self.results[(ns, name)])


def checker(jitter=NoJitter, **kw):
    results: dict = {}
    rec = Recorder(results)
    counter = Counter()
    hc = HealthChecker(results, rec, jitter=jitter, signals=counter, **kw)
    _OPEN.append(hc)
    return hc, results, rec, counter


async def until(cond, timeout: float = 10.0, step: float = 0.005) -> None:
    """Wait for ``cond()``; ``timeout`` only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


def clocked(clock):
    """The running loop with ``clock``'s time and timers, for ``checker(loop=...)``."""
    return clock.on(asyncio.get_running_loop())


def _idle(hc: HealthChecker, clock) -> bool:
    if hc.inflight:
        return False
    heap = hc._heap
    return not heap or heap[0][0] > clock() + min(_SLACK, heap[0][2].probe.period * _SLACK_SHARE)


async def settle(hc: HealthChecker, clock) -> None:
    """Wait until the checker, on ``clock``, has launched every probe due by now and every probe
    in flight has ended (a probe that waits for its timeout never ends: advance the clock)."""
    await until(lambda: _idle(hc, clock))


async def tick(hc: HealthChecker, clock, seconds: float) -> None:
    clock.advance(seconds)
    await settle(hc, clock)


def pods_map(*ps: o.Pod) -> dict:
    return {(p.namespace, p.name): p for p in ps}

# -- probe semantics against real sockets ----------------------------------------------------------


def test_http_thresholds_follow_status_flips(run, clock):
    """successThreshold 2 needs two passes; failureThreshold 3 needs three failures; counted
    against what the server actually answered at the moment of each flip, one period at a time."""
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, counter = checker(loop=clocked(clock))
        at_flip: list[dict] = []
        rec.hook = lambda name, ready: at_flip.append(dict(srv.served))
        hc.start()
        hc.sync(pods_map(pod("web", http_probe(srv.port, success_threshold=2, failure_threshold=3))))
        await settle(hc, clock)                       # the first probe: at once
        assert srv.served == {200: 1} and rec.flips == []
        await tick(hc, clock, 0.05)
        assert rec.flips == [("web", True)] and at_flip[0] == {200: 2}
        srv.status = 500
        for _ in range(2):
            await tick(hc, clock, 0.05)
            assert len(rec.flips) == 1
        await tick(hc, clock, 0.05)
        assert rec.flips[1] == ("web", False) and at_flip[1] == {200: 2, 500: 3}
        srv.status = 200
        await tick(hc, clock, 0.05)
        assert len(rec.flips) == 2
        await tick(hc, clock, 0.05)
        assert rec.flips[2] == ("web", True) and at_flip[2] == {200: 4, 500: 3}
        assert results == {("default", "web"): True}
        assert counter.values == {"success": 4, "failure": 3}
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_not_ready_until_the_first_success(run, clock):
    async def main():
        srv = await HttpBackend(503).start()
        hc, results, rec, counter = checker(loop=clocked(clock))
        hc.start()
        hc.sync(pods_map(pod("web", http_probe(srv.port))))
        await settle(hc, clock)
        for _ in range(4):
            await tick(hc, clock, 0.05)
        assert counter.values == {"failure": 5}
        # The first verdict (failureThreshold failures in a row) is published once, so that it
        # replaces the Ready condition that stands in until a result exists; later failures
        # change nothing.
        assert results == {("default", "web"): False}
        assert len(rec.flips) == 1
        assert hc.readiness("default", "web") is False
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_initial_delay_is_respected(run, clock):
    async def main():
        srv = await HttpBackend(200).start()
        srv.clock = clock
        hc, results, rec, _ = checker(loop=clocked(clock))
        hc.start()
        t0 = clock()
        hc.sync(pods_map(pod("web", http_probe(srv.port, initial_delay=0.4))))
        await settle(hc, clock)
        await tick(hc, clock, 0.399)
        assert srv.total == 0 and hc.probes_run == 0 and results == {}
        await tick(hc, clock, 0.001)
        assert rec.flips == [("web", True)]
        assert srv.arrivals == [pytest.approx(t0 + 0.4)]
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_timeout_is_enforced_against_a_backend_that_never_answers(run, clock):
    async def main():
        srv = await HttpBackend(200).start()
        srv.answer = False
        srv.clock = clock
        hc, results, rec, counter = checker(loop=clocked(clock))
        hc.start()
        t0 = clock()
        hc.sync(pods_map(pod("web", http_probe(srv.port, timeout=0.12, period=0.05))))
        await until(lambda: len(srv.heads) == 1)
        clock.advance(0.119)
        await asyncio.sleep(0.02)
        assert counter.values == {} and hc.inflight == 1      # not cut before 0.12 s ...
        clock.advance(0.001)
        assert counter.values == {"timeout": 1}                # ... and cut at it
        # The next attempt keeps to the grid (every 0.05 s from the first): the first tick
        # after the timeout, 0.15.
        await settle(hc, clock)
        assert len(srv.heads) == 1
        clock.advance(0.03)
        await until(lambda: len(srv.heads) == 2)
        assert srv.arrivals == [pytest.approx(t0), pytest.approx(t0 + 0.15)]
        clock.advance(0.12)
        assert counter.values == {"timeout": 2} and results == {}
        st = hc.state()["pods"][0]
        assert st["lastResult"] == "timeout" and st["lastError"] == "no answer within 0.12s"
        # Timed-out connections are closed by the prober, not left open.
        await until(lambda: srv.open <= 1)
        await hc.stop()
        await until(lambda: srv.open == 0)
        await srv.close()
    run(closing(main()))


def test_timeout_turns_a_ready_pod_not_ready(run, clock):
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, counter = checker(loop=clocked(clock))
        hc.start()
        hc.sync(pods_map(pod("web", http_probe(srv.port, timeout=0.1, failure_threshold=2))))
        await settle(hc, clock)
        assert rec.flips == [("web", True)]
        srv.answer = False
        for n in (1, 2):                  # the next two attempts: sent, then timed out
            clock.advance(0.05)
            await until(lambda n=n: len(srv.heads) == 1 + n)
            clock.advance(0.1)
        assert rec.flips[1] == ("web", False) and counter.values == {"success": 1, "timeout": 2}
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_named_port_is_resolved_from_the_container_ports(run):
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, _ = checker()
        hc.start()
        ports = (o.ContainerPort("metrics", 1), o.ContainerPort("http", srv.port))
        hc.sync(pods_map(pod("web", http_probe("http"), ports=ports)))
        await until(lambda: rec.flips == [("web", True)])
        assert srv.total >= 1
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_unknown_named_port_fails_without_connecting(run):
    async def main():
        hc, results, rec, counter = checker()
        hc.start()
        hc.sync(pods_map(pod("web", http_probe("nope"), ports=(o.ContainerPort("http", 1),))))
        await until(lambda: counter.values.get("failure", 0) >= 2)
        st = hc.state()["pods"][0]
        assert "named port 'nope'" in st["lastError"] and st["ready"] is False
        await hc.stop()
    run(closing(main()))


def test_host_path_and_headers_are_sent(run):
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, _ = checker()
        hc.start()
        probe = http_probe(srv.port, path="/healthz?deep=1", headers=(("X-Probe", "yes"),))
        hc.sync(pods_map(pod("web", probe)))
        await until(lambda: rec.flips)
        lines = srv.heads[0].decode().split("\r\n")
        assert lines[0] == "GET /healthz?deep=1 HTTP/1.1"
        assert f"Host: 127.0.0.1:{srv.port}" in lines
        assert "X-Probe: yes" in lines and "Connection: close" in lines
        assert any(line.startswith("User-Agent: kube-probe/") for line in lines)
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_host_field_is_where_to_connect_and_a_host_header_overrides(run):
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, _ = checker()
        hc.start()
        # The pod IP has no listener; httpGet.host points at the real one (by name: the
        # resolving path). A Host entry in httpHeaders sets the Host header.
        probe = http_probe(srv.port, host="localhost", headers=(("Host", "app.example"),))
        hc.sync(pods_map(pod("web", probe, ip="127.0.0.254")))
        await until(lambda: rec.flips)
        assert rec.flips == [("web", True)]
        lines = srv.heads[0].decode().split("\r\n")
        assert "Host: app.example" in lines
        await hc.stop()
        await srv.close()
    run(closing(main()))


@pytest.mark.parametrize("status,ready", [(200, True), (302, True), (399, True), (400, False), (404, False), (503, False)])
def test_status_classes(status, ready, run):
    async def main():
        srv = await HttpBackend(status).start()
        hc, results, rec, counter = checker()
        hc.start()
        hc.sync(pods_map(pod("web", http_probe(srv.port))))
        await until(lambda: sum(counter.values.values()) >= 2)
        assert hc.readiness("default", "web") is ready
        # Redirects are not followed: every request went to the probe path.
        assert all(h.split(b"\r\n")[0] == b"GET / HTTP/1.1" for h in srv.heads)
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_https_probe_does_not_verify_the_certificate(run):
    trustme = pytest.importorskip("trustme")

    async def main():
        ca = trustme.CA()
        cert = ca.issue_cert("some-other-name.example")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        srv = HttpBackend(200)
        loop = asyncio.get_running_loop()
        srv.server = await loop.create_server(lambda: _HttpConn(srv), "127.0.0.1", 0, ssl=ctx)
        srv.port = srv.server.sockets[0].getsockname()[1]
        _OPEN.append(srv)
        hc, results, rec, _ = checker()
        hc.start()
        hc.sync(pods_map(pod("web", http_probe(srv.port, scheme="HTTPS"))))
        await until(lambda: rec.flips)
        assert rec.flips == [("web", True)] and srv.total >= 1
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_tcp_probe_follows_the_listener_closing_and_reopening(run, clock):
    async def main():
        srv = await TcpBackend().start()
        port = srv.port
        hc, results, rec, counter = checker(loop=clocked(clock))
        hc.start()
        hc.sync(pods_map(pod("db", o.Probe(action="tcp", port=port, period=0.05, timeout=0.5, failure_threshold=3))))
        await settle(hc, clock)
        assert rec.flips == [("db", True)]
        await srv.close()
        for n in (1, 2, 3):
            await tick(hc, clock, 0.05)
            assert counter.values.get("failure", 0) == n and len(rec.flips) == (2 if n == 3 else 1)
        assert rec.flips[1] == ("db", False)
        srv2 = await TcpBackend().start(port)
        await tick(hc, clock, 0.05)
        assert rec.flips[2] == ("db", True) and srv2.accepted == 1
        await hc.stop()
        await srv2.close()
    run(closing(main()))


def test_probe_stops_when_the_pod_goes_away(run, clock):
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, _ = checker(loop=clocked(clock))
        hc.start()
        hc.sync(pods_map(pod("web", http_probe(srv.port))))
        await settle(hc, clock)
        await tick(hc, clock, 0.05)
        assert rec.flips == [("web", True)] and srv.total == 2
        hc.sync({})
        assert results == {}
        for _ in range(6):                # six periods
            await tick(hc, clock, 0.05)
        assert srv.total == 2 and hc.probes_run == 2
        assert hc.state()["probed"] == 0
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_pods_without_probe_ip_or_past_running_are_not_probed(run):
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, _ = checker()
        hc.start()
        probe = http_probe(srv.port)
        no_probe = pod("a", None)  # type: ignore[arg-type]
        no_ip = o.Pod(meta=o.Meta(name="b"), readiness_probe=probe, pod_ip=None)
        done = o.Pod(meta=o.Meta(name="c"), readiness_probe=probe, pod_ip="127.0.0.1", phase="Succeeded")
        hc.sync(pods_map(no_probe, no_ip, done))
        await asyncio.sleep(0.2)
        assert srv.total == 0 and hc.state()["probed"] == 0
        # Losing the probe or the IP removes the state of a probed pod.
        p = pod("web", probe)
        hc.sync(pods_map(p))
        await until(lambda: rec.flips)
        hc.sync(pods_map(o.Pod(meta=p.meta, readiness_probe=probe, pod_ip=None)))
        assert hc.state()["probed"] == 0 and results == {}
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_probe_change_restarts_the_state_other_changes_keep_it(run):
    async def main():
        srv = await HttpBackend(200).start()
        hc, results, rec, _ = checker()
        hc.start()
        p = pod("web", http_probe(srv.port, path="/a"))
        hc.sync(pods_map(p))
        await until(lambda: rec.flips == [("web", True)])
        # Labels / conditions / deletionTimestamp change: a new object, same incarnation.
        relabelled = pod("web", http_probe(srv.port, path="/a"), labels={"v": "2"})
        hc.sync(pods_map(relabelled))
        await asyncio.sleep(0.15)
        assert rec.flips == [("web", True)]
        # A different probe is a different pod to Kubernetes: back to not ready, then probed anew.
        hc.sync(pods_map(pod("web", http_probe(srv.port, path="/b"))))
        assert rec.flips[-1] == ("web", False)
        await until(lambda: len(rec.flips) == 3)
        assert rec.flips[2] == ("web", True)
        assert srv.heads[-1].startswith(b"GET /b ")
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_on_change_errors_do_not_stop_probing(run):
    async def main():
        srv = await HttpBackend(200).start()
        results: dict = {}
        calls = []

        def broken(ns, name):
            calls.append(name)
            raise RuntimeError("controller bug")

        hc = HealthChecker(results, broken, jitter=NoJitter, signals=Counter())
        _OPEN.append(hc)
        hc.start()
        hc.sync(pods_map(pod("a", http_probe(srv.port)), pod("b", http_probe(srv.port))))
        await until(lambda: len(calls) == 2)
        assert results == {("default", "a"): True, ("default", "b"): True}
        await hc.stop()
        await srv.close()
    run(closing(main()))


def test_works_on_the_default_asyncio_loop_too(run):
    async def main():
        srv = await HttpBackend(200).start()
        tcp = await TcpBackend().start()
        hc, results, rec, _ = checker()
        hc.start()
        hc.sync(pods_map(pod("web", http_probe(srv.port)),
                         pod("db", o.Probe(action="tcp", port=tcp.port, period=0.05))))
        await until(lambda: len(rec.flips) == 2)
        await hc.stop()
        await srv.close()
        await tcp.close()
    run(closing(main()), loop_factory=asyncio.new_event_loop)

# -- scheduling cost -------------------------------------------------------------------------------


def _serve_in_child(conn, delay: float) -> None:
    """Child process: an HttpBackend on its own loop (and CPU); reports its counts on request."""
    async def main():
        srv = await HttpBackend(200).start()
        srv.delay = delay
        conn.send(srv.port)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: stop.done() or stop.set_result(None))
        await stop
        loop.remove_reader(conn.fileno())
        conn.recv()
        await srv.close()
        conn.send((srv.peak, srv.total))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_cost_stays_flat_2000_pods_one_scheduler_bounded_concurrency(run, clock):
    """2,000 pods, period 1 s, for 2.5 s of the checker's clock: 2 or 3 probes per pod (the
    first at a random point of the first second, then every second), never more than
    max_concurrency connections open at the listener, and no task per pod — only the one
    scheduler. The clock moves 50 ms at a time once the probes due so far have run, so the
    count is exact however slow the machine is (what a probe costs is bench/probe_cost.py's
    business). The listener runs in a child process, with a 5 ms delay per answer so that
    probes overlap."""
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_serve_in_child, args=(there, 0.005), daemon=True)
    child.start()
    try:
        assert here.poll(10), "test server did not start"
        port = here.recv()

        async def main():
            hc, results, rec, counter = checker(jitter=random.Random(7), max_concurrency=24, loop=clocked(clock))
            baseline = len(asyncio.all_tasks())
            pods = {}
            for i in range(2000):
                p = pod(f"p{i}", http_probe(port, period=1.0, timeout=1.0))
                pods[(p.namespace, p.name)] = p
            t0 = clock()
            hc.sync(pods)
            # Pods known at start-up: the first round is spread over one period, not fired at once.
            quarters = quarters_of_first_due(hc, t0, 1.0)
            first_due = [e[0] for e in hc._heap]
            hc.start()
            max_tasks = 0
            for _ in range(51):
                while not _idle(hc, clock):
                    max_tasks = max(max_tasks, len(asyncio.all_tasks()))
                    await asyncio.sleep(0.002)
                if clock() - t0 >= 2.5 - 1e-9:
                    break
                clock.advance(0.05)
            end = clock()
            run_count = hc.probes_run
            await hc.stop()
            slack = min(_SLACK, 1.0 * _SLACK_SHARE)
            expected = sum(1 for d in first_due for k in range(4) if d + k <= end + slack)
            return baseline, max_tasks, run_count, expected, quarters, hc, rec

        baseline, max_tasks, run_count, expected, quarters, hc, rec = run(closing(main()), timeout=120)
        here.send("stats")
        assert here.poll(10), "test server did not report"
        peak, total = here.recv()
    finally:
        child.join(5)
        if child.is_alive():
            child.terminate()        # our own child, by its handle
            child.join(5)
    assert 4500 < expected < 5500 and run_count == expected, (run_count, expected)
    assert total == run_count, (total, run_count)             # what the server saw
    assert peak <= 24 and hc.peak_inflight <= 24, (peak, hc.peak_inflight)
    # One scheduler; probes to IP addresses run as callbacks, not tasks.
    assert max_tasks <= baseline + 1, (baseline, max_tasks)
    assert len(rec.flips) == 2000, len(rec.flips)
    assert all(400 <= n <= 600 for n in quarters), quarters     # binomial(2000, 1/4): +-5 sd


def quarters_of_first_due(hc, since: float, period: float) -> list[int]:
    q = [0, 0, 0, 0]
    for due, *_ in hc._heap:
        q[min(3, int((due - since) / period * 4))] += 1
    return q


def test_first_round_is_spread_over_one_period_at_start_up_and_for_big_batches(run, clock):
    async def main():
        probe = http_probe(8080, period=10.0, initial_delay=5.0)
        # Pods known at start-up: first probe at initialDelay + a uniform part of the period.
        hc, *_ = checker(jitter=random.Random(1), clock=clock, max_concurrency=16)
        hc.sync(pods_map(*(pod(f"p{i}", probe) for i in range(2000))))
        assert all(430 <= n <= 570 for n in quarters_of_first_due(hc, 1005.0, 10.0))
        assert min(e[0] for e in hc._heap) >= 1005.0
        # Later, one pod at a time (a rolling update): probed as soon as initialDelay is over.
        hc2, *_ = checker(jitter=random.Random(1), clock=clock, max_concurrency=16)
        hc2.start()
        clock.now += 60
        hc2.sync(pods_map(*(pod(f"p{i}", probe) for i in range(16))))
        assert {e[0] for e in hc2._heap} == {clock.now + 5.0}
        # ... but a batch larger than max_concurrency is spread like a start-up.
        hc2.sync(pods_map(*(pod(f"q{i}", probe) for i in range(400))))
        q_due = [e[0] for e in hc2._heap if e[2].key[1].startswith("q")]
        assert len(set(q_due)) == 400 and max(q_due) - min(q_due) > 9.0
        await hc2.stop()
    run(closing(main()))


def test_sync_of_unchanged_pods_does_no_work():
    hc, results, rec, _ = checker()
    probe = http_probe(8080)
    pods = pods_map(*(pod(f"p{i}", probe) for i in range(5000)))
    hc.sync(pods)
    heap = list(hc._heap)
    hc.sync(pods)
    hc.sync(dict(pods))
    assert hc._heap == heap              # nothing rescheduled, nothing restarted
