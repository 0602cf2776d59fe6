"""Endpoint computation: which pod addresses serve each service port.

Rules (docs/semantics.md, "Endpoints"; mirroring the EndpointSlice controller and kube-proxy):
- a Service with a selector takes the pods of its own namespace whose labels match it; a
  Service without one takes its EndpointSlices (or, when it has none, its v1 Endpoints);
- the port is the service port's ``targetPort``: a number as is, a name looked up per pod in
  that pod's container ports (a pod without that name is left out for that port);
- per endpoint: ``ready`` (may get traffic), ``serving`` (passes readiness, even while
  terminating) and ``terminating`` (deletionTimestamp set). A terminating pod is never
  ``ready``. ``publishNotReadyAddresses`` marks every pod with an IP ready;
- the endpoints that get *new* traffic are the ready ones; when none is ready, the serving
  terminating ones (KEP-1669, ProxyTerminatingEndpoints); else none;
- per endpoint also a balancing ``weight`` (default 1): SRV weights from the DNS source
  (slices annotated ``meshproxy.dev/made-by: dns`` carry ``srv-weight=<w>`` as the endpoint's
  target); every other endpoint has weight 1;
- a pod's readiness is its readinessProbe result when it has a probe and probing is on
  (``probe_results``) and a result exists yet, else its Ready condition. Pods in phase Succeeded/Failed or without
  an IP never appear.

Everything here is a pure function of its arguments; callers cache by service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from .objects import EndpointSlice, Pod, Service, ServicePort

__all__ = ["Endpoint", "EndpointSet", "pod_ready", "compute_endpoint_sets", "port_key", "srv_weight",
           "WEIGHT_PREFIX"]

# How the DNS source (discovery/sources/dns.py) stores an SRV weight in ``SliceEndpoint.target``
# of the slices it annotates ``meshproxy.dev/made-by: dns``. Kept here, not there, so that this
# module does not need dnspython.
WEIGHT_PREFIX = "srv-weight="
_ANN_MADE_BY = "meshproxy.dev/made-by"


def srv_weight(target: str | None) -> int | None:
    """The SRV weight stored in ``target`` (``SliceEndpoint.target``, and so ``Endpoint.pod``)."""
    if target and target.startswith(WEIGHT_PREFIX):
        try:
            w = int(target[len(WEIGHT_PREFIX):])
        except ValueError:
            return None
        return w if w >= 0 else None
    return None


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int
    pod: str | None = None       # pod name (same namespace as the service), for display
    node: str | None = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    # Relative share of new traffic (SRV weight; 1 for everything else). Balancers honour it
    # only when the weights of a backend's endpoints differ; 0 means "very rarely" (RFC 2782).
    weight: int = 1
    # The pod's addresses of its other family (status.podIPs on a dual-stack cluster): what a
    # ClusterIP of that family is translated to in the kernel (l4/nftables.py).
    alt: tuple[str, ...] = ()
    # (ip, port): the key of all live per-endpoint state, looked up per pick and per snapshot
    # swap (45,000 endpoints: one tuple each, made once here instead of on every access).
    addr: tuple[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addr", (self.ip, self.port))

    def ip_of(self, version: int) -> str | None:
        """This endpoint's address of IP ``version`` (4 or 6), None when it has none."""
        if (":" in self.ip) == (version == 6):
            return self.ip
        for a in self.alt:
            if (":" in a) == (version == 6):
                return a
        return None

    def to_json(self) -> dict:
        d = {"ip": self.ip, "port": self.port, "pod": self.pod, "node": self.node,
             "ready": self.ready, "serving": self.serving, "terminating": self.terminating}
        if self.weight != 1:
            d["weight"] = self.weight
        if self.alt:
            d["alt"] = list(self.alt)
        return d


def port_key(sp: ServicePort) -> str:
    """How a service port is named in keys and metrics: its name, or its number when unnamed."""
    return sp.name or str(sp.port)


@dataclass(frozen=True, slots=True)
class EndpointSet:
    namespace: str
    service: str
    port_name: str               # service port name ("" when unnamed)
    port: int                    # service port number
    endpoints: tuple[Endpoint, ...]   # every known endpoint, sorted by (ip, port)
    protocol: str = "TCP"        # TCP or UDP (SCTP ports get no set)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.service, self.port_name or str(self.port))

    @property
    def usable(self) -> tuple[Endpoint, ...]:
        """Endpoints for new traffic: ready ones, else serving+terminating ones (KEP-1669)."""
        ready = tuple(e for e in self.endpoints if e.ready)
        if ready:
            return ready
        return tuple(e for e in self.endpoints if e.serving and e.terminating)

    def counts(self) -> dict[str, int]:
        c = {"ready": 0, "serving": 0, "terminating": 0, "not_ready": 0}
        for e in self.endpoints:
            if e.ready:
                c["ready"] += 1
            elif e.terminating:
                c["terminating"] += 1
            else:
                c["not_ready"] += 1
            if e.serving:
                c["serving"] += 1
        return c


