"""Typed, frozen views of the Kubernetes objects meshproxy understands.

Sources (files, the API server, DNS) produce these; nothing downstream ever sees raw YAML.
Every object carries the ``Origin`` it was read from so that a later check (a duplicate
nodePort, a missing Secret) can still name the file and line.

Invariants:
- objects are immutable; a change is a new object replacing the old one in the store;
- defaults are already applied the way the API server applies them (namespace ``default``,
  protocol TCP, targetPort = port, sessionAffinity None with 10800 s, type ClusterIP, ...);
- mappings are read-only (``MappingProxyType``) and sequences are tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "Origin", "Meta", "Node", "ContainerPort", "Probe", "Pod", "ServicePort", "Service",
    "SliceEndpoint", "SlicePort", "EndpointSlice", "IngressBackend", "IngressPath",
    "IngressRule", "IngressTLS", "Ingress", "IngressClass", "Secret", "KubeObject",
    "EMPTY_MAP", "INGRESS_CONTROLLER", "ANNOTATION_INGRESS_CLASS", "ANNOTATION_DEFAULT_CLASS", "Base",
    "PeerAuthentication", "PolicySource", "PolicyOperation", "PolicyCondition", "PolicyRule",
    "AuthorizationPolicy", "ANNOTATION_INJECT",
]

EMPTY_MAP: Mapping[str, str] = MappingProxyType({})

# The controller name an IngressClass must carry for meshproxy to serve its Ingresses.
INGRESS_CONTROLLER = "meshproxy.dev/ingress"
ANNOTATION_INGRESS_CLASS = "kubernetes.io/ingress.class"
ANNOTATION_DEFAULT_CLASS = "ingressclass.kubernetes.io/is-default-class"
# A pod carrying this annotation with the value "enabled" is meshed (has a meshproxy sidecar).
ANNOTATION_INJECT = "meshproxy.dev/inject"


@dataclass(frozen=True, slots=True)
class Origin:
    file: str = "<api>"
    line: int = 0
    # (field path, line) of fields that checks across objects may blame (a duplicate nodePort
    # or clusterIP), so their messages point at the field rather than at the document.
    fields: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    def line_of(self, path: str) -> int:
        for p, line in self.fields:
            if p == path:
                return line
        return self.line

    def shifted(self, offset: int) -> Origin:
        return Origin(self.file, self.line + offset, tuple((p, n + offset) for p, n in self.fields))


@dataclass(frozen=True, slots=True)
class Meta:
    name: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    creation_timestamp: str = ""
    deletion_timestamp: str | None = None
    uid: str = ""
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class _Base:
    meta: Meta
    origin: Origin = field(default=Origin(), compare=False)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.meta.namespace, self.meta.name)  # type: ignore[attr-defined]

    @property
    def ref(self) -> str:
        """``Kind/namespace/name`` as used in every message."""
        kind = self.kind  # type: ignore[attr-defined]
        if kind in ("Node", "IngressClass"):
            return f"{kind}/{self.meta.name}"
        return f"{kind}/{self.meta.namespace}/{self.meta.name}"


# The base of every kind, also those defined elsewhere (discovery.gateway_objects).
Base = _Base


@dataclass(frozen=True, slots=True)
class Node(_Base):
    kind = "Node"
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address)

    @property
    def internal_ip(self) -> str | None:
        for kind, addr in self.addresses:
            if kind == "InternalIP":
                return addr
        return None

    @property
    def internal_ips(self) -> tuple[str, ...]:
        """Every InternalIP (a dual-stack node has one per family), the first one first."""
        return tuple(addr for kind, addr in self.addresses if kind == "InternalIP")


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str | None
    container_port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Probe:
    """A readinessProbe: ``httpGet`` or ``tcpSocket`` with the API's defaults applied."""
    action: str                    # "http" or "tcp"
    port: int | str
    path: str = "/"
    host: str | None = None
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True)
class Pod(_Base):
    kind = "Pod"
    node_name: str | None = None
    ports: tuple[ContainerPort, ...] = ()
    readiness_probe: Probe | None = None
    pod_ip: str | None = None
    # status.podIPs: every address of the pod, podIP first (one per family on a dual-stack
    # cluster); empty when the manifest gives only podIP.
    pod_ips: tuple[str, ...] = ()
    # status.conditions[type=Ready]: True / False / None when absent
    ready_condition: bool | None = None
    phase: str = ""
    hostname: str | None = None
    subdomain: str | None = None
    service_account: str = "default"     # spec.serviceAccountName: the pod's mesh identity

    @property
    def terminating(self) -> bool:
        return self.meta.deletion_timestamp is not None

    def named_port(self, name: str, protocol: str = "TCP") -> int | None:
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.container_port
        return None

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of the pod, podIP first."""
        if not self.pod_ip:
            return ()
        return (self.pod_ip,) + tuple(ip for ip in self.pod_ips if ip != self.pod_ip)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str
    node_port: int | None = None
    protocol: str = "TCP"
    app_protocol: str | None = None      # spec.ports[].appProtocol (http, kubernetes.io/h2c, grpc, ...)


@dataclass(frozen=True, slots=True)
class Service(_Base):
    kind = "Service"
    type: str = "ClusterIP"
    cluster_ip: str | None = None        # None: to be allocated; "None": headless
    # Dual stack (docs/l4-kernel.md "IPv6 and dual stack"): spec.clusterIPs as given (the first
    # is cluster_ip), spec.ipFamilies as given, spec.ipFamilyPolicy (None: SingleStack).
    cluster_ips: tuple[str, ...] = ()
    ip_families: tuple[str, ...] = ()
    ip_family_policy: str | None = None
    selector: Mapping[str, str] | None = None
    ports: tuple[ServicePort, ...] = ()
    session_affinity: str = "None"
    affinity_timeout: int = 10800
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    publish_not_ready: bool = False
    external_ips: tuple[str, ...] = ()
    lb_ingress_ips: tuple[str, ...] = ()
    external_name: str | None = None

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    target: str | None = None            # targetRef name (the pod), for display


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class EndpointSlice(_Base):
    """An ``EndpointSlice``, or a v1 ``Endpoints`` object converted to the same shape.

    ``service`` is the owning Service's name: the ``kubernetes.io/service-name`` label of a
    slice, or the object's own name for an ``Endpoints``.
    """
    kind = "EndpointSlice"
    service: str = ""
    address_type: str = "IPv4"
    endpoints: tuple[SliceEndpoint, ...] = ()
    ports: tuple[SlicePort, ...] = ()
    legacy: bool = False                 # converted from v1 Endpoints

    @property
    def key(self) -> tuple[str, str, str]:
        # Endpoints and EndpointSlices live in different API collections and may share a name.
        return ("Endpoints" if self.legacy else "EndpointSlice", self.meta.namespace, self.meta.name)

    @property
    def ref(self) -> str:
        return f"{'Endpoints' if self.legacy else 'EndpointSlice'}/{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True, slots=True)
class IngressBackend:
    service: str | None = None
    port_number: int | None = None
    port_name: str | None = None
    resource: str | None = None          # spec'd but unsupported by meshproxy: reported

    def __str__(self) -> str:
        if self.service is None:
            return f"resource:{self.resource}"
        return f"{self.service}:{self.port_number if self.port_number is not None else self.port_name}"


@dataclass(frozen=True, slots=True)
class IngressPath:
    path: str
    path_type: str
    backend: IngressBackend


@dataclass(frozen=True, slots=True)
class IngressRule:
    host: str | None
    paths: tuple[IngressPath, ...] = ()


@dataclass(frozen=True, slots=True)
class IngressTLS:
    hosts: tuple[str, ...] = ()
    secret_name: str | None = None


@dataclass(frozen=True, slots=True)
class Ingress(_Base):
    kind = "Ingress"
    class_name: str | None = None        # spec.ingressClassName, else the legacy annotation
    default_backend: IngressBackend | None = None
    rules: tuple[IngressRule, ...] = ()
    tls: tuple[IngressTLS, ...] = ()


@dataclass(frozen=True, slots=True)
class IngressClass(_Base):
    kind = "IngressClass"
    controller: str = ""
    is_default: bool = False


@dataclass(frozen=True, slots=True)
class Secret(_Base):
    kind = "Secret"
    type: str = "Opaque"
    data: Mapping[str, bytes] = field(default_factory=lambda: EMPTY_MAP)


@dataclass(frozen=True, slots=True)
class PeerAuthentication(_Base):
    """``security.istio.io`` PeerAuthentication: the mTLS mode inbound traffic must use."""
    kind = "PeerAuthentication"
    selector: Mapping[str, str] | None = None      # matchLabels; None: the whole namespace
    mode: str = "UNSET"                            # UNSET / DISABLE / PERMISSIVE / STRICT
    port_modes: tuple[tuple[int, str], ...] = ()   # portLevelMtls (workload port -> mode), sorted


@dataclass(frozen=True, slots=True)
class PolicySource:
    """One ``rules[].from[].source``: its fields are ANDed, the values of a field ORed."""
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyOperation:
    """One ``rules[].to[].operation``."""
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyCondition:
    """One ``rules[].when[]`` entry."""
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyRule:
    sources: tuple[PolicySource, ...] = ()         # empty: any source
    operations: tuple[PolicyOperation, ...] = ()   # empty: any operation
    conditions: tuple[PolicyCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy(_Base):
    """``security.istio.io`` AuthorizationPolicy (semantics: meshproxy.core.policy)."""
    kind = "AuthorizationPolicy"
    selector: Mapping[str, str] | None = None      # matchLabels; None: every workload in scope
    action: str = "ALLOW"                          # ALLOW / DENY / AUDIT / CUSTOM
    rules: tuple[PolicyRule, ...] = ()             # empty: matches nothing
    provider: str | None = None                    # CUSTOM's extension provider
    target_refs: tuple[str, ...] = ()              # "Kind/name": for gateways / waypoints, not sidecars
    dry_run: bool = False                          # annotation istio.io/dry-run: "true"


KubeObject = (Node | Pod | Service | EndpointSlice | Ingress | IngressClass | Secret | PeerAuthentication
              | AuthorizationPolicy)
