"""Gateway API route kinds -> ``discovery.gateway_objects``: HTTPRoute, GRPCRoute, TLSRoute and
TCPRoute, with their CRDs' OpenAPI constraints and CEL rules (see ``discovery.gateway_api``,
which registers them): parentRefs, hostnames, rules, matches, filters, backendRefs, timeouts,
retries."""

from __future__ import annotations

import re
from typing import Any

from . import gateway_objects as g
from . import objects as o
from .gateway_fields import (GROUP_RX, HEADER_NAME_RX, KIND_RX, NAMESPACE_RX, PATH_CHARS_RX, SECTION_RX, Fields,
                             generation, is_hostname, parse_duration, read_hostname, read_items, read_mapping,
                             read_object_ref, read_pattern, read_port, with_fields)

__all__ = ["parse_http_route", "parse_grpc_route", "parse_tls_route", "parse_tcp_route", "V1ALPHA2"]

V1ALPHA2 = f"{g.GROUP}/v1alpha2"
_GRPC_SERVICE = re.compile(r"\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*\Z", re.I)
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*\Z")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_HTTP_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect",
                 "URLRewrite", "ExtensionRef", "CORS", "ExternalAuth")
_GRPC_FILTERS = ("ResponseHeaderModifier", "RequestHeaderModifier", "RequestMirror", "ExtensionRef")
_FILTER_FIELDS = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
                  "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite",
                  "ExtensionRef": "extensionRef", "CORS": "cors", "ExternalAuth": "externalAuth"}

# --------------------------------------------------------------------------------------------
# Routes: parentRefs, backendRefs, filters


def _parent_refs(ctx, spec: dict, fields: Fields) -> tuple[g.ParentRef, ...]:
    out: list[g.ParentRef] = []
    raw = read_items(ctx, spec, "parentRefs", "spec.parentRefs", hi=32)
    for i in range(len(raw)):
        p = f"spec.parentRefs[{i}]"
        r = read_mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        grp = read_pattern(ctx, r, "group", f"{p}.group", GROUP_RX, "API group", default=g.GROUP, lo=0)
        kind = read_pattern(ctx, r, "kind", f"{p}.kind", KIND_RX, "kind", default="Gateway", hi=63)
        name = ctx.str(r, "name", f"{p}.name", required=True)
        ns = read_pattern(ctx, r, "namespace", f"{p}.namespace", NAMESPACE_RX, "namespace", hi=63)
        section = read_pattern(ctx, r, "sectionName", f"{p}.sectionName", SECTION_RX, "section name")
        port = read_port(ctx, r, "port", f"{p}.port")
        if name is not None and grp is not None and kind is not None:
            out.append(g.ParentRef(grp, kind, name, ns or None, section or None, port))
    # The CEL rules on parentRefs: two references to the same parent must both name a section
    # (or a port), and different ones.
    for i, a in enumerate(out):
        for j in range(i + 1, len(out)):
            b = out[j]
            if (a.group, a.kind, a.name, a.namespace or "") != (b.group, b.kind, b.name, b.namespace or ""):
                continue
            if (a.section_name is None) != (b.section_name is None) or (a.port is None) != (b.port is None):
                ctx.error(f"spec.parentRefs[{j}]", "sectionName or port must be specified when parentRefs includes "
                                                   "2 or more references to the same parent", spec.get("parentRefs"), j)
            elif (a.section_name, a.port) == (b.section_name, b.port):
                ctx.error(f"spec.parentRefs[{j}]", "sectionName or port must be unique when parentRefs includes 2 or "
                                                   "more references to the same parent", spec.get("parentRefs"), j)
    return tuple(out)


def _backend_ref(ctx, r: dict, p: str, *, weighted: bool = True) -> tuple[g.ObjectRef | None, int | None, int]:
    ref = read_object_ref(ctx, r, p, default_kind="Service")
    port = read_port(ctx, r, "port", f"{p}.port")
    if ref is not None and ref.group == "" and ref.kind == "Service" and "port" not in r:
        ctx.error(f"{p}.port", "Must have port for Service reference", r)
    weight = 1
    if weighted:
        weight = ctx.int(r, "weight", f"{p}.weight", default=1, lo=0, hi=1_000_000)
        weight = 1 if weight is None else weight
    return ref, port, weight


