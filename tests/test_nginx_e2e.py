"""ingress-nginx's annotations over real sockets: an IngressClass ``nginx`` whose controller is
meshproxy.dev/ingress, Ingresses written as ingress-nginx users write them, pure-Python
backends on 127.0.10.x (tests/backends.py), a real auth service, a TLS pod, clients bound to
chosen 127.0.0.0/8 source addresses for the allow / deny lists. Each test follows one of
ingress-nginx's documented behaviours or e2e tests (test/e2e/annotations/*.go); the table
side of the same rules is tests/test_nginx_annotations.py."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import socket
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backends import Backend, Proxy, ScriptedBackend, read_response, tls_secret_yaml
from nginx_fixtures import CLASS, ingress, manifests, secret, service

trustme = pytest.importorskip("trustme")


def svc_of(name: str, *backends) -> str:
    return service(name, [(b.host, b.port) for b in backends])


@pytest.fixture(scope="module")
def pods():
    out = {name: Backend(addr, name=name) for name, addr in (
        ("echo", "127.0.10.11"), ("echo2", "127.0.10.12"), ("canary", "127.0.10.13"), ("errors", "127.0.10.14"))}
    yield out
    for b in out.values():
        b.stop()


def base(pods) -> list[str]:
    return [svc_of("echo", pods["echo"]), svc_of("canary", pods["canary"]), svc_of("errors", pods["errors"]),
            svc_of("two", pods["echo"], pods["echo2"])]


def call(port: int, path: str, host: str, method: str = "GET", headers: dict | None = None, body=None,
         source: str | None = None, timeout: float = 10.0):
    """(status, lower-case headers (multi-valued joined by '\\n'), body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                   source_address=(source, 0) if source else None)
    try:
        h = {"Host": host}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h,
                  encode_chunked=h.get("Transfer-Encoding") == "chunked")
        r = c.getresponse()
        data = r.read()
        hdrs: dict[str, str] = {}
        for k, v in r.getheaders():
            hdrs[k.lower()] = hdrs[k.lower()] + "\n" + v if k.lower() in hdrs else v
        return r.status, hdrs, data
    finally:
        c.close()


def echoed(data: bytes) -> dict:
    d = json.loads(data)
    d["hdrs"] = {}
    for n, v in d["headers"]:
        d["hdrs"].setdefault(n.lower(), v)
    return d


# -- drop-in serving -------------------------------------------------------------------------------------

def test_ingress_class_nginx_is_served(pods):
    docs = base(pods) + [
        ingress("by-name", "a.com", "/", "echo"),
        ingress("by-annotation", "b.com", "/", "echo", {"kubernetes.io/ingress.class": "nginx"}, cls=None),
        ingress("other-class", "c.com", "/", "echo", cls="someone-else"),
    ]
    with Proxy(manifests(*docs)) as p:
        assert call(p.port, "/", "a.com")[0] == 200
        assert call(p.port, "/", "b.com")[0] == 200
        assert call(p.port, "/", "c.com")[0] == 404
        assert set(p.snapshot.ingresses) == {"default/by-name", "default/by-annotation"}
    # without the IngressClass object, class "nginx" is someone else's
    with Proxy("---\n".join(base(pods) + [ingress("by-name", "a.com", "/", "echo")])) as p:
        assert call(p.port, "/", "a.com")[0] == 404


# -- rewrite-target, use-regex --------------------------------------------------------------------------

def test_rewrite_target_with_capture_groups(pods):
    docs = base(pods) + [ingress("regex", "rewrite.bar.com", "/foo/bar/(.+)", "echo",
                                 {"use-regex": "true", "rewrite-target": "/new/backend/$1"})]
    with Proxy(manifests(*docs)) as p:
        st, _, data = call(p.port, "/foo/bar/bar?x=1", "rewrite.bar.com")
        assert st == 200 and echoed(data)["target"] == "/new/backend/bar?x=1"
        st, _, data = call(p.port, "/FOO/Bar/Baz/qux", "rewrite.bar.com")
        assert st == 200 and echoed(data)["target"] == "/new/backend/Baz/qux"
        st, _, data = call(p.port, "/foo/bar/", "rewrite.bar.com")
        assert st == 404 and data == b"404 Not Found\n"


