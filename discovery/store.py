"""The object store and the incremental endpoint index.

``Store`` keeps the objects every source reported, keyed by kind/namespace/name, and applies
add/update/delete events. ``EndpointIndex`` sits on top of it and keeps, per service, the set
of pods its selector picks and the resulting endpoint sets.

Invariants:
- ``EndpointIndex.members[svc]`` is always exactly the pods of the service's namespace that
  its selector matches; it changes only when a pod's labels / the pod set / the selector
  change, so a change to one pod touches only the services of its namespace and recomputes
  only those that select it (before or after the change) — never all pods;
- ``EndpointIndex.sets[svc]`` is recomputed only for services marked dirty; unchanged
  services keep the very same tuple object (structural sharing for snapshot building);
- ClusterIPs and nodePorts that a manifest leaves out are allocated here, deterministically
  (a hash of the service's identity, probing forward on collision), so the same input gets
  the same addresses after a restart.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

from . import ipfamilies
from . import objects as o
from .endpoints import EndpointSet, compute_endpoint_sets
from .selectors import Selector, selector_from_map

__all__ = ["Event", "Store", "EndpointIndex", "Allocator", "ADDED", "MODIFIED", "DELETED"]

log = logging.getLogger("meshproxy.discovery")

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

Key = tuple[str, str, str]          # (kind, namespace, name)
NsName = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Event:
    type: str                       # ADDED / MODIFIED / DELETED
    obj: object                     # for DELETED: the last known object (its key is what counts)


class Store:
    """Objects by kind, then (namespace, name). Not thread-safe; the control plane owns it."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[NsName, object]] = {}

    def apply(self, events: Iterable[Event]) -> list[tuple[object | None, object | None]]:
        """Apply events; return the effective changes as (old, new) pairs (None for absent).
        Events that change nothing (same object re-sent) are dropped."""
        changes = []
        for ev in events:
            kind, ns, name = ev.obj.key  # type: ignore[attr-defined]
            bucket = self._by_kind.setdefault(kind, {})
            old = bucket.get((ns, name))
            if ev.type == DELETED:
                if old is None:
                    continue
                del bucket[(ns, name)]
                changes.append((old, None))
            else:
                if old == ev.obj:
                    continue
                bucket[(ns, name)] = ev.obj
                changes.append((old, ev.obj))
        return changes

    def get(self, kind: str, namespace: str, name: str):
        return self._by_kind.get(kind, {}).get((namespace, name))

    def list(self, kind: str) -> list:
        return list(self._by_kind.get(kind, {}).values())

    def items(self, kind: str) -> dict[NsName, object]:
        return self._by_kind.get(kind, {})

    def count(self) -> int:
        return sum(len(b) for b in self._by_kind.values())

    def all_objects(self) -> list:
        return [obj for b in self._by_kind.values() for obj in b.values()]


def _index_update(index: dict, key, name: str, add: bool) -> None:
    """Add ``name`` to / remove it from the set ``index[key]``; empty sets are dropped."""
    if add:
        index.setdefault(key, set()).add(name)
        return
    names = index.get(key)
    if names is not None:
        names.discard(name)
        if not names:
            del index[key]


def _svc_selector(svc: o.Service) -> Selector | None:
    return None if svc.selector is None else selector_from_map(svc.selector)


