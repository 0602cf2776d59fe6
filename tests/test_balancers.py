"""Balancer choice as pure logic: no sockets, an injectable clock and seeded randomness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from discovery.endpoints import Endpoint
from meshproxy.core.balancers import Balancers, stable_hash
from meshproxy.core.settings import LB_POLICIES, Settings
from meshproxy.core.snapshot import Backend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def eps(n: int, node: str = "a", base: int = 1) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"127.0.10.{base + i}", 8080, f"p{base + i}", node) for i in range(n))


def backend(endpoints, policy="random", affinity=None, local=None, name="web", usable=None):
    endpoints = tuple(endpoints)
    return Backend(("default", name, "http"), "default", name, "http", 80, endpoints,
                   tuple(usable) if usable is not None else endpoints,
                   tuple(local) if local is not None else (), policy, affinity, 0)


def make(seed: int = 1) -> tuple[Balancers, Clock]:
    clock = Clock()
    return Balancers(Settings(), clock=clock, rng=random.Random(seed)), clock


class FakeSnap:
    def __init__(self, *backends: Backend) -> None:
        self.backends = {b.key: b for b in backends}


# -- distribution --------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", LB_POLICIES)
def test_every_policy_spreads_over_all_endpoints(policy):
    bal, _ = make()
    b = backend(eps(4), policy)
    counts = Counter()
    for i in range(4000):
        # Hash policies spread by key: give every pick its own client.
        ep = bal.pick(b, f"127.0.50.{i % 250}", hash_key=f"client-{i}".encode())
        bal.acquire(ep)     # a short connection: least_connections sees it come and go
        bal.release(ep)
        counts[ep.addr] += 1
    assert set(counts) == {e.addr for e in b.usable}
    for n in counts.values():
        assert 600 <= n <= 1400, counts   # 1000 expected; loose enough for every policy


def test_round_robin_is_exact_and_per_backend():
    bal, _ = make()
    a, b = backend(eps(3), "round_robin", name="a"), backend(eps(2, base=20), "round_robin", name="b")
    seq_a = [bal.pick(a, None).pod for _ in range(6)]
    seq_b = [bal.pick(b, None).pod for _ in range(4)]
    assert seq_a == ["p1", "p2", "p3", "p1", "p2", "p3"]
    assert seq_b == ["p20", "p21", "p20", "p21"]


def test_random_within_tolerance():
    bal, _ = make(7)
    b = backend(eps(3))
    counts = Counter(bal.pick(b, None).pod for _ in range(3000))
    assert all(850 <= n <= 1150 for n in counts.values()), counts


def test_least_connections_follows_active_counts():
    bal, _ = make()
    e = eps(3)
    b = backend(e, "least_connections")
    bal.acquire(e[0])
    bal.acquire(e[0])
    bal.acquire(e[1])
    assert bal.pick(b, None) == e[2]
    bal.acquire(e[2])
    assert bal.pick(b, None) == e[1] or bal.pick(b, None) == e[2]
    bal.acquire(e[1])
    bal.acquire(e[2])               # counts 2, 2, 2
    bal.release(e[1])
    bal.release(e[1])               # counts 2, 0, 2
    assert bal.pick(b, None) == e[1]
    assert bal.active_count(e[1]) == 0 and e[1].addr not in bal.active


def test_least_connections_rotates_ties_when_connections_are_short():
    bal, _ = make()
    b = backend(eps(3), "least_connections")
    seen = []
    for _ in range(6):
        ep = bal.pick(b, None)
        bal.acquire(ep)
        bal.release(ep)
        seen.append(ep.pod)
    assert Counter(seen) == Counter({"p1": 2, "p2": 2, "p3": 2}), seen


def test_least_connections_keeps_pace_with_counts_taken_before_table_was_built():
    bal, _ = make()
    e = eps(2)
    bal.acquire(e[0])
    assert bal.pick(backend(e, "least_connections"), None) == e[1]


def test_p2c_prefers_the_less_loaded():
    bal, _ = make(3)
    e = eps(2)
    b = backend(e, "p2c")
    for _ in range(5):
        bal.acquire(e[0])
    # With two endpoints both are always drawn: the idle one wins every time.
    assert {bal.pick(b, None) for _ in range(50)} == {e[1]}


def test_release_never_goes_negative():
    bal, _ = make()
    e = eps(1)[0]
    bal.release(e)
    bal.acquire(e)
    bal.release(e)
    bal.release(e)
    assert bal.active == {}


# -- exclude, local_only, empty -------------------------------------------------------------------

@pytest.mark.parametrize("policy", LB_POLICIES)
def test_exclude_is_never_chosen(policy):
    bal, _ = make()
    e = eps(5)
    b = backend(e, policy)
    ex = frozenset({e[0].addr, e[3].addr})
    for i in range(300):
        ep = bal.pick(b, f"127.0.50.{i % 200}", exclude=ex, hash_key=str(i).encode())
        assert ep is not None and ep.addr not in ex


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_all_excluded_or_empty_gives_none(policy):
    bal, _ = make()
    e = eps(3)
    assert bal.pick(backend(e, policy), "127.0.50.1", exclude=frozenset(x.addr for x in e)) is None
    assert bal.pick(backend((), policy), "127.0.50.1") is None


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_local_only_picks_from_local(policy):
    bal, _ = make()
    here, there = eps(2, "node-a"), eps(2, "node-b", base=20)
    b = backend(here + there, policy, local=here)
    for i in range(100):
        assert bal.pick(b, f"127.0.50.{i}", local_only=True, hash_key=str(i).encode()) in here
    assert bal.pick(backend(there, policy, local=()), "127.0.50.1", local_only=True) is None


# -- ClientIP affinity ----------------------------------------------------------------------------

def test_affinity_pins_a_client_and_spreads_clients():
    bal, _ = make()
    b = backend(eps(3), "round_robin", affinity=10800)
    first = {ip: bal.pick(b, ip) for ip in ("127.0.50.1", "127.0.50.2", "127.0.50.3")}
    assert len({e.addr for e in first.values()}) == 3          # round robin across clients
    for _ in range(10):
        for ip, ep in first.items():
            assert bal.pick(b, ip) == ep


def test_affinity_expires_after_timeout_since_last_use():
    bal, clock = make()
    b = backend(eps(3), "round_robin", affinity=10)
    ep = bal.pick(b, "127.0.50.1")
    clock.now += 9
    assert bal.pick(b, "127.0.50.1") == ep       # refreshed: the timer restarts here
    clock.now += 9
    assert bal.pick(b, "127.0.50.1") == ep       # 18 s after the first use, 9 after the last
    clock.now += 10.5
    other = bal.pick(b, "127.0.50.1")            # expired: a fresh choice (round robin moves on)
    assert other != ep


def test_affinity_repins_when_endpoint_leaves_and_stays_there():
    bal, _ = make()
    e = eps(3)
    b1 = backend(e, "random", affinity=10800)
    pinned = bal.pick(b1, "127.0.50.7")
    rest = tuple(x for x in e if x != pinned)
    b2 = backend(e, "random", affinity=10800, usable=rest)     # pinned pod not ready any more
    bal.on_snapshot(FakeSnap(b2))
    moved = bal.pick(b2, "127.0.50.7")
    assert moved != pinned and moved in rest
    assert all(bal.pick(b2, "127.0.50.7") == moved for _ in range(20))
    # It came back: the client stays where it was re-pinned.
    b3 = backend(e, "random", affinity=10800)
    bal.on_snapshot(FakeSnap(b3))
    assert all(bal.pick(b3, "127.0.50.7") == moved for _ in range(20))


def test_affinity_does_not_use_excluded_endpoint():
    bal, _ = make()
    e = eps(3)
    b = backend(e, "random", affinity=100)
    pinned = bal.pick(b, "127.0.50.1")
    again = bal.pick(b, "127.0.50.1", exclude=frozenset({pinned.addr}))
    assert again != pinned
    assert bal.pick(b, "127.0.50.1") == again    # re-pinned to where the retry went


def test_affinity_pins_agree_across_processes_under_the_default_policy():
    # Workers behind SO_REUSEPORT keep separate tables: the first choice must agree anyway.
    a, _ = make(1)
    b, _ = make(2)
    e = eps(5)
    clients = [f"127.0.50.{i}" for i in range(1, 60)]
    pins_a = {c: a.pick(backend(e, "random", affinity=100), c) for c in clients}
    pins_b = {c: b.pick(backend(e, "random", affinity=100), c) for c in clients}
    assert pins_a == pins_b
    assert len({ep.addr for ep in pins_a.values()}) == 5      # still spread over all


def test_affinity_off_without_client_ip():
    bal, _ = make()
    b = backend(eps(3), "round_robin", affinity=100)
    assert len({bal.pick(b, None).addr for _ in range(3)}) == 3


def test_affinity_table_is_bounded():
    bal, clock = make()
    b = backend(eps(2), affinity=5)
    for i in range(5000):
        bal.pick(b, f"10.0.{i // 250}.{i % 250}")
        clock.now += 0.01          # 50 s in all: most pins expire along the way
    assert len(bal._affinity) < 3000


# -- consistent hashing ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_consistent_hash_is_stable_per_key(policy):
    bal, _ = make()
    b = backend(eps(5), policy)
    for i in range(100):
        key = f"user-{i}".encode()
        assert len({bal.pick(b, None, hash_key=key) for _ in range(3)}) == 1
    # The client IP is the key when no hash_key is given.
    assert len({bal.pick(b, "127.0.50.9") for _ in range(5)}) == 1


@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_consistent_hash_moves_about_one_nth_when_one_endpoint_leaves(policy):
    bal, _ = make()
    n = 10
    e = eps(n)
    full, fewer = backend(e, policy), backend(e, policy, usable=e[:-1])
    keys = [f"k{i}".encode() for i in range(5000)]
    before = {k: bal.pick(full, None, hash_key=k) for k in keys}
    after = {k: bal.pick(fewer, None, hash_key=k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    # Every key of the removed endpoint must move; hardly any other may.
    lost = [k for k in keys if before[k] == e[-1]]
    assert set(lost) <= set(moved)
    others_moved = len(moved) - len(lost)
    assert 0.05 * len(keys) <= len(lost) <= 0.15 * len(keys)
    assert others_moved <= 0.03 * len(keys), (policy, others_moved)


@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_consistent_hash_agrees_across_instances(policy):
    # Two processes (workers, node proxies) must map a key to the same endpoint: no salted hash().
    a, _ = make(1)
    b, _ = make(2)
    e = eps(7)
    for i in range(50):
        k = f"x{i}".encode()
        assert a.pick(backend(e, policy), None, hash_key=k) == b.pick(backend(e, policy), None, hash_key=k)


def test_stable_hash_is_fixed():
    assert stable_hash(b"127.0.50.1") == stable_hash(b"127.0.50.1")
    assert stable_hash(b"a") != stable_hash(b"b")


def test_tables_are_built_once_per_tuple_identity():
    bal, _ = make()
    b = backend(eps(4), "maglev")
    bal.pick(b, None, hash_key=b"k")
    t = bal._tables[id(b.usable)]
    table = t.maglev
    bal.pick(b, None, hash_key=b"j")
    assert bal._tables[id(b.usable)].maglev is table


# -- snapshot swaps and bounded memory ------------------------------------------------------------

def test_on_snapshot_drops_state_of_gone_backends_and_endpoints():
    bal, _ = make()
    e = eps(3)
    a = backend(e, "round_robin", affinity=100, name="a")
    lc = backend(e, "least_connections", name="lc")
    bal.pick(a, "127.0.50.1")
    bal.pick(lc, None)
    bal.report_failure(e[2])
    bal.acquire(e[0])
    assert bal._rr and bal._affinity and bal._tables and bal.failures
    # New snapshot: backend "a" is gone, endpoint e[2] is gone everywhere.
    lc2 = backend(e[:2], "least_connections", name="lc")
    bal.on_snapshot(FakeSnap(lc2))
    assert ("default", "a", "http") not in bal._rr
    assert bal._affinity == {}
    assert e[2].addr not in bal.failures
    assert id(lc.usable) not in bal._tables
    assert all(e[2].addr != addr for addr in bal._lc_by_addr)
    # Active counts survive swaps: the connection is still open and will release.
    assert bal.active_count(e[0]) == 1
    bal.release(e[0])
    assert bal.active == {}


def test_on_snapshot_keeps_tables_of_unchanged_tuples():
    bal, _ = make()
    b = backend(eps(3), "ring_hash")
    bal.pick(b, None, hash_key=b"k")
    ring = bal._tables[id(b.usable)].ring
    bal.on_snapshot(FakeSnap(b))
    assert bal._tables[id(b.usable)].ring is ring


def test_least_connections_state_stays_consistent_after_swaps():
    bal, _ = make()
    e = eps(3)
    b1 = backend(e, "least_connections")
    for _ in range(3):
        ep = bal.pick(b1, None)
        bal.acquire(ep)                     # 1, 1, 1
    b2 = backend(e, "least_connections")    # new tuple object, same endpoints
    bal.on_snapshot(FakeSnap(b2))
    bal.release(e[1])                       # 1, 0, 1
    assert bal.pick(b2, None) == e[1]


# -- passive health hook --------------------------------------------------------------------------

def test_failure_counts_are_consecutive():
    bal, _ = make()
    e = eps(1)[0]
    assert bal.report_failure(e) == 1
    assert bal.report_failure(e) == 2
    assert bal.consecutive_failures(e) == 2
    bal.report_success(e)
    assert bal.consecutive_failures(e) == 0


# -- weights (SRV weights from the DNS source) ----------------------------------------------------

def weps(*weights: int, base: int = 1) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"127.0.10.{base + i}", 8080, f"p{base + i}", "a", weight=w)
                 for i, w in enumerate(weights))


def spread(policy: str, endpoints, picks: int, seed: int = 1, hold: bool = False) -> Counter:
    """Who gets ``picks`` new connections: short ones (acquired and released at once), or
    ``hold``-ing every one (least_connections / p2c then balance active / weight)."""
    bal, _ = make(seed)
    b = backend(endpoints, policy)
    counts: Counter = Counter()
    for i in range(picks):
        ep = bal.pick(b, None, hash_key=f"client-{i}".encode())
        bal.acquire(ep)
        if not hold:
            bal.release(ep)
        counts[ep.pod] += 1
    return counts


# (policy, weights, tolerance on each endpoint's share of the picks)
WEIGHTED = [(policy, weights, 0.01 if policy == "round_robin" else 0.03)
            for policy in LB_POLICIES
            for weights in ((10, 30), (1, 2, 3, 4), (5, 1, 1, 1, 1, 1))]


@pytest.mark.parametrize("policy,weights,tol", WEIGHTED)
def test_weighted_share_follows_the_weights(policy, weights, tol):
    assert backend(weps(*weights)).weighted
    counts = spread(policy, weps(*weights), 20000)
    total = sum(weights)
    for i, w in enumerate(weights):
        share = counts[f"p{i + 1}"] / 20000
        assert abs(share - w / total) <= tol, (policy, weights, counts)


@pytest.mark.parametrize("policy", ["least_connections", "p2c"])
def test_weighted_active_counts_follow_the_weights_when_connections_are_held(policy):
    counts = spread(policy, weps(10, 30), 4000, hold=True)
    # active / weight is what is compared: held connections end up 1 : 3 (p2c within a few)
    assert abs(counts["p1"] - 1000) <= (1 if policy == "least_connections" else 60), counts


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_weight_zero_is_chosen_only_rarely(policy):
    """RFC 2782: weight 0 has a very small chance when others have weight (here 1/100 of a
    weight-1 endpoint; consistent hashes give it at least one ring point / table slot)."""
    counts = spread(policy, weps(0, 1, 1), 40000, seed=3)
    assert counts["p1"] <= 0.008 * 40000, counts          # 1/201 ~ 0.5 % expected
    if policy in ("random", "round_robin", "least_connections", "p2c"):
        assert counts["p1"] >= 1, counts                  # rarely, not never
    assert abs(counts["p2"] - counts["p3"]) <= 0.05 * 40000, counts


@pytest.mark.parametrize("policy", LB_POLICIES)
@pytest.mark.parametrize("weights", [(0, 0, 0), (7, 7, 7)])
def test_equal_weights_are_the_unweighted_path_exactly(policy, weights):
    """All weights equal (all 0 included: RFC 2782 then chooses uniformly): not weighted, and
    the very same choices as weight 1 with the same seed."""
    assert not backend(weps(*weights)).weighted
    plain = spread(policy, weps(1, 1, 1), 3000, seed=5)
    same = spread(policy, weps(*weights), 3000, seed=5)
    assert plain == same and len(same) == 3


def test_weighted_backend_whose_candidates_have_equal_weights_uses_the_plain_path():
    bal, _ = make(5)
    e = weps(10, 30, 30)
    b = backend(e, "round_robin", usable=e[1:])        # the weight-10 one is not ready
    assert b.weighted
    assert [bal.pick(b, None).pod for _ in range(4)] == ["p2", "p3", "p2", "p3"]


def test_weighted_round_robin_interleaves_an_exact_cycle():
    bal, _ = make()
    b = backend(weps(10, 30), "round_robin")
    assert [bal.pick(b, None).pod for _ in range(8)] == ["p2", "p1", "p2", "p2"] * 2
    bal, _ = make()
    b = backend(weps(2, 1, 1), "round_robin")
    assert Counter(bal.pick(b, None).pod for _ in range(4)) == Counter({"p1": 2, "p2": 1, "p3": 1})
    # one endpoint excluded (a retry): the cycle goes on over the others
    ex = frozenset({b.usable[0].addr})
    assert {bal.pick(b, None, exclude=ex).pod for _ in range(10)} == {"p2", "p3"}


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_weighted_exclude_and_all_excluded(policy):
    bal, _ = make()
    e = weps(1, 30, 0, 5, 100)
    b = backend(e, policy)
    ex = frozenset({e[1].addr, e[4].addr})                  # the heavy ones
    seen = Counter()
    for i in range(500):
        ep = bal.pick(b, f"127.0.50.{i % 200}", exclude=ex, hash_key=str(i).encode())
        assert ep is not None and ep.addr not in ex
        seen[ep.pod] += 1
    assert seen["p4"] > seen["p1"] > seen["p3"] or policy in ("ring_hash", "maglev"), seen
    assert bal.pick(b, "127.0.50.1", exclude=frozenset(x.addr for x in e)) is None


@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_weighted_consistent_hash_is_stable_and_agrees_across_instances(policy):
    a, _ = make(1)
    c, _ = make(2)
    e = weps(10, 30, 20)
    for i in range(200):
        k = f"x{i}".encode()
        first = a.pick(backend(e, policy), None, hash_key=k)
        assert first == a.pick(backend(e, policy), None, hash_key=k) == c.pick(backend(e, policy), None, hash_key=k)


def test_weighted_maglev_table_shares_slots_by_weight():
    from meshproxy.core.balancers import _Maglev, _Weights
    e = weps(10, 30, 0)
    table = _Maglev(e, _Weights(e).eff).table
    n = Counter(table)
    assert n[2] == 1 and abs(n[1] - 3 * n[0]) <= 3, n       # weight 0: a single slot


def test_affinity_pins_clients_by_weight():
    bal, _ = make()
    b = backend(weps(10, 30), affinity=600)
    pins = Counter(bal.pick(b, f"127.0.{50 + i // 250}.{i % 250}").pod for i in range(4000))
    assert abs(pins["p1"] - 1000) <= 120, pins


def test_weighted_tables_go_with_their_tuples():
    bal, _ = make()
    b = backend(weps(10, 30), "round_robin")
    bal.pick(b, None)
    assert bal._tables[id(b.usable)].weights is not None
    bal.on_snapshot(FakeSnap())
    assert bal._tables == {}


@pytest.mark.parametrize("seed", range(20))
def test_ingress_conformance_load_balancing_reaches_every_pod(seed):
    """The Ingress conformance "Load Balancing" feature: 100 sequential requests from one client
    to a backend of 10 ready pods must be answered by all 10. The L7 default (p2c, requests that
    finish before the next starts, no affinity) must spread them, not stick to a favourite."""
    bal, _ = make(seed)
    b = backend(eps(10), "p2c")
    seen = set()
    for _ in range(100):
        ep = bal.pick(b, "127.0.0.1")
        bal.acquire(ep)
        bal.release(ep)
        seen.add(ep.addr)
    assert len(seen) == 10
