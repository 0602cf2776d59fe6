"""The per-request behaviour of ingress-nginx's annotations, as extension filters of the route model.

Each class is an extension filter (``Action.filters``, run by ``l7.exchange``): immutable, built
once per snapshot by ``meshproxy.core.nginx_ingress``, with ``on_request(exchange)`` and, when
it changes responses, ``on_response(exchange, status, fields)``. They only use the exchange's
filter interface (``answer``, ``add_request_header``, ``use_action``, ``pick_key``,
``body_limit``, ``on_end``, ``filter_data``, ``HOLD`` / ``proceed``) and the services of its
context (``filter_state``, ``now``, ``subrequest``, ``offload``, ``trusted``, ``tls_port``).

A route's chain follows nginx's request phases, so that the first one to answer is the one
ingress-nginx would have answered with: body size (checked when the location is found), CORS
preflight, ``return`` redirects, the HTTPS redirect (rewrite phase), connection and request
limits (preaccess), allow / deny lists, basic then external authentication (access), then the
choice of backend (canary, default backend, cookie affinity). A filter's response headers are
also added to answers of the filters after it (a 401 carries the CORS headers, as nginx's
``more_set_headers`` does).

State that must outlive a snapshot (request rates and connection counts per client address,
checked passwords) lives in ``exchange.ctx.filter_state`` under keys derived from the Ingress,
so a configuration change does not reset a client's limits.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlsplit

from .htpasswd import expensive, verify
from .routes import HeaderEdits

__all__ = [
    "AppRoot", "BasicAuth", "BodyLimit", "Canary", "CookieAffinity", "Cors", "DefaultBackend",
    "Denied", "ErrorPage", "ExternalAuth", "Hsts", "IpAccess", "LimitConnections", "LimitRequests",
    "NotFound", "Redirect", "SslRedirect", "client_ip", "cookie_value", "expand",
]

_AUTH_COOKIE_STATUSES = frozenset((200, 201, 204, 206, 301, 302, 303, 304, 307, 308))
# Bounds on per-client state: nginx's zones are 5 MB shared memory; entries that no longer
# matter (a full bucket, no open request) are dropped first when a table reaches this size.
_MAX_CLIENTS = 100_000
_PASSWORD_CACHE = 4096


def _header(head, name: bytes) -> bytes | None:
    """The first field ``name`` (lower-case) of a request head."""
    for n, v in head.headers:
        if len(n) == len(name) and n.lower() == name:
            return v
    return None


def cookie_value(head, name: str) -> str | None:
    """The value of cookie ``name`` (nginx's ``$cookie_NAME``: names compared without case)."""
    want = name.lower()
    for n, v in head.headers:
        if n.lower() == b"cookie":
            for part in v.decode("latin-1").split(";"):
                k, eq, val = part.strip().partition("=")
                if eq and k.lower() == want:
                    return val
    return None


def client_ip(exchange) -> str:
    """The client address as nginx's realip module finds it: the peer, or - when the peer is a
    trusted proxy (``--trusted-proxies``, ingress-nginx's use-forwarded-headers) - the last
    X-Forwarded-For entry from the right that is not itself trusted."""
    ip = exchange.down.peer_ip
    trusted = exchange.ctx.trusted
    if not trusted or not exchange.down.client.trusted:
        return ip
    xff = _header(exchange.head, b"x-forwarded-for")
    if not xff:
        return ip
    hops = [h.strip() for h in xff.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted.contains(hop):
            return hop
    return hops[0] if hops else ip


def _in(nets: tuple, ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in n for n in nets)


def _https(exchange) -> bool:
    """The client spoke HTTPS (to us, or to a trusted proxy that says so)."""
    if exchange.down.tls:
        return True
    if exchange.down.client.trusted:
        proto = _header(exchange.head, b"x-forwarded-proto")
        return proto is not None and proto.strip().lower() == b"https"
    return False


def _request_uri(head) -> str:
    return head.path.decode("latin-1") + ("?" + head.query.decode("latin-1") if head.query else "")


def expand(template: str, exchange) -> str:
    """nginx variables of an annotation value, for one request: $host, $http_host,
    $best_http_host, $scheme, $pass_access_scheme, $request_uri, $escaped_request_uri, $uri,
    $args, $remote_addr. (An annotation with any other variable is denied when compiled.)"""
    if "$" not in template:
        return template
    head = exchange.head
    http_host = head.host.decode("latin-1")
    host = http_host.rpartition(":")[0] if ":" in http_host and not http_host.endswith("]") else http_host
    uri = _request_uri(head)
    values = {
        "host": host, "http_host": http_host, "best_http_host": http_host,
        "scheme": "https" if exchange.down.tls else "http", "pass_access_scheme": "https" if _https(exchange) else "http",
        "request_uri": uri, "escaped_request_uri": quote(uri, safe="-_.~"),
        "uri": head.path.decode("latin-1"), "args": head.query.decode("latin-1"), "remote_addr": client_ip(exchange),
    }
    out = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "$":
            j = i + 1
            while j < len(template) and (template[j].isalnum() or template[j] == "_"):
                j += 1
            name = template[i + 1:j]
            # The longest known variable that the name starts with ($hostfoo is $host then "foo"
            # in nginx only with braces; here names are taken whole, as nginx does).
            out.append(values.get(name, "$" + name))
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


VARIABLES = frozenset(("host", "http_host", "best_http_host", "scheme", "pass_access_scheme", "request_uri",
                       "escaped_request_uri", "uri", "args", "remote_addr"))


# --------------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Denied:
    """ingress-nginx's "location denied": the path exists but answers 503 (``reason`` is for
    the operator, in problems and logs, not for the client)."""

    reason: str

    def on_request(self, exchange) -> None:
        exchange.answer(503, b"503 Service Temporarily Unavailable\n")


@dataclass(frozen=True, slots=True)
class NotFound:
    """A host's own catch-all (nginx's root location to the default backend): a path of a known
    host that no rule matches is answered here, not by the rules of other hosts; also the
    default server's answer to a host no rule names. The body carries nginx's title."""

    def on_request(self, exchange) -> None:
        exchange.answer(404, b"404 Not Found\n")


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """proxy-body-size: 413 for a declared Content-Length above the limit (nginx checks when
    the location is found, before anything else); a chunked body is counted as it streams."""

    limit: int

    def on_request(self, exchange) -> None:
        cl = exchange.head.content_length
        # req_bytes: a body read before the filters ran (--request-buffer-size).
        if (cl is not None and cl > self.limit) or exchange.req_bytes > self.limit:
            exchange.answer(413, b"413 Request Entity Too Large\n")
            return
        exchange.body_limit = self.limit


@dataclass(frozen=True, slots=True)
class Redirect:
    """permanent-redirect / temporal-redirect: ``return CODE URL`` for every request."""

    status: int
    url: str

    def on_request(self, exchange) -> None:
        exchange.answer(self.status, b"", ((b"Location", self.url.encode("latin-1", "replace")),))


@dataclass(frozen=True, slots=True)
class AppRoot:
    """app-root: ``/`` answers 302 to ``$scheme://$http_host<app-root>`` (the Host as sent, port
    included; the query string is not kept). Put on a host's Exact "/" route."""

    path: str

    def on_request(self, exchange) -> None:
        scheme = b"https" if exchange.down.tls else b"http"
        exchange.answer(302, b"", ((b"Location", scheme + b"://" + exchange.head.host + self.path.encode()),))


def _has_cert(cert_hosts: frozenset[str], host: str) -> bool:
    if host in cert_hosts:
        return True
    dot = host.find(".")
    return dot > 0 and "*" + host[dot:] in cert_hosts


def _bare_host(http_host: str) -> str:
    return http_host.rpartition(":")[0] if ":" in http_host and not http_host.endswith("]") else http_host


@dataclass(frozen=True, slots=True)
class Hsts:
    """ingress-nginx's default HSTS: an HTTPS response for a host with a certificate from some
    Ingress carries ``Strict-Transport-Security: max-age=31536000; includeSubDomains`` (the
    pod's own field replaced). First in a chain, so meshproxy's own answers carry it too."""

    cert_hosts: frozenset[str]
    value: bytes = b"max-age=31536000; includeSubDomains"

    def on_request(self, exchange) -> None:
        pass

    def on_response(self, exchange, status: int, fields: list) -> list:
        if not exchange.down.tls:
            return fields
        host = _bare_host(exchange.head.host.decode("latin-1")).rstrip(".")
        if not _has_cert(self.cert_hosts, host):
            return fields
        return [f for f in fields if f[0].lower() != b"strict-transport-security"] + \
            [(b"Strict-Transport-Security", self.value)]


@dataclass(frozen=True, slots=True)
class SslRedirect:
    """ssl-redirect / force-ssl-redirect: a plain-HTTP request is answered 308 to
    ``https://HOST<request-uri>`` - HOST without its port, the request URI without a trailing
    "/" unless preserve-trailing-slash - when forced, or when the request's host has a TLS
    certificate from some Ingress (``cert_hosts``: exact names and "*." wildcards). From a
    trusted proxy, the first X-Forwarded-Host names the host (ingress-nginx's
    use-forwarded-headers)."""

    force: bool
    cert_hosts: frozenset[str]
    preserve_trailing_slash: bool = False
    use_port: bool = False

    def on_request(self, exchange) -> None:
        if _https(exchange):
            return
        head = exchange.head
        host = _bare_host(head.host.decode("latin-1"))
        if not self.force and not _has_cert(self.cert_hosts, host.lower().rstrip(".")):
            return
        if exchange.down.client.trusted:
            forwarded = _header(head, b"x-forwarded-host")
            if forwarded:
                host = _bare_host(forwarded.decode("latin-1").split(",")[0].strip())
        uri = _request_uri(head)
        if not self.preserve_trailing_slash and uri.endswith("/"):
            uri = uri[:-1]
        port = ""
        if self.use_port:
            tls_port = exchange.ctx.tls_port or 443
            port = "" if tls_port == 443 else f":{tls_port}"
        exchange.answer(308, b"", ((b"Location", f"https://{host}{port}{uri}".encode("latin-1", "replace")),))


# --------------------------------------------------------------------------------------------
# CORS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Cors:
    """enable-cors and cors-*: the template's rules. An allowed Origin (any with "*") gets the
    Access-Control-* fields on every response of the location (replacing the pod's own); an
    allowed OPTIONS request is answered 204 here. A refused Origin gets no CORS field at all
    and is forwarded like any request."""

    origin_regex: Any          # None: "*"
    methods: bytes
    headers: bytes
    expose: bytes
    credentials: bool
    max_age: int

    def _fields(self, exchange) -> list[tuple[bytes, bytes]] | None:
        if self.origin_regex is None:
            origin = b"*"
        else:
            origin = _header(exchange.head, b"origin")
            if not origin or self.origin_regex.search(origin.decode("latin-1")) is None:
                return None
        out = [(b"Access-Control-Allow-Origin", origin)]
        if self.credentials:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        out.append((b"Access-Control-Allow-Methods", self.methods))
        out.append((b"Access-Control-Allow-Headers", self.headers))
        if self.expose:
            out.append((b"Access-Control-Expose-Headers", self.expose))
        out.append((b"Access-Control-Max-Age", b"%d" % self.max_age))
        return out

    def on_request(self, exchange) -> None:
        fields = self._fields(exchange)
        if fields is None:
            return
        exchange.filter_data[self] = fields
        if exchange.method == b"OPTIONS":
            exchange.answer(204, b"", fields)

    def on_response(self, exchange, status: int, fields: list) -> list:
        ours = exchange.filter_data.get(self) if exchange.filter_data else None
        if not ours:
            return fields
        names = {n.lower() for n, _ in ours}
        return [f for f in fields if f[0].lower() not in names] + ours


# --------------------------------------------------------------------------------------------
# access
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IpAccess:
    """denylist-source-range then whitelist-source-range (nginx's deny / allow / deny all): 403."""

    allow: tuple = ()
    deny: tuple = ()

    def on_request(self, exchange) -> None:
        ip = client_ip(exchange)
        if (self.deny and _in(self.deny, ip)) or (self.allow and not _in(self.allow, ip)):
            exchange.answer(403, b"403 Forbidden\n")


def _table(exchange, key) -> dict:
    state = exchange.ctx.filter_state
    t = state.get(key)
    if t is None:
        t = state[key] = {}
    return t


@dataclass(frozen=True, slots=True)
class LimitConnections:
    """limit-connections: at most ``limit`` requests in progress per client address (nginx's
    limit_conn counts a connection while it has a request being processed); 503 beyond."""

    key: str
    limit: int
    exempt: tuple = ()
    status: int = 503

    def on_request(self, exchange) -> None:
        ip = client_ip(exchange)
        if self.exempt and _in(self.exempt, ip):
            return
        counts = _table(exchange, ("limit-connections", self.key))
        n = counts.get(ip, 0)
        if n >= self.limit:
            exchange.answer(self.status, b"503 Service Temporarily Unavailable\n")
            return
        counts[ip] = n + 1

        def release() -> None:
            left = counts.get(ip, 1) - 1
            if left > 0:
                counts[ip] = left
            else:
                counts.pop(ip, None)
        exchange.on_end(release)


@dataclass(frozen=True, slots=True)
class LimitRequests:
    """limit-rps / limit-rpm: nginx's limit_req with ``burst`` and ``nodelay``, per client
    address. The arithmetic is nginx's (ngx_http_limit_req_module): in thousandths of a
    request, ``excess = max(0, excess - rate * elapsed_ms / 1000 + 1000)``; a request whose
    excess would pass ``burst * 1000`` is refused (503) and changes nothing."""

    key: str
    rate: int                 # thousandths of a request per second (nginx's ctx->rate)
    burst: int                # requests
    exempt: tuple = ()
    status: int = 503

    def on_request(self, exchange) -> None:
        ip = client_ip(exchange)
        if self.exempt and _in(self.exempt, ip):
            return
        table = _table(exchange, ("limit-requests", self.key))
        now = int(exchange.ctx.now() * 1000)
        node = table.get(ip)
        if node is None:
            if len(table) >= _MAX_CLIENTS:
                _sweep(table, now, self.rate)
            table[ip] = [0, now]
            return
        ms = now - node[1]
        if ms < -60000:
            ms = 1
        elif ms < 0:
            ms = 0
        excess = node[0] - self.rate * ms // 1000 + 1000
        if excess < 0:
            excess = 0
        if excess > self.burst * 1000:
            exchange.answer(self.status, b"503 Service Temporarily Unavailable\n")
            return
        node[0] = excess
        node[1] = now


def _sweep(table: dict, now: int, rate: int) -> None:
    """Drop clients whose bucket has drained (they would start from zero anyway)."""
    for ip in [ip for ip, (excess, last) in table.items() if excess - rate * (now - last) // 1000 <= 0]:
        del table[ip]
    if len(table) >= _MAX_CLIENTS:
        table.clear()


@dataclass(frozen=True, slots=True, eq=False)
class BasicAuth:
    """auth-type basic: the htpasswd entries of the Secret. 401 with ``WWW-Authenticate: Basic
    realm=...`` unless the credentials match; the Authorization field is not forwarded (nginx
    clears it). Slow hashes (bcrypt) are checked in a thread, and a matching password is
    remembered by its digest so a client's next requests cost a dict probe."""

    realm: str
    users: Any                # user -> hash

    def on_request(self, exchange):
        auth = _header(exchange.head, b"authorization")
        user = password = None
        if auth is not None and auth[:6].lower() == b"basic ":
            try:
                user_b, sep, password = base64.b64decode(auth[6:].strip(), validate=True).partition(b":")
                user = user_b.decode("utf-8") if sep else None
            except (ValueError, UnicodeDecodeError):
                user = None
        hashed = self.users.get(user) if user is not None else None
        if hashed is None:
            return self._deny(exchange)
        cache = _table(exchange, "htpasswd")
        digest = hashlib.sha256(b"\0".join((user.encode(), password, hashed.encode()))).digest()
        if digest in cache:
            return self._allow(exchange)
        if not expensive(hashed):
            return self._allow(exchange, cache, digest) if verify(password, hashed) else self._deny(exchange)

        def done(ok: bool | None, _exc: BaseException | None = None) -> None:
            if ok:
                self._allow(exchange, cache, digest)
                exchange.proceed()
            else:
                self._deny(exchange)
        exchange.ctx.offload(verify, (password, hashed), done)
        return exchange.HOLD

    def _allow(self, exchange, cache: dict | None = None, digest: bytes = b"") -> None:
        if cache is not None:
            if len(cache) >= _PASSWORD_CACHE:
                cache.clear()
            cache[digest] = True
        exchange.add_request_header(b"authorization", None, replace=True)

    def _deny(self, exchange) -> None:
        realm = self.realm.replace("\\", "\\\\").replace('"', '\\"').encode("latin-1", "replace")
        exchange.answer(401, b"401 Authorization Required\n", ((b"WWW-Authenticate", b'Basic realm="' + realm + b'"'),))


# Fields of the client request not sent to the auth service (hop-by-hop, the body's framing:
# the subrequest has no body) and those the proxy sets itself.
_AUTH_DROP = frozenset((b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                        b"proxy-connection", b"content-length", b"expect", b"host", b"x-forwarded-proto",
                        b"x-original-url", b"x-original-method", b"x-sent-from", b"x-real-ip", b"x-forwarded-for",
                        b"x-auth-request-redirect", b"x-request-id", b"proxy"))


@dataclass(frozen=True, slots=True, eq=False)
class ExternalAuth:
    """auth-url (nginx's auth_request): a GET (or auth-method) to the auth service with the
    client's header fields and no body. 2xx lets the request through, with the
    auth-response-headers copied from the answer (replacing the client's fields of those
    names); 401 is answered 401 - or, with auth-signin, 302 to the sign-in URL with
    ``rd=<the original URL>``; 403 is answered 403; anything else, or no answer, 500. A
    Set-Cookie of the auth service goes to the client on success responses (always, with
    auth-always-set-cookie)."""

    url: str
    method: bytes = b"GET"
    signin: str = ""
    signin_param: str = "rd"
    response_headers: tuple[bytes, ...] = ()
    request_redirect: str = ""
    always_set_cookie: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 60.0

    def on_request(self, exchange):
        head = exchange.head
        url = expand(self.url, exchange)
        parts = urlsplit(url)
        fields = [(n, v) for n, v in head.headers if n.lower() not in _AUTH_DROP]
        scheme = b"https" if exchange.down.tls else b"http"
        uri = _request_uri(head).encode("latin-1")
        ip = client_ip(exchange).encode()
        fields += [
            (b"Host", (parts.netloc or "").encode("latin-1")),
            (b"X-Original-URL", scheme + b"://" + head.host + uri),
            (b"X-Original-Method", exchange.method),
            (b"X-Sent-From", b"nginx-ingress-controller"),
            (b"X-Real-IP", ip), (b"X-Forwarded-For", ip),
            (b"X-Auth-Request-Redirect", expand(self.request_redirect, exchange).encode("latin-1")
             if self.request_redirect else uri),
            (b"X-Request-ID", exchange.request_id),
        ]

        def done(status: int | None, rfields: list | None, _error: str = "") -> None:
            if exchange.finished:
                return
            self._decide(exchange, status, rfields or [])
        exchange.ctx.subrequest(url, self.method, fields, self.connect_timeout, self.read_timeout, done)
        return exchange.HOLD

    def _decide(self, exchange, status: int | None, rfields: list) -> None:
        def first(name: bytes) -> bytes | None:
            for n, v in rfields:
                if n.lower() == name:
                    return v
            return None
        cookie = first(b"set-cookie")
        if cookie is not None:
            exchange.filter_data[self] = cookie
        if status is not None and 200 <= status < 300:
            for name in self.response_headers:
                exchange.add_request_header(name, first(name), replace=True)
            exchange.proceed()
            return
        if status == 401:
            if self.signin:
                target = expand(self.signin, exchange)
                if f"{self.signin_param}=" not in urlsplit(target).query:
                    back = expand("$pass_access_scheme://$http_host$escaped_request_uri", exchange)
                    target += ("&" if urlsplit(target).query else "?") + f"{self.signin_param}={back}"
                extra = [(b"Location", target.encode("latin-1", "replace"))]
                if cookie is not None:
                    extra.append((b"Set-Cookie", cookie))
                exchange.answer(302, b"", extra)
                return
            challenge = first(b"www-authenticate")
            exchange.answer(401, b"401 Authorization Required\n",
                            ((b"WWW-Authenticate", challenge),) if challenge else ())
            return
        if status == 403:
            exchange.answer(403, b"403 Forbidden\n")
            return
        exchange.answer(500, b"500 Internal Server Error\n")

    def on_response(self, exchange, status: int, fields: list) -> list:
        cookie = exchange.filter_data.get(self) if exchange.filter_data else None
        if cookie is not None and (self.always_set_cookie or status in _AUTH_COOKIE_STATUSES):
            fields = fields + [(b"Set-Cookie", cookie)]
        return fields


# --------------------------------------------------------------------------------------------
# the backend: canary, default backend, affinity, error pages
# --------------------------------------------------------------------------------------------


def _affinity_parts(exchange, cookie: str) -> tuple[str, str] | None:
    raw = cookie_value(exchange.head, cookie)
    if not raw:
        return None
    key, _, backend = raw.partition("|")
    return key, backend


def _derived(cache: list, action, make):
    """``make(action)``, computed once per route action (a filter cannot hold an action that
    holds the filter itself, so the variant is made on first use and kept)."""
    if cache and cache[0][0] is action:
        return cache[0][1]
    derived = make(action)
    cache[:] = [(action, derived)]
    return derived


@dataclass(frozen=True, slots=True, eq=False)
class Canary:
    """The canary Ingress of this route's backend (balancer.lua's route_to_alternative_balancer):
    a client pinned by the affinity cookie stays where it is pinned; then the header
    (``always`` / ``never``, or the given value, or the pattern), then the cookie (``always`` /
    ``never``), then the weight out of max(total, 100) decide. The canary gets the request with
    this route's action and the canary's backend ``ref``."""

    ref: Any
    main: Any                   # the route's backend key: no canary once another filter moved it
    header: bytes = b""
    header_value: bytes = b""
    pattern: Any = None
    pattern_invalid: bool = False
    cookie: str = ""
    weight: int = 0
    weight_total: int = 100
    affinity_cookie: str = ""
    primary_key: str = ""       # affinity backend key of the main backend ("" without affinity)
    canary_key: str = ""        # ... of the canary backend ("" when not sticky)
    _cache: list = field(default_factory=list, repr=False)

    def _to_canary(self, exchange) -> bool:
        if self.affinity_cookie:
            parts = _affinity_parts(exchange, self.affinity_cookie)
            if parts is not None:
                if self.primary_key and parts[1] == self.primary_key:
                    return False
                if self.canary_key and parts[1] == self.canary_key:
                    return True
        if self.header:
            value = _header(exchange.head, self.header)
            if value is not None:
                if self.header_value:
                    if value == self.header_value:
                        return True
                elif self.pattern is not None or self.pattern_invalid:
                    if self.pattern_invalid:
                        return False
                    if self.pattern.search(value.decode("latin-1")) is not None:
                        return True
                elif value == b"always":
                    return True
                elif value == b"never":
                    return False
        if self.cookie:
            value = cookie_value(exchange.head, self.cookie)
            if value == "always":
                return True
            if value == "never":
                return False
        total = self.weight_total if self.weight_total > 100 else 100
        return random.randint(1, total) <= self.weight

    def on_request(self, exchange) -> None:
        action = exchange.action
        if not action.backends or action.backends[0].key != self.main:
            return
        if self._to_canary(exchange):
            exchange.use_action(_derived(self._cache, action, lambda a: replace(a, backends=(self.ref,))))


@dataclass(frozen=True, slots=True, eq=False)
class DefaultBackend:
    """default-backend: when this route's Service has no endpoint that can take the request
    (or does not exist), the annotation's Service (``ref``) answers instead, told why by X-Code:
    503 and the X-Namespace / X-Ingress-Name / X-Service-Name / X-Service-Port (``fields``) and
    X-Format fields."""

    main: Any                   # backend key (namespace, service, port) or None (missing Service)
    ref: Any
    fields: tuple = ()
    _cache: list = field(default_factory=list, repr=False)

    def _make(self, action):
        edits = action.request_headers
        return replace(action, backends=(self.ref,),
                       request_headers=HeaderEdits(set=self.fields + (edits.set if edits else ()),
                                                   add=edits.add if edits else (), remove=edits.remove if edits else ()))

    def on_request(self, exchange) -> None:
        key = self.main
        backend = exchange.snap.backends.get(key) if key is not None else None
        if backend is None or not backend.usable:
            exchange.use_action(_derived(self._cache, exchange.action, self._make))
            accept = _header(exchange.head, b"accept")
            exchange.add_request_header(b"X-Format", accept or b"")


@dataclass(frozen=True, slots=True)
class ErrorPage:
    """The request sent to the error backend for custom-http-errors (the action holding it
    rewrites the path to "/" and sets X-Code and the other static fields): X-Format from
    Accept and X-Original-URI, as ingress-nginx's @custom_ locations send them."""

    def on_request(self, exchange) -> None:
        exchange.add_request_header(b"X-Format", _header(exchange.head, b"accept") or b"")
        exchange.add_request_header(b"X-Original-URI", exchange.head.target)


@dataclass(frozen=True, slots=True, eq=False)
class CookieAffinity:
    """affinity: cookie (balanced mode, balancer/sticky_balanced.lua): the cookie's key picks
    the endpoint by consistent hash (``exchange.pick_key``); a request without the cookie gets a
    new random key and the response sets ``NAME=KEY|BACKEND`` with the session-cookie-*
    attributes (HttpOnly always, Secure on HTTPS or when asked, Path the Ingress path as
    written unless session-cookie-path). ``keys`` maps backend key -> the affinity backend
    key of backends that have affinity (a "legacy" canary has none)."""

    name: str
    keys: Any                   # Mapping[(ns, svc, port), str]
    path: str
    domain: str = ""
    expires: int | None = None
    max_age: str = ""
    secure: bool = False
    samesite: str = ""

    def on_request(self, exchange) -> None:
        backends = exchange.action.backends
        bkey = self.keys.get(backends[0].key) if backends else None
        if bkey is None:
            return
        parts = _affinity_parts(exchange, self.name)
        if parts is not None and parts[0]:
            exchange.pick_key = parts[0].encode("latin-1")
            return
        key = "%.3f.%d.%d" % (time.time(), os.getpid(), random.randrange(1, 1000000))
        exchange.pick_key = key.encode()
        exchange.filter_data[self] = f"{key}|{bkey}"

    def on_response(self, exchange, status: int, fields: list) -> list:
        value = exchange.filter_data.get(self) if exchange.filter_data else None
        if value is None:
            return fields
        cookie = f"{self.name}={value}"
        if self.expires is not None:
            cookie += "; Expires=" + time.strftime("%a, %d-%b-%y %H:%M:%S GMT", time.gmtime(time.time() + self.expires))
        if self.max_age:
            cookie += f"; Max-Age={self.max_age}"
        if self.domain:
            cookie += f"; Domain={self.domain}"
        cookie += f"; Path={self.path}"
        if self.secure or exchange.down.tls:
            cookie += "; Secure"
        cookie += "; HttpOnly"
        if self.samesite:
            cookie += f"; SameSite={self.samesite}"
        return fields + [(b"Set-Cookie", cookie.encode("latin-1", "replace"))]
