"""The DNS source: endpoints of Services that live outside the manifests, found by DNS.

Which Services (first match wins):
- ``meshproxy.dev/dns-srv: _http._tcp.<name>`` — SRV. Only the lowest-priority group that has
  any address is used (RFC 2782); each target is resolved to A and AAAA (the additional
  section is used when it carries the target's addresses); the port comes from the SRV
  record; the weight is kept on the endpoint as ``target="srv-weight=<w>"``, which
  ``discovery/endpoints.py`` turns into ``Endpoint.weight`` for the balancers (RFC 2782
  weighted choice, see ``meshproxy/balancers.py``);
- ``meshproxy.dev/dns: <name>`` — A and AAAA of the name; the port of every service port is
  its numeric ``targetPort``, else its ``port``;
- ``type: ExternalName`` — A and AAAA of ``spec.externalName``, ports as above.
A value that is an IP address is used as is, without DNS.

What it emits: synthetic ``EndpointSlice`` objects in the Service's namespace, labelled
``kubernetes.io/service-name: <svc>``, named ``<svc>-dns`` (``-v6`` for IPv6 addresses and
``-p<port>`` when SRV targets use several ports: a slice has one address family and one port
list), annotated ``meshproxy.dev/made-by: dns``. ``discovery/endpoints.py`` turns them into
endpoint sets like any selector-less Service's slices.

Invariants:
- one scheduler task owns a heap of due times; at most one lookup per Service is in flight
  (short-lived tasks, at most ``concurrency`` at once) — no task per name lives on;
- a lookup's outcome replaces a Service's slices only when it is an answer: addresses,
  NXDOMAIN or NODATA (the last two give an empty endpoint set). SERVFAIL, REFUSED, timeouts
  and network errors keep the last good answer, emit nothing, and retry with a backoff that
  never exceeds ``min_ttl``;
- the next refresh of an answer is its TTL (the smallest along the CNAME chain; for negative
  answers the SOA's negative TTL) clamped to ``[min_ttl, max_ttl]``;
- the slices a Service has are a pure function of (Service, last good answer): identical
  slices are never re-emitted, and a Service that loses its annotation or goes away gets a
  DELETED event for each slice it had.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from ..endpoints import WEIGHT_PREFIX, srv_weight
from ..signals import NO_SIGNALS, Signals
from ..objects import EndpointSlice, Meta, Origin, Service, SliceEndpoint, SlicePort
from ..store import ADDED, DELETED, MODIFIED, Event

__all__ = ["DnsSource", "Query", "Target", "Answer", "Failure", "query_for", "build_slices",
           "srv_weight", "parse_servers", "ANN_DNS", "ANN_DNS_SRV", "ANN_MADE_BY", "ANN_DNS_QUERY", "MADE_BY_DNS"]

log = logging.getLogger("meshproxy.sources.dns")

ANN_DNS = "meshproxy.dev/dns"
ANN_DNS_SRV = "meshproxy.dev/dns-srv"
ANN_MADE_BY = "meshproxy.dev/made-by"          # on every slice this source makes
ANN_DNS_QUERY = "meshproxy.dev/dns-query"      # "A/AAAA web.example.com." / "SRV _http._tcp..."
MADE_BY_DNS = "dns"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "dns.meshproxy.dev"

NsName = tuple[str, str]

# The first retry after a failure; doubled per failure, never above min_ttl.
_BACKOFF_BASE = 0.25


# -- pure part: what to look up, what an answer means ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    mode: str          # "A" (A and AAAA), "SRV", or "IP" (a literal address, no DNS)
    name: str          # absolute name ("web.example.com.") or the address

    def __str__(self) -> str:
        return {"A": "A/AAAA", "SRV": "SRV", "IP": "IP"}[self.mode] + " " + self.name


@dataclass(frozen=True, slots=True, order=True)
class Target:
    ip: str
    port: int | None = None      # SRV port; None: each service port's targetPort
    weight: int | None = None    # SRV weight; None for A/AAAA


@dataclass(frozen=True, slots=True)
class Answer:
    targets: tuple[Target, ...]  # sorted, one per (ip, port)
    ttl: float | None            # None: the answer gave none (static address)
    rcode: str                   # NOERROR / NXDOMAIN / NODATA
    partial: bool = False        # one address family failed; its last good addresses kept


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str                  # "SERVFAIL from 127.0.0.1:53", "timeout", ...


EMPTY_ANSWER = Answer((), None, "NODATA")


def query_for(svc: Service) -> Query | None:
    """The lookup a Service asks for, or None. Raises ValueError for a name that is not one."""
    ann = svc.meta.annotations
    if ANN_DNS_SRV in ann:
        mode, value = "SRV", ann[ANN_DNS_SRV]
    elif ANN_DNS in ann:
        mode, value = "A", ann[ANN_DNS]
    elif svc.type == "ExternalName" and svc.external_name:
        mode, value = "A", svc.external_name
    else:
        return None
    value = value.strip()
    if mode == "A":
        try:
            return Query("IP", str(ipaddress.ip_address(value)))
        except ValueError:
            pass
    try:
        name = dns.name.from_text(value)
    except dns.exception.DNSException as exc:
        raise ValueError(f"{value!r} is not a DNS name: {exc}") from None
    if name == dns.name.root:
        raise ValueError("the root name is not a host")
    # Absolute on purpose: a search list would make the answer depend on the host's resolv.conf.
    return Query(mode, name.to_text())


def _family(ip: str) -> str:
    return "IPv6" if ":" in ip else "IPv4"


def build_slices(svc: Service, answer: Answer, query: Query) -> dict[str, EndpointSlice]:
    """The EndpointSlices that carry ``answer`` for ``svc``, by name. Never empty: no address
    gives one slice without endpoints, so the Service visibly has an empty endpoint set."""
    groups: dict[tuple[str, int | None], list[Target]] = {}
    for t in answer.targets:
        groups.setdefault((_family(t.ip), t.port), []).append(t)
    if not groups:
        groups[("IPv4", None)] = []
    several_ports = len({port for _, port in groups}) > 1
    labels = MappingProxyType({LABEL_SERVICE_NAME: svc.name, LABEL_MANAGED_BY: MANAGED_BY})
    annotations = MappingProxyType({ANN_MADE_BY: MADE_BY_DNS, ANN_DNS_QUERY: str(query)})
    origin = Origin(f"dns:{query.name}", 0)
    out: dict[str, EndpointSlice] = {}
    for (atype, port), targets in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        name = f"{svc.name}-dns" + ("-v6" if atype == "IPv6" else "") + (f"-p{port}" if several_ports else "")
        ports = tuple(
            SlicePort(sp.name, port if port is not None
                      else (sp.target_port if isinstance(sp.target_port, int) else sp.port), sp.protocol)
            for sp in svc.ports)
        endpoints = tuple(
            SliceEndpoint((t.ip,), target=None if t.weight is None else f"{WEIGHT_PREFIX}{t.weight}")
            for t in targets)
        out[name] = EndpointSlice(
            meta=Meta(name=name, namespace=svc.namespace, labels=labels, annotations=annotations),
            origin=origin, service=svc.name, address_type=atype, endpoints=endpoints, ports=ports)
    return out


def slice_events(old: Mapping[str, EndpointSlice], new: Mapping[str, EndpointSlice]) -> list[Event]:
    events = []
    for name, sl in new.items():
        prev = old.get(name)
        if prev is None:
            events.append(Event(ADDED, sl))
        elif prev != sl:
            events.append(Event(MODIFIED, sl))
    for name, sl in old.items():
        if name not in new:
            events.append(Event(DELETED, sl))
    return events


# -- resolving -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    status: str                              # NOERROR / NXDOMAIN / NODATA / FAIL
    rrset: object | None = None
    ttl: float | None = None
    response: object | None = None
    error: str = ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.NoNameservers):
        # errors: [(server, tcp, port, error-or-rcode, response)] — say which server said what.
        parts = []
        for err in exc.kwargs.get("errors", []):
            try:
                server, _tcp, port, what = err[0], err[1], err[2], err[3]
            except (TypeError, IndexError):
                parts.append(str(err))
                continue
            parts.append(f"{what} from {server}:{port}")
        return "; ".join(parts) or "all nameservers failed"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"


async def _query(resolver: dns.asyncresolver.Resolver, name: str, rdtype: int) -> _Reply:
    try:
        ans = await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as exc:
        ttl = None
        for resp in exc.responses().values():
            try:
                ttl = float(resp.resolve_chaining().minimum_ttl)
            except dns.exception.DNSException:
                pass
        return _Reply("NXDOMAIN", ttl=ttl)
    # Everything else a lookup can raise means "no usable answer this time": SERVFAIL / REFUSED
    # from every server (NoNameservers), timeouts, YXDOMAIN, malformed replies, socket errors.
    except (dns.exception.DNSException, OSError) as exc:
        return _Reply("FAIL", error=_describe(exc))
    ttl = float(ans.chaining_result.minimum_ttl)
    if ans.rrset is None:
        return _Reply("NODATA", ttl=ttl, response=ans.response)
    return _Reply("NOERROR", ans.rrset, ttl, ans.response)


async def _resolve_host(resolver, name: str, previous: Answer | None) -> Answer | Failure:
    """A and AAAA of ``name``. One family failing keeps that family's last good addresses."""
    v4, v6 = await asyncio.gather(_query(resolver, name, dns.rdatatype.A),
                                  _query(resolver, name, dns.rdatatype.AAAA))
    if v4.status == "FAIL" and v6.status == "FAIL":
        return Failure(v4.error if v4.error == v6.error else f"A: {v4.error}; AAAA: {v6.error}")
    targets: set[Target] = set()
    ttls = []
    partial = False
    for reply, fam in ((v4, "IPv4"), (v6, "IPv6")):
        if reply.status == "FAIL":
            partial = True
            if previous is not None:
                targets.update(t for t in previous.targets if _family(t.ip) == fam)
            continue
        if reply.ttl is not None:
            ttls.append(reply.ttl)
        if reply.rrset is not None:
            targets.update(Target(r.address) for r in reply.rrset)  # type: ignore[attr-defined]
    if targets:
        rcode = "NOERROR"
    else:
        rcode = "NXDOMAIN" if "NXDOMAIN" in (v4.status, v6.status) else "NODATA"
    return Answer(tuple(sorted(targets)), min(ttls) if ttls else None, rcode, partial)


