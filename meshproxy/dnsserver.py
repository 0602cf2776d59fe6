"""Cluster DNS: ``<svc>.<ns>.svc.<domain>`` and friends, answered from the routing snapshot.

The records follow the Kubernetes DNS specification for services and pods
(https://github.com/kubernetes/dns/blob/master/docs/specification.md), as CoreDNS serves it:

- ``<svc>.<ns>.svc.<domain>`` A/AAAA: the ClusterIP (given or allocated); for a headless
  service the ready endpoint addresses; for an ExternalName service a CNAME to
  ``spec.externalName`` (followed while it stays inside the zone, never outside);
- ``_<port>._<proto>.<svc>.<ns>.svc.<domain>`` SRV for named ports: one record
  (port, ``<svc>.<ns>.svc.<domain>``) for a ClusterIP service; one per ready endpoint of a
  headless one with target ``<hostname-or-dashed-ip>.<svc>.<ns>.svc.<domain>``, whose A/AAAA
  records go in the additional section;
- ``<hostname>.<svc>.<ns>.svc.<domain>`` for the ready endpoints of a headless service whose
  pod has ``spec.hostname`` and ``spec.subdomain: <svc>`` (StatefulSet identities), and the
  dashed-address name for the other endpoints;
- ``<a-b-c-d>.<ns>.pod.<domain>`` for pods that exist in that namespace with that address
  (CoreDNS's "pods verified").

Invariants:
- authoritative for ``<domain>`` only and not a recursive resolver: every other name is
  passed to the upstream resolvers (``meshproxy.dnsforward``, as CoreDNS's forward plugin),
  or gets REFUSED when no forwarder is given, so a stub resolver moves on at once;
- the zone is a function of one snapshot, made once per ``snapshot.version``: one
  ``Fragment`` (relative name -> rdtype -> plain values) per Service, reused while the
  Service and endpoint-set objects are the same ones, so a query is a split of the name and
  two dict lookups. Names are keyed by their lowercased labels: lookups are case-insensitive;
- NXDOMAIN only for a name with neither records nor names below it; an existing name without
  records of the asked type, empty non-terminals such as ``<ns>.svc.<domain>`` included,
  gets NOERROR with no answer (NODATA). Both negative answers carry the zone's SOA in the
  authority section so resolvers cache them for ``ttl`` seconds (RFC 2308);
- UDP answers fit 512 bytes, or the client's EDNS size capped at 1232 (the DNS flag day 2020
  value); what does not fit is cut with TC set and the client retries over TCP, which
  carries 2-byte length-framed messages, several per connection;
- a response depends only on (zone version, question, RD, EDNS size class), so whole
  responses of ordinary queries are cached per zone version and replayed with the ID and the
  question's letter case patched in; answers with several records are kept in a few orders
  and handed out in turn (round robin, as CoreDNS's loadbalance plugin);
- no exception leaves a protocol callback: a packet that cannot be parsed is answered
  FORMERR when it has a header to answer to and dropped otherwise; responses (QR set) are
  dropped so two servers can never loop.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import struct
import time
from collections import Counter
from types import MappingProxyType
from typing import Awaitable, Callable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset

from discovery.objects import Pod, Service

from .core.snapshot import Snapshot

__all__ = ["ClusterDNS", "Zone", "build_zone", "dashed", "key_of", "FORWARD"]

log = logging.getLogger("meshproxy.dns")

IN = dns.rdataclass.IN
A, AAAA, CNAME, SRV, SOA, NS, ANY = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME,
                                    dns.rdatatype.SRV, dns.rdatatype.SOA, dns.rdatatype.NS,
                                    dns.rdatatype.ANY)

UDP_PLAIN_SIZE = 512          # RFC 1035 §4.2.1: UDP without EDNS
UDP_EDNS_MAX = 1232           # DNS flag day 2020: no IP fragmentation on common paths
TCP_MAX = 65535

# A name as the index keys it: its labels, lowercased (DNS compares ASCII case-insensitively,
# RFC 4343), root label included. Tuples of bytes hash in C; dns.name.Name hashes in Python.
Key = tuple[bytes, ...]
# What a query gets: (answer RRsets, additional RRsets)
_Entry = tuple[tuple[dns.rrset.RRset, ...], tuple[dns.rrset.RRset, ...]]
_NONE: _Entry = ((), ())
_CHASE_LIMIT = 8              # CNAME hops followed inside the zone
# What handle() returns for a question outside the zone when a forwarder is set: the
# protocol passes the query to the forwarder and sends its answer when it comes.
FORWARD = object()


def key_of(name: dns.name.Name) -> Key:
    return tuple(label.lower() for label in name.labels)


def dashed(ip: str) -> str:
    """``10.0.0.1`` -> ``10-0-0-1``; IPv6 in full form so the label never starts with ``-``."""
    if ":" not in ip:
        return ip.replace(".", "-")
    return ipaddress.ip_address(ip).exploded.replace(":", "-")


def _label(text: str) -> bytes | None:
    """A name's label from text, lowercased; None when it cannot be one (over 63 bytes)."""
    raw = text.lower().encode("ascii", "replace")
    return raw if 0 < len(raw) <= 63 else None


