"""Istio's security kinds (``security.istio.io`` v1 and v1beta1) -> objects.

``PeerAuthentication`` and ``AuthorizationPolicy`` are read with the checks Istio's validation
webhook makes, so a policy the API server would refuse in an Istio cluster is refused here with
a message naming the field: a ``from`` without a source, an empty source or operation, a port
that is not a number, an IP block that is not an address or CIDR, a ``when`` key that is not an
attribute Istio knows, a condition with neither ``values`` nor ``notValues``, ``portLevelMtls``
without a selector, a selector together with ``targetRef(s)``, ``provider`` outside CUSTOM.

What the fields mean, and what meshproxy does with the ones it does not support, is
``meshproxy.core.policy``'s business (docs/mesh.md); this module only gives them shape.

The parsers take the manifest loader's parsing context (``ctx``: ``map``, ``list``, ``str``,
``error``, ...) and are registered with it through ``PARSERS`` / ``KINDS``.
"""

from __future__ import annotations

import ipaddress
import re
from types import MappingProxyType
from typing import Any

from . import objects as o
from .selectors import validate_label_key, validate_label_value

__all__ = ["KINDS", "PARSERS", "CONDITION_KEYS", "MTLS_MODES", "ACTIONS"]

KINDS = {(f"security.istio.io/{v}", k) for v in ("v1", "v1beta1")
         for k in ("PeerAuthentication", "AuthorizationPolicy")}

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")

# The attributes a `when` condition may name (Istio's "Authorization Policy Conditions" page).
# Keys with a [name] part are matched on their prefix.
CONDITION_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip",
                  "destination.port", "connection.sni", "request.auth.principal", "request.auth.audiences",
                  "request.auth.presenter")
_BRACKET_KEYS = re.compile(r"(request\.headers|request\.auth\.claims)\[[^\]]+\](\[[^\]]+\])*\Z")
_IP_KEYS = ("source.ip", "remote.ip", "destination.ip")

_SOURCE_FIELDS = (("principals", "principals"), ("notPrincipals", "not_principals"),
                  ("requestPrincipals", "request_principals"), ("notRequestPrincipals", "not_request_principals"),
                  ("namespaces", "namespaces"), ("notNamespaces", "not_namespaces"),
                  ("ipBlocks", "ip_blocks"), ("notIpBlocks", "not_ip_blocks"),
                  ("remoteIpBlocks", "remote_ip_blocks"), ("notRemoteIpBlocks", "not_remote_ip_blocks"))
_OPERATION_FIELDS = (("hosts", "hosts"), ("notHosts", "not_hosts"), ("ports", "ports"), ("notPorts", "not_ports"),
                     ("methods", "methods"), ("notMethods", "not_methods"), ("paths", "paths"),
                     ("notPaths", "not_paths"))


def _selector(ctx: Any, spec: dict) -> dict[str, str] | None:
    sel = ctx.map(spec, "selector", "spec.selector")
    if sel is None:
        return None
    labels = ctx.string_map(sel, "matchLabels", "spec.selector.matchLabels") or {}
    holder = sel.get("matchLabels")
    for k, v in labels.items():
        msg = validate_label_key(k) or validate_label_value(v)
        if msg:
            ctx.error(f"spec.selector.matchLabels.{k}", msg, holder, k)
    # An empty matchLabels selects every workload, exactly like no selector (Istio treats a
    # PeerAuthentication with `matchLabels: {}` as namespace-wide, too).
    return labels or None


def _strings(ctx: Any, parent: dict, key: str, path: str) -> tuple[str, ...]:
    out = []
    items = ctx.list(parent, key, path)
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            ctx.error(f"{path}[{i}]", "must be a string", items, i)
            continue
        v = str(v)
        if v == "":
            ctx.error(f"{path}[{i}]", "must not be empty", items, i)
            continue
        out.append(v)
    return tuple(out)


def _check_ip_blocks(ctx: Any, values: tuple[str, ...], path: str, parent: dict, key: str) -> None:
    for i, v in enumerate(values):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            ctx.error(f"{path}[{i}]", f"{v!r} is not an IP address or CIDR block", parent.get(key), i)


def _ports(ctx: Any, parent: dict, key: str, path: str) -> tuple[int, ...]:
    out = []
    items = parent.get(key) if isinstance(parent, dict) else None
    for i, v in enumerate(_strings(ctx, parent, key, path)):
        if not v.isdigit() or not 1 <= int(v) <= 65535:
            ctx.error(f"{path}[{i}]", f"{v!r} is not a port number (1-65535)", items, i)
            continue
        out.append(int(v))
    return tuple(out)


