"""ingress-nginx's ``nginx.ingress.kubernetes.io/*`` annotations of one Ingress, parsed.

``parse(ingress, secrets)`` reads the annotations the way ingress-nginx's annotation parsers
do (its defaults, its value rules, what it ignores and what makes a path answer 503) and returns
an immutable ``NginxIngress``; ``meshproxy.core.nginx_ingress`` compiles it into routes and
``meshproxy.core.nginx_filters`` into per-request filters. docs/ingress-nginx.md is the user's
description of every annotation.

Three outcomes besides "applied", each reported as a ``Finding`` naming the annotation:

* **refused** - the Ingress is not served at all: it carries nginx configuration text (the
  snippet annotations) or asks for a check meshproxy cannot make (client certificates, a WAF,
  verification of the pod's certificate). Serving it without would fail open; ingress-nginx
  itself refuses such Ingresses since 1.12 unless an administrator raised the risk level.
* **denied** - the Ingress is served but its paths answer 503, as ingress-nginx's "location
  denied" (an auth Secret that is missing, an allow list without one valid address).
* **ignored** - a value ingress-nginx would also ignore (invalid, then its default), an
  annotation with no meshproxy equivalent, or one meshproxy does not know.

Values follow Go's parsers as ingress-nginx uses them: booleans ``strconv.ParseBool`` ("1", "t",
"T", "TRUE", "true", "True" and the false forms), integers ``strconv.Atoi`` (no spaces), strings
trimmed line by line, an empty string as absent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Mapping

__all__ = [
    "PREFIX", "KNOWN", "SNIPPETS", "Affinity", "BasicAuth", "Canary", "Cors", "ExternalAuth",
    "Finding", "Limits", "NginxIngress", "is_nginx", "parse", "parse_size", "upstream_name",
    "backend_key",
]

PREFIX = "nginx.ingress.kubernetes.io/"

# Annotations that hold nginx configuration text: never applied, so an Ingress carrying one is
# not served (what it configures - often access rules - would silently be missing).
SNIPPETS = frozenset({"configuration-snippet", "server-snippet", "auth-snippet", "stream-snippet",
                      "modsecurity-snippet"})

# What meshproxy implements (docs/ingress-nginx.md has the table).
_APPLIED = frozenset({
    "app-root", "rewrite-target", "use-regex", "permanent-redirect", "permanent-redirect-code",
    "temporal-redirect", "temporal-redirect-code", "ssl-redirect", "force-ssl-redirect",
    "preserve-trailing-slash", "use-port-in-redirects",
    "canary", "canary-by-header", "canary-by-header-value", "canary-by-header-pattern",
    "canary-by-cookie", "canary-weight", "canary-weight-total",
    "whitelist-source-range", "allowlist-source-range", "denylist-source-range",
    "enable-cors", "cors-allow-origin", "cors-allow-methods", "cors-allow-headers",
    "cors-expose-headers", "cors-allow-credentials", "cors-max-age",
    "proxy-body-size", "proxy-connect-timeout", "proxy-read-timeout", "proxy-send-timeout",
    "proxy-next-upstream", "proxy-next-upstream-tries", "proxy-next-upstream-timeout",
    "upstream-vhost", "x-forwarded-prefix",
    "affinity", "affinity-mode", "affinity-canary-behavior", "session-cookie-name",
    "session-cookie-path", "session-cookie-domain", "session-cookie-expires",
    "session-cookie-max-age", "session-cookie-secure", "session-cookie-samesite",
    "session-cookie-conditional-samesite-none", "session-cookie-change-on-failure",
    "backend-protocol", "ssl-passthrough", "server-alias",
    "auth-url", "auth-method", "auth-signin", "auth-signin-redirect-param", "auth-response-headers",
    "auth-request-redirect", "auth-always-set-cookie",
    "auth-type", "auth-secret", "auth-secret-type", "auth-realm",
    "limit-rps", "limit-rpm", "limit-connections", "limit-burst-multiplier", "limit-allowlist",
    "limit-whitelist",
    "custom-http-errors", "default-backend", "disable-proxy-intercept-errors", "connection-proxy-header",
})
# Tuning of nginx's own buffers, caches and logs: no behaviour a client can see changes when
# meshproxy does without them (it streams, and logs every request).
_NO_EFFECT = frozenset({
    "client-body-buffer-size", "proxy-buffering", "proxy-buffers-number", "proxy-buffer-size",
    "proxy-busy-buffers-size", "proxy-max-temp-file-size", "proxy-request-buffering",
    "proxy-http-version", "enable-rewrite-log", "enable-access-log", "auth-keepalive",
    "auth-keepalive-requests", "auth-keepalive-timeout", "auth-keepalive-share-vars",
    "auth-cache-key", "auth-cache-duration", "http2-push-preload", "enable-opentelemetry",
    "opentelemetry-trust-incoming-span", "opentelemetry-operation-name", "ssl-prefer-server-ciphers",
    "service-upstream", "load-balance",
})
# Known to ingress-nginx, not implemented here: the Ingress is served without them. (Those whose
# absence would weaken access control are in _REFUSED instead.)
_NOT_APPLIED = frozenset({
    "custom-headers", "from-to-www-redirect", "proxy-redirect-from",
    "proxy-redirect-to", "proxy-cookie-domain", "proxy-cookie-path", "upstream-hash-by",
    "upstream-hash-by-subset", "upstream-hash-by-subset-size", "mirror-target", "mirror-host",
    "mirror-request-body", "limit-rate", "limit-rate-after", "ssl-ciphers", "proxy-ssl-name",
    "proxy-ssl-server-name", "proxy-ssl-protocols", "proxy-ssl-ciphers", "proxy-ssl-verify-depth",
    "fastcgi-index", "fastcgi-params-configmap", "relative-redirects", "satisfy",
    "enable-global-auth", "auth-proxy-set-headers", "auth-tls-verify-depth", "auth-tls-error-page",
    "auth-tls-pass-certificate-to-upstream", "modsecurity-transaction-id",
})
# Checks meshproxy cannot make: serving without them would let requests through that
# ingress-nginx stops. Refused like the snippets (the value decides, see _refusal).
_REFUSED = frozenset({"auth-tls-secret", "auth-tls-verify-client", "auth-tls-match-cn",
                      "enable-modsecurity", "enable-owasp-core-rules", "proxy-ssl-secret",
                      "proxy-ssl-verify"})

KNOWN = _APPLIED | _NO_EFFECT | _NOT_APPLIED | _REFUSED | SNIPPETS

_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))
_INT = re.compile(r"[+-]?[0-9]+")
_SIZE = re.compile(r"(?i)([0-9]+)([bkmg]?)")
_SIZE_NGINX = re.compile(r"[0-9]+[kKmM]?")      # what nginx takes for client_max_body_size
_PATH_CAPTURE = re.compile(r"/?[\-._~a-zA-Z0-9/:$]*")
_BASIC_CHARS = re.compile(r"[\-.\_~a-zA-Z0-9/:]*")
_HEADERS = re.compile(r"[A-Za-z0-9\-_, ]*")
_HEADER_NAME = re.compile(r"[A-Za-z0-9\-_]+")
_CORS_ORIGIN = re.compile(r"([a-z]+://(\*\.)?[A-Za-z0-9\-.]*(:\d+)?|\*|null)?")
_CORS_METHODS = re.compile(r"([A-Za-z]+,?\s?)+")
_CORS_EXPOSE = re.compile(r"(([A-Za-z0-9\-_]+|\*),?\s?)+")
_NEXT_UPSTREAM = re.compile(r"((error|timeout|invalid_header|http_500|http_502|http_503|http_504|http_403|"
                            r"http_404|http_429|non_idempotent|off)\s?)+")
_EXPIRES = re.compile(r"[0-9]{1,64}")
_SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_METHOD = re.compile(r"GET|HEAD|POST|PUT|PATCH|DELETE|CONNECT|OPTIONS|TRACE", re.I)
_BACKEND_PROTOCOLS = ("HTTP", "HTTPS", "AUTO_HTTP", "GRPC", "GRPCS", "FCGI")
DEFAULT_CORS_METHODS = "GET, PUT, POST, DELETE, PATCH, OPTIONS"
DEFAULT_CORS_HEADERS = ("DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,"
                        "Content-Type,Range,Authorization")


@dataclass(frozen=True, slots=True)
class Finding:
    """Something about one annotation the user should know. ``kind``: "refused" (the Ingress is
    not served), "denied" (its paths answer 503), "ignored" (served without it)."""

    annotation: str
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class Canary:
    header: str = ""
    header_value: str = ""
    header_pattern: str = ""
    pattern: re.Pattern | None = None
    pattern_invalid: bool = False     # the pattern does not compile: a request with the header stays on the main backend
    cookie: str = ""
    weight: int = 0
    weight_total: int = 100
    sticky: bool = True               # affinity-canary-behavior: sticky (default) or legacy


@dataclass(frozen=True, slots=True)
class Cors:
    origins: tuple[str, ...]          # ("*",) or the allowed origins as written
    origin_regex: re.Pattern | None   # None for "*"
    methods: str
    headers: str
    expose: str
    credentials: bool
    max_age: int


@dataclass(frozen=True, slots=True)
class Affinity:
    cookie: str = "INGRESSCOOKIE"
    path: str | None = None
    domain: str = ""
    expires: str = ""
    max_age: str = ""
    secure: bool = False
    samesite: str = ""
    conditional_samesite_none: bool = False
    persistent: bool = False          # affinity-mode: persistent


@dataclass(frozen=True, slots=True)
class ExternalAuth:
    url: str
    method: str = ""
    signin: str = ""
    signin_param: str = "rd"
    response_headers: tuple[str, ...] = ()
    request_redirect: str = ""
    always_set_cookie: bool = False


@dataclass(frozen=True, slots=True)
class BasicAuth:
    realm: str
    users: Mapping[str, str]          # user -> hash, as in the htpasswd file (first entry wins)


@dataclass(frozen=True, slots=True)
class Limits:
    rps: int = 0
    rpm: int = 0
    connections: int = 0
    burst_multiplier: int = 5
    allow: tuple = ()                 # networks exempt from the limits


@dataclass(frozen=True, slots=True)
class NginxIngress:
    """Everything ingress-nginx reads from one Ingress's annotations (defaults included)."""

    ingress: str                                   # namespace/name
    canary: Canary | None = None                   # set: this Ingress is a canary (canary: "true")
    rewrite_target: str = ""
    use_regex: bool = False
    app_root: str = ""
    redirect: tuple[int, str] | None = None        # (status, URL): permanent- / temporal-redirect
    ssl_redirect: bool = True
    force_ssl_redirect: bool = False
    preserve_trailing_slash: bool = False
    use_port_in_redirects: bool = False
    allow: tuple = ()                              # ip networks; empty: no allow list
    deny: tuple = ()
    cors: Cors | None = None
    body_size: int | None = 1024 * 1024            # None: unlimited ("0")
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    send_timeout: float = 60.0
    next_upstream: tuple[str, ...] = ("error", "timeout")
    next_upstream_tries: int = 3
    next_upstream_timeout: float = 0.0
    upstream_vhost: str = ""
    x_forwarded_prefix: str = ""
    connection_header: str = ""                    # connection-proxy-header: Connection sent to the pod
    affinity: Affinity | None = None
    backend_protocol: str = "HTTP"                 # HTTP, HTTPS, GRPC (h2c) or GRPCS (h2 over TLS)
    ssl_passthrough: bool = False
    aliases: tuple[str, ...] = ()
    ext_auth: ExternalAuth | None = None
    basic_auth: BasicAuth | None = None
    limits: Limits | None = None
    custom_http_errors: tuple[int, ...] = ()
    default_backend: str = ""                      # a Service of the Ingress's namespace
    denied: str = ""                               # why every path answers 503 ("" when none)
    findings: tuple[Finding, ...] = field(default=(), compare=False)

    @property
    def refused(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind == "refused")


