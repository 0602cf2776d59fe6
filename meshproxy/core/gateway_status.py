"""Gateway API attachment and status, as pure functions of the objects (no I/O).

``evaluate(inputs)`` decides, for one snapshot's objects, what the specification says a
controller decides, and writes it down as the API's status would carry it:

* GatewayClass: ours when ``spec.controllerName`` is ``meshproxy.dev/gateway-controller``;
  ``Accepted`` (False, ``InvalidParameters``, when it names a ``parametersRef``: meshproxy
  has no parameter kinds). Only Gateways of our classes are considered; everything else,
  and routes whose parents are not ours, get no status from us at all.
* Gateway: ``Accepted`` (``UnsupportedAddress`` for an address type other than IPAddress,
  ``ListenersNotValid`` when some or all listeners are not accepted), ``Programmed``
  (``AddressNotUsable`` for an address this host cannot bind, ``Invalid``), and
  ``status.addresses``: every listener binds its port on each IPAddress of
  ``spec.addresses``; a Gateway without address values binds on each ``--gateway-address``.
* Listeners: ``Accepted`` (``UnsupportedProtocol`` beyond HTTP/HTTPS/TLS/TCP,
  ``UnsupportedValue`` for TLS termination of TLSRoutes and for client certificate
  validation, ``PortUnavailable`` when the address is taken by something that is not a
  Gateway listener), ``ResolvedRefs`` (``InvalidCertificateRef``, ``RefNotPermitted``,
  ``InvalidRouteKinds``), ``Conflicted`` (``ProtocolConflict``: several protocols on one port;
  ``HostnameConflict``: listeners nothing tells apart; within a Gateway no conflicted listener
  wins, across Gateways sharing an address the older Gateway keeps it), ``Programmed``,
  ``supportedKinds`` and ``attachedRoutes`` (routes Accepted on it).
* Routes: one ``status.parents`` entry per parentRef that names one of our Gateways (or, for
  HTTPRoute / GRPCRoute, a Service: the mesh), with ``Accepted`` (``NoMatchingParent``:
  sectionName / port select no listener; ``NotAllowedByListeners``: no selected listener
  allows the route's kind and namespace; ``NoMatchingListenerHostname``: allowed, but no
  hostname intersects; ``UnsupportedValue``: no rule can be served), ``ResolvedRefs`` (the
  first unresolved reference's reason) and ``PartiallyInvalid`` when some rules were dropped.

The attachments themselves (route x listener x intersected hostnames) are returned for
``meshproxy.core.gateway`` to build listeners and tables from.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from discovery import gateway_objects as g
from discovery import objects as o

from .gateway_rules import CompiledRoute, RefProblem, References
from .hostnames import ANY, intersect

__all__ = ["Condition", "ListenerState", "GatewayState", "ParentStatus", "Attachment", "MeshAttachment",
           "Inputs", "Model", "evaluate", "SUPPORTED_KINDS"]

_HTTP_KINDS = (g.RouteGroupKind(g.GROUP, "HTTPRoute"), g.RouteGroupKind(g.GROUP, "GRPCRoute"))
# The route kinds each listener protocol can carry (the default when allowedRoutes.kinds is empty).
SUPPORTED_KINDS = {
    "HTTP": _HTTP_KINDS, "HTTPS": _HTTP_KINDS,
    "TLS": (g.RouteGroupKind(g.GROUP, "TLSRoute"), g.RouteGroupKind(g.GROUP, "TCPRoute")),
    "TCP": (g.RouteGroupKind(g.GROUP, "TCPRoute"),),
}
_DEFAULT_KINDS = {"HTTP": _HTTP_KINDS, "HTTPS": _HTTP_KINDS, "TLS": SUPPORTED_KINDS["TLS"][:1],
                  "TCP": SUPPORTED_KINDS["TCP"]}
_HTTP_ROUTES = ("HTTPRoute", "GRPCRoute")


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str               # "True" | "False" | "Unknown"
    reason: str
    message: str
    generation: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "True"

    def to_json(self) -> dict:
        return {"type": self.type, "status": self.status, "reason": self.reason, "message": self.message,
                "observedGeneration": self.generation}


def _cond(ctype: str, ok: bool, reason: str, message: str, gen: int) -> Condition:
    return Condition(ctype, "True" if ok else "False", reason, message, gen)


@dataclass(slots=True, eq=False)
class ListenerState:
    gateway: g.Gateway
    listener: g.Listener
    index: int
    supported: tuple[g.RouteGroupKind, ...] = ()
    invalid: tuple[str, str] | None = None              # (reason, message): not accepted
    conflict: tuple[str, str] | None = None
    refs: tuple[str, str] | None = None                 # ResolvedRefs False (reason, message)
    certificates: tuple[tuple[str, str], ...] = ()      # Secret keys usable for TLS termination
    binds: tuple[str, ...] = ()                         # addresses this listener binds
    attached: int = 0
    attachments: list[Attachment] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.listener.name

    @property
    def accepted(self) -> bool:
        return self.invalid is None and self.conflict is None

    @property
    def programmed(self) -> bool:
        if not self.accepted or not self.binds:
            return False
        return self.listener.protocol != "HTTPS" or bool(self.certificates)

    @property
    def field(self) -> str:
        return f"spec.listeners[{self.index}]"

    def conditions(self, gateway_ok: bool) -> list[Condition]:
        gen = self.gateway.generation
        out = []
        if self.conflict is not None:
            reason, msg = self.conflict
            out.append(_cond("Accepted", False, reason, msg, gen))
        elif self.invalid is not None:
            out.append(_cond("Accepted", False, *self.invalid, gen))
        else:
            out.append(_cond("Accepted", True, "Accepted", "listener accepted", gen))
        if self.conflict is not None:
            out.append(_cond("Programmed", False, self.conflict[0], self.conflict[1], gen))
        elif self.programmed and gateway_ok:
            out.append(_cond("Programmed", True, "Programmed",
                             "bound on " + ", ".join(f"{a}:{self.listener.port}" for a in self.binds), gen))
        else:
            why = "not accepted" if not self.accepted else \
                "no usable TLS certificate" if self.listener.protocol == "HTTPS" and not self.certificates else \
                "the Gateway is not accepted or has no usable address"
            out.append(_cond("Programmed", False, "Invalid", why, gen))
        if self.refs is not None:
            out.append(_cond("ResolvedRefs", False, *self.refs, gen))
        else:
            out.append(_cond("ResolvedRefs", True, "ResolvedRefs", "all references resolved", gen))
        if self.conflict is not None:
            out.append(Condition("Conflicted", "True", self.conflict[0], self.conflict[1], gen))
        else:
            out.append(Condition("Conflicted", "False", "NoConflicts", "no conflicts", gen))
        return out


@dataclass(slots=True, eq=False)
class GatewayState:
    gateway: g.Gateway
    listeners: list[ListenerState]
    conditions: list[Condition] = field(default_factory=list)
    addresses: tuple[str, ...] = ()          # status.addresses values (IPAddress)
    problems: list[tuple[str, str]] = field(default_factory=list)    # (field, message)

    def to_json(self) -> dict:
        ok = bool(self.conditions) and self.conditions[0].ok
        return {
            "addresses": [{"type": "IPAddress", "value": a} for a in self.addresses],
            "conditions": [c.to_json() for c in self.conditions],
            "listeners": [{"name": ls.name,
                           "supportedKinds": [{"group": k.group, "kind": k.kind} for k in ls.supported],
                           "attachedRoutes": ls.attached,
                           "conditions": [c.to_json() for c in ls.conditions(ok)]} for ls in self.listeners],
        }


@dataclass(slots=True, eq=False)
class ParentStatus:
    parent: g.ParentRef
    index: int
    conditions: list[Condition]

    def to_json(self) -> dict:
        p = self.parent
        ref: dict[str, Any] = {"group": p.group, "kind": p.kind, "name": p.name}
        if p.namespace is not None:
            ref["namespace"] = p.namespace
        if p.section_name is not None:
            ref["sectionName"] = p.section_name
        if p.port is not None:
            ref["port"] = p.port
        return {"parentRef": ref, "controllerName": g.CONTROLLER, "conditions": [c.to_json() for c in self.conditions]}


@dataclass(slots=True, eq=False)
class Attachment:
    """A route accepted on a Gateway listener, with the hostnames it is reached by there
    (intersected with the listener's; ANY when neither names one)."""
    route: Any
    compiled: CompiledRoute | None
    listener: ListenerState
    hostnames: tuple[str, ...]


@dataclass(slots=True, eq=False)
class MeshAttachment:
    """An HTTPRoute / GRPCRoute governing a Service's ports in the mesh."""
    route: Any
    compiled: CompiledRoute | None
    service: o.Service
    ports: tuple[o.ServicePort, ...]


@dataclass(slots=True)
class Inputs:
    classes: Iterable[g.GatewayClass]
    gateways: Iterable[g.Gateway]
    routes: Iterable[Any]                              # HTTPRoute, GRPCRoute, TLSRoute, TCPRoute
    compiled: Mapping[tuple[str, str, str], CompiledRoute]   # (kind, ns, name) of HTTP / GRPC routes
    l4_problems: Mapping[tuple[str, str, str], list[RefProblem]]  # TLS / TCP routes' reference problems
    refs: References
    namespaces: Mapping[str, g.Namespace]
    secrets: Mapping[tuple[str, str], o.Secret]
    pem_problem: Callable[[bytes, bytes], str | None]
    gateway_addresses: tuple[str, ...] = ("0.0.0.0",)
    usable_address: Callable[[str], bool] = lambda a: True
    occupied: Mapping[tuple[str, int], str] = field(default_factory=dict)   # (addr, port) -> what holds it
    node_address: str | None = None
    # The L7 server speaks HTTP/2 (prior knowledge, ALPN h2): only then can GRPCRoutes (and h2c
    # / grpc Service ports) be served; until then they are refused in status, not half served.
    http2: bool = False


@dataclass(slots=True)
class Model:
    classes: dict[str, list[Condition]] = field(default_factory=dict)
    gateways: dict[tuple[str, str], GatewayState] = field(default_factory=dict)
    routes: dict[tuple[str, str, str], list[ParentStatus]] = field(default_factory=dict)
    mesh: list[MeshAttachment] = field(default_factory=list)
    # (object ref, origin, field, message) of everything that does not work, for problems and validate
    problems: list[tuple[Any, str, str]] = field(default_factory=list)

    def add_problem(self, obj: Any, fld: str, message: str) -> None:
        self.problems.append((obj, fld, message))


# --------------------------------------------------------------------------------------------


def _age(obj: Any) -> tuple:
    return (obj.meta.creation_timestamp or "\uffff", obj.namespace, obj.name)


def evaluate(inp: Inputs) -> Model:
    model = Model()
    ours: dict[str, g.GatewayClass] = {}
    for cls in inp.classes:
        if cls.controller != g.CONTROLLER:
            continue
        ours[cls.name] = cls
        if cls.parameters_ref is not None:
            grp, kind, name, _ = cls.parameters_ref
            msg = f"parametersRef {kind}/{name} ({grp or 'core'}): meshproxy takes no parameters objects"
            model.classes[cls.name] = [_cond("Accepted", False, "InvalidParameters", msg, cls.generation)]
            model.add_problem(cls, "spec.parametersRef", msg)
        else:
            model.classes[cls.name] = [_cond("Accepted", True, "Accepted", "handled by meshproxy", cls.generation)]
    gateways = sorted((gw for gw in inp.gateways if gw.class_name in ours), key=_age)
    for gw in gateways:
        model.gateways[(gw.namespace, gw.name)] = _gateway(gw, ours[gw.class_name], model, inp)
    _conflicts(model, inp)
    routes = sorted(inp.routes, key=_age)
    for route in routes:
        _route(route, model, inp)
    for st in model.gateways.values():
        _gateway_conditions(st, model)
    return model


def _gateway(gw: g.Gateway, cls: g.GatewayClass, model: Model, inp: Inputs) -> GatewayState:
    st = GatewayState(gw, [ListenerState(gw, lst, i) for i, lst in enumerate(gw.listeners)])
    binds: list[str] = []
    unsupported = []
    for i, a in enumerate(gw.addresses):
        where = f"spec.addresses[{i}]"
        if a.type != "IPAddress":
            unsupported.append(f"{where}: address type {a.type} is not supported (IPAddress only)")
            continue
        if not a.value:
            continue                  # "assign one": the --gateway-address values below
        try:
            ip = str(ipaddress.ip_address(a.value))
        except ValueError:
            st.problems.append((where, f"{a.value!r} is not an IP address"))
            continue
        if not inp.usable_address(ip):
            st.problems.append((where, f"{ip} is not an address of this host"))
            continue
        binds.append(ip)
    if not any(a.type == "IPAddress" and a.value for a in gw.addresses):
        binds = list(inp.gateway_addresses)
    st.addresses = tuple(dict.fromkeys(a for a in (_status_address(b, inp.node_address) for b in binds) if a))
    if unsupported:
        st.conditions.append(_cond("Accepted", False, "UnsupportedAddress", "; ".join(unsupported), gw.generation))
        for msg in unsupported:
            model.add_problem(gw, msg.split(":")[0], msg.split(": ", 1)[1])
    cls_ok = model.classes[cls.name][0].ok
    if not cls_ok and not st.conditions:
        st.conditions.append(_cond("Accepted", False, "Invalid", f"GatewayClass {cls.name} is not accepted",
                                   gw.generation))
    for ls in st.listeners:
        _listener(ls, inp)
        ls.binds = tuple(dict.fromkeys(binds))
    return st


def _status_address(bind: str, node: str | None) -> str:
    """A wildcard bind is published as this node's address (what clients can connect to)."""
    return (node or "") if ipaddress.ip_address(bind).is_unspecified else bind


def _listener(ls: ListenerState, inp: Inputs) -> None:
    lst, gw = ls.listener, ls.gateway
    proto = lst.protocol
    if proto not in SUPPORTED_KINDS:
        ls.invalid = ("UnsupportedProtocol", f"protocol {proto} is not supported (HTTP, HTTPS, TLS, TCP)")
        return
    allowed = SUPPORTED_KINDS[proto]
    if not inp.http2:
        allowed = tuple(k for k in allowed if k.kind != "GRPCRoute")
    if lst.allowed.kinds:
        good = tuple(k for k in lst.allowed.kinds if k in allowed)
        bad = [f"{k.kind} ({k.group or 'core'})" for k in lst.allowed.kinds if k not in allowed]
        ls.supported = tuple(dict.fromkeys(good))
        if bad:
            why = "" if inp.http2 or all(k.kind != "GRPCRoute" for k in lst.allowed.kinds) else \
                " (GRPCRoute needs HTTP/2, which the L7 server does not speak yet)"
            ls.refs = ("InvalidRouteKinds", f"route kinds not supported on a {proto} listener: {', '.join(bad)}{why}")
    else:
        ls.supported = tuple(k for k in _DEFAULT_KINDS[proto] if k in allowed)
    if proto == "TLS" and lst.tls is not None and lst.tls.mode == "Terminate":
        ls.invalid = ("UnsupportedValue", "TLS termination on a TLS listener (TLSRoute Terminate mode) is not "
                                          "supported; use Passthrough, or an HTTPS listener")
        return
    if proto == "HTTPS":
        if gw.client_validation:
            ls.invalid = ("UnsupportedValue", "client certificate validation (spec.tls.frontend) is not supported")
            return
        _certificates(ls, inp)


def _certificates(ls: ListenerState, inp: Inputs) -> None:
    lst, gw = ls.listener, ls.gateway
    tls = lst.tls
    if tls is None or not tls.certificate_refs:
        ls.refs = ("InvalidCertificateRef", "an HTTPS listener needs tls.certificateRefs")
        return
    good, bad = [], None
    for ref in tls.certificate_refs:
        ns = ref.namespace or gw.namespace
        what = f"{ref.kind} {ns}/{ref.name}" + (f" (group {ref.group})" if ref.group else "")
        if (ref.group, ref.kind) != ("", "Secret"):
            bad = bad or ("InvalidCertificateRef", f"certificateRef {what}: only core Secrets are supported")
            continue
        if not inp.refs.granted(g.GROUP, "Gateway", gw.namespace, "", "Secret", ns, ref.name):
            bad = bad or ("RefNotPermitted", f"certificateRef to Secret {ns}/{ref.name} in another namespace is not "
                                             f"allowed by any ReferenceGrant in namespace {ns}")
            continue
        sec = inp.secrets.get((ns, ref.name))
        if sec is None or sec.type != "kubernetes.io/tls" or "tls.crt" not in sec.data or "tls.key" not in sec.data:
            bad = bad or ("InvalidCertificateRef", f"Secret {ns}/{ref.name} not found or not of type kubernetes.io/tls")
            continue
        why = inp.pem_problem(sec.data["tls.crt"], sec.data["tls.key"])
        if why:
            bad = bad or ("InvalidCertificateRef", f"Secret {ns}/{ref.name}: tls.crt / tls.key do not load ({why})")
            continue
        good.append((ns, ref.name))
    ls.certificates = tuple(good)
    if bad is not None:
        ls.refs = bad


_COMPATIBLE = {"HTTP": "HTTP", "HTTPS": "HTTPS", "TLS": "TLS", "TCP": "TCP"}


def _conflicts(model: Model, inp: Inputs) -> None:
    """Conflicts among the listeners of each Gateway, then across Gateways sharing an address
    (older Gateways first), then with addresses held by other listeners."""
    for st in model.gateways.values():
        by_port: dict[int, list[ListenerState]] = {}
        for ls in st.listeners:
            if ls.invalid is None:
                by_port.setdefault(ls.listener.port, []).append(ls)
        for port, group in by_port.items():
            protos = {ls.listener.protocol for ls in group}
            if len(protos) > 1:
                msg = f"port {port} is used with several protocols ({', '.join(sorted(protos))}) in this Gateway"
                for ls in group:
                    ls.conflict = ("ProtocolConflict", msg)
                continue
            seen: dict[str | None, list[ListenerState]] = {}
            for ls in group:
                host = None if ls.listener.protocol == "TCP" else ls.listener.hostname
                seen.setdefault(host, []).append(ls)
            for same in seen.values():
                if len(same) > 1:
                    names = ", ".join(ls.name for ls in same)
                    for ls in same:
                        ls.conflict = ("HostnameConflict", f"listeners {names} on port {port} cannot be told apart")
    # Across Gateways: (address, port) -> (protocol, hostnames in use, owner)
    taken: dict[tuple[str, int], tuple[str, set, str]] = {}
    for st in model.gateways.values():          # oldest first
        gw = st.gateway
        for ls in st.listeners:
            if not ls.accepted:
                continue
            port, proto = ls.listener.port, ls.listener.protocol
            host = None if proto == "TCP" else (ls.listener.hostname or ANY)
            for addr in ls.binds:
                other = inp.occupied.get((addr, port))
                if other is not None:
                    ls.invalid = ("PortUnavailable", f"{addr}:{port} is already used by {other}")
                    break
                cur = taken.get((addr, port))
                if cur is None or cur[2] == f"{gw.namespace}/{gw.name}":
                    continue
                if cur[0] != proto:
                    ls.conflict = ("ProtocolConflict", f"{addr}:{port} is served with protocol {cur[0]} by "
                                                       f"Gateway {cur[2]} (older)")
                    break
                if host is None or host in cur[1]:
                    ls.conflict = ("HostnameConflict", f"{addr}:{port} already has a listener for "
                                                       f"{host or 'every connection'} in Gateway {cur[2]} (older)")
                    break
            if not ls.accepted:
                continue
            for addr in ls.binds:
                entry = taken.setdefault((addr, port), (proto, set(), f"{gw.namespace}/{gw.name}"))
                entry[1].add(host)


def _gateway_conditions(st: GatewayState, model: Model) -> None:
    gw = st.gateway
    gen = gw.generation
    for fld, msg in st.problems:
        model.add_problem(gw, fld, msg)
    for ls in st.listeners:
        for reason_msg in (ls.conflict, ls.invalid, ls.refs):
            if reason_msg is not None:
                model.add_problem(gw, ls.field, f"listener {ls.name}: {reason_msg[1]} ({reason_msg[0]})")
    if not st.conditions:
        bad = [ls.name for ls in st.listeners if not ls.accepted]
        if len(bad) == len(st.listeners):
            st.conditions.append(_cond("Accepted", False, "ListenersNotValid",
                                       f"no valid listener: {', '.join(bad)}", gen))
        elif bad:
            st.conditions.append(_cond("Accepted", True, "ListenersNotValid",
                                       f"listeners not accepted: {', '.join(bad)}; the others are served", gen))
        else:
            st.conditions.append(_cond("Accepted", True, "Accepted", "Gateway accepted", gen))
    accepted = st.conditions[0].ok
    if not accepted:
        st.conditions.append(_cond("Programmed", False, "Invalid", "the Gateway is not accepted", gen))
    elif st.problems:
        st.conditions.append(_cond("Programmed", False, "AddressNotUsable",
                                   "; ".join(f"{f}: {m}" for f, m in st.problems), gen))
    elif not any(ls.programmed for ls in st.listeners):
        st.conditions.append(_cond("Programmed", False, "Invalid", "no listener could be programmed", gen))
    else:
        st.conditions.append(_cond("Programmed", True, "Programmed", "listening on " + ", ".join(
            sorted({f"{a}:{ls.listener.port}" for ls in st.listeners if ls.programmed for a in ls.binds})), gen))


# --------------------------------------------------------------------------------------------
# Routes


def _namespace_labels(ns: str, inp: Inputs) -> Mapping[str, str]:
    """A namespace's labels, with the one the API server always sets."""
    obj = inp.namespaces.get(ns)
    labels = dict(obj.meta.labels) if obj is not None else {}
    labels.setdefault("kubernetes.io/metadata.name", ns)
    return labels


def _allows_namespace(ls: ListenerState, route_ns: str, inp: Inputs) -> bool:
    allowed = ls.listener.allowed
    if allowed.namespaces_from == "All":
        return True
    if allowed.namespaces_from == "Same":
        return route_ns == ls.gateway.namespace
    return allowed.selector is not None and allowed.selector.matches(_namespace_labels(route_ns, inp))


def _route_hostnames(route: Any) -> tuple[str, ...]:
    if route.kind == "TCPRoute":
        return (ANY,)
    return tuple(route.hostnames) or (ANY,)


def _route(route: Any, model: Model, inp: Inputs) -> None:
    key = (route.kind, route.namespace, route.name)
    compiled = inp.compiled.get(key)
    problems = compiled.ref_problems if compiled is not None else list(inp.l4_problems.get(key, ()))
    gen = route.generation
    if problems:
        resolved = _cond("ResolvedRefs", False, problems[0].reason, problems[0].message, gen)
    else:
        resolved = _cond("ResolvedRefs", True, "ResolvedRefs", "all references resolved", gen)
    servable = compiled is None or bool(compiled.rules)
    parents: list[ParentStatus] = []
    for pi, ref in enumerate(route.parents):
        where = f"spec.parentRefs[{pi}]"
        if (ref.group, ref.kind) == (g.GROUP, "Gateway"):
            st = model.gateways.get((ref.namespace or route.namespace, ref.name))
            if st is None:
                continue                      # not one of our Gateways: not ours to report on
            accepted = _attach_gateway(route, compiled, ref, st, inp, servable, where, model)
        elif (ref.group, ref.kind) == ("", "Service"):
            accepted = _attach_service(route, compiled, ref, inp, servable, model)
            if accepted is None:
                continue
        else:
            continue
        conds = [_cond("Accepted", accepted[0], accepted[1], accepted[2], gen), resolved]
        if compiled is not None and compiled.dropped and compiled.rules and accepted[0]:
            conds.append(Condition("PartiallyInvalid", "True", "UnsupportedValue", "Dropped Rule(s): " + "; ".join(
                why for _, why in compiled.dropped), gen))
        if not accepted[0]:
            model.add_problem(route, where, f"not accepted by {ref.kind} {ref.namespace or route.namespace}/"
                                            f"{ref.name}: {accepted[2]} ({accepted[1]})")
        parents.append(ParentStatus(ref, pi, conds))
    if parents:
        model.routes[key] = parents
        for p in problems:
            model.add_problem(route, p.field, f"{p.message} ({p.reason})")
        if compiled is not None:
            for ri, why in compiled.dropped:
                model.add_problem(route, f"spec.rules[{ri}]", f"rule dropped: {why}")


def _attach_gateway(route: Any, compiled: CompiledRoute | None, ref: g.ParentRef, st: GatewayState, inp: Inputs,
                    servable: bool, where: str, model: Model) -> tuple[bool, str, str]:
    selected = [ls for ls in st.listeners
                if (ref.section_name is None or ls.name == ref.section_name)
                and (ref.port is None or ls.listener.port == ref.port)]
    if not selected:
        what = " and ".join(x for x in ((f"sectionName {ref.section_name}" if ref.section_name else ""),
                                        (f"port {ref.port}" if ref.port is not None else "")) if x)
        return False, "NoMatchingParent", f"no listener matches {what}"
    kind = g.RouteGroupKind(g.GROUP, route.kind)
    allowed = [ls for ls in selected if kind in ls.supported and _allows_namespace(ls, route.namespace, inp)]
    if not allowed:
        return False, "NotAllowedByListeners", (f"no listener of {st.gateway.namespace}/{st.gateway.name} allows "
                                                f"{route.kind}s from namespace {route.namespace}")
    matched: list[tuple[ListenerState, tuple[str, ...]]] = []
    for ls in allowed:
        if route.kind == "TCPRoute":
            hosts: tuple[str, ...] = (ANY,)
        else:
            hosts = tuple(dict.fromkeys(h for h in (intersect(ls.listener.hostname, rh)
                                                    for rh in _route_hostnames(route)) if h is not None))
        if hosts:
            matched.append((ls, hosts))
    if not matched:
        return False, "NoMatchingListenerHostname", "no listener hostname intersects the route's hostnames"
    if not servable:
        return False, "UnsupportedValue", "no rule can be served: " + "; ".join(why for _, why in compiled.dropped)
    kept = []
    for ls, hosts in matched:
        if _kind_conflict(route, ls, hosts):
            continue
        kept.append((ls, hosts))
    if not kept:
        return False, "NotAllowedByListeners", ("an older route of the other kind (HTTPRoute / GRPCRoute) already "
                                                "serves these hostnames on the listener")
    for ls, hosts in kept:
        ls.attached += 1
        ls.attachments.append(Attachment(route, compiled, ls, hosts))
    return True, "Accepted", "accepted by " + ", ".join(ls.name for ls, _ in kept)


def _kind_conflict(route: Any, ls: ListenerState, hosts: tuple[str, ...]) -> bool:
    """An HTTPRoute and a GRPCRoute may not share a hostname on one listener: the older one
    keeps it (routes are attached oldest first)."""
    if route.kind not in _HTTP_ROUTES:
        return False
    for a in ls.attachments:
        if a.route.kind in _HTTP_ROUTES and a.route.kind != route.kind:
            if any(intersect(h, other) is not None for h in hosts for other in a.hostnames):
                return True
    return False


def _attach_service(route: Any, compiled: CompiledRoute | None, ref: g.ParentRef, inp: Inputs, servable: bool,
                    model: Model) -> tuple[bool, str, str] | None:
    if route.kind not in _HTTP_ROUTES:
        return False, "UnsupportedValue", f"{route.kind}s cannot attach to a Service (mesh routes are HTTPRoute " \
                                          "and GRPCRoute)"
    if route.kind == "GRPCRoute" and not inp.http2:
        return False, "UnsupportedValue", "GRPCRoute needs HTTP/2, which the L7 server does not speak yet"
    ns = ref.namespace or route.namespace
    if ns != route.namespace:
        return False, "UnsupportedValue", (f"consumer routes (a Service in namespace {ns}, the route in "
                                           f"{route.namespace}) are not supported")
    svc = inp.refs.services.get((ns, ref.name))
    if svc is None:
        return False, "NoMatchingParent", f"Service {ns}/{ref.name} not found"
    if svc.headless or svc.type == "ExternalName":
        return False, "UnsupportedValue", f"Service {ns}/{ref.name} has no ClusterIP (headless or ExternalName)"
    ports = tuple(sp for sp in svc.ports if sp.protocol == "TCP"
                  and (ref.port is None or sp.port == ref.port)
                  and (ref.section_name is None or sp.name == ref.section_name))
    if not ports:
        return False, "NoMatchingParent", f"Service {ns}/{ref.name} has no TCP port matching the parentRef"
    if not servable:
        return False, "UnsupportedValue", "no rule can be served: " + "; ".join(why for _, why in compiled.dropped)
    for m in model.mesh:
        if m.service is svc and m.route.kind != route.kind and set(m.ports) & set(ports):
            return False, "NotAllowedByListeners", (f"{m.route.kind} {m.route.namespace}/{m.route.name} (older) "
                                                    f"already governs these ports")
    model.mesh.append(MeshAttachment(route, compiled, svc, ports))
    return True, "Accepted", f"governs Service {ns}/{ref.name} port(s) " + ", ".join(str(p.port) for p in ports)