class Fragment:
    """The records of one Service (or of the zone apex): relative name -> rdtype -> values.

    Values are plain data — an address, ``(priority, weight, port, relative target)`` for SRV,
    an absolute key for CNAME — so building one costs microseconds. The dnspython RRsets a query
    needs are made from them the first time that (name, type) is asked and memoised; a
    fragment outlives snapshots while its Service and endpoint sets stay the same objects, so
    its memo does too. The memo is the only state that changes after construction.
    """

    __slots__ = ("base", "nodes", "ttl", "_memo")

    def __init__(self, base: Key, nodes: dict[Key, dict[int, tuple]], ttl: int) -> None:
        self.base = base
        self.nodes = nodes
        self.ttl = ttl
        self._memo: dict[tuple[Key, int], _Entry] = {}

    def lookup(self, rel: Key, qtype: int) -> _Entry | None:
        """The records of ``rel`` (relative to ``base``) of type ``qtype``; None: no such name."""
        node = self.nodes.get(rel)
        if node is None:
            return None
        entry = self._memo.get((rel, qtype))
        if entry is None:
            entry = self._memo[(rel, qtype)] = self._entry(rel, node, qtype)
        return entry

    def _rrset(self, rel: Key, rdtype: int) -> dns.rrset.RRset | None:
        node = self.nodes.get(rel)
        if node is None or rdtype not in node:
            return None
        memo = self._memo.get((rel, -rdtype))          # negative type: the bare RRset
        if memo is None:
            rdatas = [self._rdata(rdtype, v) for v in node[rdtype]]
            memo = self._memo[(rel, -rdtype)] = (
                (dns.rrset.from_rdata_list(dns.name.Name(rel + self.base), self.ttl, rdatas),), ())
        return memo[0][0]

    def _rdata(self, rdtype: int, value):
        if rdtype == A:
            return dns.rdtypes.IN.A.A(IN, A, value)
        if rdtype == AAAA:
            return dns.rdtypes.IN.AAAA.AAAA(IN, AAAA, value)
        if rdtype == SRV:
            priority, weight, port, target = value
            return dns.rdtypes.IN.SRV.SRV(IN, SRV, priority, weight, port, dns.name.Name(target + self.base))
        if rdtype == CNAME:
            return dns.rdtypes.ANY.CNAME.CNAME(IN, CNAME, dns.name.Name(value))
        if rdtype == NS:
            return dns.rdtypes.ANY.NS.NS(IN, NS, dns.name.Name(value + self.base))
        raise ValueError(f"no rdata for type {rdtype}")

    def _entry(self, rel: Key, node: Mapping[int, tuple], qtype: int) -> _Entry:
        if qtype == ANY:
            return tuple(r for r in (self._rrset(rel, t) for t in node) if r is not None), ()
        if qtype in node:
            rrset = self._rrset(rel, qtype)
            assert rrset is not None
            extra: list[dns.rrset.RRset] = []
            if qtype in (SRV, NS):
                # Glue: the addresses of the targets, which live in this same fragment.
                for value in node[qtype]:
                    target = value[3] if qtype == SRV else value
                    for t in (A, AAAA):
                        glue = self._rrset(target, t)
                        if glue is not None and glue not in extra:
                            extra.append(glue)
            return (rrset,), tuple(extra)
        if CNAME in node:
            # RFC 1034 §3.6.2: a CNAME answers every type (the zone chases it further).
            return (self._rrset(rel, CNAME),), ()      # type: ignore[return-value]
        return _NONE                                   # NODATA


