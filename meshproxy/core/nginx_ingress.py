"""Ingresses served the ingress-nginx way, compiled into the route model.

``build(...)`` takes the Ingresses in ingress-nginx mode (their class is named ``nginx``, or they
carry ``nginx.ingress.kubernetes.io/*`` annotations; each with its parsed ``NginxIngress``) and
the route entries of the other Ingresses, and returns the entries of the one Ingress table. What
it reproduces of ingress-nginx's controller and template (docs/ingress-nginx.md says it to
users):

* **Locations.** Each path of a non-canary Ingress is a location with its Ingress's annotations
  (the action: backend, timeouts, retries, rewrite, upstream Host, and the filter chain of
  ``meshproxy.core.nginx_filters``).
* **Regex hosts.** When any location of a host uses ``use-regex`` or a ``rewrite-target``
  different from its path, *every* path of that host, whatever its Ingress, becomes a
  case-insensitive regular expression matched from the start of the path (nginx's
  ``location ~* "^PATH"``), tried in the controller's order: longer paths first, then
  reverse-alphabetical, then the older Ingress - the first that matches wins, even when a
  shorter literal path would match "better" (ingress-nginx's documented warning).
* **Each host answers for itself.** A host of these Ingresses gets a catch-all ``/`` (nginx's
  root location to the default backend: 404, or the first Ingress's ``spec.defaultBackend``),
  so its unmatched paths are not served by the rules of other hosts.
* **Canary Ingresses** create no route of their own: their backend becomes the alternative of
  the main location with the same host, path and path type - and, as in ingress-nginx, of every
  location whose backend is that same Service port.
* **Host-level annotations**: ``app-root`` (an Exact ``/`` answered before anything else),
  ``server-alias`` (the host's routes under more names, unless a name is a host of its own),
  ``ssl-passthrough`` (the host's ``/`` backend, for the TLS listener to pass through).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from . import nginx_filters as nf
from .ingress import check_path, ingress_rank
from .nginx_annotations import NginxIngress, backend_key, upstream_name
from .routes import DEFAULT, EXACT, PREFIX, REGEX, Action, BackendRef, HeaderEdits, Rewrite, Route, RouteEntry

__all__ = ["NginxBuild", "build", "default_server", "filter_chain"]


@dataclass(slots=True)
class NginxBuild:
    entries: list[RouteEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    upstream_tls: set = field(default_factory=set)          # backend keys reached over TLS
    upstream_h2: set = field(default_factory=set)           # backend keys reached over HTTP/2 (GRPC, GRPCS)
    passthrough: dict = field(default_factory=dict)         # host -> backend key (ssl-passthrough)


@dataclass(slots=True)
class _Location:
    host: str | None
    path: str
    ptype: str
    ing: Any
    cfg: NginxIngress
    ref: BackendRef
    port: str                      # the Ingress backend's port as written (upstream name)
    where: str


def _host_key(host: str | None) -> str:
    return (host or "").lower().rstrip(".")


def _needs_rewrite(loc: _Location) -> bool:
    t = loc.cfg.rewrite_target
    return bool(t) and t != loc.path


def _regex_rank(path: str) -> tuple:
    """ingress-nginx's location order: longer first, then reverse-alphabetical."""
    return (-len(path), tuple(-ord(c) for c in path))


def _compile(path: str) -> re.Pattern:
    """nginx's ``~* "^PATH"``: case-insensitive, from the start. A top-level alternation
    ("^/a|/b") matches its later branches anywhere in the path, as PCRE does; the wrapper
    keeps that (and the group numbers) with ``re.match``."""
    if "|" in path:
        return re.compile("(?s:.*?)(?:^" + path + ")", re.I)
    return re.compile(path, re.I)