def _header_modifier(ctx, f: dict, key: str, p: str) -> g.HeaderModifier | None:
    hm = ctx.map(f, key, p)
    if hm is None:
        return None
    out: dict[str, tuple] = {}
    for part in ("set", "add"):
        pairs = []
        raw = read_items(ctx, hm, part, f"{p}.{part}", hi=16)
        seen: set[str] = set()
        for i in range(len(raw)):
            hp = f"{p}.{part}[{i}]"
            h = read_mapping(ctx, raw, i, hp)
            if h is None:
                continue
            name = read_pattern(ctx, h, "name", f"{hp}.name", HEADER_NAME_RX, "header name", required=True, hi=256)
            value = ctx.str(h, "value", f"{hp}.value", required=True)
            if value is not None and not 1 <= len(value) <= 4096:
                ctx.error(f"{hp}.value", "must be 1-4096 characters long", h, "value")
            if name is None or value is None:
                continue
            if name in seen:
                ctx.error(f"{hp}.name", f"duplicate entry {name!r} (names are a map key)", h, "name")
            seen.add(name)
            pairs.append((name, value))
        out[part] = tuple(pairs)
    removes = []
    raw = read_items(ctx, hm, "remove", f"{p}.remove", hi=16)
    for i, name in enumerate(raw):
        if not isinstance(name, str) or not name:
            ctx.error(f"{p}.remove[{i}]", "must be a header name", raw, i)
        elif name in removes:
            ctx.error(f"{p}.remove[{i}]", f"duplicate entry {name!r}", raw, i)
        else:
            removes.append(name)
    return g.HeaderModifier(set=out["set"], add=out["add"], remove=tuple(removes))


def _path_modifier(ctx, parent: dict, p: str) -> g.PathModifier | None:
    pm = ctx.map(parent, "path", p)
    if pm is None:
        return None
    ptype = ctx.str(pm, "type", f"{p}.type", required=True, choices=("ReplaceFullPath", "ReplacePrefixMatch"))
    full = ctx.str(pm, "replaceFullPath", f"{p}.replaceFullPath")
    prefix = ctx.str(pm, "replacePrefixMatch", f"{p}.replacePrefixMatch")
    for value, key in ((full, "replaceFullPath"), (prefix, "replacePrefixMatch")):
        if value is not None and len(value) > 1024:
            ctx.error(f"{p}.{key}", "must be at most 1024 characters", pm, key)
    if ptype == "ReplaceFullPath" and full is None:
        ctx.error(p, "replaceFullPath must be specified when type is set to 'ReplaceFullPath'", pm)
    if full is not None and ptype != "ReplaceFullPath":
        ctx.error(p, "type must be 'ReplaceFullPath' when replaceFullPath is set", pm)
    if ptype == "ReplacePrefixMatch" and prefix is None:
        ctx.error(p, "replacePrefixMatch must be specified when type is set to 'ReplacePrefixMatch'", pm)
    if prefix is not None and ptype != "ReplacePrefixMatch":
        ctx.error(p, "type must be 'ReplacePrefixMatch' when replacePrefixMatch is set", pm)
    if ptype is None:
        return None
    return g.PathModifier(ptype, (full if ptype == "ReplaceFullPath" else prefix) or "")


