"""Mesh policy for one workload: which mTLS mode its inbound ports demand (PeerAuthentication)
and who may call it how (AuthorizationPolicy), with Istio's meanings, compiled once and
evaluated per connection (TCP) or per request (HTTP).

``compile_workload_policy(objects, namespace, labels, root_namespace)`` picks the policies that
apply to the workload and turns them into an immutable ``WorkloadPolicy``; the data plane then
calls ``mtls_mode(port)`` at accept time and ``authorize(peer, port, request)`` per connection or
request. Nothing is mutated after compilation; a policy change compiles a new one (the
snapshot's job), so a decision never sees half an update.

PeerAuthentication (Istio's precedence: workload > namespace > mesh):
- a policy without selector in the root namespace is mesh-wide, one without selector elsewhere
  covers its namespace, one with a selector covers the matching workloads of its namespace;
  a root-namespace policy with a selector is ignored, as Istio ignores it;
- when several compete at one level the oldest wins (creationTimestamp, then name);
- ``UNSET`` inherits from the next level up; nothing at all means PERMISSIVE;
- ``portLevelMtls`` (workload policies only) overrides the mode for a workload port; UNSET
  there inherits the workload's mode.

AuthorizationPolicy (Istio's evaluation order):
1. a request matching a CUSTOM policy is denied — meshproxy has no external authorizer to ask,
   so it fails closed where Istio would have asked;
2. a request matching any DENY policy is denied;
3. with no ALLOW policy for the workload it is allowed;
4. a request matching any ALLOW policy is allowed;
5. anything else is denied.
AUDIT policies never change a decision and are ignored; policies annotated
``istio.io/dry-run: "true"`` and policies with ``targetRef(s)`` (gateways, waypoints) do not
apply to sidecars. A policy applies to a workload of its namespace when its selector matches
(no selector: all), and to workloads of every namespace when it sits in the root namespace.

A rule matches when one of its sources, one of its operations and all of its conditions match;
an absent list matches anything; a policy without rules matches nothing (so an ALLOW policy
with ``spec: {}`` denies everything, ``rules: [{}]`` allows everything). String values match
exactly, by prefix (``abc*``), suffix (``*abc``) or presence (``*``: any non-empty value).

What meshproxy does not evaluate — JWT fields (``requestPrincipals``, ``request.auth.*``),
``remoteIpBlocks`` / ``remote.ip``, ``connection.sni``, ``experimental.*`` conditions, path
templates (``{*}``, ``{**}``) — and the HTTP-only fields (hosts, methods, paths,
``request.headers``) on a TCP connection are treated the way Istio treats an attribute it cannot
read: an ALLOW rule that uses one never matches (it can only allow less), a DENY (or CUSTOM)
rule matches as if that field matched (it can only deny more). Never a hole, at worst a
stricter decision; docs/mesh.md lists it.

Paths are compared after Istio's default ("BASE") normalization: the query is dropped,
backslashes become '/', percent-encoded unreserved characters are decoded, and '.' / '..'
segments are resolved (RFC 3986 §5.2.4, §6.2.2).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from discovery import objects as o

from . import metrics

__all__ = [
    "DEFAULT_ROOT_NAMESPACE", "STRICT", "PERMISSIVE", "DISABLE", "Peer", "HttpRequest", "Decision",
    "WorkloadPolicy", "compile_workload_policy", "peer_authentication_mode", "normalize_path",
    "match_string", "record_decision",
]

DEFAULT_ROOT_NAMESPACE = "istio-system"
STRICT, PERMISSIVE, DISABLE, UNSET = "STRICT", "PERMISSIVE", "DISABLE", "UNSET"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


# --------------------------------------------------------------------------------------------
# Inputs of a decision


@dataclass(frozen=True, slots=True)
class Peer:
    """The caller, as known at accept time. ``principal`` / ``namespace`` come from its verified
    SPIFFE ID (``TRUST_DOMAIN/ns/NS/sa/SA`` and NS); both are "" for a plaintext caller."""
    ip: IPAddress
    principal: str = ""
    namespace: str = ""

    @classmethod
    def of(cls, ip: str, spiffe_id=None) -> Peer:
        """``spiffe_id``: a ``meshproxy.core.identity.SpiffeId`` or None (plaintext)."""
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if spiffe_id is None:
            return cls(addr)
        return cls(addr, spiffe_id.principal, spiffe_id.namespace or "")

    @property
    def client_id(self) -> str:
        """The metrics label: the caller's SPIFFE ID, "" when it has none."""
        return f"spiffe://{self.principal}" if self.principal else ""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What an HTTP request offers to policy. ``headers``: lowercase names; repeated headers
    joined with "," (as Istio merges them). ``path`` as received (normalized here)."""
    method: str
    path: str
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_HEADERS)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str            # no_policy / allow_policy / deny_policy / custom_unsupported / not_allowed
    policy: str = ""       # namespace/name of the deciding policy, "" for a default


ALLOW_NO_POLICY = Decision(True, "no_policy")
_REASONS = {"ALLOW": "allow_policy", "DENY": "deny_policy", "CUSTOM": "custom_unsupported"}
DENY_NOT_ALLOWED = Decision(False, "not_allowed")


# --------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True, slots=True)
class _Str:
    """One string pattern: exact, prefix (``abc*``), suffix (``*abc``), presence (``*``)."""
    kind: int              # 0 exact, 1 prefix, 2 suffix, 3 presence
    value: str

    @classmethod
    def of(cls, pattern: str, fold: bool = False) -> _Str:
        p = pattern.lower() if fold else pattern
        if p == "*":
            return cls(3, "")
        if p.endswith("*"):
            return cls(1, p[:-1])
        if p.startswith("*"):
            return cls(2, p[1:])
        return cls(0, p)

    def __call__(self, s: str) -> bool:
        k = self.kind
        if k == 0:
            return s == self.value
        if k == 1:
            return s.startswith(self.value)
        if k == 2:
            return s.endswith(self.value)
        return s != ""


def match_string(pattern: str, value: str) -> bool:
    """Istio's string match, for tables and tools."""
    return _Str.of(pattern)(value)