def build(nginx: list[tuple[Any, NginxIngress]], others: list[RouteEntry], *,
          backend_ref: Callable[[Any, Any, str], tuple[BackendRef, str]],
          service_port: Callable[[str, str], tuple | None],
          cert_hosts: frozenset[str], default_key: tuple | None) -> NginxBuild:
    """See the module docstring. ``backend_ref(ingress, IngressBackend, where)`` resolves a
    backend to (BackendRef, port as written) and reports what is wrong itself;
    ``service_port(namespace, name)`` is the key of a Service's first port (default-backend);
    ``cert_hosts`` the hosts with a TLS certificate; ``default_key`` the backend of the class's
    default route (the error backend when an Ingress names none)."""
    out = NginxBuild()
    mains = [(i, c) for i, c in nginx if c.canary is None]
    canaries = [(i, c) for i, c in nginx if c.canary is not None]

    locations: list[_Location] = []
    for ing, cfg in mains:
        for ri, rule in enumerate(ing.rules):
            for pi, p in enumerate(rule.paths):
                where = f"spec.rules[{ri}].http.paths[{pi}]"
                bad = check_path(rule.host, p.path, p.path_type)
                if bad:
                    out.problems.append(f"{ing.ref}: {where}: {bad}; path not served")
                    continue
                ref, port = backend_ref(ing, p.backend, where)
                loc = _Location(rule.host, p.path or "/", p.path_type, ing, cfg, ref, port, where)
                locations.append(loc)
                if cfg.backend_protocol in ("HTTPS", "GRPCS") and ref.key is not None:
                    out.upstream_tls.add(ref.key)
                if cfg.backend_protocol in ("GRPC", "GRPCS") and ref.key is not None:
                    out.upstream_h2.add(ref.key)

    regex_hosts = {_host_key(loc.host) for loc in locations if loc.cfg.use_regex or _needs_rewrite(loc)}

    # Canary Ingresses: alternatives of primary backends (first canary per primary wins).
    alternatives: dict[tuple, tuple[BackendRef, NginxIngress, str]] = {}
    for ing, cfg in canaries:
        for ri, rule in enumerate(ing.rules):
            for pi, p in enumerate(rule.paths):
                where = f"spec.rules[{ri}].http.paths[{pi}]"
                ref, port = backend_ref(ing, p.backend, where)
                merged = False
                for loc in locations:
                    if (_host_key(loc.host) != _host_key(rule.host) or loc.path != (p.path or "/")
                            or loc.ptype != p.path_type or loc.ref.key is None):
                        continue
                    if ref.key == loc.ref.key:
                        break
                    alternatives.setdefault(loc.ref.key, (ref, cfg, upstream_name(ing.namespace, p.backend.service, port)))
                    merged = True
                if not merged:
                    out.problems.append(f"{ing.ref}: {where}: canary: no main Ingress has host "
                                        f"{rule.host or '*'} path {p.path!r} ({p.path_type}); the canary is not used")

    # Cookie affinity of a backend: from the first location using it whose Ingress asks.
    affinity_keys: dict[tuple, str] = {}
    for loc in locations:
        if loc.cfg.affinity is not None and loc.ref.key is not None and loc.ref.key not in affinity_keys:
            affinity_keys[loc.ref.key] = backend_key(
                upstream_name(loc.ing.namespace, loc.ref.key[1], loc.port))
    for primary, (ref, ccfg, name) in alternatives.items():
        if primary in affinity_keys and ccfg.canary.sticky and ref.key is not None:
            affinity_keys.setdefault(ref.key, backend_key(name))

    exact_paths = {(_host_key(loc.host), loc.path) for loc in locations if loc.ptype == "Exact"}
    entries: list[RouteEntry] = []
    for loc in locations:
        host = _host_key(loc.host)
        action = _action(loc, cert_hosts, alternatives, affinity_keys, service_port, default_key, out)
        entries.append(_entry(loc.host, loc.path, loc.ptype, action, loc.ing, host in regex_hosts,
                              exact_paths, out))

    # Entries of other Ingresses on a regex host become regular expressions too.
    for e in others:
        if _host_key(e.host) in regex_hosts and e.route.path_kind in (EXACT, PREFIX):
            r = e.route
            written = r.written_kind or r.path_kind
            entries.append(RouteEntry(e.host, _regex_route(r.name, r.source, r.host, r.path or "/", written, r.action, out),
                                      (_regex_rank(r.path or "/"), e.rank)))
        else:
            entries.append(e)

    _host_routes(mains, locations, regex_hosts, cert_hosts, entries, out)
    out.entries = [e for e in entries if e.route is not None]
    _aliases(mains, out)
    for ing, cfg in mains:
        if cfg.ssl_passthrough:
            for loc in locations:
                if loc.ing is ing and loc.path == "/" and loc.ref.key is not None and loc.host:
                    out.passthrough.setdefault(_host_key(loc.host), loc.ref.key)
    return out


def default_server() -> Route:
    """ingress-nginx's default server ("_"): with no Ingress ``spec.defaultBackend``, a request
    for a host no rule names gets nginx's 404 (ingress-nginx mode only)."""
    return Route(name="", source="ingress-nginx default server", host=None, path_kind=DEFAULT, path="",
                 action=Action(filters=(nf.NotFound(),)))


