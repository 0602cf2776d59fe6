"""Endpoint choice for L4 connections and L7 requests, and the live state it needs.

``Balancers.pick(backend, client_ip)`` chooses one endpoint among the backend's candidates
(``backend.usable``, or ``backend.local`` for traffic policy Local) minus an ``exclude`` set
(endpoints a retry already failed on), by ``backend.policy``:

==================  ==========================================================  ===========
policy              rule                                                        cost
==================  ==========================================================  ===========
random              uniform (kube-proxy's iptables/IPVS default behaviour)      O(1)
round_robin         per backend-key counter                                     O(1)
least_connections   fewest active (acquired, not released) connections;         O(1)
                    ties in the order endpoints last changed count
p2c                 two distinct random candidates, the less loaded wins        O(1)
ring_hash           ketama-style ring over ``hash_key`` or the client IP        O(log n)
maglev              Maglev lookup table (Eisenbud et al., NSDI '16)             O(1)
==================  ==========================================================  ===========

**Weights.** An endpoint carries ``weight`` (SRV weight from the DNS source; 1 otherwise).
When a backend's weights are not all equal (``backend.weighted``, computed once when the
snapshot is built) every policy honours them; otherwise the table above applies unchanged and
a pick costs one flag test more. Weighted rules (tables per candidate tuple, built once):

==================  ==========================================================  ===========
random              weighted random: bisect over cumulative weights             O(log n)
round_robin         interleaved schedule, each endpoint ``weight`` times per    O(1)
                    cycle, spread evenly (positions (k + 1/2) / w, merged)
least_connections   lowest ``active / weight``; ties by weighted random         O(n)
p2c                 two weighted-random draws, lower ``active / weight`` wins   O(log n)
ring_hash           points proportional to weight: 200 for the lightest         O(log n)
                    weight > 0, >= 1 each, 2^18 in all at most
maglev              weighted Maglev population (Envoy's): the heaviest          O(1)
                    endpoint claims a slot every round, others in proportion
==================  ==========================================================  ===========

Weight 0 (RFC 2782: "very small chance of being selected") counts as 1/100 of weight 1
(effective weights ``100 * w``, and 1 for ``w = 0``): such an endpoint still gets a trickle of
new traffic when others have weight, and an even share when every weight is 0.

With ``backend.affinity_timeout`` set (Service ``sessionAffinity: ClientIP``) a client IP is
pinned to the endpoint it got first (under the default ``random`` policy that first choice is
a consistent hash of the client IP, so separate processes pin a client alike); the pin holds while that endpoint stays a candidate and
the client keeps coming back within the timeout (kube-proxy semantics: the timer counts from
the *last* use, like iptables ``recent --rcheck --seconds``); otherwise a new endpoint is
chosen by the policy and pinned.

Invariants kept here (everything outside the immutable snapshot lives in this object):

- ``active[addr]`` is the number of ``acquire(ep)`` calls not yet matched by ``release(ep)``;
  an address with count 0 has no entry, so the map is bounded by open connections and
  survives snapshot swaps untouched (a draining connection releases into the same map).
- Per-candidate-tuple tables (hash ring, Maglev table, least-connections buckets, address
  index) are keyed by the tuple's *identity*: the snapshot builder reuses unchanged tuples,
  so a table is built once per endpoint-set change. ``on_snapshot`` keeps only the tables of
  tuples the new snapshot still holds; a cap bounds tuples that come from elsewhere.
- The least-connections buckets of every cached tuple that holds an address are moved on each
  acquire/release of that address, so they always agree with ``active``.
- Affinity pins, round-robin counters and failure counts of backends or endpoints that left
  the snapshot are dropped in ``on_snapshot``; expired pins are swept when the pin table has
  doubled since the last sweep (amortised O(1)), so memory stays bounded by live clients.

All methods are synchronous and meant for the one event-loop thread that owns the object.
Hashes are stable across processes (blake2b, not ``hash()``), so workers and node proxies
with the same endpoints agree on consistent-hash choices.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random as _random
import time
from collections.abc import Callable, Iterable
from itertools import accumulate
from math import gcd

from discovery.endpoints import Endpoint

from .outlier import OutlierDetector
from .settings import Settings
from .snapshot import Backend, Snapshot

__all__ = ["MAGLEV_SIZES", "Balancers", "stable_hash"]

Addr = tuple[str, int]

# Ring points per endpoint: a constant, so adding or removing one endpoint leaves every other
# endpoint's points where they were (only ~1/n of the keys move). 200 points keep the load
# spread within a few per cent (ketama uses 160); the cap bounds huge services.
_RING_POINTS_PER_ENDPOINT = 200
_RING_MAX_POINTS = 1 << 18

# Maglev table sizes: primes; the table must be prime and >> n (the paper uses M >= 100 n for
# < 1 % imbalance). Small tables keep the O(M) build cheap for the common small service.
MAGLEV_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)

# Rejection sampling under ``exclude``: a few draws, then one O(n) filtered pass. ``exclude``
# holds the endpoints a connection already failed on (<= retries), so draws rarely miss.
_DRAWS = 8

# Bound on cached per-tuple tables: snapshot tuples are pruned in on_snapshot; this only
# bounds tuples a caller built itself (tests, ad-hoc backends).
_MAX_TABLES = 4096

# Effective weight of an SRV weight w: 100 * w, and 1 for w = 0 — a weight-0 endpoint gets 1 %
# of what a weight-1 endpoint gets (RFC 2782: "a very small chance of being selected").
_WEIGHT_SCALE = 100

# Weighted round-robin schedules longer than this are scaled down (each endpoint keeps >= 1
# slot): the schedule is one list of endpoint indices per candidate tuple.
_SCHEDULE_MAX = 4096


def stable_hash(data: bytes) -> int:
    """64-bit hash that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _ep_name(ep: Endpoint) -> bytes:
    return f"{ep.ip}:{ep.port}".encode()