def _parse_peer_authentication(ctx: Any, doc: dict, m: o.Meta, origin: o.Origin) -> o.PeerAuthentication:
    spec = ctx.map(doc, "spec", "spec") or {}
    selector = _selector(ctx, spec)
    mode = "UNSET"
    mtls = ctx.map(spec, "mtls", "spec.mtls")
    if mtls is not None:
        mode = ctx.str(mtls, "mode", "spec.mtls.mode", default="UNSET", choices=MTLS_MODES) or "UNSET"
    ports: list[tuple[int, str]] = []
    plm = ctx.map(spec, "portLevelMtls", "spec.portLevelMtls")
    if plm:
        if selector is None:
            # Istio's validation: port-level settings exist only for a selected workload.
            ctx.error("spec.portLevelMtls", "requires spec.selector with matchLabels (port numbers are a workload's)",
                      spec, "portLevelMtls")
        for k, v in plm.items():
            p = f"spec.portLevelMtls.{k}"
            if isinstance(k, bool) or not str(k).isdigit() or not 1 <= int(k) <= 65535:
                ctx.error(p, f"{k!r} is not a port number (1-65535)", plm, k)
                continue
            if not isinstance(v, dict):
                ctx.error(p, "must be a mapping with mode", plm, k)
                continue
            pmode = ctx.str(v, "mode", f"{p}.mode", default="UNSET", choices=MTLS_MODES) or "UNSET"
            ports.append((int(k), pmode))
    if ctx.map(spec, "portLevelTls", "spec.portLevelTls"):
        ctx.error("spec.portLevelTls", "is not supported by meshproxy (a waypoint/gateway feature)", spec, "portLevelTls")
    return o.PeerAuthentication(meta=m, origin=origin, selector=MappingProxyType(selector) if selector else None,
                                mode=mode, port_modes=tuple(sorted(ports)))


def _parse_source(ctx: Any, src: dict, path: str) -> o.PolicySource:
    fields = {}
    for yaml_key, attr in _SOURCE_FIELDS:
        fields[attr] = _strings(ctx, src, yaml_key, f"{path}.{yaml_key}")
    for yaml_key, attr in (("ipBlocks", "ip_blocks"), ("notIpBlocks", "not_ip_blocks"),
                           ("remoteIpBlocks", "remote_ip_blocks"), ("notRemoteIpBlocks", "not_remote_ip_blocks")):
        _check_ip_blocks(ctx, fields[attr], f"{path}.{yaml_key}", src, yaml_key)
    _unknown(ctx, src, {k for k, _ in _SOURCE_FIELDS}, path)
    if not any(src.get(k) for k, _ in _SOURCE_FIELDS):
        ctx.error(path, "must not be empty (name at least one field, or leave `from` out to match any source)", src)
    return o.PolicySource(**fields)


def _parse_operation(ctx: Any, op: dict, path: str) -> o.PolicyOperation:
    fields: dict[str, tuple] = {}
    for yaml_key, attr in _OPERATION_FIELDS:
        if attr in ("ports", "not_ports"):
            fields[attr] = _ports(ctx, op, yaml_key, f"{path}.{yaml_key}")
        else:
            fields[attr] = _strings(ctx, op, yaml_key, f"{path}.{yaml_key}")
    _unknown(ctx, op, {k for k, _ in _OPERATION_FIELDS}, path)
    if not any(op.get(k) for k, _ in _OPERATION_FIELDS):
        ctx.error(path, "must not be empty (name at least one field, or leave `to` out to match any operation)", op)
    return o.PolicyOperation(**fields)


def _parse_condition(ctx: Any, cond: dict, path: str) -> o.PolicyCondition | None:
    key = ctx.str(cond, "key", f"{path}.key", required=True)
    values = _strings(ctx, cond, "values", f"{path}.values")
    not_values = _strings(ctx, cond, "notValues", f"{path}.notValues")
    if key is None:
        return None
    if key not in CONDITION_KEYS and not _BRACKET_KEYS.match(key) and not key.startswith("experimental.envoy.filters."):
        ctx.error(f"{path}.key", f"unknown attribute {key!r} (see Istio's authorization policy conditions)", cond, "key")
        return None
    if not values and not not_values:
        ctx.error(path, "needs values or notValues", cond)
        return None
    if key in _IP_KEYS:
        for field, vals in (("values", values), ("notValues", not_values)):
            _check_ip_blocks(ctx, vals, f"{path}.{field}", cond, field)
    elif key == "destination.port":
        for field, vals in (("values", values), ("notValues", not_values)):
            for i, v in enumerate(vals):
                if not v.isdigit() or not 1 <= int(v) <= 65535:
                    ctx.error(f"{path}.{field}[{i}]", f"{v!r} is not a port number (1-65535)", cond.get(field), i)
    return o.PolicyCondition(key, values, not_values)


