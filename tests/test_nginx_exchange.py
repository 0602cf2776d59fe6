"""The exchange's filter hooks that ingress-nginx's annotations use, on the fake loop
(tests/fakes.py): a body limit met while the body streams, an intercepted status re-sent to the
error backend, a concurrency count released however the exchange ends, answers that carry the
response fields of the filters before them, a chosen action, a consistent-hash key, replaced
request fields, a filter that holds the request while a thread checks a password."""

from __future__ import annotations

import asyncio
import base64
from types import SimpleNamespace

import pytest

import l7.exchange as exchange_mod
from l7.upstream import UpstreamPool
from meshproxy.core.routes import Action
from meshproxy.core.settings import Settings

from fakes import Harness
from nginx_fixtures import ingress, manifests, secret, service

WEB = service("web", [("127.0.10.1", 8080), ("127.0.10.2", 8080)])
ERR = service("errors", [("127.0.10.9", 8080)])
CANARY = service("canary", [("127.0.10.5", 8080)])
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(autouse=True)
def checked_transitions(monkeypatch):
    monkeypatch.setattr(exchange_mod.Exchange, "_to", exchange_mod.checked_to)


def harness(*ingresses: str, **settings) -> Harness:
    return Harness(manifests(WEB, ERR, CANARY, *ingresses), **settings)


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def test_chunked_body_over_the_limit_gets_413_and_the_attempt_is_dropped():
    h = harness(ingress("web", "a.com", "/", "web", {"proxy-body-size": "1k"}))
    conn, t = h.client()
    conn.data_received(b"POST /up HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n")
    up, ut = h.pool.open()
    conn.data_received(b"200\r\n" + b"a" * 512 + b"\r\n")
    assert not t.data() and not ut.aborted
    conn.data_received(b"201\r\n" + b"a" * 513 + b"\r\n")
    assert status_of(t.data()) == 413 and ut.aborted and t.closing


def test_declared_length_over_the_limit_never_reaches_a_pod():
    h = harness(ingress("web", "a.com", "/", "web"))          # ingress-nginx's default: 1m
    conn, t = h.client()
    conn.data_received(b"POST /up HTTP/1.1\r\nHost: a.com\r\nContent-Length: %d\r\n\r\n" % ((1 << 20) + 1))
    assert status_of(t.data()) == 413 and not h.pool.requests
    conn, t = h.client()
    conn.data_received(b"POST /up HTTP/1.1\r\nHost: a.com\r\nContent-Length: 3\r\n\r\nabc")
    assert h.pool.requests