class _Ring:
    """Consistent-hash ring: sorted points, each owned by an endpoint index."""
    __slots__ = ("owners", "points")

    def __init__(self, cands: tuple[Endpoint, ...], eff: list[int] | None = None) -> None:
        per = min(_RING_POINTS_PER_ENDPOINT, max(1, _RING_MAX_POINTS // len(cands)))
        scale = 0.0
        if eff is not None:
            # Weighted: points in proportion to weight; the lightest endpoint of weight > 0
            # (effective weight >= _WEIGHT_SCALE) gets the usual 200, within the overall cap;
            # every endpoint at least one. Point r of an endpoint is the same hash whatever
            # its count, so a weight change adds or removes only that endpoint's points.
            scale = _RING_POINTS_PER_ENDPOINT / min(x for x in eff if x >= _WEIGHT_SCALE)
            scale = min(scale, _RING_MAX_POINTS / sum(eff))
        pts: list[tuple[int, int]] = []
        for i, ep in enumerate(cands):
            name = _ep_name(ep)
            count = per if eff is None else max(1, round(eff[i] * scale))
            for r in range(count):
                pts.append((stable_hash(name + b"_" + str(r).encode()), i))
        pts.sort()
        self.points = [p for p, _ in pts]
        self.owners = [i for _, i in pts]

    def lookup(self, h: int, cands: tuple[Endpoint, ...], exclude: frozenset[Addr]) -> Endpoint | None:
        points, owners = self.points, self.owners
        size = len(points)
        i = bisect.bisect_left(points, h)
        # Walk clockwise past excluded owners; at most every point once.
        for step in range(size):
            ep = cands[owners[(i + step) % size]]
            if ep.addr not in exclude:
                return ep
        return None


class _Maglev:
    """Maglev lookup table: ``table[h % M]`` is an endpoint index; each endpoint owns ~M/n slots
    and removing one endpoint moves little more than its own slots."""
    __slots__ = ("table",)

    def __init__(self, cands: tuple[Endpoint, ...], eff: list[int] | None = None) -> None:
        n = len(cands)
        m = next((s for s in MAGLEV_SIZES if s >= 100 * n), MAGLEV_SIZES[-1])
        offsets, skips = [], []
        for ep in cands:
            name = _ep_name(ep)
            offsets.append(stable_hash(b"o" + name) % m)
            skips.append(stable_hash(b"s" + name) % (m - 1) + 1)
        nxt = [0] * n
        table = [-1] * m
        filled = 0
        if eff is not None:
            self.table = self._weighted(offsets, skips, eff, m)
            return
        # The paper's population loop: endpoints take turns claiming their next preferred slot.
        while True:
            for i in range(n):
                off, skip, j = offsets[i], skips[i], nxt[i]
                c = (off + j * skip) % m
                while table[c] >= 0:
                    j += 1
                    c = (off + j * skip) % m
                table[c] = i
                nxt[i] = j + 1
                filled += 1
                if filled == m:
                    self.table = table
                    return

    @staticmethod
    def _weighted(offsets: list[int], skips: list[int], eff: list[int], m: int) -> list[int]:
        """Weighted population (as Envoy does it): in round r endpoint i claims its next
        preferred slot while ``r * eff[i] >= claims[i] * max(eff)`` — the heaviest endpoint
        every round, one of a third the weight every third round, every endpoint at least once.
        A heap of (next eligible round, index) visits claims in the same (round, index) order
        as the plain double loop, in O(M log n) instead of O(rounds * n)."""
        top = max(eff)
        nxt = [0] * len(eff)
        target = [0] * len(eff)
        table = [-1] * m
        heap = [(0, i) for i in range(len(eff))]
        for _ in range(m):
            rnd, i = heapq.heappop(heap)
            off, skip, j = offsets[i], skips[i], nxt[i]
            c = (off + j * skip) % m
            while table[c] >= 0:
                j += 1
                c = (off + j * skip) % m
            table[c] = i
            nxt[i] = j + 1
            target[i] += top
            heapq.heappush(heap, (-(-target[i] // eff[i]), i))
        return table

    def lookup(self, h: int, cands: tuple[Endpoint, ...], exclude: frozenset[Addr]) -> Endpoint | None:
        table = self.table
        m = len(table)
        i = h % m
        for step in range(m):
            ep = cands[table[(i + step) % m]]
            if ep.addr not in exclude:
                return ep
        return None


class _LeastConn:
    """Candidates bucketed by active count, for O(1) least-connections choice.

    Counts move by +-1 only, so the minimum moves by at most one per change. Inside a bucket
    the order is the order endpoints arrived there, which rotates ties fairly."""
    __slots__ = ("buckets", "min")

    def __init__(self, cands: tuple[Endpoint, ...], active: dict[Addr, int]) -> None:
        self.buckets: dict[int, dict[Addr, None]] = {}
        for ep in cands:
            self.buckets.setdefault(active.get(ep.addr, 0), {})[ep.addr] = None
        self.min = min(self.buckets) if self.buckets else 0

    def move(self, addr: Addr, old: int, new: int) -> None:
        b = self.buckets.get(old)
        if b is None or addr not in b:
            return
        del b[addr]
        if not b:
            del self.buckets[old]
        self.buckets.setdefault(new, {})[addr] = None
        if new < self.min or old == self.min and old not in self.buckets:
            self.min = new

    def choose(self, exclude: frozenset[Addr]) -> Addr | None:
        b = self.buckets.get(self.min)
        if b is not None:
            for addr in b:
                if addr not in exclude:
                    return addr
        # Every least-loaded endpoint is excluded (a retry): look at the next counts up.
        for count in sorted(self.buckets):
            for addr in self.buckets[count]:
                if addr not in exclude:
                    return addr
        return None


class _Weights:
    """Effective weights of one candidate tuple, for the weighted policies."""
    __slots__ = ("cum", "eff", "equal", "schedule", "total")

    def __init__(self, cands: tuple[Endpoint, ...]) -> None:
        self.eff = [ep.weight * _WEIGHT_SCALE if ep.weight > 0 else 1 for ep in cands]
        self.equal = len(set(self.eff)) <= 1     # e.g. the ready subset of a weighted backend
        self.cum = list(accumulate(self.eff))
        self.total = self.cum[-1] if self.cum else 0
        self.schedule: list[int] | None = None

    def index(self, r: int) -> int:
        """The endpoint index that owns ``r`` in ``[0, total)``."""
        return bisect.bisect_right(self.cum, r)

    def build_schedule(self) -> list[int]:
        """Round-robin cycle: endpoint i appears c_i times (c proportional to eff, reduced by
        their gcd, scaled down to at most _SCHEDULE_MAX + n entries with c_i >= 1), at
        positions (k + 1/2) / c_i merged in order, so heavy endpoints are interleaved with
        light ones rather than bunched (weights 1:3 give B A B B)."""
        eff = self.eff
        g = 0
        for x in eff:
            g = gcd(g, x)
        counts = [x // g for x in eff]
        if sum(counts) > _SCHEDULE_MAX:
            counts = [max(1, round(x * _SCHEDULE_MAX / self.total)) for x in eff]
        pos = sorted(((k + 0.5) / c, i) for i, c in enumerate(counts) for k in range(c))
        self.schedule = [i for _, i in pos]
        return self.schedule


class _Tables:
    """What is cached per candidate tuple: address index and the lazily built policy tables."""
    __slots__ = ("by_addr", "cands", "lc", "maglev", "ring", "weights")

    def __init__(self, cands: tuple[Endpoint, ...]) -> None:
        self.cands = cands           # held so id(cands) cannot be reused while cached
        self.by_addr = {ep.addr: ep for ep in cands}
        self.ring: _Ring | None = None
        self.maglev: _Maglev | None = None
        self.lc: _LeastConn | None = None
        self.weights: _Weights | None = None


class Balancers:
    __slots__ = (
        "_affinity",
        "_affinity_swept",
        "_clock",
        "_lc_by_addr",
        "_rng",
        "_rr",
        "_tables",
        "active",
        "failures",
        "settings",
        "outlier",
        "_filtered",
        "_prev_backends",
        "_addr_refs",
    )

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 rng: _random.Random | None = None) -> None:
        self.settings = settings
        self.active: dict[Addr, int] = {}
        # Consecutive failures per endpoint (connect refused / timed out, upstream reset):
        # the passive-health hook. Outlier ejection will read it; choice ignores it for now.
        self.failures: dict[Addr, int] = {}
        self._clock = clock
        self._rng = rng or _random.Random()
        self._rr: dict[tuple[str, str, str], int] = {}
        self._affinity: dict[tuple[tuple[str, str, str], str], tuple[Addr, float]] = {}
        self._affinity_swept = 0
        self._tables: dict[int, _Tables] = {}
        self._lc_by_addr: dict[Addr, list[_LeastConn]] = {}
        # Passive outlier detection (Envoy's consecutive-failure ejection, panic mode).
        self.outlier = OutlierDetector()
        # (backend key, local_only) -> (source tuple, outlier version, filtered tuple): keeps the
        # filtered tuple identical while the ejected set is unchanged, so hash tables stay cached.
        self._filtered: dict[tuple, tuple] = {}
        self._prev_backends: dict[tuple[str, str, str], Backend] = {}
        self._addr_refs: dict[Addr, int] = {}     # endpoint address -> backends that list it

    # -- choice -------------------------------------------------------------------------------

    def pick(self, backend: Backend, client_ip: str | None, local_only: bool = False,
             exclude: frozenset[Addr] = frozenset(), hash_key: bytes | None = None,
             policy: str | None = None) -> Endpoint | None:
        """``policy`` overrides ``backend.policy`` (L7 passes ``backend.l7_policy``).
        Endpoints ejected by outlier detection are left out (all of them in panic mode)."""
        cands = backend.local if local_only else backend.usable
        if self.outlier.version:
            cands = self._without_ejected(backend, cands, local_only)
        n = len(cands)
        if n == 0:
            return None
        timeout = backend.affinity_timeout
        if timeout and client_ip is not None:
            return self._pick_affine(backend, cands, client_ip, exclude, hash_key, timeout, policy)
        return self._choose(backend, cands, client_ip, exclude, hash_key, policy)

    def _without_ejected(self, backend: Backend, cands: tuple[Endpoint, ...], local_only: bool) -> tuple[Endpoint, ...]:
        key = (backend.key, local_only)
        self.outlier.expire_due()
        hit = self._filtered.get(key)
        if hit is not None and hit[0] is cands and hit[1] == self.outlier.version:
            return hit[2]
        out = self.outlier.filter(backend, local_only)
        self._filtered[key] = (cands, self.outlier.version, out)
        return out

    def _pick_affine(self, backend: Backend, cands: tuple[Endpoint, ...], client_ip: str,
                     exclude: frozenset[Addr], hash_key: bytes | None, timeout: int,
                     policy: str | None = None) -> Endpoint | None:
        now = self._clock()
        key = (backend.key, client_ip)
        pin = self._affinity.get(key)
        if pin is not None and pin[1] > now and pin[0] not in exclude:
            ep = self._tables_for(cands).by_addr.get(pin[0])
            if ep is not None:
                self._affinity[key] = (pin[0], now + timeout)
                return ep
        eff = policy or backend.policy
        if eff == "random":
            # A new pin under the default policy comes from a consistent hash of the client IP
            # instead of a die roll: just as uniform over clients, and every process (workers
            # behind SO_REUSEPORT, the node proxies of a cluster) pins a client to the same
            # endpoint without sharing the table.
            eff = "maglev"
        ep = self._choose(backend, cands, client_ip, exclude, hash_key, eff)
        if ep is not None:
            self._affinity[key] = (ep.addr, now + timeout)
            if len(self._affinity) > 2 * self._affinity_swept + 1024:
                self._sweep_affinity(now)
        return ep

    def _choose(self, backend: Backend, cands: tuple[Endpoint, ...], client_ip: str | None,
                exclude: frozenset[Addr], hash_key: bytes | None,
                policy: str | None = None) -> Endpoint | None:
        policy = policy or backend.policy
        n = len(cands)
        if backend.weighted and n > 1:
            t = self._tables_for(cands)
            w = t.weights
            if w is None:
                w = t.weights = _Weights(cands)
            if not w.equal:
                return self._choose_weighted(backend, cands, t, w, client_ip, exclude, hash_key, policy)
        if policy == "random" or n == 1:
            return self._random(cands, exclude)
        if policy == "round_robin":
            i = self._rr.get(backend.key, 0)
            for step in range(n):
                ep = cands[(i + step) % n]
                if ep.addr not in exclude:
                    self._rr[backend.key] = (i + step + 1) % n
                    return ep
            return None
        if policy == "least_connections":
            t = self._tables_for(cands)
            if t.lc is None:
                t.lc = _LeastConn(cands, self.active)
                for ep in cands:
                    self._lc_by_addr.setdefault(ep.addr, []).append(t.lc)
            addr = t.lc.choose(exclude)
            return None if addr is None else t.by_addr[addr]
        if policy == "p2c":
            rnd = self._rng.randrange
            active = self.active
            for _ in range(_DRAWS):
                a = rnd(n)
                b = rnd(n - 1)
                if b >= a:
                    b += 1
                ea, eb = cands[a], cands[b]
                xa, xb = ea.addr in exclude, eb.addr in exclude
                if xa and xb:
                    continue
                if xa:
                    return eb
                if xb:
                    return ea
                return eb if active.get(eb.addr, 0) < active.get(ea.addr, 0) else ea
            return self._least_of([e for e in cands if e.addr not in exclude])
        if policy in ("ring_hash", "maglev"):
            if hash_key is None:
                if client_ip is None:
                    return self._random(cands, exclude)
                hash_key = client_ip.encode()
            h = stable_hash(hash_key)
            t = self._tables_for(cands)
            if policy == "ring_hash":
                if t.ring is None:
                    t.ring = _Ring(cands)
                return t.ring.lookup(h, cands, exclude)
            if t.maglev is None:
                t.maglev = _Maglev(cands)
            return t.maglev.lookup(h, cands, exclude)
        # Unknown policy names are rejected when the snapshot is built; be safe anyway.
        return self._random(cands, exclude)

    def _choose_weighted(self, backend: Backend, cands: tuple[Endpoint, ...], t: _Tables, w: _Weights,
                         client_ip: str | None, exclude: frozenset[Addr], hash_key: bytes | None,
                         policy: str) -> Endpoint | None:
        """``_choose`` for a candidate tuple whose weights differ (see the module docstring)."""
        if policy == "round_robin":
            sched = w.schedule or w.build_schedule()
            size = len(sched)
            i = self._rr.get(backend.key, 0) % size
            for step in range(size):
                ep = cands[sched[(i + step) % size]]
                if ep.addr not in exclude:
                    self._rr[backend.key] = (i + step + 1) % size
                    return ep
            return None
        if policy == "least_connections":
            return self._weighted_least(cands, w.eff, exclude)
        if policy == "p2c":
            rnd, total, index = self._rng.randrange, w.total, w.index
            active = self.active
            eff = w.eff
            for _ in range(_DRAWS):
                a, b = index(rnd(total)), index(rnd(total))
                ea, eb = cands[a], cands[b]
                xa, xb = ea.addr in exclude, eb.addr in exclude
                if xa and xb:
                    continue
                if xa:
                    return eb
                if xb or a == b:
                    return ea
                # active / weight, cross-multiplied; a tie keeps the first draw, which is
                # weight-proportional, so idle endpoints share by weight too.
                return eb if active.get(eb.addr, 0) * eff[a] < active.get(ea.addr, 0) * eff[b] else ea
            return self._weighted_least(cands, eff, exclude)
        if policy in ("ring_hash", "maglev"):
            if hash_key is None:
                if client_ip is None:
                    return self._weighted_random(cands, w, exclude)
                hash_key = client_ip.encode()
            h = stable_hash(hash_key)
            if policy == "ring_hash":
                if t.ring is None:
                    t.ring = _Ring(cands, w.eff)
                return t.ring.lookup(h, cands, exclude)
            if t.maglev is None:
                t.maglev = _Maglev(cands, w.eff)
            return t.maglev.lookup(h, cands, exclude)
        return self._weighted_random(cands, w, exclude)

    def _weighted_random(self, cands: tuple[Endpoint, ...], w: _Weights,
                         exclude: frozenset[Addr]) -> Endpoint | None:
        rnd, total, index = self._rng.randrange, w.total, w.index
        if not exclude:
            return cands[index(rnd(total))]
        for _ in range(_DRAWS):
            ep = cands[index(rnd(total))]
            if ep.addr not in exclude:
                return ep
        return self._weighted_among([(e, x) for e, x in zip(cands, w.eff) if e.addr not in exclude])

    def _weighted_among(self, pairs: list[tuple[Endpoint, int]]) -> Endpoint | None:
        """One of ``pairs`` (endpoint, effective weight), chosen in proportion to weight. O(n)."""
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0][0]
        r = self._rng.randrange(sum(x for _, x in pairs))
        for ep, x in pairs:
            r -= x
            if r < 0:
                return ep
        return pairs[-1][0]

    def _weighted_least(self, cands: tuple[Endpoint, ...], eff: list[int],
                        exclude: frozenset[Addr]) -> Endpoint | None:
        """Lowest active / weight; ties (idle endpoints, most often) by weighted random, so
        short connections are shared by weight as well as long ones."""
        active = self.active
        ties: list[tuple[Endpoint, int]] = []
        best_a, best_x = 0, 0
        for ep, x in zip(cands, eff):
            if ep.addr in exclude:
                continue
            a = active.get(ep.addr, 0)
            if not ties or a * best_x < best_a * x:
                ties = [(ep, x)]
                best_a, best_x = a, x
            elif a * best_x == best_a * x:
                ties.append((ep, x))
        return self._weighted_among(ties)

    def _random(self, cands: tuple[Endpoint, ...], exclude: frozenset[Addr]) -> Endpoint | None:
        rnd = self._rng.randrange
        n = len(cands)
        if not exclude:
            return cands[rnd(n)]
        for _ in range(_DRAWS):
            ep = cands[rnd(n)]
            if ep.addr not in exclude:
                return ep
        rest = [e for e in cands if e.addr not in exclude]
        return rest[rnd(len(rest))] if rest else None

    def _least_of(self, eps: list[Endpoint]) -> Endpoint | None:
        if not eps:
            return None
        active = self.active
        return min(eps, key=lambda e: active.get(e.addr, 0))

    def _tables_for(self, cands: tuple[Endpoint, ...]) -> _Tables:
        t = self._tables.get(id(cands))
        if t is None or t.cands is not cands:
            if len(self._tables) >= _MAX_TABLES:
                self._drop_tables(list(self._tables))
            t = _Tables(cands)
            self._tables[id(cands)] = t
        return t

    def _drop_tables(self, ids: Iterable[int]) -> None:
        for i in ids:
            t = self._tables.pop(i, None)
            if t is None or t.lc is None:
                continue
            for ep in t.cands:
                lst = self._lc_by_addr.get(ep.addr)
                if lst is not None:
                    try:
                        lst.remove(t.lc)
                    except ValueError:
                        pass
                    if not lst:
                        del self._lc_by_addr[ep.addr]

    # -- live counts --------------------------------------------------------------------------

    def acquire(self, ep: Endpoint) -> None:
        addr = ep.addr
        old = self.active.get(addr, 0)
        self.active[addr] = old + 1
        for lc in self._lc_by_addr.get(addr, ()):
            lc.move(addr, old, old + 1)

    def release(self, ep: Endpoint) -> None:
        addr = ep.addr
        old = self.active.get(addr, 0)
        if old <= 0:
            return      # unmatched release: never go negative
        if old == 1:
            del self.active[addr]
        else:
            self.active[addr] = old - 1
        for lc in self._lc_by_addr.get(addr, ()):
            lc.move(addr, old, old - 1)

    def active_count(self, ep: Endpoint) -> int:
        return self.active.get(ep.addr, 0)

    # -- passive health hook -------------------------------------------------------------------

    def report_failure(self, ep: Endpoint, backend: Backend | None = None) -> int:
        """Count one more consecutive failure of ``ep`` (and tell outlier detection, which
        needs the backend for its ejection cap); returns the new count."""
        n = self.failures.get(ep.addr, 0) + 1
        self.failures[ep.addr] = n
        if backend is not None:
            self.outlier.report(backend.key, ep.addr, False)
        return n

    def report_success(self, ep: Endpoint, backend: Backend | None = None) -> None:
        if self.failures.pop(ep.addr, None) is not None and backend is not None:
            self.outlier.report(backend.key, ep.addr, True)

    def consecutive_failures(self, ep: Endpoint) -> int:
        return self.failures.get(ep.addr, 0)

    # -- snapshot swaps -------------------------------------------------------------------------

    def on_snapshot(self, snap: Snapshot) -> None:
        """Forget state that belongs to backends or endpoints the new snapshot no longer has.

        Per-backend work is O(backends); per-endpoint work looks only at backends whose object
        changed since the last snapshot (unchanged ones are the very same objects), so a
        one-pod change does not walk every endpoint of the cluster."""
        backends = snap.backends
        prev = self._prev_backends
        live_tuples: dict[int, tuple[Endpoint, ...]] = {}
        for b in backends.values():
            live_tuples[id(b.usable)] = b.usable
            live_tuples[id(b.local)] = b.local
        # A cached tuple is live only if the snapshot holds that very object: ids of dead tuples
        # can be reused by new objects, hence the identity check and not just the id.
        stale = [i for i, t in self._tables.items() if live_tuples.get(i) is not t.cands]
        self._drop_tables(stale)
        for key in [k for k in self._rr if k not in backends]:
            del self._rr[key]
        for key in [k for k in self._filtered if k[0] not in backends]:
            del self._filtered[key]
        changed = [b for k, b in backends.items() if prev.get(k) is not b]
        removed = [b for k, b in prev.items() if k not in backends]
        refs = self._addr_refs
        for b in removed + [prev[b.key] for b in changed if b.key in prev]:
            for e in b.endpoints:
                n = refs.get(e.addr, 0) - 1
                if n > 0:
                    refs[e.addr] = n
                else:
                    refs.pop(e.addr, None)
        for b in changed:
            for e in b.endpoints:
                refs[e.addr] = refs.get(e.addr, 0) + 1
        if self._affinity:
            now = self._clock()
            changed_addrs: dict[tuple[str, str, str], set[Addr]] = {}
            for akey, (addr, expiry) in list(self._affinity.items()):
                b = backends.get(akey[0])
                if b is None or expiry <= now:
                    del self._affinity[akey]
                    continue
                if prev.get(akey[0]) is not b:
                    addrs = changed_addrs.get(b.key)
                    if addrs is None:
                        addrs = changed_addrs[b.key] = {e.addr for e in b.endpoints}
                    if addr not in addrs:
                        del self._affinity[akey]
            self._affinity_swept = len(self._affinity)
        for addr in [a for a in self.failures if a not in refs]:
            del self.failures[addr]
        self.outlier.sync_changes(changed, [b.key for b in removed], refs.__contains__)
        self._prev_backends = dict(backends)

    def _sweep_affinity(self, now: float) -> None:
        for akey in [k for k, (_, exp) in self._affinity.items() if exp <= now]:
            del self._affinity[akey]
        self._affinity_swept = len(self._affinity)