def is_nginx(annotations: Mapping[str, str]) -> bool:
    """Does the Ingress carry any ingress-nginx annotation?"""
    return any(k.startswith(PREFIX) for k in annotations)


def parse_size(text: str) -> int | None:
    """nginx size ("8m", "1k", "100") -> bytes; ValueError when it is not one."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size")
    unit = m.group(2).lower()
    return int(m.group(1)) * {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[unit]


def upstream_name(namespace: str, service: str, port: str | int) -> str:
    """ingress-nginx's name for the upstream of a Service port (``ns-svc-port``)."""
    return f"{namespace}-{service}-{port}"


def backend_key(name: str) -> str:
    """The affinity cookie's backend part: md5(md5(name) + name), hex (balancer/sticky.lua)."""
    inner = hashlib.md5(name.encode()).hexdigest()
    return hashlib.md5((inner + name).encode()).hexdigest()


class _Reader:
    """The annotations of one Ingress, with ingress-nginx's getters. Findings accumulate."""

    def __init__(self, annotations: Mapping[str, str]) -> None:
        self.ann = {k[len(PREFIX):]: v for k, v in annotations.items() if k.startswith(PREFIX)}
        self.findings: list[Finding] = []

    def note(self, name: str, kind: str, message: str) -> None:
        self.findings.append(Finding(PREFIX + name, kind, message))

    def has(self, name: str) -> bool:
        return name in self.ann

    def raw(self, name: str) -> str | None:
        return self.ann.get(name)

    def string(self, name: str, default: str = "", pattern: re.Pattern | None = None, strip_spaces: bool = False,
               what: str = "") -> str:
        val = self.ann.get(name)
        if val is None:
            return default
        s = "\n".join(line.strip() for line in val.split("\n"))
        if s == "":
            return default
        if pattern is not None and pattern.fullmatch(s.replace(" ", "") if strip_spaces else s) is None:
            self.note(name, "ignored", f"{val!r} is not {what or 'a valid value'}; "
                                       f"{'the default ' + repr(default) + ' applies' if default else 'ignored'}")
            return default
        return s

    def boolean(self, name: str, default: bool) -> bool:
        val = self.ann.get(name)
        if val is None:
            return default
        if val in _TRUE:
            return True
        if val in _FALSE:
            return False
        self.note(name, "ignored", f"{val!r} is not a boolean; the default {str(default).lower()} applies")
        return default

    def integer(self, name: str, default: int) -> int:
        val = self.ann.get(name)
        if val is None:
            return default
        if _INT.fullmatch(val) is None:
            self.note(name, "ignored", f"{val!r} is not an integer; the default {default} applies")
            return default
        return int(val)


