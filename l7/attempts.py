"""The upstream half of an exchange: attempts, connections, retries and the retry budget.

``Attempts`` holds the methods of ``l7.exchange.Exchange`` that start an attempt on an endpoint
(a pooled or a new connection), hand it the request, and decide what a failed attempt leads to:
another endpoint, a fresh connection to the same one (the keep-alive race), or the answer the
client gets. It is a base class only to keep the exchange's two halves in files of a readable
size; its state lives in the exchange's slots and every move of ``state`` is the exchange's
table (``l7.exchange.TRANSITIONS``).

Retry rules (docs/l7.md "Retries"): a connect failure may always go to another endpoint
(nothing was sent); after the request went out, only idempotent requests whose body is still
held for replay are retried, on another endpoint, within the route's attempts and the
backend's retry budget; a response already started is never retried; a timeout is retried only
when the route has a per-try timeout.
"""

from __future__ import annotations

import logging

from . import telemetry
from .filters import filtered_request
from .headers import IDEMPOTENT_METHODS
from .stats import take_retry_slot
from .states import ABORTED, COMPLETE, CONNECTING, STREAMING, WAITING

__all__ = ["Attempts"]

log = logging.getLogger("meshproxy.l7")

# Access-log response flags by the kind of upstream failure (Envoy's codes).
_FLAGS = {"timeout": "UT", "reset": "UR", "eof": "UC", "protocol": "UPE"}