def _glue(response) -> dict[dns.name.Name, tuple[list[str], float]]:
    """Addresses of SRV targets found in the additional section: name -> (ips, ttl)."""
    out: dict[dns.name.Name, tuple[list[str], float]] = {}
    if response is None:
        return out
    for rrset in response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            ips, ttl = out.get(rrset.name, ([], float(rrset.ttl)))
            ips.extend(r.address for r in rrset)
            out[rrset.name] = (ips, min(ttl, float(rrset.ttl)))
    return out


async def _resolve_srv(resolver, name: str) -> Answer | Failure:
    reply = await _query(resolver, name, dns.rdatatype.SRV)
    if reply.status == "FAIL":
        return Failure(reply.error)
    if reply.rrset is None:
        return Answer((), reply.ttl, reply.status)
    records = [(r.priority, r.weight, r.port, r.target) for r in reply.rrset]  # type: ignore[attr-defined]
    # RFC 2782: a single record with target "." means the service is decidedly not available.
    records = [r for r in records if r[3] != dns.name.root]
    ttl = reply.ttl
    glue = _glue(reply.response)
    for prio in sorted({r[0] for r in records}):
        group = [r for r in records if r[0] == prio]
        # Targets the additional section does not cover are resolved, concurrently.
        missing = sorted({r[3] for r in group if r[3] not in glue})
        resolved = await asyncio.gather(*(_resolve_host(resolver, t.to_text(), None) for t in missing))
        addrs: dict[dns.name.Name, list[str]] = {t: ips for t, (ips, _) in glue.items()}
        failed = None
        ttls = [ttl] if ttl is not None else []
        for t in group:
            if t[3] in glue:
                ttls.append(glue[t[3]][1])
        for t, res in zip(missing, resolved):
            if isinstance(res, Failure):
                failed = f"SRV target {t}: {res.reason}"
                continue
            addrs[t] = [x.ip for x in res.targets]
            if res.ttl is not None and res.targets:
                ttls.append(res.ttl)
        found: dict[tuple[str, int], int] = {}
        for _prio, weight, port, target in group:
            for ip in addrs.get(target, ()):
                # Two records reaching one address:port (two names for one host) add up.
                found[(ip, port)] = found.get((ip, port), 0) + weight
        if found:
            targets = tuple(sorted(Target(ip, port, w) for (ip, port), w in found.items()))
            return Answer(targets, min(ttls) if ttls else None, "NOERROR", failed is not None)
        if failed is not None:
            # This group may have addresses we could not learn: falling through to a less
            # preferred group would be a guess. Keep the last good answer instead.
            return Failure(failed)
    return Answer((), ttl, "NOERROR")


