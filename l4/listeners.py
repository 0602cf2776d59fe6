"""L4 listeners reconciled against each snapshot, and the registry of open connections.

``L4Manager.apply(snapshot)`` (synchronous, called on every publish) makes the set of bound
listening sockets equal to ``snapshot.l4``:

- a new (host, port) is bound at once (SO_REUSEADDR + SO_REUSEPORT, exactly that address,
  never a wildcard) and accepted from with the loop's ``add_reader`` (raw sockets: see
  ``l4.pump`` for why there are no transports);
- an existing (host, port) is left untouched (same socket, same server) even when its
  ``L4Listener`` changed: each connection reads the snapshot in force when it is accepted;
- a removed (host, port) has its listening socket closed at once; its open connections get
  a drain deadline of now + ``settings.drain_timeout`` and are reset when it passes;
- a bind failure is logged once, counted in ``l4_listener_errors`` and kept in ``failures``
  (shown by /debug/snapshot); it never stops the other listeners and is retried on the next
  apply. An "external" address (LoadBalancer ingress IP, externalIP) that is not local to
  this host (EADDRNOTAVAIL) is skipped quietly: it belongs to another machine.

Endpoint drain: connections are registered by (backend, endpoint address). On each apply,
connections whose endpoint is gone from their backend in the new snapshot (or the backend is
gone), or is now terminating, get the same drain deadline (new connections no longer go
there: the balancer only picks from ``usable``). A deadline, once set, is kept. Connections
that went to a serving-terminating endpoint because it was the service's only choice
(KEP-1669) are not cut while their backend stays as it was.

One periodic timer (``_sweep``) enforces deadlines and idle timeouts; nothing is scheduled
per connection or per read.

Limits: ``max_conns`` (``--max-connections``, by default derived from the descriptor limit:
``meshproxy.core.accept.connection_limits``) bounds the open connections of all L4 listeners
together. A listener that finds the manager full stops accepting (connections wait in the
kernel's backlog) and joins ``full``; every listener in ``full`` resumes when a connection
ends. A failed accept is counted and logged by ``accept_errors``; on a resource error (out of
descriptors or memory) that listener pauses for ``accept.BACKOFF`` seconds.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Mapping

from meshproxy.core import accept, metrics, sockets
from meshproxy.core.runtime import Runtime
from meshproxy.core.snapshot import L4Listener, Snapshot

from . import pump
from .pump import BufferPool, L4Connection, make_poller, reset_socket

__all__ = ["BACKLOG", "L4Manager", "bind_listener"]

log = logging.getLogger("meshproxy.l4")

# listen() backlog: the kernel clamps it to net.core.somaxconn (4096 on current kernels).
# A short backlog drops SYNs under connection bursts, which the bench's conn/s test shows.
BACKLOG = 4096

Key = tuple[str, int]

_ACCEPTS_PER_WAKEUP = 64
_BINDS_PER_TURN = 200          # ~10 ms of socket/bind/listen/add_reader


def bind_listener(host: str, port: int, wildcard: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket bound to exactly ``host:port``.

    Made by ``meshproxy.core.sockets.listen`` (SO_REUSEADDR, SO_REUSEPORT, registered so that
    ``run --takeover`` can hand it to the next process, or taken over from the previous one).
    SO_REUSEADDR lets a restarted process bind while old connections sit in TIME_WAIT;
    SO_REUSEPORT lets several workers and an upgrading process hold the same address."""
    ip = ipaddress.ip_address(host)          # ValueError for a name: listeners take addresses
    if ip.is_unspecified and not wildcard:   # only a Gateway without addresses binds every address
        raise OSError(errno.EINVAL, f"refusing to listen on the wildcard address {host}")
    return sockets.listen(host, port, BACKLOG)