def test_rewrite_target_and_use_regex_across_ingresses(pods):
    docs = base(pods) + [ingress("foo", "rewrite.bar.com", "/foo", "echo"),
                         ingress("regex", "rewrite.bar.com", "/foo.+", "echo",
                                 {"use-regex": "true", "rewrite-target": "/new/backend"})]
    with Proxy(manifests(*docs)) as p:
        assert echoed(call(p.port, "/foo", "rewrite.bar.com")[2])["target"] == "/foo"
        assert echoed(call(p.port, "/foo/bar", "rewrite.bar.com")[2])["target"] == "/new/backend"
        # the documented warning: the longer regex wins over the literal path of the same host
    docs = base(pods) + [ingress("foo", "rewrite.bar.com", "/foo/bar/bar", "echo"),
                         ingress("regex", "rewrite.bar.com", "/foo/bar/[a-z]{3}", "echo",
                                 {"use-regex": "true", "rewrite-target": "/new/backend"})]
    with Proxy(manifests(*docs)) as p:
        assert echoed(call(p.port, "/foo/bar/bar", "rewrite.bar.com")[2])["target"] == "/new/backend"


# -- redirects ---------------------------------------------------------------------------------------------

def test_app_root(pods):
    docs = base(pods) + [ingress("approot", "approot.bar.com", "/", "echo", {"app-root": "/foo"})]
    with Proxy(manifests(*docs)) as p:
        st, h, _ = call(p.port, "/", "approot.bar.com")
        assert st == 302 and h["location"] == "http://approot.bar.com/foo"
        assert call(p.port, "/foo", "approot.bar.com")[0] == 200


