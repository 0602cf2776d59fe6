"""Retries with a budget (issue 6 §3), in process: an ``IngressServer`` (tests/backends.py
``Proxy``) in front of small threaded pods that answer a fixed status.

What is pinned down (docs/l7.md, "Failures, retries, timeouts"):

* a 502/503/504 from a pod is retried on another endpoint for an idempotent, replayable request
  whose response has not started; the last attempt's response is relayed as is;
* a non-idempotent request is not retried on a 5xx;
* attempts are capped by ``meshproxy.dev/retries`` (attempts = retries + 1);
* the discarded response's connection is pooled when it was complete and keep-alive;
* retries in flight stay within the backend's budget, max(3, 20% of its active requests);
* a per-try timeout retries an idempotent request on another endpoint.
"""

from __future__ import annotations

import socket
import threading
import time

from backends import Backend, Proxy, echo, get, ingress_yaml, request, service_yaml
from meshproxy.core import metrics


class StatusPod:
    """A keep-alive HTTP/1.1 pod answering every request with ``status`` (body: its name).

    ``gate``: a shared ``Gate``; then each request waits for it before being answered."""

    def __init__(self, host: str, name: str, status: int = 503, gate: Gate | None = None,
                 delay: float = 0.0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(256)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.name = name
        self.status = status
        self.gate = gate
        self.delay = delay
        self.requests = 0
        self.accepts = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepts += 1
                self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        try:
            c.settimeout(30)
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                n = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        n = int(v)
                while len(buf) < n:
                    buf += c.recv(65536)
                buf = buf[n:]
                with self._lock:
                    self.requests += 1
                if self.gate is not None:
                    self.gate.wait()
                if self.delay:
                    time.sleep(self.delay)
                body = self.name.encode()
                c.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (self.status, len(body), body))
        except OSError:
            pass
        finally:
            c.close()

    def stop(self) -> None:
        self._stopped = True
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Gate:
    """The first ``n`` requests (over all pods sharing it) wait until all ``n`` have arrived
    (or ``timeout``); later ones wait ``late`` seconds. So ``n`` requests are in flight in the
    proxy at once, and retries hold their budget slot long enough to be seen."""

    def __init__(self, n: int, late: float, timeout: float = 10.0) -> None:
        self.n = n
        self.late = late
        self.timeout = timeout
        self.count = 0
        self.lock = threading.Lock()
        self.full = threading.Event()

    def wait(self) -> None:
        with self.lock:
            self.count += 1
            mine = self.count
            if mine >= self.n:
                self.full.set()
        if mine <= self.n:
            self.full.wait(self.timeout)
        else:
            time.sleep(self.late)


def _config(name: str, pods, annotations=None) -> str:
    return service_yaml(name, pods) + "---\n" + ingress_yaml(
        name, [(None, "/", "Prefix", name)], annotations=annotations)


def _retries_total(ns: str, svc: str) -> float:
    return metrics.http_retries.labels(ns, svc)._value.get()


def test_get_503_is_retried_on_a_healthy_endpoint():
    bad = StatusPod("127.0.12.1", "bad", 503)
    try:
        with Backend("127.0.12.2", name="good") as good, \
                Proxy(_config("r1", [bad, good]), l7_lb_policy="round_robin") as p:
            before = _retries_total("default", "r1")
            for _ in range(6):
                e = echo(p.port, "/echo")
                assert e["backend"] == "good"
            # round robin sent about half of the first attempts to the failing pod
            assert bad.requests >= 2
            assert good.requests == 6
            assert _retries_total("default", "r1") - before == bad.requests
    finally:
        bad.stop()


def test_discarded_503_connection_is_pooled_when_complete_and_keepalive():
    bad = StatusPod("127.0.12.3", "bad", 503)
    try:
        with Backend("127.0.12.4", name="good") as good, \
                Proxy(_config("r2", [bad, good]), l7_lb_policy="round_robin") as p:
            for _ in range(6):
                assert echo(p.port, "/echo")["backend"] == "good"
            assert bad.requests >= 2
            assert bad.accepts == 1  # the same connection carried every 503
    finally:
        bad.stop()


def test_post_503_is_not_retried():
    bad = StatusPod("127.0.12.5", "bad", 503)
    try:
        with Backend("127.0.12.6", name="good") as good, \
                Proxy(_config("r3", [bad, good]), l7_lb_policy="round_robin") as p:
            statuses = []
            for _ in range(2):
                r, body, c = request(p.port, "POST", "/echo", body=b"payload")
                c.close()
                statuses.append((r.status, body if r.status != 200 else b""))
            assert sorted(statuses) == [(200, b""), (503, b"bad")]
            assert bad.requests == 1 and good.requests == 1
    finally:
        bad.stop()


def test_attempts_capped_by_annotation_last_response_relayed():
    pods = [StatusPod(f"127.0.12.{7 + i}", f"p{i}", 503) for i in range(4)]
    try:
        for retries, attempts in (("0", 1), ("1", 2), ("3", 4), (None, 2)):
            ann = {"meshproxy.dev/retries": retries} if retries is not None else None
            before = sum(x.requests for x in pods)
            with Proxy(_config("r4", pods, ann)) as p:
                r, body = get(p.port, "/x")
            assert r.status == 503
            assert body in {x.name.encode() for x in pods}  # the pod's own answer, as is
            assert sum(x.requests for x in pods) - before == attempts, retries
            # every attempt went to a different pod
            assert sum(1 for x in pods if x.requests) >= attempts
    finally:
        for x in pods:
            x.stop()


def test_retry_budget_caps_retries_when_every_pod_fails():
    n = 50
    gate = Gate(n, late=0.5)
    pods = [StatusPod(f"127.0.12.{20 + i}", f"f{i}", 503, gate=gate) for i in range(2)]
    try:
        with Proxy(_config("r5", pods)) as p:
            results: list[int] = []
            lock = threading.Lock()

            def one() -> None:
                r, _ = get(p.port, "/", timeout=20)
                with lock:
                    results.append(r.status)

            threads = [threading.Thread(target=one) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            state = p.call(p.server.state)
        attempts = sum(x.requests for x in pods)
        retries = attempts - n
        assert results == [503] * n
        # Budget: max(3, 20% of 50 active) = 10 retries in flight; a retry holds its slot
        # for 0.5 s, longer than the other first attempts take to fail.
        assert 3 <= retries <= max(3, n // 5), attempts
        # Every other failure was either refused by the budget or had no other endpoint left
        # (outlier detection ejects a pod after 5 consecutive 5xx).
        assert 0 < state["retry_budget_overflows"] <= n - retries
        assert state["active"] == 0
    finally:
        for x in pods:
            x.stop()


def test_per_try_timeout_retries_on_another_endpoint():
    slow = StatusPod("127.0.12.30", "slow", 200, delay=2.0)
    try:
        with Backend("127.0.12.31", name="fast") as fast:
            cfg = _config("r6", [slow, fast], {"meshproxy.dev/per-try-timeout": "200ms"})
            with Proxy(cfg, l7_lb_policy="round_robin") as p:
                for _ in range(4):   # the slow pod's answers would say "slow", after 2 s
                    assert echo(p.port, "/echo")["backend"] == "fast"
                assert slow.requests >= 1
    finally:
        slow.stop()