def pod_ready(pod: Pod, probe_results: Mapping[tuple[str, str], bool] | None) -> bool:
    """Readiness of one pod, before terminating/publishNotReady are considered.

    With a probe, meshproxy's own result decides once it has one. Until the first result the
    pod's Ready condition stands in (the kubelet's verdict): otherwise a restart or a
    ``--takeover`` upgrade would take every probed pod out of service for up to one probe
    period, which is exactly the kind of gap meshproxy must not create."""
    if pod.readiness_probe is not None and probe_results is not None:
        result = probe_results.get((pod.namespace, pod.name))
        if result is not None:
            return result
    return pod.ready_condition is True


def _resolve_target(sp: ServicePort, pod: Pod) -> int | None:
    t = sp.target_port
    if isinstance(t, int):
        return t
    return pod.named_port(t, sp.protocol)


def _pod_endpoints(svc: Service, sp: ServicePort, pods: Iterable[Pod],
                   probe_results: Mapping[tuple[str, str], bool] | None) -> list[Endpoint]:
    out = []
    for pod in pods:
        if not pod.pod_ip or pod.phase in ("Succeeded", "Failed"):
            continue
        port = _resolve_target(sp, pod)
        if port is None:
            continue
        # The EndpointSlice controller's rules: serving is the pod's readiness whatever the
        # Service says; publishNotReadyAddresses forces only "ready" (so the pod is used), and
        # a terminating pod is never "ready" unless that flag is set.
        serving = pod_ready(pod, probe_results)
        terminating = pod.terminating
        ready = svc.publish_not_ready or (serving and not terminating)
        alt = tuple(a for a in pod.pod_ips if a != pod.pod_ip)
        out.append(Endpoint(pod.pod_ip, port, pod.name, pod.node_name, ready, serving, terminating, 1, alt))
    return out


def _slice_endpoints(sp: ServicePort, slices: Iterable[EndpointSlice], publish_not_ready: bool) -> list[Endpoint]:
    out = []
    for sl in slices:
        if sl.address_type == "FQDN":
            continue   # FQDN slices are not routable by address; kube-proxy ignores them too
        weighted = sl.meta.annotations.get(_ANN_MADE_BY) == "dns"
        port = None
        for p in sl.ports:
            # An unnamed service port matches an unnamed slice port.
            if p.name == sp.name and p.protocol == sp.protocol:
                port = p.port
                break
        if port is None:
            continue
        for e in sl.endpoints:
            # Conditions are taken as the slice states them (nil rules applied at parse time).
            w = srv_weight(e.target) if weighted else None
            for addr in e.addresses[:1]:   # the API says consumers use the first address
                out.append(Endpoint(addr, port, e.target, e.node_name, e.ready or publish_not_ready,
                                    e.serving or publish_not_ready, e.terminating, 1 if w is None else w))
    return out


def compute_endpoint_sets(svc: Service, pods: Iterable[Pod] | Callable[[], Iterable[Pod]],
                          slices: Iterable[EndpointSlice] = (),
                          probe_results: Mapping[tuple[str, str], bool] | None = None) -> tuple[EndpointSet, ...]:
    """Endpoint sets of every TCP and UDP port of ``svc`` (SCTP is not served: the snapshot
    reports it).

    ``pods`` are the pods that match the service's selector (same namespace) — the caller
    selects them, because it keeps the index that makes that cheap; ``slices`` are the
    EndpointSlices and converted Endpoints of the service, used when it has no selector.
    """
    # An ExternalName service never selects pods; its endpoints, if any, are the slices the
    # DNS source made from spec.externalName (discovery/sources/dns.py).
    use_pods = svc.selector is not None and svc.type != "ExternalName"
    pod_list = list(pods() if callable(pods) else pods) if use_pods else []
    slice_list = list(slices)
    if svc.type == "ExternalName" and not slice_list:
        return ()
    if not use_pods:
        # EndpointSlices are authoritative when present; v1 Endpoints otherwise.
        modern = [s for s in slice_list if not s.legacy]
        slice_list = modern or [s for s in slice_list if s.legacy]
    out = []
    for sp in svc.ports:
        if sp.protocol not in ("TCP", "UDP"):
            continue
        if use_pods:
            eps = _pod_endpoints(svc, sp, pod_list, probe_results)
        else:
            eps = _slice_endpoints(sp, slice_list, svc.publish_not_ready)
        # One entry per address: two pods cannot share an IP, but slices may repeat one.
        uniq = {}
        for e in eps:
            uniq.setdefault((e.ip, e.port), e)
        out.append(EndpointSet(svc.namespace, svc.name, sp.name, sp.port,
                               tuple(sorted(uniq.values(), key=_sort_key)), sp.protocol))
    return tuple(out)


def _sort_key(e: Endpoint):
    return (e.ip, e.port)
