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

Everything that changes the exchange's state is in this module and its upstream half
(``l7.attempts``); the states and the events that move them are the table in ``l7.states``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from . import telemetry
from .attempts import Attempts
from .filters import redirect_location
from .mirror import mirror
from .requestid import new_request_id
from .states import (
    ABORTED,
    COMPLETE,
    CONNECTING,
    DONE,
    RECEIVING,
    ROUTING,
    STREAMING,
    TRANSITIONS,
    TUNNEL,
    WAITING,
    checked_state,
    checked_to,
    successors,
)

__all__ = [
    "ABORTED", "COMPLETE", "CONNECTING", "DONE", "RECEIVING", "ROUTING", "STREAMING", "TUNNEL",
    "WAITING", "TRANSITIONS", "HOLD", "Exchange", "checked_state", "checked_to", "successors", "REPLAY_MAX", "MAX_INTERIM", "MAX_INTERIM_BYTES",
]

log = logging.getLogger("meshproxy.l7")

# Extension filters (``Action.filters``) are objects with ``on_request(exchange)`` and, if they
# change responses, ``on_response(exchange, status, fields) -> fields``. ``on_request`` may
# answer (``exchange.answer(status, body, headers)``), add or replace upstream fields
# (``exchange.add_request_header``), or return HOLD and later call ``exchange.proceed()`` or
# ``exchange.answer()`` (an external authorization call, a rate limiter's wait). The exchange
# stays in ROUTING meanwhile and the request body waits with it. What else a filter may touch
# (the only other ways filters steer an exchange):
#   use_action(a)   send the request with action ``a`` instead of the route's (a canary, a
#                   fallback backend); ``a`` carries the same filters, the chain goes on
#   pick_key        bytes: the endpoint is chosen by consistent hash of it (cookie affinity)
#   body_limit      bytes of request body allowed (413 beyond); 0: no limit
#   on_end(fn)      fn() runs once when the exchange is accounted (a concurrency limit's release)
#   filter_data     a dict for the filters' per-request state, keyed by filter
# and, in the context (``exchange.ctx``), the services the server offers filters:
# ``filter_state`` (a dict that outlives snapshots), ``subrequest``, ``offload``, ``now``.
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


