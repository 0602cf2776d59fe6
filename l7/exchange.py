"""The L7 exchange: one request, from its head to the end of its response, with no I/O.

An ``Exchange`` is created by a downstream shell (HTTP/1.1 today: ``l7.downstream``; an HTTP/2
stream drives it the same way) for each request head. It decides everything between the
client and the pods: route lookup, the route's filters, the backend and endpoint, each upstream
attempt, retries and the retry budget, per-try and overall timeouts, how 1xx responses are
treated, and what the client is told when something fails. The shells only translate between
bytes and the calls below; time comes in as numbers (``now``), so the whole exchange is tested
with fake shells and a fake clock (tests/test_exchange.py).

The calls in (events) are the public methods below; the calls out (actions) go to ``self.down``
and to the attempt's upstream connection, whose interfaces are ``l7.contracts``.

Everything that changes the exchange's state is in this module; the states and the events that
move them are the table below. The response side is one of:

=========== ===================================================================================
ROUTING     head received, nothing decided yet
CONNECTING  an endpoint is chosen, a new upstream connection is being opened
WAITING     the request (head, and body as it comes) is going upstream; no final head yet
STREAMING   the final response head went to the client; body bytes follow
TUNNEL      a 101 Switching Protocols: bytes flow both ways unparsed
DONE        the response is complete (relayed or answered by the proxy)
ABORTED     the exchange ended without a complete response (client gone, truncated upstream)
=========== ===================================================================================

and the request side is RECEIVING (body bytes may still come) or COMPLETE.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from . import telemetry
from .filters import filtered_request, redirect_location
from .headers import IDEMPOTENT_METHODS, request_headers, response_headers
from .requestid import new_request_id
from .stats import take_retry_slot

__all__ = [
    "ABORTED", "COMPLETE", "CONNECTING", "DONE", "RECEIVING", "ROUTING", "STREAMING", "TUNNEL",
    "WAITING", "TRANSITIONS", "HOLD", "Exchange", "checked_state", "checked_to", "successors", "REPLAY_MAX", "MAX_INTERIM", "MAX_INTERIM_BYTES",
]

log = logging.getLogger("meshproxy.l7")

# Response side.
ROUTING, CONNECTING, WAITING, STREAMING, TUNNEL, DONE, ABORTED = (
    "routing", "connecting", "waiting", "streaming", "tunnel", "done", "aborted")
# Request side.
RECEIVING, COMPLETE = "receiving", "complete"

# Every legal move of the response side: (state, event) -> states it may go to. Events:
#   routed       the route, backend and endpoint are chosen (a pooled connection or a new one)
#   answer       the proxy answers itself (no route, redirect, no endpoint, fault, error ...)
#   connected    the new upstream connection is open
#   retry        the attempt failed and another one starts (connect failure, reset, timeout,
#                a retryable status)
#   interim      a 1xx other than 101 arrived
#   head         the final response head arrived and went to the client
#   whole        a complete response arrived in one piece and went to the client
#   tunnel       a 101 arrived
#   end          the response body ended
#   fail         the attempt failed and is answered (502 / 503 / 504) - before any response byte
#   abort        the exchange ends without a complete response: client gone, failure after the
#                head went out, a framing error in the request body, an internal error
#   retract      the attempt failed in the same read that brought the head, which had not been
#                written yet: as if it never came
TRANSITIONS: dict[tuple[str, str], frozenset[str]] = {
    (ROUTING, "routed"): frozenset((CONNECTING, WAITING)),
    (ROUTING, "answer"): frozenset((DONE,)),
    (ROUTING, "abort"): frozenset((ABORTED,)),
    (CONNECTING, "connected"): frozenset((WAITING,)),
    (CONNECTING, "retry"): frozenset((CONNECTING, WAITING)),
    (CONNECTING, "fail"): frozenset((DONE,)),
    (CONNECTING, "answer"): frozenset((DONE,)),
    (CONNECTING, "abort"): frozenset((ABORTED,)),
    (WAITING, "interim"): frozenset((WAITING,)),
    (WAITING, "head"): frozenset((STREAMING, DONE)),
    (WAITING, "whole"): frozenset((DONE,)),
    (WAITING, "tunnel"): frozenset((TUNNEL,)),
    (WAITING, "retry"): frozenset((CONNECTING, WAITING)),
    (WAITING, "fail"): frozenset((DONE,)),
    (WAITING, "answer"): frozenset((DONE,)),
    (WAITING, "abort"): frozenset((ABORTED,)),
    (STREAMING, "end"): frozenset((DONE,)),
    (STREAMING, "abort"): frozenset((ABORTED,)),
    (STREAMING, "retract"): frozenset((WAITING,)),
    (TUNNEL, "end"): frozenset((DONE,)),
    (TUNNEL, "abort"): frozenset((ABORTED,)),
    (DONE, "abort"): frozenset((ABORTED,)),    # the client left before the request body ended
}


def successors(state: str) -> frozenset[str]:
    """Every state TRANSITIONS lets ``state`` move to, whatever the event."""
    return frozenset(t for (s, _e), targets in TRANSITIONS.items() if s == state for t in targets)


def checked_state(slot):
    """A property over the ``state`` slot that refuses a move TRANSITIONS does not allow from
    the current state by any event (tests install it on Exchange; see ``_to``)."""
    def get(self):
        return slot.__get__(self)

    def set(self, new):
        try:
            old = slot.__get__(self)
        except AttributeError:   # the first assignment, in __init__
            old = None
        if old is not None and old != new and new not in successors(old):
            raise AssertionError(f"exchange: no move from {old} to {new}")
        slot.__set__(self, new)
    return property(get, set)


def checked_to(self, event: str, state: str) -> None:
    """``Exchange._to`` checking every move against TRANSITIONS (tests install it; the check is a
    dict probe per move, saved in production)."""
    if state not in TRANSITIONS.get((self.state, event), ()):
        raise AssertionError(f"exchange: {event!r} does not lead from {self.state} to {state}")
    self.state = state

# Extension filters (``Action.filters``) are objects with ``on_request(exchange)`` and, if they
# change responses, ``on_response(exchange, status, fields) -> fields``. ``on_request`` may
# answer (``exchange.answer(status, body, headers)``), add upstream fields
# (``exchange.add_request_header``), or return HOLD and later call ``exchange.proceed()`` or
# ``exchange.answer()`` (an external authorization call, a rate limiter's wait). The exchange
# stays in ROUTING meanwhile and the request body waits with it.
HOLD = object()

# Request bytes kept for a retry (head + body as sent); beyond this a request is not replayable.
REPLAY_MAX = 64 * 1024
# Request bytes queued while the upstream connection is being opened before the client is paused.
PENDING_HIGH = 256 * 1024
# Interim (1xx) responses an upstream may send before its final one, in number and in bytes. Real
# servers send one 100 Continue and perhaps a 103 Early Hints or two; a pod sending an endless
# stream of them would otherwise keep the proxy parsing (and, for 103, relaying) without end.
# Past either bound the attempt fails with 502 and its connection is closed.
MAX_INTERIM = 16
MAX_INTERIM_BYTES = 64 * 1024

_rand = random.random
# Access-log response flags by the kind of upstream failure (Envoy's codes).
_FLAGS = {"timeout": "UT", "reset": "UR", "eof": "UC", "protocol": "UPE"}


class Exchange:
    """One request from head to the end of its response (see the module docstring)."""

    __slots__ = (
        "ctx", "down", "head", "method", "t0", "snap", "route", "action", "ref", "backend", "stats",
        "ep", "held", "up", "attempts", "connect_failures", "tried", "token", "state", "req",
        "replay", "replay_bytes", "pending", "pending_bytes", "delivered", "trailers", "resp_status", "resp_bytes",
        "up_keep", "interim", "interim_bytes", "budget", "retrying", "deadline", "hard_deadline",
        "timeout", "up_paused", "down_paused", "accounted", "listener", "upstream_addr", "delaying", "held_at",
        "bodiless", "done_keep", "filter_next", "extra_fields", "request_id", "rid_generated", "trace",
        "req_bytes", "flags",
    )

    def __init__(self, ctx: Any, down: Any, head: Any, now: float, listener: Any = None,
                 complete: bool = False) -> None:
        """``complete``: the shell has the whole request already (a bodiless head read whole)."""
        self.ctx = ctx
        self.down = down
        self.head = head
        self.method = head.method
        self.t0 = now
        self.listener = listener          # HTTPListener (its route table) or None: the Ingress table
        self.snap = None
        self.route = self.action = self.ref = self.backend = self.stats = None
        self.ep = self.held = self.up = self.tried = self.budget = None
        self.attempts = self.connect_failures = self.token = 0
        self.state = ROUTING
        # The request side completes when the shell says so (request_end), also for a request
        # without a body: until then its parser has not finished the message.
        self.req = COMPLETE if complete else RECEIVING
        self.bodiless = not (head.chunked or head.content_length)
        self.done_keep = True           # what _done says once the request side completes
        # Body chunks kept for a retry while they are at most REPLAY_MAX bytes (None: too big,
        # the request cannot be replayed); chunks not yet written to any connection (while the
        # first connection opens, or a fault delay runs); whether anything went upstream yet.
        self.replay: list[bytes] | tuple | None = ()   # () until the first chunk
        self.replay_bytes = 0
        self.pending: list[bytes] | tuple = ()
        self.pending_bytes = 0
        self.delivered = False
        self.trailers: list | None = None
        self.resp_status = self.resp_bytes = 0
        self.up_keep = False
        self.interim = self.interim_bytes = 0
        self.retrying = False
        self.deadline = 0.0
        self.hard_deadline = 0.0          # the route's request timeout (all attempts), 0: none
        self.delaying = False             # a fault delay runs before the first attempt
        self.held_at = None               # when a filter that held the request let it go
        self.timeout = 0.0
        self.up_paused = self.down_paused = False
        self.accounted = False
        self.upstream_addr = None         # (ip, port) of the last attempt's connection
        self.filter_next = 0
        self.extra_fields: list | None = None   # fields extension filters add upstream
        self.request_id = b""
        self.rid_generated = False
        self.trace = None                 # l7.tracing.RequestTrace with --otlp-endpoint
        self.req_bytes = 0
        self.flags = ""                   # the access log's response flags (Envoy's codes)

    # ------------------------------------------------------------------------------------------
    # state

    def _to(self, event: str, state: str) -> None:
        """Move the response side (``checked_to`` replaces this in tests). The two moves of
        every keep-alive request assign ``state`` directly, saving the call; tests check those
        through ``checked_state``, which only knows the states, not the event."""
        self.state = state

    @property
    def finished(self) -> bool:
        return self.state == DONE or self.state == ABORTED

    # ------------------------------------------------------------------------------------------
    # the request

    def start(self) -> None:
        """Route the request and start the first attempt, or answer it."""
        ctx = self.ctx
        head = self.head
        ctx.active += 1
        for name, value in head.headers:
            if len(name) == 12 and name.lower() == b"x-request-id":
                self.request_id = value
                break
        else:
            self.request_id = new_request_id()
            self.rid_generated = True
        if ctx.tracing is not None:
            telemetry.begin_trace(self)
        method = self.method
        if method == b"CONNECT":
            return self._local(405, b"CONNECT is not supported here\n", close=True)
        path = head.path
        if path == b"*":  # "OPTIONS *" (the parser allows "*" for OPTIONS only): about the server
            # itself, RFC 9112 §3.2.4 - answered here, never routed (docs/routing.md).
            return self._local(200, b"", extra=((b"Allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),))
        snap = ctx.runtime.snapshot
        self.snap = snap
        if snap is None:
            return self._local(503, b"no configuration yet\n")
        lst = self.listener
        route, stats = ctx.route(snap, lst.routes if lst is not None else snap.routes, head, self)
        if route is None:
            if stats is None:
                ctx.bad_request(400)
                return self._local(400, b"invalid request path\n")
            ctx.no_route()
            self.stats = stats
            return self._local(404, b"404 page not found: no Ingress rule matches this host and path\n"
                               if lst is None else b"404 page not found: no route matches this host and path\n")
        self.route = route
        action = self.action = route.action
        self.stats = stats
        redirect = action.redirect
        if redirect is not None:
            if not redirect.only_plaintext:
                return self._redirect(redirect)
            if not self.down.tls and not self._forwarded_https():
                return self._redirect(redirect)
        if action.filters:
            self._run_filters()
        elif action.fault is not None:
            self._after_filters()
        else:
            self._forward()

    def _run_filters(self) -> None:
        """The route's extension filters in order (see ``HOLD``), then the rest of routing."""
        filters = self.action.filters
        while self.filter_next < len(filters):
            f = filters[self.filter_next]
            self.filter_next += 1
            held = f.on_request(self)
            if self.state != ROUTING:
                return            # the filter answered
            if held is HOLD:
                return            # it calls proceed() or answer() when it knows
        self._after_filters()

    def proceed(self) -> None:
        """A filter that held the request lets it go on."""
        if self.state == ROUTING and not self.accounted:
            self.held_at = self.ctx.now()
            self._run_filters()

    def answer(self, status: int, body: bytes = b"", headers=()) -> None:
        """A filter answers the request itself (403, 401, a CORS preflight, 429 ...)."""
        if self.state == ROUTING and not self.accounted:
            self._local(status, body, extra=tuple(headers))

    def add_request_header(self, name: bytes, value: bytes) -> None:
        """A filter adds a field to what goes upstream (e.g. from an auth service's answer)."""
        if self.extra_fields is None:
            self.extra_fields = []
        self.extra_fields.append((name, value))

    def _after_filters(self) -> None:
        action = self.action
        now = self.held_at
        fault = action.fault
        if fault is not None:
            if fault.abort_percent and _rand() * 100 < fault.abort_percent:
                return self._local(fault.abort_status, b"fault injected\n")
            if fault.delay and fault.delay_percent and _rand() * 100 < fault.delay_percent:
                # Wait, then go on (on_deadline); the request body waits with us.
                self.delaying = True
                self._set_deadline((now or self.t0) + fault.delay)
                return
        self._forward(now)

    def _forward(self, now: float | None = None) -> None:
        """Pick the backend and the endpoint and start the first attempt (``now``: when that
        is not the request's arrival: after a fault delay or a filter's wait)."""
        ctx = self.ctx
        action = self.action
        stats = self.stats
        snap = self.snap
        head = self.head
        ref = action.pick_backend(_rand()) if len(action.backends) != 1 else action.backends[0]
        self.ref = ref
        if ref is None:
            # No backend reference, or every weight is 0: nothing may receive this request.
            return self._local(500, b"no backend of this route takes traffic\n")
        key = ref.key
        if key is None:
            # An invalid reference (a missing Service, a refused cross-namespace reference).
            stats.error("no_endpoints")
            if action.invalid_status == 503:
                return self._local(503, b"no endpoint available for this route\n")
            return self._local(action.invalid_status, b"the backend of this route is not valid\n")
        backend = snap.backends.get(key)
        if backend is None or not backend.usable:
            stats.error("no_endpoints")
            return self._local(503, b"no endpoint available for this route\n")
        usable = backend.usable
        if len(usable) == 1 and backend.affinity_timeout is None:
            ep = usable[0]  # nothing to choose (and no affinity pin to record)
        else:
            ep = ctx.balancers.pick(backend, self.down.peer_ip, policy=backend.l7_policy)
        if ep is None:
            stats.error("no_endpoints")
            return self._local(503, b"no endpoint available for this route\n")
        self.backend = backend
        self.timeout = action.per_try_timeout or action.timeout or 0.0
        # Retry budget of this backend: [active requests, retries in flight] (see _take_budget).
        budget = ctx.budgets.get(key)
        if budget is None:
            budget = ctx.budgets[key] = [0, 0]
        budget[0] += 1
        self.budget = budget
        if head.expect_continue:
            # We answer the expectation ourselves once the request is routed (nginx and Envoy
            # do the same; RFC 9110 §10.1.1 lets an intermediary do so); Expect is not
            # forwarded and a 100 from the pod is not relayed a second time. A request refused
            # before this point gets its final status without a 100 and the connection closes.
            self.down.send_continue()
        if action.request_timeout:
            self.hard_deadline = self.t0 + action.request_timeout
            self._arm(self.t0 if now is None else now)
        elif self.timeout:
            when = self.deadline = (self.t0 if now is None else now) + self.timeout
            self.down.set_deadline(when)
        self._attempt(ep, "routed")

    def _gap(self) -> None:
        """The upstream sent something: it has another ``timeout`` for the next bytes (capped by
        the request timeout). The shell's timer re-checks before it fires, so no re-arm."""
        when = self.ctx.now() + self.timeout
        hard = self.hard_deadline
        self.deadline = hard if hard and hard < when else when

    def _arm(self, now: float) -> None:
        """The deadline of the attempt starting now: its timeout, capped by the request's."""
        when = now + self.timeout if self.timeout else 0.0
        hard = self.hard_deadline
        if hard and (not when or hard < when):
            when = hard
        self._set_deadline(when)

    def _forwarded_https(self) -> bool:
        """A trusted proxy in front says the client spoke HTTPS to it."""
        if not self.down.client.trusted:
            return False
        for name, value in self.head.headers:
            if name.lower() == b"x-forwarded-proto":
                return value.strip().lower() == b"https"
        return False

    def _redirect(self, r) -> None:
        down = self.down
        location = redirect_location(r, self.route, self.head, down.tls, down.client.port, self.ctx.tls_port)
        self._local(r.status, b"", extra=((b"Location", location),))

    def request_data(self, data: bytes) -> None:
        """Request body bytes from the client (framing removed)."""
        if self.state != ROUTING and self.state != CONNECTING and self.state != WAITING:
            return  # answered or ended: the body is discarded (the shell closes after)
        self.req_bytes += len(data)
        replay = self.replay
        if replay is not None:
            size = self.replay_bytes + len(data)
            if size <= REPLAY_MAX:
                if replay:
                    replay.append(data)
                else:
                    self.replay = [data]
                self.replay_bytes = size
            else:
                self.replay = None  # too big to keep: this request cannot be retried any more
                if self.delivered and self.up is None:
                    # A retry is connecting and needs the whole body again: it cannot have it.
                    self._detach(reuse=False)
                    self._fail(502, b"request body too large to retry\n")
                    return
        up = self.up
        if up is not None:
            up.send_data(data)
            if self.timeout and self.state == WAITING:
                # The client is still sending: the upstream's response timeout counts from now.
                self._arm(self.ctx.now())
            return
        if self.pending:
            self.pending.append(data)
        else:
            self.pending = [data]
        self.pending_bytes += len(data)
        if self.pending_bytes > PENDING_HIGH:
            self.down.pause_request("connecting")

    def request_end(self, trailers: list | None) -> None:
        """The request body (or a bodiless request) is complete."""
        if self.req == COMPLETE:
            return
        self.req = COMPLETE
        self.trailers = trailers
        up = self.up
        if up is not None:
            up.send_end(trailers)
            if not self.down.processing:
                up.flush()
        elif self.state == DONE:
            # Answered before the request's end was read (a bodiless request answered by us).
            self._done(self.done_keep)

    def request_error(self, status: int, reason: str) -> bool:
        """The request body turned out malformed (or too large) while streaming: the upstream
        got part of it; that attempt is finished, and so is the client connection. True when
        part of the response went out already (the shell aborts), False when the shell answers
        ``status`` itself."""
        self.req = COMPLETE
        self._detach(reuse=False)
        started = self.state == STREAMING or self.state == TUNNEL
        self._account(self.resp_status if started and self.resp_status else status)
        self._to("abort", ABORTED)
        return started

    def client_gone(self, why: str) -> None:
        """The client connection ended while this exchange was in flight."""
        if self.state == ABORTED:
            return
        log.debug("L7: %s during a request", why)
        self._detach(reuse=False)
        if self.state == TUNNEL:
            self._account(101)
        elif self.state == DONE:
            self._account(self.resp_status)
        else:
            self._account(499)   # nginx's convention: the client went away
        self._to("abort", ABORTED)

    def flush(self) -> None:
        """The shell finished handling one read: push what the attempt has queued upstream."""
        up = self.up
        if up is not None:
            up.flush()

    # ------------------------------------------------------------------------------------------
    # back-pressure

    def downstream_paused(self) -> None:
        self.down_paused = True
        up = self.up
        if up is not None:
            up.pause_reading()

    def downstream_resumed(self) -> None:
        self.down_paused = False
        up = self.up
        if up is not None:
            up.resume_reading()
            # The upstream was paused for the client: its read gap (or the tunnel's idle
            # time) counts from now, not from before the pause.
            if self.state == STREAMING and self.timeout:
                self._gap()
            elif self.state == TUNNEL:
                self.deadline = self.ctx.now() + self.ctx.settings.idle_timeout

    def upstream_paused(self) -> None:
        self.up_paused = True
        self.down.pause_request("upstream")

    def upstream_resumed(self) -> None:
        self.up_paused = False
        self.down.resume_request("upstream")

    # ------------------------------------------------------------------------------------------
    # timers

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        if when:
            self.down.set_deadline(when)

    def on_deadline(self, now: float) -> None:
        """The shell's timer found ``self.deadline`` passed."""
        state = self.state
        if state == TUNNEL:
            self._detach(reuse=False)
            self._account(101)
            self._to("abort", ABORTED)
            self.down.exchange_done(False)
            return
        if state == ROUTING:
            if self.delaying:
                self.delaying = False
                self.deadline = 0.0
                self._forward(now)
            return
        if self.hard_deadline and now >= self.hard_deadline:
            # The route's request timeout: all attempts together; no retry after it.
            if state == STREAMING:
                self._upstream_failed("timeout", 504, b"")
            elif state == CONNECTING or state == WAITING:
                self._detach(reuse=False)
                self.stats.error("timeout")
                self._fail(504, b"request timed out\n")
            return
        if state == STREAMING:
            self._upstream_failed("timeout", 504, b"upstream timed out\n")
            return
        if state == CONNECTING or state == WAITING:
            if self.req == RECEIVING and not self.bodiless and state == WAITING and not self.up_paused:
                # We are waiting for the client's body, not for the upstream.
                self._detach(reuse=False)
                self.ctx.bad_request(408)
                self._local(408, b"request body timeout\n", close=True)
                return
            self._upstream_failed("timeout", 504, b"upstream timed out\n")

    # ------------------------------------------------------------------------------------------
    # attempts

    def _attempt(self, ep, event: str, fresh: bool = False) -> None:
        ctx = self.ctx
        self.ep = self.held = ep
        self.attempts += 1
        ctx.balancers.acquire(ep)
        addr = (ep.ip, ep.port)
        conn = None if fresh else ctx.pool.take(addr)
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
        ctx.pool.connect(addr, (backend.namespace, backend.service), self, token)

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
            tail = telemetry.upstream_tail(self, "%s:%d" % conn.addr, self.ctx.now())
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
        fields = request_headers(head.headers, head.connection_tokens, self.down.client,
                                 head.upgrade is not None, authority, self.ctx.via)
        if self.trace is not None:
            fields = telemetry.strip_trace_fields(fields)
        return fields

    def _filtered_request(self, tgt: bytes, fields: list) -> tuple[bytes, list]:
        tgt, fields = filtered_request(self.action, self.ref, self.route, self.head, tgt, fields)
        if self.extra_fields is not None:
            fields = fields + self.extra_fields
        return tgt, fields

    def connected(self, token: int, conn, exc: BaseException | None) -> None:
        """The pool opened (``conn``) or failed to open (``exc``) the connection asked for."""
        if token != self.token or self.state != CONNECTING:
            # Nobody waits for it any more: keep a good new connection for later.
            if conn is not None:
                self.ctx.pool.release(conn)
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
        self._fail(503, b"no endpoint could be reached\n")

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
                self.ctx.pool.release(up)
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

    # ------------------------------------------------------------------------------------------
    # the response (called by the upstream connection)

    def response_whole(self, conn, head, body: bytes) -> bool:
        """A complete response with a Content-Length body arrived in one read. False: not
        taken (the connection feeds it through the general path instead)."""
        if conn is not self.up or self.state != WAITING:
            return False
        status = head.status
        if self.trace is not None:
            self.trace.attempt_done(self.ctx.now(), status=status)
        if status in self.action.retry_on and self._retry_status(conn, head, True):
            return True
        self.up_keep = head.keep_alive
        self.resp_status = status
        self.resp_bytes = len(body)
        fields = response_headers(head.headers, head.connection_tokens, False, self.ctx.via)
        if not self.action.plain_response:
            fields = self._response_filters(fields, status)
        if self.rid_generated:
            # A generated id goes back to the client too, unless the pod names one itself.
            for n, _ in fields:
                if len(n) == 12 and n.lower() == b"x-request-id":
                    break
            else:
                fields.append((b"x-request-id", self.request_id))
        self.state = DONE               # event: whole (hot path: assigned directly)
        self.down.send_whole(status, head.reason, fields, head.content_length, body, self.req == COMPLETE)
        self._response_complete()
        return True

    def response_head(self, conn, head) -> None:
        """A response head from the pod (interim or final)."""
        if conn is not self.up:
            return
        status = head.status
        if status < 200:
            if status == 101:
                if self.head.upgrade is None:
                    self._upstream_failed("protocol", 502, b"upstream switched protocols unasked\n")
                    return
                self.resp_status = 101
                fields = response_headers(head.headers, head.connection_tokens, True, self.ctx.via)
                self._to("tunnel", TUNNEL)
                self.deadline = self.ctx.now() + self.ctx.settings.idle_timeout
                self.down.start_tunnel(101, head.reason, fields, conn)
                return
            self.interim += 1
            self.interim_bytes += 32 + sum(len(n) + len(v) + 4 for n, v in head.headers)
            if self.interim > MAX_INTERIM or self.interim_bytes > MAX_INTERIM_BYTES:
                self.ctx.interim_flood()
                self._upstream_failed("protocol", 502, b"upstream sent too many interim responses\n")
                return
            self._to("interim", WAITING)
            if status != 100 and self.head.version != 10:
                # 103 Early Hints and other 1xx: relayed (HTTP/1.0 clients get none). Our own
                # 100 went out already when the client asked for it.
                fields = response_headers(head.headers, head.connection_tokens, False, self.ctx.via)
                self.down.send_interim(status, head.reason, fields)
            return
        if self.trace is not None:
            self.trace.attempt_done(self.ctx.now(), status=status)
        if status in self.action.retry_on and self._retry_status(conn, head, False):
            return
        self.resp_status = status
        self.up_keep = head.keep_alive
        fields = response_headers(head.headers, head.connection_tokens, False, self.ctx.via)
        if not self.action.plain_response:
            fields = self._response_filters(fields, status)
        if self.rid_generated:
            # A generated id goes back to the client too, unless the pod names one itself.
            for n, _ in fields:
                if len(n) == 12 and n.lower() == b"x-request-id":
                    break
            else:
                fields.append((b"x-request-id", self.request_id))
        kind = head.body_kind(self.method)
        self._to("head", DONE if kind == "none" else STREAMING)
        if self.timeout:
            self._gap()
        self.down.send_head(status, head.reason, fields, kind, head.content_length, head.chunked,
                            self.req == COMPLETE)

    def _response_filters(self, fields: list, status: int) -> list:
        action = self.action
        if action is not None and not action.plain_response:
            if action.response_headers is not None:
                fields = action.response_headers.apply(fields)
            ref = self.ref
            if ref is not None and ref.response_headers is not None:
                fields = ref.response_headers.apply(fields)
            for f in action.filters:
                on_response = getattr(f, "on_response", None)
                if on_response is not None:
                    fields = on_response(self, status, fields)
        return fields

    def response_data(self, conn, data: bytes) -> None:
        if conn is not self.up:
            return
        if self.state == TUNNEL:
            self.down.tunnel_write(data)
            self.deadline = self.ctx.now() + self.ctx.settings.idle_timeout
            return
        self.resp_bytes += len(data)
        self.down.send_data(data)

    def response_batch(self, conn) -> None:
        """The upstream connection handled one read: refresh the read deadline, let the shell
        write what it collected."""
        if conn is not self.up:
            return
        if self.state == STREAMING and self.timeout:
            # Refresh the read deadline (upstream idle between body reads).
            self._gap()
        self.down.flush()

    def response_end(self, conn, trailers: list | None) -> None:
        if conn is not self.up:
            return
        if self.state == STREAMING:
            self._to("end", DONE)
            self.down.send_end(trailers)
        self._response_complete()

    def _response_complete(self) -> None:
        ctx = self.ctx
        ep = self.ep
        self._detach(reuse=self.up_keep and self.req == COMPLETE)
        balancers = ctx.balancers
        if self.resp_status >= 500:
            # Outlier detection counts 5xx answers as failures (Envoy's consecutive_5xx).
            balancers.report_failure(ep, self.backend)
        elif balancers.failures:  # only an endpoint with failures has anything to reset
            balancers.report_success(ep, self.backend)
        if self.req == COMPLETE:
            self._done()
        elif not self.bodiless:
            # The response is complete before the request: the rest of the body is not read
            # (the shell closes the connection after the response).
            self._done(keep=False)

    def upstream_eof(self, conn) -> bool:
        """The pod half-closed a tunnel. True: keep the connection half-open."""
        if conn is not self.up or self.state != TUNNEL:
            return False
        return self.down.tunnel_eof()

    def tunnel_data(self, data: bytes) -> None:
        up = self.up
        if up is not None:
            up.tunnel_write(data)
            self.deadline = self.ctx.now() + self.ctx.settings.idle_timeout

    def tunnel_closed(self) -> None:
        """The pod's side of a tunnel is gone: the exchange is over, the client connection
        closes."""
        if self.state == TUNNEL:
            self.up = None
            self._detach(reuse=False)
            self._account(101)
            self._to("end", DONE)
            self.down.exchange_done(False)

    def internal_error(self, exc: BaseException) -> None:
        """A bug met while handling an upstream event: the shell answers 500 or aborts."""
        self.down.internal_error(exc)

    # ------------------------------------------------------------------------------------------
    # ending

    def _fail(self, status: int, body: bytes) -> None:
        """An upstream failure before any response byte: answer it; close if the request body
        was not read completely (it cannot be skipped safely)."""
        self._local(status, body, close=self.req != COMPLETE and not self.bodiless, event="fail")

    def _local(self, status: int, body: bytes, close: bool = False, extra=(), event: str = "answer") -> None:
        """Answer the request ourselves."""
        self.resp_status = status
        self.resp_bytes = len(body)
        self._to(event, DONE)
        complete = self.req == COMPLETE
        # A body not read to its end cannot be skipped safely: the connection closes after.
        keep = not close and (complete or self.bodiless)
        if self.rid_generated:
            extra = (*extra, (b"x-request-id", self.request_id))
        self.down.send_local(status, body, extra, keep)
        if complete or not keep:
            self._done(keep)
        else:
            self.done_keep = keep   # done once the shell reports the request's end

    def _account(self, status: int) -> None:
        """Count the request once: metrics, access log, active gauge, budget."""
        if self.accounted:
            return
        self.accounted = True
        ctx = self.ctx
        ctx.active -= 1
        budget = self.budget
        if budget is not None:
            self.budget = None
            budget[0] -= 1
            if self.retrying:
                self.retrying = False
                budget[1] -= 1
        dt = ctx.now() - self.t0
        stats = self.stats
        if stats is not None:
            stats.done(status, dt)
        if ctx.access_log is not None or self.trace is not None:
            telemetry.finish(self, status, dt)

    def _done(self, keep: bool = True) -> None:
        """Request and response are both complete (or the connection is to close)."""
        self._account(self.resp_status)
        self.down.exchange_done(keep)
