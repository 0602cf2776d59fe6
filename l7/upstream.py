"""Upstream side of the L7 proxy: keep-alive connections to pods, pooled per endpoint.

An ``UpstreamConnection`` is an ``asyncio.Protocol`` owned either by the pool (idle) or by one
client connection for the duration of one request (active). It does no HTTP decisions itself:
it forwards its transport callbacks to its owner (``l7.downstream.ClientConnection``), which
parses responses with the connection's own ``ResponseParser`` (one per connection, reused
across its responses with ``start_next``).

Invariants:

* A connection is in exactly one state: connecting, active (``client`` set), idle (in
  ``_idle[addr]``, ``client`` None) or closed. Only ``release`` puts one into the pool and only
  ``take`` takes one out; a closed or closing transport is never handed out.
* An idle connection keeps reading: a FIN or RST from the pod removes it from the pool at
  once, and bytes arriving while no request is outstanding close it (the pod broke the
  protocol; nothing can be trusted on that connection any more).
* The pool is bounded per endpoint (``settings.upstream_pool_size`` idle connections; the
  most recently used is reused first, so surplus ones age out), idle connections are closed
  after ``settings.upstream_idle_timeout``, and ``apply(snapshot)`` closes idle connections to
  endpoints that are no longer usable; active ones to such endpoints finish their request and
  are then closed instead of pooled.
* Connection counts per (namespace, service) and state live in plain ints and are exported
  to the ``meshproxy_upstream_connections`` gauge by ``export_metrics`` (called once a second):
  the hot path does integer arithmetic, not metric calls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from meshproxy.core import metrics

from .http1 import ResponseParser

__all__ = ["UpstreamConnection", "UpstreamPool"]

log = logging.getLogger("meshproxy.l7")

_CONNECTING, _ACTIVE, _IDLE, _CLOSED = range(4)


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "addr", "labels", "counts", "transport", "parser", "client", "state",
                 "idle_since", "reused", "received", "reading_paused", "requests")

    def __init__(self, pool: UpstreamPool, addr: tuple[str, int], labels: tuple[str, str]) -> None:
        self.pool = pool
        self.addr = addr
        self.labels = labels
        self.counts = pool._counts_for(labels)   # [active, idle]
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(pool.max_head, pool.max_headers)
        self.client = None            # the ClientConnection this connection serves, or None
        self.state = _CONNECTING
        self.idle_since = 0.0
        self.reused = False           # served a request before the current one
        self.received = False         # got a byte for the current request
        self.reading_paused = False
        self.requests = 0             # requests started on this connection

    # -- asyncio callbacks: forwarded to the owner ---------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.upstream_data(self, data)
        else:
            # No request outstanding: the pod sent something we never asked for.
            log.debug("upstream %s:%d sent %d unsolicited bytes; closing", *self.addr, len(data))
            self.abort()

    def eof_received(self) -> bool:
        client = self.client
        if client is not None:
            return client.upstream_eof(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._lost(self)
        client = self.client
        if client is not None:
            self.client = None
            client.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.upstream_pause_writing()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.upstream_resume_writing()

    # -- helpers ---------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.state != _CLOSED:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.state != _CLOSED:
            self.reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Close at once (no reuse); connection_lost follows."""
        self.client = None
        if self.transport is not None and self.state != _CLOSED:
            self.transport.abort()
        self.pool._lost(self)


