"""The routing snapshot: everything the data plane needs for one decision, deeply immutable.

The controller builds a new ``Snapshot`` off the data path whenever objects or endpoint
states change and publishes it by swapping one reference. L4 reads it once per accepted
connection, L7 once per request; neither ever mutates it. Live state that must outlive a
snapshot (connection counts, affinity pins, health marks) is kept beside it, keyed by
endpoint address (``meshproxy.core.balancers``).

Structural sharing: ``build_snapshot`` reuses the ``Backend`` objects of services whose inputs
did not change (same Service object, same endpoint sets), and the route table when no
Ingress-related object changed, so a one-pod change costs O(that service), not O(cluster).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

from discovery import objects as o
from discovery.endpoints import Endpoint, EndpointSet
from .gateway import EMPTY as EMPTY_GATEWAYS
from .gateway import GATEWAY_KINDS, L7_APP_PROTOCOLS, GatewayCache, build_gateways
from .ingress import backend_action, check_path, default_route, ingress_route
from .listeners import HTTPListener, L4Listener
from .nginx_annotations import Finding, is_nginx
from .nginx_annotations import parse as parse_nginx
from .nginx_ingress import build as build_nginx
from .nginx_ingress import default_server as nginx_default_server
from .mesh import build_mesh_state
from .routes import Action, BackendRef, RouteTable
from .tls import make_context

from .settings import LB_POLICIES, Settings, parse_duration

__all__ = ["Backend", "HTTP1", "H2C", "backend_protocol", "HTTPListener", "L4Listener", "NodeInfo", "Snapshot", "SnapshotBuilder",
           "parse_duration"]

log = logging.getLogger("meshproxy.snapshot")

ANN_LB_POLICY = "meshproxy.dev/lb-policy"
ANN_PROXY_PROTOCOL = "meshproxy.dev/proxy-protocol"
ANN_TIMEOUT = "meshproxy.dev/timeout"
ANN_RETRIES = "meshproxy.dev/retries"
ANN_PER_TRY_TIMEOUT = "meshproxy.dev/per-try-timeout"
ANN_SSL_REDIRECT = "meshproxy.dev/ssl-redirect"


# What the L7 proxy speaks to a backend's pods (Backend.l7_protocol).
HTTP1 = "http/1.1"
H2C = "h2c"
_H2C_APP_PROTOCOLS = frozenset(("kubernetes.io/h2c", "grpc"))
_H2C_NAMES = frozenset(("grpc", "h2c", "http2"))


def backend_protocol(port: o.ServicePort | None, http2: bool = True) -> str:
    """HTTP/2 in clear text (prior knowledge) to a port whose appProtocol is
    ``kubernetes.io/h2c`` or ``grpc``, or whose name is ``grpc``, ``h2c``, ``http2`` or starts
    with ``grpc-`` / ``http2-`` (the naming convention meshes use when appProtocol is not
    set); HTTP/1.1 to everything else, and to everything while HTTP/2 is off."""
    if port is None or not http2:
        return HTTP1
    if port.app_protocol is not None:
        return H2C if port.app_protocol in _H2C_APP_PROTOCOLS else HTTP1
    name = port.name
    if name in _H2C_NAMES or name.startswith(("grpc-", "http2-")):
        return H2C
    return HTTP1


@dataclass(frozen=True, slots=True)
class Backend:
    """One service port and its endpoints: what a listener or a route sends traffic to."""
    key: tuple[str, str, str]             # (namespace, service, port name or number)
    namespace: str
    service: str
    port_name: str
    port: int
    endpoints: tuple[Endpoint, ...]       # all known endpoints (for display and draining)
    usable: tuple[Endpoint, ...]          # candidates for new traffic, cluster-wide
    local: tuple[Endpoint, ...]           # candidates for new traffic on this node (Local policies)
    policy: str = "random"
    affinity_timeout: int | None = None   # ClientIP session affinity, seconds; None = off
    proxy_protocol: int = 0               # 0 off, 1 or 2: PROXY protocol version towards pods
    l7_policy: str = "p2c"                # policy for L7 requests (annotation, else --l7-lb-policy)
    protocol: str = "TCP"                 # TCP or UDP
    l7_protocol: str = HTTP1              # what the L7 proxy speaks to the pods: HTTP1 or H2C
    # True when the endpoints' weights (SRV weights, discovery/endpoints.py) are not all equal:
    # computed once here, so the balancers' equal-weight path costs one flag test per pick.
    weighted: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        eps = self.endpoints
        if eps:
            w0 = eps[0].weight
            for e in eps:
                if e.weight != w0:
                    object.__setattr__(self, "weighted", True)
                    break

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.service}:{self.key[2]}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    address: str | None
    # Every InternalIP of the node (one per family on a dual-stack node), address first:
    # where NodePorts are served.
    addresses: tuple[str, ...] = ()

    @property
    def all_addresses(self) -> tuple[str, ...]:
        return self.addresses or ((self.address,) if self.address else ())


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    created: float
    node: NodeInfo
    services: Mapping[tuple[str, str], o.Service]
    endpoint_sets: Mapping[tuple[str, str], tuple[EndpointSet, ...]]
    backends: Mapping[tuple[str, str, str], Backend]
    l4: Mapping[tuple[str, int], L4Listener]
    routes: RouteTable
    ingresses: tuple[str, ...]            # namespace/name of the Ingresses served
    tls_hosts: Mapping[str, tuple[str, str]]          # host (or *.wildcard) -> (namespace, secret)
    secrets: Mapping[tuple[str, str], tuple[bytes, bytes]]   # TLS secrets in use: (cert PEM, key PEM)
    problems: tuple[str, ...]             # things that do not work, for logs and /debug/snapshot
    allocated: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # L7 listeners other than --ingress-listen / --ingress-tls-listen (which serve ``routes``):
    # Gateway listeners and mesh Service ports, by (address, port).
    http_listeners: Mapping[tuple[str, int], HTTPListener] = field(default_factory=lambda: MappingProxyType({}))
    # Gateway API status by (kind, namespace, name), as the API's status field holds it
    # (meshproxy.core.gateway_status): for the status writer and `meshproxy get`.
    gateway_status: Mapping[tuple[str, str, str], dict] = field(default_factory=lambda: MappingProxyType({}))
    # UDP listeners, keyed like ``l4`` (which holds the TCP ones): a TCP and a UDP port may
    # share an address and number (DNS on 53).
    udp: Mapping[tuple[str, int], L4Listener] = field(default_factory=lambda: MappingProxyType({}))
    # Every ClusterIP of each service that has one, primary family first (dual stack).
    cluster_ips: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # The services whose parts were recomputed for this snapshot (an incremental build), or
    # None (a full build): lets consumers that keep per-service state (the nftables mode)
    # work in proportion to the change.
    changed: frozenset[tuple[str, str]] | None = None
    # Backend keys whose pods speak HTTPS (ingress-nginx backend-protocol), reached over TLS.
    upstream_tls: frozenset = frozenset()
    # ssl-passthrough hosts of the Ingress TLS listener: host -> backend key.
    passthrough: Mapping[str, tuple[str, str, str]] = field(default_factory=lambda: MappingProxyType({}))
    # run --sidecar: the pod's mesh view (meshproxy.core.mesh.MeshState); None otherwise.
    mesh: Any = None

    def to_json(self) -> dict:
        services = []
        for (ns, name), svc in sorted(self.services.items()):
            services.append({
                "namespace": ns, "name": name, "type": svc.type,
                "clusterIP": self.allocated.get(f"{ns}/{name}", svc.cluster_ip),
                "clusterIPs": list(self.cluster_ips.get((ns, name), ())),
                "ports": [{"name": p.name, "port": p.port, "targetPort": p.target_port,
                           "nodePort": self.allocated.get(f"{ns}/{name}:{p.name or p.port}", p.node_port),
                           "protocol": p.protocol} for p in svc.ports],
                "sessionAffinity": svc.session_affinity,
                "externalTrafficPolicy": svc.external_traffic_policy,
                "internalTrafficPolicy": svc.internal_traffic_policy,
            })
        endpoints = []
        for key in sorted(self.endpoint_sets):
            for es in self.endpoint_sets[key]:
                endpoints.append({"namespace": es.namespace, "service": es.service,
                                  "port": es.port_name or es.port,
                                  "endpoints": [e.to_json() for e in es.endpoints]})
        return {
            "version": self.version, "created": self.created,
            "node": {"name": self.node.name, "address": self.node.address},
            "services": services, "endpoints": endpoints,
            "backends": [_backend_json(b) for _, b in sorted(self.backends.items())],
            "listeners": [{"address": _hostport(h, p), "protocol": lst.protocol,
                           "backend": "/".join(lst.backend[:2]) + f":{lst.backend[2]}",
                           "scope": lst.scope, "localOnly": lst.local_only}
                          for (h, p), lst in sorted(self.l4.items()) + sorted(self.udp.items())],
            "routes": self.routes.describe(),
            "ingresses": list(self.ingresses),
            "tls": {h: f"{ns}/{n}" for h, (ns, n) in sorted(self.tls_hosts.items())},
            "httpListeners": [{"address": f"{h}:{p}", "name": lst.name, "tls": lst.tls,
                               "tlsHosts": {k or "*": f"{ns}/{n}" for k, (ns, n) in sorted(lst.tls_hosts.items())},
                               "routes": lst.routes.describe()}
                              for (h, p), lst in sorted(self.http_listeners.items())],
            "gatewayStatus": [{"kind": k, "namespace": ns, "name": n, "status": st}
                              for (k, ns, n), st in sorted(self.gateway_status.items())],
            "problems": list(self.problems),
            **({"mesh": self.mesh.to_json()} if self.mesh is not None else {}),
        }


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _backend_json(b: Backend) -> dict:
    d = {"backend": b.label, "policy": b.policy, "usable": [f"{e.ip}:{e.port}" for e in b.usable],
         "local": [f"{e.ip}:{e.port}" for e in b.local], "affinityTimeout": b.affinity_timeout}
    if b.weighted:
        d["weights"] = {f"{e.ip}:{e.port}": e.weight for e in b.endpoints}
    if b.l7_protocol != HTTP1:
        d["l7Protocol"] = b.l7_protocol
    return d


def _kernel_mode_problems(service_cidr: str, node: NodeInfo) -> list[str]:
    """What --proxy-mode nftables cannot serve here: loopback addresses are never translated
    to a pod (the kernel would send the pod a packet from 127.0.0.1, which it drops)."""
    out = []
    for cidr in service_cidr.split(","):
        try:
            if ipaddress.ip_network(cidr.strip(), strict=False).is_loopback:
                out.append(f"--service-cidr {cidr.strip()} is a loopback range: in nftables mode its ClusterIPs "
                           "are not translated; use a routable range")
        except ValueError:
            pass
    for addr in node.all_addresses:
        if ipaddress.ip_address(addr).is_loopback:
            out.append(f"node address {addr} is loopback: in nftables mode NodePorts are served only on "
                       "non-loopback InternalIPs")
    return out


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(d)


class SnapshotBuilder:
    """Builds snapshots from the store's contents, reusing unchanged parts of the last one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = 0
        self._backend_cache: dict[tuple[str, str], tuple[object, object, str | None, tuple[Backend, ...]]] = {}
        self._routes_cache: tuple[tuple, RouteTable, tuple, dict, dict, tuple[str, ...]] | None = None
        self._alloc_cache: tuple | None = None
        self._last: tuple | None = None     # the tables of the last build, patched incrementally
        self._service_cache: dict[tuple[str, str], tuple] = {}
        self._pem_verdicts: dict[tuple[bytes, bytes], str | None] = {}   # (crt, key) -> why they do not load
        self._gateway_cache = GatewayCache()
        self.gateway_result = None          # the last build's GatewayResult (meshproxy validate / get)
        # ingress-nginx annotations of the last build that are refused or not applied:
        # (Ingress, Finding) pairs, for `meshproxy validate`.
        self.ingress_findings: tuple = ()
        self._l7_cache: tuple[tuple, bool] | None = None

    def forget(self) -> None:
        """Drop everything kept from earlier builds (settings they were built with changed)."""
        self._backend_cache.clear()
        self._service_cache.clear()
        self._routes_cache = None
        self._alloc_cache = None
        self._last = None

    # -- pieces -------------------------------------------------------------------------------

    def _pem_problem(self, crt: bytes, key: bytes) -> str | None:
        """Why a Secret's certificate and key do not make a TLS context (None: they do). Each
        pair is tried once (about a millisecond) and the verdict kept while it is in use."""
        pair = (crt, key)
        if pair not in self._pem_verdicts:
            if len(self._pem_verdicts) > 1024:
                self._pem_verdicts.clear()
            try:
                make_context(crt, key)
                self._pem_verdicts[pair] = None
            except (ssl.SSLError, ValueError, OSError) as exc:
                self._pem_verdicts[pair] = str(exc) or type(exc).__name__
        return self._pem_verdicts[pair]

    def node_info(self, nodes: list[o.Node]) -> tuple[NodeInfo, list[str]]:
        name = self.settings.node
        if name is None:
            if not nodes:
                return NodeInfo("", "127.0.0.1"), []
            if len(nodes) == 1:
                return NodeInfo(nodes[0].name, nodes[0].internal_ip, nodes[0].internal_ips), []
            return NodeInfo("", None), ["several Node objects and no --node: NodePorts are not served"]
        for n in nodes:
            if n.name == name:
                if n.internal_ip is None:
                    return NodeInfo(name, None), [f"Node/{name} has no InternalIP address: NodePorts are not served"]
                return NodeInfo(name, n.internal_ip, n.internal_ips), []
        if not nodes:
            return NodeInfo(name, "127.0.0.1"), []
        return NodeInfo(name, None), [f"--node {name}: no Node object of that name: NodePorts are not served"]

    def _backends_for(self, svc: o.Service, sets: tuple[EndpointSet, ...], node: str | None,
                      problems: list[str]) -> tuple[Backend, ...]:
        key = (svc.namespace, svc.name)
        cached = self._backend_cache.get(key)
        if cached is not None and cached[0] is svc and cached[1] is sets and cached[2] == node:
            return cached[3]
        policy = svc.meta.annotations.get(ANN_LB_POLICY)
        if policy is not None and policy not in LB_POLICIES:
            problems.append(f"{svc.ref}: annotation {ANN_LB_POLICY}: unknown policy {policy!r}")
            policy = None
        l7_policy = policy or self.settings.l7_lb_policy
        policy = policy or self.settings.lb_policy
        pp_text = svc.meta.annotations.get(ANN_PROXY_PROTOCOL, "")
        proxy_protocol = {"": 0, "v1": 1, "v2": 2}.get(pp_text)
        if proxy_protocol is None:
            problems.append(f"{svc.ref}: annotation {ANN_PROXY_PROTOCOL}: {pp_text!r} is not v1 or v2")
            proxy_protocol = 0
        affinity = svc.affinity_timeout if svc.session_affinity == "ClientIP" else None
        out = []
        for es in sets:
            local_all = tuple(e for e in es.endpoints if node and e.node == node)
            local_ready = tuple(e for e in local_all if e.ready)
            local = local_ready or tuple(e for e in local_all if e.serving and e.terminating)
            sp = next((p for p in svc.ports if (p.name or str(p.port)) == es.key[2]), None)
            out.append(Backend(es.key, svc.namespace, svc.name, es.port_name, es.port, es.endpoints,
                               es.usable, local, policy, affinity, proxy_protocol, l7_policy, es.protocol,
                               backend_protocol(sp, self.settings.http2)))
        result = tuple(out)
        self._backend_cache[key] = (svc, sets, node, result)
        return result

    def _listeners(self, svc: o.Service, cluster_ips: tuple[str, ...], node_addrs: tuple[str, ...],
                   node_ports: Mapping[tuple[str, str, str], int], l4: dict, problems: list[str]) -> None:
        """The listeners of one service into ``l4``, keyed ``(host, port, protocol)``."""
        if svc.type == "ExternalName" or svc.headless:
            return
        for i, sp in enumerate(svc.ports):
            if sp.protocol not in ("TCP", "UDP"):
                problems.append(f"{svc.ref}: spec.ports[{i}].protocol: {sp.protocol} is not supported; "
                                f"port {sp.port} is not served")
                continue
            bkey = (svc.namespace, svc.name, sp.name or str(sp.port))
            wanted = []
            for cip in cluster_ips:
                wanted.append((cip, sp.port, "cluster", svc.internal_traffic_policy == "Local"))
            if svc.type in ("NodePort", "LoadBalancer"):
                np_ = sp.node_port or node_ports.get(bkey)
                if np_:
                    # A dual-stack service on a dual-stack node: the node's address of each of
                    # the service's families; else the node's first address, as before.
                    fams = {":" in ip for ip in cluster_ips}
                    addrs = [a for a in node_addrs if (":" in a) in fams] or list(node_addrs[:1])
                    for addr in addrs:
                        wanted.append((addr, np_, "node", svc.external_traffic_policy == "Local"))
            if svc.type == "LoadBalancer" or svc.external_ips:
                for ip in dict.fromkeys(svc.external_ips + (svc.lb_ingress_ips if svc.type == "LoadBalancer" else ())):
                    wanted.append((ip, sp.port, "external", svc.external_traffic_policy == "Local"))
            for host, port, scope, local in wanted:
                other = l4.get((host, port, sp.protocol))
                if other is not None:
                    problems.append(f"{svc.ref}: {host}:{port}/{sp.protocol} is already used by "
                                    f"{other.backend[0]}/{other.backend[1]}; not served twice")
                    continue
                l4[(host, port, sp.protocol)] = L4Listener(host, port, bkey, scope, local, protocol=sp.protocol)

    def _ingress_served(self, ing: o.Ingress, classes: dict[str, o.IngressClass]) -> bool:
        name = ing.class_name
        if name is None:
            defaults = [c for c in classes.values() if c.is_default]
            if defaults:
                return any(c.controller == o.INGRESS_CONTROLLER for c in defaults)
            return self.settings.watch_ingress_without_class
        if name == self.settings.ingress_class:
            return True
        cls = classes.get(name)
        return cls is not None and cls.controller == o.INGRESS_CONTROLLER

    def _action(self, ing: o.Ingress, be: o.IngressBackend, services: Mapping[tuple[str, str], o.Service],
                settings_for: dict, problems: list[str], where: str) -> Action:
        key, err = self._backend_key(ing, be, services, problems, where)
        return backend_action(key, err, **settings_for)

    def _backend_key(self, ing: o.Ingress, be: o.IngressBackend, services: Mapping[tuple[str, str], o.Service],
                     problems: list[str], where: str) -> tuple[tuple[str, str, str] | None, str | None]:
        key, err = None, None
        if be.service is None:
            err = f"resource backend {be.resource} is not supported"
        else:
            svc = services.get((ing.namespace, be.service))
            if svc is None:
                err = f"service {ing.namespace}/{be.service} not found"
            else:
                for sp in svc.ports:
                    if sp.protocol == "TCP" and ((be.port_number is not None and sp.port == be.port_number)
                                                 or (be.port_name is not None and sp.name == be.port_name)):
                        key = (svc.namespace, svc.name, sp.name or str(sp.port))
                        break
                else:
                    want = be.port_number if be.port_number is not None else repr(be.port_name)
                    err = f"service {ing.namespace}/{be.service} has no TCP port {want}"
        if err is not None:
            problems.append(f"{ing.ref}: {where}: {err}")
        return key, err

    def _nginx_mode(self, ing: o.Ingress) -> bool:
        """Served the ingress-nginx way: its class is named "nginx" (the class ingress-nginx
        users' Ingresses name), or it carries ingress-nginx annotations."""
        return ing.class_name == "nginx" or is_nginx(ing.meta.annotations)

    def _ingress_settings(self, ing: o.Ingress, problems: list[str]) -> dict:
        ann = ing.meta.annotations
        out: dict[str, Any] = {"timeout": self.settings.upstream_timeout, "attempts": 2,
                               "per_try_timeout": None, "ssl_redirect": False}
        try:
            if ANN_TIMEOUT in ann:
                out["timeout"] = parse_duration(ann[ANN_TIMEOUT])
            if ANN_PER_TRY_TIMEOUT in ann:
                out["per_try_timeout"] = parse_duration(ann[ANN_PER_TRY_TIMEOUT])
        except ValueError as exc:
            problems.append(f"{ing.ref}: annotation: {exc}")
        if ANN_RETRIES in ann:
            try:
                n = int(ann[ANN_RETRIES])
                if not 0 <= n <= 10:
                    raise ValueError
                out["attempts"] = n + 1
            except ValueError:
                problems.append(f"{ing.ref}: annotation {ANN_RETRIES}: {ann[ANN_RETRIES]!r} is not 0-10")
        if ann.get(ANN_SSL_REDIRECT, "").lower() == "true":
            out["ssl_redirect"] = True
        return out

    def _routes(self, ingresses: list[o.Ingress], classes: dict[str, o.IngressClass],
                services: Mapping[tuple[str, str], o.Service], secrets: Mapping[tuple[str, str], o.Secret]):
        sig = (tuple(ingresses), tuple(sorted(classes.items())), tuple(id(s) for s in services.values()),
               tuple(id(s) for s in secrets.values()))
        if self._routes_cache is not None and self._routes_cache[0] == sig:
            self.ingress_findings = self._routes_cache[-1]
            return self._routes_cache[1:-1]
        problems: list[str] = []
        entries = []
        served = [i for i in ingresses if self._ingress_served(i, classes)]
        # Oldest first, then namespace/name: the order in which conflicts are resolved.
        served.sort(key=lambda i: (i.meta.creation_timestamp or "\uffff", i.namespace, i.name))
        # ingress-nginx mode: annotations parsed once; an Ingress with a refused annotation is
        # not served at all (docs/ingress-nginx.md, "Never silently wrong").
        nginx: dict[tuple, object] = {}
        findings: list[tuple[o.Ingress, Finding]] = []
        kept = []
        for ing in served:
            if self._nginx_mode(ing):
                cfg = parse_nginx(ing, secrets)
                for f in cfg.findings:
                    findings.append((ing, f))
                    problems.append(f"{ing.ref}: metadata.annotations[{f.annotation}]: {f.message}")
                if cfg.refused:
                    continue
                nginx[ing.key] = cfg
            kept.append(ing)
        served = kept
        default = None
        default_ing = ""
        tls_hosts: dict[str, tuple[str, str]] = {}
        used_secrets: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        settings_of = {ing.key: self._ingress_settings(ing, problems) for ing in served}
        for ing in served:
            cfg = nginx.get(ing.key)
            if cfg is not None and cfg.canary is not None:
                continue   # a canary adds no host, certificate or default of its own
            for t in ing.tls:
                if not t.secret_name:
                    continue
                sec = secrets.get((ing.namespace, t.secret_name))
                if sec is None or sec.type != "kubernetes.io/tls" or "tls.crt" not in sec.data or "tls.key" not in sec.data:
                    problems.append(f"{ing.ref}: spec.tls: secret {ing.namespace}/{t.secret_name} not found or not kubernetes.io/tls")
                    continue
                used_secrets[(ing.namespace, t.secret_name)] = (sec.data["tls.crt"], sec.data["tls.key"])
                for h in t.hosts or ("",):
                    tls_hosts.setdefault(h.lower(), (ing.namespace, t.secret_name))
            if ing.default_backend is not None:
                t = self._action(ing, ing.default_backend, services, settings_of[ing.key], problems,
                                 "spec.defaultBackend")
                if default is None:
                    default, default_ing = default_route(t, f"{ing.namespace}/{ing.name}"), f"{ing.namespace}/{ing.name}"
                else:
                    problems.append(f"{ing.ref}: spec.defaultBackend: ignored, {default_ing} (older) defines one")
        for ing in served:
            if ing.key in nginx:
                continue
            st = settings_of[ing.key]
            for ri, rule in enumerate(ing.rules):
                for pi, p in enumerate(rule.paths):
                    where = f"spec.rules[{ri}].http.paths[{pi}]"
                    bad = check_path(rule.host, p.path, p.path_type)
                    if bad:   # e.g. an Ingress from the API server that files would have refused
                        problems.append(f"{ing.ref}: {where}: {bad}; path not served")
                        continue
                    t = self._action(ing, p.backend, services, st, problems, where)
                    entries.append(ingress_route(rule.host, p.path, p.path_type, t,
                                                 f"{ing.namespace}/{ing.name}", ing.meta.creation_timestamp))
        upstream_tls: frozenset = frozenset()
        upstream_h2: frozenset = frozenset()
        passthrough: dict = {}
        if nginx:
            def backend_ref(ing, be, where):
                key, err = self._backend_key(ing, be, services, problems, where)
                port = str(be.port_number if be.port_number is not None else be.port_name)
                return BackendRef(key, 1, err), port

            def service_port(ns, name):
                svc = services.get((ns, name))
                if svc is None or not svc.ports:
                    return None
                sp = svc.ports[0]
                return (ns, name, sp.name or str(sp.port))
            default_key = None
            if default is not None and default.action.backends:
                default_key = default.action.backends[0].key
            built = build_nginx([(i, nginx[i.key]) for i in served if i.key in nginx], entries,
                                backend_ref=backend_ref, service_port=service_port,
                                cert_hosts=frozenset(h for h in tls_hosts if h), default_key=default_key)
            entries = built.entries
            problems.extend(built.problems)
            if default is None:
                default = nginx_default_server()
            upstream_tls = frozenset(built.upstream_tls)
            upstream_h2 = frozenset(built.upstream_h2)
            passthrough = built.passthrough
        if self.settings.default_tls_secret:
            ns, _, name = self.settings.default_tls_secret.partition("/")
            sec = secrets.get((ns, name))
            if sec is not None and "tls.crt" in sec.data and "tls.key" in sec.data:
                used_secrets[(ns, name)] = (sec.data["tls.crt"], sec.data["tls.key"])
                tls_hosts[""] = (ns, name)
            else:
                problems.append(f"--default-tls-secret {self.settings.default_tls_secret}: secret not found or not kubernetes.io/tls")
        for (ns, name), (crt, key) in sorted(used_secrets.items()):
            why = self._pem_problem(crt, key)
            if why:
                # Found here, in the control plane, so that /debug/snapshot and
                # meshproxy_config_problems show it in every mode (with --workers the TLS
                # contexts live in the workers); the hosts fall back to the default certificate.
                problems.append(f"Secret/{ns}/{name}: tls.crt/tls.key do not load ({why}); its hosts get the default certificate")
        table = RouteTable.build(entries, default=default)
        problems.extend(table.conflicts)
        problems.extend(table.skipped)
        names = tuple(f"{i.namespace}/{i.name}" for i in served)
        self.ingress_findings = tuple(findings)
        self._routes_cache = (sig, table, tuple(problems), tls_hosts, used_secrets, names, upstream_tls,
                              _frozen(passthrough), upstream_h2, self.ingress_findings)
        return self._routes_cache[1:-1]

    def _l7_ports(self, services: Mapping[tuple[str, str], o.Service]) -> bool:
        """Does any Service port ask to be served per request (appProtocol)? Cached by the
        identity of the Services."""
        sig = tuple(map(id, services.values()))
        if self._l7_cache is None or self._l7_cache[0] != sig:
            self._l7_cache = (sig, any(sp.app_protocol in L7_APP_PROTOCOLS for svc in services.values()
                                       for sp in svc.ports))
        return self._l7_cache[1]

    # -- whole snapshot -------------------------------------------------------------------------

    def build(self, store, index, allocator, changed: set[tuple[str, str]] | None = None) -> Snapshot:
        """One snapshot. Per-service parts are cached by the identity of their inputs (the
        Service object, its endpoint-set tuple, this node, its allocations). When the caller
        says which services may have changed (``changed``), and neither the node nor the
        allocations did, only those services are recomputed and patched into copies of the
        last snapshot's tables — the cost of a one-pod change does not grow with the cluster."""
        problems: list[str] = []
        node, node_problems = self.node_info(store.list("Node"))
        problems.extend(node_problems)
        if self.settings.proxy_mode == "nftables":
            problems.extend(_kernel_mode_problems(self.settings.service_cidr, node))
        services: dict[tuple[str, str], o.Service] = dict(store.items("Service"))
        sig = tuple(map(id, services.values()))
        alloc_changed = self._alloc_cache is None or self._alloc_cache[0] != sig
        if alloc_changed:
            ips, node_ports = allocator.assign(services)
            cluster_ips = _frozen(dict(getattr(allocator, "cluster_ips", {})))
            family_problems = dict(getattr(allocator, "problems", {}))
            allocated: dict[str, Any] = {f"{ns}/{name}": ip for (ns, name), ip in ips.items()}
            allocated.update({f"{ns}/{name}:{pk}": port for (ns, name, pk), port in node_ports.items()})
            self._alloc_cache = (sig, ips, node_ports, _frozen(allocated), cluster_ips, family_problems)
            if self._last is not None and self._last[0] == node and changed is not None and \
                    (ips, node_ports) == (self._last[6], self._last[7]) and \
                    not any(self._last[8].get(k, v) != v for k, v in cluster_ips.items()):
                # Services came or went but nobody's addresses moved: still incremental.
                changed = changed | (set(services) ^ set(self._last[3]))
            else:
                changed = None
        _, ips, node_ports, allocated_view, cluster_ips, family_problems = self._alloc_cache
        last = self._last
        # Listeners by protocol: l4 holds TCP, udp holds UDP, both keyed (host, port); owners
        # says which service holds each (host, port, protocol).
        tables: dict[str, dict[tuple[str, int], L4Listener]]
        if changed is None or last is None or last[0] != node:
            backends: dict[tuple[str, str, str], Backend] = {}
            tables = {"TCP": {}, "UDP": {}}
            endpoint_sets: dict = {}
            owners: dict[tuple[str, int, str], tuple[str, str]] = {}
            svc_problems: dict[tuple[str, str], tuple[str, ...]] = {}
            todo = list(services)
            changed_keys = None
        else:
            backends, endpoint_sets, owners, svc_problems = dict(last[1]), dict(last[3]), dict(last[4]), dict(last[5])
            tables = {"TCP": dict(last[2]["TCP"]), "UDP": dict(last[2]["UDP"])}
            todo = [k for k in changed]
            changed_keys = frozenset(todo)
            for key in todo:          # take out what these services contributed last time
                entry = self._service_cache.get(key)
                if entry is not None:
                    for b in entry[1]:
                        backends.pop(b.key, None)
                    for lst in entry[2]:
                        if owners.get((lst.host, lst.port, lst.protocol)) == key:
                            del owners[(lst.host, lst.port, lst.protocol)]
                            del tables[lst.protocol][(lst.host, lst.port)]
                endpoint_sets.pop(key, None)
                svc_problems.pop(key, None)
        sets_of = index.sets
        cache = self._service_cache
        for key in todo:
            svc = services.get(key)
            if svc is None:
                cache.pop(key, None)
                self._backend_cache.pop(key, None)
                continue
            sets = sets_of.get(key, ())
            endpoint_sets[key] = sets
            cips = cluster_ips.get(key, ())
            nps = tuple(node_ports.get((key[0], key[1], sp.name or str(sp.port))) for sp in svc.ports) \
                if svc.type in ("NodePort", "LoadBalancer") else ()
            inputs = (svc, sets, node, cips, nps, family_problems.get(key))
            entry = cache.get(key)
            if entry is None or entry[0] != inputs:
                probs: list[str] = [f"{svc.ref}: {family_problems[key]}"] if key in family_problems else []
                bks = self._backends_for(svc, sets, node.name or None, probs)
                wanted: dict[tuple[str, int, str], L4Listener] = {}
                self._listeners(svc, cips, node.all_addresses, node_ports, wanted, probs)
                entry = (inputs, bks, tuple(wanted.values()), tuple(probs))
                cache[key] = entry
            for b in entry[1]:
                backends[b.key] = b
            probs2 = list(entry[3])
            for lst in entry[2]:
                addr = (lst.host, lst.port, lst.protocol)
                other = owners.get(addr)
                if other is not None and other != key:
                    probs2.append(f"{svc.ref}: {lst.host}:{lst.port}/{lst.protocol} is already used by "
                                  f"{other[0]}/{other[1]}; not served twice")
                    continue
                owners[addr] = key
                tables[lst.protocol][(lst.host, lst.port)] = lst
            if probs2:
                svc_problems[key] = tuple(probs2)
        if changed is None and len(cache) > len(services):
            for key in [k for k in cache if k not in services]:
                del cache[key]
                self._backend_cache.pop(key, None)
        self._last = (node, backends, tables, endpoint_sets, owners, svc_problems, ips, node_ports, cluster_ips)
        for p in svc_problems.values():
            problems.extend(p)
        classes = {c.name: c for c in store.list("IngressClass")}
        table, route_problems, tls_hosts, used_secrets, served, upstream_tls, passthrough, upstream_h2 = self._routes(
            sorted(store.list("Ingress"), key=lambda i: (i.namespace, i.name)), classes, services,
            {k: v for k, v in store.items("Secret").items()})
        problems.extend(route_problems)
        if upstream_h2:
            # ingress-nginx's backend-protocol GRPC / GRPCS: the Service port's pods are spoken
            # to in HTTP/2 whatever the port's name says (a new dict: self._last stays as built).
            if self.settings.http2:
                backends = {k: replace(b, l7_protocol=H2C) if k in upstream_h2 and b.l7_protocol != H2C else b
                            for k, b in backends.items()}
            else:
                problems.extend(f"{k[0]}/{k[1]}:{k[2]}: an Ingress says backend-protocol GRPC or GRPCS, but HTTP/2 "
                                "is off (--http2); its pods are spoken to in HTTP/1.1" for k in sorted(upstream_h2))
        l4 = tables["TCP"]
        gw = self._gateways(store, services, ips, l4, node)
        problems.extend(gw.problem_lines())
        if gw.mesh_l7 or gw.l4_listeners:
            l4 = {a: lst for a, lst in l4.items() if a not in gw.mesh_l7}
            for addr, lst in gw.l4_listeners.items():
                l4.setdefault(addr, lst)
        if gw.secrets:
            used_secrets = {**used_secrets, **gw.secrets}
        mesh = None
        if self.settings.sidecar:
            # O(pods + endpoints) per build, for one pod's sidecar: which destinations are meshed
            # and who they must be, its own policy and HTTP ports (meshproxy.core.mesh).
            mesh = build_mesh_state(store.list("Pod"), store.list("PeerAuthentication") + store.list("AuthorizationPolicy"),
                                    services, backends, self.settings)
        self.version += 1
        return Snapshot(
            version=self.version, created=time.time(), node=node,
            services=_frozen(services), endpoint_sets=_frozen(endpoint_sets), backends=_frozen(backends),
            l4=_frozen(l4), routes=table, ingresses=served, tls_hosts=_frozen(dict(tls_hosts)),
            secrets=_frozen(dict(used_secrets)), problems=tuple(problems), allocated=allocated_view,
            http_listeners=gw.http_listeners, gateway_status=gw.status,
            udp=_frozen(tables["UDP"]), cluster_ips=cluster_ips, changed=changed_keys, upstream_tls=upstream_tls,
            passthrough=passthrough, mesh=mesh)

    def _gateways(self, store, services: Mapping[tuple[str, str], o.Service], ips: Mapping, l4: Mapping,
                  node: NodeInfo):
        """Gateway and mesh listeners, status and problems (meshproxy.core.gateway)."""
        objects = {k: store.list(k) for k in GATEWAY_KINDS}
        if not any(objects.values()) and not self._l7_ports(services):
            self.gateway_result = EMPTY_GATEWAYS     # the common case costs one scan, nothing else
            return self.gateway_result
        cluster_ips = {key: (svc.cluster_ip if svc.cluster_ip and svc.cluster_ip != "None" else ips.get(key))
                       for key, svc in services.items()}
        occupied = {addr: f"Service {lst.backend[0]}/{lst.backend[1]}" for addr, lst in l4.items()}
        for flag, hp in (("--ingress-listen", self.settings.ingress_listen),
                         ("--ingress-tls-listen", self.settings.ingress_tls_listen)):
            if hp is not None:
                occupied[(hp[0], hp[1])] = flag
        self.gateway_result = build_gateways(
            objects, services, {k: v for k, v in cluster_ips.items() if v},
            store.items("Secret"), pem_problem=self._pem_problem, gateway_addresses=self.settings.gateway_addresses,
            upstream_timeout=self.settings.upstream_timeout, occupied=occupied, node_address=node.address,
            cache=self._gateway_cache, http2=self.settings.http2)
        return self.gateway_result
