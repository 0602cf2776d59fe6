"""Passive outlier detection: consecutive failures eject, ejections grow and decay, the cap and
panic mode hold (meshproxy.core.outlier). Pure logic with a fake clock; no sockets."""

import pytest

from discovery.endpoints import Endpoint
from meshproxy.core import metrics
from meshproxy.core.outlier import OutlierDetector
from meshproxy.core.snapshot import Backend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def backend(n: int, service: str = "web", namespace: str = "default") -> Backend:
    eps = tuple(Endpoint(f"127.0.10.{i + 1}", 8080, f"{service}-{i}") for i in range(n))
    return Backend(key=(namespace, service, "http"), namespace=namespace, service=service, port_name="http",
                   port=80, endpoints=eps, usable=eps, local=eps[:1])


def fail(det: OutlierDetector, b: Backend, i: int, times: int = 1) -> bool:
    ejected = False
    for _ in range(times):
        ejected = det.report(b.key, b.usable[i].addr, False) or ejected
    return ejected


def addrs(eps) -> list[str]:
    return [e.ip for e in eps]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_ejects_after_five_consecutive_failures(clock):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    assert not fail(det, b, 0, 4)
    assert not det.ejected(b.usable[0].addr)
    assert fail(det, b, 0)
    assert det.ejected(b.usable[0].addr)
    assert addrs(det.filter(b)) == ["127.0.10.2", "127.0.10.3", "127.0.10.4"]


def test_a_success_resets_the_run(clock):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    fail(det, b, 0, 4)
    det.report(b.key, b.usable[0].addr, True)
    assert not fail(det, b, 0, 4)
    assert fail(det, b, 0)


def test_failures_of_different_endpoints_do_not_add_up(clock):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    for _ in range(3):
        for i in range(3):
            fail(det, b, i)
    assert not any(det.ejected(e.addr) for e in b.usable)


def test_returns_after_the_ejection_time_with_a_clean_run(clock):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    fail(det, b, 0, 5)
    clock.advance(29.9)
    assert det.ejected(b.usable[0].addr)
    clock.advance(0.2)
    assert not det.ejected(b.usable[0].addr)
    assert det.filter(b) is b.usable
    # Back in service: one more failure is not enough, it needs a new run of five.
    assert not fail(det, b, 0, 4)
    assert fail(det, b, 0)


def test_failures_while_ejected_neither_count_nor_extend(clock):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    fail(det, b, 0, 5)
    clock.advance(20)
    assert not fail(det, b, 0, 50)
    clock.advance(10.1)
    assert not det.ejected(b.usable[0].addr)


@pytest.mark.parametrize("gap,expected", [
    # Failing again right after each return: 30 s, 60 s, 90 s, ... (base x times ejected).
    (0.0, [30, 60, 90, 120]),
    # One whole 10 s interval of health after each return undoes one step: stays at base.
    (15.0, [30, 30, 30, 30]),
    (10.0, [30, 30, 30, 30]),
    # Less than an interval of health decays nothing.
    (5.0, [30, 60, 90, 120]),
])
def test_ejection_time_grows_with_times_ejected_and_decays(clock, gap, expected):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    a = b.usable[0].addr
    durations = []
    for _ in expected:
        fail(det, b, 0, 5)
        start = clock.now
        while det.ejected(a):
            clock.advance(1)
        durations.append(round(clock.now - start))
        clock.advance(gap)
    assert durations == expected


def test_ejection_time_is_capped_and_decays_back_to_base(clock):
    det, b = OutlierDetector(base_ejection=30, max_ejection=100, clock=clock), backend(4)
    det.filter(b)
    a = b.usable[0].addr
    durations = []
    for _ in range(6):
        fail(det, b, 0, 5)
        start = clock.now
        while det.ejected(a):
            clock.advance(1)
        durations.append(round(clock.now - start))
    assert durations == [30, 60, 90, 100, 100, 100]
    # The multiplier stopped at ceil(100/30) = 4; four healthy intervals bring it back to base.
    clock.advance(40)
    fail(det, b, 0, 5)
    start = clock.now
    while det.ejected(a):
        clock.advance(1)
    assert round(clock.now - start) == 30


@pytest.mark.parametrize("n,percent,max_out", [
    (4, 50, 2), (5, 50, 2), (10, 50, 5), (10, 10, 1), (3, 100, 3), (2, 50, 1),
    # Strict cap: a one-endpoint backend never loses its endpoint (Envoy would eject it and
    # then balance over it anyway in panic mode).
    (1, 50, 0), (1, 100, 1),
])
def test_never_ejects_more_than_max_percent(clock, n, percent, max_out):
    det, b = OutlierDetector(max_ejection_percent=percent, panic_threshold=0, clock=clock), backend(n)
    det.filter(b)
    for i in range(n):
        fail(det, b, i, 5)
    assert sum(det.ejected(e.addr) for e in b.usable) == max_out


