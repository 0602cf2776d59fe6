"""Typed, frozen views of the Gateway API kinds (gateway.networking.k8s.io) and of the two
other kinds their semantics need: ``Namespace`` (``allowedRoutes.namespaces.from: Selector``
selects namespaces by label) and meshproxy's own ``FaultInjection`` (group ``meshproxy.dev``,
the target of an ``ExtensionRef`` filter).

The same invariants as ``discovery.objects``: immutable, defaults applied as the API server
applies them (the CRDs' ``default`` markers: parentRef group/kind, backendRef kind Service,
weight 1, path match ``PathPrefix /``, redirect status 302, listener TLS mode Terminate,
allowedRoutes ``from: Same``), tuples instead of lists. Every object keeps the
``metadata.generation`` it was read at, which status conditions report as
``observedGeneration``. Everything here is what the user wrote; what it means (attachment,
status, routing) is computed in ``meshproxy.core.gateway``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .objects import Base
from .selectors import Selector

__all__ = [
    "GROUP", "CONTROLLER", "FAULT_GROUP", "ROUTE_KINDS",
    "Namespace", "GatewayClass", "GatewayAddress", "RouteGroupKind", "ObjectRef", "ListenerTLS",
    "AllowedRoutes", "Listener", "Gateway", "ParentRef", "HeaderModifier", "PathModifier",
    "RedirectFilter", "RewriteFilter", "MirrorFilter", "Filter", "BackendRef", "PathMatch",
    "ValueMatch", "HTTPMatch", "Timeouts", "Retry", "HTTPRule", "HTTPRoute", "GRPCMethodMatch",
    "GRPCMatch", "GRPCRule", "GRPCRoute", "L4Rule", "TLSRoute", "TCPRoute", "GrantFrom",
    "GrantTo", "ReferenceGrant", "FaultInjection", "IngressNginxFilter",
]

GROUP = "gateway.networking.k8s.io"
# A GatewayClass whose spec.controllerName is this is served by meshproxy.
CONTROLLER = "meshproxy.dev/gateway-controller"
FAULT_GROUP = "meshproxy.dev"
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute")


@dataclass(frozen=True, slots=True)
class Namespace(Base):
    kind = "Namespace"

    @property
    def ref(self) -> str:
        return f"Namespace/{self.meta.name}"


@dataclass(frozen=True, slots=True)
class GatewayClass(Base):
    kind = "GatewayClass"
    controller: str = ""
    parameters_ref: tuple[str, str, str, str | None] | None = None   # group, kind, name, namespace
    generation: int = 0

    @property
    def ref(self) -> str:
        return f"GatewayClass/{self.meta.name}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    type: str          # "IPAddress" when the user left it out
    value: str         # "" asks the implementation to assign one


@dataclass(frozen=True, slots=True)
class RouteGroupKind:
    group: str
    kind: str


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A reference with group and kind already defaulted (certificateRef: "" / Secret,
    backendRef: "" / Service); ``namespace`` None is the referrer's own."""
    group: str
    kind: str
    name: str
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    mode: str = "Terminate"
    certificate_refs: tuple[ObjectRef, ...] = ()
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AllowedRoutes:
    namespaces_from: str = "Same"
    selector: Selector | None = None          # for "Selector"
    kinds: tuple[RouteGroupKind, ...] = ()    # empty: the protocol's default kinds


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str
    hostname: str | None = None
    tls: ListenerTLS | None = None
    allowed: AllowedRoutes = AllowedRoutes()


@dataclass(frozen=True, slots=True)
class Gateway(Base):
    kind = "Gateway"
    class_name: str = ""
    listeners: tuple[Listener, ...] = ()
    addresses: tuple[GatewayAddress, ...] = ()
    generation: int = 0
    client_validation: bool = False          # spec.tls.frontend: not supported, reported


@dataclass(frozen=True, slots=True)
class ParentRef:
    group: str = GROUP
    kind: str = "Gateway"
    name: str = ""
    namespace: str | None = None
    section_name: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathModifier:
    type: str           # ReplaceFullPath | ReplacePrefixMatch
    value: str


@dataclass(frozen=True, slots=True)
class RedirectFilter:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True)
class RewriteFilter:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class MirrorFilter:
    backend: ObjectRef
    port: int | None
    percent: float = 100.0      # percent or fraction, as a percentage


