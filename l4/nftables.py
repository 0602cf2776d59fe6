"""``--proxy-mode nftables``: the desired kernel ruleset as data, and the diff that gets there.

Pure functions over the snapshot; nothing here touches the kernel (``l4.nft_kernel`` applies
what this module computes). The layout is kube-proxy's nftables mode
(``pkg/proxy/nftables/proxier.go``), in one ``inet`` table so that IPv4 and IPv6 live side by
side (kube-proxy uses one ``ip`` and one ``ip6`` table; the maps and sets that hold addresses
exist once per family here, the IPv6 ones named with a ``-v6`` suffix):

- base chains ``filter-{input,forward,output}`` (priority dstnat-10, ``ct state new jump
  endpoints-check``), ``nat-{prerouting,output}`` (dstnat, ``jump services``) and
  ``nat-postrouting`` (srcnat, ``jump masquerading``);
- ``services``: ``ip daddr . meta l4proto . th dport vmap @service-ips`` (ClusterIPs,
  externalIPs, LoadBalancer IPs) and ``ip daddr @nodeport-ips meta l4proto . th dport vmap
  @service-nodeports`` (NodePorts on this node's addresses);
- per service port and family (names ``<prefix>-<HASH>-<ns>/<svc>/<proto>[6]/<port>``, the
  hash of that identity first, so a change rewrites only that service's chains):
  ``service-`` (Cluster policy endpoints), ``local-`` (this node's endpoints, for a Local
  policy), ``external-`` (NodePort / external traffic: masquerade, or keep the client address
  for ``externalTrafficPolicy: Local``), each choosing at random with ``numgen random mod N
  vmap``, after the ClientIP-affinity lookups;
- per endpoint ``endpoint-<HASH>-…__<ip>/<port>``: hairpin masquerade, the affinity set update,
  ``dnat``; and ``affinity-…`` sets (timeout = sessionAffinity timeout);
- no endpoints: ``no-endpoint-services`` / ``no-endpoint-nodeports`` maps, looked up in the
  filter hooks, ``goto reject-chain`` (a TCP reset, ICMP port unreachable otherwise);
- ``mark-for-masquerade`` / ``masquerading``: mark 0x4000, masquerade in postrouting.

Where meshproxy differs from kube-proxy, on purpose: a Local traffic policy without a local
endpoint is rejected rather than dropped (the user-space mode's contract: refused at once, the
same in both modes); there is no cluster-CIDR detection, so ClusterIP traffic is never
masqueraded except hairpin (kube-proxy without ``--cluster-cidr`` does the same).

Invariants of the diff:

- ``Part`` is everything one Service contributes (chains, map elements, affinity sets); parts
  are rebuilt only for services whose inputs changed, and only differing chains / elements are
  written — a chain is rewritten (flush + rules) when its content digest differs;
- the content digest of a chain rides as the comment of its last rule, so the state read back
  from the kernel after a restart diffs like the state this process applied;
- in one transaction: sets and chains are created before anything refers to them, elements are
  deleted before they are added (a changed value is delete + add), chains no longer wanted are
  flushed at once and deleted in a later transaction (kube-proxy's caution: kernels before 6.2
  notice a dropped reference to a chain only a little later).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from discovery.endpoints import Endpoint
from meshproxy.core.snapshot import Backend, L4Listener, Snapshot

__all__ = [
    "FAMILY", "MASQ_MARK", "Part", "Ruleset", "Transaction", "SetSpec",
    "base_part", "service_part", "build_ruleset", "diff", "diff_chunks", "chain_digest", "listeners_by_service",
    "listeners_of",
    "RulesetBuilder", "DIGEST_PREFIX", "ruleset_from_listing", "setup_commands", "adopt", "LEFTOVER",
]

FAMILY = "inet"
MASQ_MARK = 0x4000                        # kube-proxy's default --masquerade-bit 14
DIGEST_PREFIX = "meshproxy:"
NAME_MAX = 256                            # NFT_CHAIN_MAXNAMELEN

# What a map element key and value look like: keys are tuples of address (canonical text),
# protocol name and port; values are ("goto", chain) or ("drop",).
Key = tuple
Value = tuple
Rule = list                               # a list of nft JSON expressions


@dataclass(frozen=True, slots=True)
class SetSpec:
    """A named set. ``timeout`` > 0: a dynamic affinity set whose contents the kernel owns;
    otherwise a static set whose ``elements`` this module owns."""
    type: str                             # ipv4_addr / ipv6_addr
    timeout: int = 0
    elements: frozenset = frozenset()


@dataclass(slots=True)
class Part:
    """What one contributor (a Service, or the fixed skeleton) puts in the table."""
    chains: dict[str, tuple[str, list[Rule]]] = field(default_factory=dict)   # name -> (digest, rules)
    elements: dict[str, dict[Key, Value]] = field(default_factory=dict)       # map name -> key -> value
    sets: dict[str, SetSpec] = field(default_factory=dict)


@dataclass(slots=True)
class Ruleset:
    """The whole table: the skeleton plus one part per service key. ``prev`` / ``changed``:
    when a builder derived this ruleset from ``prev`` and only the parts of ``changed`` may
    differ, the diff against ``prev`` looks at those alone."""
    base: Part
    parts: dict[tuple[str, str], Part]
    prev: Ruleset | None = None
    changed: frozenset | None = None

    def chains(self) -> dict[str, str]:
        out = {n: d for n, (d, _) in self.base.chains.items()}
        for p in self.parts.values():
            out.update((n, d) for n, (d, _) in p.chains.items())
        return out


@dataclass(slots=True)
class Transaction:
    """nft JSON commands in the order they must run, and what they change."""
    commands: list[dict] = field(default_factory=list)
    stale_chains: list[str] = field(default_factory=list)   # flushed now, to delete later
    touched: set[tuple[str, str]] = field(default_factory=set)   # services with commands in it

    def __bool__(self) -> bool:
        return bool(self.commands)


# -- names ---------------------------------------------------------------------------------


def _hashed(prefix: str, ident: str) -> str:
    """kube-proxy's scheme: an 8-character base32 SHA-256 of the identity, then the identity,
    cut to the kernel's name limit (the hash keeps cut names unique)."""
    digest = base64.b32encode(hashlib.sha256(ident.encode()).digest()).decode()[:8]
    name = f"{prefix}{digest}-{ident}"
    if len(name) > NAME_MAX - 1:
        name = name[:NAME_MAX - 4] + "..."
    return name