def _unknown(ctx: Any, parent: dict, known: set[str], path: str) -> None:
    # The CRD's structural schema prunes or refuses unknown fields; a typo ("principal:") that
    # silently vanished would widen a DENY or an ALLOW: refuse it.
    for k in parent:
        if k not in known:
            ctx.error(f"{path}.{k}", "unknown field", parent, k)


def _parse_authorization_policy(ctx: Any, doc: dict, m: o.Meta, origin: o.Origin) -> o.AuthorizationPolicy:
    spec = ctx.map(doc, "spec", "spec") or {}
    selector = _selector(ctx, spec)
    action = ctx.str(spec, "action", "spec.action", default="ALLOW", choices=ACTIONS) or "ALLOW"
    provider = None
    prov = ctx.map(spec, "provider", "spec.provider")
    if prov is not None:
        provider = ctx.str(prov, "name", "spec.provider.name", required=True)
    if action == "CUSTOM" and provider is None:
        ctx.error("spec.provider", "required when action is CUSTOM", spec)
    if action != "CUSTOM" and prov is not None:
        ctx.error("spec.provider", f"only allowed with action CUSTOM, not {action}", spec, "provider")
    refs = []
    single = ctx.map(spec, "targetRef", "spec.targetRef")
    many = ctx.list(spec, "targetRefs", "spec.targetRefs")
    for i, ref in enumerate(([single] if single is not None else []) + list(many)):
        p = "spec.targetRef" if single is not None and i == 0 else f"spec.targetRefs[{i - (1 if single is not None else 0)}]"
        if not isinstance(ref, dict):
            ctx.error(p, "must be a mapping", spec, "targetRefs")
            continue
        kind = ctx.str(ref, "kind", f"{p}.kind", required=True)
        name = ctx.str(ref, "name", f"{p}.name", required=True)
        if kind and name:
            refs.append(f"{kind}/{name}")
    if refs and selector is not None:
        ctx.error("spec.selector", "may not be set together with targetRef / targetRefs", spec, "selector")
    rules = []
    raw_rules = ctx.list(spec, "rules", "spec.rules")
    for ri, r in enumerate(raw_rules):
        rp = f"spec.rules[{ri}]"
        if r is None:
            r = {}
        if not isinstance(r, dict):
            ctx.error(rp, "must be a mapping", raw_rules, ri)
            continue
        _unknown(ctx, r, {"from", "to", "when"}, rp)
        sources = []
        froms = ctx.list(r, "from", f"{rp}.from")
        for fi, f in enumerate(froms):
            fp = f"{rp}.from[{fi}]"
            src = ctx.map(f, "source", f"{fp}.source") if isinstance(f, dict) else None
            if src is None:
                ctx.error(f"{fp}.source", "required (a `from` entry holds one source)", froms, fi)
                continue
            sources.append(_parse_source(ctx, src, f"{fp}.source"))
        operations = []
        tos = ctx.list(r, "to", f"{rp}.to")
        for ti, t in enumerate(tos):
            tp = f"{rp}.to[{ti}]"
            op = ctx.map(t, "operation", f"{tp}.operation") if isinstance(t, dict) else None
            if op is None:
                ctx.error(f"{tp}.operation", "required (a `to` entry holds one operation)", tos, ti)
                continue
            operations.append(_parse_operation(ctx, op, f"{tp}.operation"))
        conditions = []
        whens = ctx.list(r, "when", f"{rp}.when")
        for wi, w in enumerate(whens):
            wp = f"{rp}.when[{wi}]"
            if not isinstance(w, dict):
                ctx.error(wp, "must be a mapping with key and values", whens, wi)
                continue
            c = _parse_condition(ctx, w, wp)
            if c is not None:
                conditions.append(c)
        rules.append(o.PolicyRule(tuple(sources), tuple(operations), tuple(conditions)))
    return o.AuthorizationPolicy(meta=m, origin=origin, selector=MappingProxyType(selector) if selector else None,
                                 action=action, rules=tuple(rules), provider=provider, target_refs=tuple(refs),
                                 dry_run=m.annotations.get("istio.io/dry-run", "").lower() == "true")


PARSERS = {"PeerAuthentication": _parse_peer_authentication,
           "AuthorizationPolicy": _parse_authorization_policy}