def _filters(ctx, parent: dict, key: str, p: str, allowed: tuple[str, ...], fields: Fields | None) -> tuple[g.Filter, ...]:
    out: list[g.Filter] = []
    raw = read_items(ctx, parent, key, p, hi=16)
    counts: dict[str, int] = {}
    for i in range(len(raw)):
        fp = f"{p}[{i}]"
        f = read_mapping(ctx, raw, i, fp)
        if f is None:
            continue
        if fields is not None:
            fields.add(fp, raw, i)
        ftype = ctx.str(f, "type", f"{fp}.type", required=True, choices=allowed)
        for other, fld in _FILTER_FIELDS.items():
            if fld in f and other != ftype and ftype is not None:
                ctx.error(f"{fp}.{fld}", f"filter.{fld} must be nil if the filter.type is not {other}", f, fld)
        if ftype is None:
            continue
        fld = _FILTER_FIELDS[ftype]
        if fld not in f:
            ctx.error(fp, f"filter.{fld} must be specified for {ftype} filter.type", f)
            continue
        counts[ftype] = counts.get(ftype, 0) + 1
        kw: dict[str, Any] = {}
        if ftype == "RequestHeaderModifier":
            kw["request_headers"] = _header_modifier(ctx, f, fld, f"{fp}.{fld}")
        elif ftype == "ResponseHeaderModifier":
            kw["response_headers"] = _header_modifier(ctx, f, fld, f"{fp}.{fld}")
        elif ftype == "RequestRedirect":
            kw["redirect"] = _redirect(ctx, ctx.map(f, fld, f"{fp}.{fld}") or {}, f"{fp}.{fld}")
        elif ftype == "URLRewrite":
            rw = ctx.map(f, fld, f"{fp}.{fld}") or {}
            kw["rewrite"] = g.RewriteFilter(hostname=read_hostname(ctx, rw, "hostname", f"{fp}.{fld}.hostname", precise=True),
                                            path=_path_modifier(ctx, rw, f"{fp}.{fld}.path"))
        elif ftype == "RequestMirror":
            kw["mirror"] = _mirror(ctx, ctx.map(f, fld, f"{fp}.{fld}") or {}, f"{fp}.{fld}")
        elif ftype == "ExtensionRef":
            ext = ctx.map(f, fld, f"{fp}.{fld}") or {}
            grp = read_pattern(ctx, ext, "group", f"{fp}.{fld}.group", GROUP_RX, "API group", required=True, lo=0)
            kind = read_pattern(ctx, ext, "kind", f"{fp}.{fld}.kind", KIND_RX, "kind", required=True, hi=63)
            name = ctx.str(ext, "name", f"{fp}.{fld}.name", required=True)
            if grp is not None and kind and name:
                kw["extension"] = g.ObjectRef(grp, kind, name)
        out.append(g.Filter(type=ftype, **kw))
    if counts.get("RequestRedirect") and counts.get("URLRewrite"):
        ctx.error(p, "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both",
                  parent, key)
    for ftype in ("CORS", "RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite"):
        if counts.get(ftype, 0) > 1:
            ctx.error(p, f"{ftype} filter cannot be repeated", parent, key)
    return tuple(out)


def _redirect(ctx, r: dict, p: str) -> g.RedirectFilter:
    return g.RedirectFilter(
        scheme=ctx.str(r, "scheme", f"{p}.scheme", choices=("http", "https")),
        hostname=read_hostname(ctx, r, "hostname", f"{p}.hostname", precise=True),
        path=_path_modifier(ctx, r, f"{p}.path"),
        port=read_port(ctx, r, "port", f"{p}.port"),
        status_code=_status_code(ctx, r, f"{p}.statusCode"))


def _status_code(ctx, r: dict, p: str) -> int:
    code = ctx.int(r, "statusCode", p, default=302)
    if code not in (301, 302, 303, 307, 308):
        ctx.error(p, f"unsupported value {code!r}: must be one of 301, 302, 303, 307, 308", r, "statusCode")
        return 302
    return code