def _networks(r: _Reader, name: str) -> tuple[tuple, bool]:
    """A comma-separated CIDR / address list: (networks, ok). As ingress-nginx: entries that do
    not parse are dropped, but when none of the entries is a plain address the whole list is
    invalid (the location is denied)."""
    val = r.raw(name)
    if val is None:
        return (), True
    nets: list = []
    bad: list[str] = []
    plain = 0
    for part in val.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                nets.append(ipaddress.ip_network(part, strict=False))
            else:
                nets.append(ipaddress.ip_network(ipaddress.ip_address(part)))
                plain += 1
        except ValueError:
            bad.append(part)
    if bad and not plain:
        return (), False
    if bad:
        r.note(name, "ignored", f"entries {', '.join(repr(b) for b in bad)} are not addresses or networks; left out")
    return tuple(nets), True


def _cors(r: _Reader) -> Cors | None:
    if not r.boolean("enable-cors", False):
        return None
    origins: list[str] = []
    raw = r.string("cors-allow-origin")
    if not raw:
        origins = ["*"]
    else:
        for o in raw.split(","):
            o = o.strip()
            if not o:
                continue
            if o == "*":
                origins = ["*"]
                break
            if _CORS_ORIGIN.fullmatch(o) is None:
                r.note("cors-allow-origin", "ignored", f"origin {o!r} is not protocol://host[:port], null or *; left out")
                continue
            origins.append(o)
    regex = None
    if origins != ["*"]:
        # The origin test of ingress-nginx's template: case-insensitive, anchored at the end only,
        # "*." standing for one DNS label.
        alts = []
        for o in origins:
            q = re.escape(o).replace(r"\*", r"[A-Za-z0-9\-]+", 1)
            alts.append(f"({q})")
        regex = re.compile("(" + "|".join(alts) + ")$", re.I) if alts else re.compile(r"(?!)")
    methods = r.string("cors-allow-methods", DEFAULT_CORS_METHODS)
    if _CORS_METHODS.fullmatch(methods) is None:
        methods = DEFAULT_CORS_METHODS
    headers = r.string("cors-allow-headers", DEFAULT_CORS_HEADERS)
    if _HEADERS.fullmatch(headers) is None:
        headers = DEFAULT_CORS_HEADERS
    expose = r.string("cors-expose-headers")
    if expose and _CORS_EXPOSE.fullmatch(expose) is None:
        expose = ""
    return Cors(tuple(origins), regex, methods, headers, expose, r.boolean("cors-allow-credentials", True),
                r.integer("cors-max-age", 1728000))