class UpstreamPool:
    """Idle keep-alive connections per endpoint address, and new connections on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings) -> None:
        self.loop = loop
        self.max_idle = max(0, settings.upstream_pool_size)
        self.idle_timeout = settings.upstream_idle_timeout
        self.connect_timeout = settings.connect_timeout
        self.max_head = settings.max_head_size
        self.max_headers = settings.max_headers
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        # Addresses that may get new requests (usable endpoints of the snapshot in force);
        # None until the first apply(): then every address is allowed.
        self._live: frozenset[tuple[str, int]] | None = None
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        # Coarse clock for idle_since, refreshed by sweep() once a second: the idle timeout
        # needs no better precision and a loop.time() call per request is saved.
        self.now = loop.time()
        self.connects = 0             # connections opened so far (tests and /debug)

    # -- lookups -------------------------------------------------------------------------------

    def _counts_for(self, labels: tuple[str, str]) -> list[int]:
        c = self._counts.get(labels)
        if c is None:
            c = self._counts[labels] = [0, 0]
        return c

    def take(self, addr: tuple[str, int]) -> UpstreamConnection | None:
        """An idle connection to ``addr`` (now active, owned by the caller), or None."""
        stack = self._idle.get(addr)
        while stack:
            conn = stack.pop()
            conn.counts[1] -= 1
            if conn.transport.is_closing():
                conn.state = _CLOSED
                continue
            conn.state = _ACTIVE
            conn.counts[0] += 1
            conn.reused = True
            return conn
        return None

    def connect(self, addr: tuple[str, int], labels: tuple[str, str],
                done: Callable[[UpstreamConnection | None, BaseException | None], None]) -> None:
        """Open a new connection; ``done(conn, None)`` (conn active, owned by the callback) or
        ``done(None, exc)`` is called from the event loop, never synchronously."""
        conn = UpstreamConnection(self, addr, labels)
        task = self.loop.create_task(self._connect(conn, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: UpstreamConnection, done) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(lambda: conn, conn.addr[0], conn.addr[1])
        except (OSError, TimeoutError) as exc:
            # OSError: refused / unreachable / reset during connect; TimeoutError: our deadline.
            conn.state = _CLOSED
            done(None, exc)
            return
        except asyncio.CancelledError:
            conn.state = _CLOSED
            if conn.transport is not None:
                conn.transport.abort()
            raise
        self.connects += 1
        if conn.state == _CLOSED:  # lost already (reset right after connect)
            done(None, ConnectionResetError("connection lost right after connect"))
            return
        conn.state = _ACTIVE
        conn.counts[0] += 1
        # (TCP_NODELAY: uvloop and asyncio set it on every TCP transport already.)
        done(conn, None)

    def release(self, conn: UpstreamConnection) -> None:
        """The owner is done with an active connection that may be reused (the response was
        complete and keep-alive, the whole request was sent): pool it, or close it."""
        if conn.state != _ACTIVE:
            return
        conn.client = None
        conn.counts[0] -= 1
        live = self._live
        stack = self._idle.get(conn.addr)
        if (self._closed or conn.transport.is_closing() or (live is not None and conn.addr not in live)
                or (stack is not None and len(stack) >= self.max_idle) or not self.max_idle):
            conn.state = _CLOSED
            conn.transport.close()
            return
        if conn.requests:
            if conn.parser.buffered:
                # Bytes after the end of the response (e.g. a body sent with a HEAD or 304
                # response): reusing the connection would read them as the next response.
                conn.state = _CLOSED
                conn.transport.close()
                return
            conn.parser.start_next()
        if conn.reading_paused:
            conn.resume_reading()
        conn.state = _IDLE
        conn.idle_since = self.now
        conn.counts[1] += 1
        if stack is None:
            self._idle[conn.addr] = [conn]
        else:
            stack.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """The owner is done with an active connection that must not be reused."""
        conn.abort()

    def _lost(self, conn: UpstreamConnection) -> None:
        state = conn.state
        if state == _CLOSED:
            return
        conn.state = _CLOSED
        if state == _ACTIVE:
            conn.counts[0] -= 1
        elif state == _IDLE:
            conn.counts[1] -= 1
            stack = self._idle.get(conn.addr)
            if stack is not None:
                try:
                    stack.remove(conn)
                except ValueError:
                    pass
                if not stack:
                    del self._idle[conn.addr]

    # -- maintenance ---------------------------------------------------------------------------

    def apply(self, snapshot) -> None:
        """Close idle connections to endpoints that are not usable any more."""
        live = set()
        for backend in snapshot.backends.values():
            for ep in backend.usable:
                live.add((ep.ip, ep.port))
        self._live = frozenset(live)
        for addr in [a for a in self._idle if a not in live]:
            for conn in list(self._idle.get(addr, ())):
                conn.abort()

    def sweep(self) -> None:
        """Close connections idle for longer than the idle timeout (oldest sit at the bottom)."""
        self.now = now = self.loop.time()
        limit = now - self.idle_timeout
        for stack in list(self._idle.values()):
            while stack and stack[0].idle_since <= limit:
                stack[0].abort()   # _lost removes it from the stack

    def idle_count(self, addr: tuple[str, int] | None = None) -> int:
        if addr is not None:
            return len(self._idle.get(addr, ()))
        return sum(len(s) for s in self._idle.values())

    def export_metrics(self) -> None:
        gauge = metrics.upstream_connections
        for (ns, svc), (active, idle) in self._counts.items():
            gauge.labels(ns, svc, "active").set(active)
            gauge.labels(ns, svc, "idle").set(idle)

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for stack in list(self._idle.values()):
            for conn in list(stack):
                conn.abort()
        self._idle.clear()
