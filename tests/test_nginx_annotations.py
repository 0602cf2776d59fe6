"""ingress-nginx annotations as tables: how each value is read (meshproxy.core.nginx_annotations),
what routes a set of Ingresses compiles into (meshproxy.core.nginx_ingress), and what each
filter decides for a request (meshproxy.core.nginx_filters). The cases come from ingress-nginx's
documentation (annotations.md, ingress-path-matching.md) and its e2e tests; the real-socket
side of each annotation is tests/test_nginx_e2e.py."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

from l7.headers import TrustedProxies
from meshproxy.core import htpasswd
from meshproxy.core import nginx_filters as nf
from meshproxy.core.nginx_annotations import backend_key, parse, parse_size
from meshproxy.core.paths import normalize_request_path
from meshproxy.core.routes import Action, BackendRef
from meshproxy.core.settings import Settings

from fakes import snapshot_for
from nginx_fixtures import ANN, ingress, manifests, secret, service
from discovery.manifests import load_text


def parsed(annotations: dict[str, str], extra: str = ""):
    text = ingress("web", "a.com", "/", "web", annotations) + ("---\n" + extra if extra else "")
    objs = load_text(text)
    assert not objs.errors, objs.errors
    ing = [o for o in objs.objects if o.kind == "Ingress"][0]
    secrets = {(o.namespace, o.name): o for o in objs.objects if o.kind == "Secret"}
    return parse(ing, secrets)


def kinds(cfg) -> dict[str, str]:
    return {f.annotation[len(ANN):]: f.kind for f in cfg.findings}


# -- values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("true", True), ("True", True), ("TRUE", True), ("1", True), ("t", True), ("T", True),
    ("false", False), ("0", False), ("F", False), ("yes", None), ("", None), (" true", None),
])
def test_booleans_are_go_strconv_parsebool(value, expected):
    cfg = parsed({"use-regex": value})
    if expected is None:
        assert cfg.use_regex is False and kinds(cfg).get("use-regex") in ("ignored", None)
    else:
        assert cfg.use_regex is expected and "use-regex" not in kinds(cfg)


@pytest.mark.parametrize("value,seconds,flagged", [
    ("50", 50.0, False), ("5", 5.0, False), ("50k", 5.0, True), ("1.5", 5.0, True), (" 5", 5.0, True),
])
def test_timeouts_are_integers_of_seconds(value, seconds, flagged):
    cfg = parsed({"proxy-connect-timeout": value})
    assert cfg.connect_timeout == seconds
    assert ("proxy-connect-timeout" in kinds(cfg)) is flagged


@pytest.mark.parametrize("value,size", [
    ("8m", 8 << 20), ("1k", 1024), ("1K", 1024), ("100", 100), ("0", None), ("15r", 1 << 20),
    ("2g", 1 << 20),    # a valid size for the annotation, not for nginx's client_max_body_size
])
def test_proxy_body_size(value, size):
    assert parsed({"proxy-body-size": value}).body_size == size


def test_defaults_are_ingress_nginx_defaults():
    cfg = parsed({})
    assert (cfg.body_size, cfg.connect_timeout, cfg.read_timeout, cfg.send_timeout) == (1 << 20, 5.0, 60.0, 60.0)
    assert cfg.next_upstream == ("error", "timeout") and cfg.next_upstream_tries == 3
    assert cfg.ssl_redirect is True and cfg.force_ssl_redirect is False and cfg.backend_protocol == "HTTP"
    assert parse_size("10m") == 10 << 20


# -- never silently wrong ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["configuration-snippet", "server-snippet", "auth-snippet", "stream-snippet",
                                  "modsecurity-snippet"])
def test_snippets_refuse_the_ingress(name):
    cfg = parsed({name: 'more_set_headers "X: y";'})
    assert kinds(cfg)[name] == "refused"
    assert [f.annotation for f in cfg.refused] == [ANN + name]


@pytest.mark.parametrize("annotations,refused", [
    ({"auth-tls-secret": "default/ca"}, True),
    ({"auth-tls-verify-client": "on"}, True),
    ({"auth-tls-verify-client": "off"}, False),
    ({"enable-modsecurity": "true"}, True),
    ({"enable-modsecurity": "false"}, False),
    ({"proxy-ssl-verify": "on"}, True),
    ({"proxy-ssl-verify": "off"}, False),
    ({"backend-protocol": "GRPC"}, False),      # HTTP/2 to the pods (tests/test_nginx_grpc.py)
    ({"backend-protocol": "grpcs"}, False),
    ({"backend-protocol": "FCGI"}, True),
    ({"backend-protocol": "https"}, False),
])
def test_checks_meshproxy_cannot_make_refuse_the_ingress(annotations, refused):
    assert bool(parsed(annotations).refused) is refused


def test_unknown_and_unimplemented_annotations_are_listed_once():
    cfg = parsed({"custom-headers": "default/x", "no-such-thing": "1", "proxy-buffering": "on",
                  "meshproxy.dev/timeout": "5s"})
    k = kinds(cfg)
    assert k == {"custom-headers": "ignored", "no-such-thing": "ignored", "proxy-buffering": "ignored"}
    assert len(cfg.findings) == 3
    assert "not an ingress-nginx annotation" in [f for f in cfg.findings if f.annotation.endswith("no-such-thing")][0].message


# -- redirects ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("annotations,expected", [
    ({"permanent-redirect": "http://redirect.example.com"}, (301, "http://redirect.example.com")),
    ({"permanent-redirect": "https://x.org", "permanent-redirect-code": "308"}, (308, "https://x.org")),
    ({"permanent-redirect": "https://x.org", "permanent-redirect-code": "302"}, (302, "https://x.org")),
    ({"permanent-redirect": "https://x.org", "permanent-redirect-code": "200"}, (301, "https://x.org")),
    ({"permanent-redirect": "https://x.org", "permanent-redirect-code": "309"}, (301, "https://x.org")),
    ({"temporal-redirect": "https://x.org"}, (302, "https://x.org")),
    ({"temporal-redirect": "https://x.org", "temporal-redirect-code": "307"}, (307, "https://x.org")),
    ({"temporal-redirect": "https://x.org", "temporal-redirect-code": "308"}, (302, "https://x.org")),
    ({"temporal-redirect": "https://t.org", "permanent-redirect": "https://p.org"}, (302, "https://t.org")),
    ({"permanent-redirect": "ftp://x.org"}, None),
])
def test_redirect_annotations(annotations, expected):
    assert parsed(annotations).redirect == expected


# -- CORS ---------------------------------------------------------------------------------------------------

CORS_CASES = [   # (cors-allow-origin or None, Origin sent or None, Access-Control-Allow-Origin or None)
    (None, None, "*"),
    ("*", "https://a.com", "*"),
    ("*, foo.bar.com", None, "*"),
    ("      ", "http://origin.com", "*"),
    ("https://origin.cors.com:8080", "https://origin.cors.com:8080", "https://origin.cors.com:8080"),
    ("https://origin.cors.com:8080, https://origin2.cors.com", "https://origin.cors.com:8080", "https://origin.cors.com:8080"),
    ("http://origin2.cors.com, https://origin.com", "http://no.origin.com", None),
    ("origin.cors.com:8080, https://origin2.cors.com, https://origin.com", "origin.cors.com:8080", None),
    ("origin.cors.com:8080, https://origin2.cors.com, https://origin.com", "https://origin.com", "https://origin.com"),
    ("https://foo.bar.com", "https://fooxbar.com", None),
    ("http://origin.cors.com:8080, http://origin.com:8080", "http://origin.com:8080", "http://origin.com:8080"),
    ("https://origin2.cors.com, http://origin.com", "http://origin.com:8080", None),
    ("http://origin.cors.com:8080, http://origin.com:8080", "http://origin.com", None),
    ("http://*.origin.cors.com, http://*.origin.com:8080", "http://foo.origin.cors.com", "http://foo.origin.cors.com"),
    ("http://*.origin.cors.com, http://*.origin.com:8080", "http://bar-foo.origin.cors.com", "http://bar-foo.origin.cors.com"),
    ("http://*.origin.cors.com, http://*.origin.com:8080", "http://bar.foo.origin.cors.com", None),
    ("http://origin.cors.com:8080, http://*.origin.com:8080", "http://abc.origin.com:8080", "http://abc.origin.com:8080"),
    ("http://origin.cors.com:8080, http://*.origin.com:8080", "http://abc.origin.com", None),
    ("https://origin-123.cors.com:8080,   ,https://origin-321.cors.com:8080,", "https://origin-321.cors.com:8080",
     "https://origin-321.cors.com:8080"),
    ("https://origin-123.cors.com:8080,   ,https://origin-321.cors.com:8080,", "https://unknown.cors.com:8080", None),
    ("test://localhost, tauri://localhost:3000", "tauri://localhost:3000", "tauri://localhost:3000"),
    ("https://a.com", None, None),
    ("HTTPS://A.com", "https://a.COM", None),       # the origin list must be lower-case: ignored
    ("https://a.com", "HTTPS://A.COM", "HTTPS://A.COM"),   # the match is case-insensitive
]


class FakeExchange:
    """What nginx filters use of an exchange, recorded."""

    HOLD = object()

    def __init__(self, method=b"GET", path=b"/", query=b"", headers=(), host=b"example.com", tls=False,
                 peer="127.0.0.1", trusted=(), now=100.0, action=None, content_length=None) -> None:
        hdrs = [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v) for n, v in headers]
        target = path + (b"?" + query if query else b"")
        self.head = SimpleNamespace(method=method, path=path, query=query, headers=hdrs, host=host, target=target,
                                    content_length=content_length, chunked=False)
        self.method = method
        tp = TrustedProxies(trusted)
        self.down = SimpleNamespace(tls=tls, peer_ip=peer, client=SimpleNamespace(trusted=tp.contains(peer)))
        self.clock = now
        self.ctx = SimpleNamespace(trusted=tp, filter_state={}, now=lambda: self.clock, tls_port=0)
        self.action = action
        self.answered = None
        self.added: list = []
        self.pick_key = None
        self.body_limit = 0
        self.filter_data: dict = {}
        self.ending: list = []
        self.request_id = b"rid"
        self.req_bytes = 0
        self.finished = False
        self.proceeded = 0

    def answer(self, status, body=b"", headers=()):
        self.answered = (status, body, list(headers))

    def add_request_header(self, name, value, replace=False):
        self.added.append((name, value, replace))

    def use_action(self, action):
        self.action = action

    def on_end(self, fn):
        self.ending.append(fn)

    def proceed(self):
        self.proceeded += 1


@pytest.mark.parametrize("allow,origin,expected", CORS_CASES)
def test_cors_allowed_origins(allow, origin, expected):
    ann = {"enable-cors": "true"}
    if allow is not None:
        ann["cors-allow-origin"] = allow
    c = parsed(ann).cors
    f = nf.Cors(c.origin_regex, c.methods.encode(), c.headers.encode(), c.expose.encode(), c.credentials, c.max_age)
    ex = FakeExchange(headers=[("Origin", origin)] if origin else [])
    f.on_request(ex)
    fields = dict(f.on_response(ex, 200, [(b"Access-Control-Allow-Origin", b"from-pod")]))
    got = fields.get(b"Access-Control-Allow-Origin")
    assert got == (expected.encode() if expected else b"from-pod")


def test_cors_headers_defaults_and_preflight():
    c = parsed({"enable-cors": "true", "cors-allow-methods": "POST, GET", "cors-max-age": "200",
                "cors-allow-credentials": "false", "cors-expose-headers": "X-A, X-B"}).cors
    f = nf.Cors(c.origin_regex, c.methods.encode(), c.headers.encode(), c.expose.encode(), c.credentials, c.max_age)
    ex = FakeExchange(method=b"OPTIONS", headers=[("Origin", "https://x.org")])
    f.on_request(ex)
    status, _, fields = ex.answered
    assert status == 204 and fields == [
        (b"Access-Control-Allow-Origin", b"*"), (b"Access-Control-Allow-Methods", b"POST, GET"),
        (b"Access-Control-Allow-Headers", b"DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,"
                                          b"Cache-Control,Content-Type,Range,Authorization"),
        (b"Access-Control-Expose-Headers", b"X-A, X-B"), (b"Access-Control-Max-Age", b"200")]
    d = parsed({"enable-cors": "true", "cors-allow-methods": "GET; DROP"}).cors
    assert d.methods == "GET, PUT, POST, DELETE, PATCH, OPTIONS" and d.credentials is True and d.max_age == 1728000
    # A refused origin: the OPTIONS request goes to the pod like any other.
    r = parsed({"enable-cors": "true", "cors-allow-origin": "https://a.com"}).cors
    g = nf.Cors(r.origin_regex, b"", b"", b"", True, 1)
    ex = FakeExchange(method=b"OPTIONS", headers=[("Origin", "https://b.com")])
    g.on_request(ex)
    assert ex.answered is None


# -- canary -----------------------------------------------------------------------------------------------

def canary(**kw) -> nf.Canary:
    base = dict(ref=BackendRef(("default", "canary", "80")), main=("default", "main", "80"))
    base.update(kw)
    return nf.Canary(**base)


MAIN_ACTION = Action(backends=(BackendRef(("default", "main", "80")),))


@pytest.mark.parametrize("kw,headers,expected", [
    (dict(header=b"canarybyheader"), [("CanaryByHeader", "always")], True),
    (dict(header=b"canarybyheader"), [("CanaryByHeader", "never")], False),
    (dict(header=b"canarybyheader"), [("CanaryByHeader", "badheadervalue")], False),
    (dict(header=b"canarybyheader"), [], False),
    (dict(header=b"canarybyheader", weight=100), [("CanaryByHeader", "never")], False),
    (dict(header=b"canarybyheader", weight=100), [("CanaryByHeader", "other")], True),
    (dict(header=b"canarybyheader", header_value=b"DoCanary"), [("CanaryByHeader", "DoCanary")], True),
    (dict(header=b"canarybyheader", header_value=b"DoCanary"), [("CanaryByHeader", "always")], False),
    (dict(header=b"canarybyheader", header_value=b"DoCanary"), [("CanaryByHeader", "never")], False),
    (dict(header=b"canarybyheader", pattern=re.compile("^Do[A-Z][a-z]+y$")), [("CanaryByHeader", "DoCanary")], True),
    (dict(header=b"canarybyheader", pattern=re.compile("^Do[A-Z][a-z]+y$")), [("CanaryByHeader", "Docanary")], False),
    (dict(header=b"canarybyheader", header_value=b"DoCanary", pattern=re.compile("^Do[A-Z][a-z]+y$")),
     [("CanaryByHeader", "DoCananry")], False),   # the value wins over the pattern
    (dict(header=b"canarybyheader", pattern_invalid=True, cookie="CanaryByCookie"),
     [("CanaryByHeader", "DoCanary"), ("Cookie", "CanaryByCookie=always")], False),
    (dict(header=b"canarybyheader", header_value=b"DoCanary", cookie="CanaryByCookie"),
     [("CanaryByHeader", "other"), ("Cookie", "CanaryByCookie=always")], True),
    (dict(cookie="Canary-By-Cookie"), [("Cookie", "a=b; Canary-By-Cookie=always")], True),
    (dict(cookie="Canary-By-Cookie"), [("Cookie", "Canary-By-Cookie=never")], False),
    (dict(cookie="Canary-By-Cookie", weight=100), [("Cookie", "Canary-By-Cookie=never")], False),
    (dict(cookie="Canary-By-Cookie"), [("Cookie", "Canary-By-Cookie=badcookievalue")], False),
    (dict(weight=0), [], False),
    (dict(weight=100), [], True),
    (dict(weight=1000, weight_total=1000), [], True),
    (dict(weight=50, weight_total=40), [], None),   # total below 100 counts as 100: a split
    (dict(weight=1, affinity_cookie="aff", primary_key="P", canary_key="C"), [("Cookie", "aff=k|C")], True),
    (dict(weight=100, affinity_cookie="aff", primary_key="P", canary_key="C"), [("Cookie", "aff=k|P")], False),
    (dict(header=b"x", affinity_cookie="aff", primary_key="P", canary_key="C"),
     [("X", "always"), ("Cookie", "aff=k|P")], False),   # pinned to the main backend first
])
def test_canary_decision(kw, headers, expected):
    f = canary(**kw)
    outcomes = set()
    for _ in range(200 if expected is None else 20):
        ex = FakeExchange(headers=headers, action=MAIN_ACTION)
        f.on_request(ex)
        outcomes.add(ex.action is not MAIN_ACTION)
    if expected is None:
        assert outcomes == {True, False}
    else:
        assert outcomes == {expected}


def test_canary_leaves_a_request_another_filter_moved():
    f = canary(weight=100)
    other = Action(backends=(BackendRef(("default", "fallback", "80")),))
    ex = FakeExchange(action=other)
    f.on_request(ex)
    assert ex.action is other


# -- allow / deny, client address --------------------------------------------------------------------------

def nets(*cidrs):
    import ipaddress
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


@pytest.mark.parametrize("allow,deny,ip,status", [
    ((), ("18.0.0.0/8", "56.0.0.1/32"), "18.0.0.1", 403),
    ((), ("18.0.0.0/8", "56.0.0.1/32"), "56.0.0.1", 403),
    ((), ("18.0.0.0/8", "56.0.0.1/32"), "56.0.0.2", None),
    (("18.0.0.0/8", "55.0.0.0/8"), ("18.1.0.0/16", "56.0.0.0/8"), "18.1.0.1", 403),
    (("18.0.0.0/8", "55.0.0.0/8"), ("18.1.0.0/16", "56.0.0.0/8"), "10.10.10.10", 403),
    (("18.0.0.0/8", "55.0.0.0/8"), ("18.1.0.0/16", "56.0.0.0/8"), "18.4.0.1", None),
    (("18.0.0.0/8", "55.0.0.0/8"), ("18.1.0.0/16", "56.0.0.0/8"), "55.55.55.55", None),
    (("127.0.0.0/8",), (), "::ffff:127.0.0.5", None),
])
def test_ip_access(allow, deny, ip, status):
    ex = FakeExchange(peer=ip)
    nf.IpAccess(nets(*allow), nets(*deny)).on_request(ex)
    assert (ex.answered[0] if ex.answered else None) == status


@pytest.mark.parametrize("peer,trusted,xff,expected", [
    ("127.0.0.1", (), "18.0.0.1", "127.0.0.1"),                 # untrusted peer: its own address
    ("127.0.0.1", ("127.0.0.0/8",), "18.0.0.1", "18.0.0.1"),
    ("127.0.0.1", ("127.0.0.0/8",), "1.1.1.1, 18.0.0.1", "18.0.0.1"),
    ("127.0.0.1", ("127.0.0.0/8", "18.0.0.0/8"), "1.1.1.1, 18.0.0.1", "1.1.1.1"),
    ("127.0.0.1", ("0.0.0.0/0",), "1.1.1.1, 18.0.0.1", "1.1.1.1"),   # all trusted: the first one
    ("127.0.0.1", ("127.0.0.0/8",), None, "127.0.0.1"),
])
def test_client_address_is_nginx_realip(peer, trusted, xff, expected):
    ex = FakeExchange(peer=peer, trusted=trusted, headers=[("X-Forwarded-For", xff)] if xff else [])
    assert nf.client_ip(ex) == expected


def test_invalid_source_range_denies_the_location():
    cfg = parsed({"whitelist-source-range": "not-an-ip, 10.0.0.0/33"})
    assert cfg.denied and kinds(cfg).get("*") == "denied"
    cfg = parsed({"allowlist-source-range": "10.0.0.1, bogus"})
    assert not cfg.denied and [str(n) for n in cfg.allow] == ["10.0.0.1/32"]
    assert parsed({"whitelist-source-range": "18.0.0.0/8, 56.0.0.0/8"}).allow == nets("18.0.0.0/8", "56.0.0.0/8")


# -- limits -----------------------------------------------------------------------------------------------

def test_limit_rps_is_nginx_limit_req_with_burst_and_nodelay():
    cfg = parsed({"limit-rps": "1"})
    assert (cfg.limits.rps, cfg.limits.burst_multiplier) == (1, 5)
    f = nf.LimitRequests("k", 1000, 5)
    ex = FakeExchange(now=100.0)
    results = []
    for _ in range(8):
        ex.answered = None
        f.on_request(ex)
        results.append(ex.answered[0] if ex.answered else 200)
    assert results == [200] * 6 + [503] * 2        # one, then the burst of 5, then refused
    ex.clock += 0.999
    ex.answered = None
    f.on_request(ex)
    assert ex.answered[0] == 503                     # 999 ms drain 0.999 of a request: not yet
    ex.clock += 0.002
    ex.answered = None
    f.on_request(ex)
    assert ex.answered is None                       # a whole request drained: one more
    other = FakeExchange(peer="127.0.0.2", now=ex.clock)
    other.ctx = ex.ctx
    f.on_request(other)
    assert other.answered is None                    # per client address


def test_limit_rpm_and_exempt_addresses():
    f = nf.LimitRequests("m", 60 * 1000 // 60, 2, nets("10.0.0.0/8"))
    ex = FakeExchange()
    got = []
    for _ in range(4):
        ex.answered = None
        f.on_request(ex)
        got.append(ex.answered[0] if ex.answered else 200)
    assert got == [200, 200, 200, 503]
    ex = FakeExchange(peer="10.1.2.3")
    for _ in range(10):
        f.on_request(ex)
    assert ex.answered is None


def test_limit_connections_counts_requests_in_progress():
    f = nf.LimitConnections("c", 2)
    state: dict = {}
    exs = []
    for _ in range(3):
        ex = FakeExchange()
        ex.ctx.filter_state = state
        f.on_request(ex)
        exs.append(ex)
    assert [e.answered[0] if e.answered else 200 for e in exs] == [200, 200, 503]
    exs[0].ending[0]()
    ex = FakeExchange()
    ex.ctx.filter_state = state
    f.on_request(ex)
    assert ex.answered is None
    for e in (exs[1], ex):
        e.ending[0]()
    assert state[("limit-connections", "c")] == {}


# -- redirects, HTTPS -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,host,target,tls,expected", [
    (dict(force=True), b"forcesslredirect.bar.com", b"/", False, b"https://forcesslredirect.bar.com"),
    (dict(force=True), b"a.com:8080", b"/x/?q=1", False, b"https://a.com/x/?q=1"),
    (dict(force=True), b"a.com", b"/x/", False, b"https://a.com/x"),
    (dict(force=True, preserve_trailing_slash=True), b"a.com", b"/x/", False, b"https://a.com/x/"),
    (dict(force=False), b"a.com", b"/x", False, b"https://a.com/x"),      # a.com has a certificate
    (dict(force=False), b"b.a.com", b"/x", False, b"https://b.a.com/x"),   # *.a.com too
    (dict(force=False), b"other.com", b"/x", False, None),
    (dict(force=True), b"a.com", b"/x", True, None),                         # already HTTPS
])
def test_ssl_redirect(kw, host, target, tls, expected):
    f = nf.SslRedirect(cert_hosts=frozenset({"a.com", "*.a.com"}), **kw)
    path, _, query = target.partition(b"?")
    ex = FakeExchange(host=host, path=path, query=query, tls=tls)
    f.on_request(ex)
    if expected is None:
        assert ex.answered is None
    else:
        assert ex.answered[0] == 308 and ex.answered[2] == [(b"Location", expected)]


def test_https_redirect_uses_the_forwarded_host_of_a_trusted_proxy():
    f = nf.SslRedirect(False, frozenset({"secure.com"}))
    ex = FakeExchange(host=b"secure.com", headers=[("X-Forwarded-Host", "example.com:80")], trusted=("127.0.0.0/8",))
    f.on_request(ex)
    assert ex.answered[2] == [(b"Location", b"https://example.com")]
    ex = FakeExchange(host=b"secure.com", headers=[("X-Forwarded-Host", "example.com:80")])
    f.on_request(ex)
    assert ex.answered[2] == [(b"Location", b"https://secure.com")]


def test_hsts_on_https_responses_of_hosts_with_a_certificate():
    f = nf.Hsts(frozenset({"secure.com", "*.wild.com"}))
    for host, tls, expected in [(b"secure.com", True, True), (b"a.wild.com:8443", True, True),
                                (b"secure.com", False, False), (b"other.com", True, False)]:
        ex = FakeExchange(host=host, tls=tls)
        fields = f.on_response(ex, 200, [(b"Strict-Transport-Security", b"max-age=1")])
        assert (fields == [(b"Strict-Transport-Security", b"max-age=31536000; includeSubDomains")]) is expected


def test_forwarded_https_from_a_trusted_proxy_is_not_redirected():
    f = nf.SslRedirect(True, frozenset())
    ex = FakeExchange(headers=[("X-Forwarded-Proto", "https")], trusted=("127.0.0.0/8",))
    f.on_request(ex)
    assert ex.answered is None
    ex = FakeExchange(headers=[("X-Forwarded-Proto", "https")])
    f.on_request(ex)
    assert ex.answered[0] == 308


def test_app_root_uses_the_host_as_sent():
    ex = FakeExchange(host=b"approot.bar.com:8080", query=b"a=b")
    nf.AppRoot("/foo").on_request(ex)
    assert ex.answered == (302, b"", [(b"Location", b"http://approot.bar.com:8080/foo")])


@pytest.mark.parametrize("template,expected", [
    ("http://$host/auth/start", "http://auth.com/auth/start"),
    ("$pass_access_scheme://$http_host$escaped_request_uri", "http://auth.com:81%2F%3Fa%3Db%26c%3Dd"),
    ("$scheme://$best_http_host$request_uri", "http://auth.com:81/?a=b&c=d"),
    ("http://x/$uri?$args", "http://x//?a=b&c=d"),
    ("http://$remote_addr/", "http://127.0.0.1/"),
    ("http://$unknown/", "http://$unknown/"),
])
def test_nginx_variables(template, expected):
    ex = FakeExchange(host=b"auth.com:81", path=b"/", query=b"a=b&c=d")
    assert nf.expand(template, ex) == expected


# -- passwords ---------------------------------------------------------------------------------------------

def test_htpasswd_formats():
    import bcrypt
    b = bcrypt.hashpw(b"bar", bcrypt.gensalt(4)).decode()
    cases = [
        (b.replace("$2b$", "$2y$"), True), (b, True),
        ("$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/", False),     # "secret", not "bar"
        (htpasswd.md5_crypt(b"bar", b"abcdefgh", b"$apr1$"), True),
        (htpasswd.md5_crypt(b"bar", b"saltsalt"), True),
        (htpasswd.sha_crypt(b"bar", b"saltstring", None, 256), True),
        (htpasswd.sha_crypt(b"bar", b"saltstring", 6000, 512), True),
        ("{SHA}Ys23Ag/5IOWqZCw9QGaVDdHwH00=", True),
        ("{PLAIN}bar", True), ("{PLAIN}baz", False),
        ("xyDES3456789a", False), ("", False), ("$2y$broken", False), ("{SSHA}!!!", False),
    ]
    for hashed, ok in cases:
        assert htpasswd.verify(b"bar", hashed) is ok, hashed
    assert htpasswd.md5_crypt(b"secret", b"abcdefgh", b"$apr1$") == "$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/"
    assert htpasswd.sha_crypt(b"Hello world!", b"saltstring", None, 256) == \
        "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"
    assert htpasswd.expensive(b) and not htpasswd.expensive("{SHA}x")


def test_basic_auth_secret_forms():
    import bcrypt
    h = bcrypt.hashpw(b"bar", bcrypt.gensalt(4))
    cfg = parsed({"auth-type": "basic", "auth-secret": "basic", "auth-realm": "test auth"},
                 secret("basic", {"auth": b"foo:" + h + b"\n# comment\nfoo:{PLAIN}second\n"}))
    assert cfg.basic_auth.realm == "test auth" and cfg.basic_auth.users == {"foo": h.decode()}
    cfg = parsed({"auth-type": "basic", "auth-secret": "m", "auth-secret-type": "auth-map"},
                 secret("m", {"foo": h}))
    assert cfg.basic_auth.users == {"foo": h.decode()}
    for ann, why in [({"auth-secret": "something"}, "not found"),
                     ({"auth-secret": "other/basic"}, "other namespaces"),
                     ({"auth-type": "digest", "auth-secret": "basic"}, "digest"),
                     ({"auth-secret": "basic", "auth-secret-type": "x"}, "auth-file or auth-map")]:
        cfg = parsed({"auth-type": "basic", **ann}, secret("basic", {"auth": b"foo:" + h}))
        assert why in cfg.denied, (ann, cfg.denied)


def test_basic_auth_filter():
    f = nf.BasicAuth("test auth", {"foo": "{PLAIN}bar"})
    import base64
    ok = FakeExchange(headers=[("Authorization", "Basic " + base64.b64encode(b"foo:bar").decode())])
    f.on_request(ok)
    assert ok.answered is None and ok.added == [(b"authorization", None, True)]
    for creds in (b"foo:baz", b"user:pass", b"foo"):
        bad = FakeExchange(headers=[("Authorization", "Basic " + base64.b64encode(creds).decode())])
        f.on_request(bad)
        assert bad.answered == (401, b"401 Authorization Required\n",
                                [(b"WWW-Authenticate", b'Basic realm="test auth"')])
    none = FakeExchange()
    f.on_request(none)
    assert none.answered[0] == 401


# -- affinity ----------------------------------------------------------------------------------------------

def test_affinity_cookie_and_key(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    key = ("default", "web", "80")
    f = nf.CookieAffinity("SERVERID", {key: "bk"}, "/something", "foo.bar", 172800, "259200", False, "Lax")
    ex = FakeExchange(action=Action(backends=(BackendRef(key),)))
    f.on_request(ex)
    assert ex.pick_key is not None
    (name, value), = f.on_response(ex, 200, [])
    assert name == b"Set-Cookie" and value == (
        b"SERVERID=" + ex.pick_key + b"|bk; Expires=Tue, 11-Sep-01 01:46:40 GMT; Max-Age=259200; Domain=foo.bar; "
        b"Path=/something; HttpOnly; SameSite=Lax")
    again = FakeExchange(headers=[("Cookie", "SERVERID=abc|bk")], action=ex.action, tls=True)
    f.on_request(again)
    assert again.pick_key == b"abc" and f.on_response(again, 200, []) == []
    g = nf.CookieAffinity("S", {key: "bk"}, "/")
    tls = FakeExchange(action=ex.action, tls=True)
    g.on_request(tls)
    assert b"; Secure; HttpOnly" in g.on_response(tls, 200, [])[0][1]
    assert backend_key("default-web-80") == __import__("hashlib").md5(
        (__import__("hashlib").md5(b"default-web-80").hexdigest() + "default-web-80").encode()).hexdigest()


# -- the route table ----------------------------------------------------------------------------------------

SVCS = (service("service1", [("127.0.10.1", 8080)]), service("service2", [("127.0.10.2", 8080)]),
        service("service3", [("127.0.10.3", 8080)]), service("test", [("127.0.10.4", 8080)]))


def table(*ingresses: str):
    snap = snapshot_for(manifests(*SVCS, *ingresses), Settings(health_checks=False))
    return snap


def target(snap, host: str, path: str):
    """(service, the filters' class names) the request goes to, or None for no route."""
    r = snap.routes.match(host, normalize_request_path(path))
    if r is None:
        return None
    b = r.action.backends
    svc = b[0].key[1] if b and b[0].key else None
    return svc, tuple(type(f).__name__ for f in r.action.filters if type(f).__name__ not in ("BodyLimit",))


def test_path_priority_example_of_the_documentation():
    snap = table(
        ingress("test-ingress-1", "test.com", None, "", paths=[("/foo/bar", "Prefix", "service1"),
                                                             ("/foo/bar/", "Prefix", "service2")],
                created="2024-01-01T00:00:00Z"),
        ingress("test-ingress-2", "test.com", "/foo/bar/(.+)", "service3", {"rewrite-target": "/$1"},
                ptype="ImplementationSpecific", created="2024-01-02T00:00:00Z"))
    assert target(snap, "test.com", "/foo/bar/1")[0] == "service3"
    assert target(snap, "test.com", "/foo/bar/")[0] == "service2"
    assert target(snap, "test.com", "/foo/bar")[0] == "service1"
    assert target(snap, "test.com", "/FOO/BAR")[0] == "service1"        # case-insensitive
    assert target(snap, "test.com", "/foo/barbaz")[0] == "service1"     # a prefix of characters, not of segments
    assert target(snap, "test.com", "/other") == (None, ("NotFound",))  # the host's own default backend


def test_regex_first_match_warning_of_the_documentation():
    snap = table(ingress("test-ingress-3", "test.com", None, "", {"use-regex": "true"},
                         paths=[("/foo/bar/bar", "Prefix", "service1"),
                                ("/foo/bar/[A-Z0-9]{3}", "ImplementationSpecific", "service2")]))
    assert target(snap, "test.com", "/foo/bar/bar")[0] == "service2"


def test_rewrite_target_turns_regex_on_for_the_whole_host():
    # e2e rewrite "should use correct longest path match"
    snap = table(ingress("kube-lego", "rewrite.bar.com", "/.well-known/acme/challenge", "service1"),
                 ingress("rewrite-index", "rewrite.bar.com", "/", "service2", {"rewrite-target": "/new/backend"}))
    assert target(snap, "rewrite.bar.com", "/.well-known/acme/challenge")[0] == "service1"
    assert target(snap, "rewrite.bar.com", "/.WELL-known/acme/challenge/x")[0] == "service1"
    assert target(snap, "rewrite.bar.com", "/anything")[0] == "service2"
    # the same two without the rewrite: Prefix semantics, case-sensitive
    snap = table(ingress("kube-lego", "rewrite.bar.com", "/.well-known/acme/challenge", "service1"),
                 ingress("rewrite-index", "rewrite.bar.com", "/", "service2"))
    assert target(snap, "rewrite.bar.com", "/.WELL-known/acme/challenge")[0] == "service2"


def test_use_regex_on_one_ingress_applies_to_other_ingresses_of_the_host():
    # e2e rewrite "should use ~* location modifier if regex annotation is present"
    snap = table(ingress("foo", "rewrite.bar.com", "/foo", "service1"),
                 ingress("regex", "rewrite.bar.com", "/foo.+", "service2",
                         {"use-regex": "true", "rewrite-target": "/new/backend"}))
    assert target(snap, "rewrite.bar.com", "/foo")[0] == "service1"
    assert target(snap, "rewrite.bar.com", "/foo/bar")[0] == "service2"
    assert target(snap, "rewrite.bar.com", "/Foo")[0] == "service1"
    # other hosts keep their ordinary matching
    snap = table(ingress("foo", "other.com", "/foo", "service1"),
                 ingress("regex", "rewrite.bar.com", "/foo.+", "service2", {"use-regex": "true"}))
    assert target(snap, "other.com", "/Foo") == (None, ("NotFound",))


def test_rewrite_target_equal_to_the_path_is_no_rewrite():
    snap = table(ingress("a", "x.com", "/foo", "service1", {"rewrite-target": "/foo"}))
    r = snap.routes.match("x.com", "/foo/bar")
    assert r.path_kind == "Prefix" and r.action.rewrite is None


def test_prefix_and_exact_of_the_same_path():
    # updateServerLocations: with an Exact location of the same path a Prefix one is "PATH/" only
    snap = table(ingress("p", "x.com", "/foo", "service1", created="2024-01-01T00:00:00Z"),
                 ingress("e", "x.com", "/foo", "service2", ptype="Exact", created="2024-01-02T00:00:00Z"),
                 ingress("r", "x.com", "/z.*", "service3", {"use-regex": "true"}))
    assert target(snap, "x.com", "/foo/x")[0] == "service1"
    assert target(snap, "x.com", "/foo")[0] == "service2"
    assert target(snap, "x.com", "/foox")[0] == "service2"
    # Both with regex of their own: the same expression twice, the older Ingress's wins.
    snap = table(ingress("p", "x.com", "/foo", "service1", {"use-regex": "true"}, created="2024-01-01T00:00:00Z"),
                 ingress("e", "x.com", "/foo", "service2", ptype="Exact", created="2024-01-02T00:00:00Z"))
    assert target(snap, "x.com", "/foo/x")[0] == "service1" and target(snap, "x.com", "/foo")[0] == "service1"


def test_exact_prefix_and_catch_all_without_regex():
    # e2e pathtype_mixed / pathtype_prefix
    snap = table(ingress("er", "mixed.path", "/", "service1", ptype="Exact"),
                 ingress("pr", "mixed.path", "/", "service2"),
                 ingress("ef", "mixed.path", "/foo", "service3", ptype="Exact"),
                 ingress("pf", "mixed.path", "/foo", "test"))
    assert [target(snap, "mixed.path", p)[0] for p in ("/", "/bar", "/foo", "/foo/bar", "/foobar")] == \
        ["service1", "service2", "service3", "test", "service2"]
    snap = table(ingress("exact", "prefix.path", "/aaa", "service1"))
    assert [target(snap, "prefix.path", p)[0] for p in ("/aaa", "/aaa/", "/aaa/cccc", "/aaacccc")] == \
        ["service1", "service1", "service1", None]


@pytest.mark.parametrize("path,ok,nok", [
    ("/id/[0-9]+", ["/id/1", "/id/123", "/id/123a"], ["/id/aaa"]),
    ("/id/[0-9]+$", ["/id/1"], ["/id/aaa", "/id/123a"]),
    ("/id/[0-9]{3}$", ["/id/123"], ["/id/99", "/id/9999", "/id/123a"]),
    ("/id/[0-9]+/post/[a-zA-Z]+$", ["/id/123/post/abc"], ["/id/123/post/abc123", "/id/abc/post/abc"]),
])
def test_regex_paths_match_from_the_start(path, ok, nok):
    snap = table(ingress("r", "prefix.path", path, "service1", {"use-regex": "true"}))
    for p in ok:
        assert target(snap, "prefix.path", p)[0] == "service1", p
    for p in nok:
        assert target(snap, "prefix.path", p)[0] is None, p


def test_a_host_does_not_fall_through_to_rules_without_host():
    snap = table(ingress("h", "a.com", "/app", "service1"), ingress("catch", None, "/", "service2"))
    assert target(snap, "a.com", "/other") == (None, ("NotFound",))
    assert target(snap, "b.com", "/other")[0] == "service2"


def test_app_root_and_server_alias():
    snap = table(ingress("a", "approot.bar.com", "/app", "service1", {"app-root": "/foo",
                                                                      "server-alias": "bar, a2.com"}),
                 ingress("b", "approot.bar.com", "/other", "service2"),
                 ingress("c", "a2.com", "/", "service3"))
    assert target(snap, "approot.bar.com", "/") == (None, ("AppRoot",))
    assert target(snap, "approot.bar.com", "/app")[0] == "service1"
    assert target(snap, "bar", "/other")[0] == "service2"               # the whole host, all its Ingresses
    assert target(snap, "bar", "/") == (None, ("AppRoot",))
    assert target(snap, "a2.com", "/app")[0] == "service3"             # an alias that is a host of its own
    assert any("server-alias 'a2.com'" in p for p in snap.problems)


def test_canary_ingress_merges_into_the_main_backend():
    snap = table(ingress("main", "foo", "/info", "service1"),
                 ingress("other", "bar", "/", "service1"),
                 ingress("canary", "foo", "/info", "service2", {"canary": "true", "canary-by-header": "X"}))
    assert target(snap, "foo", "/info") == ("service1", ("Canary",))
    assert target(snap, "bar", "/x") == ("service1", ("Canary",))   # same backend: same alternative
    alone = table(ingress("canary", "foo", "/info", "service2", {"canary": "true", "canary-by-header": "X"}))
    assert target(alone, "foo", "/info") == (None, ("NotFound",))      # the default server
    assert any("canary: no main Ingress" in p for p in alone.problems)


def test_refused_ingress_leaves_the_rest_of_the_host_serving():
    snap = table(ingress("good", "a.com", "/good", "service1"),
                 ingress("bad", "a.com", "/bad", "service2", {"server-snippet": "return 200;"}))
    assert target(snap, "a.com", "/good")[0] == "service1"
    assert target(snap, "a.com", "/bad") == (None, ("NotFound",))
    assert "default/bad" not in snap.ingresses
    assert any(p.startswith("Ingress/default/bad: metadata.annotations[nginx.ingress.kubernetes.io/server-snippet]")
               for p in snap.problems)


def test_chain_order_follows_nginx_phases():
    extra = secret("basic", {"auth": b"foo:{PLAIN}bar"})
    snap = snapshot_for(manifests(*SVCS, extra, ingress("all", "a.com", "/", "service1", {
        "enable-cors": "true", "permanent-redirect": "https://x.org", "force-ssl-redirect": "true",
        "limit-connections": "1", "limit-rps": "1", "limit-rpm": "1", "whitelist-source-range": "10.0.0.0/8",
        "auth-type": "basic", "auth-secret": "basic", "auth-url": "http://auth/", "default-backend": "service2",
        "affinity": "cookie"}), ingress("c", "a.com", "/", "service3", {"canary": "true", "canary-weight": "5"})),
        Settings(health_checks=False))
    r = snap.routes.match("a.com", "/")
    assert [type(f).__name__ for f in r.action.filters] == [
        "BodyLimit", "Cors", "Redirect", "SslRedirect", "LimitConnections", "LimitRequests", "LimitRequests",
        "IpAccess", "BasicAuth", "ExternalAuth", "DefaultBackend", "Canary", "CookieAffinity"]
    assert r.action.connect_timeout == 5.0 and r.action.timeout == 60.0 and r.action.attempts == 3
    assert r.action.retry_on == frozenset() and r.action.per_try_timeout == 60.0


def test_next_upstream_and_backend_protocol():
    snap = table(ingress("a", "a.com", "/", "service1", {"proxy-next-upstream": "error http_502 http_503",
                                                          "proxy-next-upstream-tries": "5",
                                                          "backend-protocol": "HTTPS"}),
                 ingress("b", "b.com", "/", "service2", {"proxy-next-upstream": "off"}))
    a = snap.routes.match("a.com", "/").action
    assert (a.attempts, a.retry_on, a.per_try_timeout) == (5, frozenset((502, 503)), None)
    assert snap.routes.match("b.com", "/").action.attempts == 1
    assert snap.upstream_tls == frozenset({("default", "service1", "http")})