def _canary(r: _Reader) -> Canary | None:
    enabled = r.boolean("canary", False)
    header = r.string("canary-by-header", pattern=_BASIC_CHARS, strip_spaces=True, what="a header name")
    value = r.string("canary-by-header-value", pattern=_BASIC_CHARS, strip_spaces=True, what="a header value")
    pattern = r.string("canary-by-header-pattern")
    cookie = r.string("canary-by-cookie", pattern=_BASIC_CHARS, strip_spaces=True, what="a cookie name")
    weight = r.integer("canary-weight", 0)
    total = r.integer("canary-weight-total", 100)
    if not enabled:
        if weight > 0 or header or value or cookie or pattern:
            r.note("canary", "ignored", "canary-* annotations without canary: \"true\" do nothing")
        return None
    compiled, invalid = None, False
    if pattern:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            invalid = True
            r.note("canary-by-header-pattern", "ignored",
                   f"{pattern!r} is not a regular expression ({exc}); requests with the header stay on the main backend")
    sticky = r.string("affinity-canary-behavior", "sticky").lower() != "legacy"
    return Canary(header, value, pattern, compiled, invalid, cookie, weight, total, sticky)


def _affinity(r: _Reader) -> Affinity | None:
    kind = r.string("affinity")
    if kind.lower() != "cookie":
        if kind:
            r.note("affinity", "ignored", f"{kind!r}: only \"cookie\" affinity exists")
        return None
    mode = r.string("affinity-mode", "balanced").lower()
    expires = r.string("session-cookie-expires")
    max_age = r.string("session-cookie-max-age")
    samesite = r.string("session-cookie-samesite")
    if samesite and samesite.lower() not in ("none", "lax", "strict"):
        r.note("session-cookie-samesite", "ignored", f"{samesite!r} is not None, Lax or Strict")
        samesite = ""
    name = r.string("session-cookie-name", "INGRESSCOOKIE", pattern=_BASIC_CHARS, what="a cookie name")
    return Affinity(cookie=name, path=r.string("session-cookie-path") or None,
                    domain=r.string("session-cookie-domain"),
                    expires=expires if _EXPIRES.fullmatch(expires or "x") else "",
                    max_age=max_age if _EXPIRES.fullmatch(max_age or "x") else "",
                    secure=r.boolean("session-cookie-secure", False), samesite=samesite,
                    conditional_samesite_none=r.boolean("session-cookie-conditional-samesite-none", False),
                    persistent=mode == "persistent")