def _regex_route(name: str, source: str, host: str | None, path: str, written: str, action: Action,
                 out: NginxBuild) -> Route | None:
    try:
        rx = _compile(path)
    except re.error as exc:
        out.problems.append(f"{source}: host {host or '*'} path {path!r}: not a regular expression meshproxy "
                            f"can run ({exc}); path not served")
        return None
    return Route(name=name, source=source, host=host, path_kind=REGEX, path=path, action=action, regex=rx,
                 regex_prefix=True, written_kind=written)


def _entry(host: str | None, path: str, ptype: str, action: Action, ing, regex_host: bool, exact_paths: set,
           out: NginxBuild) -> RouteEntry:
    name = f"{host or ''}{path}"
    source = f"Ingress {ing.namespace}/{ing.name}"
    rank = ingress_rank(ing.meta.creation_timestamp, f"{ing.namespace}/{ing.name}")
    if regex_host:
        # A Prefix location of an Ingress without regex of its own is nginx's "PATH/" plus an
        # exact "PATH" clone - unless an Exact location of the same path exists: then only
        # "PATH/" (updateServerLocations).
        effective = path
        if (ptype == "Prefix" and path != "/" and not action.rewrite and not path.endswith("/")
                and (_host_key(host), path) in exact_paths and not _own_regex(ing)):
            effective = path + "/"
        route = _regex_route(name, source, host, effective, ptype, action, out)
        return RouteEntry(host, route, (_regex_rank(path), rank))
    kind = EXACT if ptype == "Exact" else PREFIX
    route = Route(name=name, source=source, host=host, path_kind=kind, path=path, action=action,
                  written_kind="" if ptype == kind else ptype)
    return RouteEntry(host, route, rank)


def _own_regex(ing) -> bool:
    ann = ing.meta.annotations
    return ann.get("nginx.ingress.kubernetes.io/use-regex", "") in ("1", "t", "T", "TRUE", "true", "True")


def _action(loc: _Location, cert_hosts: frozenset[str], alternatives: Mapping, affinity_keys: Mapping,
            service_port: Callable, default_key: tuple | None, out: NginxBuild) -> Action:
    cfg = loc.cfg
    ns = loc.ing.namespace
    nu = cfg.next_upstream
    if "off" in nu:
        attempts = 1
    else:
        # proxy_next_upstream_tries 0 means "no limit": the retry budget still bounds it.
        attempts = cfg.next_upstream_tries if cfg.next_upstream_tries > 0 else 10
    retry_on = frozenset(int(x[5:]) for x in nu if x.startswith("http_"))
    per_try = cfg.read_timeout if "timeout" in nu else None
    rewrite = None
    req_headers = None
    if _needs_rewrite(loc) or cfg.upstream_vhost:
        rewrite = Rewrite(hostname=cfg.upstream_vhost or None,
                          path_kind="RegexReplace" if _needs_rewrite(loc) else None,
                          path=cfg.rewrite_target if _needs_rewrite(loc) else "")
    sets = []
    if _needs_rewrite(loc) and cfg.x_forwarded_prefix:
        sets.append((b"x-forwarded-prefix", cfg.x_forwarded_prefix.encode()))
    if cfg.connection_header:
        sets.append((b"connection", cfg.connection_header.encode()))
    if sets:
        req_headers = HeaderEdits(set=tuple(sets))
    base = Action(backends=(loc.ref,), timeout=cfg.read_timeout, per_try_timeout=per_try, attempts=attempts,
                  retry_on=retry_on, request_headers=req_headers, rewrite=rewrite,
                  connect_timeout=cfg.connect_timeout, invalid_status=503, connect_error_statuses=(504, 502))
    error_key = None
    if cfg.default_backend:
        error_key = service_port(ns, cfg.default_backend)
        if error_key is None:
            out.problems.append(f"{loc.ing.ref}: metadata.annotations[nginx.ingress.kubernetes.io/default-backend]: "
                                f"service {ns}/{cfg.default_backend} not found or without ports; ignored")
    alt = alternatives.get(loc.ref.key) if loc.ref.key is not None else None
    chain, intercept = filter_chain(cfg, namespace=ns, ingress=loc.ing.name, host=loc.host, path=loc.path,
                                    ref=loc.ref, port=loc.port, service=_service_of(loc), cert_hosts=cert_hosts,
                                    error_key=error_key, default_key=default_key, problems=out.problems,
                                    where=loc.ing.ref, alternative=alt, affinity_keys=affinity_keys)
    return replace(base, filters=chain, intercept=intercept)


