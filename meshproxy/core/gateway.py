"""Gateway API objects -> the snapshot's Gateway and mesh listeners, status and problems.

``build_gateways`` is the one entry point the snapshot builder calls. From the store's
GatewayClasses, Gateways, routes, ReferenceGrants, Namespaces, FaultInjections, Services and
TLS Secrets it produces, without I/O beyond checking that a Gateway address is one this host
can bind:

* ``http_listeners``: one ``HTTPListener`` per (address, port) where Gateway HTTP / HTTPS
  listeners are programmed (their routes behind a ``ListenerRouter``), and one per mesh
  Service port served per request: a ClusterIP port governed by an HTTPRoute / GRPCRoute
  whose parentRef is the Service (GAMMA), or whose ``appProtocol`` is ``http``,
  ``kubernetes.io/h2c`` or ``grpc``. The snapshot drops the L4 listener of such a port;
* ``l4_listeners``: Gateway TCP listeners (TCPRoute) and TLS passthrough listeners
  (TLSRoute by SNI), with their routes' weighted backends;
* ``status``: what the API's status fields say for every object we are responsible for
  (``meshproxy.core.gateway_status``), for the status writer and ``meshproxy get``;
* ``problems``: everything that does not work, one line each, naming the object and field.

Compiled routes are cached by object identity across builds (``GatewayCache``), so a change
that touches no Gateway API object costs a signature comparison.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from discovery import objects as o

from .gateway_rules import CompiledRoute, RefProblem, References, compile_route
from .gateway_status import Inputs, Model, evaluate
from .gateway_tables import ListenerRouter, ListenerTable, build_l4_routes, build_table, default_table
from .listeners import HTTPListener, L4Listener, WeightedBackends

__all__ = ["EMPTY", "GATEWAY_KINDS", "L7_APP_PROTOCOLS", "GatewayCache", "GatewayResult", "build_gateways",
           "local_address", "format_problem"]

GATEWAY_KINDS = ("GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute", "ReferenceGrant",
                 "Namespace", "FaultInjection", "IngressNginxFilter")
# Service ports served per request in the mesh without any route (Kubernetes' standard
# application protocols for HTTP, KEP-3726, and "grpc"); the HTTP/2 ones only once the L7 server
# speaks HTTP/2 (``settings.http2``) - served as HTTP/1.1 they would break their clients.
L7_APP_PROTOCOLS = frozenset({"http", "kubernetes.io/h2c", "grpc"})
H2_APP_PROTOCOLS = frozenset({"kubernetes.io/h2c", "grpc"})


def local_address(ip: str) -> bool:
    """Can this host bind ``ip`` (an address of one of its interfaces, or a wildcard)?"""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL


def format_problem(obj: Any, fld: str, message: str, *, with_place: bool) -> str:
    """``file:line: Kind/ns/name: field: message`` (``with_place``), else without the place."""
    parts = []
    if with_place:
        parts.append(f"{obj.origin.file}:{obj.origin.line_of(fld) if fld else obj.origin.line}")
    parts.append(obj.ref)
    if fld:
        parts.append(fld)
    parts.append(message)
    return ": ".join(parts)


@dataclass(frozen=True, slots=True)
class GatewayResult:
    http_listeners: Mapping[tuple[str, int], HTTPListener]
    l4_listeners: Mapping[tuple[str, int], L4Listener]
    mesh_l7: frozenset[tuple[str, int]]                       # ClusterIP:port now served at L7
    secrets: Mapping[tuple[str, str], tuple[bytes, bytes]]    # certificates of HTTPS listeners
    status: Mapping[tuple[str, str, str], dict]               # (kind, ns, name) -> status as the API holds it
    objects: Mapping[tuple[str, str, str], Any]               # the objects those statuses belong to
    problems: tuple[tuple[Any, str, str], ...]                # (object, field, message)

    def problem_lines(self, with_place: bool = False) -> list[str]:
        return [format_problem(obj, fld, msg, with_place=with_place) for obj, fld, msg in self.problems]


EMPTY = GatewayResult(MappingProxyType({}), MappingProxyType({}), frozenset(), MappingProxyType({}),
                      MappingProxyType({}), MappingProxyType({}), ())


@dataclass(slots=True)
class GatewayCache:
    """Compiled routes kept by (route object, the references they were resolved against)."""
    compiled: dict[tuple[str, str, str], tuple[Any, tuple, CompiledRoute]] = field(default_factory=dict)
    addresses: dict[str, bool] = field(default_factory=dict)
    last: tuple[tuple, GatewayResult] | None = None


def build_gateways(objects: Mapping[str, Iterable[Any]], services: Mapping[tuple[str, str], o.Service],
                   cluster_ips: Mapping[tuple[str, str], str], secrets: Mapping[tuple[str, str], o.Secret], *,
                   pem_problem: Callable[[bytes, bytes], str | None], gateway_addresses: tuple[str, ...],
                   upstream_timeout: float, occupied: Mapping[tuple[str, int], str], node_address: str | None,
                   cache: GatewayCache | None = None, http2: bool = False,
                   usable_address: Callable[[str], bool] = local_address) -> GatewayResult:
    """See the module docstring. ``objects``: kind -> objects of that kind (GATEWAY_KINDS)."""
    cache = cache if cache is not None else GatewayCache()
    lists = {k: list(objects.get(k, ())) for k in GATEWAY_KINDS}
    l7_ports = any(sp.app_protocol in L7_APP_PROTOCOLS for svc in services.values() for sp in svc.ports)
    if not lists["Gateway"] and not lists["HTTPRoute"] and not lists["GRPCRoute"] and not l7_ports \
            and not lists["GatewayClass"]:
        return EMPTY
    sig = (tuple(id(x) for k in GATEWAY_KINDS for x in lists[k]), tuple(map(id, services.values())),
           tuple(sorted(cluster_ips.items())), tuple(map(id, secrets.values())), gateway_addresses,
           upstream_timeout, tuple(sorted(occupied.items())), node_address, http2)
    if cache.last is not None and cache.last[0] == sig:
        return cache.last[1]

    def usable(ip: str) -> bool:
        if ip not in cache.addresses:
            cache.addresses[ip] = usable_address(ip)
        return cache.addresses[ip]

    refs = References(services, lists["ReferenceGrant"],
                      {(f.namespace, f.name): f for f in lists["FaultInjection"]},
                      {(f.namespace, f.name): f for f in lists["IngressNginxFilter"]}, secrets)
    ref_sig = (tuple(map(id, services.values())), tuple(map(id, lists["ReferenceGrant"])),
               tuple(map(id, lists["FaultInjection"])), tuple(map(id, lists["IngressNginxFilter"])),
               tuple(map(id, secrets.values())), upstream_timeout)
    compiled: dict[tuple[str, str, str], CompiledRoute] = {}
    keep = {}
    for route in (*lists["HTTPRoute"], *lists["GRPCRoute"]):
        key = (route.kind, route.namespace, route.name)
        hit = cache.compiled.get(key)
        if hit is None or hit[0] is not route or hit[1] != ref_sig:
            hit = (route, ref_sig, compile_route(route, refs, upstream_timeout=upstream_timeout))
        keep[key] = hit
        compiled[key] = hit[2]
    cache.compiled = keep
    l4_routes = [*lists["TLSRoute"], *lists["TCPRoute"]]
    l4_backends, l4_problems = _l4_backends(l4_routes, refs)
    model = evaluate(Inputs(
        classes=lists["GatewayClass"], gateways=lists["Gateway"],
        routes=[*lists["HTTPRoute"], *lists["GRPCRoute"], *l4_routes], compiled=compiled,
        l4_problems=l4_problems, refs=refs, namespaces={n.name: n for n in lists["Namespace"]},
        secrets=secrets, pem_problem=pem_problem, gateway_addresses=gateway_addresses,
        usable_address=usable, occupied=occupied, node_address=node_address, http2=http2))
    http, l4, used = _gateway_listeners(model, l4_backends, secrets)
    l7_protocols = L7_APP_PROTOCOLS if http2 else L7_APP_PROTOCOLS - H2_APP_PROTOCOLS
    mesh_http, mesh_l7 = _mesh_listeners(model, services, cluster_ips, upstream_timeout, l7_protocols)
    for addr, lst in mesh_http.items():
        http.setdefault(addr, lst)
    result = GatewayResult(MappingProxyType(http), MappingProxyType(l4), frozenset(mesh_l7),
                           MappingProxyType(used), MappingProxyType(_status(model)), MappingProxyType(_objects(model, lists)),
                           tuple(model.problems))
    cache.last = (sig, result)
    return result


def _l4_backends(routes: list[Any], refs: References) -> tuple[dict, dict]:
    backends: dict[tuple[str, str, str], WeightedBackends] = {}
    problems: dict[tuple[str, str, str], list[RefProblem]] = {}
    for route in routes:
        key = (route.kind, route.namespace, route.name)
        out = []
        for ri, rule in enumerate(route.rules[:1]):     # one rule (v1); older versions: the first
            for bi, b in enumerate(rule.backends):
                bkey, problem = refs.backend(route, b.ref, b.port, f"spec.rules[{ri}].backendRefs[{bi}]")
                if problem is not None:
                    problems.setdefault(key, []).append(problem)
                out.append((bkey, b.weight))
        backends[key] = WeightedBackends(f"{route.kind} {route.namespace}/{route.name}", tuple(out))
    return backends, problems


def _gateway_listeners(model: Model, l4_backends: Mapping, secrets: Mapping[tuple[str, str], o.Secret]):
    # (address, port) -> [ListenerState], Gateways oldest first
    by_addr: dict[tuple[str, int], list] = {}
    for st in model.gateways.values():
        gw_ok = all(c.ok for c in st.conditions if c.type in ("Accepted",))
        if not gw_ok:
            continue
        for ls in st.listeners:
            if ls.programmed:
                for addr in ls.binds:
                    by_addr.setdefault((addr, ls.listener.port), []).append(ls)
    http: dict[tuple[str, int], HTTPListener] = {}
    l4: dict[tuple[str, int], L4Listener] = {}
    used: dict[tuple[str, str], tuple[bytes, bytes]] = {}
    for (addr, port), states in by_addr.items():
        proto = states[0].listener.protocol
        gateways = ", ".join(dict.fromkeys(f"Gateway {ls.gateway.namespace}/{ls.gateway.name}" for ls in states))
        if proto in ("HTTP", "HTTPS"):
            scheme = proto.lower()
            tables = []
            tls_hosts: dict[str, tuple[str, str]] = {}
            for ls in states:
                attachments = [(a.compiled, a.hostnames) for a in ls.attachments if a.compiled is not None]
                table = build_table(attachments, scheme, port)
                tables.append(ListenerTable(f"{ls.gateway.namespace}/{ls.gateway.name}/{ls.name}",
                                            ls.listener.hostname, table))
                if proto == "HTTPS":
                    cert = ls.certificates[0]
                    tls_hosts.setdefault(ls.listener.hostname or "", cert)
                    sec = secrets[cert]
                    used[cert] = (sec.data["tls.crt"], sec.data["tls.key"])
            router = ListenerRouter.build(tables)
            for c in router.conflicts:
                model.add_problem(states[0].gateway, "", c)
            http[(addr, port)] = HTTPListener(addr, port, gateways, router, tls=proto == "HTTPS",
                                              tls_hosts=MappingProxyType(tls_hosts))
        else:
            per = []
            label = None
            for ls in states:
                routes = []
                for a in ls.attachments:
                    wb = l4_backends.get((a.route.kind, a.route.namespace, a.route.name))
                    if wb is not None:
                        routes.append((a.route.kind, a.hostnames, wb))
                        label = label or next((k for k, _ in wb.backends if k is not None), None)
                per.append((ls.listener.hostname, routes))
            routes_obj = build_l4_routes(per, sni=proto == "TLS")
            gw = states[0].gateway
            l4[(addr, port)] = L4Listener(addr, port, label or (gw.namespace, f"gateway/{gw.name}", states[0].name),
                                          "gateway", False, routes_obj)
    return http, l4, used


def _mesh_listeners(model: Model, services: Mapping[tuple[str, str], o.Service],
                    cluster_ips: Mapping[tuple[str, str], str], timeout: float, l7_protocols: frozenset[str]):
    governed: dict[tuple[tuple[str, str], int], list] = {}
    for m in model.mesh:
        for sp in m.ports:
            governed.setdefault(((m.service.namespace, m.service.name), sp.port), []).append(m)
    http: dict[tuple[str, int], HTTPListener] = {}
    addrs = set()
    for key, svc in services.items():
        cip = cluster_ips.get(key)
        if not cip or svc.headless or svc.type == "ExternalName":
            continue
        for sp in svc.ports:
            routes = governed.get((key, sp.port))
            if routes is None and sp.app_protocol not in l7_protocols or sp.protocol != "TCP":
                continue
            name = f"{svc.namespace}/{svc.name}:{sp.name or sp.port}"
            if routes:
                # Route hostnames mean nothing in the mesh: the destination address decides.
                table = build_table([(m.compiled, ("*",)) for m in routes if m.compiled is not None], "http", sp.port)
            else:
                table = default_table(name, (svc.namespace, svc.name, sp.name or str(sp.port)), timeout)
            http[(cip, sp.port)] = HTTPListener(cip, sp.port, f"Service {name}", table)
            addrs.add((cip, sp.port))
    return http, addrs


def _status(model: Model) -> dict[tuple[str, str, str], dict]:
    out: dict[tuple[str, str, str], dict] = {}
    for name, conds in model.classes.items():
        out[("GatewayClass", "", name)] = {"conditions": [c.to_json() for c in conds]}
    for (ns, name), st in model.gateways.items():
        out[("Gateway", ns, name)] = st.to_json()
    for key, parents in model.routes.items():
        out[key] = {"parents": [p.to_json() for p in parents]}
    return out


def _objects(model: Model, lists: Mapping[str, list]) -> dict[tuple[str, str, str], Any]:
    out: dict[tuple[str, str, str], Any] = {}
    for kind in ("GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute"):
        for obj in lists[kind]:
            key = (kind, "" if kind == "GatewayClass" else obj.namespace, obj.name)
            out[key] = obj
    return out
