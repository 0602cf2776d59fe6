"""What a sidecar (``meshproxy run --sidecar``) decides without I/O: where a captured
connection goes, whether its destination is meshed and with which identity, which of its own
ports speak HTTP, and its compiled policy. Built once per snapshot (``build_mesh_state``) and
read by the data path (``meshproxy.sidecar``) per connection and per request.

Invariants:
- a ``MeshState`` is immutable like the snapshot that carries it; the one mutable part is
  ``_modes``, a memo of destination mTLS modes that only ever adds entries computed from the
  state's own immutable inputs, so sharing it between readers is safe;
- a destination is *meshed* when its pod carries ``meshproxy.dev/inject: enabled``; its
  expected identity is the SPIFFE ID of that pod's namespace and ServiceAccount, nothing else;
- which protocol a connection carries is decided from configuration only (a Service port's
  ``appProtocol``, an HTTPRoute attached to it, the ALPN the peer sidecar negotiated), never by
  waiting for the client's first bytes: server-first protocols (the server speaks first) work
  on every port that is not declared HTTP.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from discovery import objects as o

from .gateway import H2_APP_PROTOCOLS, L7_APP_PROTOCOLS
from .identity import SpiffeId
from .policy import DISABLE, WorkloadPolicy, compile_workload_policy, peer_authentication_mode

__all__ = [
    "ALPN_HTTP", "ALPN_TCP", "MeshPod", "MeshState", "Destination", "build_mesh_state", "classify",
    "client_hello_alpn", "looks_like_http", "INCOMPLETE", "HTTP", "TCP", "POD", "PASSTHROUGH", "REJECT", "LOOP",
]

# ALPN between sidecars: what the client sidecar will send inside the mutual TLS connection.
# "http/1.1": HTTP requests (multiplexed over a pooled connection), the inbound sidecar parses
# them, authorizes each and sets x-forwarded-client-cert; ALPN_TCP: the application's bytes,
# opaque, authorized once per connection. A client that offers neither (a plain TLS client with
# an SVID) is served by the port's own appProtocol.
ALPN_HTTP = "http/1.1"
ALPN_TCP = "meshproxy.dev/tcp"

INJECT_ENABLED = "enabled"

# Destination kinds (``classify``).
HTTP, TCP, POD, PASSTHROUGH, REJECT, LOOP = "http", "tcp", "pod", "passthrough", "reject", "loop"


@dataclass(frozen=True, slots=True)
class MeshPod:
    namespace: str
    name: str
    ips: tuple[str, ...]
    labels: Mapping[str, str]
    service_account: str
    meshed: bool
    identity: SpiffeId | None        # expected SPIFFE ID (meshed pods only)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one captured outbound connection goes. ``kind``: HTTP (``listener``: the
    HTTPListener whose routes serve it), TCP (``backend_key``: balanced per connection), POD (a
    pod addressed directly: ``pod``, None for an address no pod has), PASSTHROUGH (to the
    original destination as it is), REJECT (an unused address of the service range), LOOP."""
    kind: str
    listener: Any = None
    backend_key: tuple[str, str, str] | None = None
    pod: MeshPod | None = None


_PASS = Destination(PASSTHROUGH)
_REJECT = Destination(REJECT)
_LOOP = Destination(LOOP)


