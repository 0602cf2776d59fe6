"""Request mirroring (Gateway API RequestMirror): a copy of a request goes to another backend and
its answer is read and dropped.

The exchange starts a ``Shadow`` per mirror of its route once the request is complete and its
body (if any) is still held for replay (at most ``l7.exchange.REPLAY_MAX`` bytes; a larger
body is not mirrored, and ``meshproxy_http_mirror_skipped_total`` counts it). The shadow uses
the same pool, balancers and upstream connections as real attempts - an upstream connection
calls it exactly as it calls an exchange - but nothing it does reaches the client or changes
the client's exchange: failures are counted and forgotten, and a mirror that does not answer
within the route's timeout is cut.
"""

from __future__ import annotations

import logging
import random

from meshproxy.core import metrics

__all__ = ["Shadow", "mirror"]

log = logging.getLogger("meshproxy.l7")

_rand = random.random


def mirror(ex) -> None:
    """Start the mirrors of ``ex``'s route (its request is complete)."""
    action = ex.action
    snap = ex.snap
    for m in action.mirrors:
        if m.percent < 100.0 and _rand() * 100.0 >= m.percent:
            continue
        if ex.replay is None:
            metrics.http_mirror.labels("skipped").inc()   # the body was too large to keep
            continue
        backend = snap.backends.get(m.backend)
        if backend is None or not backend.usable:
            metrics.http_mirror.labels("no_endpoint").inc()
            continue
        Shadow(ex, backend).start()


class Shadow:
    """One mirrored copy (see the module docstring). It offers an upstream connection what an
    exchange would: the head to send, and somewhere for the response to go."""

    __slots__ = ("ctx", "head", "method", "target", "fields", "body", "trailers", "backend", "ep",
                 "up", "token", "keep", "timer", "down_paused", "down", "state", "retried")

    def __init__(self, ex, backend) -> None:
        self.ctx = ex.ctx
        self.head = ex.head
        self.method = ex.head.method
        self.target, self.fields = ex.forward_head()
        self.body = tuple(ex.replay or ())
        self.trailers = ex.trailers
        self.backend = backend
        self.ep = None
        self.up = None
        self.token = 0
        self.keep = False
        self.timer = None
        self.down_paused = False
        self.down = self     # an upstream connection asks its exchange's client for its backlog
        self.state = "waiting"
        self.retried = False
        timeout = ex.action.timeout or self.ctx.settings.upstream_timeout
        self.timer = self.ctx.loop.call_later(timeout, self._expire)

    # -- the attempt ---------------------------------------------------------------------------

    def start(self) -> None:
        ctx = self.ctx
        backend = self.backend
        ep = ctx.balancers.pick(backend, "", policy=backend.l7_policy)
        if ep is None:
            self._end("no_endpoint")
            return
        self.ep = ep
        ctx.balancers.acquire(ep)
        pool = self._pool()
        conn = pool.take((ep.ip, ep.port))
        if conn is not None:
            self._send(conn)
            return
        self.token += 1
        pool.connect((ep.ip, ep.port), (backend.namespace, backend.service), self, self.token)

    def _pool(self):
        # As for an exchange's attempts: the backend's protocol picks the pool.
        return self.ctx.pool if self.backend.l7_protocol == "http/1.1" else self.ctx.h2pool

    def connected(self, token: int, conn, exc) -> None:
        if token != self.token or self.state != "waiting":
            if conn is not None:
                conn.pool.release(conn)
            return
        if conn is None:
            self._end("connect")
            return
        self._send(conn)

    def _send(self, conn) -> None:
        self.up = conn
        body = self.body
        end = not body and not self.trailers
        conn.send_head(self, self.target, self.fields, None, b"", end)
        for chunk in body:
            conn.send_data(chunk)
        if not end:
            conn.send_end(self.trailers)
        conn.flush()

    # -- what the upstream connection reports --------------------------------------------------

    def backlog(self) -> int:
        return 0      # nobody reads this response: read it as fast as it comes

    def response_whole(self, conn, head, body) -> bool:
        self.keep = head.keep_alive
        self._end("ok")
        return True

    def response_head(self, conn, head) -> None:
        if head.status >= 200:
            self.keep = head.keep_alive
            if head.body_kind(self.method) == "none":
                pass   # the end follows from the parser

    def response_data(self, conn, data) -> None:
        pass

    def response_batch(self, conn) -> None:
        pass

    def response_end(self, conn, trailers) -> None:
        self._end("ok")

    def upstream_failed(self, conn, kind, stale=False) -> None:
        if stale and self.state == "waiting" and not self.retried and self.ep is not None:
            # The pooled connection was closed by the pod as we reused it: once more, on a new
            # connection to the same endpoint (what an exchange does too).
            self.retried = True
            self.up = None
            conn.abort()
            ep = self.ep
            self.token += 1
            self._pool().connect((ep.ip, ep.port), (self.backend.namespace, self.backend.service), self, self.token)
            return
        self.keep = False
        self._end(kind)

    def upstream_paused(self) -> None:
        pass

    def upstream_resumed(self) -> None:
        pass

    def upstream_eof(self, conn) -> bool:
        return False

    def tunnel_closed(self) -> None:
        self._end("reset")

    def internal_error(self, exc) -> None:
        log.error("L7: internal error in a mirrored request: %r", exc, exc_info=exc)
        self.keep = False
        self._end("error")

    # -- ending --------------------------------------------------------------------------------

    def _expire(self) -> None:
        self.timer = None
        self.keep = False
        self._end("timeout")

    def _end(self, result: str) -> None:
        if self.state == "done":
            return
        self.state = "done"
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        up = self.up
        if up is not None:
            self.up = None
            if self.keep and result == "ok":
                up.pool.release(up)
            else:
                up.abort()
        if self.ep is not None:
            self.ctx.balancers.release(self.ep)
            self.ep = None
        self.token += 1
        metrics.http_mirror.labels(result).inc()
