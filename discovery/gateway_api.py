"""Gateway API manifests (and ``Namespace``, ``FaultInjection``) -> ``discovery.gateway_objects``.

Each parser takes the document context of ``discovery.manifests`` (``ctx``: ``error``,
``map``, ``list``, ``str``, ``int``, ``bool``, ``string_map``), the decoded document, its
``Meta`` and ``Origin``, and returns the object; every problem is a ``ctx.error`` naming the
field. What is refused here is exactly what the API server refuses when the upstream CRDs are
installed: the OpenAPI constraints (patterns, enums, lengths, ranges, required fields) and the
CEL rules (``x-kubernetes-validations``) of the release this follows (v1.6: Gateway,
GatewayClass, HTTPRoute, GRPCRoute, TLSRoute, TCPRoute and ReferenceGrant at v1, plus the
older versions users still have). A rule that only the experimental channel carries is
enforced too when the API's own documentation says MUST (unique rule names). Meaning-level
problems - a missing Service, a reference without a ReferenceGrant, conflicting listeners -
are not errors here: the API accepts them and they become status conditions
(``meshproxy.core.gateway``).

The origin of each object also records the lines of the list items that status and problems
blame (``spec.listeners[i]``, ``spec.parentRefs[i]``, ``spec.rules[i]``,
``spec.rules[i].backendRefs[j]`` ...), so a message points at the line to edit.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

from . import gateway_objects as g
from . import objects as o
from .selectors import SelectorError, selector_from_label_selector

__all__ = ["KINDS", "PARSERS", "CLUSTER_SCOPED", "parse_duration", "is_hostname"]

_V1, _V1B1, _V1A2, _V1A3 = (f"{g.GROUP}/{v}" for v in ("v1", "v1beta1", "v1alpha2", "v1alpha3"))
# (apiVersion, kind) accepted: the versions v1.6 serves and the older ones still found in
# manifests (their schemas are the same for every field meshproxy reads, except TLSRoute's and
# TCPRoute's rule counts and TLSRoute's required hostnames, checked per version below).
KINDS = {
    (_V1, "GatewayClass"), (_V1B1, "GatewayClass"),
    (_V1, "Gateway"), (_V1B1, "Gateway"),
    (_V1, "HTTPRoute"), (_V1B1, "HTTPRoute"),
    (_V1, "GRPCRoute"), (_V1A2, "GRPCRoute"),
    (_V1, "TLSRoute"), (_V1A3, "TLSRoute"), (_V1A2, "TLSRoute"),
    (_V1, "TCPRoute"), (_V1A2, "TCPRoute"),
    (_V1, "ReferenceGrant"), (_V1B1, "ReferenceGrant"), (_V1A2, "ReferenceGrant"),
    ("v1", "Namespace"),
    (f"{g.FAULT_GROUP}/v1alpha1", "FaultInjection"),
}
CLUSTER_SCOPED = frozenset({"GatewayClass", "Namespace"})

# --------------------------------------------------------------------------------------------
# The API's string types (apis/v1/shared_types.go)

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"
_HOSTNAME = re.compile(rf"(\*\.)?{_SUBDOMAIN}\Z")
_PRECISE_HOSTNAME = re.compile(rf"{_SUBDOMAIN}\Z")
_GROUP = re.compile(rf"({_SUBDOMAIN})?\Z")
_KIND = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?\Z")
_NAMESPACE = re.compile(rf"{_LABEL}\Z")
_SECTION = re.compile(rf"{_SUBDOMAIN}\Z")
_CONTROLLER = re.compile(rf"{_SUBDOMAIN}/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+\Z")
_PROTOCOL = re.compile(rf"([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?|{_SUBDOMAIN}/[A-Za-z0-9]+)\Z")
_ADDRESS_TYPE = re.compile(rf"(Hostname|IPAddress|NamedAddress|{_SUBDOMAIN}/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+)\Z")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+\Z")
_DURATION = re.compile(r"([0-9]{1,5}(h|m|s|ms)){1,4}\Z")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_PATH_CHARS = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+\Z")
_ANNOTATION_KEY = re.compile(rf"({_SUBDOMAIN}/)?([A-Za-z0-9][-A-Za-z0-9_.]{{0,61}})?[A-Za-z0-9]\Z")
_GRPC_SERVICE = re.compile(r"\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*\Z", re.I)
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*\Z")

_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_HTTP_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect",
                 "URLRewrite", "ExtensionRef", "CORS", "ExternalAuth")
_GRPC_FILTERS = ("ResponseHeaderModifier", "RequestHeaderModifier", "RequestMirror", "ExtensionRef")
_FILTER_FIELDS = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
                  "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite",
                  "ExtensionRef": "extensionRef", "CORS": "cors", "ExternalAuth": "externalAuth"}


def is_hostname(value: str, precise: bool = False) -> bool:
    """The API's ``Hostname`` (``PreciseHostname``: no wildcard), IPs excluded."""
    if not value or len(value) > 253:
        return False
    if not (_PRECISE_HOSTNAME if precise else _HOSTNAME).match(value):
        return False
    try:
        ipaddress.ip_address(value)
        return False
    except ValueError:
        return True