@dataclass(frozen=True, slots=True)
class MeshState:
    trust_domain: str
    root_namespace: str
    pods_by_ip: Mapping[str, MeshPod]
    me: MeshPod                                # this sidecar's pod (from the store, or the downward API alone)
    policy: WorkloadPolicy                     # this pod's PeerAuthentication mode and AuthorizationPolicies
    http_ports: frozenset[int]                 # own container ports that Services declare HTTP
    service_ports: frozenset[int]              # own container ports any Service sends to
    peer_authentications: tuple[o.PeerAuthentication, ...]
    service_nets: tuple = ()                   # --service-cidr
    _modes: dict = field(default_factory=dict, compare=False, repr=False)

    def destination_mode(self, pod: MeshPod, port: int) -> str:
        """The mTLS mode the destination pod's sidecar enforces on ``port``: a client does not
        offer mTLS to a port whose server says DISABLE (Istio's auto mTLS does the same)."""
        key = (pod.namespace, pod.name, port)
        mode = self._modes.get(key)
        if mode is None:
            m, ports, _ = peer_authentication_mode(self.peer_authentications, pod.namespace, pod.labels,
                                                   self.root_namespace)
            mode = ports.get(port, m)
            if len(self._modes) > 65536:     # bounded by pods x ports in use
                self._modes.clear()
            self._modes[key] = mode
        return mode

    def mtls_to(self, pod: MeshPod | None, port: int) -> bool:
        """Does a connection to ``pod``:``port`` use mutual TLS?"""
        if pod is None or not pod.meshed:
            return False
        if pod.namespace == self.me.namespace and pod.name == self.me.name:
            # The pod itself (a Service it backs picked it): the connection never leaves the
            # pod and capture does not send it to our inbound port, so there is no peer
            # sidecar to speak TLS with.
            return False
        return self.destination_mode(pod, port) != DISABLE

    def in_service_range(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self.service_nets)

    def to_json(self) -> dict:
        return {"pod": f"{self.me.namespace}/{self.me.name}", "identity": str(self.me.identity or ""),
                "httpPorts": sorted(self.http_ports), "policy": self.policy.to_json(),
                "meshedPods": sorted({f"{p.namespace}/{p.name}" for p in self.pods_by_ip.values() if p.meshed})}


def _mesh_pod(pod: o.Pod, trust_domain: str) -> MeshPod:
    meshed = pod.meta.annotations.get(o.ANNOTATION_INJECT) == INJECT_ENABLED
    ident = None
    if meshed:
        try:
            ident = SpiffeId.for_service_account(trust_domain, pod.namespace, pod.service_account or "default")
        except ValueError:            # a name SPIFFE cannot carry: reached without mTLS, never trusted
            meshed = False
    return MeshPod(pod.namespace, pod.name, pod.addresses, pod.meta.labels, pod.service_account or "default",
                   meshed, ident)


def build_mesh_state(pods: Iterable[o.Pod], policies: Iterable[object], services: Mapping, backends: Mapping,
                     settings) -> MeshState:
    """The sidecar's view of one snapshot. ``pods``: every Pod of the store; ``policies``: its
    PeerAuthentications and AuthorizationPolicies; ``services`` / ``backends``: the snapshot's."""
    td = settings.trust_domain
    by_ip: dict[str, MeshPod] = {}
    me = None
    for pod in pods:
        if pod.phase in ("Succeeded", "Failed"):
            continue
        mp = _mesh_pod(pod, td)
        for ip in mp.ips:
            by_ip[ip] = mp
        if pod.name == settings.pod_name and pod.namespace == settings.pod_namespace:
            me = mp
    ns = settings.pod_namespace or "default"
    if me is None:
        # Not in the configuration (yet): what the downward API says, without labels.
        ips = (settings.pod_ip,) if settings.pod_ip else ()
        sa = settings.service_account or "default"
        try:
            ident = SpiffeId.for_service_account(td, ns, sa)
        except ValueError:
            ident = None
        me = MeshPod(ns, settings.pod_name or "", ips, MappingProxyType({}), sa, True, ident)
    policies = tuple(p for p in policies if isinstance(p, (o.PeerAuthentication, o.AuthorizationPolicy)))
    wp = compile_workload_policy(policies, me.namespace, me.labels, settings.mesh_root_namespace)
    own_ips = set(me.ips)
    if settings.pod_ip:
        own_ips.add(settings.pod_ip)
    http_ports = set()
    service_ports = set()
    # HTTP/2 ports only once the L7 server speaks it (as for the Service ports it serves).
    l7_protocols = L7_APP_PROTOCOLS if getattr(settings, "http2", False) else L7_APP_PROTOCOLS - H2_APP_PROTOCOLS
    for backend in backends.values():
        svc = services.get((backend.namespace, backend.service))
        if svc is None:
            continue
        sp = next((p for p in svc.ports if (p.name or str(p.port)) == backend.key[2]), None)
        if sp is None:
            continue
        for ep in backend.endpoints:
            if ep.ip in own_ips:
                service_ports.add(ep.port)
                if sp.app_protocol in l7_protocols:
                    http_ports.add(ep.port)
    nets = []
    for cidr in (settings.service_cidr or "").split(","):
        try:
            nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            pass
    return MeshState(td, settings.mesh_root_namespace, MappingProxyType(by_ip), me, wp, frozenset(http_ports),
                     frozenset(service_ports), tuple(p for p in policies if isinstance(p, o.PeerAuthentication)),
                     tuple(nets))


