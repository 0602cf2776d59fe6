"""Gateway API manifests (and ``Namespace``, ``FaultInjection``) -> ``discovery.gateway_objects``.

Each parser takes the document context of ``discovery.manifest_fields`` (``ctx``: ``error``,
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

This module registers the kinds (``KINDS``, ``PARSERS``) and parses GatewayClass, Gateway,
ReferenceGrant, Namespace and FaultInjection; the route kinds are in
``discovery.gateway_route_kinds`` and the shared field checks in ``discovery.gateway_fields``.

The origin of each object also records the lines of the list items that status and problems
blame (``spec.listeners[i]``, ``spec.parentRefs[i]``, ``spec.rules[i]``,
``spec.rules[i].backendRefs[j]`` ...), so a message points at the line to edit.
"""

from __future__ import annotations

from typing import Any

from . import gateway_objects as g
from . import objects as o
from .gateway_fields import (ADDRESS_TYPE_RX, ANNOTATION_KEY_RX, CONTROLLER_RX, GROUP_RX, HOSTNAME_RX, KIND_RX,
                             NAMESPACE_RX, PROTOCOL_RX, SECTION_RX, Fields, generation, is_hostname, parse_duration,
                             read_hostname, read_items, read_mapping, read_object_ref, read_pattern, read_port,
                             with_fields)
from .gateway_route_kinds import parse_grpc_route, parse_http_route, parse_tcp_route, parse_tls_route
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
    (f"{g.FAULT_GROUP}/v1alpha1", "IngressNginxFilter"),
}
CLUSTER_SCOPED = frozenset({"GatewayClass", "Namespace"})

# --------------------------------------------------------------------------------------------
# Namespace, GatewayClass, FaultInjection, ReferenceGrant