def _any(pats: tuple[_Str, ...], s: str) -> bool:
    for p in pats:
        if p(s):
            return True
    return False


_UNRESERVED_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(m: re.Match) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if (ch.isascii() and (ch.isalnum() or ch in "-._~")) else m.group(0).upper()


def normalize_path(path: str) -> str:
    """The path policy compares: query and fragment dropped, '\\' -> '/', percent-encoded
    unreserved characters decoded, dot segments resolved. '/' for an empty result."""
    for sep in ("?", "#"):
        i = path.find(sep)
        if i >= 0:
            path = path[:i]
    if "\\" in path:
        path = path.replace("\\", "/")
    if "%" in path:
        path = _UNRESERVED_PCT.sub(_decode_unreserved, path)
    if "/." not in path and not path.startswith("."):
        return path or "/"
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    result = "/".join(out)
    if not result.startswith("/"):
        result = "/" + result
    return result


# --------------------------------------------------------------------------------------------
# Compiled rules. A field is (pattern tuple, negated pattern tuple); None means "not set".

_HTTP_CONDITIONS = ("request.headers[", "request.auth.", "experimental.envoy.filters.")
_UNSUPPORTED_CONDITIONS = ("request.auth.", "remote.ip", "connection.sni", "experimental.envoy.filters.")


def _nets(values: Iterable[str]) -> tuple:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _in_nets(nets: tuple, ip: IPAddress) -> bool:
    for n in nets:
        if ip.version == n.version and ip in n:
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Source:
    principals: tuple[_Str, ...]
    not_principals: tuple[_Str, ...]
    namespaces: tuple[_Str, ...]
    not_namespaces: tuple[_Str, ...]
    ip_blocks: tuple
    not_ip_blocks: tuple
    unsupported: bool        # requestPrincipals / remoteIpBlocks (and their not-forms) are set

    def match(self, peer: Peer, deny: bool) -> bool:
        if self.unsupported and not deny:
            return False
        if self.principals and not _any(self.principals, peer.principal):
            return False
        if self.not_principals and _any(self.not_principals, peer.principal):
            return False
        if self.namespaces and not _any(self.namespaces, peer.namespace):
            return False
        if self.not_namespaces and _any(self.not_namespaces, peer.namespace):
            return False
        if self.ip_blocks and not _in_nets(self.ip_blocks, peer.ip):
            return False
        if self.not_ip_blocks and _in_nets(self.not_ip_blocks, peer.ip):
            return False
        return True