class _Labels:
    """Prometheus children of one backend, resolved once instead of per event."""
    __slots__ = ("active", "connect_failures", "connections", "duration", "no_endpoints", "rx", "service", "tx")

    def __init__(self, key: tuple[str, str, str]) -> None:
        self.service = f"{key[0]}/{key[1]}:{key[2]}"     # as the access log names it
        self.connections = metrics.l4_connections.labels(*key)
        self.duration = metrics.l4_duration.labels(*key)
        self.active = metrics.l4_active.labels(*key)
        self.rx = metrics.l4_bytes.labels(*key, "rx")
        self.tx = metrics.l4_bytes.labels(*key, "tx")
        self.connect_failures = metrics.l4_connect_failures.labels(*key)
        self.no_endpoints = metrics.l4_no_endpoints.labels(*key)


class _Listener:
    """One bound (host, port) and the connections it accepted."""
    __slots__ = ("accepting", "closed", "conns", "fd", "key", "mgr", "retry", "sock", "spec")

    def __init__(self, mgr: L4Manager, key: Key, spec: L4Listener, sock: socket.socket) -> None:
        self.mgr = mgr
        self.key = key
        self.spec = spec
        self.sock = sock
        self.fd = sock.fileno()
        self.conns: set[L4Connection] = set()
        self.closed = False
        self.accepting = False
        self.retry: asyncio.TimerHandle | None = None

    def resume(self) -> None:
        self.retry = None
        if not self.closed and not self.accepting:
            self.mgr.loop.add_reader(self.fd, self.on_acceptable)
            self.accepting = True

    def pause(self) -> None:
        if self.accepting:
            self.mgr.loop.remove_reader(self.fd)
            self.accepting = False

    def on_acceptable(self) -> None:
        mgr = self.mgr
        limit = mgr.max_conns
        # A few accepts per wakeup: drain a burst without starving established connections.
        for _ in range(_ACCEPTS_PER_WAKEUP):
            if limit is not None and len(mgr.conns) >= limit:
                self.pause()                  # resumed by L4Manager.forget
                mgr.full.add(self)
                extra = mgr.log_limiter.allow("full")
                if extra is not None:
                    log.warning("l4: %d open connections, the limit (--max-connections, see docs/resilience.md): "
                                "new connections wait in the backlog%s", limit, extra)
                return
            try:
                client, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if mgr.accept_errors.failed(exc, f"{self.key[0]}:{self.key[1]}"):
                    # Out of fds / memory: the pending connection stays in the backlog and the
                    # socket stays readable, so back off instead of spinning at 100 % CPU.
                    self.pause()
                    self.retry = mgr.loop.call_later(accept.BACKOFF, self.resume)
                return                        # ECONNABORTED etc.: that one is gone; next wakeup
            try:
                client.setblocking(False)
                conn = L4Connection(mgr, self, client, peer[:2])
                mgr._accepted(conn)
                conn.start()
            except Exception:                 # callback boundary
                log.exception("l4: error accepting a connection on %s:%d", *self.key)
                reset_socket(client)

    def close(self) -> None:
        if self.closed:
            return
        self.pause()
        self.closed = True
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        sockets.release(self.sock)
        self.sock.close()