def _ep_ident(base: str, ip: str, port: int) -> str:
    # Chain names may hold [A-Za-z0-9_./-]: IPv6 colons become dots, as in kube-proxy.
    return f"{base}__{ip.replace(':', '.')}/{port}"


def _v6(v: int) -> str:
    return "-v6" if v == 6 else ""


# -- expressions ---------------------------------------------------------------------------


def _payload(proto: str, fld: str) -> dict:
    return {"payload": {"protocol": proto, "field": fld}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _goto(chain: str) -> dict:
    return {"goto": {"target": chain}}


def _jump(chain: str) -> dict:
    return {"jump": {"target": chain}}


def _ipx(v: int) -> str:
    return "ip6" if v == 6 else "ip"


def _dispatch_key(v: int) -> dict:
    return {"concat": [_payload(_ipx(v), "daddr"), _meta("l4proto"), _payload("th", "dport")]}


def _port_key() -> dict:
    return {"concat": [_meta("l4proto"), _payload("th", "dport")]}


def _fib_local(which: str) -> dict:
    return _match({"fib": {"result": "type", "flags": [which]}}, "local")


def _value_json(value: Value) -> dict:
    if value[0] == "goto":
        return _goto(value[1])
    return {value[0]: None}


def _key_json(key: Key) -> Any:
    return {"concat": list(key)} if len(key) > 1 else key[0]


def chain_digest(rules: list[Rule]) -> str:
    return hashlib.sha256(json.dumps(rules, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _chain(part: Part, name: str, rules: list[Rule]) -> None:
    part.chains[name] = (chain_digest(rules), rules)


# -- the fixed skeleton --------------------------------------------------------------------

BASE_CHAINS = (
    # name, type, hook, priority: filter before DNAT (dstnat - 10), so rejects see the
    # service address; nat at dstnat / srcnat.
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
_BASE_NAMES = frozenset(c[0] for c in BASE_CHAINS)
# Maps per family: name (+ "-v6"), key types.
MAPS = (
    ("service-ips", ("addr", "inet_proto", "inet_service")),
    ("service-nodeports", ("inet_proto", "inet_service")),
    ("no-endpoint-services", ("addr", "inet_proto", "inet_service")),
    ("no-endpoint-nodeports", ("inet_proto", "inet_service")),
)


def _addr_type(v: int) -> str:
    return "ipv6_addr" if v == 6 else "ipv4_addr"


def map_types(v: int) -> dict[str, list[str]]:
    return {name + _v6(v): [_addr_type(v) if t == "addr" else t for t in types] for name, types in MAPS}


def base_part(node_addresses: Iterable[str]) -> Part:
    """Everything that does not depend on a Service: hooks, dispatch, reject, masquerade,
    and the addresses that accept NodePort traffic."""
    p = Part()
    new = _match({"ct": {"key": "state"}}, "new", "in")
    for name in ("filter-input", "filter-forward", "filter-output"):
        _chain(p, name, [[new, _jump("endpoints-check")]])
    for name in ("nat-prerouting", "nat-output"):
        _chain(p, name, [[_jump("services")]])
    _chain(p, "nat-postrouting", [[_jump("masquerading")]])
    mark = _meta("mark")
    _chain(p, "mark-for-masquerade", [[{"mangle": {"key": mark, "value": {"|": [mark, MASQ_MARK]}}}]])
    _chain(p, "masquerading", [
        [_match({"&": [mark, MASQ_MARK]}, 0), {"return": None}],
        [{"mangle": {"key": mark, "value": {"^": [mark, MASQ_MARK]}}}],
        [{"masquerade": {"flags": ["fully-random"]}}],
    ])
    _chain(p, "reject-chain", [
        [_match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}],
        [{"reject": {"type": "icmpx", "expr": "port-unreachable"}}],
    ])
    services: list[Rule] = []
    check: list[Rule] = []
    for v in (4, 6):
        sfx = _v6(v)
        services.append([{"vmap": {"key": _dispatch_key(v), "data": f"@service-ips{sfx}"}}])
        services.append([_match(_payload(_ipx(v), "daddr"), f"@nodeport-ips{sfx}"),
                         {"vmap": {"key": _port_key(), "data": f"@service-nodeports{sfx}"}}])
        check.append([{"vmap": {"key": _dispatch_key(v), "data": f"@no-endpoint-services{sfx}"}}])
        check.append([_match(_payload(_ipx(v), "daddr"), f"@nodeport-ips{sfx}"),
                      {"vmap": {"key": _port_key(), "data": f"@no-endpoint-nodeports{sfx}"}}])
    _chain(p, "services", services)
    _chain(p, "endpoints-check", check)
    addrs = [ipaddress.ip_address(a) for a in node_addresses]
    for v in (4, 6):
        # NodePorts on loopback addresses are not served in the kernel (kube-proxy refuses them
        # too: a DNATed packet from 127.0.0.1 would be a martian on the pod's side).
        ips = frozenset(str(a) for a in addrs if a.version == v and not a.is_loopback)
        p.sets[f"nodeport-ips{_v6(v)}"] = SetSpec(_addr_type(v), 0, ips)
    for v in (4, 6):
        for name in map_types(v):
            p.elements[name] = {}
    return p


# -- one service ---------------------------------------------------------------------------


def _version(ip: str) -> int:
    return 6 if ":" in ip else 4


def _proto(b: Backend) -> str:
    return b.protocol.lower()


def _eps(endpoints: tuple[Endpoint, ...], v: int) -> list[tuple[str, int]]:
    """(address of family v, port) per endpoint, in endpoint order, duplicates dropped."""
    out: dict[tuple[str, int], None] = {}
    for e in endpoints:
        ip = e.ip_of(v)
        if ip is not None:
            out[(str(ipaddress.ip_address(ip)), e.port)] = None
    return list(out)


def _choice_rules(v: int, chain_of: dict, aff_of: dict | None, eps: list[tuple[str, int]]) -> list[Rule]:
    rules: list[Rule] = []
    if aff_of is not None:
        # ClientIP affinity: a client seen recently (the set's timeout) goes where it went.
        for ep in eps:
            rules.append([_match(_payload(_ipx(v), "saddr"), "@" + aff_of[ep]), _goto(chain_of[ep])])
    vm = [[i, _goto(chain_of[ep])] for i, ep in enumerate(eps)]
    rules.append([{"vmap": {"key": {"numgen": {"mode": "random", "mod": len(eps), "offset": 0}},
                            "data": {"set": vm}}}])
    return rules


def service_part(backends: Iterable[tuple[Backend, list[L4Listener]]], internal_local: bool,
                 external_local: bool) -> Part:
    """The chains, map elements and sets of one Service: ``backends`` pairs each service port's
    ``Backend`` with the listeners (addresses) the snapshot gives it."""
    p = Part()
    for b, listeners in backends:
        proto = _proto(b)
        for v in (4, 6):
            mine = [lst for lst in listeners if _version(lst.host) == v]
            if not mine:
                continue
            _service_family(p, b, proto, v, mine, internal_local, external_local)
    return p


def _service_family(p: Part, b: Backend, proto: str, v: int, listeners: list[L4Listener],
                    internal_local: bool, external_local: bool) -> None:
    sfx = _v6(v)
    base = f"{b.namespace}/{b.service}/{proto}{'6' if v == 6 else ''}/{b.key[2]}"
    cluster_eps = _eps(b.usable, v)
    local_eps = _eps(b.local, v)
    externally = any(lst.scope != "cluster" for lst in listeners)
    has_eps = bool(cluster_eps)
    internal_ok = bool(local_eps) if internal_local else has_eps
    external_ok = bool(local_eps) if external_local else has_eps
    uses_cluster = has_eps and (not internal_local or externally)
    uses_local = bool(local_eps) and (internal_local or (externally and external_local))
    cluster_chain = _hashed("service-", base)
    local_chain = _hashed("local-", base)
    external_chain = _hashed("external-", base)
    reachable = dict.fromkeys((cluster_eps if uses_cluster else []) + (local_eps if uses_local else []))
    chain_of = {ep: _hashed("endpoint-", _ep_ident(base, *ep)) for ep in reachable}
    aff_of = None
    if b.affinity_timeout:
        aff_of = {ep: _hashed("affinity-", _ep_ident(base, *ep) + f"@{b.affinity_timeout}") for ep in reachable}
        for name in aff_of.values():
            p.sets[name] = SetSpec(_addr_type(v), b.affinity_timeout)
    ips = p.elements.setdefault("service-ips" + sfx, {})
    nodeports = p.elements.setdefault("service-nodeports" + sfx, {})
    no_ips = p.elements.setdefault("no-endpoint-services" + sfx, {})
    no_ports = p.elements.setdefault("no-endpoint-nodeports" + sfx, {})
    reject = ("goto", "reject-chain")
    for lst in listeners:
        addr = str(ipaddress.ip_address(lst.host))
        if lst.scope == "cluster":
            if internal_ok:
                ips[(addr, proto, lst.port)] = ("goto", local_chain if internal_local else cluster_chain)
            else:
                no_ips[(addr, proto, lst.port)] = reject
        elif lst.scope == "external":
            if has_eps:
                ips[(addr, proto, lst.port)] = ("goto", external_chain)
            if not external_ok:
                no_ips[(addr, proto, lst.port)] = reject
        else:                               # node: the nodeport maps, matched on nodeport-ips
            if has_eps:
                nodeports[(proto, lst.port)] = ("goto", external_chain)
            if not external_ok:
                no_ports[(proto, lst.port)] = reject
    if uses_cluster:
        _chain(p, cluster_chain, _choice_rules(v, chain_of, aff_of, cluster_eps))
    if uses_local:
        _chain(p, local_chain, _choice_rules(v, chain_of, aff_of, local_eps))
    if has_eps and externally:
        ext: list[Rule] = []
        if not external_local:
            # Cluster policy: the endpoint may be on another node, so the reply must come back
            # through this one.
            ext.append([_jump("mark-for-masquerade")])
            ext.append([_goto(cluster_chain)])
        else:
            # Local policy keeps the client's address; only traffic this host itself sends to
            # its own external address is masqueraded and may use any endpoint.
            ext.append([_fib_local("saddr"), _jump("mark-for-masquerade")])
            ext.append([_fib_local("saddr"), _goto(cluster_chain)])
            if local_eps:
                ext.append([_goto(local_chain)])
        _chain(p, external_chain, ext)
    family = "ip6" if v == 6 else "ip"
    for ep, name in chain_of.items():
        ip, port = ep
        rules: list[Rule] = [[_match(_payload(_ipx(v), "saddr"), ip), _jump("mark-for-masquerade")]]
        if aff_of is not None:
            rules.append([{"set": {"op": "update", "elem": _payload(_ipx(v), "saddr"), "set": "@" + aff_of[ep]}}])
        rules.append([_match(_meta("l4proto"), proto), {"dnat": {"family": family, "addr": ip, "port": port}}])
        _chain(p, name, rules)


# -- the whole table -----------------------------------------------------------------------


def listeners_by_service(snap: Snapshot) -> dict[tuple[str, str], dict[tuple[str, str, str], list[L4Listener]]]:
    """Listeners of the snapshot grouped by service, then by backend key. O(listeners).
    Gateway TCP / TLS listeners (``routes``: a route chosen per connection, by SNI) are not
    Services: the user-space L4 manager keeps serving them."""
    out: dict[tuple[str, str], dict[tuple[str, str, str], list[L4Listener]]] = {}
    for table in (snap.l4, snap.udp):
        for lst in table.values():
            if lst.routes is None:
                out.setdefault(lst.backend[:2], {}).setdefault(lst.backend, []).append(lst)
    return out


def _part_for(snap: Snapshot, key: tuple[str, str], listeners: Mapping[tuple[str, str, str], list[L4Listener]]) -> Part:
    svc = snap.services[key]
    pairs = []
    for bkey, lsts in sorted(listeners.items()):
        b = snap.backends.get(bkey)
        if b is not None:
            pairs.append((b, lsts))
    return service_part(pairs, svc.internal_traffic_policy == "Local", svc.external_traffic_policy == "Local")


def build_ruleset(snap: Snapshot) -> Ruleset:
    """The whole desired table for ``snap`` (the reference; ``RulesetBuilder`` gives the same
    result reusing the parts of services that did not change)."""
    grouped = listeners_by_service(snap)
    parts = {key: _part_for(snap, key, grouped[key]) for key in sorted(grouped) if key in snap.services}
    return Ruleset(base_part(snap.node.all_addresses), parts)


def listeners_of(snap: Snapshot, key: tuple[str, str]) -> dict[tuple[str, str, str], list[L4Listener]]:
    """The listeners the snapshot gives one service, by backend key, found from the service's
    own addresses (its ClusterIPs, this node's addresses with its nodePorts, its external
    and LoadBalancer IPs) rather than by a pass over every listener. O(its addresses)."""
    svc = snap.services.get(key)
    out: dict[tuple[str, str, str], list[L4Listener]] = {}
    if svc is None:
        return out
    ns, name = key
    hosts = list(snap.cluster_ips.get(key, ())) + list(svc.external_ips) + list(svc.lb_ingress_ips)
    for sp in svc.ports:
        table = snap.udp if sp.protocol == "UDP" else snap.l4
        pk = sp.name or str(sp.port)
        cands = [(h, sp.port) for h in hosts]
        np_ = sp.node_port or snap.allocated.get(f"{ns}/{name}:{pk}")
        if np_:
            cands += [(a, np_) for a in snap.node.all_addresses]
        for addr in dict.fromkeys(cands):
            lst = table.get(addr)
            if lst is not None and lst.routes is None and lst.backend == (ns, name, pk):
                out.setdefault(lst.backend, []).append(lst)
    return out


class RulesetBuilder:
    """``build_ruleset`` with memory: a service's part is rebuilt only when its inputs (its
    Service object, its backends, its listeners) are not the ones of the last build.

    ``build(snap, changed)``: when ``changed`` names every service that may differ since the
    last build (the snapshots' ``changed`` sets, accumulated), only those are looked at — the
    cost of an endpoint change does not grow with the cluster; ``changed`` None looks at
    every service (one pass over the listeners)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, str], tuple[tuple, Part]] = {}
        self._parts: dict[tuple[str, str], Part] = {}
        self._node: object = None
        self._base: tuple[tuple[str, ...], Part] | None = None
        self._last: Ruleset | None = None

    def build(self, snap: Snapshot, changed: Iterable[tuple[str, str]] | None = None) -> Ruleset:
        addrs = snap.node.all_addresses
        if self._base is None or self._base[0] != addrs:
            self._base = (addrs, base_part(addrs))
        if changed is None or snap.node != self._node:
            grouped = listeners_by_service(snap)
            memo: dict[tuple[str, str], tuple[tuple, Part]] = {}
            for key, lsts in grouped.items():
                self._part(snap, key, lsts, memo)
            self._memo = memo
            self._parts = {key: part for key, (_, part) in memo.items()}
            hint = None
        else:
            hint = frozenset(changed)
            for key in hint:
                lsts = listeners_of(snap, key)
                if lsts:
                    self._part(snap, key, lsts, self._memo)
                    self._parts[key] = self._memo[key][1]
                else:
                    self._memo.pop(key, None)
                    self._parts.pop(key, None)
        self._node = snap.node
        rs = Ruleset(self._base[1], dict(self._parts), self._last, hint)
        if self._last is not None:
            self._last.prev = None            # keep one step of history, not a chain of them
        self._last = rs
        return rs

    def _part(self, snap: Snapshot, key: tuple[str, str], lsts: Mapping[tuple[str, str, str], list[L4Listener]],
              memo: dict) -> None:
        svc = snap.services.get(key)
        if svc is None:
            memo.pop(key, None)
            return
        inputs = (svc,) + tuple((bk, snap.backends.get(bk), tuple(ls)) for bk, ls in sorted(lsts.items()))
        old = self._memo.get(key)
        memo[key] = (inputs, old[1] if old is not None and _same(old[0], inputs) else _part_for(snap, key, lsts))


def _same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b) or a[0] is not b[0]:
        return False
    for (k1, b1, l1), (k2, b2, l2) in zip(a[1:], b[1:]):
        if k1 != k2 or b1 is not b2 or l1 != l2:
            return False
    return True


# -- the diff ------------------------------------------------------------------------------


def _obj(kind: str, table: str, **kw: Any) -> dict:
    return {kind: {"family": FAMILY, "table": table, **kw}}


def setup_commands(table: str) -> list[dict]:
    """Idempotent: the table, its base chains, maps and sets (``add`` of what exists is a
    no-op). Sent with the first transaction, and again after a failed one."""
    cmds: list[dict] = [{"add": {"table": {"family": FAMILY, "name": table}}}]
    for name, ctype, hook, prio in BASE_CHAINS:
        cmds.append({"add": _obj("chain", table, name=name, type=ctype, hook=hook, prio=prio, policy="accept")})
    for v in (4, 6):
        for name, types in map_types(v).items():
            cmds.append({"add": _obj("map", table, name=name, type=types if len(types) > 1 else types[0], map="verdict")})
    return cmds


def _rule_cmds(table: str, chain: str, digest: str, rules: list[Rule]) -> list[dict]:
    out = []
    last = len(rules) - 1
    for i, expr in enumerate(rules):
        body: dict[str, Any] = {"chain": chain, "expr": expr}
        if i == last:
            body["comment"] = DIGEST_PREFIX + digest
        out.append({"add": _obj("rule", table, **body)})
    return out


def _set_cmd(table: str, name: str, spec: SetSpec) -> dict:
    if spec.timeout:
        return {"add": _obj("set", table, name=name, type=spec.type, flags=["timeout"], timeout=spec.timeout)}
    return {"add": _obj("set", table, name=name, type=spec.type)}


def _parts(rs: Ruleset | None) -> dict:
    if rs is None:
        return {}
    out: dict = {None: rs.base}
    out.update(rs.parts)
    return out


# Phases of a transaction: everything of one phase runs before anything of the next, whatever
# part it comes from (a ClusterIP taken over from a deleted service is deleted before it is
# added again; a chain exists before a rule or an element points at it).
_SETS, _CHAINS, _RULES, _DEL_ELEMS, _ADD_ELEMS, _STALE, _DEL_SETS = range(7)


def _part_diff(table: str, po: Part | None, pn: Part | None, pending: set[str],
               stale: list[str]) -> list[tuple[int, dict]]:
    out: list[tuple[int, dict]] = []
    old_chains = {n: d for n, (d, _) in po.chains.items()} if po is not None else {}
    new_chains = pn.chains if pn is not None else {}
    old_sets = po.sets if po is not None else {}
    new_sets = pn.sets if pn is not None else {}
    for name, spec in sorted(new_sets.items()):
        before = old_sets.get(name)
        if before is None or before.type != spec.type or before.timeout != spec.timeout:
            out.append((_SETS, _set_cmd(table, name, spec)))
        if not spec.timeout:
            had = before.elements if before is not None else frozenset()
            if had - spec.elements:
                out.append((_SETS, {"delete": _obj("element", table, name=name, elem=sorted(had - spec.elements))}))
            if spec.elements - had:
                out.append((_SETS, {"add": _obj("element", table, name=name, elem=sorted(spec.elements - had))}))
    for name, (digest, rules) in sorted(new_chains.items()):
        before = old_chains.get(name)
        if (before is None or name in pending) and name not in _BASE_NAMES:   # those come with setup_commands
            out.append((_CHAINS, {"add": _obj("chain", table, name=name)}))
        if before == digest and name not in pending:
            continue
        if before is not None or name in pending:
            out.append((_RULES, {"flush": _obj("chain", table, name=name)}))
        out.extend((_RULES, c) for c in _rule_cmds(table, name, digest, rules))
    old_elems = po.elements if po is not None else {}
    new_elems = pn.elements if pn is not None else {}
    for m in sorted(new_elems.keys() | old_elems.keys()):
        before, after = old_elems.get(m, {}), new_elems.get(m, {})
        dels = [k for k, v in before.items() if after.get(k) != v]
        news = [(k, v) for k, v in after.items() if before.get(k) != v]
        if dels:
            out.append((_DEL_ELEMS, {"delete": _obj("element", table, name=m,
                                                    elem=[_key_json(k) for k in sorted(dels, key=_sort)])}))
        if news:
            out.append((_ADD_ELEMS, {"add": _obj("element", table, name=m, elem=[
                [_key_json(k), _value_json(v)] for k, v in sorted(news, key=lambda kv: _sort(kv[0]))])}))
    for name in sorted(old_chains.keys() - new_chains.keys()):
        out.append((_STALE, {"flush": _obj("chain", table, name=name)}))
        stale.append(name)
    for name in sorted(old_sets.keys() - new_sets.keys()):
        out.append((_DEL_SETS, {"delete": _obj("set", table, name=name)}))
    return out


def _changed(old: Ruleset | None, new: Ruleset) -> tuple[dict, dict, list]:
    old_parts, new_parts = _parts(old), _parts(new)
    if old is not None and new.prev is old and new.changed is not None:
        cands: Iterable = (None, *new.changed)       # the builder says only these may differ
    else:
        cands = old_parts.keys() | new_parts.keys()
    keys = [k for k in cands if new_parts.get(k) is not old_parts.get(k)]
    # The skeleton first (everything refers to it), then removed services, then the others.
    keys.sort(key=lambda k: (k is not None, k in new_parts, k or ("", "")))
    return old_parts, new_parts, keys


def diff(table: str, old: Ruleset | None, new: Ruleset, pending_delete: Iterable[str] = ()) -> Transaction:
    """The commands, as one transaction, that turn the table ``old`` describes into ``new``.
    ``old`` None: nothing is known (an empty table). Chains in ``pending_delete`` exist,
    flushed, from an earlier transaction and may be taken back into use."""
    (tx,) = diff_chunks(table, old, new, pending_delete, limit=None)
    return tx


def diff_chunks(table: str, old: Ruleset | None, new: Ruleset, pending_delete: Iterable[str] = (),
                limit: int | None = 20000) -> list[Transaction]:
    """Like ``diff``, cut into transactions of about ``limit`` commands at service boundaries.
    The kernel's cost of one transaction grows faster than its length (anonymous sets are
    found by walking the transaction), so a first sync of a large cluster goes in pieces; each
    piece holds whole services, so every service is complete or untouched at any moment."""
    pending = set(pending_delete)
    old_parts, new_parts, keys = _changed(old, new)
    chunks: list[Transaction] = []
    cur: list[tuple[int, dict]] = []
    tx = Transaction()
    for k in keys:
        stale: list[str] = []
        got = _part_diff(table, old_parts.get(k), new_parts.get(k), pending, stale)
        cur.extend(got)
        tx.stale_chains.extend(stale)
        if k is not None and got:
            tx.touched.add(k)
        if limit is not None and len(cur) >= limit:
            cur.sort(key=lambda pc: pc[0])
            tx.commands = [c for _, c in cur]
            chunks.append(tx)
            tx, cur = Transaction(), []
    cur.sort(key=lambda pc: pc[0])
    tx.commands = [c for _, c in cur]
    if tx.commands or tx.touched or not chunks:
        chunks.append(tx)
    return chunks


def _sort(key: Key) -> tuple:
    return tuple((0, x) if isinstance(x, int) else (1, x) for x in key)


# -- what the kernel holds -----------------------------------------------------------------


def _norm_atom(x: Any) -> Any:
    if isinstance(x, str):
        try:
            return str(ipaddress.ip_address(x))
        except ValueError:
            return x
    return x


def _parse_key(k: Any) -> Key:
    if isinstance(k, dict) and "concat" in k:
        return tuple(_norm_atom(x) for x in k["concat"])
    return (_norm_atom(k),)


def _parse_value(v: Any) -> Value:
    if isinstance(v, dict):
        for verdict in ("goto", "jump"):
            if verdict in v:
                return (verdict, v[verdict]["target"])
        for verdict in ("drop", "accept", "return", "continue"):
            if verdict in v:
                return (verdict,)
    return ("?", json.dumps(v, sort_keys=True))


def ruleset_from_listing(listing: list[dict]) -> tuple[Ruleset, set[str]]:
    """The table as ``nft -j list table`` shows it, as a ``Ruleset`` with everything in its
    skeleton part (a restart diffs everything once), and the chains that hold no rule (left
    flushed by an earlier run: to be deleted unless wanted again)."""
    part = Part()
    rules: dict[str, list[dict]] = {}
    chains: list[str] = []
    for item in listing:
        if "chain" in item:
            chains.append(item["chain"]["name"])
        elif "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
        elif "map" in item:
            m = item["map"]
            part.elements[m["name"]] = {_parse_key(e[0]): _parse_value(e[1]) for e in m.get("elem", ())
                                        if isinstance(e, list) and len(e) == 2}
        elif "set" in item:
            st = item["set"]
            typ = st.get("type")
            if not isinstance(typ, str):
                continue                  # not a set of ours
            timeout = int(st.get("timeout", 0) or 0)
            elems = frozenset(_norm_atom(e) for e in st.get("elem", ()) if isinstance(e, str)) if not timeout else frozenset()
            part.sets[st["name"]] = SetSpec(typ, timeout, elems)
    empty = set()
    for name in chains:
        rs = rules.get(name, [])
        comment = rs[-1].get("comment", "") if rs else ""
        digest = comment[len(DIGEST_PREFIX):] if isinstance(comment, str) and comment.startswith(DIGEST_PREFIX) else ""
        # A chain without our digest is rewritten (or, if unwanted, flushed and deleted).
        part.chains[name] = (digest or "?", [])
        if not rs:
            empty.add(name)
    return Ruleset(part, {}), empty


LEFTOVER = ("", "<kernel>")      # the part holding what the kernel has and nothing wants


def adopt(kernel: Ruleset, desired: Ruleset) -> Ruleset:
    """Sort what the kernel holds (``ruleset_from_listing``: one flat part) into the parts of
    ``desired`` that declare the same chains, sets and element keys, so that the part-by-part
    diff compares like with like; what no part declares goes to a ``LEFTOVER`` part, which the
    diff then removes."""
    flat = kernel.base
    chains = dict(flat.chains)
    sets = dict(flat.sets)
    elems = {m: dict(els) for m, els in flat.elements.items()}

    def claim(p: Part) -> Part:
        out = Part()
        for name in p.chains:
            if name in chains:
                out.chains[name] = chains.pop(name)
        for name in p.sets:
            if name in sets:
                out.sets[name] = sets.pop(name)
        for m, els in p.elements.items():
            have = elems.get(m, {})
            mine = {k: have.pop(k) for k in els if k in have}
            out.elements[m] = mine
        return out

    base = claim(desired.base)
    parts = {k: claim(p) for k, p in desired.parts.items()}
    left = Part(chains, {m: els for m, els in elems.items() if els}, sets)
    if left.chains or left.elements or left.sets:
        parts[LEFTOVER] = left
    return Ruleset(base, parts)