@dataclass(frozen=True, slots=True)
class _Operation:
    hosts: tuple[_Str, ...]
    not_hosts: tuple[_Str, ...]
    ports: frozenset[int]
    not_ports: frozenset[int]
    methods: tuple[_Str, ...]
    not_methods: tuple[_Str, ...]
    paths: tuple[_Str, ...]
    not_paths: tuple[_Str, ...]
    unsupported: bool        # a path template ({*}, {**})
    http_only: bool

    def match(self, port: int, req: HttpRequest | None, path: str, deny: bool) -> bool:
        if self.ports and port not in self.ports:
            return False
        if self.not_ports and port in self.not_ports:
            return False
        if req is None:
            # A TCP connection has no HTTP attributes: see the module docstring. (An ALLOW rule
            # with HTTP fields never gets here on TCP: _Rule.match drops it.)
            return deny or not self.http_only
        if self.methods and not _any(self.methods, req.method):
            return False
        if self.not_methods and _any(self.not_methods, req.method):
            return False
        if not self.unsupported:      # a path template: unreadable, so "matches" (DENY only)
            if self.paths and not _any(self.paths, path):
                return False
            if self.not_paths and _any(self.not_paths, path):
                return False
        host = req.host.lower()
        if self.hosts and not _any(self.hosts, host):
            return False
        if self.not_hosts and _any(self.not_hosts, host):
            return False
        return True


@dataclass(frozen=True, slots=True)
class _Condition:
    key: str
    header: str | None       # request.headers[NAME] -> lowercase NAME
    values: tuple
    not_values: tuple
    unsupported: bool
    http_only: bool

    def _value(self, peer: Peer, dest_ip: IPAddress | None, port: int, req: HttpRequest | None):
        k = self.key
        if k == "source.principal":
            return peer.principal
        if k == "source.namespace":
            return peer.namespace
        if k == "destination.port":
            return str(port)
        if self.header is not None:
            return req.headers.get(self.header, "") if req is not None else ""
        return None

    def match(self, peer: Peer, dest_ip: IPAddress | None, port: int, req: HttpRequest | None, deny: bool) -> bool:
        if self.unsupported or (self.http_only and req is None):
            return deny
        if self.key in ("source.ip", "destination.ip"):
            ip = peer.ip if self.key == "source.ip" else dest_ip
            if ip is None:
                return deny
            if self.values and not _in_nets(self.values, ip):
                return False
            return not (self.not_values and _in_nets(self.not_values, ip))
        v = self._value(peer, dest_ip, port, req)
        if self.values and not _any(self.values, v):
            return False
        return not (self.not_values and _any(self.not_values, v))


@dataclass(frozen=True, slots=True)
class _Rule:
    sources: tuple[_Source, ...]
    operations: tuple[_Operation, ...]
    conditions: tuple[_Condition, ...]
    unsupported: bool        # anything in it meshproxy cannot evaluate
    http_only: bool          # anything in it only an HTTP request has

    def match(self, peer: Peer, dest_ip: IPAddress | None, port: int, req: HttpRequest | None,
              path: str, deny: bool) -> bool:
        if not deny and (self.unsupported or (self.http_only and req is None)):
            # Istio drops an ALLOW rule it cannot fully evaluate: it can only allow less.
            return False
        if self.sources:
            for s in self.sources:
                if s.match(peer, deny):
                    break
            else:
                return False
        if self.operations:
            for op in self.operations:
                if op.match(port, req, path, deny):
                    break
            else:
                return False
        for c in self.conditions:
            if not c.match(peer, dest_ip, port, req, deny):
                return False
        return True


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str                # namespace/name
    action: str
    rules: tuple[_Rule, ...]
    decision: Decision       # what matching it decides

    def match(self, peer: Peer, dest_ip: IPAddress | None, port: int, req: HttpRequest | None, path: str) -> bool:
        deny = self.action != "ALLOW"
        for r in self.rules:
            if r.match(peer, dest_ip, port, req, path, deny):
                return True
        return False