def _redirect(r: _Reader) -> tuple[int, str] | None:
    temporal = r.string("temporal-redirect")
    if temporal:
        code = r.integer("temporal-redirect-code", 302)
        if not 300 <= code <= 307:
            code = 302
        return (code, temporal) if _http_url(r, "temporal-redirect", temporal) else None
    permanent = r.string("permanent-redirect")
    if permanent:
        code = r.integer("permanent-redirect-code", 301)
        if not 300 <= code <= 308:
            code = 301
        return (code, permanent) if _http_url(r, "permanent-redirect", permanent) else None
    return None


def _http_url(r: _Reader, name: str, url: str) -> bool:
    if not url.lower().startswith("http"):
        r.note(name, "ignored", f"{url!r}: only http and https URLs redirect")
        return False
    return True


def _ext_auth(r: _Reader) -> tuple[ExternalAuth | None, str]:
    url = r.string("auth-url")
    if not url:
        return None, ""
    if "://" not in url or not url.lower().startswith(("http://", "https://")):
        return None, f"auth-url {url!r} is not an http(s) URL"
    method = r.string("auth-method")
    if method and _METHOD.fullmatch(method) is None:
        return None, f"auth-method {method!r} is not an HTTP method"
    headers = []
    for h in (r.string("auth-response-headers") or "").split(","):
        h = h.strip()
        if not h:
            continue
        if _HEADER_NAME.fullmatch(h) is None:
            return None, f"auth-response-headers: {h!r} is not a header name"
        headers.append(h)
    return ExternalAuth(url=url, method=method.upper(), signin=r.string("auth-signin"),
                        signin_param=r.string("auth-signin-redirect-param", "rd"),
                        response_headers=tuple(headers), request_redirect=r.string("auth-request-redirect"),
                        always_set_cookie=r.boolean("auth-always-set-cookie", False)), ""