class _Nodes:
    """Relative names of one fragment being built; parents are created as empty non-terminals."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: dict[Key, dict[int, dict]] = {(): {}}

    def ensure(self, rel: Key) -> dict[int, dict]:
        node = self.data.get(rel)
        if node is None:
            node = self.data[rel] = {}
            parent = rel[1:]
            while parent not in self.data:
                self.data[parent] = {}
                parent = parent[1:]
        return node

    def add(self, rel: Key, rdtype: int, value) -> None:
        self.ensure(rel).setdefault(rdtype, {})[value] = None   # a dict keeps order and dedupes

    def add_address(self, rel: Key, ip: str) -> None:
        self.add(rel, AAAA if ":" in ip else A, ip)

    def freeze(self) -> dict[Key, dict[int, tuple]]:
        return {k: {t: tuple(v) for t, v in types.items()} for k, types in self.data.items()}


def _hostnames(svc: Service, sets, pods: Mapping[tuple[str, str], Pod] | None) -> tuple[tuple[str, str], ...]:
    """(ip, hostname) of the ready endpoints of a headless service that publish a hostname."""
    out = []
    for es in sets:
        for e in es.endpoints:
            if e.ready:
                host = _hostname(svc, e, pods)
                if host:
                    out.append((e.ip, host))
    return tuple(sorted(set(out)))


def _hostname(svc: Service, e, pods: Mapping[tuple[str, str], Pod] | None) -> str | None:
    host = getattr(e, "hostname", None)          # when endpoints carry it (EndpointSlice hostname)
    if host:
        return host
    if pods is not None and e.pod is not None and svc.selector is not None:
        pod = pods.get((svc.namespace, e.pod))
        # The endpoints controller's rule: the hostname is published for the service that
        # the pod names as its subdomain, and only for that one.
        if pod is not None and pod.hostname and pod.subdomain == svc.name:
            return pod.hostname
    return None


def service_fragment(svc: Service, sets, cluster_ip: str | tuple[str, ...] | None, hostnames: tuple[tuple[str, str], ...],
                     base: Key, ttl: int) -> Fragment:
    """The records of one Service under ``base`` (``<svc>.<ns>.svc.<domain>``)."""
    n = _Nodes()
    if svc.type == "ExternalName":
        if svc.external_name:
            try:
                n.add((), CNAME, key_of(dns.name.from_text(svc.external_name)))
            except dns.exception.DNSException:
                pass
        return Fragment(base, n.freeze(), ttl)
    protocols = {sp.name: sp.protocol.lower() for sp in svc.ports}
    if not svc.headless:
        # Every ClusterIP (A and AAAA for a dual-stack service).
        for ip in (cluster_ip,) if isinstance(cluster_ip, str) else (cluster_ip or ()):
            n.add_address((), ip)
        for sp in svc.ports:
            label = _label(f"_{sp.name}") if sp.name else None
            if label is not None:
                n.add((label, b"_" + protocols[sp.name].encode()), SRV, (0, 100, sp.port, ()))
        return Fragment(base, n.freeze(), ttl)
    hosts = dict(hostnames)
    labels: dict[str, bytes] = {}                 # ip -> first label of its own name
    for es in sets:
        for e in es.endpoints:
            if not e.ready or e.ip in labels:
                continue
            host = hosts.get(e.ip)
            label = (_label(host) if host else None) or dashed(e.ip).encode()
            labels[e.ip] = label
            n.add_address((), e.ip)
            n.add_address((label,), e.ip)
    for es in sets:
        owner = _label(f"_{es.port_name}") if es.port_name else None
        if owner is None:
            continue                              # SRV records exist for named ports only
        ready = [e for e in es.endpoints if e.ready]
        if not ready:
            continue
        # Equal weights that add up to about 100, as CoreDNS gives them.
        weight = max(1, 100 // len(ready))
        rel = (owner, b"_" + protocols.get(es.port_name, "tcp").encode())
        for e in ready:
            n.add(rel, SRV, (0, weight, e.port, (labels[e.ip],)))
    return Fragment(base, n.freeze(), ttl)


class Zone:
    """The cluster domain for one snapshot: the apex, one fragment per Service, pod names.

    A lookup splits the name at ``svc`` / ``pod`` and makes at most two dict lookups; pod names
    are indexed the first time one is asked in this snapshot.
    """

    __slots__ = ("origin", "origin_key", "version", "ttl", "soa", "apex", "services", "namespaces",
                 "_pod_source", "_pods", "_pod_ns", "_pod_memo")

    def __init__(self, origin: dns.name.Name, version: int, ttl: int, soa: dns.rrset.RRset,
                 apex: Fragment, services: Mapping[tuple[bytes, bytes], Fragment],
                 namespaces: frozenset[bytes], pod_source: Callable[[], set[tuple[str, str]]]) -> None:
        self.origin = origin
        self.origin_key = key_of(origin)
        self.version = version
        self.ttl = ttl
        self.soa = soa
        self.apex = apex
        self.services = services                  # (namespace label, service label) -> fragment
        self.namespaces = namespaces              # labels of namespaces with services
        self._pod_source = pod_source
        self._pods: dict[tuple[bytes, bytes], str] | None = None
        self._pod_ns: set[bytes] = set()
        self._pod_memo: dict[tuple[tuple[bytes, bytes], int], _Entry] = {}

    def __len__(self) -> int:
        return len(self.apex.nodes) + sum(len(f.nodes) for f in self.services.values())

    def lookup(self, qname: dns.name.Name, qtype: int) -> tuple[int, _Entry]:
        """(rcode, (answer, additional)) for a name inside the zone."""
        key = key_of(qname)
        rcode, entry = self._lookup(key, qtype)
        answer = entry[0]
        if answer and answer[-1].rdtype == CNAME and qtype not in (CNAME, ANY):
            # Follow CNAMEs that stay in the zone (an ExternalName naming another Service);
            # the rcode is the last name's (RFC 6604).
            chain = list(answer)
            seen = {key}
            for _ in range(_CHASE_LIMIT):
                target = key_of(chain[-1][0].target)
                if target[len(target) - len(self.origin_key):] != self.origin_key or target in seen:
                    break
                seen.add(target)
                rcode, (more, _extra) = self._lookup(target, qtype)
                chain.extend(more)
                if not more or more[-1].rdtype != CNAME:
                    break
            return rcode, (tuple(chain), ())
        return rcode, entry

    def _lookup(self, key: Key, qtype: int) -> tuple[int, _Entry]:
        rel = key[:len(key) - len(self.origin_key)]
        if not rel and qtype in (SOA, ANY):
            apex = self.apex.lookup((), qtype) or _NONE
            return dns.rcode.NOERROR, ((self.soa,) + apex[0] if qtype == ANY else (self.soa,), ())
        n = len(rel)
        top = rel[-1] if rel else None
        if top == b"svc" and n >= 3:
            frag = self.services.get((rel[-2], rel[-3]))
            entry = frag.lookup(rel[:-3], qtype) if frag is not None else None
        elif top == b"svc" and n == 2:
            entry = _NONE if rel[0] in self.namespaces else None
        elif top == b"pod" and n >= 2:
            entry = self._pod(rel, qtype)
        else:
            entry = self.apex.lookup(rel, qtype)
        if entry is None:
            return dns.rcode.NXDOMAIN, _NONE
        return dns.rcode.NOERROR, entry

    def _pod(self, rel: Key, qtype: int) -> _Entry | None:
        if self._pods is None:
            self._pods = {}
            for ns, ip in self._pod_source():
                ns_label = _label(ns)
                if ns_label is not None:
                    self._pods[(ns_label, dashed(ip).encode())] = ip
                    self._pod_ns.add(ns_label)
        if len(rel) == 2:
            return _NONE if rel[0] in self._pod_ns else None
        if len(rel) != 3:
            return None
        ip = self._pods.get((rel[1], rel[0]))
        if ip is None:
            return None
        if qtype not in (A, AAAA, ANY):
            return _NONE
        memo = self._pod_memo.get(((rel[1], rel[0]), qtype))
        if memo is None:
            rdtype = AAAA if ":" in ip else A
            if qtype != ANY and qtype != rdtype:
                memo = _NONE
            else:
                rd = (dns.rdtypes.IN.AAAA.AAAA if rdtype == AAAA else dns.rdtypes.IN.A.A)(IN, rdtype, ip)
                memo = ((dns.rrset.from_rdata_list(dns.name.Name(rel + self.origin_key), self.ttl, [rd]),), ())
            self._pod_memo[((rel[1], rel[0]), qtype)] = memo
        return memo


# (Service, endpoint sets, signature, fragment) per service, kept between snapshots.
FragmentCache = dict[tuple[str, str], tuple[Service, object, tuple, Fragment]]


def build_zone(snap: Snapshot, origin: dns.name.Name, ttl: int = 5,
               pods: Mapping[tuple[str, str], Pod] | None = None,
               ns_address: str | None = None, cache: FragmentCache | None = None) -> Zone:
    """The records of ``snap`` under ``origin``.

    ``pods`` (the store's Pods) give hostnames of headless services' pods and the pod names;
    without them hostnames come from ``Endpoint.hostname`` when endpoints carry it, and pod
    names from the endpoints of services with a selector. ``cache`` carries each Service's
    fragment over from the previous snapshot while the Service and endpoint-set objects are the
    very same ones (the snapshot builder shares unchanged ones), so a snapshot costs a check
    per Service plus the Services that changed.
    """
    okey = key_of(origin)
    svc_key = (b"svc",) + okey
    services: dict[tuple[bytes, bytes], Fragment] = {}
    namespaces: set[bytes] = set()
    kept: FragmentCache = {}
    for (ns, name), svc in snap.services.items():
        ns_label, name_label = _label(ns), _label(name)
        if ns_label is None or name_label is None:
            continue                              # no DNS name can carry it
        namespaces.add(ns_label)
        sets = snap.endpoint_sets.get((ns, name), ())
        ip = None
        if svc.type != "ExternalName" and not svc.headless:
            ip = snap.cluster_ips.get((ns, name)) or svc.cluster_ip or snap.allocated.get(f"{ns}/{name}")
        hostnames = _hostnames(svc, sets, pods) if svc.headless else ()
        sig = (ip, hostnames, ttl)
        prev = cache.get((ns, name)) if cache is not None else None
        if prev is not None and prev[0] is svc and prev[1] is sets and prev[2] == sig:
            frag = prev[3]
        else:
            frag = service_fragment(svc, sets, ip, hostnames, (name_label, ns_label) + svc_key, ttl)
        kept[(ns, name)] = (svc, sets, sig, frag)
        services[(ns_label, name_label)] = frag
    if cache is not None:
        cache.clear()
        cache.update(kept)

    apex = _Nodes()
    ns_rel = (b"ns", b"dns")
    apex.add((), NS, ns_rel)
    apex.ensure((b"svc",))
    apex.ensure((b"pod",))
    if ns_address:
        apex.add_address(ns_rel, ns_address)
    soa = dns.rrset.from_rdata_list(origin, ttl, [dns.rdtypes.ANY.SOA.SOA(
        IN, SOA, dns.name.Name(ns_rel + okey), dns.name.Name((b"hostmaster",) + okey),
        snap.version % 2**32, 7200, 1800, 86400, ttl)])

    def pod_source() -> set[tuple[str, str]]:
        if pods is not None:
            return {(ns, p.pod_ip) for (ns, _), p in pods.items()
                    if p.pod_ip and p.phase not in ("Succeeded", "Failed")}
        out = set()
        for (ns, _), svc in snap.services.items():
            if svc.selector is not None:          # endpoints of selector-less services are no pods
                for es in snap.endpoint_sets.get((ns, svc.name), ()):
                    out.update((ns, e.ip) for e in es.endpoints if e.pod is not None)
        return out

    return Zone(origin, snap.version, ttl, soa, Fragment(okey, apex.freeze(), ttl),
                MappingProxyType(services), frozenset(namespaces), pod_source)


# -- serving -----------------------------------------------------------------------------------


_HEADER = struct.Struct("!HHHHHH")
_OPT = struct.Struct("!HHIH")
_QR, _OPCODE, _RD = 0x8000, 0x7800, 0x0100
_OPT_PADDING = 12
_RCODE_NAMES = {int(r): r.name.lower() for r in dns.rcode.Rcode if int(r) < 16}
_WIRE_CACHE_SIZE = 10000
# Answers with several records per RRset are kept in this many orders (dnspython shuffles each
# render) and handed out in turn, so clients that take the first address still spread out —
# what CoreDNS's loadbalance plugin does for kube-dns.
_ORDERS = 8


def _formerr(data: bytes) -> bytes | None:
    """A bare FORMERR for a query dnspython could not parse, or None (drop) when there is no
    header to answer to or the packet is itself a response."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & _QR:
        return None
    # QR, the same opcode, RD copied, rcode FORMERR, no sections (RFC 1035 §4.1.1).
    return _HEADER.pack(qid, _QR | (flags & _OPCODE) | (flags & _RD) | dns.rcode.FORMERR, 0, 0, 0, 0)


def _parse_plain(data: bytes) -> tuple[int, tuple, int] | None:
    """The shape of an ordinary query — one question, at most an EDNS(0) OPT record without
    padding, nothing else — as (end of the question name, cache key part, EDNS payload or -1).
    None for anything else; those take the full dnspython path."""
    size = len(data)
    if size < 17:
        return None
    _, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if flags & (_QR | _OPCODE) or qd != 1 or an or ns or ar > 1:
        return None
    labels = []
    pos = 12
    while True:
        if pos >= size:
            return None
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:                  # a compression pointer in a question: unusual, slow path
            return None
        labels.append(data[pos + 1:pos + 1 + length].lower())
        pos += 1 + length
    name_end = pos
    if name_end - 12 > 255 or pos + 4 > size:
        return None
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    pos += 4
    payload = -1
    if ar:
        if pos + 11 > size or data[pos] != 0:
            return None
        rtype, payload, ttl, rdlen = _OPT.unpack_from(data, pos + 1)
        if rtype != dns.rdatatype.OPT or (ttl >> 16) & 0xFF or pos + 11 + rdlen != size:
            return None                  # not OPT, EDNS version > 0 (BADVERS), or junk
        opt = pos + 11
        while opt < size:                # options are not echoed, but must be well formed
            if opt + 4 > size:
                return None
            code, olen = struct.unpack_from("!HH", data, opt)
            if code == _OPT_PADDING:     # RFC 8467: the response would be padded
                return None
            opt += 4 + olen
        if opt != size:
            return None
    elif pos != size:
        return None
    labels.append(b"")
    return name_end, (tuple(labels), qtype, qclass, flags & _RD), payload


class ClusterDNS:
    """An authoritative DNS server for the cluster domain on one UDP + TCP address."""

    def __init__(self, get_snapshot: Callable[[], Snapshot | None], domain: str = "cluster.local",
                 ttl: int = 5, *, get_pods: Callable[[], Mapping[tuple[str, str], Pod]] | None = None,
                 udp_payload: int = UDP_EDNS_MAX, tcp_idle_timeout: float = 10.0,
                 max_tcp_connections: int = 256,
                 forward: Callable[[bytes, bool], Awaitable[bytes]] | None = None) -> None:
        self._get_snapshot = get_snapshot
        self._get_pods = get_pods
        self.forward = forward
        self.origin = dns.name.from_text(domain)
        self.domain = self.origin.to_text(omit_final_dot=True)
        self.ttl = int(ttl)
        self.udp_payload = max(UDP_PLAIN_SIZE, min(udp_payload, TCP_MAX))
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.host: str | None = None
        self.port: int | None = None
        self.stats: Counter[str] = Counter()      # queries by transport and rcode, truncations, drops
        self._zone: Zone | None = None
        self._fragments: FragmentCache = {}
        # Whole responses of ordinary queries, per zone version: the next identical question
        # (any letter case) is answered by copying bytes. See handle().
        self._wire: dict[tuple, tuple[list[bytes], int]] = {}
        self._turn = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._conns: set[_TcpProtocol] = set()

    # -- the zone ------------------------------------------------------------------------------

    def zone(self) -> Zone | None:
        """The zone of the snapshot in force, built at most once per snapshot version."""
        snap = self._get_snapshot()
        if snap is None:
            return None
        z = self._zone
        if z is None or z.version != snap.version:
            t0 = time.perf_counter()
            z = build_zone(snap, self.origin, self.ttl,
                           self._get_pods() if self._get_pods is not None else None, self.host,
                           self._fragments)
            self._zone = z
            self._wire.clear()
            log.debug("DNS zone for snapshot %d: %d services in %.1f ms", snap.version, len(z.services),
                      (time.perf_counter() - t0) * 1000)
        return z

    # -- one query ----------------------------------------------------------------------------

    def handle(self, data: bytes, udp: bool) -> bytes | object | None:
        """A query in wire format -> the response in wire format, or None to send nothing, or
        ``FORWARD`` (a question for the upstream resolvers).
        Over UDP the response is cut to the size the client can take (TC set)."""
        ckey = None
        plain = _parse_plain(data)
        if plain is not None:
            zone = self.zone()
            if zone is not None:
                name_end, qkey, payload = plain
                if not udp:
                    limit = TCP_MAX
                elif payload >= 0:
                    limit = max(UDP_PLAIN_SIZE, min(payload, self.udp_payload))
                else:
                    limit = UDP_PLAIN_SIZE
                ckey = (qkey, payload >= 0, limit)
                entry = self._wire.get(ckey)
                if entry is not None and len(entry[0]) >= entry[1]:
                    wires, orders = entry
                    self._turn += 1
                    cached = wires[self._turn % orders]
                    # The cached response differs from this one only in the ID and the letter
                    # case of the question name: same length, same offsets, so compression
                    # pointers into the question stay right.
                    self._count(cached)
                    return data[:2] + cached[2:12] + data[12:name_end] + cached[name_end:]
        try:
            query = dns.message.from_wire(data)
        # Anything dnspython refuses to parse: short header, bad labels or pointers, trailing
        # junk, bad EDNS or TSIG. The answer is FORMERR when there is a header to answer to.
        except (dns.exception.DNSException, ValueError, struct.error, IndexError):
            self.stats["formerr"] += 1
            return _formerr(data)
        if query.flags & dns.flags.QR:
            self.stats["dropped"] += 1
            return None
        if self.forward is not None and query.opcode() == dns.opcode.QUERY and len(query.question) == 1 \
                and not query.question[0].name.is_subdomain(self.origin) \
                and query.question[0].rdtype not in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            self.stats["forwarded"] += 1
            return FORWARD
        try:
            wire, several = self._respond(query, udp)
        except Exception:  # a bug here must not kill the listener: answer SERVFAIL, log it
            log.exception("answering DNS query %s failed", query.question)
            self.stats["servfail"] += 1
            wire = _formerr(data)
            if wire is None:
                return None
            flags = (struct.unpack_from("!H", wire, 2)[0] & ~0xF) | dns.rcode.SERVFAIL
            return wire[:2] + struct.pack("!H", flags) + wire[4:]
        self._count(wire)
        if ckey is not None and (wire[3] & 0xF) != dns.rcode.SERVFAIL:
            entry = self._wire.get(ckey)
            if entry is not None:
                entry[0].append(wire)
            else:
                if len(self._wire) >= _WIRE_CACHE_SIZE:
                    self._wire.clear()    # bounded: random names must not grow it forever
                self._wire[ckey] = ([wire], _ORDERS if several else 1)
        return wire

    def _count(self, wire: bytes) -> None:
        stats = self.stats
        stats[_RCODE_NAMES.get(wire[3] & 0xF, "other")] += 1
        if wire[2] & 0x02:                        # TC: the client retries over TCP
            stats["truncated"] += 1

    def _respond(self, query: dns.message.Message, udp: bool) -> tuple[bytes, bool]:
        """The response, and whether it has an RRset of several records (order matters)."""
        resp = dns.message.make_response(query, our_payload=self.udp_payload)
        if not udp:
            limit = TCP_MAX
        elif query.edns >= 0:
            limit = max(UDP_PLAIN_SIZE, min(query.payload, self.udp_payload))
        else:
            limit = UDP_PLAIN_SIZE
        resp.set_rcode(self._fill(query, resp))
        return (resp.to_wire(max_size=limit, prefer_truncation=True),
                any(len(rrset) > 1 for rrset in resp.answer))

    def _fill(self, query: dns.message.Message, resp: dns.message.Message) -> int:
        if query.opcode() != dns.opcode.QUERY:
            return dns.rcode.NOTIMP
        if query.edns > 0:
            return dns.rcode.BADVERS              # RFC 6891 §6.1.3: we speak EDNS version 0
        if len(query.question) != 1:
            return dns.rcode.FORMERR
        q = query.question[0]
        if q.rdclass != IN or q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR) \
                or not q.name.is_subdomain(self.origin):
            # Not ours: we are authoritative for the cluster domain and not a recursive
            # resolver, so the stub resolver should ask its next server.
            return dns.rcode.REFUSED
        zone = self.zone()
        if zone is None:
            return dns.rcode.SERVFAIL             # no snapshot yet
        resp.flags |= dns.flags.AA
        rcode, (answer, additional) = zone.lookup(q.name, q.rdtype)
        if answer:
            resp.answer.extend(answer)
            resp.additional.extend(additional)
        else:
            resp.authority.append(zone.soa)       # RFC 2308: negative answers carry the SOA
        return rcode

    # -- sockets ------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Bind UDP and TCP on ``host:port``; port 0 picks one free for both (see ``port``)."""
        loop = asyncio.get_running_loop()
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
            bound = udp.get_extra_info("sockname")[1]
            try:
                tcp = await loop.create_server(lambda: _TcpProtocol(self), host, bound, reuse_address=True)
            except OSError as exc:
                udp.close()
                # Port 0 gave a UDP port whose TCP twin is taken: try another one.
                if port == 0 and exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            break
        self._udp, self._tcp = udp, tcp
        self.host, self.port = host, bound
        self._zone = None                         # the NS address may have changed
        log.info("cluster DNS for %s listening on %s:%d (UDP and TCP)", self.domain, host, bound)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for conn in list(self._conns):
            conn.close()

    async def wait_closed(self) -> None:
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None