def _mirror(ctx, mr: dict, p: str) -> g.MirrorFilter | None:
    b = ctx.map(mr, "backendRef", f"{p}.backendRef", required=True)
    if b is None:
        return None
    ref, port, _ = _backend_ref(ctx, b, f"{p}.backendRef", weighted=False)
    percent = 100.0
    if "percent" in mr and "fraction" in mr:
        ctx.error(p, "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter", mr)
    if "percent" in mr:
        percent = float(ctx.int(mr, "percent", f"{p}.percent", lo=0, hi=100) or 0)
    fr = ctx.map(mr, "fraction", f"{p}.fraction")
    if fr is not None:
        num = ctx.int(fr, "numerator", f"{p}.fraction.numerator", required=True, lo=0)
        den = ctx.int(fr, "denominator", f"{p}.fraction.denominator", default=100, lo=1)
        if num is not None and den is not None:
            if num > den:
                ctx.error(f"{p}.fraction", "numerator must be less than or equal to denominator", mr, "fraction")
            else:
                percent = 100.0 * num / den
    if ref is None:
        return None
    return g.MirrorFilter(backend=ref, port=port, percent=percent)


def _backends(ctx, rule: dict, p: str, filter_types: tuple[str, ...], fields: Fields, *, lo: int = 0,
              filters: bool = True) -> tuple[g.BackendRef, ...]:
    out = []
    raw = read_items(ctx, rule, "backendRefs", f"{p}.backendRefs", lo=lo, hi=16, required=bool(lo))
    for i in range(len(raw)):
        bp = f"{p}.backendRefs[{i}]"
        b = read_mapping(ctx, raw, i, bp)
        if b is None:
            continue
        fields.add(bp, raw, i)
        ref, port, weight = _backend_ref(ctx, b, bp)
        flt: tuple[g.Filter, ...] = ()
        if filters:
            flt = _filters(ctx, b, "filters", f"{bp}.filters", filter_types, None)
        if ref is not None:
            out.append(g.BackendRef(ref, port, weight, flt))
    return tuple(out)


def _hostnames(ctx, spec: dict, *, hi: int = 16, required: bool = False) -> tuple[str, ...]:
    out = []
    raw = read_items(ctx, spec, "hostnames", "spec.hostnames", lo=1 if required else 0, hi=hi, required=required)
    for i, h in enumerate(raw):
        if not isinstance(h, str) or not is_hostname(h):
            ctx.error(f"spec.hostnames[{i}]", f"{h!r} is not a valid hostname (a DNS name, optionally '*.' first); "
                                              "IP addresses are not allowed", raw, i)
        else:
            out.append(h)
    return tuple(out)


def _rule_name(ctx, rule: dict, p: str, names: dict[str, int]) -> str | None:
    name = read_pattern(ctx, rule, "name", f"{p}.name", SECTION_RX, "rule name (DNS subdomain)")
    if name is not None:
        if name in names:
            ctx.error(f"{p}.name", f"Rule name must be unique within the route ({name!r} is also "
                                   f"spec.rules[{names[name]}])", rule, "name")
        names.setdefault(name, int(p.rsplit("[", 1)[1][:-1]))
    return name


def _value_matches(ctx, parent: dict, key: str, p: str, what: str) -> tuple[g.ValueMatch, ...]:
    out = []
    raw = read_items(ctx, parent, key, p, hi=16)
    seen: dict[str, int] = {}
    for i in range(len(raw)):
        hp = f"{p}[{i}]"
        h = read_mapping(ctx, raw, i, hp)
        if h is None:
            continue
        mtype = ctx.str(h, "type", f"{hp}.type", default="Exact", choices=("Exact", "RegularExpression")) or "Exact"
        name = read_pattern(ctx, h, "name", f"{hp}.name", HEADER_NAME_RX, f"{what} name", required=True, hi=256)
        value = ctx.str(h, "value", f"{hp}.value", required=True)
        if value is not None and not 1 <= len(value) <= (4096 if what == "header" else 1024):
            ctx.error(f"{hp}.value", f"must be 1-{4096 if what == 'header' else 1024} characters long", h, "value")
        if name is None or value is None:
            continue
        if name in seen:
            ctx.error(f"{hp}.name", f"duplicate entry {name!r} (also {p}[{seen[name]}]; names are a map key)", h, "name")
        seen.setdefault(name, i)
        out.append(g.ValueMatch(mtype, name, value))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# HTTPRoute


