"""More of ingress-nginx's annotations over real sockets, the ones tests/test_nginx_e2e.py
leaves to the filter tables: canary by header pattern and weight total, limit-rps, the
cors-* family, proxy-connect-timeout and proxy-next-upstream-tries. Same setup: an IngressClass
``nginx`` for meshproxy.dev/ingress, pure-Python pods on 127.0.10.x, clients bound to chosen
127.0.0.0/8 sources. Every test checks both what the client got and what the pods received.

ingress-nginx's behaviour is taken from its e2e tests (test/e2e/annotations/canary.go,
cors.go), its template (the CORS block: ``$cors`` / ``trueoptions``), balancer.lua
(route_to_alternative_balancer) and nginx's limit_req arithmetic."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from backends import Backend, Proxy
from nginx_fixtures import ingress, manifests, service
from test_nginx_e2e import backend_of, call, echoed


def svc_of(name: str, *pods) -> str:
    return service(name, [(p.host, p.port) for p in pods])


@pytest.fixture(scope="module")
def pods():
    out = {name: Backend(addr, name=name) for name, addr in (("echo", "127.0.10.111"), ("canary", "127.0.10.112"))}
    yield out
    for b in out.values():
        b.stop()


def base(pods) -> list[str]:
    return [svc_of("echo", pods["echo"]), svc_of("canary", pods["canary"])]


class CountingPod:
    """A pod that answers every request with ``status`` (and its own name in the body), then
    closes; ``hits`` counts the requests it received."""

    def __init__(self, addr: str, status: int = 502) -> None:
        self.sock = socket.socket()
        self.sock.bind((addr, 0))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()
        self.status = status
        self.hits = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.settimeout(5)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        break
                    buf += d
                if b"\r\n\r\n" not in buf:
                    continue
                with self._lock:
                    self.hits += 1
                body = self.host.encode()
                c.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (self.status, len(body))
                          + body)
            except OSError:
                pass
            finally:
                c.close()

    def stop(self) -> None:
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)


class Blackhole:
    """A pod address that never answers a SYN: a listener that never accepts, with its accept
    queue filled (Linux drops a SYN to a listener whose queue is full instead of refusing it),
    so a connect to it stays pending until the connector gives up - what a blackholed pod
    address does, without touching routes or filters of this machine."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((addr, 0))
        self.sock.listen(0)
        self.host, self.port = self.sock.getsockname()
        self.fillers: list[socket.socket] = []
        for _ in range(16):
            s = socket.socket()
            s.settimeout(0.3)
            try:
                s.connect((self.host, self.port))
            except TimeoutError:
                s.close()
                return             # the queue is full: this SYN was dropped
            self.fillers.append(s)
        raise AssertionError("the listener's accept queue never filled")

    def stop(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


# -- canary: header pattern, weight total ------------------------------------------------------------------

def canary_proxy(pods, ann: dict) -> Proxy:
    """A main Ingress "foo" /info to echo and its canary to the canary pod with ``ann``. (One
    proxy per canary: a canary belongs to the main backend's upstream, one per upstream.)"""
    docs = base(pods) + [ingress("main", "foo", "/info", "echo"),
                         ingress("canary", "foo", "/info", "canary", {"canary": "true", **ann})]
    return Proxy(manifests(*docs))


def who(p: Proxy, **headers) -> str:
    st, _, data = call(p.port, "/info", "foo", headers=headers)
    assert st == 200
    return backend_of(data)


BY = {"canary-by-header": "CanaryByHeader", "canary-by-cookie": "CanaryByCookie"}


def test_canary_by_header_pattern(pods):
    with canary_proxy(pods, {**BY, "canary-by-header-pattern": "^Do[A-Z][a-z]+y$"}) as p:
        before = {name: pods[name].requests for name in ("echo", "canary")}
        assert who(p, CanaryByHeader="DoCanary") == "canary"
        assert who(p, CanaryByHeader="Docanary") == "echo"          # canary.go: no match, mainline
        assert {name: pods[name].requests - before[name] for name in before} == {"echo": 1, "canary": 1}
        assert who(p, CanaryByHeader="DoCananry") == "canary"       # [a-z]+y matches "ananry"
        assert who(p, CanaryByHeader="xDoCanary") == "echo"
        assert who(p) == "echo"
        # with a pattern, "always" is only a value the pattern does not match...
        assert who(p, CanaryByHeader="always") == "echo"
        # ...and a value that does not match goes on to the cookie (balancer.lua's order)
        assert who(p, CanaryByHeader="Docanary", Cookie="CanaryByCookie=always") == "canary"
        assert who(p, CanaryByHeader="DoCanary", Cookie="CanaryByCookie=never") == "canary"
    # the pattern is searched (ngx.re.match is not anchored) and case-sensitive
    with canary_proxy(pods, {**BY, "canary-by-header-pattern": "canary"}) as p:
        assert who(p, CanaryByHeader="my-canary-build") == "canary"
        assert who(p, CanaryByHeader="CANARY") == "echo"
    # canary.go: a header value given wins, the pattern is not used
    with canary_proxy(pods, {**BY, "canary-by-header-value": "DoCanary",
                             "canary-by-header-pattern": "^Do[A-Z][a-z]+y$"}) as p:
        assert who(p, CanaryByHeader="DoCananry") == "echo"
        assert who(p, CanaryByHeader="DoCanary") == "canary"
    # a pattern that does not compile: a request with the header stays on the mainline, even
    # with the cookie (balancer.lua returns on the match error); without the header the cookie
    # still decides
    with canary_proxy(pods, {**BY, "canary-by-header-pattern": "[][**da?$&*"}) as p:
        assert who(p, CanaryByHeader="DoCanary", Cookie="CanaryByCookie=always") == "echo"
        assert who(p, Cookie="CanaryByCookie=always") == "canary"
        assert any("canary-by-header-pattern" in problem for problem in p.snapshot.problems)


@pytest.mark.parametrize("weight,total,expected", [
    ("1000", "1000", {"canary"}),             # canary.go: weight equal to the total
    ("0", "1000", {"echo"}),
    ("1500", "1000", {"canary"}),             # above the total: always
    ("100", "200", {"echo", "canary"}),       # canary.go: split
    ("50", "50", {"echo", "canary"}),         # a total under 100 counts as 100 (balancer.lua)
])
def test_canary_weight_total(pods, weight, total, expected):
    with canary_proxy(pods, {"canary-weight": weight, "canary-weight-total": total}) as p:
        seen = {name: pods[name].requests for name in ("echo", "canary")}
        # 60 requests: a 50 % split shows both sides except with probability 2 * 2**-60
        got = [who(p) for _ in range(60)]
        assert set(got) == expected
        for name in ("echo", "canary"):
            assert pods[name].requests - seen[name] == got.count(name)


# -- limit-rps ------------------------------------------------------------------------------------------------

def burst(port: int, host: str, source: str, n: int) -> tuple[list[int], float, list[bytes]]:
    """``n`` requests one after the other from ``source``: (statuses, seconds taken, bodies)."""
    start = time.monotonic()
    answers = [call(port, "/", host, source=source) for _ in range(n)]
    return [a[0] for a in answers], time.monotonic() - start, [a[2] for a in answers]


def test_limit_rps_burst_per_client_address():
    """nginx's limit_req with nodelay: the first request and then ``burst`` more pass at once
    (burst = rps * limit-burst-multiplier, 5 by default); after that a request passes only as
    the bucket drains at ``rps`` per second. So of a burst taking T seconds, at least
    1 + burst and at most 1 + burst + rps * T requests pass; the others get 503."""
    with Backend("127.0.10.121", name="lim") as pod:
        docs = [svc_of("lim", pod),
                ingress("rps", "rps.com", "/", "lim", {"limit-rps": "2"}),
                ingress("mult", "mult.com", "/", "lim", {"limit-rps": "2", "limit-burst-multiplier": "1"}),
                ingress("exempt", "exempt.com", "/", "lim", {"limit-rps": "1", "limit-allowlist": "127.0.0.43"})]
        with Proxy(manifests(*docs)) as p:
            # mult.com after rps.com from the same address: limits are per Ingress
            for host, rps, burst_size in (("rps.com", 2, 10), ("mult.com", 2, 2)):
                before = pod.requests
                statuses, took, bodies = burst(p.port, host, "127.0.0.41", 40)
                passed = statuses.count(200)
                assert set(statuses) == {200, 503}, (host, statuses, took)
                assert statuses[:1 + burst_size] == [200] * (1 + burst_size), host
                assert passed <= 1 + burst_size + rps * took, (host, passed, took)
                assert all(b"503 Service Temporarily Unavailable" in b for s, b in zip(statuses, bodies) if s == 503)
                assert pod.requests - before == passed        # a refused request never reaches the pod
                # per client address: another source has its own bucket
                assert call(p.port, "/", host, source="127.0.0.42")[0] == 200
            # an address in limit-allowlist is never limited; the others are
            statuses, _, _ = burst(p.port, "exempt.com", "127.0.0.43", 20)
            assert statuses == [200] * 20
            statuses, took, _ = burst(p.port, "exempt.com", "127.0.0.44", 20)
            assert statuses[:6] == [200] * 6 and statuses.count(200) <= 6 + took


# -- CORS -----------------------------------------------------------------------------------------------------

def test_cors_family_on_requests_and_preflight(pods):
    origin = "https://origin.cors.com:8080"
    docs = base(pods) + [
        ingress("cors", "cors.foo.com", "/", "echo", {
            "enable-cors": "true", "cors-allow-origin": origin, "cors-allow-methods": "POST, GET",
            "cors-allow-headers": "DNT, User-Agent",
            "cors-expose-headers": "X-CustomResponseHeader, X-CustomSecondHeader",
            "cors-allow-credentials": "false", "cors-max-age": "200"}),
        ingress("dflt", "cors.bar.com", "/", "echo", {"enable-cors": "true"}),
    ]
    want = {"access-control-allow-origin": origin, "access-control-allow-methods": "POST, GET",
            "access-control-allow-headers": "DNT, User-Agent",
            "access-control-expose-headers": "X-CustomResponseHeader, X-CustomSecondHeader",
            "access-control-max-age": "200"}
    echo = pods["echo"]
    with Proxy(manifests(*docs)) as p:
        # an ordinary request of an allowed Origin: to the pod, the fields on the answer
        seen = echo.requests
        st, h, data = call(p.port, "/x", "cors.foo.com", headers={"Origin": origin})
        assert st == 200 and echoed(data)["target"] == "/x" and echo.requests == seen + 1
        assert {k: h.get(k) for k in want} == want
        assert "access-control-allow-credentials" not in h          # cors-allow-credentials: false
        # the preflight: answered here, 204, nothing reaches the pod
        st, h, body = call(p.port, "/x", "cors.foo.com", method="OPTIONS",
                           headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": "DNT"})
        assert st == 204 and body == b"" and echo.requests == seen + 1
        assert {k: h.get(k) for k in want} == want and "access-control-allow-credentials" not in h
        # an OPTIONS of an Origin that is not allowed is not a preflight the proxy answers:
        # it goes to the pod, with no CORS field on the answer
        st, h, data = call(p.port, "/x", "cors.foo.com", method="OPTIONS", headers={"Origin": "https://evil.com"})
        assert st == 200 and echoed(data)["method"] == "OPTIONS" and echo.requests == seen + 2
        assert not [k for k in h if k.startswith("access-control-")]

        # the defaults: any origin ("*", even without an Origin field), credentials true,
        # ingress-nginx's methods and headers, 20 days, no expose field
        dflt = {"access-control-allow-origin": "*", "access-control-allow-credentials": "true",
                "access-control-allow-methods": "GET, PUT, POST, DELETE, PATCH, OPTIONS",
                "access-control-allow-headers": "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,"
                                                "Cache-Control,Content-Type,Range,Authorization",
                "access-control-max-age": "1728000"}
        st, h, _ = call(p.port, "/", "cors.bar.com")
        assert st == 200 and {k: h.get(k) for k in dflt} == dflt and "access-control-expose-headers" not in h
        assert echo.requests == seen + 3
        st, h, body = call(p.port, "/", "cors.bar.com", method="OPTIONS", headers={"Origin": "http://any.where"})
        assert st == 204 and body == b"" and {k: h.get(k) for k in dflt} == dflt
        assert echo.requests == seen + 3


# -- proxy-connect-timeout ---------------------------------------------------------------------------------

def test_proxy_connect_timeout_moves_on_from_a_pod_that_never_answers():
    """The proxy's own connect timeout is an hour here: only the annotation (1 s) lets the
    client - which waits at most 20 s - get an answer at all."""
    hole = Blackhole("127.0.10.131")
    good = Backend("127.0.10.132", name="good")
    try:
        docs = [svc_of("mixed", hole, good), svc_of("hole", hole),
                ingress("mixed", "mixed.com", "/", "mixed", {"proxy-connect-timeout": "1"}),
                ingress("hole", "hole.com", "/", "hole", {"proxy-connect-timeout": "1"})]
        with Proxy(manifests(*docs), connect_timeout=3600.0) as p:
            for _ in range(4):
                st, _, data = call(p.port, "/", "mixed.com", timeout=20)
                assert st == 200 and backend_of(data) == "good"
            assert good.requests == 4
            st, _, _ = call(p.port, "/", "hole.com", timeout=20)
            assert st >= 500           # the exact status: test_unreachable_pod_status below
    finally:
        hole.stop()
        good.stop()


def closed_port(addr: str) -> int:
    s = socket.socket()
    s.bind((addr, 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("kind,status", [("timeout", 504), ("refused", 502)])
def test_unreachable_pod_status(kind, status):
    pod = (Blackhole("127.0.10.133") if kind == "timeout"
           else SimpleNamespace(host="127.0.10.134", port=closed_port("127.0.10.134"), stop=lambda: None))
    try:
        docs = [svc_of("gone", pod), ingress("gone", "gone.com", "/", "gone", {"proxy-connect-timeout": "1"})]
        with Proxy(manifests(*docs), connect_timeout=3600.0) as p:
            assert call(p.port, "/", "gone.com", timeout=20)[0] == status
    finally:
        pod.stop()


# -- proxy-next-upstream-tries ------------------------------------------------------------------------------

RETRY_502 = {"proxy-next-upstream": "error timeout http_502"}


@pytest.mark.parametrize("tries,attempts", [("1", 1), ("2", 2), ("3", 3), (None, 3), ("0", 4)])
def test_proxy_next_upstream_tries_bounds_the_attempts(tries, attempts):
    """Four pods that all answer 502: one request makes exactly ``tries`` attempts (default
    3; 0: no limit but each pod once), each to another pod, and the client gets the last 502."""
    bad = [CountingPod(f"127.0.10.{141 + i}") for i in range(4)]
    try:
        ann = dict(RETRY_502, **({"proxy-next-upstream-tries": tries} if tries is not None else {}))
        docs = [svc_of("bad", *bad), ingress("tries", "tries.com", "/", "bad", ann)]
        with Proxy(manifests(*docs)) as p:
            st, _, body = call(p.port, "/", "tries.com")
            assert st == 502
            hits = [b.hits for b in bad]
            assert sum(hits) == attempts and max(hits) == 1, hits
            assert body.decode() in {b.host for b, n in zip(bad, hits) if n}
    finally:
        for b in bad:
            b.stop()


def test_proxy_next_upstream_tries_reaches_the_good_pod():
    bad = CountingPod("127.0.10.151")
    good = Backend("127.0.10.152", name="good")
    try:
        docs = [svc_of("mixed", bad, good),
                ingress("two", "two.com", "/", "mixed", dict(RETRY_502, **{"proxy-next-upstream-tries": "2"}))]
        with Proxy(manifests(*docs)) as p:
            got = [call(p.port, "/", "two.com") for _ in range(12)]
            assert [g[0] for g in got] == [200] * 12
            assert {backend_of(g[2]) for g in got} == {"good"}
            assert good.requests == 12 and bad.hits <= 12
    finally:
        bad.stop()
        good.stop()