@dataclass(frozen=True, slots=True)
class Filter:
    """One filter as written; exactly the field its ``type`` names is set (the CRD's rules)."""
    type: str
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: RedirectFilter | None = None
    rewrite: RewriteFilter | None = None
    mirror: MirrorFilter | None = None
    extension: ObjectRef | None = None       # ExtensionRef: group, kind, name (local namespace)


@dataclass(frozen=True, slots=True)
class BackendRef:
    ref: ObjectRef
    port: int | None = None
    weight: int = 1
    filters: tuple[Filter, ...] = ()


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: str = "PathPrefix"
    value: str = "/"


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match."""
    type: str
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    path: PathMatch = PathMatch()
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; None = not set, 0.0 = the user disabled it ("0s")."""
    request: float | None = None
    backend_request: float | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    codes: tuple[int, ...] = ()
    attempts: int | None = None
    backoff: float | None = None


@dataclass(frozen=True, slots=True)
class HTTPRule:
    name: str | None = None
    matches: tuple[HTTPMatch, ...] = (HTTPMatch(),)
    filters: tuple[Filter, ...] = ()
    backends: tuple[BackendRef, ...] = ()
    timeouts: Timeouts | None = None
    retry: Retry | None = None
    session_persistence: bool = False        # set: not supported, reported


@dataclass(frozen=True, slots=True)
class _RouteBase(Base):
    parents: tuple[ParentRef, ...] = ()
    generation: int = 0


@dataclass(frozen=True, slots=True)
class HTTPRoute(_RouteBase):
    kind = "HTTPRoute"
    hostnames: tuple[str, ...] = ()
    rules: tuple[HTTPRule, ...] = (HTTPRule(),)


@dataclass(frozen=True, slots=True)
class GRPCMethodMatch:
    type: str = "Exact"
    service: str | None = None
    method: str | None = None


@dataclass(frozen=True, slots=True)
class GRPCMatch:
    method: GRPCMethodMatch | None = None
    headers: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class GRPCRule:
    name: str | None = None
    matches: tuple[GRPCMatch, ...] = ()
    filters: tuple[Filter, ...] = ()
    backends: tuple[BackendRef, ...] = ()
    session_persistence: bool = False


@dataclass(frozen=True, slots=True)
class GRPCRoute(_RouteBase):
    kind = "GRPCRoute"
    hostnames: tuple[str, ...] = ()
    rules: tuple[GRPCRule, ...] = ()


@dataclass(frozen=True, slots=True)
class L4Rule:
    name: str | None = None
    backends: tuple[BackendRef, ...] = ()


@dataclass(frozen=True, slots=True)
class TLSRoute(_RouteBase):
    kind = "TLSRoute"
    hostnames: tuple[str, ...] = ()
    rules: tuple[L4Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class TCPRoute(_RouteBase):
    kind = "TCPRoute"
    rules: tuple[L4Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class GrantFrom:
    group: str
    kind: str
    namespace: str


@dataclass(frozen=True, slots=True)
class GrantTo:
    group: str
    kind: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceGrant(Base):
    kind = "ReferenceGrant"
    grants_from: tuple[GrantFrom, ...] = ()
    grants_to: tuple[GrantTo, ...] = ()


@dataclass(frozen=True, slots=True)
class FaultInjection(Base):
    """meshproxy.dev FaultInjection: for ``delay_percent`` of requests wait ``delay`` seconds
    before forwarding; for ``abort_percent`` answer ``abort_status`` without forwarding."""
    kind = "FaultInjection"
    delay: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class IngressNginxFilter(Base):
    """meshproxy.dev IngressNginxFilter: ingress-nginx annotations (``annotations``, keys with
    their nginx.ingress.kubernetes.io/ prefix) applied to the Gateway API rule whose
    ExtensionRef names it - what ``meshproxy convert`` writes where Gateway API has no
    equivalent (CORS, authentication, rate limits, allow / deny lists, body size, cookie
    affinity, a rewrite with capture groups, custom error pages)."""
    kind = "IngressNginxFilter"
    annotations: Mapping[str, str] = field(default_factory=dict)