def _path_match(ctx, m: dict, p: str) -> g.PathMatch:
    pm = ctx.map(m, "path", f"{p}.path")
    if pm is None:
        return g.PathMatch()
    ptype = ctx.str(pm, "type", f"{p}.path.type", default="PathPrefix") or "PathPrefix"
    value = ctx.str(pm, "value", f"{p}.path.value", default="/")
    value = "/" if value is None else value
    vp = f"{p}.path.value"
    if len(value) > 1024:
        ctx.error(vp, "must be at most 1024 characters", pm, "value")
    if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
        ctx.error(f"{p}.path.type", "type must be one of ['Exact', 'PathPrefix', 'RegularExpression']", pm, "type")
    elif ptype != "RegularExpression":
        kinds = "when type one of ['Exact', 'PathPrefix']"
        if not value.startswith("/"):
            ctx.error(vp, f"value must be an absolute path and start with '/' {kinds}", pm, "value")
        for seq in ("//", "/./", "/../", "%2f", "%2F", "#"):
            if seq in value:
                ctx.error(vp, f"must not contain {seq!r} {kinds}", pm, "value")
        for suffix in ("/..", "/."):
            if value.endswith(suffix):
                ctx.error(vp, f"must not end with {suffix!r} {kinds}", pm, "value")
        if not PATH_CHARS_RX.match(value):
            ctx.error(vp, "must only contain valid characters (matching ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$) "
                          "for types ['Exact', 'PathPrefix']", pm, "value")
    return g.PathMatch(ptype, value)


def _http_match(ctx, m: dict, p: str) -> g.HTTPMatch:
    return g.HTTPMatch(path=_path_match(ctx, m, p),
                       headers=_value_matches(ctx, m, "headers", f"{p}.headers", "header"),
                       query=_value_matches(ctx, m, "queryParams", f"{p}.queryParams", "query parameter"),
                       method=ctx.str(m, "method", f"{p}.method", choices=_METHODS))


def _timeouts(ctx, rule: dict, p: str) -> g.Timeouts | None:
    t = ctx.map(rule, "timeouts", f"{p}.timeouts")
    if t is None:
        return None
    vals: dict[str, float | None] = {}
    for key, attr in (("request", "request"), ("backendRequest", "backend_request")):
        text = ctx.str(t, key, f"{p}.timeouts.{key}")
        if text is None:
            vals[attr] = None
            continue
        d = parse_duration(text)
        if d is None:
            ctx.error(f"{p}.timeouts.{key}", f"{text!r} is not a duration (GEP-2257: e.g. 500ms, 10s, 1h30m)", t, key)
        vals[attr] = d
    req, be = vals.get("request"), vals.get("backend_request")
    if req is not None and be is not None and req != 0 and be > req:
        ctx.error(f"{p}.timeouts", "backendRequest timeout cannot be longer than request timeout", rule, "timeouts")
    return g.Timeouts(**vals)


def _retry(ctx, rule: dict, p: str) -> g.Retry | None:
    r = ctx.map(rule, "retry", f"{p}.retry")
    if r is None:
        return None
    codes = []
    raw = read_items(ctx, r, "codes", f"{p}.retry.codes", hi=1000)
    for i, c in enumerate(raw):
        if isinstance(c, bool) or not isinstance(c, int) or not 400 <= c <= 599:
            ctx.error(f"{p}.retry.codes[{i}]", f"{c!r} must be a status code from 400 to 599", raw, i)
        elif c in codes:
            ctx.error(f"{p}.retry.codes[{i}]", f"duplicate entry {c}", raw, i)
        else:
            codes.append(c)
    attempts = ctx.int(r, "attempts", f"{p}.retry.attempts", lo=1)
    backoff = None
    text = ctx.str(r, "backoff", f"{p}.retry.backoff")
    if text is not None:
        backoff = parse_duration(text)
        if backoff is None:
            ctx.error(f"{p}.retry.backoff", f"{text!r} is not a duration (GEP-2257)", r, "backoff")
    return g.Retry(tuple(codes), attempts, backoff)