# -- the source -----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Lookup:
    key: NsName
    svc: Service
    query: Query
    gen: int = 0
    due: float = 0.0
    inflight: bool = False
    answer: Answer | None = None         # last good answer for this query
    answered_at: float | None = None
    failures: int = 0                    # consecutive
    last_error: str | None = None
    slices: dict[str, EndpointSlice] = field(default_factory=dict)   # as last emitted


def _make_resolver(servers: list[tuple[str, int]] | None, timeout: float) -> dns.asyncresolver.Resolver:
    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            raise ValueError(f"no --dns-server given and the system resolver is unusable: {exc}") from None
    resolver.cache = None          # this source schedules by TTL itself
    resolver.lifetime = timeout    # the whole lookup
    resolver.timeout = timeout / 2 # one attempt at one server: a lost UDP datagram gets a retry
    return resolver


class DnsSource:
    """Feeds ``emit`` with EndpointSlices of Services whose endpoints come from DNS."""

    name = "dns"

    def __init__(self, emit: Callable[[list[Event]], None],
                 servers: list[tuple[str, int]] | None = None,
                 min_ttl: float = 5.0, max_ttl: float = 300.0, *,
                 timeout: float = 2.0, concurrency: int = 32,
                 resolver: dns.asyncresolver.Resolver | None = None,
                 signals: Signals = NO_SIGNALS,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the running loop by default; refreshes are scheduled with its timers and
        its ``time()``, so a loop with another clock drives them (the resolver's own
        ``timeout`` is always real time)."""
        self.signals = signals
        if not min_ttl > 0 or max_ttl < min_ttl:
            raise ValueError(f"need 0 < min_ttl <= max_ttl (got {min_ttl}, {max_ttl})")
        self._emit = emit
        self.servers = list(servers) if servers else None
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.resolver = resolver or _make_resolver(self.servers, timeout)
        self._concurrency = concurrency
        self._lookups: dict[NsName, _Lookup] = {}
        self._problems: dict[NsName, str] = {}
        self._failing: set[NsName] = set()      # lookups whose last attempt failed (source_up)
        self._heap: list[tuple[float, int, NsName, int]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._sem: asyncio.Semaphore | None = None
        self._closed = False
        self._loop = loop
        self._clock = loop.time if loop is not None else time.monotonic

    # -- control ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._sem = asyncio.Semaphore(self._concurrency)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dns-source")
            self._update_up()

    async def stop(self) -> None:
        self._closed = True
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    def sync(self, services: Mapping[NsName, Service]) -> None:
        """Start, change or stop lookups to match ``services`` (the store's Services)."""
        events: list[Event] = []
        wanted: dict[NsName, tuple[Service, Query]] = {}
        problems: dict[NsName, str] = {}
        for key, svc in services.items():
            try:
                q = query_for(svc)
            except ValueError as exc:
                problems[key] = f"{svc.ref}: {_annotation_of(svc)}: {exc}"
                continue
            if q is None:
                continue
            if svc.selector is not None and svc.type != "ExternalName":
                # endpoints.py takes a Service with a selector from its pods, never from slices.
                problems[key] = f"{svc.ref}: has a selector, so the endpoints found by DNS are not used"
            wanted[key] = (svc, q)
        for key, msg in problems.items():
            if self._problems.get(key) != msg:
                log.warning("%s", msg)
        self._problems = problems
        for key in [k for k in self._lookups if k not in wanted]:
            lk = self._lookups.pop(key)
            lk.gen += 1                                   # its heap entry goes stale
            self._failing.discard(key)
            events.extend(slice_events(lk.slices, {}))
        for key, (svc, q) in wanted.items():
            lk = self._lookups.get(key)
            if lk is not None and lk.query == q:
                if lk.svc is not svc:
                    lk.svc = svc                          # ports may have changed: re-slice
                    if lk.answer is not None:
                        events.extend(self._set_slices(lk, lk.answer))
                continue
            new = _Lookup(key, svc, q)
            if lk is not None:
                lk.gen += 1
                new.slices = lk.slices    # kept until the new name answers: no gap meanwhile
            self._lookups[key] = new
            self._failing.discard(key)
            self._schedule(new, 0.0)
        self._update_up()
        if events:
            self._send(events)

    def state(self) -> dict:
        now = self._clock()
        lookups = []
        for (ns, name), lk in sorted(self._lookups.items()):
            if lk.failures and lk.answer is None:
                st = "failing"
            elif lk.failures:
                st = "stale"                  # failing, serving the last good answer
            elif lk.answer is None:
                st = "pending"
            else:
                st = "ok"
            ans = lk.answer
            lookups.append({
                "service": f"{ns}/{name}", "query": str(lk.query), "state": st,
                "rcode": ans.rcode if ans else None,
                "targets": [t.ip if t.port is None else f"{t.ip}:{t.port} weight={t.weight}"
                            for t in ans.targets] if ans else [],
                "ttl": ans.ttl if ans else None,
                "answerAge": round(now - lk.answered_at, 3) if lk.answered_at is not None else None,
                "nextRefreshIn": None if lk.inflight else round(max(0.0, lk.due - now), 3),
                "failures": lk.failures, "lastError": lk.last_error,
                "slices": sorted(lk.slices),
            })
        return {"servers": [f"{h}:{p}" for h, p in self.servers] if self.servers else "system",
                "minTtl": self.min_ttl, "maxTtl": self.max_ttl, "up": self._up(),
                "lookups": lookups, "problems": sorted(self._problems.values())}

    # -- scheduling ---------------------------------------------------------------------------

    def _schedule(self, lk: _Lookup, delay: float) -> None:
        lk.gen += 1
        lk.due = self._clock() + delay
        heapq.heappush(self._heap, (lk.due, next(self._seq), lk.key, lk.gen))
        if len(self._heap) > 2 * len(self._lookups) + 64:
            # Stale entries (lookups replaced or removed) are normally dropped when they come
            # due; compact when they pile up (services re-annotated in a loop).
            self._heap = [(x.due, next(self._seq), x.key, x.gen) for x in self._lookups.values()
                          if not x.inflight]
            heapq.heapify(self._heap)
        if self._heap and self._heap[0][2] == lk.key and self._heap[0][3] == lk.gen:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                _, _, key, gen = heapq.heappop(self._heap)
                lk = self._lookups.get(key)
                if lk is None or lk.gen != gen or lk.inflight:
                    continue
                lk.inflight = True
                task = asyncio.get_running_loop().create_task(self._refresh(lk))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            self._wake.clear()
            timer = None
            if self._heap:
                loop = self._loop or asyncio.get_running_loop()
                timer = loop.call_later(self._heap[0][0] - now, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _refresh(self, lk: _Lookup) -> None:
        try:
            assert self._sem is not None
            async with self._sem:
                outcome = await self._resolve(lk)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in one lookup must not stop the others: count it as failed
            log.exception("DNS lookup %s for Service/%s/%s failed unexpectedly", lk.query, *lk.key)
            outcome = Failure(f"internal error: {exc!r}")
        finally:
            lk.inflight = False
        if self._closed or self._lookups.get(lk.key) is not lk:
            return                      # the service went away or asks for another name now
        self._apply(lk, outcome)

    async def _resolve(self, lk: _Lookup) -> Answer | Failure:
        q = lk.query
        if q.mode == "IP":
            return Answer((Target(q.name),), None, "NOERROR")
        if q.mode == "SRV":
            return await _resolve_srv(self.resolver, q.name)
        return await _resolve_host(self.resolver, q.name, lk.answer)

    def _apply(self, lk: _Lookup, outcome: Answer | Failure) -> None:
        events: list[Event] = []
        ref = f"Service/{lk.key[0]}/{lk.key[1]}"
        if isinstance(outcome, Failure):
            lk.failures += 1
            lk.last_error = outcome.reason
            if lk.failures == 1:
                log.warning("%s: DNS %s failed (%s); %s", ref, lk.query, outcome.reason,
                            "keeping the last good answer" if lk.answer else "no answer yet")
            if lk.answer is None and lk.slices:
                # Slices left from the name this service asked for before: not ours to keep.
                events = self._set_slices(lk, EMPTY_ANSWER)
            delay = self._backoff(lk.failures)
        else:
            if outcome.partial:
                lk.failures += 1
                lk.last_error = "one address family failed; its last good addresses kept"
                delay = self._backoff(lk.failures)
            else:
                if lk.failures:
                    log.info("%s: DNS %s answers again after %d failed lookups", ref, lk.query, lk.failures)
                lk.failures = 0
                lk.last_error = None
                delay = self._clamp(outcome.ttl)
            lk.answer = outcome
            lk.answered_at = self._clock()
            events = self._set_slices(lk, outcome)
        if lk.failures:
            self._failing.add(lk.key)
        else:
            self._failing.discard(lk.key)
        self._schedule(lk, delay)
        self._update_up()
        if events:
            self._send(events)

    def _set_slices(self, lk: _Lookup, answer: Answer) -> list[Event]:
        new = build_slices(lk.svc, answer, lk.query)
        events = slice_events(lk.slices, new)
        lk.slices = new
        return events

    def _send(self, events: list[Event]) -> None:
        try:
            self._emit(events)
        except Exception:  # the consumer's bug must not stop lookups; the next change retries
            log.exception("delivering %d DNS endpoint events failed", len(events))

    def _clamp(self, ttl: float | None) -> float:
        if ttl is None:
            return self.max_ttl
        return min(self.max_ttl, max(self.min_ttl, ttl))

    def _backoff(self, failures: int) -> float:
        # Exponential from _BACKOFF_BASE, capped at min_ttl: a failing name is retried at least
        # as often as a healthy one with the shortest TTL. Jitter spreads a resolver outage's
        # retries of many names.
        cap = self.min_ttl
        return min(cap, _BACKOFF_BASE * 2 ** min(failures - 1, 16)) * random.uniform(0.8, 1.0)

    def _up(self) -> bool:
        return not self._failing

    def _update_up(self) -> None:
        if self._task is None:
            return
        self.signals.source_up(self.name, self._up())


def _annotation_of(svc: Service) -> str:
    ann = svc.meta.annotations
    if ANN_DNS_SRV in ann:
        return f"metadata.annotations[{ANN_DNS_SRV}]"
    if ANN_DNS in ann:
        return f"metadata.annotations[{ANN_DNS}]"
    return "spec.externalName"


def parse_servers(values: Iterable[str]) -> list[tuple[str, int]]:
    """``--dns-server HOST[:PORT]`` values -> [(host, port)]; port 53 when left out."""
    out = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            host, _, rest = v[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else "53"
        elif v.count(":") == 1:
            host, _, port = v.partition(":")
        else:
            host, port = v, "53"         # a bare IPv6 address or a bare host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--dns-server {v!r}: {host!r} is not an IP address") from None
        if not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"--dns-server {v!r}: port must be 1-65535")
        out.append((host, int(port)))
    return out
