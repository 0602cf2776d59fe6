"""HTTPRoute and GRPCRoute rules compiled into the route model (``meshproxy.core.routes``).

A route's rules are compiled once, independent of where the route attaches (``compile_route``
-> ``CompiledRoute``): references resolved (Services, ReferenceGrants, FaultInjection objects),
filters turned into an ``Action``, matches into (path kind, path, conditions) with their
precedence counts, and every rule the implementation cannot serve dropped with the reason.
Per attachment only two things are filled in (``CompiledRule.action_for``): the scheme and
port a redirect uses by default, which are the listener's own.

Semantics, from the HTTPRoute / GRPCRoute API documentation:

* references: a backendRef (or mirror backendRef) is invalid when its group/kind is not the
  core Service (``InvalidKind``), when it crosses namespaces without a ReferenceGrant in the
  target namespace allowing this route kind from this namespace (``RefNotPermitted``), or when
  the Service or its port does not exist (``BackendNotFound``). Invalid backendRefs keep their
  weight and are answered 500 (``Action.invalid_status``); invalid mirrors are dropped;
* a rule without backendRefs and without a redirect answers 500, as does one whose weights are
  all 0;
* an ``ExtensionRef`` to meshproxy.dev ``FaultInjection`` becomes ``Action.fault``; one to
  meshproxy.dev ``IngressNginxFilter`` adds the filters of its ingress-nginx annotations
  (``meshproxy.core.nginx_ingress.filter_chain``: what ``meshproxy convert`` writes where Gateway
  API has no equivalent); one that cannot be resolved is not skipped: the rule answers 500 (a
  100 % abort);
* filters meshproxy does not implement (CORS, ExternalAuth, redirect / rewrite / mirror inside
  a backendRef), ``sessionPersistence`` and ``retry.backoff`` make the rule invalid: it is
  dropped and the route says so (``PartiallyInvalid``, or ``Accepted: False`` with
  ``UnsupportedValue`` when no rule is left), as the API prescribes for unsupported values;
* GRPCRoute matches become paths: ``/service/method`` (Exact), ``/service`` (PathPrefix: every
  method), method only or RegularExpression: a regular expression over ``/service/method``.

Regular expressions (paths, header and query values, gRPC service / method) are Python's
``re`` dialect, matched against the whole value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from types import SimpleNamespace

from discovery import gateway_objects as g
from discovery import objects as o

from .ingress import ingress_rank
from .nginx_annotations import parse as parse_nginx
from .nginx_ingress import filter_chain
from .routes import (EXACT, PREFIX, REGEX, Action, BackendRef, Conditions, Fault, HeaderEdits, HeaderMatch, Mirror,
                     QueryMatch, Redirect, Rewrite, Route)

__all__ = ["CompiledRoute", "CompiledRule", "References", "RefProblem", "compile_route", "replace_prefix",
           "redirect_location", "rewritten_path", "DEFAULT_PORTS"]

DEFAULT_PORTS = {"http": 80, "https": 443}
_SERVICE = ("", "Service")


def replace_prefix(path: str, matched: str, replacement: str) -> str:
    """A path after ReplacePrefixMatch (redirect or rewrite): ``matched`` is the part of
    ``path`` the PathPrefix match covered (``Route.matched_prefix``), ``replacement`` the
    configured value. Follows the table in the API's HTTPPathModifier documentation: a
    trailing "/" of the replacement is not doubled, an empty result is "/"."""
    rest = path[len(matched):]
    if rest.startswith("/") and replacement.endswith("/"):
        replacement = replacement[:-1]
    out = replacement + rest
    if not out:
        return "/"
    return out if out.startswith("/") else "/" + out


def _host_only(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def redirect_location(r: Redirect, route: Route, scheme: str, host: str, path: str, query: str = "") -> str:
    """The Location of a RequestRedirect: ``scheme`` is the request's ("http" / "https"),
    ``host`` its Host header (a port in it is dropped), ``path`` the request path the route
    matched (its routing form), ``query`` the query string without "?". The port is left out
    when it is the scheme's default (80 for http, 443 for https), and when the Redirect has
    none (Ingress's ssl-redirect fills it in itself)."""
    out_scheme = r.scheme or scheme
    hostname = r.hostname or _host_only(host)
    if r.path_kind == "ReplaceFullPath":
        out_path = r.path or "/"
    elif r.path_kind == "ReplacePrefixMatch":
        out_path = replace_prefix(path, route.matched_prefix(path), r.path)
    else:
        out_path = path
    port = "" if r.port is None or DEFAULT_PORTS.get(out_scheme) == r.port else f":{r.port}"
    return f"{out_scheme}://{hostname}{port}{out_path}" + (f"?{query}" if query else "")


def rewritten_path(rw: Rewrite, route: Route, path: str) -> str:
    """The path forwarded after a URLRewrite's ReplaceFullPath / ReplacePrefixMatch (the
    path as is for neither)."""
    if rw.path_kind == "ReplaceFullPath":
        return rw.path or "/"
    if rw.path_kind == "ReplacePrefixMatch":
        return replace_prefix(path, route.matched_prefix(path), rw.path)
    return path


@dataclass(frozen=True, slots=True)
class RefProblem:
    """Why a reference does not resolve: ``reason`` is the condition reason the API names."""
    reason: str                # InvalidKind | RefNotPermitted | BackendNotFound
    message: str
    field: str                 # the field path that holds the reference


class References:
    """Resolves the references of routes and Gateways against one snapshot's objects."""

    def __init__(self, services: Mapping[tuple[str, str], o.Service], grants: Iterable[g.ReferenceGrant],
                 faults: Mapping[tuple[str, str], g.FaultInjection],
                 nginx_filters: Mapping[tuple[str, str], g.IngressNginxFilter] | None = None,
                 secrets: Mapping[tuple[str, str], Any] | None = None) -> None:
        self.services = services
        self.faults = faults
        self.nginx_filters = nginx_filters or {}
        self.secrets = secrets or {}
        # (target namespace, from group, from kind, from namespace) -> [(to group, to kind, to name)]
        self._grants: dict[tuple[str, str, str, str], list[tuple[str, str, str | None]]] = {}
        for rg in grants:
            for f in rg.grants_from:
                self._grants.setdefault((rg.namespace, f.group, f.kind, f.namespace), []).extend(
                    (t.group, t.kind, t.name) for t in rg.grants_to)

    def granted(self, from_group: str, from_kind: str, from_ns: str, to_group: str, to_kind: str, to_ns: str,
                to_name: str) -> bool:
        """A ReferenceGrant in ``to_ns`` allows this reference (same namespace: always)."""
        if from_ns == to_ns:
            return True
        for group, kind, name in self._grants.get((to_ns, from_group, from_kind, from_ns), ()):
            if group == to_group and kind == to_kind and (name is None or name == to_name):
                return True
        return False

    def backend(self, route: Any, ref: g.ObjectRef, port: int | None,
                where: str) -> tuple[tuple[str, str, str] | None, RefProblem | None]:
        """The backend key of a backendRef of ``route``, or the problem."""
        ns = ref.namespace or route.namespace
        what = f"{ns}/{ref.name}" + (f":{port}" if port is not None else "")
        if (ref.group, ref.kind) != _SERVICE:
            kind = f"{ref.kind}" + (f" of group {ref.group}" if ref.group else "")
            return None, RefProblem("InvalidKind", f"backendRef {what}: kind {kind} is not supported (Service only)",
                                    where)
        if not self.granted(g.GROUP, route.kind, route.namespace, "", "Service", ns, ref.name):
            return None, RefProblem("RefNotPermitted", f"backendRef to Service {what} in another namespace is not "
                                                       f"allowed by any ReferenceGrant in namespace {ns}", where)
        svc = self.services.get((ns, ref.name))
        if svc is None:
            return None, RefProblem("BackendNotFound", f"Service {ns}/{ref.name} not found", where)
        for sp in svc.ports:
            if sp.port == port and sp.protocol == "TCP":
                return (ns, svc.name, sp.name or str(sp.port)), None
        return None, RefProblem("BackendNotFound", f"Service {ns}/{ref.name} has no TCP port {port}", where)


@dataclass(frozen=True, slots=True)
class MatchSpec:
    """One match of a rule: where it applies and its precedence counts."""
    index: int
    path_kind: str
    path: str
    regex: re.Pattern | None
    conditions: Conditions | None

    @property
    def counts(self) -> tuple[int, int, int]:
        return self.conditions.count if self.conditions is not None else (0, 0, 0)


@dataclass(slots=True, eq=False)
class CompiledRule:
    """One servable rule; ``action_for`` gives its Action on a listener (cached per scheme and
    port: only a redirect's defaults differ between listeners)."""
    index: int
    label: str                       # "ns/name/rule" for metrics and logs
    source: str                      # "HTTPRoute ns/name"
    matches: tuple[MatchSpec, ...]
    base: Action
    redirect: g.RedirectFilter | None
    _by_listener: dict[tuple[str, int], tuple[Action, tuple[Route, ...]]] = field(default_factory=dict)

    def action_for(self, scheme: str, port: int) -> Action:
        return self.routes_for(scheme, port)[0]

    def routes_for(self, scheme: str, port: int) -> tuple[Action, tuple[Route, ...]]:
        """The Action and one Route per match, for a listener of ``scheme`` on ``port``."""
        key = (scheme, port)
        hit = self._by_listener.get(key)
        if hit is not None:
            return hit
        action = self.base
        r = self.redirect
        if r is not None:
            # The API's defaults: an explicit port; else the scheme's well-known port when the
            # scheme is set; else the listener's port. The exchange leaves 80 / 443 out of the
            # Location when they are the scheme's default.
            out_scheme = r.scheme or scheme
            out_port = r.port if r.port is not None else (DEFAULT_PORTS[r.scheme] if r.scheme else port)
            path_kind = r.path.type if r.path is not None else None
            action = _replace_action(action, redirect=Redirect(
                status=r.status_code, scheme=out_scheme, hostname=r.hostname, port=out_port, path_kind=path_kind,
                path=r.path.value if r.path is not None else ""))
        routes = tuple(Route(name=self.label, source=self.source, host=None, path_kind=m.path_kind, path=m.path,
                             action=action, conditions=m.conditions, regex=m.regex,
                             written_kind=_WRITTEN.get(m.path_kind, ""))
                       for m in self.matches)
        self._by_listener[key] = (action, routes)
        return action, routes


_WRITTEN = {PREFIX: "PathPrefix"}


def _replace_action(a: Action, **changes: Any) -> Action:
    fields = {f: getattr(a, f) for f in ("backends", "timeout", "request_timeout", "per_try_timeout", "attempts",
                                         "retry_on", "request_headers", "response_headers", "redirect", "rewrite",
                                         "mirrors", "fault", "filters", "invalid_status")}
    fields.update(changes)
    return Action(**fields)


@dataclass(slots=True)
class CompiledRoute:
    """The listener-independent part of an HTTPRoute or GRPCRoute."""
    route: Any
    rules: list[CompiledRule]
    dropped: list[tuple[int, str]]            # (rule index, why) of rules that cannot be served
    ref_problems: list[RefProblem]            # unresolved references (ResolvedRefs: False)

    @property
    def rank_base(self) -> tuple:
        return ingress_rank(self.route.meta.creation_timestamp, f"{self.route.namespace}/{self.route.name}")


# --------------------------------------------------------------------------------------------


def _edits(hm: g.HeaderModifier | None) -> HeaderEdits | None:
    if hm is None:
        return None
    enc = str.encode
    return HeaderEdits(set=tuple((n.lower().encode(), enc(v)) for n, v in hm.set),
                       add=tuple((n.lower().encode(), enc(v)) for n, v in hm.add),
                       remove=tuple(n.lower().encode() for n in hm.remove))


def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _header_matches(ms: tuple[g.ValueMatch, ...]) -> tuple[HeaderMatch, ...]:
    out, seen = [], set()
    for m in ms:
        name = m.name.lower()
        if name in seen:          # only the first entry of an equivalent name counts
            continue
        seen.add(name)
        if m.type == "RegularExpression":
            out.append(HeaderMatch(name.encode(), regex=_regex(m.value)))
        else:
            out.append(HeaderMatch(name.encode(), m.value.encode()))
    return tuple(out)


def _query_matches(ms: tuple[g.ValueMatch, ...]) -> tuple[QueryMatch, ...]:
    out, seen = [], set()
    for m in ms:
        if m.name in seen:
            continue
        seen.add(m.name)
        out.append(QueryMatch(m.name, regex=_regex(m.value)) if m.type == "RegularExpression"
                   else QueryMatch(m.name, m.value))
    return tuple(out)


def _conditions(method: str | None, headers: tuple[HeaderMatch, ...],
                query: tuple[QueryMatch, ...]) -> Conditions | None:
    if method is None and not headers and not query:
        return None
    return Conditions(method=method.encode() if method else None, headers=headers, query=query)


def _http_matches(rule: g.HTTPRule) -> tuple[MatchSpec, ...]:
    out = []
    for i, m in enumerate(rule.matches or (g.HTTPMatch(),)):
        kind = {"Exact": EXACT, "PathPrefix": PREFIX}.get(m.path.type, REGEX)
        rx = _regex(m.path.value) if kind == REGEX else None
        out.append(MatchSpec(i, kind, m.path.value, rx,
                             _conditions(m.method, _header_matches(m.headers), _query_matches(m.query))))
    return tuple(out)


def _grpc_matches(rule: g.GRPCRule) -> tuple[MatchSpec, ...]:
    out = []
    for i, m in enumerate(rule.matches or (g.GRPCMatch(),)):
        cond = _conditions(None, _header_matches(m.headers), ())
        mm = m.method
        if mm is None:
            out.append(MatchSpec(i, PREFIX, "/", None, cond))
        elif mm.type == "Exact" and mm.service and mm.method:
            out.append(MatchSpec(i, EXACT, f"/{mm.service}/{mm.method}", None, cond))
        elif mm.type == "Exact" and mm.service:
            out.append(MatchSpec(i, PREFIX, f"/{mm.service}", None, cond))
        else:
            if mm.type == "Exact":
                svc, meth = re.escape(mm.service) if mm.service else "[^/]+", re.escape(mm.method or "")
            else:
                svc, meth = mm.service or "[^/]+", mm.method or "[^/]+"
            pattern = f"/(?:{svc})/(?:{meth})"
            out.append(MatchSpec(i, REGEX, pattern, _regex(pattern), cond))
    return tuple(out)


_BACKEND_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")


def compile_route(route: Any, refs: References, *, upstream_timeout: float) -> CompiledRoute:
    """Compile an HTTPRoute or GRPCRoute (see the module docstring)."""
    out = CompiledRoute(route, [], [], [])
    ns, name = route.namespace, route.name
    for ri, rule in enumerate(route.rules):
        where = f"spec.rules[{ri}]"
        label = f"{ns}/{name}/{rule.name if rule.name else ri}"
        why = _unsupported(rule, where)
        if why is not None:
            out.dropped.append((ri, why))
            continue
        try:
            matches = _http_matches(rule) if route.kind == "HTTPRoute" else _grpc_matches(rule)
        except re.error as exc:
            out.dropped.append((ri, f"{where}: regular expression {exc.pattern!r}: {exc}"))
            continue
        backends = []
        for bi, b in enumerate(rule.backends):
            bw = f"{where}.backendRefs[{bi}]"
            key, problem = refs.backend(route, b.ref, b.port, bw)
            if problem is not None:
                out.ref_problems.append(problem)
            req = resp = None
            for f in b.filters:
                if f.type == "RequestHeaderModifier":
                    req = _edits(f.request_headers)
                elif f.type == "ResponseHeaderModifier":
                    resp = _edits(f.response_headers)
            backends.append(BackendRef(key, b.weight, problem.reason if problem else None, req, resp))
        if backends and not any(b.weight > 0 for b in backends):
            backends = []       # every weight 0: nothing may receive traffic (answered 500)
        action, redirect = _rule_action(route, rule, where, refs, out, tuple(backends), upstream_timeout)
        out.rules.append(CompiledRule(ri, label, f"{route.kind} {ns}/{name}", matches, action, redirect))
    return out


def _unsupported(rule: Any, where: str) -> str | None:
    """Why meshproxy cannot serve ``rule`` as written (None: it can)."""
    if rule.session_persistence:
        return f"{where}.sessionPersistence: session persistence is not supported"
    retry = getattr(rule, "retry", None)
    if retry is not None and retry.backoff is not None:
        return f"{where}.retry.backoff: a minimum retry backoff is not supported"
    for fi, f in enumerate(rule.filters):
        if f.type in ("CORS", "ExternalAuth"):
            return f"{where}.filters[{fi}]: the {f.type} filter is not supported"
    for bi, b in enumerate(rule.backends):
        for fi, f in enumerate(b.filters):
            if f.type not in _BACKEND_FILTERS and f.type != "ExtensionRef":
                return f"{where}.backendRefs[{bi}].filters[{fi}]: {f.type} is not supported on a backendRef " \
                       f"(only RequestHeaderModifier and ResponseHeaderModifier)"
            if f.type == "ExtensionRef":
                return f"{where}.backendRefs[{bi}].filters[{fi}]: ExtensionRef is not supported on a backendRef"
    return None


def _rule_action(route: Any, rule: Any, where: str, refs: References, out: CompiledRoute,
                 backends: tuple[BackendRef, ...], upstream_timeout: float) -> tuple[Action, g.RedirectFilter | None]:
    req = resp = None
    redirect = rewrite = None
    mirrors: list[Mirror] = []
    fault: Fault | None = None
    nginx = None
    for fi, f in enumerate(rule.filters):
        fw = f"{where}.filters[{fi}]"
        if f.type == "RequestHeaderModifier":
            req = _edits(f.request_headers)
        elif f.type == "ResponseHeaderModifier":
            resp = _edits(f.response_headers)
        elif f.type == "RequestRedirect":
            redirect = f.redirect
        elif f.type == "URLRewrite" and f.rewrite is not None:
            p = f.rewrite.path
            rewrite = Rewrite(hostname=f.rewrite.hostname, path_kind=p.type if p else None, path=p.value if p else "")
        elif f.type == "RequestMirror" and f.mirror is not None:
            key, problem = refs.backend(route, f.mirror.backend, f.mirror.port, f"{fw}.requestMirror.backendRef")
            if problem is not None:
                out.ref_problems.append(problem)        # an invalid mirror is dropped
            else:
                mirrors.append(Mirror(key, f.mirror.percent))  # type: ignore[arg-type]
        elif f.type == "ExtensionRef" and f.extension is not None and f.extension.kind == "IngressNginxFilter" \
                and f.extension.group == g.FAULT_GROUP:
            nginx = _nginx_for(route, rule, f.extension, fw, refs, out, backends)
            if nginx is None:
                fault = _merge_fault(fault, Fault(abort_status=500, abort_percent=100.0))
        elif f.type == "ExtensionRef" and f.extension is not None:
            fault = _merge_fault(fault, _fault_for(route, f.extension, fw, refs, out))
    timeout, request_timeout, per_try, attempts, retry_on = upstream_timeout, None, None, 2, frozenset((502, 503, 504))
    t = getattr(rule, "timeouts", None)
    if t is not None and (t.request is not None or t.backend_request is not None):
        # The route's timeouts govern ("0s" disables one); the default read-gap timeout would
        # otherwise cut a longer one short.
        timeout = None
        request_timeout = t.request or None
        per_try = t.backend_request or None
    retry = getattr(rule, "retry", None)
    if retry is not None:
        attempts = 1 + (retry.attempts if retry.attempts is not None else 1)
        retry_on = frozenset(retry.codes)
    filters: tuple = ()
    intercept: tuple = ()
    connect_timeout = None
    if nginx is not None:
        filters, intercept, nrewrite, connect_timeout = nginx
        rewrite = nrewrite or rewrite
    action = Action(backends=backends, timeout=timeout, request_timeout=request_timeout, per_try_timeout=per_try,
                    attempts=attempts, retry_on=retry_on, request_headers=req, response_headers=resp,
                    rewrite=rewrite, mirrors=tuple(mirrors), fault=fault, invalid_status=500, filters=filters,
                    intercept=intercept, connect_timeout=connect_timeout)
    return action, redirect


def _nginx_for(route: Any, rule: Any, ext: g.ObjectRef, where: str, refs: References, out: CompiledRoute,
               backends: tuple[BackendRef, ...]):
    """(filters, intercept, rewrite, connect timeout) of an IngressNginxFilter, or None when it
    cannot be resolved or asks for what meshproxy refuses (the rule then answers 500)."""
    obj = refs.nginx_filters.get((route.namespace, ext.name))
    if obj is None:
        out.ref_problems.append(RefProblem("BackendNotFound", f"{where}.extensionRef: IngressNginxFilter "
                                           f"{route.namespace}/{ext.name} not found; requests matching this rule "
                                           "are answered 500", f"{where}.extensionRef"))
        return None
    pseudo = SimpleNamespace(meta=SimpleNamespace(annotations=obj.annotations), namespace=route.namespace,
                             name=obj.name)
    cfg = parse_nginx(pseudo, refs.secrets)
    if cfg.refused:
        out.ref_problems.append(RefProblem("InvalidKind", f"{where}.extensionRef: IngressNginxFilter "
                                           f"{route.namespace}/{ext.name}: {cfg.refused[0].annotation}: "
                                           f"{cfg.refused[0].message}", f"{where}.extensionRef"))
        return None
    ref = backends[0] if backends else BackendRef(None)
    port = ref.key[2] if ref.key is not None else ""
    error_key = None
    if cfg.default_backend:
        svc = refs.services.get((route.namespace, cfg.default_backend))
        if svc is not None and svc.ports:
            error_key = (route.namespace, svc.name, svc.ports[0].name or str(svc.ports[0].port))
    problems: list[str] = []
    chain, intercept = filter_chain(cfg, namespace=route.namespace, ingress=obj.name, host=None, path="/",
                                    ref=ref, port=port, service=ref.key[1] if ref.key else "", cert_hosts=frozenset(),
                                    error_key=error_key, default_key=None, problems=problems,
                                    where=f"{route.kind}/{route.namespace}/{route.name}")
    rewrite = Rewrite(path_kind="RegexReplace", path=cfg.rewrite_target) if "$" in cfg.rewrite_target else None
    has_connect = "nginx.ingress.kubernetes.io/proxy-connect-timeout" in obj.annotations
    return chain, intercept, rewrite, (cfg.connect_timeout if has_connect else None)


def _fault_for(route: Any, ext: g.ObjectRef, where: str, refs: References, out: CompiledRoute) -> Fault:
    """The Fault of an ExtensionRef filter; an unresolved one aborts every request with 500
    (a custom filter that cannot be resolved must not be skipped)."""
    if (ext.group, ext.kind) != (g.FAULT_GROUP, "FaultInjection"):
        out.ref_problems.append(RefProblem("InvalidKind", f"{where}.extensionRef: {ext.kind} of group {ext.group} is "
                                           f"not supported (only {g.FAULT_GROUP} FaultInjection); requests matching "
                                           "this rule are answered 500", f"{where}.extensionRef"))
        return Fault(abort_status=500, abort_percent=100.0)
    fi = refs.faults.get((route.namespace, ext.name))
    if fi is None:
        out.ref_problems.append(RefProblem("BackendNotFound", f"{where}.extensionRef: FaultInjection "
                                           f"{route.namespace}/{ext.name} not found; requests matching this rule "
                                           "are answered 500", f"{where}.extensionRef"))
        return Fault(abort_status=500, abort_percent=100.0)
    return Fault(delay=fi.delay, delay_percent=fi.delay_percent, abort_status=fi.abort_status,
                 abort_percent=fi.abort_percent)


def _merge_fault(a: Fault | None, b: Fault) -> Fault:
    """Several FaultInjection filters on one rule: the first delay and the first abort count."""
    if a is None:
        return b
    delay, dp = (a.delay, a.delay_percent) if a.delay_percent else (b.delay, b.delay_percent)
    status, ap = (a.abort_status, a.abort_percent) if a.abort_percent else (b.abort_status, b.abort_percent)
    return Fault(delay=delay, delay_percent=dp, abort_status=status, abort_percent=ap)