def parse_duration(text: str) -> float | None:
    """A GEP-2257 duration (``1h30m``, ``500ms``, ``0s``) in seconds; None when malformed."""
    if not isinstance(text, str) or not _DURATION.match(text):
        return None
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * unit[u] for n, u in _DURATION_PART.findall(text))


# --------------------------------------------------------------------------------------------
# Small helpers over the document context


def _item_line(container: Any, index: int) -> int | None:
    lines = getattr(container, "item_lines", None)
    return lines[index] if lines is not None and index < len(lines) else None


class _Fields:
    """Collects (field path, line) pairs for the object's Origin."""
    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []

    def add(self, path: str, container: Any, index: int) -> None:
        line = _item_line(container, index)
        if line is not None:
            self.items.append((path, line))


def _origin(origin: o.Origin, fields: _Fields) -> o.Origin:
    return dataclasses.replace(origin, fields=tuple(fields.items)) if fields.items else origin


def _generation(doc: dict) -> int:
    meta = doc.get("metadata")
    gen = meta.get("generation") if isinstance(meta, dict) else None
    return gen if isinstance(gen, int) and not isinstance(gen, bool) else 0


def _pattern(ctx, parent: dict, key: str, path: str, rx: re.Pattern, what: str, *, required: bool = False,
             default: str | None = None, lo: int = 1, hi: int = 253) -> str | None:
    value = ctx.str(parent, key, path, required=required, default=default)
    if value is None or (value == default and key not in parent):
        return value
    if not lo <= len(value) <= hi:
        ctx.error(path, f"{value!r} must be {lo}-{hi} characters long", parent, key)
        return None
    if not rx.match(value):
        ctx.error(path, f"{value!r} is not a valid {what}", parent, key)
        return None
    return value


def _hostname(ctx, parent: dict, key: str, path: str, *, precise: bool = False, required: bool = False) -> str | None:
    value = ctx.str(parent, key, path, required=required)
    if value is None:
        return None
    if not is_hostname(value, precise):
        what = "precise hostname (no wildcard)" if precise else "hostname (a DNS name, optionally '*.' first)"
        ctx.error(path, f"{value!r} is not a valid {what}; IP addresses are not allowed", parent, key)
        return None
    return value


def _items(ctx, parent: dict, key: str, path: str, *, lo: int = 0, hi: int, required: bool = False) -> list:
    raw = parent.get(key) if isinstance(parent, dict) else None
    if raw is None:
        if required or lo:
            ctx.error(path, "required field is missing", parent)
        return []
    items = ctx.list(parent, key, path)
    if not isinstance(raw, list):
        return []
    if len(items) < lo:
        ctx.error(path, f"must have at least {lo} item{'s' if lo > 1 else ''}", parent, key)
    if len(items) > hi:
        ctx.error(path, f"must have at most {hi} items", parent, key)
    return items