@pytest.mark.parametrize("ann,status", [
    ({"permanent-redirect": "http://redirect.example.com"}, 301),
    ({"permanent-redirect": "http://redirect.example.com", "permanent-redirect-code": "308"}, 308),
    ({"temporal-redirect": "http://redirect.example.com"}, 302),
    ({"temporal-redirect": "http://redirect.example.com", "temporal-redirect-code": "307"}, 307),
])
def test_permanent_and_temporal_redirect(pods, ann, status):
    docs = base(pods) + [ingress("redirect", "redirect", "/something", "echo", ann)]
    with Proxy(manifests(*docs)) as p:
        before = pods["echo"].requests
        st, h, _ = call(p.port, "/something", "redirect")
        assert st == status and h["location"] == "http://redirect.example.com"
        assert pods["echo"].requests == before


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def tls_get(port: int, host: str, path: str, ca) -> tuple[int, dict, bytes]:
    """GET over TLS to 127.0.0.1:port with SNI ``host``, trusting ``ca``."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            status, hdrs, body, _ = read_response(s)
            return status, hdrs, body


def test_https_redirect_by_default_when_the_ingress_has_tls(pods, ca):
    cert = ca.issue_cert("secure.com")
    docs = base(pods) + [
        tls_secret_yaml("secure", cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()),
        ingress("tls", "secure.com", "/", "echo", tls=["secure.com"], secret="secure"),
        ingress("notls", "plain.com", "/", "echo"),
        ingress("no-redirect", "off.com", "/", "echo", {"ssl-redirect": "false"}, tls=["off.com"], secret="secure"),
        ingress("force", "forcesslredirect.bar.com", "/", "echo", {"force-ssl-redirect": "true"}),
    ]
    with Proxy(manifests(*docs), tls=True) as p:
        st, h, _ = call(p.port, "/some/path/?a=b", "secure.com")
        assert st == 308 and h["location"] == "https://secure.com/some/path/?a=b"
        st, h, _ = call(p.port, "/some/path/", "secure.com:8080")
        assert st == 308 and h["location"] == "https://secure.com/some/path"
        assert call(p.port, "/x", "plain.com")[0] == 200
        assert call(p.port, "/x", "off.com")[0] == 200
        st, h, _ = call(p.port, "/", "forcesslredirect.bar.com")
        assert st == 308 and h["location"] == "https://forcesslredirect.bar.com"
        st, h, data = tls_get(p.tls_port, "secure.com", "/x", ca)
        assert st == 200 and echoed(data)["target"] == "/x"
        assert h["strict-transport-security"] == "max-age=31536000; includeSubDomains"
        assert "strict-transport-security" not in call(p.port, "/x", "plain.com")[1]


# -- canary -------------------------------------------------------------------------------------------------

def backend_of(data: bytes) -> str:
    return json.loads(data)["backend"]


def test_canary_by_header_cookie_and_weight(pods):
    docs = base(pods) + [ingress("main", "foo", "/info", "echo"),
                         ingress("canary", "foo", "/info", "canary", {
                             "canary": "true", "canary-by-header": "CanaryByHeader",
                             "canary-by-header-value": "DoCanary", "canary-by-cookie": "CanaryByCookie"})]
    with Proxy(manifests(*docs)) as p:
        def who(**headers):
            st, _, data = call(p.port, "/info", "foo", headers=headers)
            assert st == 200
            return backend_of(data)
        assert who() == "echo"
        assert who(CanaryByHeader="DoCanary") == "canary"
        assert who(CanaryByHeader="always") == "echo"       # a value is set: "always" is just another value
        assert who(CanaryByHeader="other", Cookie="CanaryByCookie=always") == "canary"
        assert who(Cookie="CanaryByCookie=never") == "echo"
    for weight, expected in (("0", {"echo"}), ("100", {"canary"}), ("50", {"echo", "canary"})):
        docs = base(pods) + [ingress("main", "foo", "/info", "echo"),
                             ingress("canary", "foo", "/info", "canary", {"canary": "true", "canary-weight": weight})]
        with Proxy(manifests(*docs)) as p:
            got = {backend_of(call(p.port, "/info", "foo")[2]) for _ in range(60)}
            assert got == expected, weight


def test_canary_without_main_ingress_is_404(pods):
    docs = base(pods) + [ingress("canary", "foo", "/info", "canary", {"canary": "true", "canary-by-header": "X"})]
    with Proxy(manifests(*docs)) as p:
        assert call(p.port, "/info", "foo", headers={"X": "always"})[0] == 404


def test_canary_keeps_affinity_sticky(pods):
    docs = base(pods) + [ingress("main", "foo", "/info", "echo", {"affinity": "cookie", "session-cookie-name": "aff"}),
                         ingress("canary", "foo", "/info", "canary", {
                             "canary": "true", "canary-by-header": "ForceCanary", "canary-by-header-value": "yes",
                             "canary-weight": "1"})]
    with Proxy(manifests(*docs)) as p:
        st, h, data = call(p.port, "/info", "foo", headers={"ForceCanary": "yes"})
        assert backend_of(data) == "canary"
        cookie = h["set-cookie"].split(";")[0]
        assert cookie.startswith("aff=")
        assert {backend_of(call(p.port, "/info", "foo", headers={"Cookie": cookie})[2]) for _ in range(30)} == {"canary"}


# -- source addresses ------------------------------------------------------------------------------------

def test_whitelist_and_denylist_by_source_address(pods):
    docs = base(pods) + [ingress("allow", "allow.com", "/", "echo", {"whitelist-source-range": "127.0.0.5/32, 127.0.0.6"}),
                         ingress("deny", "deny.com", "/", "echo", {"denylist-source-range": "127.0.0.7"}),
                         ingress("both", "both.com", "/", "echo", {"allowlist-source-range": "127.0.0.0/24",
                                                                    "denylist-source-range": "127.0.0.8"})]
    with Proxy(manifests(*docs)) as p:
        assert call(p.port, "/", "allow.com", source="127.0.0.5")[0] == 200
        assert call(p.port, "/", "allow.com", source="127.0.0.6")[0] == 200
        assert call(p.port, "/", "allow.com", source="127.0.0.9")[0] == 403
        assert call(p.port, "/", "deny.com", source="127.0.0.7")[0] == 403
        assert call(p.port, "/", "deny.com", source="127.0.0.9")[0] == 200
        assert call(p.port, "/", "both.com", source="127.0.0.8")[0] == 403
        assert call(p.port, "/", "both.com", source="127.0.0.9")[0] == 200


def test_denylist_with_trusted_forwarded_for(pods):
    docs = base(pods) + [ingress("deny", "deny.com", "/", "echo", {"denylist-source-range": "18.0.0.0/8, 56.0.0.1"})]
    with Proxy(manifests(*docs), trusted_proxies=("127.0.0.0/8",)) as p:
        assert call(p.port, "/", "deny.com", headers={"X-Forwarded-For": "18.0.0.1"})[0] == 403
        assert call(p.port, "/", "deny.com", headers={"X-Forwarded-For": "56.0.0.1"})[0] == 403
        assert call(p.port, "/", "deny.com", headers={"X-Forwarded-For": "56.0.0.2"})[0] == 200


# -- CORS ------------------------------------------------------------------------------------------------

def test_cors_preflight_and_response_headers(pods):
    docs = base(pods) + [ingress("cors", "cors.foo.com", "/", "echo", {
        "enable-cors": "true", "cors-allow-origin": "https://origin.cors.com:8080, http://*.origin.com"})]
    with Proxy(manifests(*docs)) as p:
        seen = pods["echo"].requests
        st, h, body = call(p.port, "/", "cors.foo.com", method="OPTIONS", headers={"Origin": "https://origin.cors.com:8080"})
        assert st == 204 and body == b"" and pods["echo"].requests == seen
        assert h["access-control-allow-origin"] == "https://origin.cors.com:8080"
        assert h["access-control-allow-methods"] == "GET, PUT, POST, DELETE, PATCH, OPTIONS"
        assert h["access-control-max-age"] == "1728000" and h["access-control-allow-credentials"] == "true"
        st, h, _ = call(p.port, "/", "cors.foo.com", headers={"Origin": "http://abc.origin.com"})
        assert st == 200 and h["access-control-allow-origin"] == "http://abc.origin.com"
        st, h, _ = call(p.port, "/", "cors.foo.com", headers={"Origin": "http://evil.com"})
        assert st == 200 and "access-control-allow-origin" not in h


# -- body size, timeouts, retries ---------------------------------------------------------------------------

def test_proxy_body_size(pods):
    docs = base(pods) + [ingress("small", "small.com", "/", "echo", {"proxy-body-size": "1k"}),
                         ingress("dflt", "dflt.com", "/", "echo"),
                         ingress("free", "free.com", "/", "echo", {"proxy-body-size": "0"})]
    def declared(host: str, length: int) -> int:
        """The answer to a head declaring ``length`` body bytes, before any is sent (a body
        refused at the head is never read: the connection closes after the 413)."""
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n\r\n".encode())
            s.settimeout(0.5)
            try:
                return read_response(s)[0]
            except TimeoutError:
                return 0          # no answer yet: the proxy waits for the body
    with Proxy(manifests(*docs)) as p:
        assert call(p.port, "/upload", "small.com", method="POST", body=b"a" * 1024)[0] == 200
        assert declared("small.com", 1025) == 413
        chunks = iter([b"a" * 600, b"a" * 600])
        assert call(p.port, "/upload", "small.com", method="POST", body=chunks,
                    headers={"Transfer-Encoding": "chunked"})[0] == 413
        assert call(p.port, "/upload", "dflt.com", method="POST", body=b"a" * (1 << 20))[0] == 200
        assert declared("dflt.com", (1 << 20) + 1) == 413
        assert declared("dflt.com", 1 << 20) == 0
        assert call(p.port, "/upload", "free.com", method="POST", body=b"a" * (2 << 20))[0] == 200


def test_proxy_read_timeout(pods):
    docs = base(pods) + [ingress("slow", "slow.com", "/", "echo", {"proxy-read-timeout": "1",
                                                                     "proxy-next-upstream": "off"})]
    with Proxy(manifests(*docs)) as p:
        assert call(p.port, "/delay?ms=3000", "slow.com")[0] == 504
        assert call(p.port, "/delay?ms=10", "slow.com")[0] == 200


def test_proxy_next_upstream_on_502():
    good = Backend("127.0.10.21", name="good")
    bad = ScriptedBackend("127.0.10.22")
    bad.script = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
    try:
        docs = [service("mixed", [(good.host, good.port), (bad.host, bad.port)]),
                ingress("retry", "retry.com", "/", "mixed", {"proxy-next-upstream": "error timeout http_502"}),
                ingress("noretry", "noretry.com", "/", "mixed", {"proxy-next-upstream": "off"})]
        # Separate proxies: passive outlier detection would soon eject the failing pod.
        with Proxy(manifests(*docs)) as p:
            assert 502 in {call(p.port, "/", "noretry.com")[0] for _ in range(12)}
        with Proxy(manifests(*docs)) as p:
            assert {call(p.port, "/", "retry.com")[0] for _ in range(20)} == {200}
    finally:
        good.stop()
        bad.stop()


# -- headers to the pod ------------------------------------------------------------------------------------

def test_upstream_vhost_and_x_forwarded_prefix(pods):
    docs = base(pods) + [ingress("vhost", "upstreamvhost.foo.com", "/", "echo", {"upstream-vhost": "upstreamvhost.bar.com"}),
                         ingress("xfp", "xfp.baz.com", "/", "echo", {"x-forwarded-prefix": "/test/value",
                                                                       "rewrite-target": "/foo"}),
                         ingress("noxfp", "noxfp.baz.com", "/", "echo", {"x-forwarded-prefix": "",
                                                                           "rewrite-target": "/foo"}),
                         ingress("conn", "connection.foo.com", "/", "echo", {"connection-proxy-header": "keep-alive"})]
    with Proxy(manifests(*docs)) as p:
        d = echoed(call(p.port, "/", "upstreamvhost.foo.com")[2])
        assert d["hdrs"]["host"] == "upstreamvhost.bar.com"
        d = echoed(call(p.port, "/", "xfp.baz.com")[2])
        assert d["hdrs"]["x-forwarded-prefix"] == "/test/value" and d["target"] == "/foo"
        d = echoed(call(p.port, "/", "noxfp.baz.com")[2])
        assert "x-forwarded-prefix" not in d["hdrs"] and d["target"] == "/foo"
        assert echoed(call(p.port, "/", "connection.foo.com")[2])["hdrs"]["connection"] == "keep-alive"


# -- affinity, aliases ----------------------------------------------------------------------------------

def test_cookie_affinity(pods):
    docs = base(pods) + [ingress("sticky", "sticky.foo.com", "/something", "two", {
        "affinity": "cookie", "session-cookie-name": "SERVERID", "session-cookie-max-age": "259200",
        "session-cookie-domain": "foo.bar", "session-cookie-samesite": "Strict"})]
    with Proxy(manifests(*docs)) as p:
        st, h, data = call(p.port, "/something", "sticky.foo.com")
        c = h["set-cookie"]
        assert c.startswith("SERVERID=") and "; Max-Age=259200; Domain=foo.bar; Path=/something; HttpOnly; SameSite=Strict" in c
        cookie = c.split(";")[0]
        first = backend_of(data)
        for _ in range(20):
            st, h, data = call(p.port, "/something", "sticky.foo.com", headers={"Cookie": cookie})
            assert backend_of(data) == first and "set-cookie" not in h
        # without the cookie both pods get requests
        assert {backend_of(call(p.port, "/something", "sticky.foo.com")[2]) for _ in range(40)} == {"echo", "echo2"}


def test_server_alias(pods):
    docs = base(pods) + [ingress("app-a", "foo", "/app-a", "echo"),
                         ingress("app-b", "foo", "/app-b", "echo", {"server-alias": "bar"})]
    with Proxy(manifests(*docs)) as p:
        for host in ("foo", "bar"):
            st, _, data = call(p.port, "/app-a", host)
            assert st == 200 and echoed(data)["hdrs"]["host"] == host
        st, _, body = call(p.port, "/app-a", "baz")
        assert st == 404 and b"404 Not Found" in body        # nginx's default server


# -- backend protocol, passthrough ---------------------------------------------------------------------------

class TlsPod:
    """An HTTPS pod: answers every request with JSON (the server name the client asked for)."""

    def __init__(self, addr: str, cert) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        self.sni: list = []
        self.ctx.sni_callback = lambda s, name, c: self.sni.append(name)
        self.sock = socket.socket()
        self.sock.bind((addr, 0))
        self.sock.listen(16)
        self.host, self.port = self.sock.getsockname()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                while True:
                    buf = b""
                    while b"\r\n\r\n" not in buf:
                        d = s.recv(65536)
                        if not d:
                            return
                        buf += d
                    line = buf.split(b"\r\n", 1)[0].decode()
                    body = json.dumps({"tls": True, "request": line, "sni": self.sni[-1] if self.sni else None}).encode()
                    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except (OSError, ssl.SSLError):
            pass

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()
        self.thread.join(timeout=5)


def test_backend_protocol_https(ca):
    pod = TlsPod("127.0.10.31", ca.issue_cert("pod.local"))
    try:
        docs = [service("secure", [(pod.host, pod.port)]),
                ingress("https", "secure.foo.com", "/", "secure", {"backend-protocol": "HTTPS"}),
                ingress("plain", "plain.foo.com", "/", "secure")]
        with Proxy(manifests(*docs)) as p:
            for _ in range(3):     # pooled TLS connections too
                st, _, data = call(p.port, "/x", "secure.foo.com")
                assert st == 200 and json.loads(data) == {"tls": True, "request": "GET /x HTTP/1.1", "sni": None}
    finally:
        pod.stop()


def test_ssl_passthrough(pods, ca):
    pod = TlsPod("127.0.10.32", ca.issue_cert("testpassthrough.com"))
    own = ca.issue_cert("noannotationnopassthrough.com")
    try:
        docs = base(pods) + [
            service("echopass", [(pod.host, pod.port)]),
            tls_secret_yaml("own", own.cert_chain_pems[0].bytes(), own.private_key_pem.bytes()),
            ingress("pass", "testpassthrough.com", "/", "echopass", {"ssl-passthrough": "true"},
                    tls=["testpassthrough.com"], secret="own"),
            ingress("nopass", "noannotationnopassthrough.com", "/", "echo", tls=["noannotationnopassthrough.com"],
                    secret="own"),
        ]
        with Proxy(manifests(*docs), tls=True, ssl_passthrough=True) as p:
            st, _, data = tls_get(p.tls_port, "testpassthrough.com", "/x", ca)
            assert st == 200 and json.loads(data) == {"tls": True, "request": "GET /x HTTP/1.1",
                                                      "sni": "testpassthrough.com"}
            st, _, data = tls_get(p.tls_port, "noannotationnopassthrough.com", "/y", ca)
            assert st == 200 and echoed(data)["target"] == "/y"      # terminated here, to the echo pod
    finally:
        pod.stop()


# -- authentication -------------------------------------------------------------------------------------------

class AuthService:
    """httpbun's /basic-auth/USER/PASSWORD and /cookies/set/K/V, enough for auth-url."""

    def __init__(self, addr: str) -> None:
        owner = self
        self.seen: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
                parts = self.path.split("/")
                if self.path.startswith("/basic-auth/"):
                    want = base64.b64encode(f"{parts[2]}:{parts[3]}".encode()).decode()
                    if self.headers.get("Authorization") == f"Basic {want}":
                        self.send_response(200)
                        self.send_header("Foo", "fromauth")
                        self.send_header("Set-Cookie", "session=ok")
                    else:
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", 'Basic realm="Fake Realm"')
                elif self.path.startswith("/status/"):
                    self.send_response(int(parts[2]))
                else:
                    self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer((addr, 0), Handler)
        self.host, self.port = self.httpd.server_address
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def auth():
    a = AuthService("127.0.10.40")
    yield a
    a.stop()