class L4Manager:
    __slots__ = (
        "_bind_handle",
        "_to_bind",
        "accept_errors",
        "full",
        "log_limiter",
        "max_conns",
        "_empty_waiter",
        "_idle_tick",
        "_labels",
        "_last_backends",
        "_last_idle_scan",
        "_reported",
        "_stopped",
        "_tick",
        "_timer",
        "balancers",
        "only",
        "by_endpoint",
        "conns",
        "draining",
        "failures",
        "listeners",
        "loop",
        "poller",
        "pool",
        "runtime",
        "settings",
    )

    def __init__(self, runtime: Runtime, only: Callable[[L4Listener], bool] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``only``: serve just the listeners it accepts (``--proxy-mode nftables`` leaves the
        Services to the kernel and keeps the Gateway listeners, which pick a route per
        connection). ``loop``: the running loop by default; every timer of the manager and its
        connections (sweep, drain deadlines, idle and connect timeouts, accept back-off, drain)
        is scheduled with its ``call_later`` and measured with its ``time()``, so a loop with
        another clock drives them all."""
        self.runtime = runtime
        self.only = only
        self.settings = runtime.settings
        self.balancers = runtime.balancers
        self.loop = loop or asyncio.get_running_loop()
        self.pool = BufferPool(pump.USE_SPLICE)   # read here: tests flip it
        self.poller = make_poller(self.loop)
        self.listeners: dict[Key, _Listener] = {}
        self.failures: dict[Key, str] = {}
        self.conns: set[L4Connection] = set()
        # Open connections by (backend key, endpoint address): what endpoint drain looks up.
        self.by_endpoint: dict[tuple[tuple[str, str, str], tuple[str, int]], set[L4Connection]] = {}
        self._last_backends: Mapping = {}
        self.draining: set[L4Connection] = set()
        self._labels: dict[tuple[str, str, str], _Labels] = {}
        self._reported: dict[Key, str] = {}
        self._stopped = False
        self._to_bind: list[Key] = []          # listeners of the snapshot in force not bound yet
        self._bind_handle: asyncio.Handle | None = None
        self.accept_errors = accept.AcceptErrors("l4", log)
        self.log_limiter = accept.LogLimiter()   # for the "limit reached" line
        self.max_conns: int | None = accept.connection_limits(self.settings)[0]
        self.full: set[_Listener] = set()     # listeners paused because max_conns was reached
        s = self.settings
        # Deadlines are enforced to within a quarter of the drain timeout (<= 1 s); idle
        # connections are looked at every idle_timeout/8 (<= 10 s): an O(connections) pass
        # that costs little at that rate.
        self._tick = max(0.02, min(1.0, s.drain_timeout / 4, s.idle_timeout / 4))
        self._idle_tick = max(self._tick, min(10.0, s.idle_timeout / 8))
        self._last_idle_scan = self.loop.time()
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(self._tick, self._sweep)
        self._empty_waiter: asyncio.Future | None = None

    # -- reconciliation -------------------------------------------------------------------------

    def apply(self, snap: Snapshot) -> None:
        try:
            self._apply(snap)
        except Exception:            # a subscriber must not break publishing
            log.exception("l4: applying snapshot %d failed", snap.version)

    def _apply(self, snap: Snapshot) -> None:
        wanted = snap.l4 if self.only is None else {k: v for k, v in snap.l4.items() if self.only(v)}
        for key in [k for k in self.listeners if k not in wanted]:
            self._remove(key)
        self._to_bind = []
        if not self._stopped:
            for key, spec in wanted.items():
                lst = self.listeners.get(key)
                if lst is None:
                    self._to_bind.append(key)
                else:
                    lst.spec = spec
            self._bind_some(wanted)
        for key in [k for k in self.failures if k not in wanted]:
            del self.failures[key]
        for key in [k for k in self._reported if k not in wanted]:
            del self._reported[key]
        for key in [k for k in self._labels if k not in snap.backends]:
            del self._labels[key]
        self._drain_gone_endpoints(snap)
        metrics.l4_listeners.set(len(self.listeners))

    def _bind_some(self, wanted: Mapping[Key, L4Listener]) -> None:
        """Bind up to ``_BINDS_PER_TURN`` of the listeners still to bind; the rest on the next
        loop turns (a snapshot that brings a thousand Services must not hold the loop for
        the ~50 ms their binds take together). A later snapshot replaces the queue."""
        todo, self._to_bind = self._to_bind[:_BINDS_PER_TURN], self._to_bind[_BINDS_PER_TURN:]
        for key in todo:
            spec = wanted.get(key)
            if spec is not None and key not in self.listeners:
                self._open(key, spec)
        if self._to_bind and self._bind_handle is None:
            self._bind_handle = self.loop.call_soon(self._bind_more)

    def _bind_more(self) -> None:
        self._bind_handle = None
        snap = self.runtime.snapshot
        if self._stopped or snap is None:
            self._to_bind = []
            return
        try:
            self._bind_some(snap.l4)
        except Exception:            # as in apply(): a bind bug must not stop the loop
            log.exception("l4: binding listeners failed")
        metrics.l4_listeners.set(len(self.listeners))

    @property
    def binding(self) -> bool:
        """Listeners of the snapshot in force are still being bound (a few loop turns)."""
        return bool(self._to_bind)

    def _open(self, key: Key, spec: L4Listener) -> None:
        host, port = key
        try:
            sock = bind_listener(host, port, wildcard=spec.scope == "gateway")
        except (OSError, ValueError) as exc:
            self._bind_failed(key, spec, exc)
            return
        lst = _Listener(self, key, spec, sock)
        self.listeners[key] = lst
        self.failures.pop(key, None)
        if self._reported.pop(key, None) is not None:
            log.info("l4: listening on %s:%d (%s/%s:%s) after earlier failure", host, port, *spec.backend)
        else:
            log.debug("l4: listening on %s:%d (%s/%s:%s)", host, port, *spec.backend)
        lst.resume()

    def _bind_failed(self, key: Key, spec: L4Listener, exc: BaseException) -> None:
        host, port = key
        if spec.scope == "external" and isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
            # A LoadBalancer / external IP of another machine: nothing to serve here.
            if self._reported.get(key) != "not local":
                self._reported[key] = "not local"
                log.debug("l4: %s:%d (%s/%s:%s) is not a local address; not listening", host, port, *spec.backend)
            return
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        msg = f"cannot listen on {host}:{port}: {msg}"
        self.failures[key] = msg
        if self._reported.get(key) != msg:
            self._reported[key] = msg
            metrics.l4_listener_errors.labels(*spec.backend).inc()
            log.error("l4: %s/%s:%s: %s", *spec.backend, msg)

    def _remove(self, key: Key) -> None:
        lst = self.listeners.pop(key)
        lst.close()
        log.debug("l4: closed listener %s:%d (%d connections drain)", key[0], key[1], len(lst.conns))
        if lst.conns:
            deadline = self.loop.time() + self.settings.drain_timeout
            for conn in lst.conns:
                self._set_deadline(conn, deadline)

    def _drain_gone_endpoints(self, snap: Snapshot) -> None:
        """Connections to an endpoint that left their backend, or is terminating, drain.

        Only backends whose object changed since the last apply are looked at (the builder
        reuses unchanged ones), so the cost is the endpoints of the services that changed."""
        last, self._last_backends = self._last_backends, snap.backends
        if not self.by_endpoint:
            return
        alive: dict[tuple[str, str, str], set[tuple[str, int]] | None] = {}
        deadline = None
        for (bkey, addr), conns in self.by_endpoint.items():
            if bkey not in alive:
                b = snap.backends.get(bkey)
                if b is not None and b is last.get(bkey):
                    alive[bkey] = None            # unchanged: nothing new to drain
                else:
                    alive[bkey] = {e.addr for e in b.endpoints if not e.terminating} if b else set()
            live = alive[bkey]
            if live is None or addr in live:
                continue
            if deadline is None:
                deadline = self.loop.time() + self.settings.drain_timeout
            for conn in conns:
                self._set_deadline(conn, deadline)

    def _set_deadline(self, conn: L4Connection, deadline: float) -> None:
        if conn.deadline is None or deadline < conn.deadline:
            conn.deadline = deadline
            self.draining.add(conn)

    # -- connection registry (called by L4Connection) ------------------------------------------

    def _accepted(self, conn: L4Connection) -> None:
        self.conns.add(conn)
        conn.listener.conns.add(conn)
        conn.idle_since = self.loop.time()

    def track(self, conn: L4Connection, key: tuple[tuple[str, str, str], tuple[str, int]]) -> None:
        s = self.by_endpoint.get(key)
        if s is None:
            s = self.by_endpoint[key] = set()
        s.add(conn)

    def untrack(self, conn: L4Connection, key: tuple[tuple[str, str, str], tuple[str, int]]) -> None:
        s = self.by_endpoint.get(key)
        if s is not None:
            s.discard(conn)
            if not s:
                del self.by_endpoint[key]

    def forget(self, conn: L4Connection) -> None:
        self.conns.discard(conn)
        lst = conn.listener
        lst.conns.discard(conn)
        if self.full:
            self._resume_full()
        self.draining.discard(conn)
        if not self.conns and self._empty_waiter is not None and not self._empty_waiter.done():
            self._empty_waiter.set_result(None)

    def resource_failure(self, lst: _Listener, exc: OSError, what: str) -> None:
        """A connection ``lst`` accepted cannot be served for lack of a descriptor or memory
        (its pod socket, a splice pipe): counted and logged like a failed accept, and ``lst``
        pauses accepting, so the backlog waits rather than being accepted and reset."""
        if self.accept_errors.failed(exc, f"{lst.key[0]}:{lst.key[1]}", what) and not lst.closed:
            lst.pause()
            if lst.retry is None:
                lst.retry = self.loop.call_later(accept.BACKOFF, lst.resume)

    def resources_ok(self, lst: _Listener) -> None:
        """A connection of ``lst`` got its pod socket: after resource failures, say once that
        connections are served again."""
        if self.accept_errors.failing:
            self.accept_errors.succeeded(f"{lst.key[0]}:{lst.key[1]}")

    def _resume_full(self) -> None:
        if self.max_conns is not None and len(self.conns) >= self.max_conns:
            return
        for lst in self.full:
            if lst.retry is None:             # not also backing off after a resource error
                lst.resume()
        self.full.clear()

    def limits_changed(self) -> None:
        """``--max-connections`` changed (a re-read settings file): apply the new limit."""
        self.max_conns = accept.connection_limits(self.settings)[0]
        if self.full:
            self._resume_full()

    def labels_for(self, key: tuple[str, str, str]) -> _Labels:
        lab = self._labels.get(key)
        if lab is None:
            lab = self._labels[key] = _Labels(key)
        return lab

    # -- timers -------------------------------------------------------------------------------

    def _sweep(self) -> None:
        loop = self.loop
        now = loop.time()
        try:
            if self.draining:
                for conn in [c for c in self.draining if c.deadline is not None and c.deadline <= now]:
                    self.draining.discard(conn)
                    log.info("l4: %s: drain deadline passed, closing", conn.describe())
                    conn.kill(reset=True)
            if now - self._last_idle_scan >= self._idle_tick:
                self._last_idle_scan = now
                limit = self.settings.idle_timeout
                for conn in [c for c in self.conns if not c.busy and now - c.idle_since >= limit]:
                    log.debug("l4: %s: idle for %.0fs, closing", conn.describe(), now - conn.idle_since)
                    # A FIN when nothing is pending; an RST when bytes are stuck behind a peer
                    # that stopped reading, since a graceful close would wait for it forever.
                    conn.kill(reset=conn.buffered() > 0)
                for conn in self.conns:
                    if conn.busy:
                        conn.busy = False
                        conn.idle_since = now
        except Exception:            # the sweep must keep running
            log.exception("l4: sweep failed")
        if self._timer is not None:
            self._timer = loop.call_later(self._tick, self._sweep)

    # -- shutdown -----------------------------------------------------------------------------

    async def stop_accepting(self) -> None:
        """Close every listening socket (SIGTERM); open connections continue."""
        self._stopped = True
        self._to_bind = []
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        metrics.l4_listeners.set(0)
        await asyncio.sleep(0)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for open connections to finish, then reset the rest."""
        if self.conns and timeout > 0:
            waiter = self._empty_waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        if self.conns:
            log.info("l4: closing %d connections still open", len(self.conns))
            # kill() closes both sockets and forgets the connection at once (raw sockets, no
            # transports whose connection_lost would come later): nothing is left to wait for.
            for conn in list(self.conns):
                conn.kill(reset=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pool.close()
        self.poller.close()

    def active_connections(self) -> int:
        return len(self.conns)

    def addresses(self) -> Iterable[Key]:
        """The (host, port) pairs bound right now."""
        return list(self.listeners)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