def _strs(values: Iterable[str], fold: bool = False) -> tuple[_Str, ...]:
    return tuple(_Str.of(v, fold) for v in values)


def _compile_rule(rule: o.PolicyRule) -> _Rule:
    sources = tuple(_Source(_strs(s.principals), _strs(s.not_principals), _strs(s.namespaces),
                            _strs(s.not_namespaces), _nets(s.ip_blocks), _nets(s.not_ip_blocks),
                            bool(s.request_principals or s.not_request_principals or s.remote_ip_blocks
                                 or s.not_remote_ip_blocks))
                    for s in rule.sources)
    ops = []
    for op in rule.operations:
        template = any("{" in p for p in op.paths + op.not_paths)
        ops.append(_Operation(_strs(op.hosts, True), _strs(op.not_hosts, True), frozenset(op.ports),
                              frozenset(op.not_ports), _strs(op.methods), _strs(op.not_methods),
                              _strs(op.paths), _strs(op.not_paths), template,
                              bool(op.hosts or op.not_hosts or op.methods or op.not_methods or op.paths or op.not_paths)))
    conds = []
    for c in rule.conditions:
        header = None
        if c.key.startswith("request.headers["):
            header = c.key[len("request.headers["):].split("]", 1)[0].lower()
        ip_key = c.key in ("source.ip", "destination.ip")
        conds.append(_Condition(c.key, header,
                                _nets(c.values) if ip_key else _strs(c.values),
                                _nets(c.not_values) if ip_key else _strs(c.not_values),
                                c.key.startswith(_UNSUPPORTED_CONDITIONS),
                                c.key.startswith(_HTTP_CONDITIONS)))
    return _Rule(sources, tuple(ops), tuple(conds),
                 any(s.unsupported for s in sources) or any(op.unsupported for op in ops)
                 or any(c.unsupported for c in conds),
                 any(op.http_only for op in ops) or any(c.http_only for c in conds)
                 or any(bool(s.request_principals or s.not_request_principals) for s in rule.sources))


# --------------------------------------------------------------------------------------------
# The compiled policy of one workload


@dataclass(frozen=True, slots=True)
class WorkloadPolicy:
    mode: str                                  # the workload's mTLS mode (STRICT / PERMISSIVE / DISABLE)
    port_modes: Mapping[int, str]              # portLevelMtls overrides
    custom: tuple[_Policy, ...] = ()
    deny: tuple[_Policy, ...] = ()
    allow: tuple[_Policy, ...] = ()
    has_allow: bool = False                    # an ALLOW policy selects the workload (default deny)
    mode_from: str = ""                        # the PeerAuthentication deciding the mode, for display

    @property
    def allows_everything(self) -> bool:
        """No policy can deny: the data path may skip per-request evaluation."""
        return not (self.custom or self.deny or self.has_allow)

    @property
    def needs_request(self) -> bool:
        """Some rule reads HTTP attributes: evaluate per request, not once per connection."""
        return any(r.http_only for p in self.custom + self.deny + self.allow for r in p.rules)

    def mtls_mode(self, port: int) -> str:
        return self.port_modes.get(port, self.mode)

    def authorize(self, peer: Peer, port: int, request: HttpRequest | None = None,
                  dest_ip: IPAddress | None = None) -> Decision:
        """The decision for a TCP connection (``request`` None) or one HTTP request to the
        workload's ``port`` (the original destination port, i.e. the container port)."""
        if not (self.custom or self.deny or self.has_allow):
            return ALLOW_NO_POLICY
        path = normalize_path(request.path) if request is not None else ""
        for p in self.custom:
            if p.match(peer, dest_ip, port, request, path):
                return p.decision
        for p in self.deny:
            if p.match(peer, dest_ip, port, request, path):
                return p.decision
        if not self.has_allow:
            return ALLOW_NO_POLICY
        for p in self.allow:
            if p.match(peer, dest_ip, port, request, path):
                return p.decision
        return DENY_NOT_ALLOWED

    def to_json(self) -> dict:
        return {"mtls": {"mode": self.mode, "ports": {str(k): v for k, v in sorted(self.port_modes.items())},
                         "from": self.mode_from},
                "custom": [p.name for p in self.custom], "deny": [p.name for p in self.deny],
                "allow": [p.name for p in self.allow], "defaultDeny": self.has_allow}


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    for k, v in selector.items():
        if labels.get(k) != v:
            return False
    return True