def test_external_auth(pods, auth):
    url = f"http://{auth.host}:{auth.port}/basic-auth/user/password"
    docs = base(pods) + [
        ingress("auth", "auth", "/", "echo", {"auth-url": url, "auth-signin": "http://$host/auth/start",
                                              "auth-response-headers": "Foo"}),
        ingress("plain401", "plain401", "/", "echo", {"auth-url": url}),
        ingress("forbidden", "forbidden", "/", "echo", {"auth-url": f"http://{auth.host}:{auth.port}/status/403"}),
        ingress("broken", "broken", "/", "echo", {"auth-url": f"http://{auth.host}:{auth.port}/status/500"}),
        ingress("down", "down", "/", "echo", {"auth-url": "http://127.0.10.41:9/"}),
    ]
    good = {"Authorization": "Basic " + base64.b64encode(b"user:password").decode()}
    with Proxy(manifests(*docs)) as p:
        st, h, data = call(p.port, "/", "auth", headers={**good, "Foo": "bar"})
        assert st == 200
        d = echoed(data)
        assert d["hdrs"]["foo"] == "fromauth"                  # the auth answer replaces the client's
        assert h["set-cookie"] == "session=ok"
        sent = auth.seen[-1]["headers"]
        assert sent["x-original-url"] == "http://auth/" and sent["x-original-method"] == "GET"
        assert sent["x-sent-from"] == "nginx-ingress-controller" and sent["host"] == f"{auth.host}:{auth.port}"
        st, h, _ = call(p.port, "/?a=b&c=d", "auth")
        assert st == 302
        assert h["location"] == "http://auth/auth/start?rd=http://auth" + urllib.parse.quote("/?a=b&c=d", safe="")
        st, h, _ = call(p.port, "/", "plain401")
        assert st == 401 and h["www-authenticate"] == 'Basic realm="Fake Realm"'
        assert call(p.port, "/", "forbidden")[0] == 403
        assert call(p.port, "/", "broken")[0] == 500
        assert call(p.port, "/", "down")[0] == 500