def _basic_auth(r: _Reader, namespace: str, secrets: Mapping[tuple[str, str], object]) -> tuple[BasicAuth | None, str]:
    kind = r.string("auth-type")
    if not kind:
        return None, ""
    if kind.lower() == "digest":
        return None, "auth-type digest is not supported by meshproxy"
    if kind.lower() != "basic":
        return None, f"auth-type {kind!r} is not basic or digest"
    ref = r.string("auth-secret")
    if not ref:
        return None, "auth-secret is missing"
    sns, _, sname = ref.rpartition("/")
    sns = sns or namespace
    if sns != namespace:
        return None, f"auth-secret {ref!r}: Secrets of other namespaces are not allowed"
    secret = secrets.get((sns, sname))
    if secret is None:
        return None, f"auth-secret {sns}/{sname} not found"
    stype = r.string("auth-secret-type", "auth-file")
    data = getattr(secret, "data", {})
    users: dict[str, str] = {}
    if stype == "auth-file":
        if "auth" not in data:
            return None, f"auth-secret {sns}/{sname} has no key \"auth\""
        for line in data["auth"].decode("utf-8", "replace").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if sep and user and hashed:
                users.setdefault(user, hashed.split(":")[0])
    elif stype == "auth-map":
        for user, hashed in data.items():
            users.setdefault(user, hashed.decode("utf-8", "replace").strip())
    else:
        return None, f"auth-secret-type {stype!r} is not auth-file or auth-map"
    return BasicAuth(r.string("auth-realm"), users), ""


def _limits(r: _Reader) -> Limits | None:
    rps = r.integer("limit-rps", 0)
    rpm = r.integer("limit-rpm", 0)
    conn = r.integer("limit-connections", 0)
    if rps <= 0 and rpm <= 0 and conn <= 0:
        return None
    allow_name = "limit-allowlist" if r.has("limit-allowlist") else "limit-whitelist"
    allow, ok = _networks(r, allow_name)
    if not ok:
        r.note(allow_name, "ignored", "no valid address or network; nobody is exempt")
    return Limits(max(rps, 0), max(rpm, 0), max(conn, 0), r.integer("limit-burst-multiplier", 5), allow)


