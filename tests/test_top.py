"""meshproxy top / stat arithmetic (meshproxy.top): quantiles as PromQL's histogram_quantile
computes them, rates and success rates from two reads of /metrics, counter resets."""

from __future__ import annotations

import math

import pytest

from meshproxy.top import Scrape, compute, parse, quantile

INF = math.inf


@pytest.mark.parametrize("q,buckets,expected", [
    (0.5, [(0.1, 0), (0.2, 10), (INF, 10)], 0.15),            # rank 5 of 10 inside (0.1, 0.2]
    (0.99, [(0.1, 0), (0.2, 10), (INF, 10)], 0.199),
    (0.5, [(0.1, 10), (INF, 10)], 0.05),                      # first bucket: from 0
    (0.5, [(0.1, 2), (0.5, 2), (INF, 10)], 0.5),              # in +Inf: the highest finite bound
    (0.5, [(0.1, 0), (INF, 0)], None),                        # nothing observed
    (0.5, [], None),
    (1.0, [(0.25, 4), (1.0, 8), (INF, 8)], 1.0),
    (0.25, [(1.0, 8), (0.25, 4), (INF, 8)], 0.125),            # order of the input does not matter
])
def test_quantile_like_histogram_quantile(q, buckets, expected):
    got = quantile(q, buckets)
    assert got == (pytest.approx(expected) if expected is not None else None)


def _text(ok: int, err: int, fast: int, slow: int, conns: int = 0) -> str:
    lab = 'ingress="default/web",namespace="default",route="web.test/",service="web"'
    return "\n".join([
        "# TYPE meshproxy_http_requests_total counter",
        f'meshproxy_http_requests_total{{code="2xx",{lab}}} {ok}',
        f'meshproxy_http_requests_total{{code="5xx",{lab}}} {err}',
        "# TYPE meshproxy_http_request_duration_seconds histogram",
        f'meshproxy_http_request_duration_seconds_bucket{{{lab},le="0.01"}} {fast}',
        f'meshproxy_http_request_duration_seconds_bucket{{{lab},le="0.1"}} {fast + slow}',
        f'meshproxy_http_request_duration_seconds_bucket{{{lab},le="+Inf"}} {fast + slow}',
        f'meshproxy_http_request_duration_seconds_count{{{lab}}} {fast + slow}',
        f'meshproxy_http_request_duration_seconds_sum{{{lab}}} 1.0',
        "# TYPE meshproxy_l4_connections_total counter",
        f'meshproxy_l4_connections_total{{namespace="default",port="tcp",service="db"}} {conns}',
        "",
    ])


def test_rates_success_and_latency_come_from_the_window_only():
    before = parse(_text(ok=1000, err=0, fast=1000, slow=0), at=100.0)
    after = parse(_text(ok=1090, err=10, fast=1050, slow=50, conns=20), at=102.0)
    result = compute(before, after)
    (route,) = result["routes"]
    assert route.key == ("web.test/", "default/web", "default/web")
    assert route.rate == pytest.approx(50.0)                  # 100 requests in 2 s
    assert route.success == pytest.approx(0.9)                 # 10 of the 100 were 5xx
    assert route.latency(0.5) == pytest.approx(0.01)           # 50 fast, 50 slow in the window
    assert route.latency(0.99) == pytest.approx(0.01 + 0.09 * 49 / 50)
    (backend,) = result["backends"]
    assert backend.key == ("default/web",) and backend.rate == pytest.approx(50.0)
    (l4,) = result["l4"]
    assert l4.key == ("default/db:tcp",) and l4.rate == pytest.approx(10.0)


def test_a_restarted_instance_counts_from_zero():
    before = parse(_text(ok=1000, err=0, fast=1000, slow=0), at=0.0)
    after = parse(_text(ok=10, err=0, fast=10, slow=0), at=1.0)
    (route,) = compute(before, after)["routes"]
    assert route.rate == pytest.approx(10.0) and route.success == 1.0


def test_no_traffic_shows_no_figures():
    s = parse(_text(ok=5, err=0, fast=5, slow=0), at=0.0)
    (route,) = compute(s, Scrape(1.0, s.samples))["routes"]
    assert route.rate == 0 and route.success is None and route.latency(0.5) is None