def _mapping(ctx, items: list, i: int, path: str) -> dict | None:
    item = items[i]
    if not isinstance(item, dict):
        ctx.error(path, "must be a mapping", items, i)
        return None
    return item


def _port(ctx, parent: dict, key: str, path: str, *, required: bool = False) -> int | None:
    return ctx.int(parent, key, path, required=required, lo=1, hi=65535)


# --------------------------------------------------------------------------------------------
# Namespace, GatewayClass, FaultInjection, ReferenceGrant


def _parse_namespace(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.Namespace:
    return g.Namespace(meta=m, origin=origin)


def _parse_gateway_class(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.GatewayClass:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    controller = _pattern(ctx, spec, "controllerName", "spec.controllerName", _CONTROLLER,
                          "controller name (DOMAIN/PATH)", required=True) or ""
    pref = None
    p = ctx.map(spec, "parametersRef", "spec.parametersRef")
    if p is not None:
        grp = _pattern(ctx, p, "group", "spec.parametersRef.group", _GROUP, "API group", required=True, lo=0)
        kind = _pattern(ctx, p, "kind", "spec.parametersRef.kind", _KIND, "kind", required=True, hi=63)
        name = ctx.str(p, "name", "spec.parametersRef.name", required=True)
        ns = _pattern(ctx, p, "namespace", "spec.parametersRef.namespace", _NAMESPACE, "namespace", hi=63)
        pref = (grp or "", kind or "", name or "", ns)
    desc = ctx.str(spec, "description", "spec.description")
    if desc is not None and len(desc) > 64:
        ctx.error("spec.description", "must be at most 64 characters", spec, "description")
    return g.GatewayClass(meta=m, origin=origin, controller=controller, parameters_ref=pref,
                          generation=_generation(doc))


def _parse_fault(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.FaultInjection:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    delay = ctx.map(spec, "delay", "spec.delay")
    abort = ctx.map(spec, "abort", "spec.abort")
    if delay is None and abort is None:
        ctx.error("spec", "one of delay or abort is required", doc, "spec")
    out: dict[str, Any] = {}
    if delay is not None:
        text = ctx.str(delay, "fixedDelay", "spec.delay.fixedDelay", required=True)
        d = parse_duration(text) if text is not None else None
        if text is not None and d is None:
            ctx.error("spec.delay.fixedDelay", f"{text!r} is not a duration (e.g. 500ms, 2s, 1m30s)", delay, "fixedDelay")
        out["delay"] = d or 0.0
        out["delay_percent"] = _percentage(ctx, delay, "spec.delay.percentage")
    if abort is not None:
        out["abort_status"] = ctx.int(abort, "httpStatus", "spec.abort.httpStatus", required=True, lo=200, hi=599) or 0
        out["abort_percent"] = _percentage(ctx, abort, "spec.abort.percentage")
    return g.FaultInjection(meta=m, origin=origin, **out)


def _percentage(ctx, parent: dict, path: str) -> float:
    value = parent.get("percentage", 100)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ctx.error(path, "must be a number from 0 to 100", parent, "percentage")
        return 0.0
    if not 0 <= value <= 100:
        ctx.error(path, f"{value} is outside 0-100", parent, "percentage")
        return 0.0
    return float(value)


def _parse_reference_grant(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.ReferenceGrant:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    froms, tos = [], []
    raw = _items(ctx, spec, "from", "spec.from", lo=1, hi=16, required=True)
    for i in range(len(raw)):
        p = f"spec.from[{i}]"
        f = _mapping(ctx, raw, i, p)
        if f is None:
            continue
        grp = _pattern(ctx, f, "group", f"{p}.group", _GROUP, "API group", required=True, lo=0)
        kind = _pattern(ctx, f, "kind", f"{p}.kind", _KIND, "kind", required=True, hi=63)
        ns = _pattern(ctx, f, "namespace", f"{p}.namespace", _NAMESPACE, "namespace", required=True, hi=63)
        if grp is not None and kind and ns:
            froms.append(g.GrantFrom(grp, kind, ns))
    raw = _items(ctx, spec, "to", "spec.to", lo=1, hi=16, required=True)
    for i in range(len(raw)):
        p = f"spec.to[{i}]"
        t = _mapping(ctx, raw, i, p)
        if t is None:
            continue
        grp = _pattern(ctx, t, "group", f"{p}.group", _GROUP, "API group", required=True, lo=0)
        kind = _pattern(ctx, t, "kind", f"{p}.kind", _KIND, "kind", required=True, hi=63)
        name = ctx.str(t, "name", f"{p}.name")
        if grp is not None and kind:
            tos.append(g.GrantTo(grp, kind, name or None))
    return g.ReferenceGrant(meta=m, origin=origin, grants_from=tuple(froms), grants_to=tuple(tos))


# --------------------------------------------------------------------------------------------
# Gateway


_TLS_FORBIDDEN = ("HTTP", "TCP", "UDP")


def _parse_gateway(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.Gateway:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = _Fields()
    cls = ctx.str(spec, "gatewayClassName", "spec.gatewayClassName", required=True) or ""
    if cls and len(cls) > 253:
        ctx.error("spec.gatewayClassName", "must be at most 253 characters", spec, "gatewayClassName")
    listeners: list[g.Listener] = []
    raw = _items(ctx, spec, "listeners", "spec.listeners", lo=1, hi=64, required=True)
    names: dict[str, int] = {}
    combos: dict[tuple, int] = {}
    for i in range(len(raw)):
        p = f"spec.listeners[{i}]"
        item = _mapping(ctx, raw, i, p)
        if item is None:
            continue
        fields.add(p, raw, i)
        lst = _listener(ctx, item, p, fields)
        if lst is None:
            continue
        if lst.name in names:
            ctx.error(f"{p}.name", f"Listener name must be unique within the Gateway ({lst.name!r} is also "
                                   f"spec.listeners[{names[lst.name]}])", item, "name")
        names.setdefault(lst.name, i)
        combo = (lst.port, lst.protocol, lst.hostname)
        if combo in combos:
            ctx.error(p, f"Combination of port, protocol and hostname must be unique for each listener (same as "
                         f"spec.listeners[{combos[combo]}])", raw, i)
        combos.setdefault(combo, i)
        listeners.append(lst)
    addresses: list[g.GatewayAddress] = []
    raw = _items(ctx, spec, "addresses", "spec.addresses", hi=16)
    seen: dict[tuple[str, str], int] = {}
    for i in range(len(raw)):
        p = f"spec.addresses[{i}]"
        a = _mapping(ctx, raw, i, p)
        if a is None:
            continue
        fields.add(p, raw, i)
        atype = _pattern(ctx, a, "type", f"{p}.type", _ADDRESS_TYPE, "address type", default="IPAddress") or "IPAddress"
        value = ctx.str(a, "value", f"{p}.value", default="") or ""
        if len(value) > 253:
            ctx.error(f"{p}.value", "must be at most 253 characters", a, "value")
        if atype == "Hostname" and value and not _HOSTNAME.match(value):
            ctx.error(f"{p}.value", "Hostname value must be empty or contain only valid characters", a, "value")
        if value and atype in ("IPAddress", "Hostname"):
            if (atype, value) in seen:
                ctx.error(f"{p}.value", f"{atype} values must be unique ({value!r} is also "
                                        f"spec.addresses[{seen[(atype, value)]}])", a, "value")
            seen.setdefault((atype, value), i)
        addresses.append(g.GatewayAddress(atype, value))
    return g.Gateway(meta=m, origin=_origin(origin, fields), class_name=cls, listeners=tuple(listeners),
                     addresses=tuple(addresses), generation=_generation(doc),
                     client_validation=_gateway_tls(ctx, spec))


def _gateway_tls(ctx, spec: dict) -> bool:
    """Checks spec.tls; True when it asks for client certificate validation."""
    tls = ctx.map(spec, "tls", "spec.tls")
    if tls is None:
        return False
    front = ctx.map(tls, "frontend", "spec.tls.frontend")
    if front is not None:
        ctx.map(front, "default", "spec.tls.frontend.default", required=True)
        ports = _items(ctx, front, "perPort", "spec.tls.frontend.perPort", hi=64)
        seen: set[int] = set()
        for i in range(len(ports)):
            pp = _mapping(ctx, ports, i, f"spec.tls.frontend.perPort[{i}]")
            if pp is None:
                continue
            port = _port(ctx, pp, "port", f"spec.tls.frontend.perPort[{i}].port", required=True)
            if port in seen:
                ctx.error(f"spec.tls.frontend.perPort[{i}].port", "Port for TLS configuration must be unique "
                                                                   "within the Gateway", pp, "port")
            seen.add(port or 0)
    return front is not None


def _listener(ctx, item: dict, p: str, fields: _Fields) -> g.Listener | None:
    name = _pattern(ctx, item, "name", f"{p}.name", _SECTION, "listener name (DNS subdomain)", required=True)
    hostname = _hostname(ctx, item, "hostname", f"{p}.hostname")
    port = _port(ctx, item, "port", f"{p}.port", required=True)
    protocol = _pattern(ctx, item, "protocol", f"{p}.protocol", _PROTOCOL, "protocol", required=True, hi=255)
    tls = None
    t = ctx.map(item, "tls", f"{p}.tls")
    if t is not None:
        tls = _listener_tls(ctx, t, f"{p}.tls", fields)
    if protocol in _TLS_FORBIDDEN and t is not None:
        ctx.error(f"{p}.tls", "tls must not be specified for protocols ['HTTP', 'TCP', 'UDP']", item, "tls")
    if protocol == "HTTPS" and tls is not None and tls.mode != "Terminate":
        ctx.error(f"{p}.tls.mode", "tls mode must be Terminate for protocol HTTPS", t, "mode")
    if protocol == "TLS" and t is None:
        ctx.error(f"{p}.tls", "tls mode must be set for protocol TLS", item)
    if protocol in ("TCP", "UDP") and hostname:
        ctx.error(f"{p}.hostname", "hostname must not be specified for protocols ['TCP', 'UDP']", item, "hostname")
    allowed = g.AllowedRoutes()
    a = ctx.map(item, "allowedRoutes", f"{p}.allowedRoutes")
    if a is not None:
        allowed = _allowed_routes(ctx, a, f"{p}.allowedRoutes")
    if name is None or port is None or protocol is None:
        return None
    return g.Listener(name=name, port=port, protocol=protocol, hostname=hostname, tls=tls, allowed=allowed)


def _listener_tls(ctx, t: dict, p: str, fields: _Fields) -> g.ListenerTLS:
    mode = ctx.str(t, "mode", f"{p}.mode", default="Terminate", choices=("Terminate", "Passthrough")) or "Terminate"
    refs = []
    raw = _items(ctx, t, "certificateRefs", f"{p}.certificateRefs", hi=64)
    for i in range(len(raw)):
        rp = f"{p}.certificateRefs[{i}]"
        r = _mapping(ctx, raw, i, rp)
        if r is None:
            continue
        fields.add(rp, raw, i)
        ref = _object_ref(ctx, r, rp, default_kind="Secret")
        if ref is not None:
            refs.append(ref)
    options = []
    opts = ctx.map(t, "options", f"{p}.options")
    if opts is not None:
        if len(opts) > 16:
            ctx.error(f"{p}.options", "must have at most 16 entries", t, "options")
        for k, v in opts.items():
            if not isinstance(k, str) or len(k) > 253 or not _ANNOTATION_KEY.match(k):
                ctx.error(f"{p}.options.{k}", "is not a valid option name (a qualified name)", opts, k)
            elif not isinstance(v, str) or len(v) > 4096:
                ctx.error(f"{p}.options.{k}", "must be a string of at most 4096 characters", opts, k)
            else:
                options.append((k, v))
    if mode == "Terminate" and not raw and not options:
        ctx.error(p, "certificateRefs or options must be specified when mode is Terminate", t)
    return g.ListenerTLS(mode=mode, certificate_refs=tuple(refs), options=tuple(options))


def _allowed_routes(ctx, a: dict, p: str) -> g.AllowedRoutes:
    ns = ctx.map(a, "namespaces", f"{p}.namespaces") or {}
    frm = ctx.str(ns, "from", f"{p}.namespaces.from", default="Same", choices=("All", "Selector", "Same")) or "Same"
    selector = None
    if "selector" in ns:
        try:
            selector = selector_from_label_selector(ns.get("selector"))
        except SelectorError as exc:
            ctx.error(f"{p}.namespaces.selector", str(exc), ns, "selector")
    kinds = []
    raw = _items(ctx, a, "kinds", f"{p}.kinds", hi=8)
    for i in range(len(raw)):
        kp = f"{p}.kinds[{i}]"
        k = _mapping(ctx, raw, i, kp)
        if k is None:
            continue
        grp = _pattern(ctx, k, "group", f"{kp}.group", _GROUP, "API group", default=g.GROUP, lo=0)
        kind = _pattern(ctx, k, "kind", f"{kp}.kind", _KIND, "kind", required=True, hi=63)
        if kind:
            kinds.append(g.RouteGroupKind(g.GROUP if grp is None else grp, kind))
    return g.AllowedRoutes(namespaces_from=frm, selector=selector, kinds=tuple(kinds))


def _object_ref(ctx, r: dict, p: str, default_kind: str, default_group: str = "") -> g.ObjectRef | None:
    grp = _pattern(ctx, r, "group", f"{p}.group", _GROUP, "API group", default=default_group, lo=0)
    kind = _pattern(ctx, r, "kind", f"{p}.kind", _KIND, "kind", default=default_kind, hi=63)
    name = ctx.str(r, "name", f"{p}.name", required=True)
    if name is not None and not 1 <= len(name) <= 253:
        ctx.error(f"{p}.name", "must be 1-253 characters long", r, "name")
    ns = _pattern(ctx, r, "namespace", f"{p}.namespace", _NAMESPACE, "namespace", hi=63)
    if name is None or kind is None or grp is None:
        return None
    return g.ObjectRef(grp, kind, name, ns)


# --------------------------------------------------------------------------------------------
# Routes: parentRefs, backendRefs, filters


def _parent_refs(ctx, spec: dict, fields: _Fields) -> tuple[g.ParentRef, ...]:
    out: list[g.ParentRef] = []
    raw = _items(ctx, spec, "parentRefs", "spec.parentRefs", hi=32)
    for i in range(len(raw)):
        p = f"spec.parentRefs[{i}]"
        r = _mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        grp = _pattern(ctx, r, "group", f"{p}.group", _GROUP, "API group", default=g.GROUP, lo=0)
        kind = _pattern(ctx, r, "kind", f"{p}.kind", _KIND, "kind", default="Gateway", hi=63)
        name = ctx.str(r, "name", f"{p}.name", required=True)
        ns = _pattern(ctx, r, "namespace", f"{p}.namespace", _NAMESPACE, "namespace", hi=63)
        section = _pattern(ctx, r, "sectionName", f"{p}.sectionName", _SECTION, "section name")
        port = _port(ctx, r, "port", f"{p}.port")
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
    ref = _object_ref(ctx, r, p, default_kind="Service")
    port = _port(ctx, r, "port", f"{p}.port")
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
        raw = _items(ctx, hm, part, f"{p}.{part}", hi=16)
        seen: set[str] = set()
        for i in range(len(raw)):
            hp = f"{p}.{part}[{i}]"
            h = _mapping(ctx, raw, i, hp)
            if h is None:
                continue
            name = _pattern(ctx, h, "name", f"{hp}.name", _HEADER_NAME, "header name", required=True, hi=256)
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
    raw = _items(ctx, hm, "remove", f"{p}.remove", hi=16)
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


def _filters(ctx, parent: dict, key: str, p: str, allowed: tuple[str, ...], fields: _Fields | None) -> tuple[g.Filter, ...]:
    out: list[g.Filter] = []
    raw = _items(ctx, parent, key, p, hi=16)
    counts: dict[str, int] = {}
    for i in range(len(raw)):
        fp = f"{p}[{i}]"
        f = _mapping(ctx, raw, i, fp)
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
            kw["rewrite"] = g.RewriteFilter(hostname=_hostname(ctx, rw, "hostname", f"{fp}.{fld}.hostname", precise=True),
                                            path=_path_modifier(ctx, rw, f"{fp}.{fld}.path"))
        elif ftype == "RequestMirror":
            kw["mirror"] = _mirror(ctx, ctx.map(f, fld, f"{fp}.{fld}") or {}, f"{fp}.{fld}")
        elif ftype == "ExtensionRef":
            ext = ctx.map(f, fld, f"{fp}.{fld}") or {}
            grp = _pattern(ctx, ext, "group", f"{fp}.{fld}.group", _GROUP, "API group", required=True, lo=0)
            kind = _pattern(ctx, ext, "kind", f"{fp}.{fld}.kind", _KIND, "kind", required=True, hi=63)
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
        hostname=_hostname(ctx, r, "hostname", f"{p}.hostname", precise=True),
        path=_path_modifier(ctx, r, f"{p}.path"),
        port=_port(ctx, r, "port", f"{p}.port"),
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


def _backends(ctx, rule: dict, p: str, filter_types: tuple[str, ...], fields: _Fields, *, lo: int = 0,
              filters: bool = True) -> tuple[g.BackendRef, ...]:
    out = []
    raw = _items(ctx, rule, "backendRefs", f"{p}.backendRefs", lo=lo, hi=16, required=bool(lo))
    for i in range(len(raw)):
        bp = f"{p}.backendRefs[{i}]"
        b = _mapping(ctx, raw, i, bp)
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
    raw = _items(ctx, spec, "hostnames", "spec.hostnames", lo=1 if required else 0, hi=hi, required=required)
    for i, h in enumerate(raw):
        if not isinstance(h, str) or not is_hostname(h):
            ctx.error(f"spec.hostnames[{i}]", f"{h!r} is not a valid hostname (a DNS name, optionally '*.' first); "
                                              "IP addresses are not allowed", raw, i)
        else:
            out.append(h)
    return tuple(out)


def _rule_name(ctx, rule: dict, p: str, names: dict[str, int]) -> str | None:
    name = _pattern(ctx, rule, "name", f"{p}.name", _SECTION, "rule name (DNS subdomain)")
    if name is not None:
        if name in names:
            ctx.error(f"{p}.name", f"Rule name must be unique within the route ({name!r} is also "
                                   f"spec.rules[{names[name]}])", rule, "name")
        names.setdefault(name, int(p.rsplit("[", 1)[1][:-1]))
    return name


def _value_matches(ctx, parent: dict, key: str, p: str, what: str) -> tuple[g.ValueMatch, ...]:
    out = []
    raw = _items(ctx, parent, key, p, hi=16)
    seen: dict[str, int] = {}
    for i in range(len(raw)):
        hp = f"{p}[{i}]"
        h = _mapping(ctx, raw, i, hp)
        if h is None:
            continue
        mtype = ctx.str(h, "type", f"{hp}.type", default="Exact", choices=("Exact", "RegularExpression")) or "Exact"
        name = _pattern(ctx, h, "name", f"{hp}.name", _HEADER_NAME, f"{what} name", required=True, hi=256)
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
        if not _PATH_CHARS.match(value):
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
    raw = _items(ctx, r, "codes", f"{p}.retry.codes", hi=1000)
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


def _parse_http_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.HTTPRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = _Fields()
    parents = _parent_refs(ctx, spec, fields)
    hostnames = _hostnames(ctx, spec)
    rules: list[g.HTTPRule] = []
    names: dict[str, int] = {}
    if "rules" not in spec:
        rules.append(g.HTTPRule())
    raw = _items(ctx, spec, "rules", "spec.rules", lo=1 if "rules" in spec else 0, hi=16)
    total = 0
    for i in range(len(raw)):
        p = f"spec.rules[{i}]"
        r = _mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        name = _rule_name(ctx, r, p, names)
        matches: list[g.HTTPMatch] = []
        if "matches" in r:
            mraw = _items(ctx, r, "matches", f"{p}.matches", hi=64)
            for j in range(len(mraw)):
                mp = f"{p}.matches[{j}]"
                mm = _mapping(ctx, mraw, j, mp)
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
    return g.HTTPRoute(meta=m, origin=_origin(origin, fields), parents=parents, hostnames=hostnames,
                       rules=tuple(rules), generation=_generation(doc))


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


def _parse_grpc_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.GRPCRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = _Fields()
    parents = _parent_refs(ctx, spec, fields)
    hostnames = _hostnames(ctx, spec)
    rules: list[g.GRPCRule] = []
    names: dict[str, int] = {}
    raw = _items(ctx, spec, "rules", "spec.rules", hi=16)
    total = 0
    for i in range(len(raw)):
        p = f"spec.rules[{i}]"
        r = _mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        name = _rule_name(ctx, r, p, names)
        matches = []
        mraw = _items(ctx, r, "matches", f"{p}.matches", hi=64)
        total += len(mraw)
        for j in range(len(mraw)):
            mp = f"{p}.matches[{j}]"
            mm = _mapping(ctx, mraw, j, mp)
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
    return g.GRPCRoute(meta=m, origin=_origin(origin, fields), parents=parents, hostnames=hostnames,
                       rules=tuple(rules), generation=_generation(doc))


# --------------------------------------------------------------------------------------------
# TLSRoute, TCPRoute


def _l4_rules(ctx, spec: dict, fields: _Fields, *, max_rules: int) -> tuple[g.L4Rule, ...]:
    rules = []
    names: dict[str, int] = {}
    raw = _items(ctx, spec, "rules", "spec.rules", lo=1, hi=max_rules, required=True)
    for i in range(len(raw)):
        p = f"spec.rules[{i}]"
        r = _mapping(ctx, raw, i, p)
        if r is None:
            continue
        fields.add(p, raw, i)
        name = _rule_name(ctx, r, p, names)
        rules.append(g.L4Rule(name, _backends(ctx, r, p, (), fields, lo=1, filters=False)))
    return tuple(rules)


def _parse_tls_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.TLSRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = _Fields()
    alpha2 = doc.get("apiVersion") == _V1A2
    parents = _parent_refs(ctx, spec, fields)
    hostnames = _hostnames(ctx, spec, hi=1024, required=not alpha2)
    rules = _l4_rules(ctx, spec, fields, max_rules=16 if alpha2 else 1)
    return g.TLSRoute(meta=m, origin=_origin(origin, fields), parents=parents, hostnames=hostnames, rules=rules,
                      generation=_generation(doc))


def _parse_tcp_route(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.TCPRoute:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = _Fields()
    parents = _parent_refs(ctx, spec, fields)
    rules = _l4_rules(ctx, spec, fields, max_rules=16 if doc.get("apiVersion") == _V1A2 else 1)
    return g.TCPRoute(meta=m, origin=_origin(origin, fields), parents=parents, rules=rules,
                      generation=_generation(doc))


PARSERS = {
    "Namespace": _parse_namespace, "GatewayClass": _parse_gateway_class, "Gateway": _parse_gateway,
    "HTTPRoute": _parse_http_route, "GRPCRoute": _parse_grpc_route, "TLSRoute": _parse_tls_route,
    "TCPRoute": _parse_tcp_route, "ReferenceGrant": _parse_reference_grant, "FaultInjection": _parse_fault,
}