def test_basic_auth(pods):
    import bcrypt
    hashed = bcrypt.hashpw(b"bar", bcrypt.gensalt(6))
    docs = base(pods) + [
        secret("basic", {"auth": b"foo:" + hashed + b"\n"}),
        ingress("auth", "auth", "/", "echo", {"auth-type": "basic", "auth-secret": "basic", "auth-realm": "test auth"}),
        ingress("nosecret", "nosecret", "/", "echo", {"auth-type": "basic", "auth-secret": "something"}),
        ingress("other", "other", "/", "echo"),
    ]
    with Proxy(manifests(*docs)) as p:
        st, h, body = call(p.port, "/", "auth")
        assert st == 401 and b"401 Authorization Required" in body
        assert h["www-authenticate"] == 'Basic realm="test auth"'
        bad = {"Authorization": "Basic " + base64.b64encode(b"user:pass").decode()}
        assert call(p.port, "/", "auth", headers=bad)[0] == 401
        good = {"Authorization": "Basic " + base64.b64encode(b"foo:bar").decode()}
        st, _, data = call(p.port, "/", "auth", headers=good)
        assert st == 200 and "authorization" not in echoed(data)["hdrs"]
        st, _, body = call(p.port, "/", "nosecret")
        assert st == 503 and b"503 Service Temporarily Unavailable" in body
        assert call(p.port, "/", "other")[0] == 200