def _parse_namespace(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.Namespace:
    return g.Namespace(meta=m, origin=origin)


def _parse_gateway_class(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.GatewayClass:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    controller = read_pattern(ctx, spec, "controllerName", "spec.controllerName", CONTROLLER_RX,
                          "controller name (DOMAIN/PATH)", required=True) or ""
    pref = None
    p = ctx.map(spec, "parametersRef", "spec.parametersRef")
    if p is not None:
        grp = read_pattern(ctx, p, "group", "spec.parametersRef.group", GROUP_RX, "API group", required=True, lo=0)
        kind = read_pattern(ctx, p, "kind", "spec.parametersRef.kind", KIND_RX, "kind", required=True, hi=63)
        name = ctx.str(p, "name", "spec.parametersRef.name", required=True)
        ns = read_pattern(ctx, p, "namespace", "spec.parametersRef.namespace", NAMESPACE_RX, "namespace", hi=63)
        pref = (grp or "", kind or "", name or "", ns)
    desc = ctx.str(spec, "description", "spec.description")
    if desc is not None and len(desc) > 64:
        ctx.error("spec.description", "must be at most 64 characters", spec, "description")
    return g.GatewayClass(meta=m, origin=origin, controller=controller, parameters_ref=pref,
                          generation=generation(doc))


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


def _parse_nginx_filter(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.IngressNginxFilter:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    ann = ctx.map(spec, "annotations", "spec.annotations", required=True) or {}
    out: dict[str, str] = {}
    for k, v in ann.items():
        if not isinstance(v, str):
            ctx.error(f"spec.annotations.{k}", "must be a string", ann, k)
            continue
        key = str(k) if "/" in str(k) else "nginx.ingress.kubernetes.io/" + str(k)
        if not key.startswith("nginx.ingress.kubernetes.io/"):
            ctx.error(f"spec.annotations.{k}", "must be an ingress-nginx annotation (nginx.ingress.kubernetes.io/...)",
                      ann, k)
            continue
        out[key] = v
    return g.IngressNginxFilter(meta=m, origin=origin, annotations=out)


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
    raw = read_items(ctx, spec, "from", "spec.from", lo=1, hi=16, required=True)
    for i in range(len(raw)):
        p = f"spec.from[{i}]"
        f = read_mapping(ctx, raw, i, p)
        if f is None:
            continue
        grp = read_pattern(ctx, f, "group", f"{p}.group", GROUP_RX, "API group", required=True, lo=0)
        kind = read_pattern(ctx, f, "kind", f"{p}.kind", KIND_RX, "kind", required=True, hi=63)
        ns = read_pattern(ctx, f, "namespace", f"{p}.namespace", NAMESPACE_RX, "namespace", required=True, hi=63)
        if grp is not None and kind and ns:
            froms.append(g.GrantFrom(grp, kind, ns))
    raw = read_items(ctx, spec, "to", "spec.to", lo=1, hi=16, required=True)
    for i in range(len(raw)):
        p = f"spec.to[{i}]"
        t = read_mapping(ctx, raw, i, p)
        if t is None:
            continue
        grp = read_pattern(ctx, t, "group", f"{p}.group", GROUP_RX, "API group", required=True, lo=0)
        kind = read_pattern(ctx, t, "kind", f"{p}.kind", KIND_RX, "kind", required=True, hi=63)
        name = ctx.str(t, "name", f"{p}.name")
        if grp is not None and kind:
            tos.append(g.GrantTo(grp, kind, name or None))
    return g.ReferenceGrant(meta=m, origin=origin, grants_from=tuple(froms), grants_to=tuple(tos))


# --------------------------------------------------------------------------------------------
# Gateway


_TLS_FORBIDDEN = ("HTTP", "TCP", "UDP")


def _parse_gateway(ctx, doc: dict, m: o.Meta, origin: o.Origin) -> g.Gateway:
    spec = ctx.map(doc, "spec", "spec", required=True) or {}
    fields = Fields()
    cls = ctx.str(spec, "gatewayClassName", "spec.gatewayClassName", required=True) or ""
    if cls and len(cls) > 253:
        ctx.error("spec.gatewayClassName", "must be at most 253 characters", spec, "gatewayClassName")
    listeners: list[g.Listener] = []
    raw = read_items(ctx, spec, "listeners", "spec.listeners", lo=1, hi=64, required=True)
    names: dict[str, int] = {}
    combos: dict[tuple, int] = {}
    for i in range(len(raw)):
        p = f"spec.listeners[{i}]"
        item = read_mapping(ctx, raw, i, p)
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
    raw = read_items(ctx, spec, "addresses", "spec.addresses", hi=16)
    seen: dict[tuple[str, str], int] = {}
    for i in range(len(raw)):
        p = f"spec.addresses[{i}]"
        a = read_mapping(ctx, raw, i, p)
        if a is None:
            continue
        fields.add(p, raw, i)
        atype = read_pattern(ctx, a, "type", f"{p}.type", ADDRESS_TYPE_RX, "address type", default="IPAddress") or "IPAddress"
        value = ctx.str(a, "value", f"{p}.value", default="") or ""
        if len(value) > 253:
            ctx.error(f"{p}.value", "must be at most 253 characters", a, "value")
        if atype == "Hostname" and value and not HOSTNAME_RX.match(value):
            ctx.error(f"{p}.value", "Hostname value must be empty or contain only valid characters", a, "value")
        if value and atype in ("IPAddress", "Hostname"):
            if (atype, value) in seen:
                ctx.error(f"{p}.value", f"{atype} values must be unique ({value!r} is also "
                                        f"spec.addresses[{seen[(atype, value)]}])", a, "value")
            seen.setdefault((atype, value), i)
        addresses.append(g.GatewayAddress(atype, value))
    return g.Gateway(meta=m, origin=with_fields(origin, fields), class_name=cls, listeners=tuple(listeners),
                     addresses=tuple(addresses), generation=generation(doc),
                     client_validation=_gateway_tls(ctx, spec))


def _gateway_tls(ctx, spec: dict) -> bool:
    """Checks spec.tls; True when it asks for client certificate validation."""
    tls = ctx.map(spec, "tls", "spec.tls")
    if tls is None:
        return False
    front = ctx.map(tls, "frontend", "spec.tls.frontend")
    if front is not None:
        ctx.map(front, "default", "spec.tls.frontend.default", required=True)
        ports = read_items(ctx, front, "perPort", "spec.tls.frontend.perPort", hi=64)
        seen: set[int] = set()
        for i in range(len(ports)):
            pp = read_mapping(ctx, ports, i, f"spec.tls.frontend.perPort[{i}]")
            if pp is None:
                continue
            port = read_port(ctx, pp, "port", f"spec.tls.frontend.perPort[{i}].port", required=True)
            if port in seen:
                ctx.error(f"spec.tls.frontend.perPort[{i}].port", "Port for TLS configuration must be unique "
                                                                   "within the Gateway", pp, "port")
            seen.add(port or 0)
    return front is not None


def _listener(ctx, item: dict, p: str, fields: Fields) -> g.Listener | None:
    name = read_pattern(ctx, item, "name", f"{p}.name", SECTION_RX, "listener name (DNS subdomain)", required=True)
    hostname = read_hostname(ctx, item, "hostname", f"{p}.hostname")
    port = read_port(ctx, item, "port", f"{p}.port", required=True)
    protocol = read_pattern(ctx, item, "protocol", f"{p}.protocol", PROTOCOL_RX, "protocol", required=True, hi=255)
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


def _listener_tls(ctx, t: dict, p: str, fields: Fields) -> g.ListenerTLS:
    mode = ctx.str(t, "mode", f"{p}.mode", default="Terminate", choices=("Terminate", "Passthrough")) or "Terminate"
    refs = []
    raw = read_items(ctx, t, "certificateRefs", f"{p}.certificateRefs", hi=64)
    for i in range(len(raw)):
        rp = f"{p}.certificateRefs[{i}]"
        r = read_mapping(ctx, raw, i, rp)
        if r is None:
            continue
        fields.add(rp, raw, i)
        ref = read_object_ref(ctx, r, rp, default_kind="Secret")
        if ref is not None:
            refs.append(ref)
    options = []
    opts = ctx.map(t, "options", f"{p}.options")
    if opts is not None:
        if len(opts) > 16:
            ctx.error(f"{p}.options", "must have at most 16 entries", t, "options")
        for k, v in opts.items():
            if not isinstance(k, str) or len(k) > 253 or not ANNOTATION_KEY_RX.match(k):
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
    raw = read_items(ctx, a, "kinds", f"{p}.kinds", hi=8)
    for i in range(len(raw)):
        kp = f"{p}.kinds[{i}]"
        k = read_mapping(ctx, raw, i, kp)
        if k is None:
            continue
        grp = read_pattern(ctx, k, "group", f"{kp}.group", GROUP_RX, "API group", default=g.GROUP, lo=0)
        kind = read_pattern(ctx, k, "kind", f"{kp}.kind", KIND_RX, "kind", required=True, hi=63)
        if kind:
            kinds.append(g.RouteGroupKind(g.GROUP if grp is None else grp, kind))
    return g.AllowedRoutes(namespaces_from=frm, selector=selector, kinds=tuple(kinds))


PARSERS = {
    "Namespace": _parse_namespace, "GatewayClass": _parse_gateway_class, "Gateway": _parse_gateway,
    "HTTPRoute": parse_http_route, "GRPCRoute": parse_grpc_route, "TLSRoute": parse_tls_route,
    "TCPRoute": parse_tcp_route, "ReferenceGrant": _parse_reference_grant, "FaultInjection": _parse_fault,
    "IngressNginxFilter": _parse_nginx_filter,
}