def filter_chain(cfg: NginxIngress, *, namespace: str, ingress: str, host: str | None, path: str, ref: BackendRef,
                 port: str, service: str, cert_hosts: frozenset[str], error_key: tuple | None,
                 default_key: tuple | None, problems: list[str], where: str, alternative=None,
                 affinity_keys: Mapping | None = None) -> tuple[tuple, tuple]:
    """The filters of one location (in nginx's phase order, see nginx_filters) and the
    intercepted statuses of custom-http-errors: (chain, intercept) for ``Action``. Also what
    an ``IngressNginxFilter`` extension of a Gateway API rule compiles into."""
    affinity_keys = affinity_keys or {}
    tell = ((b"X-Namespace", namespace.encode()), (b"X-Ingress-Name", ingress.encode()),
            (b"X-Service-Name", service.encode()), (b"X-Service-Port", port.encode()))
    intercept: tuple = ()
    if cfg.custom_http_errors and (error_key or default_key):
        ek = error_key or default_key
        intercept = tuple(
            (code, Action(backends=(BackendRef(ek),), rewrite=Rewrite(path_kind="ReplaceFullPath", path="/"),
                          request_headers=HeaderEdits(set=((b"X-Code", b"%d" % code),) + tell),
                          filters=(nf.ErrorPage(),), attempts=1, retry_on=frozenset(), timeout=cfg.read_timeout,
                          connect_timeout=cfg.connect_timeout))
            for code in cfg.custom_http_errors)
    if cfg.denied:
        return (nf.Denied(cfg.denied),), intercept
    chain: list = []
    if _may_have_cert(host, cert_hosts):
        chain.append(nf.Hsts(cert_hosts))
    if cfg.body_size:
        chain.append(nf.BodyLimit(cfg.body_size))
    if cfg.cors is not None:
        c = cfg.cors
        chain.append(nf.Cors(c.origin_regex, c.methods.encode(), c.headers.encode(), c.expose.encode(),
                             c.credentials, c.max_age))
    if cfg.redirect is not None:
        chain.append(nf.Redirect(cfg.redirect[0], cfg.redirect[1]))
    if cfg.force_ssl_redirect or (cfg.ssl_redirect and _may_have_cert(host, cert_hosts)):
        chain.append(nf.SslRedirect(cfg.force_ssl_redirect, cert_hosts, cfg.preserve_trailing_slash,
                                    cfg.use_port_in_redirects))
    lim = cfg.limits
    if lim is not None:
        if lim.connections:
            chain.append(nf.LimitConnections(f"{cfg.ingress}:conn", lim.connections, lim.allow))
        if lim.rps:
            chain.append(nf.LimitRequests(f"{cfg.ingress}:rps", lim.rps * 1000, lim.rps * lim.burst_multiplier,
                                          lim.allow))
        if lim.rpm:
            chain.append(nf.LimitRequests(f"{cfg.ingress}:rpm", lim.rpm * 1000 // 60,
                                          lim.rpm * lim.burst_multiplier, lim.allow))
    if cfg.allow or cfg.deny:
        chain.append(nf.IpAccess(cfg.allow, cfg.deny))
    if cfg.basic_auth is not None:
        chain.append(nf.BasicAuth(cfg.basic_auth.realm, dict(cfg.basic_auth.users)))
    if cfg.ext_auth is not None:
        a = cfg.ext_auth
        bad = _unknown_variables(a.url) | _unknown_variables(a.signin) | _unknown_variables(a.request_redirect)
        if bad:
            problems.append(f"{where}: metadata.annotations[nginx.ingress.kubernetes.io/auth-url]: nginx variables "
                            f"{', '.join(sorted(bad))} are not known to meshproxy; its paths answer 503")
            return (nf.Denied("unknown nginx variables in the auth annotations"),), intercept
        chain.append(nf.ExternalAuth(a.url, (a.method or "GET").encode(), a.signin, a.signin_param,
                                     tuple(h.lower().encode() for h in a.response_headers), a.request_redirect,
                                     a.always_set_cookie, cfg.connect_timeout, cfg.read_timeout))
    if error_key is not None:
        chain.append(nf.DefaultBackend(ref.key, BackendRef(error_key), ((b"X-Code", b"503"),) + tell))
    if alternative is not None:
        aref, ccfg, _name = alternative
        c = ccfg.canary
        affinity = cfg.affinity
        chain.append(nf.Canary(
            aref, ref.key, c.header.lower().encode(), c.header_value.encode(), c.pattern, c.pattern_invalid,
            c.cookie, c.weight, c.weight_total, affinity.cookie if affinity is not None else "",
            affinity_keys.get(ref.key, "") if affinity is not None else "",
            affinity_keys.get(aref.key, "") if affinity is not None else ""))
    if cfg.affinity is not None:
        a = cfg.affinity
        keys = {k: v for k, v in affinity_keys.items()
                if k == ref.key or (alternative is not None and k == alternative[0].key)}
        if ref.key is not None and ref.key not in keys:
            keys[ref.key] = backend_key(upstream_name(namespace, ref.key[1], port))
        chain.append(nf.CookieAffinity(a.cookie, keys, a.path or path, a.domain,
                                       int(a.expires) if a.expires else None, a.max_age, a.secure, a.samesite))
    return tuple(chain), intercept