# -- limits -------------------------------------------------------------------------------------------------

def test_limit_rpm_with_burst():
    with Backend("127.0.10.51", name="lim") as b:
        docs = [svc_of("lim", b), ingress("lim", "limit.com", "/", "lim", {"limit-rpm": "1"})]
        with Proxy(manifests(*docs)) as p:
            got = [call(p.port, "/", "limit.com", source="127.0.0.21")[0] for _ in range(8)]
            assert got == [200] * 6 + [503] * 2
            assert call(p.port, "/", "limit.com", source="127.0.0.22")[0] == 200   # per client address


def test_limit_connections():
    with Backend("127.0.10.52", name="slow") as b:
        docs = [svc_of("slow", b), ingress("conn", "limit-connections", "/", "slow", {"limit-connections": "8"})]
        with Proxy(manifests(*docs)) as p:
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                statuses = list(pool.map(lambda _: call(p.port, "/delay?ms=1500", "limit-connections")[0], range(20)))
            assert sorted(statuses) == [200] * 8 + [503] * 12
            assert call(p.port, "/", "limit-connections")[0] == 200    # released


# -- custom errors, default backend -----------------------------------------------------------------------

def test_custom_http_errors_with_default_backend(pods):
    docs = base(pods) + [ingress("errs", "customerrors.foo.com", "/", "echo",
                                 {"custom-http-errors": "404, 503", "default-backend": "errors"}),
                         ingress("dflt", "default-backend", "/", "invalid", {"default-backend": "errors"})]
    with Proxy(manifests(*docs)) as p:
        st, _, data = call(p.port, "/status/404", "customerrors.foo.com", headers={"Accept": "text/html"})
        d = echoed(data)
        assert st == 200 and d["backend"] == "errors" and d["target"] == "/"
        assert d["hdrs"]["x-code"] == "404" and d["hdrs"]["x-original-uri"] == "/status/404"
        assert d["hdrs"]["x-format"] == "text/html" and d["hdrs"]["x-service-name"] == "echo"
        assert call(p.port, "/status/500", "customerrors.foo.com")[0] == 500
        st, _, data = call(p.port, "/alma/armud", "default-backend", headers={"x-request-id": "something-unique"})
        d = echoed(data)
        assert st == 200 and d["backend"] == "errors"
        assert (d["hdrs"]["x-code"], d["hdrs"]["x-ingress-name"], d["hdrs"]["x-service-name"],
                d["hdrs"]["x-request-id"]) == ("503", "dflt", "invalid", "something-unique")


