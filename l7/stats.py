"""Request metrics of one (namespace, source, service), counted in plain ints on the request
path and pushed to prometheus-client once a second (``flush``, from the server's ticker) and at
drain. Why: a Counter.inc plus a Histogram.observe take three locks and about a dozen Python
calls per request, ~5% of the proxy's CPU at keep-alive rates; an int increment and a bisect do
the same bookkeeping. Errors and retries are rare and still go straight to their counters.

The caller's identity (``client_id``, meshproxy.core.metrics): a route's stats are those of
callers without one (""); an inbound mesh request swaps its exchange's stats for the route's
child of its caller (``for_client``), so the request path of everything else is unchanged. A
route holds at most ``CLIENT_ID_LIMIT`` + 1 children (the cap's "other"), flushed with it."""

from __future__ import annotations

from bisect import bisect_left as _bisect_left
from typing import Any

from meshproxy.core import metrics

__all__ = ["RouteStats", "take_retry_slot"]

# Retry budget per backend (Envoy's defaults, retry_budget: budget_percent 20%,
# min_retry_concurrency 3): retries in flight <= max(_BUDGET_MIN, active requests // _BUDGET_DIV).
_BUDGET_MIN = 3
_BUDGET_DIV = 5


def take_retry_slot(budget: list[int]) -> bool:
    """Take a slot of a backend's retry budget ``[active requests, retries in flight]`` (Envoy's
    retry budget): retries in flight <= max(3, 20% of the backend's active requests). Over
    budget: no retry, the failure goes to the client, and the caller counts the overflow
    (``meshproxy_upstream_errors_total{kind="retry_budget"}``). Without it a failing backend
    would get up to ``attempts`` times its normal load exactly when it is least able to take
    it (a retry storm)."""
    active = budget[0]
    if budget[1] >= (active // _BUDGET_DIV if active >= _BUDGET_MIN * _BUDGET_DIV else _BUDGET_MIN):
        return False
    budget[1] += 1
    return True


class RouteStats:
    """Metric children of one label set (see the module docstring)."""
    __slots__ = ("labels", "codes", "duration", "errors", "retries", "counts", "bounds",
                 "buckets", "seconds", "dirty", "clients")

    def __init__(self, namespace: str, ingress: str, service: str, route: str = "", client_id: str = "") -> None:
        self.labels = (namespace, ingress, service, route, client_id)
        self.codes: list[Any] = [None] * 6
        self.duration = metrics.http_duration.labels(namespace, ingress, service, route, client_id)
        self.errors: dict[str, Any] = {}
        self.retries = None
        self.counts = [0] * 6          # requests by status class since the last flush
        # The histogram's upper bounds (+Inf last): bisect_left gives the bucket observe() picks
        # (the first bound >= the value).
        self.bounds = tuple(getattr(self.duration, "_upper_bounds", ()))   # prometheus-client internals: tests/test_layers.py
        self.buckets = [0] * len(self.bounds)
        self.seconds = 0.0
        self.dirty = False
        self.clients: dict[str, RouteStats] | None = None   # client_id label -> child (module docstring)

    def for_client(self, client_id: str) -> RouteStats:
        """The stats of this route for requests of the caller ``client_id`` (a SPIFFE ID; ""
        is this route's own). Over the process's cap the child is the "other" one."""
        if not client_id:
            return self
        clients = self.clients
        if clients is None:
            clients = self.clients = {}
        s = clients.get(client_id)
        if s is None:
            label = metrics.client_id_label(client_id)
            s = clients.get(label)
            if s is None:
                s = clients[label] = RouteStats(*self.labels[:4], label)
        return s

    def done(self, status: int, seconds: float) -> None:
        self.counts[status // 100] += 1
        bounds = self.bounds
        if bounds:
            self.buckets[_bisect_left(bounds, seconds)] += 1
            self.seconds += seconds
        else:  # a prometheus-client without the attributes flush() relies on
            self.duration.observe(seconds)
        self.dirty = True

    def flush(self) -> None:
        if self.clients:
            for child in self.clients.values():
                child.flush()
        if not self.dirty:
            return
        self.dirty = False
        counts = self.counts
        for cls in range(6):
            n = counts[cls]
            if n:
                counts[cls] = 0
                child = self.codes[cls]
                if child is None:
                    child = self.codes[cls] = metrics.http_requests.labels(*self.labels, "%dxx" % cls)
                child.inc(n)
        if self.bounds:
            # Histogram.observe() is "_sum.inc(v); _buckets[i].inc(1)"; the same, n at a time.
            duration = self.duration
            buckets = self.buckets
            for i, n in enumerate(buckets):
                if n:
                    buckets[i] = 0
                    duration._buckets[i].inc(n)
            duration._sum.inc(self.seconds)
            self.seconds = 0.0

    def error(self, kind: str) -> None:
        child = self.errors.get(kind)
        if child is None:
            child = self.errors[kind] = metrics.upstream_errors.labels(self.labels[0], self.labels[2], kind)
        child.inc()

    def retry(self) -> None:
        if self.retries is None:
            self.retries = metrics.http_retries.labels(self.labels[0], self.labels[2])
        self.retries.inc()