class _UdpProtocol(asyncio.DatagramProtocol):
    __slots__ = ("server", "transport")

    def __init__(self, server: ClusterDNS) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.server.stats["udp"] += 1
        wire = self.server.handle(data, True)
        if wire is FORWARD:
            asyncio.get_running_loop().create_task(self._forward(data, addr))
        elif wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)

    async def _forward(self, data: bytes, addr) -> None:
        wire = await self.server.forward(data, True)
        if self.transport is not None:
            self.transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to answer to.
        pass


class _TcpProtocol(asyncio.Protocol):
    """RFC 7766: length-framed messages, pipelined, answered in order; closed when idle."""

    __slots__ = ("server", "transport", "buf", "last_active", "timer")

    def __init__(self, server: ClusterDNS) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        if len(self.server._conns) >= self.server.max_tcp_connections:
            transport.close()
            return
        self.server._conns.add(self)
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self.timer = loop.call_later(self.server.tcp_idle_timeout, self._idle_check)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        self.last_active = asyncio.get_running_loop().time()
        while len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if size < 12:
                # Not even a header: the framing cannot be trusted any more.
                self.close()
                return
            if len(buf) < 2 + size:
                break
            msg = bytes(buf[2:2 + size])
            del buf[:2 + size]
            self.server.stats["tcp"] += 1
            wire = self.server.handle(msg, False)
            if wire is FORWARD:
                # RFC 7766 §6.2.1.1: answers to pipelined queries may go out of order.
                asyncio.get_running_loop().create_task(self._forward(msg))
            elif wire is not None and self.transport is not None:
                self.transport.write(len(wire).to_bytes(2, "big") + wire)

    async def _forward(self, msg: bytes) -> None:
        wire = await self.server.forward(msg, False)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(wire).to_bytes(2, "big") + wire)

    def eof_received(self) -> bool:
        return False                              # answers are written: close our side too

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its queries meanwhile.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        left = self.last_active + self.server.tcp_idle_timeout - loop.time()
        if left > 0:
            self.timer = loop.call_later(left, self._idle_check)   # re-armed, not re-created per message
        else:
            self.timer = None
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server._conns.discard(self)
        self.transport = None