# -- never silently wrong -------------------------------------------------------------------------------------

def test_snippet_refuses_only_its_ingress(pods):
    docs = base(pods) + [ingress("good", "snippet.com", "/good", "echo"),
                         ingress("bad", "snippet.com", "/bad", "echo",
                                 {"configuration-snippet": 'more_set_headers "Foo1: Bar1";'})]
    with Proxy(manifests(*docs)) as p:
        assert call(p.port, "/good", "snippet.com")[0] == 200
        st, h, _ = call(p.port, "/bad", "snippet.com")
        assert st == 404 and "foo1" not in h
        assert ("Ingress/default/bad: metadata.annotations[nginx.ingress.kubernetes.io/configuration-snippet]: "
                "holds nginx configuration, which meshproxy cannot apply; the Ingress is not served") in p.snapshot.problems


def test_class_without_nginx_objects_is_unchanged(pods):
    """An Ingress of meshproxy's own class without ingress-nginx annotations keeps meshproxy's
    rules (fall-through to rules without host, no body limit)."""
    docs = base(pods) + [CLASS.replace("nginx", "meshproxy"),
                         ingress("m", "a.com", "/app", "echo", cls="meshproxy"),
                         ingress("c", None, "/", "canary", cls="meshproxy")]
    with Proxy("---\n".join(docs)) as p:
        assert backend_of(call(p.port, "/other", "a.com")[2]) == "canary"
        assert call(p.port, "/upload", "a.com", method="POST", body=b"a" * (2 << 20))[0] == 200