class Attempts:
    """The attempt methods of ``Exchange`` (see the module docstring)."""

    __slots__ = ()

    def _attempt(self, ep, event: str, fresh: bool = False) -> None:
        ctx = self.ctx
        self.ep = self.held = ep
        self.attempts += 1
        ctx.balancers.acquire(ep)
        addr = (ep.ip, ep.port)
        # The backend's protocol picks the pool: HTTP/1.1 connections, or HTTP/2 streams
        # multiplexed over a few connections (l7.h2_upstream).
        pool = ctx.pool if self.backend.l7_protocol == "http/1.1" else ctx.h2pool
        conn = None if fresh else pool.take(addr)
        if conn is not None:
            self.state = WAITING        # event: routed or retry (hot path: assigned directly)
            self._attach(conn)
            if not self.down.processing:
                # Not inside the shell's read handling (which flushes at its end): a retry
                # started from an upstream or timer callback goes out now, in one write.
                conn.flush()
            return
        self._to(event, CONNECTING)
        self.token = token = self.token + 1
        backend = self.backend
        pool.connect(addr, (backend.namespace, backend.service), self, token)

    def _attach(self, conn) -> None:
        """Hand the request to ``conn`` (head, the body so far, its end if complete)."""
        self.up = conn
        head = self.head
        tgt = head.target
        if tgt[0] == 47:  # origin-form: forwarded as sent
            authority = None
        else:  # absolute-form: origin-form upstream, the target's authority as Host
            tgt = head.path + (b"?" + head.query if head.query else b"")
            authority = head.host
        down = self.down
        if self.trace is not None:
            tail = telemetry.upstream_tail(self, "%s:%d" % conn.addr, self.ctx.now(), conn.peer_id)
        elif self.rid_generated:
            tail = b"x-request-id: " + self.request_id + b"\r\n"
        else:
            tail = b""
        # The body: on the first delivery what waited meanwhile (everything so far: nothing
        # was written anywhere yet), on a retry the whole body again from the replay copy.
        chunks = self.pending if not self.delivered else self.replay
        self.delivered = True
        # The end goes with the head when there is nothing else to send.
        end = self.req == COMPLETE and not chunks and not self.trailers
        if self.action.plain_request and self.extra_fields is None and head is down.memo_head:
            # The same request bytes as this connection's previous request (health checks,
            # pollers, load generators repeat their heads exactly): the same upstream head,
            # without running the header policy and the serializer again; only the
            # per-request fields at its end (tail: request id, trace) are new.
            memo = down.memo_up
            if memo is not None and memo[0] is self.ctx.via and memo[1] is conn.kind:
                conn.send_head(self, tgt, None, memo[2], tail, end)
            else:
                data = conn.send_head(self, tgt, self._fields(authority), None, tail, end)
                down.memo_up = (self.ctx.via, conn.kind, data)
        else:
            fields = self._fields(authority)
            if not (self.action.plain_request and self.extra_fields is None):
                tgt, fields = self._filtered_request(tgt, fields)
            conn.send_head(self, tgt, fields, None, tail, end)
        if self.down_paused:
            conn.pause_reading()
        if chunks:
            for chunk in chunks:
                conn.send_data(chunk)
            self.pending = ()
            self.pending_bytes = 0
        if self.req == COMPLETE and not end:
            conn.send_end(self.trailers)

    def _fields(self, authority) -> list:
        head = self.head
        fields = self.ctx.request_headers(head.headers, head.connection_tokens, self.down.client,
                                 head.upgrade is not None, authority, self.ctx.via)
        if self.trace is not None:
            fields = telemetry.strip_trace_fields(fields)
        return fields

    def _filtered_request(self, tgt: bytes, fields: list) -> tuple[bytes, list]:
        tgt, fields = filtered_request(self.action, self.ref, self.route, self.head, tgt, fields)
        if self.extra_fields is not None:
            drop = self.replaced
            if drop:
                fields = [f for f in fields if f[0].lower() not in drop]
            fields = fields + self.extra_fields
        return tgt, fields

    def connected(self, token: int, conn, exc: BaseException | None) -> None:
        """The pool opened (``conn``) or failed to open (``exc``) the connection asked for."""
        if token != self.token or self.state != CONNECTING:
            # Nobody waits for it any more: keep a good new connection for later.
            if conn is not None:
                conn.pool.release(conn)
            return
        if conn is None:
            self._connect_failed(exc)
            return
        self._to("connected", WAITING)
        self._attach(conn)
        conn.flush()
        self.down.resume_request("connecting")

    def _connect_failed(self, exc: BaseException | None) -> None:
        ctx = self.ctx
        ep = self.ep
        log.debug("L7: connect to %s:%d failed: %s", ep.ip, ep.port, exc)
        self.flags = "UF"
        if self.trace is not None:
            self.trace.attempt_done(ctx.now(), error="connect")
        self._detach(reuse=False)
        ctx.balancers.report_failure(ep, self.backend)
        self.stats.error("connect")
        self.connect_failures += 1
        self._add_tried(ep)
        # Nothing was sent: another endpoint may always be tried (at least one other, and up
        # to the route's attempts).
        if self.connect_failures < max(self.action.attempts, 2):
            nxt = ctx.balancers.pick(self.backend, self.down.peer_ip, exclude=self.tried,
                                     policy=self.backend.l7_policy)
            if nxt is not None:
                self.stats.retry()
                self.attempts -= 1  # connect failures have their own budget
                self._attempt(nxt, "retry")
                return
        statuses = self.action.connect_error_statuses
        if statuses is None:
            self._fail(503, b"no endpoint could be reached\n")
        else:
            self._fail(statuses[0] if isinstance(exc, TimeoutError) else statuses[1], b"no endpoint could be reached\n")

    def _add_tried(self, ep) -> None:
        addr = (ep.ip, ep.port)
        self.tried = frozenset((addr,)) if self.tried is None else self.tried | {addr}

    def _detach(self, reuse: bool) -> None:
        """End the current attempt's hold on its upstream connection and endpoint."""
        up = self.up
        if up is not None:
            self.up = None
            self.upstream_addr = up.addr
            if reuse:
                up.pool.release(up)
            else:
                up.abort()
            if self.up_paused:
                self.up_paused = False
                self.down.resume_request("upstream")
        self.token += 1
        held = self.held
        if held is not None:
            self.held = None
            self.ctx.balancers.release(held)

    def upstream_failed(self, conn, kind: str, stale: bool = False) -> None:
        """The attempt on ``conn`` failed: reset or closed before a complete response
        (``kind`` "reset"), or it sent something we refuse ("protocol")."""
        if conn is not self.up:
            return
        if kind == "protocol":
            log.debug("L7: bad response from %s:%d", conn.addr[0], conn.addr[1])
            self._upstream_failed("protocol", 502, b"bad response from upstream\n")
        else:
            self._upstream_failed(kind, 502, b"upstream connection reset\n" if kind == "reset"
                                  else b"upstream closed the connection\n", stale)

    def _upstream_failed(self, kind: str, status: int, body: bytes, stale: bool = False) -> None:
        """The current attempt failed (reset, timeout, protocol error). Retry or answer."""
        ctx = self.ctx
        ep = self.ep
        self.flags = _FLAGS.get(kind, "")
        if self.trace is not None:
            self.trace.attempt_done(ctx.now(), error=kind)
        self._detach(reuse=False)
        if not stale:  # a pod closing an idle keep-alive connection is not a failing pod
            ctx.balancers.report_failure(ep, self.backend)
        self.stats.error("reset" if kind == "eof" else kind)
        if self.state == STREAMING:
            if self.down.retract():
                # The head had not left yet (it came in the same read as the failure): the
                # client gets a clean error instead of a head followed by a reset.
                self._to("retract", WAITING)
                kind = "protocol"   # a response arrived: not retried
            else:
                # Part of the response is out: the client must see an error, never a short
                # body that looks complete.
                self._account(self.resp_status or 502)
                self._to("abort", ABORTED)
                self.down.abort()
                return
        self._add_tried(ep)
        if self._may_retry(kind, stale):
            self.stats.retry()
            self.interim = self.interim_bytes = 0
            self._arm(ctx.now())
            if stale:
                # The pooled connection was closed by the pod meanwhile: same endpoint, fresh
                # connection; this does not count as an attempt.
                self.attempts -= 1
                self._attempt(ep, "retry", fresh=True)
                return
            nxt = ctx.balancers.pick(self.backend, self.down.peer_ip, exclude=self.tried,
                                     policy=self.backend.l7_policy)
            if nxt is None:
                nxt = ctx.balancers.pick(self.backend, self.down.peer_ip, policy=self.backend.l7_policy)
            if nxt is not None:
                self._attempt(nxt, "retry")
                return
        self._fail(status, body)

    def _may_retry(self, kind: str, stale: bool) -> bool:
        if self.replay is None or kind == "protocol":
            return False
        if self.method not in IDEMPOTENT_METHODS:
            return False
        if stale:
            return True  # the keep-alive race, not a failing pod: outside the budget
        if kind == "timeout" and self.action.per_try_timeout is None:
            return False  # the route's whole timeout is spent
        return self.attempts < self.action.attempts and self._take_budget()

    def _take_budget(self) -> bool:
        """A slot of the backend's retry budget for this request (``l7.stats.take_retry_slot``).
        A request holds at most one slot (its retries run one after the other) from its first
        budgeted retry until it is accounted."""
        if self.retrying:
            return True
        budget = self.budget
        if budget is None:
            return False
        if not take_retry_slot(budget):
            self.stats.error("retry_budget")
            self.ctx.retry_budget_overflows += 1
            return False
        self.retrying = True
        return True

    def _special_status(self, conn, head, whole: bool) -> bool:
        """A status the route retries on or intercepts: True when this response is not
        relayed (a retry or the intercept's request is under way)."""
        action = self.action
        if head.status in action.retry_on and self._retry_status(conn, head, whole):
            return True
        divert = action.intercepts.get(head.status)
        return divert is not None and self._divert(conn, head, whole, divert)

    def _divert(self, conn, head, whole: bool, action) -> bool:
        """The pod answered a status the route intercepts (ingress-nginx's custom-http-errors):
        discard that response and send the request with ``action`` instead - once; its
        response is relayed whatever it is. Only a request read completely and kept for replay
        can be sent again; otherwise (or with no endpoint for ``action``) the pod's response
        is relayed as is."""
        if self.replay is None or self.req != COMPLETE or not action.backends:
            return False
        ref = action.backends[0]
        backend = self.snap.backends.get(ref.key) if ref.key is not None else None
        if backend is None or not backend.usable:
            return False
        ctx = self.ctx
        ep = ctx.balancers.pick(backend, self.down.peer_ip, policy=backend.l7_policy)
        if ep is None:
            return False
        complete = whole or conn.discard_rest()
        self._detach(reuse=complete and head.keep_alive)
        self.action = action
        self.ref = ref
        self.backend = backend
        self.extra_fields = self.replaced = None
        for f in action.filters:
            f.on_request(self)   # synchronous: they only add header fields
        self.resp_status = 0
        self.up_keep = False
        self.interim = self.interim_bytes = 0
        self.timeout = action.per_try_timeout or action.timeout or 0.0
        self._arm(ctx.now())
        self._attempt(ep, "retry")
        return True

    def _retry_status(self, conn, head, whole: bool) -> bool:
        """A retryable status (502/503/504 by default) from the pod, nothing of it sent to the
        client yet: retry the request on another endpoint when it may be retried (idempotent,
        replayable, completely read from the client, attempts left, a different endpoint to
        try, budget). The discarded response is read to its end if it is already here (then
        the connection is pooled when keep-alive; ``whole``: it is), else that connection is
        closed. False: relay the response as is."""
        if (self.replay is None or self.req != COMPLETE or self.attempts >= self.action.attempts
                or self.method not in IDEMPOTENT_METHODS):
            return False
        ctx = self.ctx
        ep = self.ep
        self._add_tried(ep)
        nxt = ctx.balancers.pick(self.backend, self.down.peer_ip, exclude=self.tried,
                                 policy=self.backend.l7_policy)
        if nxt is None or (nxt.ip, nxt.port) in self.tried or not self._take_budget():
            return False
        complete = whole or conn.discard_rest()
        self._detach(reuse=complete and head.keep_alive)
        ctx.balancers.report_failure(ep, self.backend)  # outlier detection counts 5xx
        self.stats.retry()
        self.resp_status = 0
        self.up_keep = False
        self.interim = self.interim_bytes = 0
        self._arm(ctx.now())
        self._attempt(nxt, "retry")
        return True