class EndpointIndex:
    """Service -> selected pods -> endpoint sets, maintained incrementally.

    Service selectors are equality maps, so a pod can only be selected by services one of
    whose (key, value) pairs it carries. Two inverted indexes make every change cost
    O(labels of the pod + services sharing a label pair) rather than O(cluster):
    ``_svc_by_pair[ns][(k, v)]`` = services whose selector contains that pair (an empty
    selector sits in ``_svc_match_all[ns]``), and ``_pods_by_pair[ns][(k, v)]`` = pods
    carrying it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.selectors: dict[NsName, Selector] = {}
        self.members: dict[NsName, set[str]] = {}          # service -> pod names
        self.pod_services: dict[NsName, set[str]] = {}     # pod -> names of services selecting it
        self.sets: dict[NsName, tuple[EndpointSet, ...]] = {}
        self.probe_results: dict[NsName, bool] | None = None   # None: probing off
        self.dirty: set[NsName] = set()
        self._svc_by_pair: dict[str, dict[tuple[str, str], set[str]]] = {}
        self._svc_match_all: dict[str, set[str]] = {}
        self._pods_by_pair: dict[str, dict[tuple[str, str], set[str]]] = {}
        self._pods_by_ns: dict[str, set[str]] = {}

    # -- changes ------------------------------------------------------------------------------

    def on_changes(self, changes: Iterable[tuple[object | None, object | None]]) -> None:
        for old, new in changes:
            obj = new if new is not None else old
            if isinstance(obj, o.Pod):
                self._pod_changed(old, new)  # type: ignore[arg-type]
            elif isinstance(obj, o.Service):
                self._service_changed(old, new)  # type: ignore[arg-type]
            elif isinstance(obj, o.EndpointSlice):
                for s in (old, new):
                    if s is not None:
                        self.dirty.add((s.namespace, s.service))  # type: ignore[attr-defined]

    def pod_readiness_changed(self, namespace: str, name: str) -> None:
        for svc in self.pod_services.get((namespace, name), ()):
            self.dirty.add((namespace, svc))

    def _candidate_services(self, ns: str, labels) -> set[str]:
        by_pair = self._svc_by_pair.get(ns)
        out = set(self._svc_match_all.get(ns, ()))
        if by_pair:
            for pair in labels.items():
                svcs = by_pair.get(pair)
                if svcs:
                    out |= svcs
        return out

    def _index_pod_labels(self, ns: str, name: str, labels, add: bool) -> None:
        by_pair = self._pods_by_pair.setdefault(ns, {})
        for pair in labels.items():
            _index_update(by_pair, pair, name, add)
        if add:
            self._pods_by_ns.setdefault(ns, set()).add(name)
        else:
            self._pods_by_ns.get(ns, set()).discard(name)

    def _pod_changed(self, old: o.Pod | None, new: o.Pod | None) -> None:
        pod = new or old
        assert pod is not None
        ns, name = pod.namespace, pod.name
        if old is not None:
            self._index_pod_labels(ns, name, old.meta.labels, False)
        if new is not None:
            self._index_pod_labels(ns, name, new.meta.labels, True)
        before = self.pod_services.get((ns, name), set())
        after: set[str] = set()
        if new is not None:
            for sname in self._candidate_services(ns, new.meta.labels):
                if self.selectors[(ns, sname)].matches(new.meta.labels):
                    after.add(sname)
        for sname in before - after:
            self.members.get((ns, sname), set()).discard(name)
        for sname in after - before:
            self.members.setdefault((ns, sname), set()).add(name)
        if after:
            self.pod_services[(ns, name)] = after
        else:
            self.pod_services.pop((ns, name), None)
        for sname in before | after:
            self.dirty.add((ns, sname))

    def _index_selector(self, ns: str, name: str, selector: Mapping[str, str], add: bool) -> None:
        if not selector:
            target = self._svc_match_all.setdefault(ns, set())
            (target.add if add else target.discard)(name)
            return
        by_pair = self._svc_by_pair.setdefault(ns, {})
        # One pair is enough to find candidates; the full selector is checked afterwards.
        _index_update(by_pair, min(selector.items()), name, add)

    def _service_changed(self, old: o.Service | None, new: o.Service | None) -> None:
        svc = new or old
        assert svc is not None
        key = (svc.namespace, svc.name)
        self.dirty.add(key)
        if old is not None and new is not None and old.selector == new.selector:
            return
        # Selector changed (or service added/removed): rebuild this service's membership.
        for pod_name in self.members.pop(key, set()):
            s = self.pod_services.get((svc.namespace, pod_name))
            if s is not None:
                s.discard(svc.name)
                if not s:
                    del self.pod_services[(svc.namespace, pod_name)]
        if self.selectors.pop(key, None) is not None and old is not None and old.selector is not None:
            self._index_selector(svc.namespace, svc.name, old.selector, False)
        if new is None:
            self.sets.pop(key, None)
            return
        if new.selector is None:
            return
        sel = _svc_selector(new)
        assert sel is not None
        self.selectors[key] = sel
        self._index_selector(new.namespace, new.name, new.selector, True)
        # Candidates: pods carrying every pair of the selector (smallest set first).
        ns = new.namespace
        if new.selector:
            by_pair = self._pods_by_pair.get(ns, {})
            sets = sorted((by_pair.get(p, set()) for p in new.selector.items()), key=len)
            members = set(sets[0]).intersection(*sets[1:]) if sets else set()
        else:
            members = set(self._pods_by_ns.get(ns, ()))
        for pname in members:
            self.pod_services.setdefault((ns, pname), set()).add(new.name)
        self.members[key] = members

    # -- recomputation --------------------------------------------------------------------------

    def recompute(self) -> set[NsName]:
        """Recompute dirty services; return the keys whose endpoint sets really changed."""
        changed = set()
        pods = self.store.items("Pod")
        for key in self.dirty:
            ns, name = key
            svc = self.store.get("Service", ns, name)
            if svc is None:
                if self.sets.pop(key, None) is not None:
                    changed.add(key)
                continue
            members = self.members.get(key, ())
            slices = [s for s in self._slices_of(ns, name)]
            new_sets = compute_endpoint_sets(
                svc, (pods[(ns, p)] for p in sorted(members) if (ns, p) in pods), slices, self.probe_results)
            if self.sets.get(key) != new_sets:
                self.sets[key] = new_sets
                changed.add(key)
        self.dirty.clear()
        return changed

    def _slices_of(self, ns: str, service: str) -> list[o.EndpointSlice]:
        out = []
        for kind in ("EndpointSlice", "Endpoints"):
            for (sns, _), sl in self.store.items(kind).items():
                if sns == ns and sl.service == service:  # type: ignore[attr-defined]
                    out.append(sl)
        return out


# --------------------------------------------------------------------------------------------


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Allocator:
    """Deterministic ClusterIP and nodePort allocation for services that leave them out."""

    def __init__(self, service_cidr: str = "127.96.0.0/16",
                 node_port_range: tuple[int, int] = (30000, 32767)) -> None:
        # One range, or two of different families (dual stack): the first is the primary.
        self.nets = ipfamilies.parse_cidrs(service_cidr)
        self.net = self.nets[0]
        self.families = ipfamilies.cluster_families(self.nets)
        self.node_port_range = node_port_range
        self.ips: dict[NsName, str] = {}
        self.node_ports: dict[tuple[str, str, str], int] = {}
        # Every ClusterIP of each non-headless service, in its family order (given ones and
        # allocated ones), and why a service has fewer families than it asked for.
        self.cluster_ips: dict[NsName, tuple[str, ...]] = {}
        self.problems: dict[NsName, str] = {}

    def assign(self, services: Mapping[NsName, o.Service]) -> tuple[dict[NsName, str], dict[tuple[str, str, str], int]]:
        """Return the allocated ClusterIP per service and nodePort per (ns, svc, port key) for
        the services that need them. Explicit addresses are reserved first; the rest are
        processed in namespace/name order so a restart with the same input agrees."""
        taken_ips = {ip for s in services.values() for ip in (s.cluster_ips or (s.cluster_ip,)) if ip and ip != "None"}
        taken_ports = {p.node_port for s in services.values() for p in s.ports if p.node_port}
        ips: dict[NsName, str] = {}
        ports: dict[tuple[str, str, str], int] = {}
        # Keep earlier allocations of services that still need them (stable while running).
        for key in sorted(services):
            svc = services[key]
            if svc.cluster_ip is None and svc.type != "ExternalName":
                prev = self.ips.get(key)
                if prev is not None and prev not in taken_ips:
                    ips[key] = prev
                    taken_ips.add(prev)
        for key in sorted(services):
            svc = services[key]
            if svc.cluster_ip is None and svc.type != "ExternalName" and key not in ips:
                fams, _ = ipfamilies.wanted_families((), svc.ip_families, svc.ip_family_policy, self.families)
                if not fams:
                    continue      # a family this cluster has no range for: reported by _assign_families
                ip = self._pick_ip(f"{key[0]}/{key[1]}", taken_ips, self.nets[self.families.index(fams[0])])
                if ip is None:
                    log.error("service range %s is full: Service/%s/%s gets no ClusterIP", self.net, *key)
                    continue
                ips[key] = ip
                taken_ips.add(ip)
            if svc.type in ("NodePort", "LoadBalancer"):
                for sp in svc.ports:
                    if sp.node_port is None and sp.protocol in ("TCP", "UDP"):
                        pk = (key[0], key[1], sp.name or str(sp.port))
                        prev_port = self.node_ports.get(pk)
                        if prev_port is not None and prev_port not in taken_ports:
                            port = prev_port
                        else:
                            port = self._pick_port(f"{pk}", taken_ports)
                        if port is None:
                            log.error("nodePort range is full: Service/%s/%s gets no nodePort", *key)
                            continue
                        ports[pk] = port
                        taken_ports.add(port)
        self.ips, self.node_ports = ips, ports
        self._assign_families(services, ips, taken_ips)
        return ips, ports

    def _assign_families(self, services: Mapping[NsName, o.Service], primary: dict[NsName, str],
                         taken: set[str]) -> None:
        """Fill ``cluster_ips``: for each family a service asks for (discovery/ipfamilies.py),
        its given address or one allocated from that family's range. Earlier allocations are
        kept while running, like the primary ones."""
        prev, out, problems = self.cluster_ips, {}, {}
        for key in sorted(services):
            svc = services[key]
            if svc.type == "ExternalName" or svc.headless:
                continue
            given = tuple(ip for ip in (svc.cluster_ips or ((svc.cluster_ip,) if svc.cluster_ip else ())))
            if not given and key in primary:
                given = (primary[key],)
            fams, problem = ipfamilies.wanted_families(given if svc.cluster_ips or svc.cluster_ip else (),
                                                       svc.ip_families, svc.ip_family_policy, self.families)
            if problem:
                problems[key] = problem
            by_family = {ipfamilies.family_of(ip): ip for ip in given}
            ips = []
            for fam in fams:
                ip = by_family.get(fam)
                if ip is None:
                    old = [a for a in prev.get(key, ()) if ipfamilies.family_of(a) == fam and a not in taken]
                    net = self.nets[self.families.index(fam)]
                    ip = old[0] if old else self._pick_ip(f"{key[0]}/{key[1]}", taken, net)
                    if ip is None:
                        log.error("service range %s is full: Service/%s/%s gets no %s ClusterIP", net, key[0], key[1], fam)
                        continue
                    taken.add(ip)
                ips.append(ip)
            if ips:
                out[key] = tuple(ips)
        self.cluster_ips, self.problems = out, problems

    def _pick_ip(self, ident: str, taken: set[str], net=None) -> str | None:
        net = net if net is not None else self.net
        size = net.num_addresses
        usable = min(size - 2 if size > 2 else size, 1 << 32)
        start = _stable_hash(ident) % usable
        for i in range(min(usable, 1 << 20)):      # bounded: a huge IPv6 range is never full
            cand = str(net.network_address + 1 + (start + i) % usable) if size > 2 else str(net.network_address + (start + i) % usable)
            if cand not in taken:
                return cand
        return None

    def _pick_port(self, ident: str, taken: set[int | None]) -> int | None:
        lo, hi = self.node_port_range
        n = hi - lo + 1
        start = _stable_hash(ident) % n
        for i in range(n):
            cand = lo + (start + i) % n
            if cand not in taken:
                return cand
        return None