def test_intercepted_status_goes_to_the_error_backend_with_its_fields():
    h = harness(ingress("web", "a.com", "/", "web", {"custom-http-errors": "404,503", "default-backend": "errors"}))
    conn, t = h.client()
    conn.data_received(b"GET /page?x=1 HTTP/1.1\r\nHost: a.com\r\nAccept: text/html\r\n\r\n")
    up, _ = h.pool.open()
    up.data_received(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")
    assert not t.data()
    assert h.pool.requests[0][0] == ("127.0.10.9", 8080)
    err, et = h.pool.open()
    head = et.data().decode()
    assert head.startswith("GET /?x=1 HTTP/1.1\r\n")
    for field in ("X-Code: 404", "X-Namespace: default", "X-Ingress-Name: web", "X-Service-Name: web",
                  "X-Service-Port: 80", "X-Format: text/html", "X-Original-URI: /page?x=1", "Host: a.com"):
        assert field + "\r\n" in head, field
    err.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ncustom")
    out = t.data()
    assert status_of(out) == 200 and out.endswith(b"custom")
    # a status not in the list is relayed
    conn.data_received(b"GET /x HTTP/1.1\r\nHost: a.com\r\n\r\n")
    up = h.pool.open()[0] if h.pool.requests else up      # the first pod's connection was pooled
    up.data_received(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
    assert status_of(t.data().split(b"custom", 1)[1]) == 500


def test_intercept_is_skipped_for_a_body_that_cannot_be_sent_again():
    h = harness(ingress("web", "a.com", "/", "web", {"custom-http-errors": "404", "default-backend": "errors",
                                                      "proxy-body-size": "0"}))
    conn, t = h.client()
    size = exchange_mod.REPLAY_MAX + 1
    conn.data_received(b"PUT /x HTTP/1.1\r\nHost: a.com\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size)
    up, _ = h.pool.open()
    up.data_received(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert status_of(t.data()) == 404 and not h.pool.requests


def test_default_backend_answers_when_the_service_has_no_endpoint():
    h = harness(ingress("web", "a.com", "/", "invalid", {"default-backend": "errors"}))
    conn, t = h.client()
    conn.data_received(b"GET /alma/armud HTTP/1.1\r\nHost: a.com\r\nx-request-id: something-unique\r\n\r\n")
    assert h.pool.requests[0][0] == ("127.0.10.9", 8080)
    _, et = h.pool.open()
    head = et.data().decode()
    assert head.startswith("GET /alma/armud HTTP/1.1\r\n")
    for field in ("X-Code: 503", "X-Ingress-Name: web", "X-Service-Name: invalid", "x-request-id: something-unique"):
        assert field + "\r\n" in head, field


def test_connection_limit_released_when_the_client_leaves():
    h = harness(ingress("web", "a.com", "/", "web", {"limit-connections": "1"}))
    c1, t1 = h.client()
    c1.data_received(b"GET /slow HTTP/1.1\r\nHost: a.com\r\n\r\n")
    c2, t2 = h.client()
    c2.data_received(b"GET /slow HTTP/1.1\r\nHost: a.com\r\n\r\n")
    assert status_of(t2.data()) == 503
    c1.connection_lost(None)       # mid-request: the count goes with it
    c3, t3 = h.client()
    c3.data_received(b"GET /slow HTTP/1.1\r\nHost: a.com\r\n\r\n")
    assert not t3.data() and len(h.pool.requests) == 2


def test_an_answer_carries_the_fields_of_the_filters_before_it():
    h = harness(secret("basic", {"auth": b"foo:{PLAIN}bar"}),
                ingress("web", "a.com", "/", "web", {"enable-cors": "true", "auth-type": "basic",
                                                      "auth-secret": "basic", "auth-realm": "test auth"}))
    conn, t = h.client()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\n\r\n")
    out = t.data()
    assert status_of(out) == 401 and b"Access-Control-Allow-Origin: *\r\n" in out
    assert b'WWW-Authenticate: Basic realm="test auth"\r\n' in out
    conn, t = h.client()
    good = base64.b64encode(b"foo:bar")
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\nAuthorization: Basic " + good + b"\r\n\r\n")
    up, ut = h.pool.open()
    assert b"authorization" not in ut.data().lower()          # nginx clears it for the pod
    up.data_received(OK)
    assert b"Access-Control-Allow-Origin: *\r\n" in t.data()


def test_slow_password_hash_holds_the_request_until_the_thread_answers():
    bcrypt = pytest.importorskip("bcrypt")
    h = harness(secret("basic", {"auth": b"foo:" + bcrypt.hashpw(b"bar", bcrypt.gensalt(4))}),
                ingress("web", "a.com", "/", "web", {"auth-type": "basic", "auth-secret": "basic"}))
    calls = []
    h.server.offload = lambda fn, args, done: calls.append((fn, args, done))
    conn, t = h.client()
    good = base64.b64encode(b"foo:bar")
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\nAuthorization: Basic " + good + b"\r\n\r\n")
    assert len(calls) == 1 and not h.pool.requests and not t.data()
    fn, args, done = calls.pop()
    done(fn(*args), None)
    assert len(h.pool.requests) == 1
    # remembered: the next request of the client costs no thread
    up, ut = h.pool.open()
    up.data_received(OK)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\nAuthorization: Basic " + good + b"\r\n\r\n")
    assert not calls
    assert h.pool.requests or ut.data().count(b"GET / HTTP/1.1") == 2


def test_canary_header_sends_the_request_to_the_canary_pod():
    h = harness(ingress("web", "a.com", "/", "web"),
                ingress("c", "a.com", "/", "canary", {"canary": "true", "canary-by-header": "X-Canary"}))
    conn, t = h.client()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\nX-Canary: always\r\n\r\n")
    assert h.pool.requests[-1][0] == ("127.0.10.5", 8080)
    conn2, _ = h.client()
    conn2.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\nX-Canary: never\r\n\r\n")
    assert h.pool.requests[-1][0][0] in ("127.0.10.1", "127.0.10.2")


def test_affinity_key_keeps_a_client_on_one_pod():
    h = harness(ingress("web", "a.com", "/", "web", {"affinity": "cookie", "session-cookie-name": "S"}),
                upstream_pool_size=0)      # every request opens its own connection: the pick shows
    conn, t = h.client()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\n\r\n")
    first = h.pool.requests[-1][0]
    up, _ = h.pool.open()
    up.data_received(OK)
    cookie = [line for line in t.data().split(b"\r\n") if line.startswith(b"Set-Cookie: S=")][0][12:].split(b";")[0]
    for _ in range(10):
        c, tt = h.client()
        c.data_received(b"GET / HTTP/1.1\r\nHost: a.com\r\nCookie: " + cookie + b"\r\n\r\n")
        assert h.pool.requests[-1][0] == first
        h.pool.open()[0].data_received(OK)
        assert b"Set-Cookie" not in tt.data()


def test_route_connect_timeout_bounds_the_connect():
    """proxy-connect-timeout: the pool gives up on a connect after the route's timeout, not
    after the proxy's (30 s here)."""
    async def main():
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(loop, Settings(connect_timeout=30.0))

        async def never(*_a, **_k):
            await asyncio.sleep(3600)
        loop.create_connection = never        # a pod that never answers the SYN
        done = loop.create_future()
        ex = SimpleNamespace(action=Action(connect_timeout=0.05),
                             connected=lambda token, conn, exc: done.set_result(exc))
        pool.connect(("127.0.0.1", 9), ("default", "web"), ex, 1)
        return await asyncio.wait_for(done, 5)
    assert isinstance(asyncio.run(main()), TimeoutError)