class Exchange(Attempts):
    """One request from head to the end of its response (see the module docstring)."""

    __slots__ = (
        "ctx", "down", "head", "method", "t0", "snap", "route", "action", "ref", "backend", "stats",
        "ep", "held", "up", "attempts", "connect_failures", "tried", "token", "state", "req",
        "replay", "replay_bytes", "pending", "pending_bytes", "delivered", "trailers", "resp_status", "resp_bytes",
        "up_keep", "interim", "interim_bytes", "budget", "retrying", "deadline", "hard_deadline",
        "timeout", "up_paused", "down_paused", "accounted", "listener", "upstream_addr", "delaying", "held_at", "buffering", "continued", "mirrored",
        "bodiless", "done_keep", "filter_next", "extra_fields", "request_id", "rid_generated", "trace",
        "req_bytes", "flags", "pick_key", "body_limit", "ending", "filter_data", "replaced",
    )

    HOLD = HOLD   # for filters, which live below l7 and cannot import it

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
        self.buffering = False            # the body is being read before routing goes on
        self.continued = False            # our 100 Continue is sent
        self.mirrored = False
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
        # Set by extension filters only (see HOLD above); plain routes never touch them.
        self.pick_key = None              # consistent-hash key for the endpoint choice
        self.body_limit = 0               # request body bytes allowed (0: unlimited)
        self.ending = None                # callbacks run once at accounting (on_end)
        self.filter_data = None           # per-request state of filters
        self.replaced = None              # lower-case names of client fields filters replace

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
        if lst is not None and lst.tls and self.down.sni is not None:
            # A Gateway HTTPS listener chosen by SNI must not serve a Host that belongs to
            # another listener of the address (RFC 9110 §15.5.20, Gateway API listener
            # isolation): 421 Misdirected Request.
            of = getattr(lst.routes, "listener_of", None)
            if of is not None and of(self.down.sni) != of(head.host.decode("latin-1")):
                return self._local(421, b"misdirected request: this connection's TLS name is for another listener\n")
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
        if not self.bodiless and self.req != COMPLETE and ctx.buffer_bodies:
            # --request-buffer-size: read the body (up to that size) before anything else, so
            # that a slow upload holds no endpoint and no upstream connection meanwhile.
            self.buffering = True
            self._set_deadline(self.t0 + (action.timeout or ctx.settings.upstream_timeout))
            if self.head.expect_continue:
                # The client holds its body back until it sees a 100: ask for it now (as nginx
                # does when it starts reading a body), not after the body we wait for.
                self.continued = True
                self.down.send_continue()
            return
        self._route_on()

    def _route_on(self) -> None:
        """Filters, faults, then the backend and the first attempt."""
        action = self.action
        if action.filters:
            self.filter_data = {}
            self._run_filters()
        elif action.fault is not None:
            self._after_filters()
        else:
            self._forward(self.held_at)

    def _buffered(self) -> None:
        """The body is read (or the buffer is full): go on routing."""
        self.buffering = False
        self.held_at = self.ctx.now()
        self._route_on()

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
        """A filter answers the request itself (403, 401, a CORS preflight, 429 ...). The
        response filters of the filters before it, which let the request pass, see the answer
        too (a 401 carries the CORS fields, as nginx's header filters add them to every
        response of the location)."""
        if self.state == ROUTING and not self.accounted:
            if self.filter_next > 1:
                fields = list(headers)
                for f in self.action.filters[:self.filter_next - 1]:
                    on_response = getattr(f, "on_response", None)
                    if on_response is not None:
                        fields = on_response(self, status, fields)
                headers = fields
            self._local(status, body, extra=tuple(headers))

    def add_request_header(self, name: bytes, value: bytes | None, replace: bool = False) -> None:
        """A filter adds a field to what goes upstream (e.g. from an auth service's answer);
        ``replace``: the client's fields of that name are not forwarded (``value`` None: just
        that)."""
        if self.extra_fields is None:
            self.extra_fields = []
        if replace:
            low = name.lower()
            if self.replaced is None:
                self.replaced = set()
            self.replaced.add(low)
            self.extra_fields = [f for f in self.extra_fields if f[0].lower() != low]
        if value is not None:
            self.extra_fields.append((name, value))

    def use_action(self, action) -> None:
        """A filter sends this request with ``action`` instead of the route's (same filters)."""
        self.action = action

    def on_end(self, fn) -> None:
        """``fn()`` runs once when the exchange is accounted, however it ends."""
        if self.ending is None:
            self.ending = [fn]
        else:
            self.ending.append(fn)

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
        if self.pick_key is not None:
            # A filter's affinity key (ingress-nginx's session cookie): consistent hash over
            # the usable endpoints, so the same key keeps reaching the same pod.
            ep = ctx.balancers.pick(backend, self.down.peer_ip, hash_key=self.pick_key, policy="ring_hash")
        elif len(usable) == 1 and backend.affinity_timeout is None:
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
        if head.expect_continue and not self.continued:
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
        if head.version == 20 and head.grpc_timeout is not None:
            # gRPC: the client's grpc-timeout bounds every attempt like a request timeout.
            self._grpc_deadline(head.grpc_timeout, now)
        self._attempt(ep, "routed")
        if action.mirrors and self.req == COMPLETE:
            self._mirror()

    def _grpc_deadline(self, timeout: float, now: float | None) -> None:
        when = self.t0 + timeout
        if not self.hard_deadline or when < self.hard_deadline:
            self.hard_deadline = when
            self._arm(self.t0 if now is None else now)

    def _mirror(self) -> None:
        if not self.mirrored:
            self.mirrored = True
            mirror(self)

    def forward_head(self) -> tuple[bytes, list]:
        """The target and fields this request goes upstream with (for mirrors)."""
        head = self.head
        tgt = head.target
        authority = None
        if tgt[0] != 47:
            tgt = head.path + (b"?" + head.query if head.query else b"")
            authority = head.host
        fields = self._fields(authority)
        if not (self.action.plain_request and self.extra_fields is None):
            tgt, fields = self._filtered_request(tgt, fields)
        return tgt, fields

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
        if self.body_limit and self.req_bytes > self.body_limit:
            # A filter's body limit (ingress-nginx's proxy-body-size) passed by a body that did
            # not declare its length: whatever went upstream is dropped, the client gets 413.
            self._detach(reuse=False)
            self._local(413, b"request body too large\n", close=True)
            return
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
        if self.buffering:
            if self.pending_bytes >= self.ctx.settings.request_buffer_size:
                self._buffered()   # full: stream the rest
            else:   # the client has another timeout for its next bytes
                self.deadline = self.ctx.now() + (self.action.timeout or self.ctx.settings.upstream_timeout)
            return
        if self.pending_bytes > PENDING_HIGH:
            self.down.pause_request("connecting")

    def request_end(self, trailers: list | None) -> None:
        """The request body (or a bodiless request) is complete."""
        if self.req == COMPLETE:
            return
        self.req = COMPLETE
        self.trailers = trailers
        if self.backend is not None and self.action.mirrors:
            self._mirror()
        up = self.up
        if up is not None:
            up.send_end(trailers)
            if not self.down.processing:
                up.flush()
        elif self.buffering:
            self._buffered()
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
            elif self.buffering:
                # The client stopped sending its body while we buffered it.
                self.ctx.bad_request(408)
                self._local(408, b"request body timeout\n", close=True)
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
    # the response (called by the upstream connection)

    def response_whole(self, conn, head, body: bytes) -> bool:
        """A complete response with a Content-Length body arrived in one read. False: not
        taken (the connection feeds it through the general path instead)."""
        if conn is not self.up or self.state != WAITING:
            return False
        status = head.status
        if self.trace is not None:
            self.trace.attempt_done(self.ctx.now(), status=status)
        if status in self.action.special_statuses and self._special_status(conn, head, True):
            return True
        self.up_keep = head.keep_alive
        self.resp_status = status
        self.resp_bytes = len(body)
        via = self.ctx.via
        plain = self.action.plain_response
        memo = conn.memo_out
        if plain and memo is not None and memo[0] is head and memo[1] is via:
            # The same response head as this connection's previous one (same bytes from the
            # pod, see UpstreamConnection): the same head for the client, without the header
            # policy and the serializer; only the per-request fields are added.
            cached, pod_rid = memo[2], memo[3]
            fields = None
        else:
            fields = self.ctx.response_headers(head.headers, head.connection_tokens, False, via)
            if not plain:
                fields = self._response_filters(fields, status)
            cached = None
            pod_rid = False
            for n, _ in fields:
                if len(n) == 12 and n.lower() == b"x-request-id":
                    pod_rid = True
                    break
        # A generated id goes back to the client too, unless the pod names one itself.
        tail = b"x-request-id: " + self.request_id + b"\r\n" if self.rid_generated and not pod_rid else b""
        self.state = DONE               # event: whole (hot path: assigned directly)
        base = self.down.send_whole(status, head.reason, fields, head.content_length, body, self.req == COMPLETE,
                                    cached, tail)
        if plain and cached is None and base is not None:
            conn.memo_out = (head, via, base, pod_rid)
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
                fields = self.ctx.response_headers(head.headers, head.connection_tokens, True, self.ctx.via)
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
                fields = self.ctx.response_headers(head.headers, head.connection_tokens, False, self.ctx.via)
                self.down.send_interim(status, head.reason, fields)
            return
        if self.trace is not None:
            self.trace.attempt_done(self.ctx.now(), status=status)
        if status in self.action.special_statuses and self._special_status(conn, head, False):
            return
        self.resp_status = status
        self.up_keep = head.keep_alive
        fields = self.ctx.response_headers(head.headers, head.connection_tokens, False, self.ctx.via)
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
        ending = self.ending
        if ending is not None:
            self.ending = None
            for fn in ending:
                fn()
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