def test_cap_frees_up_when_an_ejection_ends(clock):
    det, b = OutlierDetector(clock=clock), backend(2)
    det.filter(b)
    assert fail(det, b, 0, 5)
    assert not fail(det, b, 1, 5)        # 2 of 2 would be 100 % > 50 %
    clock.advance(30.5)                  # endpoint 0 returns
    # Endpoint 1 stayed at its threshold: its very next failure ejects it.
    assert fail(det, b, 1)
    assert det.ejected(b.usable[1].addr) and not det.ejected(b.usable[0].addr)


@pytest.mark.parametrize("n,ejected,panic,expect_all", [
    (4, 1, 50, False),   # 75 % healthy
    (4, 2, 50, False),   # 50 % healthy: not below the threshold
    (4, 3, 50, True),    # 25 % healthy: panic, balance over all four
    (10, 6, 50, True),
    (10, 6, 30, False),
    (4, 3, 0, False),    # threshold 0 disables panic mode
])
def test_panic_mode_balances_over_all_when_too_few_are_healthy(clock, n, ejected, panic, expect_all):
    det, b = OutlierDetector(max_ejection_percent=100, panic_threshold=panic, clock=clock), backend(n)
    det.filter(b)
    for i in range(ejected):
        assert fail(det, b, i, 5)
    got = det.filter(b)
    if expect_all:
        assert got is b.usable
        assert det.panic(b)
    else:
        assert addrs(got) == addrs(b.usable[ejected:])
        assert not det.panic(b)


def test_filter_local_candidates(clock):
    det, b = OutlierDetector(max_ejection_percent=100, panic_threshold=0, clock=clock), backend(4)
    det.filter(b)
    assert det.filter(b, local_only=True) is b.local
    fail(det, b, 0, 5)
    assert det.filter(b, local_only=True) == ()


def test_filter_returns_the_backend_tuple_itself_when_nothing_is_ejected(clock):
    det, b = OutlierDetector(clock=clock), backend(3)
    assert det.filter(b) is b.usable
    fail(det, b, 0, 4)
    assert det.filter(b) is b.usable


def test_ejection_applies_to_every_backend_holding_the_address(clock):
    det = OutlierDetector(clock=clock)
    web, api = backend(4, "web"), backend(4, "api")
    det.filter(web)
    det.filter(api)
    fail(det, web, 0, 5)
    assert web.usable[0].addr == api.usable[0].addr
    assert len(det.filter(api)) == 3


def test_ejections_are_counted_per_service(clock):
    det, b = OutlierDetector(clock=clock), backend(4, "counted", "metrics-ns")
    before = metrics.REGISTRY.get_sample_value("meshproxy_outlier_ejections_total",
                                               {"namespace": "metrics-ns", "service": "counted"}) or 0
    det.filter(b)
    fail(det, b, 0, 5)
    fail(det, b, 1, 5)
    after = metrics.REGISTRY.get_sample_value("meshproxy_outlier_ejections_total",
                                              {"namespace": "metrics-ns", "service": "counted"})
    assert after == before + 2


def test_sync_forgets_endpoints_that_left_every_backend(clock):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    fail(det, b, 0, 5)
    fail(det, b, 1, 3)
    smaller = Backend(key=b.key, namespace="default", service="web", port_name="http", port=80,
                      endpoints=b.endpoints[2:], usable=b.usable[2:], local=())
    det.sync([smaller])
    assert not det.ejected(b.usable[0].addr)
    assert det.state()["failing"] == [] and det.state()["ejected"] == []


def test_state_for_debug(clock):
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    fail(det, b, 0, 5)
    fail(det, b, 1, 2)
    clock.advance(10)
    st = det.state()
    assert st["ejected"] == [{"address": "127.0.10.1:8080", "remaining": 20.0, "multiplier": 1, "ejections": 1}]
    assert st["failing"] == [{"address": "127.0.10.2:8080", "consecutiveFailures": 2}]
    assert st["consecutive"] == 5 and st["maxEjectionPercent"] == 50 and st["panicThreshold"] == 50


def test_successes_on_healthy_endpoints_allocate_nothing(clock):
    det, b = OutlierDetector(clock=clock), backend(100)
    det.filter(b)
    for e in b.usable:
        det.report(b.key, e.addr, True)
    assert det._hosts == {}


def test_version_changes_exactly_when_the_ejected_set_does(clock):
    """The balancers cache filter() results by ``version``: it must move on every ejection,
    return and prune, and stay put otherwise."""
    det, b = OutlierDetector(clock=clock), backend(4)
    det.filter(b)
    v0 = det.version
    fail(det, b, 0, 4)
    det.report(b.key, b.usable[1].addr, True)
    assert det.version == v0
    fail(det, b, 0)
    v1 = det.version
    assert v1 != v0
    clock.advance(10)
    det.expire_due()
    assert det.version == v1
    clock.advance(25)
    det.expire_due()                      # the ejection ended
    v2 = det.version
    assert v2 != v1 and not det.ejected(b.usable[0].addr)
    fail(det, b, 2, 5)
    v3 = det.version
    det.sync([Backend(key=b.key, namespace="default", service="web", port_name="http", port=80,
                      endpoints=b.endpoints[:2], usable=b.usable[:2], local=())])
    assert det.version != v3              # endpoint 2 left: its ejection went with it