def parse(ingress, secrets: Mapping[tuple[str, str], object] = {}) -> NginxIngress:  # noqa: B006 - read only
    """The annotations of ``ingress`` (a discovery Ingress) as ingress-nginx reads them.
    ``secrets`` by (namespace, name), for auth-secret."""
    r = _Reader(ingress.meta.annotations)
    ns = ingress.namespace
    for name in sorted(r.ann):
        if name in SNIPPETS:
            r.note(name, "refused", "holds nginx configuration, which meshproxy cannot apply; the Ingress is not served")
        elif name in _REFUSED:
            why = _refusal(name, r.ann[name])
            if why:
                r.note(name, "refused", f"{why}; the Ingress is not served")
        elif name in _NOT_APPLIED:
            r.note(name, "ignored", "not implemented by meshproxy; the Ingress is served without it")
        elif name in _NO_EFFECT:
            r.note(name, "ignored", "tunes nginx itself; no meshproxy equivalent is needed")
        elif name not in KNOWN:
            r.note(name, "ignored", "not an ingress-nginx annotation meshproxy knows; ignored")
    denied: list[str] = []

    allow, ok = _networks(r, "allowlist-source-range" if r.has("allowlist-source-range") else "whitelist-source-range")
    if not ok:
        denied.append("the source-range allow list holds no valid address or network")
    deny, ok = _networks(r, "denylist-source-range")
    if not ok:
        denied.append("the source-range deny list holds no valid address or network")

    body = r.string("proxy-body-size", "1m")
    try:
        if _SIZE.fullmatch(body) is None:
            r.note("proxy-body-size", "ignored", f"{body!r} is not a size; the default 1m applies")
            body = "1m"
        body_size = parse_size(body) if _SIZE_NGINX.fullmatch(body) else 1024 * 1024
    except ValueError:
        body_size = 1024 * 1024

    next_upstream = r.string("proxy-next-upstream", "error timeout")
    if _NEXT_UPSTREAM.fullmatch(next_upstream) is None:
        r.note("proxy-next-upstream", "ignored", f"{next_upstream!r} is not a list of error, timeout, http_5xx, ...")
        next_upstream = "error timeout"
    if "non_idempotent" in next_upstream.split():
        r.note("proxy-next-upstream", "ignored", "non_idempotent: meshproxy retries only idempotent requests")

    protocol = r.string("backend-protocol", "HTTP").upper()
    if protocol not in _BACKEND_PROTOCOLS:
        r.note("backend-protocol", "ignored", f"{protocol!r} is not one of {', '.join(_BACKEND_PROTOCOLS)}; HTTP applies")
        protocol = "HTTP"
    elif protocol in ("FCGI", "AUTO_HTTP"):
        r.note("backend-protocol", "refused", f"{protocol} is not supported by meshproxy; the Ingress is not served")

    ext_auth, why = _ext_auth(r)
    if why:
        denied.append(why)
    basic, why = _basic_auth(r, ns, secrets)
    if why:
        denied.append(why)

    aliases: list[str] = []
    for a in (r.string("server-alias") or "").split(","):
        a = a.strip().lower()
        if a and a not in aliases:
            aliases.append(a)

    codes: list[int] = []
    for c in (r.string("custom-http-errors") or "").split(","):
        c = c.strip()
        if not c:
            continue
        if not c.isdigit() or not 400 <= int(c) <= 599:
            r.note("custom-http-errors", "ignored", f"{c!r} is not an HTTP error status; left out")
            continue
        codes.append(int(c))
    if r.boolean("disable-proxy-intercept-errors", False):
        codes = []

    default_backend = r.string("default-backend")
    if default_backend and _SERVICE_NAME.fullmatch(default_backend) is None:
        r.note("default-backend", "ignored", f"{default_backend!r} is not a Service name")
        default_backend = ""

    rewrite = r.string("rewrite-target", pattern=_PATH_CAPTURE, what="a path with $1.. groups")
    xfp = r.string("x-forwarded-prefix", pattern=_PATH_CAPTURE, strip_spaces=True, what="a path")
    app_root = r.string("app-root", pattern=_PATH_CAPTURE, what="a path")

    return NginxIngress(
        ingress=f"{ns}/{ingress.name}", canary=_canary(r), rewrite_target=rewrite,
        use_regex=r.boolean("use-regex", False), app_root=app_root, redirect=_redirect(r),
        ssl_redirect=r.boolean("ssl-redirect", True), force_ssl_redirect=r.boolean("force-ssl-redirect", False),
        preserve_trailing_slash=r.boolean("preserve-trailing-slash", False),
        use_port_in_redirects=r.boolean("use-port-in-redirects", False),
        allow=allow, deny=deny, cors=_cors(r), body_size=body_size or None,
        connect_timeout=float(r.integer("proxy-connect-timeout", 5)),
        read_timeout=float(r.integer("proxy-read-timeout", 60)),
        send_timeout=float(r.integer("proxy-send-timeout", 60)),
        next_upstream=tuple(next_upstream.split()), next_upstream_tries=r.integer("proxy-next-upstream-tries", 3),
        next_upstream_timeout=float(r.integer("proxy-next-upstream-timeout", 0)),
        upstream_vhost=r.string("upstream-vhost"), x_forwarded_prefix=xfp,
        connection_header=r.string("connection-proxy-header", pattern=_BASIC_CHARS, what="a Connection value"),
        affinity=_affinity(r), backend_protocol=protocol,
        ssl_passthrough=r.boolean("ssl-passthrough", False), aliases=tuple(aliases),
        ext_auth=ext_auth, basic_auth=basic, limits=_limits(r), custom_http_errors=tuple(dict.fromkeys(codes)),
        default_backend=default_backend, denied="; ".join(denied),
        findings=tuple(r.findings) + tuple(Finding(PREFIX + "*", "denied", d + "; its paths answer 503") for d in denied),
    )


def _refusal(name: str, value: str) -> str:
    """Why an annotation of _REFUSED makes the Ingress unservable ("" when its value asks for
    nothing meshproxy would leave out)."""
    v = value.strip().lower()
    if name in ("enable-modsecurity", "enable-owasp-core-rules"):
        return "" if v in ("false", "0", "f") else "asks for the ModSecurity web application firewall, which meshproxy does not have"
    if name == "proxy-ssl-verify":
        return "" if v in ("off", "") else "asks to verify the pod's certificate, which meshproxy does not do yet"
    if name == "auth-tls-verify-client":
        return "" if v in ("off", "") else "asks for client certificate verification, which meshproxy does not do"
    if name == "proxy-ssl-secret":
        return "names a client certificate for the pod, which meshproxy does not present yet"
    return "asks for client certificate verification, which meshproxy does not do"
