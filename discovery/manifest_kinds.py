"""One decoded manifest document -> one typed object of ``discovery.objects``.

``parse_document`` checks the identity every kind shares (apiVersion, kind, metadata) and hands
the rest to the parser of the kind (``_PARSERS``); every parser reads through a
``DocContext``, so all problems of a document are collected with their lines.

Defaults follow what the API server sets (``pkg/apis/core/v1/defaults.go``): namespace
``default``, protocol ``TCP``, ``targetPort`` = ``port``, ``sessionAffinity: None`` with a
10800 s timeout, ``type: ClusterIP``, traffic policies ``Cluster``, probe period 10 s,
timeout 1 s, thresholds 1/3.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
from types import MappingProxyType
from typing import Any

from . import gateway_api, ipfamilies, istio
from . import objects as o
from .manifest_fields import ConfigError, DocContext, frozen_map, type_name
from .manifest_yaml import line_of
from .selectors import validate_label_key, validate_label_value

__all__ = ["parse_document", "SUPPORTED_KINDS", "ingress_path_errors", "NODE_PORT_MIN", "NODE_PORT_MAX",
           "INGRESS_PATH_INVALID_SEQUENCES", "INGRESS_PATH_INVALID_SUFFIXES"]

log = logging.getLogger("meshproxy.discovery")

# The node port range of the API server's default --service-node-port-range.
NODE_PORT_MIN, NODE_PORT_MAX = 30000, 32767

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
# IANA_SVC_NAME (used for named ports): <= 15 chars, lowercase alnum and '-', at least one letter,
# no leading/trailing/double '-'.
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9]|-(?!-))*\Z")
_WILDCARD_HOST = re.compile(r"\*\.[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")

SUPPORTED_KINDS = {
    ("v1", "Node"), ("v1", "Pod"), ("v1", "Service"), ("v1", "Endpoints"), ("v1", "Secret"),
    ("discovery.k8s.io/v1", "EndpointSlice"), ("discovery.k8s.io/v1beta1", "EndpointSlice"),
    ("networking.k8s.io/v1", "Ingress"), ("networking.k8s.io/v1", "IngressClass"),
} | istio.KINDS | gateway_api.KINDS
_CLUSTER_SCOPED = frozenset({"Node", "IngressClass"}) | gateway_api.CLUSTER_SCOPED


def parse_document(doc: Any, file: str = "<input>", line: int = 1) -> tuple[Any, list[ConfigError], str | None]:
    """Parse one decoded document.

    Returns ``(object or None, errors, skipped)``: ``skipped`` is a description when the
    document is of a kind meshproxy does not use (not an error).
    """
    if doc is None:
        return None, [], None
    ctx = DocContext(file, line_of(doc) or line, "")
    if not isinstance(doc, dict):
        ctx.error("", f"a manifest must be a mapping, not {type_name(doc)}")
        return None, ctx.errors, None
    api = doc.get("apiVersion")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not isinstance(api, str):
        ctx.error("apiVersion" if not isinstance(api, str) else "kind", "required field is missing", doc)
        return None, ctx.errors, None
    if kind == "List" and api == "v1":
        ctx.error("kind", "List documents are not supported: write the items as separate documents", doc)
        return None, ctx.errors, None
    if (api, kind) not in SUPPORTED_KINDS:
        return None, [], f"{file}:{ctx.line}: {api}/{kind}"
    meta = ctx.map(doc, "metadata", "metadata", required=True)
    name = ctx.str(meta, "name", "metadata.name", required=True) if meta is not None else None
    cluster_scoped = kind in _CLUSTER_SCOPED
    namespace = "" if cluster_scoped else (ctx.str(meta, "namespace", "metadata.namespace") or "default")
    ctx.ref = f"{kind}/{name}" if cluster_scoped else f"{kind}/{namespace}/{name}"
    if name is None:
        return None, ctx.errors, None
    if kind == "Namespace":
        if not _DNS1123_LABEL.match(name) or len(name) > 63:
            ctx.error("metadata.name", f"{name!r} is not a valid DNS-1123 label", meta, "name")
    elif kind in ("Service",):
        if not _DNS1035_LABEL.match(name) or len(name) > 63:
            ctx.error("metadata.name", f"{name!r} is not a valid DNS-1035 label (lowercase letters, digits, '-', starting with a letter)", meta, "name")
    elif not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        ctx.error("metadata.name", f"{name!r} is not a valid DNS-1123 subdomain", meta, "name")
    if namespace and (not _DNS1123_LABEL.match(namespace) or len(namespace) > 63):
        ctx.error("metadata.namespace", f"{namespace!r} is not a valid DNS-1123 label", meta, "namespace")
    labels = ctx.string_map(meta, "labels", "metadata.labels") or {}
    _check_labels(ctx, meta, labels)
    annotations = ctx.string_map(meta, "annotations", "metadata.annotations") or {}
    m = o.Meta(
        name=name, namespace=namespace, labels=frozen_map(labels), annotations=frozen_map(annotations),
        creation_timestamp=_scalar_str(meta.get("creationTimestamp")),
        deletion_timestamp=_scalar_str(meta.get("deletionTimestamp")) or None,
        uid=_scalar_str(meta.get("uid")), resource_version=_scalar_str(meta.get("resourceVersion")),
    )
    origin = o.Origin(file, ctx.line)
    parser = _PARSERS[kind]
    try:
        obj = parser(ctx, doc, m, origin)
    except Exception as exc:  # a parser bug must not take the whole load down; report it
        log.exception("internal error parsing %s", ctx.ref)
        ctx.error("", f"internal error: {exc!r}")
        return None, ctx.errors, None
    return (obj if not ctx.errors else None), ctx.errors, None


def _scalar_str(v: Any) -> str:
    return "" if v is None else str(v)


def _check_labels(ctx: DocContext, meta: dict, labels: dict[str, str]) -> None:
    holder = meta.get("labels")
    for k, v in labels.items():
        msg = validate_label_key(k) or validate_label_value(v)
        if msg:
            ctx.error(f"metadata.labels.{k}", msg, holder, k)


def _parse_node(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.Node:
    status = ctx.map(doc, "status", "status") or {}
    addrs = []
    for i, a in enumerate(ctx.list(status, "addresses", "status.addresses")):
        p = f"status.addresses[{i}]"
        t = ctx.str(a, "type", f"{p}.type", required=True)
        addr = ctx.str(a, "address", f"{p}.address", required=True)
        if t and addr:
            if t in ("InternalIP", "ExternalIP"):
                _check_ip(ctx, addr, f"{p}.address", a, "address")
            addrs.append((t, addr))
    return o.Node(meta=m, origin=origin, addresses=tuple(addrs))


def _check_ip(ctx: DocContext, value: str, path: str, container: Any, key: Any) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        ctx.error(path, f"{value!r} is not an IP address", container, key)
        return False


def _int_or_name(ctx: DocContext, parent: dict, key: str, path: str) -> int | str | None:
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        ctx.error(path, "must be a port number or name", parent, key)
        return None
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            ctx.error(path, f"{value} is outside 1-65535", parent, key)
            return None
        return value
    if isinstance(value, str):
        if value.isdigit():
            n = int(value)
            if not 1 <= n <= 65535:
                ctx.error(path, f"{n} is outside 1-65535", parent, key)
                return None
            return n
        if len(value) > 15 or not _IANA_SVC_NAME.match(value) or not re.search("[a-z]", value):
            ctx.error(path, f"{value!r} is not a valid port name (IANA_SVC_NAME: at most 15 lowercase letters, digits and '-')", parent, key)
            return None
        return value
    ctx.error(path, "must be a port number or name", parent, key)
    return None


def _parse_probe(ctx: DocContext, pr: dict, path: str) -> o.Probe | None:
    http = ctx.map(pr, "httpGet", f"{path}.httpGet")
    tcp = ctx.map(pr, "tcpSocket", f"{path}.tcpSocket")
    common = dict(
        initial_delay=float(ctx.int(pr, "initialDelaySeconds", f"{path}.initialDelaySeconds", default=0, lo=0, hi=86400 * 365)),
        period=float(ctx.int(pr, "periodSeconds", f"{path}.periodSeconds", default=10, lo=1, hi=86400)),
        timeout=float(ctx.int(pr, "timeoutSeconds", f"{path}.timeoutSeconds", default=1, lo=1, hi=86400)),
        success_threshold=ctx.int(pr, "successThreshold", f"{path}.successThreshold", default=1, lo=1, hi=1_000_000),
        failure_threshold=ctx.int(pr, "failureThreshold", f"{path}.failureThreshold", default=3, lo=1, hi=1_000_000),
    )
    if http is not None and tcp is not None:
        ctx.error(path, "may not specify more than one handler type", pr)
        return None
    if http is not None:
        port = _int_or_name(ctx, http, "port", f"{path}.httpGet.port")
        if port is None and "port" not in http:
            ctx.error(f"{path}.httpGet.port", "required field is missing", http)
        headers = []
        for i, h in enumerate(ctx.list(http, "httpHeaders", f"{path}.httpGet.httpHeaders")):
            hn = ctx.str(h, "name", f"{path}.httpGet.httpHeaders[{i}].name", required=True)
            hv = ctx.str(h, "value", f"{path}.httpGet.httpHeaders[{i}].value", default="")
            if hn:
                headers.append((hn, hv or ""))
        p = ctx.str(http, "path", f"{path}.httpGet.path", default="/") or "/"
        if not p.startswith("/"):
            p = "/" + p
        return o.Probe(action="http", port=port or 0, path=p,
                       host=ctx.str(http, "host", f"{path}.httpGet.host"),
                       scheme=ctx.str(http, "scheme", f"{path}.httpGet.scheme", default="HTTP",
                                      choices=("HTTP", "HTTPS")) or "HTTP",
                       headers=tuple(headers), **common)
    if tcp is not None:
        port = _int_or_name(ctx, tcp, "port", f"{path}.tcpSocket.port")
        if port is None and "port" not in tcp:
            ctx.error(f"{path}.tcpSocket.port", "required field is missing", tcp)
        return o.Probe(action="tcp", port=port or 0, host=ctx.str(tcp, "host", f"{path}.tcpSocket.host"), **common)
    if "exec" in pr or "grpc" in pr:
        # meshproxy cannot run commands inside a pod; such pods fall back to their Ready condition.
        log.info("%s: %s: exec/grpc probes are not run by meshproxy; using the Ready condition", ctx.ref, path)
        return None
    ctx.error(path, "must specify a handler type (httpGet or tcpSocket)", pr)
    return None


def _parse_pod(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.Pod:
    spec = ctx.map(doc, "spec", "spec") or {}
    status = ctx.map(doc, "status", "status") or {}
    ports: list[o.ContainerPort] = []
    probe = None
    seen_names: dict[str, str] = {}
    for ci, c in enumerate(ctx.list(spec, "containers", "spec.containers")):
        cp = f"spec.containers[{ci}]"
        if not isinstance(c, dict):
            ctx.error(cp, "must be a mapping", spec.get("containers"), ci)
            continue
        for pi, p in enumerate(ctx.list(c, "ports", f"{cp}.ports")):
            pp = f"{cp}.ports[{pi}]"
            if not isinstance(p, dict):
                ctx.error(pp, "must be a mapping", c.get("ports"), pi)
                continue
            num = ctx.int(p, "containerPort", f"{pp}.containerPort", required=True, lo=1, hi=65535)
            pname = ctx.str(p, "name", f"{pp}.name")
            proto = ctx.str(p, "protocol", f"{pp}.protocol", default="TCP", choices=("TCP", "UDP", "SCTP")) or "TCP"
            if pname is not None:
                if len(pname) > 15 or not _IANA_SVC_NAME.match(pname) or not re.search("[a-z]", pname):
                    ctx.error(f"{pp}.name", f"{pname!r} is not a valid port name (IANA_SVC_NAME)", p, "name")
                elif pname in seen_names:
                    ctx.error(f"{pp}.name", f"duplicate port name {pname!r} (also {seen_names[pname]})", p, "name")
                else:
                    seen_names[pname] = pp
            if num is not None:
                ports.append(o.ContainerPort(pname, num, proto))
        rp = ctx.map(c, "readinessProbe", f"{cp}.readinessProbe")
        if rp is not None and probe is None:
            probe = _parse_probe(ctx, rp, f"{cp}.readinessProbe")
    pod_ip = ctx.str(status, "podIP", "status.podIP")
    if pod_ip is not None and not _check_ip(ctx, pod_ip, "status.podIP", status, "podIP"):
        pod_ip = None
    pod_ips = []
    for i, item in enumerate(ctx.list(status, "podIPs", "status.podIPs")):
        ip = ctx.str(item, "ip", f"status.podIPs[{i}].ip", required=True) if isinstance(item, dict) else None
        if ip is not None and _check_ip(ctx, ip, f"status.podIPs[{i}].ip", item, "ip"):
            pod_ips.append(ip)
    if pod_ips and pod_ip is None:
        pod_ip = pod_ips[0]
    ready = None
    for i, cond in enumerate(ctx.list(status, "conditions", "status.conditions")):
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            st = cond.get("status")
            if st is True or st == "True":
                ready = True
            elif st is False or st in ("False", "Unknown"):
                ready = False
            else:
                ctx.error(f"status.conditions[{i}].status", f"{st!r} must be True, False or Unknown", cond, "status")
    return o.Pod(meta=m, origin=origin, node_name=ctx.str(spec, "nodeName", "spec.nodeName"),
                 ports=tuple(ports), readiness_probe=probe, pod_ip=pod_ip, pod_ips=tuple(pod_ips),
                 ready_condition=ready,
                 phase=ctx.str(status, "phase", "status.phase", default="") or "",
                 hostname=ctx.str(spec, "hostname", "spec.hostname"),
                 subdomain=ctx.str(spec, "subdomain", "spec.subdomain"),
                 service_account=ctx.str(spec, "serviceAccountName", "spec.serviceAccountName",
                                         default=None) or ctx.str(spec, "serviceAccount", "spec.serviceAccount") or "default")


_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")


def _parse_service(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.Service:
    spec = ctx.map(doc, "spec", "spec") or {}
    status = ctx.map(doc, "status", "status") or {}
    stype = ctx.str(spec, "type", "spec.type", default="ClusterIP", choices=_SERVICE_TYPES) or "ClusterIP"
    cip = ctx.str(spec, "clusterIP", "spec.clusterIP")
    if cip == "":
        cip = None
    if cip is not None and cip != "None":
        if not _check_ip(ctx, cip, "spec.clusterIP", spec, "clusterIP"):
            cip = None
    cips, families, family_policy = _parse_ip_families(ctx, spec, cip)
    if cip is None and cips:
        cip = cips[0]
    selector = ctx.string_map(spec, "selector", "spec.selector")
    if selector is not None:
        _check_labels(ctx, {"labels": spec.get("selector")}, selector)
    if not selector:
        # `selector: {}` is a Service without a selector, as in the API (the field is
        # omitempty, so the endpoints controllers never see an empty map) - it does not select
        # every pod of the namespace. Endpoints then come from Endpoints/EndpointSlices.
        selector = None
    ports: list[o.ServicePort] = []
    names: dict[str, int] = {}
    seen_port: dict[tuple[int, str], int] = {}
    raw_ports = ctx.list(spec, "ports", "spec.ports")
    for i, p in enumerate(raw_ports):
        pp = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            ctx.error(pp, "must be a mapping", raw_ports, i)
            continue
        name = ctx.str(p, "name", f"{pp}.name", default="") or ""
        port = ctx.int(p, "port", f"{pp}.port", required=True, lo=1, hi=65535)
        proto = ctx.str(p, "protocol", f"{pp}.protocol", default="TCP", choices=("TCP", "UDP", "SCTP")) or "TCP"
        target = _int_or_name(ctx, p, "targetPort", f"{pp}.targetPort")
        node_port = ctx.int(p, "nodePort", f"{pp}.nodePort", lo=NODE_PORT_MIN, hi=NODE_PORT_MAX)
        app_protocol = ctx.str(p, "appProtocol", f"{pp}.appProtocol") or None
        if name:
            if len(name) > 63 or not _DNS1123_LABEL.match(name):
                ctx.error(f"{pp}.name", f"{name!r} is not a valid DNS-1123 label", p, "name")
            elif name in names:
                ctx.error(f"{pp}.name", f"duplicate port name {name!r} (also spec.ports[{names[name]}])", p, "name")
            names[name] = i
        elif len(raw_ports) > 1:
            ctx.error(f"{pp}.name", "required when a service has more than one port", p)
        if port is not None:
            if (port, proto) in seen_port:
                ctx.error(f"{pp}.port", f"duplicate {proto} port {port} (also spec.ports[{seen_port[(port, proto)]}])", p, "port")
            seen_port[(port, proto)] = i
        if node_port is not None and stype not in ("NodePort", "LoadBalancer"):
            ctx.error(f"{pp}.nodePort", f"may not be used when type is {stype!r}", p, "nodePort")
            node_port = None
        if port is not None:
            ports.append(o.ServicePort(name, port, target if target is not None else port, node_port, proto,
                                       app_protocol))
    if cip == "None":
        if stype in ("NodePort", "LoadBalancer"):
            ctx.error("spec.clusterIP", f"may not be 'None' (headless) for type {stype}", spec, "clusterIP")
    elif stype != "ExternalName" and not raw_ports:
        ctx.error("spec.ports", "required unless the service is headless (clusterIP: None)", spec)
    ext_name = None
    if stype == "ExternalName":
        ext_name = ctx.str(spec, "externalName", "spec.externalName", required=True)
        if ext_name and not _DNS1123_SUBDOMAIN.match(ext_name.lower().rstrip(".")):
            ctx.error("spec.externalName", f"{ext_name!r} is not a valid DNS name", spec, "externalName")
    affinity = ctx.str(spec, "sessionAffinity", "spec.sessionAffinity", default="None", choices=("None", "ClientIP")) or "None"
    timeout = 10800
    cfg = ctx.map(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig")
    if cfg is not None:
        cli = ctx.map(cfg, "clientIP", "spec.sessionAffinityConfig.clientIP")
        if cli is not None:
            timeout = ctx.int(cli, "timeoutSeconds", "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                              default=10800, lo=1, hi=86400) or 10800
    etp = ctx.str(spec, "externalTrafficPolicy", "spec.externalTrafficPolicy", choices=("Cluster", "Local"))
    # The API server's rule: only for externally reachable services (NodePort, LoadBalancer,
    # or any type with externalIPs).
    if etp is not None and stype not in ("NodePort", "LoadBalancer") and not spec.get("externalIPs"):
        ctx.error("spec.externalTrafficPolicy", f"may only be set for externally reachable services "
                  f"(NodePort, LoadBalancer or externalIPs), not {stype}", spec, "externalTrafficPolicy")
    itp = ctx.str(spec, "internalTrafficPolicy", "spec.internalTrafficPolicy", default="Cluster", choices=("Cluster", "Local")) or "Cluster"
    ext_ips = []
    for i, ip in enumerate(ctx.list(spec, "externalIPs", "spec.externalIPs")):
        if isinstance(ip, str) and _check_ip(ctx, ip, f"spec.externalIPs[{i}]", spec.get("externalIPs"), i):
            ext_ips.append(ip)
    lb_ips = []
    lb = ctx.map(status, "loadBalancer", "status.loadBalancer") or {}
    for i, ing in enumerate(ctx.list(lb, "ingress", "status.loadBalancer.ingress")):
        ip = ing.get("ip") if isinstance(ing, dict) else None
        if isinstance(ip, str) and _check_ip(ctx, ip, f"status.loadBalancer.ingress[{i}].ip", ing, "ip"):
            lb_ips.append(ip)
    fields = [(f"spec.ports[{i}].nodePort", line_of(p, "nodePort")) for i, p in enumerate(raw_ports)
              if isinstance(p, dict) and "nodePort" in p]
    if "clusterIP" in spec:
        fields.append(("spec.clusterIP", line_of(spec, "clusterIP")))
    origin = o.Origin(origin.file, origin.line, tuple((k, n) for k, n in fields if n))
    return o.Service(meta=m, origin=origin, type=stype, cluster_ip=cip, cluster_ips=cips,
                     ip_families=families, ip_family_policy=family_policy,
                     selector=MappingProxyType(selector) if selector is not None else None,
                     ports=tuple(ports), session_affinity=affinity, affinity_timeout=timeout,
                     external_traffic_policy=etp or "Cluster", internal_traffic_policy=itp,
                     publish_not_ready=ctx.bool(spec, "publishNotReadyAddresses", "spec.publishNotReadyAddresses"),
                     external_ips=tuple(ext_ips), lb_ingress_ips=tuple(lb_ips), external_name=ext_name)


def _parse_ip_families(ctx: DocContext, spec: dict, cip: str | None) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """spec.clusterIPs / ipFamilies / ipFamilyPolicy, checked as the API server does
    (discovery/ipfamilies.py)."""
    raw_ips = [v for v in ctx.list(spec, "clusterIPs", "spec.clusterIPs") if isinstance(v, str)]
    raw_fams = [v for v in ctx.list(spec, "ipFamilies", "spec.ipFamilies") if isinstance(v, str)]
    policy = ctx.str(spec, "ipFamilyPolicy", "spec.ipFamilyPolicy")
    errors = ipfamilies.check_service(cip, raw_ips, raw_fams, policy)
    for path, msg in errors:
        ctx.error(path, msg, spec, path.split(".")[1].split("[")[0])
    if errors:
        return (), (), None
    return tuple(raw_ips), tuple(raw_fams), policy


def _opt_bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _parse_slice_ports(ctx: DocContext, parent: dict, path: str) -> list[o.SlicePort]:
    ports = []
    for i, p in enumerate(ctx.list(parent, "ports", path)):
        pp = f"{path}[{i}]"
        if not isinstance(p, dict):
            continue
        num = ctx.int(p, "port", f"{pp}.port", required=True, lo=1, hi=65535)
        if num is not None:
            ports.append(o.SlicePort(ctx.str(p, "name", f"{pp}.name", default="") or "", num,
                                     ctx.str(p, "protocol", f"{pp}.protocol", default="TCP") or "TCP"))
    return ports


def _parse_endpoint_slice(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.EndpointSlice:
    service = m.labels.get("kubernetes.io/service-name", "")
    if not service:
        ctx.error("metadata.labels", "an EndpointSlice needs the label kubernetes.io/service-name to belong to a Service", doc.get("metadata"))
    atype = ctx.str(doc, "addressType", "addressType", required=True, choices=("IPv4", "IPv6", "FQDN")) or "IPv4"
    eps = []
    for i, e in enumerate(ctx.list(doc, "endpoints", "endpoints")):
        ep = f"endpoints[{i}]"
        if not isinstance(e, dict):
            continue
        addrs = [a for a in ctx.list(e, "addresses", f"{ep}.addresses") if isinstance(a, str)]
        if not addrs:
            ctx.error(f"{ep}.addresses", "must have at least one address", e)
        if atype != "FQDN":
            for j, a in enumerate(addrs):
                _check_ip(ctx, a, f"{ep}.addresses[{j}]", e.get("addresses"), j)
        cond = ctx.map(e, "conditions", f"{ep}.conditions") or {}
        # The API's nil rules, as kube-proxy reads them: ready and serving unset mean true,
        # terminating unset means false.
        ready = _opt_bool(cond.get("ready"))
        serving = _opt_bool(cond.get("serving"))
        term = _opt_bool(cond.get("terminating"))
        tref = e.get("targetRef") if isinstance(e.get("targetRef"), dict) else {}
        eps.append(o.SliceEndpoint(tuple(addrs), ready is not False, serving is not False,
                                   term is True, ctx.str(e, "nodeName", f"{ep}.nodeName"),
                                   tref.get("name") if isinstance(tref.get("name"), str) else None))
    return o.EndpointSlice(meta=m, origin=origin, service=service, address_type=atype,
                           endpoints=tuple(eps), ports=tuple(_parse_slice_ports(ctx, doc, "ports")))


def _parse_endpoints(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.EndpointSlice:
    """v1 Endpoints -> one EndpointSlice-shaped object (only single-subset-port-set is exact;
    several subsets with different port sets are merged per port name, as kube-proxy did)."""
    eps: list[o.SliceEndpoint] = []
    ports: dict[str, o.SlicePort] = {}
    for si, s in enumerate(ctx.list(doc, "subsets", "subsets")):
        sp = f"subsets[{si}]"
        if not isinstance(s, dict):
            continue
        for p in _parse_slice_ports(ctx, s, f"{sp}.ports"):
            ports.setdefault(p.name, p)
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for ai, a in enumerate(ctx.list(s, key, f"{sp}.{key}")):
                ip = ctx.str(a, "ip", f"{sp}.{key}[{ai}].ip", required=True)
                if ip and _check_ip(ctx, ip, f"{sp}.{key}[{ai}].ip", a, "ip"):
                    tref = a.get("targetRef") if isinstance(a.get("targetRef"), dict) else {}
                    eps.append(o.SliceEndpoint((ip,), ready, ready, False, ctx.str(a, "nodeName", f"{sp}.{key}[{ai}].nodeName"),
                                               tref.get("name") if isinstance(tref.get("name"), str) else None))
    return o.EndpointSlice(meta=m, origin=origin, service=m.name, endpoints=tuple(eps),
                           ports=tuple(ports.values()), legacy=True)


def _parse_ingress_backend(ctx: DocContext, b: dict, path: str) -> o.IngressBackend | None:
    svc = ctx.map(b, "service", f"{path}.service")
    res = ctx.map(b, "resource", f"{path}.resource")
    if svc is not None and res is not None:
        ctx.error(path, "cannot set both service and resource", b)
        return None
    if res is not None:
        return o.IngressBackend(resource=f"{res.get('kind')}/{res.get('name')}")
    if svc is None:
        ctx.error(path, "one of service or resource is required", b)
        return None
    name = ctx.str(svc, "name", f"{path}.service.name", required=True)
    port = ctx.map(svc, "port", f"{path}.service.port", required=True) or {}
    number = ctx.int(port, "number", f"{path}.service.port.number", lo=1, hi=65535)
    pname = ctx.str(port, "name", f"{path}.service.port.name")
    if (number is None) == (pname is None) and "number" not in port:
        ctx.error(f"{path}.service.port", "exactly one of number or name is required", svc, "port")
        return None
    if number is not None and pname is not None:
        ctx.error(f"{path}.service.port", "cannot set both number and name", svc, "port")
        return None
    return o.IngressBackend(service=name, port_number=number, port_name=pname)


def _check_host(ctx: DocContext, host: str, path: str, container: Any, key: Any) -> bool:
    h = host.lower()
    if h != host:
        ctx.error(path, f"{host!r} must be lowercase", container, key)
        return False
    try:
        ipaddress.ip_address(host)
        ctx.error(path, f"{host!r} must be a DNS name, not an IP address", container, key)
        return False
    except ValueError:
        pass
    if host.startswith("*"):
        if not _WILDCARD_HOST.match(host):
            ctx.error(path, f"{host!r} is not a valid wildcard host ('*.' followed by a DNS name)", container, key)
            return False
    elif not _DNS1123_SUBDOMAIN.match(host) or len(host) > 253:
        ctx.error(path, f"{host!r} is not a valid DNS-1123 subdomain", container, key)
        return False
    return True


_PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")
# k8s.io/kubernetes pkg/apis/networking/validation (validateHTTPIngressPath, the same from 1.19
# to today): Exact and Prefix paths must be absolute and must not contain these sequences or end
# with these suffixes; an ImplementationSpecific path, when given, must be absolute. Nothing
# else: "?", "#", "%25", "%2e", spaces, non-ASCII are all accepted by the API server, so they
# are accepted here too. Whether a request can ever reach such a path is the router's business
# (RouteTable.build skips and reports unreachable paths one by one, not the whole Ingress).
INGRESS_PATH_INVALID_SEQUENCES = ("//", "/./", "/../", "%2f", "%2F")
INGRESS_PATH_INVALID_SUFFIXES = ("/..", "/.")


def ingress_path_errors(path: str, path_type: str | None) -> list[str]:
    """What the API server says about ``path`` of ``path_type`` (empty: it accepts it)."""
    errs: list[str] = []
    if path_type in ("Exact", "Prefix"):
        if not path.startswith("/"):
            errs.append(f"{path!r} must be an absolute path")
        if path:
            errs.extend(f"{path!r} must not contain {seq!r}" for seq in INGRESS_PATH_INVALID_SEQUENCES if seq in path)
            errs.extend(f"{path!r} cannot end with {suf!r}" for suf in INGRESS_PATH_INVALID_SUFFIXES
                        if path.endswith(suf))
    elif path_type == "ImplementationSpecific" and path and not path.startswith("/"):
        errs.append(f"{path!r} must be an absolute path")
    return errs


def _parse_ingress(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.Ingress:
    spec = ctx.map(doc, "spec", "spec") or {}
    cls = ctx.str(spec, "ingressClassName", "spec.ingressClassName")
    if cls is None:
        cls = m.annotations.get(o.ANNOTATION_INGRESS_CLASS)
    default = None
    db = ctx.map(spec, "defaultBackend", "spec.defaultBackend")
    if db is not None:
        default = _parse_ingress_backend(ctx, db, "spec.defaultBackend")
    rules = []
    for ri, r in enumerate(ctx.list(spec, "rules", "spec.rules")):
        rp = f"spec.rules[{ri}]"
        if not isinstance(r, dict):
            ctx.error(rp, "must be a mapping", spec.get("rules"), ri)
            continue
        host = ctx.str(r, "host", f"{rp}.host")
        if host == "":
            host = None
        if host is not None:
            _check_host(ctx, host, f"{rp}.host", r, "host")
        paths = []
        http = ctx.map(r, "http", f"{rp}.http")
        if http is not None:
            raw_paths = ctx.list(http, "paths", f"{rp}.http.paths")
            if not raw_paths:
                ctx.error(f"{rp}.http.paths", "must have at least one path", http)
            for pi, p in enumerate(raw_paths):
                pp = f"{rp}.http.paths[{pi}]"
                if not isinstance(p, dict):
                    ctx.error(pp, "must be a mapping", raw_paths, pi)
                    continue
                ptype = ctx.str(p, "pathType", f"{pp}.pathType", required=True, choices=_PATH_TYPES)
                path = ctx.str(p, "path", f"{pp}.path", default="")
                if path is None:
                    path = ""
                for msg in ingress_path_errors(path, ptype):
                    ctx.error(f"{pp}.path", msg, p, "path")
                be = ctx.map(p, "backend", f"{pp}.backend", required=True)
                backend = _parse_ingress_backend(ctx, be, f"{pp}.backend") if be is not None else None
                if ptype and backend is not None:
                    paths.append(o.IngressPath(path or "/", ptype, backend))
        rules.append(o.IngressRule(host, tuple(paths)))
    if not rules and default is None:
        ctx.error("spec", "either defaultBackend or rules must be specified", doc, "spec")
    tls = []
    for ti, t in enumerate(ctx.list(spec, "tls", "spec.tls")):
        if not isinstance(t, dict):
            continue
        hosts = tuple(h for h in ctx.list(t, "hosts", f"spec.tls[{ti}].hosts") if isinstance(h, str))
        tls.append(o.IngressTLS(hosts, ctx.str(t, "secretName", f"spec.tls[{ti}].secretName")))
    # Where each annotation is written, for messages about one of them (ingress-nginx's).
    ann = (doc.get("metadata") or {}).get("annotations") if isinstance(doc.get("metadata"), dict) else None
    if isinstance(ann, dict):
        lines = tuple((f"metadata.annotations[{k}]", n) for k in ann if (n := line_of(ann, k)))
        origin = o.Origin(origin.file, origin.line, origin.fields + lines)
    return o.Ingress(meta=m, origin=origin, class_name=cls, default_backend=default,
                     rules=tuple(rules), tls=tuple(tls))


def _parse_ingress_class(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.IngressClass:
    spec = ctx.map(doc, "spec", "spec") or {}
    controller = ctx.str(spec, "controller", "spec.controller", default="") or ""
    return o.IngressClass(meta=m, origin=origin, controller=controller,
                          is_default=m.annotations.get(o.ANNOTATION_DEFAULT_CLASS) == "true")


def _parse_secret(ctx: DocContext, doc: dict, m: o.Meta, origin: o.Origin) -> o.Secret:
    stype = ctx.str(doc, "type", "type", default="Opaque") or "Opaque"
    data: dict[str, bytes] = {}
    raw = ctx.map(doc, "data", "data") or {}
    for k, v in raw.items():
        if not isinstance(v, str):
            ctx.error(f"data.{k}", "must be a base64 string", raw, k)
            continue
        try:
            data[str(k)] = base64.b64decode("".join(v.split()), validate=True)
        except ValueError:
            ctx.error(f"data.{k}", "is not valid base64", raw, k)
    sdata = ctx.map(doc, "stringData", "stringData") or {}
    for k, v in sdata.items():
        if isinstance(v, str):
            data[str(k)] = v.encode()  # stringData wins over data, as the API server merges it
        else:
            ctx.error(f"stringData.{k}", "must be a string", sdata, k)
    if stype == "kubernetes.io/tls":
        for k in ("tls.crt", "tls.key"):
            if k not in data:
                ctx.error(f"data.{k}", "required for type kubernetes.io/tls", doc)
    return o.Secret(meta=m, origin=origin, type=stype, data=MappingProxyType(data))


_PARSERS = {
    "Node": _parse_node, "Pod": _parse_pod, "Service": _parse_service,
    "EndpointSlice": _parse_endpoint_slice, "Endpoints": _parse_endpoints,
    "Ingress": _parse_ingress, "IngressClass": _parse_ingress_class, "Secret": _parse_secret,
    **istio.PARSERS,
    **gateway_api.PARSERS,
}
