"""Passive outlier detection: eject endpoints that keep failing, as Envoy's consecutive-5xx
detector does (arch overview "Outlier detection"; ``OutlierDetection`` proto defaults).

How to call it (the data plane owns one ``OutlierDetector`` per process, beside the balancers)::

    candidates = detector.filter(backend)           # instead of backend.usable, before pick()
    ...
    detector.report(backend.key, ep.addr, ok)       # after every attempt on ep
    detector.sync(snapshot.backends.values())      # on every publish: forget endpoints gone

``filter`` also records which endpoints a backend has (the ejection cap needs it), so report
after filter, as a request naturally does.
What counts as a failure (``ok=False``):
- L4: the connect to the endpoint failed (refused, timed out, unreachable); a connect that
  succeeds is a success, whatever happens to the bytes later;
- L7: connect failure, the upstream reset or closed the connection before a complete response,
  the upstream timed out (Envoy maps that to a locally generated 504, which counts), or the
  response status is 5xx. Any other complete response is a success (4xx included: that is the
  client's fault, not the endpoint's).

Rules:
- ``consecutive`` failures in a row (default 5) eject the endpoint; any success resets the run.
  Failures reported while ejected do not count (in-flight requests finishing, panic traffic);
- an ejection lasts ``base_ejection`` × the endpoint's ejection multiplier, capped at
  ``max_ejection`` (Envoy ``max_ejection_time``, 300 s). The multiplier grows by one per
  ejection and decays by one per ``interval`` (10 s) the endpoint spends un-ejected — Envoy's
  behaviour since 1.18, computed lazily here instead of by a periodic sweep;
- an endpoint is not ejected when that would put more than ``max_ejection_percent`` of the
  backend's endpoints out (counting those already ejected). Unlike Envoy, which always allows
  the first ejection of a cluster, the cap is strict: the one endpoint of a one-endpoint
  backend is never ejected (panic mode would send it traffic anyway);
- ``filter(backend)`` returns ``backend.usable`` minus ejected endpoints — or all of
  ``backend.usable`` when fewer than ``panic_threshold`` % of them would be left (panic mode:
  spreading load over sick endpoints beats piling it onto a few survivors). The denominator is
  ``usable``, not every known endpoint: Kubernetes readiness is authoritative, so panic never
  sends traffic to a pod that is not ready;
- an ejection is per endpoint address, for every backend that contains it (the same pod port
  behind two services is the same process); the cap is checked in the backend that reported
  the failure.

Invariants kept here:
- ``_hosts`` holds only addresses that failed at least once and are still in some backend
  (``sync`` prunes the rest), so success reports on healthy endpoints allocate nothing;
- ``_members[backend key]`` is the (``usable`` tuple, its address set) last seen by ``filter``
  or ``sync``; it is rebuilt only when the tuple object changes (snapshots share unchanged ones);
- ``_ejected`` maps an address to the end of its ejection; expired entries are removed (and
  the host's failure run reset) the first time anything looks at the time after
  ``_next_expiry``; with nothing ejected ``filter`` is one dict truthiness test.
Pure logic with an injectable clock; no I/O, no asyncio.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

from discovery.endpoints import Endpoint

from . import metrics

__all__ = ["OutlierDetector"]

Addr = tuple[str, int]
BackendKey = tuple[str, str, str]


class _Host:
    __slots__ = ("failures", "multiplier", "last_end", "ejections")

    def __init__(self) -> None:
        self.failures = 0          # consecutive failures since the last success / ejection
        self.multiplier = 0        # Envoy's ejection-time multiplier, before decay
        self.last_end = 0.0        # when the last ejection ended (decay counts from here)
        self.ejections = 0         # ejections in all, for /debug


class OutlierDetector:
    def __init__(self, consecutive: int = 5, base_ejection: float = 30.0, max_ejection_percent: float = 50,
                 panic_threshold: float = 50, *, max_ejection: float = 300.0, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consecutive = max(1, consecutive)
        self.base_ejection = base_ejection
        self.max_ejection_percent = max_ejection_percent
        self.panic_threshold = panic_threshold
        self.max_ejection = max(max_ejection, base_ejection)
        self.interval = interval
        self._clock = clock
        # The multiplier stops growing once base × multiplier reaches the cap, so a host that
        # recovers needs at most this many intervals to decay back (Envoy does the same).
        self._max_multiplier = max(1, math.ceil(self.max_ejection / base_ejection)) if base_ejection > 0 else 1
        self._hosts: dict[Addr, _Host] = {}
        self.version = 0      # changes whenever the ejected set does (callers cache filter results)
        self._ejected: dict[Addr, float] = {}           # addr -> ejected until
        self._next_expiry = math.inf
        self._members: dict[BackendKey, tuple[tuple[Endpoint, ...], frozenset[Addr]]] = {}
        self._labels: dict[BackendKey, object] = {}     # metric children, looked up once

    # -- input ----------------------------------------------------------------------------------

    def report(self, backend_key: BackendKey, addr: Addr, ok: bool) -> bool:
        """Record one attempt's outcome; return True when it ejected ``addr``."""
        if ok:
            host = self._hosts.get(addr)
            if host is not None:
                host.failures = 0
            return False
        host = self._hosts.get(addr)
        if host is None:
            host = self._hosts[addr] = _Host()
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        if addr in self._ejected:
            return False
        host.failures += 1
        if host.failures < self.consecutive:
            return False
        if not self._may_eject(backend_key, addr):
            # Stay at the threshold: the next failure tries again (another endpoint may have
            # come back by then). Envoy only tries at exactly N; retrying is kinder to the cap.
            return False
        self._eject(backend_key, addr, host, now)
        return True

    def sync(self, backends: Iterable) -> None:
        """Learn each backend's endpoints (for the ejection cap) and forget addresses that are in
        no backend any more. Call with ``snapshot.backends.values()`` on every publish."""
        members: dict[BackendKey, tuple[tuple[Endpoint, ...], frozenset[Addr]]] = {}
        everywhere: set[Addr] = set()
        for b in backends:
            old = self._members.get(b.key)
            if old is not None and old[0] is b.usable:
                members[b.key] = old
            else:
                members[b.key] = (b.usable, frozenset(e.addr for e in b.usable))
            everywhere.update(e.addr for e in b.endpoints)
        self._members = members
        for addr in [a for a in self._hosts if a not in everywhere]:
            del self._hosts[addr]
            if self._ejected.pop(addr, None) is not None:
                self.version += 1
        for key in [k for k in self._labels if k not in members]:
            del self._labels[key]

    def sync_changes(self, changed: Iterable, removed: Iterable[BackendKey],
                     is_live: Callable[[Addr], bool]) -> None:
        """Incremental ``sync``: only backends whose objects changed, the keys of removed ones,
        and a membership test for "this address is still in some backend"."""
        for b in changed:
            old = self._members.get(b.key)
            if old is None or old[0] is not b.usable:
                self._members[b.key] = (b.usable, frozenset(e.addr for e in b.usable))
        for key in removed:
            self._members.pop(key, None)
            self._labels.pop(key, None)
        for addr in [a for a in self._hosts if not is_live(a)]:
            del self._hosts[addr]
            if self._ejected.pop(addr, None) is not None:
                self.version += 1

    # -- queries --------------------------------------------------------------------------------

    def expire_due(self) -> None:
        """End the ejections whose time is up (bumps ``version`` when any ends)."""
        if self._ejected and self._clock() >= self._next_expiry:
            self._expire(self._clock())

    def ejected(self, addr: Addr) -> bool:
        if not self._ejected:
            return False
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        return addr in self._ejected

    def filter(self, backend, local_only: bool = False) -> tuple[Endpoint, ...]:
        """The endpoints of ``backend`` to balance over: ``usable`` (``local`` with
        ``local_only``) minus ejected ones — or all of them in panic mode. Returns the
        backend's own tuple when nothing in it is ejected, so balancer tables keyed by tuple
        identity keep working."""
        usable = backend.usable
        entry = self._members.get(backend.key)
        if entry is None or entry[0] is not usable:
            self._members[backend.key] = (usable, frozenset(e.addr for e in usable))
        cands = backend.local if local_only else usable
        if not self._ejected:
            return cands
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
            if not self._ejected:
                return cands
        ejected = self._ejected
        keep = tuple(e for e in cands if e.addr not in ejected)
        n = len(cands)
        if len(keep) == n:
            return cands
        if len(keep) * 100 < self.panic_threshold * n:
            return cands           # panic: too few healthy ones left to carry the load
        return keep

    def panic(self, backend) -> bool:
        """True when ``filter(backend)`` ignores ejections because too few would be left."""
        usable = backend.usable
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        if not usable or not self._ejected:
            return False
        left = sum(1 for e in usable if e.addr not in self._ejected)
        return left < len(usable) and left * 100 < self.panic_threshold * len(usable)

    def state(self) -> dict:
        """JSON for /debug: configuration, ejected endpoints, endpoints on a failure run."""
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        ejected = []
        for addr, until in sorted(self._ejected.items()):
            h = self._hosts.get(addr)
            ejected.append({"address": _fmt(addr), "remaining": round(until - now, 3),
                            "multiplier": h.multiplier if h else 0, "ejections": h.ejections if h else 0})
        failing = [{"address": _fmt(a), "consecutiveFailures": h.failures}
                   for a, h in sorted(self._hosts.items()) if h.failures and a not in self._ejected]
        return {"consecutive": self.consecutive, "baseEjection": self.base_ejection,
                "maxEjection": self.max_ejection, "maxEjectionPercent": self.max_ejection_percent,
                "panicThreshold": self.panic_threshold, "ejected": ejected, "failing": failing}

    # -- internals ------------------------------------------------------------------------------

    def _may_eject(self, backend_key: BackendKey, addr: Addr) -> bool:
        entry = self._members.get(backend_key)
        members = entry[1] if entry is not None else frozenset((addr,))
        if addr not in members:
            members = members | {addr}
        out = sum(1 for a in members if a in self._ejected)
        return (out + 1) * 100 <= self.max_ejection_percent * len(members)

    def _eject(self, backend_key: BackendKey, addr: Addr, host: _Host, now: float) -> None:
        # Lazy form of Envoy's sweep: one decrement per whole interval spent un-ejected.
        if host.multiplier and self.interval > 0:
            host.multiplier = max(0, host.multiplier - int((now - host.last_end) // self.interval))
        host.multiplier = min(host.multiplier + 1, self._max_multiplier)
        host.ejections += 1
        host.failures = 0
        until = now + min(self.base_ejection * host.multiplier, self.max_ejection)
        self._ejected[addr] = until
        self.version += 1
        if until < self._next_expiry:
            self._next_expiry = until
        child = self._labels.get(backend_key)
        if child is None:
            child = self._labels[backend_key] = metrics.outlier_ejections.labels(backend_key[0], backend_key[1])
        child.inc()  # type: ignore[attr-defined]

    def _expire(self, now: float) -> None:
        nxt = math.inf
        for addr, until in list(self._ejected.items()):
            if until <= now:
                del self._ejected[addr]
                self.version += 1
                host = self._hosts.get(addr)
                if host is not None:
                    host.failures = 0      # back in service with a clean run
                    host.last_end = until
            elif until < nxt:
                nxt = until
        self._next_expiry = nxt


def _fmt(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