def parse_http_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.HTTPRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = Fields()
    parents = _parent_refs(ctx, spec, fields)
    hostnames = _hostnames(ctx, spec)
    rules: list[g.HTTPRule] = []
    names: dict[str, int] = {}
    if "rules" not in spec:
        rules.append(g.HTTPRule())
    raw = read_items(ctx, spec, "rules", "spec.rules", lo=1 if "rules" in spec else 0, hi=16)
    total = 0
    for i in range(len(raw)):
        p = f"spec.rules[{i}]"
        r = read_mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        name = _rule_name(ctx, r, p, names)
        matches: list[g.HTTPMatch] = []
        if "matches" in r:
            mraw = read_items(ctx, r, "matches", f"{p}.matches", hi=64)
            for j in range(len(mraw)):
                mp = f"{p}.matches[{j}]"
                mm = read_mapping(ctx, mraw, j, mp)
                if mm is not None:
                    fields.add(mp, mraw, j)
                    matches.append(_http_match(ctx, mm, mp))
            total += len(mraw)
        else:
            matches.append(g.HTTPMatch())
            total += 1
        filters = _filters(ctx, r, "filters", f"{p}.filters", _HTTP_FILTERS[:-1], fields)
        backends = _backends(ctx, r, p, _HTTP_FILTERS[:-2], fields)
        _check_rule_filters(ctx, r, p, matches, filters, backends)
        rules.append(g.HTTPRule(name=name, matches=tuple(matches),
                                filters=filters, backends=backends, timeouts=_timeouts(ctx, r, p),
                                retry=_retry(ctx, r, p), session_persistence="sessionPersistence" in r))
    if total > 128:
        ctx.error("spec.rules", "While 16 rules and 64 matches per rule are allowed, the total number of matches "
                                "across all rules in a route must be less than 128", spec, "rules")
    return g.HTTPRoute(meta=m, origin=with_fields(origin, fields), parents=parents, hostnames=hostnames,
                       rules=tuple(rules), generation=generation(doc))


def _check_rule_filters(ctx, r: dict, p: str, matches: list[g.HTTPMatch], filters: tuple[g.Filter, ...],
                        backends: tuple[g.BackendRef, ...]) -> None:
    """The CEL rules of HTTPRouteRule."""
    if r.get("backendRefs") and any(f.type == "RequestRedirect" for f in filters):
        ctx.error(p, "RequestRedirect filter must not be used together with backendRefs", r)
    # Evaluated after the API server's defaulting: an absent match or path is PathPrefix "/".
    one_prefix = len(matches) == 1 and matches[0].path.type == "PathPrefix"

    def prefix_rewrites(fs: tuple[g.Filter, ...]) -> list[str]:
        out = []
        for f in fs:
            mod = f.redirect.path if f.redirect is not None else f.rewrite.path if f.rewrite is not None else None
            if mod is not None and mod.type == "ReplacePrefixMatch":
                out.append("RequestRedirect" if f.redirect is not None else "URLRewrite")
        return out

    for what in prefix_rewrites(filters):
        if not one_prefix:
            ctx.error(p, f"When using {what} filter with path.replacePrefixMatch, exactly one PathPrefix match "
                         "must be specified", r)
    for b in backends:
        for what in prefix_rewrites(b.filters):
            if not one_prefix:
                ctx.error(p, f"Within backendRefs, when using {what} filter with path.replacePrefixMatch, exactly "
                             "one PathPrefix match must be specified", r)


# --------------------------------------------------------------------------------------------
# GRPCRoute