def _service_of(loc: _Location) -> str:
    """The Service the location names (also when it does not exist: X-Service-Name)."""
    if loc.ref.key is not None:
        return loc.ref.key[1]
    err = loc.ref.error or ""
    return err.split(" ")[1].split("/")[-1] if err.startswith("service ") else ""


def _unknown_variables(text: str) -> set[str]:
    return {m for m in re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text or "") if m not in nf.VARIABLES}


def _may_have_cert(host: str | None, cert_hosts: frozenset[str]) -> bool:
    """Could a request of this rule's host have a certificate (then SslRedirect decides per
    request)? A rule without host serves any name."""
    if not cert_hosts:
        return False
    if not host:
        return True
    h = _host_key(host)
    if h in cert_hosts or h.startswith("*."):
        return True
    dot = h.find(".")
    return dot > 0 and "*" + h[dot:] in cert_hosts


def _host_routes(mains: list, locations: list[_Location], regex_hosts: set[str], cert_hosts: frozenset[str],
                 entries: list[RouteEntry], out: NginxBuild) -> None:
    """app-root and each nginx host's catch-all."""
    first: dict[str, tuple[Any, NginxIngress, str | None]] = {}
    for loc in locations:
        first.setdefault(_host_key(loc.host), (loc.ing, loc.cfg, loc.host))
    taken = {(_host_key(e.host), (e.route.path if e.route is not None else "")) for e in entries}
    for hk, (ing, cfg, host) in first.items():
        source = f"Ingress {ing.namespace}/{ing.name}"
        # app-root: the first Ingress of the host that sets it (a server-level "if").
        for i, c in mains:
            if c.app_root and any(_host_key(r.host) == hk for r in i.rules):
                route = Route(name=f"{host or ''}/", source=f"Ingress {i.namespace}/{i.name}", host=host,
                              path_kind=EXACT, path="/", action=Action(filters=(nf.AppRoot(c.app_root),)),
                              written_kind="app-root")
                entries.append(RouteEntry(host, route, ((-1,),)))
                break
        if not hk or (hk, "/") in taken:
            continue
        chain: list = [nf.Hsts(cert_hosts)] if _may_have_cert(host, cert_hosts) else []
        if cfg.force_ssl_redirect or (cfg.ssl_redirect and _may_have_cert(host, cert_hosts)):
            chain.append(nf.SslRedirect(cfg.force_ssl_redirect, cert_hosts, cfg.preserve_trailing_slash,
                                        cfg.use_port_in_redirects))
        chain.append(nf.NotFound())
        action = Action(filters=tuple(chain))
        if hk in regex_hosts:
            route = _regex_route(f"{host}/", source, host, "/", "default backend", action, out)
            entries.append(RouteEntry(host, route, (_regex_rank("/"), ((2, 0.0), ("~", "~")))))
        else:
            route = Route(name=f"{host}/", source=source, host=host, path_kind=PREFIX, path="/",
                          action=action, written_kind="default backend")
            entries.append(RouteEntry(host, route, ((2, 0.0), ("~", "~"))))


def _aliases(mains: list, out: NginxBuild) -> None:
    """server-alias: the first Ingress of a host with aliases gives them; an alias that is a
    host of its own is ignored."""
    hosts = {_host_key(e.host) for e in out.entries}
    given: dict[str, tuple[str, ...]] = {}
    for ing, cfg in mains:
        if not cfg.aliases:
            continue
        for r in ing.rules:
            hk = _host_key(r.host)
            if hk and hk not in given:
                given[hk] = cfg.aliases
    extra: list[RouteEntry] = []
    for hk, aliases in given.items():
        for alias in aliases:
            if alias == hk:
                continue
            if alias in hosts:
                out.problems.append(f"Ingress host {hk}: server-alias {alias!r} is a host of its own; the alias is ignored")
                continue
            extra.extend(RouteEntry(alias, e.route, e.rank) for e in out.entries if _host_key(e.host) == hk)
    out.entries.extend(extra)