def classify(snap, ip: str, port: int, own: Iterable[tuple[str, int]] = ()) -> Destination:
    """Where a captured outbound connection to ``ip``:``port`` goes (see ``Destination``)."""
    if (ip, port) in own:
        return _LOOP
    lst = snap.http_listeners.get((ip, port))
    if lst is not None and lst.name.startswith("Service "):
        return Destination(HTTP, listener=lst)
    l4 = snap.l4.get((ip, port))
    if l4 is not None and l4.scope == "cluster" and l4.routes is None:
        return Destination(TCP, backend_key=l4.backend)
    mesh = snap.mesh
    if mesh is None:
        return _PASS
    pod = mesh.pods_by_ip.get(ip)
    if pod is not None:
        return Destination(POD, pod=pod)
    if mesh.in_service_range(ip):
        return _REJECT
    return _PASS


_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT ")


def looks_like_http(first: bytes) -> bool:
    """Whether a connection's first bytes start an HTTP/1 request line. Used only for a port
    no Service describes (its protocol is unknown) and only on bytes the client already sent:
    nothing waits for it."""
    return first.startswith(_HTTP_METHODS)


# --------------------------------------------------------------------------------------------
# ALPN offered in a ClientHello (RFC 8446 §4.1.2, RFC 7301 §3.1), read from peeked bytes

INCOMPLETE = None
_MAX_HELLO = 2 * (16384 + 5)


def client_hello_alpn(data: bytes) -> tuple[str, ...] | None:
    """The ALPN protocol names a ClientHello offers (``()`` for none, or for bytes that are not
    a well-formed ClientHello: the handshake then decides), or ``INCOMPLETE`` (None) while
    more bytes are needed."""
    msg = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return INCOMPLETE if len(data) < _MAX_HELLO else ()
        if data[pos] != 0x16:
            return ()
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        msg += data[pos + 5:pos + 5 + length]
        if len(data) < pos + 5 + length:
            return INCOMPLETE if len(data) < _MAX_HELLO else ()
        pos += 5 + length
        if len(msg) >= 4:
            if msg[0] != 0x01:
                return ()
            need = 4 + int.from_bytes(msg[1:4], "big")
            if len(msg) >= need:
                return _alpn_of(bytes(msg[4:need]))


def _alpn_of(body: bytes) -> tuple[str, ...]:
    try:
        p = 2 + 32                                           # legacy_version, random
        p += 1 + body[p]                                     # session id
        p += 2 + int.from_bytes(body[p:p + 2], "big")        # cipher suites
        p += 1 + body[p]                                     # compression methods
        end = p + 2 + int.from_bytes(body[p:p + 2], "big")
        p += 2
        while p + 4 <= end:
            etype = int.from_bytes(body[p:p + 2], "big")
            elen = int.from_bytes(body[p + 2:p + 4], "big")
            ext = body[p + 4:p + 4 + elen]
            p += 4 + elen
            if etype == 16:                                  # application_layer_protocol_negotiation
                names = []
                q = 2
                while q < len(ext):
                    n = ext[q]
                    names.append(ext[q + 1:q + 1 + n].decode("ascii", "replace"))
                    q += 1 + n
                return tuple(names)
    except IndexError:
        pass
    return ()