def _grpc_match(ctx, m: dict, p: str) -> g.GRPCMatch:
    method = None
    mm = ctx.map(m, "method", f"{p}.method")
    if mm is not None:
        mtype = ctx.str(mm, "type", f"{p}.method.type", default="Exact", choices=("Exact", "RegularExpression")) or "Exact"
        svc = ctx.str(mm, "service", f"{p}.method.service")
        meth = ctx.str(mm, "method", f"{p}.method.method")
        for value, key in ((svc, "service"), (meth, "method")):
            if value is not None and len(value) > 1024:
                ctx.error(f"{p}.method.{key}", "must be at most 1024 characters", mm, key)
        if svc is None and meth is None:
            ctx.error(f"{p}.method", "One or both of 'service' or 'method' must be specified", mm)
        if mtype == "Exact":
            if svc is not None and not _GRPC_SERVICE.match(svc):
                ctx.error(f"{p}.method.service", "service must only contain valid characters (matching "
                                                 "^(?i)\\.?[a-z_][a-z_0-9]*(\\.[a-z_][a-z_0-9]*)*$)", mm, "service")
            if meth is not None and not _GRPC_METHOD.match(meth):
                ctx.error(f"{p}.method.method", "method must only contain valid characters (matching "
                                                "^[A-Za-z_][A-Za-z_0-9]*$)", mm, "method")
        method = g.GRPCMethodMatch(mtype, svc or None, meth or None)
    return g.GRPCMatch(method=method, headers=_value_matches(ctx, m, "headers", f"{p}.headers", "header"))


def parse_grpc_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.GRPCRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = Fields()
    parents = _parent_refs(ctx, spec, fields)
    hostnames = _hostnames(ctx, spec)
    rules: list[g.GRPCRule] = []
    names: dict[str, int] = {}
    raw = read_items(ctx, spec, "rules", "spec.rules", hi=16)
    total = 0
    for i in range(len(raw)):
        p = f"spec.rules[{i}]"
        r = read_mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        name = _rule_name(ctx, r, p, names)
        matches = []
        mraw = read_items(ctx, r, "matches", f"{p}.matches", hi=64)
        total += len(mraw)
        for j in range(len(mraw)):
            mp = f"{p}.matches[{j}]"
            mm = read_mapping(ctx, mraw, j, mp)
            if mm is not None:
                fields.add(mp, mraw, j)
                matches.append(_grpc_match(ctx, mm, mp))
        filters = _filters(ctx, r, "filters", f"{p}.filters", _GRPC_FILTERS, fields)
        backends = _backends(ctx, r, p, _GRPC_FILTERS, fields)
        rules.append(g.GRPCRule(name=name, matches=tuple(matches), filters=filters, backends=backends,
                                session_persistence="sessionPersistence" in r))
    if total > 128:
        ctx.error("spec.rules", "While 16 rules and 64 matches per rule are allowed, the total number of matches "
                                "across all rules in a route must be less than 128", spec, "rules")
    return g.GRPCRoute(meta=m, origin=with_fields(origin, fields), parents=parents, hostnames=hostnames,
                       rules=tuple(rules), generation=generation(doc))


# --------------------------------------------------------------------------------------------
# TLSRoute, TCPRoute


def _l4_rules(ctx, spec: dict, fields: Fields, *, max_rules: int) -> tuple[g.L4Rule, ...]:
    rules = []
    names: dict[str, int] = {}
    raw = read_items(ctx, spec, "rules", "spec.rules", lo=1, hi=max_rules, required=True)
    for i in range(len(raw)):
        p = f"spec.rules[{i}]"
        r = read_mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        name = _rule_name(ctx, r, p, names)
        rules.append(g.L4Rule(name, _backends(ctx, r, p, (), fields, lo=1, filters=False)))
    return tuple(rules)


def parse_tls_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.TLSRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = Fields()
    alpha2 = doc.get("apiVersion") == V1ALPHA2
    parents = _parent_refs(ctx, spec, fields)
    hostnames = _hostnames(ctx, spec, hi=1024, required=not alpha2)
    rules = _l4_rules(ctx, spec, fields, max_rules=16 if alpha2 else 1)
    return g.TLSRoute(meta=m, origin=with_fields(origin, fields), parents=parents, hostnames=hostnames, rules=rules,
                      generation=generation(doc))


def parse_tcp_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.TCPRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = Fields()
    parents = _parent_refs(ctx, spec, fields)
    rules = _l4_rules(ctx, spec, fields, max_rules=16 if doc.get("apiVersion") == V1ALPHA2 else 1)
    return g.TCPRoute(meta=m, origin=with_fields(origin, fields), parents=parents, rules=rules,
                      generation=generation(doc))