def _age(obj) -> tuple[str, str, str]:
    # Oldest first; objects from files without a creationTimestamp sort before all others
    # and then by namespace/name, so the choice is stable.
    return (obj.meta.creation_timestamp or "", obj.namespace, obj.name)


def peer_authentication_mode(policies: Iterable[o.PeerAuthentication], namespace: str, labels: Mapping[str, str],
                             root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> tuple[str, dict[int, str], str]:
    """(mode, port modes, deciding policy) for a workload: Istio's composition (module docstring)."""
    mesh = ns_level = workload = None
    for pa in policies:
        if pa.selector is None:
            if pa.namespace == root_namespace:
                if mesh is None or _age(pa) < _age(mesh):
                    mesh = pa
            if pa.namespace == namespace and namespace != root_namespace:
                if ns_level is None or _age(pa) < _age(ns_level):
                    ns_level = pa
        elif pa.namespace == namespace and namespace != root_namespace and _selects(pa.selector, labels):
            if workload is None or _age(pa) < _age(workload):
                workload = pa
    mode, source = PERMISSIVE, ""
    for pa in (mesh, ns_level, workload):
        if pa is not None and pa.mode != UNSET:
            mode, source = pa.mode, f"{pa.namespace}/{pa.name}"
    ports: dict[int, str] = {}
    if workload is not None:
        for port, pmode in workload.port_modes:
            ports[port] = mode if pmode == UNSET else pmode
    return mode, ports, source


def compile_workload_policy(objects: Iterable[object], namespace: str, labels: Mapping[str, str],
                            root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> WorkloadPolicy:
    """The policy of the workload ``namespace`` / ``labels`` from every PeerAuthentication and
    AuthorizationPolicy in ``objects`` (others are ignored)."""
    pas, custom, deny, allow = [], [], [], []
    has_allow = False
    for obj in objects:
        if isinstance(obj, o.PeerAuthentication):
            pas.append(obj)
            continue
        if not isinstance(obj, o.AuthorizationPolicy):
            continue
        if obj.namespace not in (namespace, root_namespace) or obj.target_refs or obj.dry_run:
            continue
        if obj.action == "AUDIT" or not _selects(obj.selector, labels):
            continue
        name = f"{obj.namespace}/{obj.name}"
        decision = Decision(obj.action == "ALLOW", _REASONS[obj.action], name)
        compiled = _Policy(name, obj.action, tuple(_compile_rule(r) for r in obj.rules), decision)
        if obj.action == "ALLOW":
            has_allow = True
            allow.append(compiled)
        elif obj.action == "DENY":
            deny.append(compiled)
        else:
            custom.append(compiled)
    mode, ports, source = peer_authentication_mode(pas, namespace, labels, root_namespace)
    key = lambda p: p.name
    return WorkloadPolicy(mode, MappingProxyType(ports), tuple(sorted(custom, key=key)), tuple(sorted(deny, key=key)),
                          tuple(sorted(allow, key=key)), has_allow, source)


def record_decision(decision: Decision, protocol: str, peer: Peer) -> None:
    """Count a decision: ``meshproxy_mesh_authz_decisions_total``."""
    metrics.mesh_authz.labels(protocol, "allow" if decision.allowed else "deny", decision.reason,
                              decision.policy, peer.client_id).inc()
