"""The L4 byte pump: one accepted client socket spliced to one pod socket.

The pump works on raw non-blocking sockets in a private epoll set (``EpollPoller``, one
registration with the loop for all connections), not on asyncio transports, and moves bytes
with ``os.splice`` through a pipe, so payload never enters Python. Measured with bench/
(docs/l4.md) this costs less than half the CPU per MiB of uvloop transports and fewer
syscalls per connection, with no coroutine, task or transport objects per connection. Where
``os.splice`` is missing the same state machine copies through a pooled 64 KiB buffer with
``recv_into`` / ``send``; where epoll is missing ``LoopPoller`` uses ``add_reader``.

Per connection (``L4Connection``):

1. accept (``L4Manager``): read ``runtime.snapshot`` once, find the listener's ``L4Listener``
   and ``Backend``, pick an endpoint (``Balancers.pick``; ``backend.local`` when the
   listener's traffic policy is Local). None -> the client is reset at once (kube-proxy
   REJECTs), ``l4_no_endpoints`` counted. The client is not read until the pod is connected,
   so whatever it sends early waits in its kernel socket buffer;
2. connect (non-blocking, ``settings.connect_timeout`` per attempt); a refused, unreachable
   or timed-out connect is reported to the balancer (passive health), counted in
   ``l4_connect_failures`` and retried on another endpoint (failed ones excluded),
   ``MAX_ATTEMPTS`` in all. The client sees nothing of it;
3. open: the PROXY protocol header (if the Service asks for it) is sent first, then two
   ``_Flow`` objects move bytes client -> pod ("rx") and pod -> client ("tx").

Invariants:

- flow control: a flow reads its source only while nothing of its own is in flight; when
  the destination's socket buffer is full the flow stops reading and waits for writability.
  In flight per flow: at most one pipe / buffer (``MAX_IN_FLIGHT``); TCP's own windows push
  back on the sender. Pipes (and copy buffers) are pooled and held only while they carry
  bytes, so an idle connection holds two sockets and no pipe;
- half-close: EOF on a source (after its bytes are out) becomes ``shutdown(SHUT_WR)`` on the
  destination; when both flows are done both sockets are closed;
- errors: a socket error (reset, EPIPE, ...) on either socket resets both (RST, via
  SO_LINGER 0): the peer of the healthy side learns that the connection failed;
- every fd is detached from the poller before its socket is closed (fd numbers are reused at
  once); ``_teardown`` is the only place that closes the sockets of a connection;
- accounting: the endpoint is acquired in the balancer from the pick (connect attempts
  included, so least-connections sees in-flight connects) and released exactly once;
  ``l4_active`` goes up at accept and down once in ``_finish``; byte counters are added at
  close or every ``_BYTES_FLUSH``; ``_finish`` also observes the connection's duration and,
  with ``--access-log``, hands one ``TcpRecord`` to the process's log (a queue append: the
  line is formatted and written on the log's own thread);
- liveness: ``busy`` is set on every read; the manager's periodic sweep turns it into
  ``idle_since`` and enforces idle timeouts and drain deadlines — nothing is scheduled per
  read;
- callbacks never raise: socket errors are caught by name where they happen; anything else
  is caught at the callback boundary, logged once with the connection, and resets it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
from typing import Any, Protocol

from discovery.endpoints import Endpoint
from meshproxy.core.logformat import (
    FLAG_NO_HEALTHY_UPSTREAM,
    FLAG_NO_ROUTE,
    FLAG_UPSTREAM_CONNECT_FAILURE,
    FLAG_UPSTREAM_RETRY_LIMIT,
    TcpRecord,
)
from meshproxy.core.snapshot import Backend

from .proxy_protocol import header as proxy_header
from .sni import route_connection


class ConnectionOwner(Protocol):
    """What a connection needs from the manager that accepted it (``l4.listeners.L4Manager``):
    the runtime, balancers, poller, buffer pool, loop and settings it shares with the other
    connections, and the registry that drain and metrics work from."""

    runtime: Any
    balancers: Any
    poller: Any
    pool: Any
    loop: Any
    settings: Any
    accept_errors: Any          # meshproxy.core.accept.AcceptErrors ("failing" is a cheap test)

    def labels_for(self, key: tuple[str, str, str]) -> Any: ...
    def track(self, conn: L4Connection, key: tuple[tuple[str, str, str], tuple[str, int]]) -> None: ...
    def untrack(self, conn: L4Connection, key: tuple[tuple[str, str, str], tuple[str, int]]) -> None: ...
    def forget(self, conn: L4Connection) -> None: ...
    def resource_failure(self, listener: Any, exc: OSError, what: str) -> None: ...
    def resources_ok(self, listener: Any) -> None: ...


__all__ = [
    "ConnectionOwner",
    "MAX_ATTEMPTS",
    "MAX_IN_FLIGHT",
    "USE_EPOLL",
    "USE_SPLICE",
    "BufferPool",
    "EpollPoller",
    "L4Connection",
    "LoopPoller",
    "make_poller",
    "reset_socket",
]

log = logging.getLogger("meshproxy.l4")

# splice() where the platform has it; read when a manager creates its pool (tests flip it to
# cover the copy path too).
USE_SPLICE = hasattr(os, "splice")

# Bytes in flight per direction: one pipe of PIPE_SIZE (splice) or one COPY_SIZE buffer.
# Pipe capacity is what matters for splice: each pipe slot takes one socket buffer fragment,
# so the default 16-slot (64 KiB) pipe moves few bytes per call. Measured with bench.tcpload
# (docs/l4.md): ~330 us of proxy CPU per MiB with 64 KiB pipes, ~200 with 256 KiB, ~165 with
# 1 MiB. 256 KiB keeps most of the gain while 256 pipes stay under the default
# fs.pipe-user-pages-soft (64 MiB per non-root user); pipes are pooled and held only while
# bytes are in flight, so that is 256 flows stalled at the same time, not 256 connections.
PIPE_SIZE = 256 * 1024
COPY_SIZE = 64 * 1024
MAX_IN_FLIGHT = max(PIPE_SIZE, COPY_SIZE)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# Reads per readiness callback before yielding to other connections: up to 1 MiB keeps one
# bulk stream from monopolising the loop while amortising the callback cost. A short read is
# *not* taken as "drained": the next read is one cheap syscall and usually finds the peer's
# FIN right behind its last bytes, which saves a whole loop iteration per connection.
_READS_PER_WAKEUP = 4

# Connect attempts per client connection (first try + 2 retries), each on a different endpoint
# when there is one: enough to step over a pod that died before its endpoint was removed,
# bounded so a dead service fails in 3 x connect_timeout at worst.
MAX_ATTEMPTS = 3

# Byte counters are flushed into Prometheus at close and whenever this much accumulated, so a
# long-lived stream shows progress without a metric update per read.
_BYTES_FLUSH = 1 << 20

_LINGER_RESET = struct.pack("ii", 1, 0)
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if hasattr(os, "splice") else 0
_CONNECT_PENDING = (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY)
# Created non-blocking in the socket() call itself where the platform allows: one syscall less.
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:          # ENOTCONN: the handshake is still under way
        return False


_CONNECTING, _OPEN, _DONE = 0, 1, 2


class BufferPool:
    """Idle pipes (splice) or buffers (copy) shared by all connections of a manager.

    A flow takes one when it reads and gives it back as soon as everything is written, so the
    number in use is the number of flows with bytes in flight, not the number of connections.
    At most ``keep`` idle ones are kept (32 x 256 KiB: idle pipes count against the per-user
    pipe limit too); more are closed / dropped."""
    __slots__ = ("idle", "in_use", "keep", "splice")

    def __init__(self, splice: bool, keep: int = 32) -> None:
        self.splice = splice
        self.idle: list = []
        self.keep = keep
        self.in_use = 0

    def get(self):
        """An idle pipe / buffer, or a new one. Raises OSError (EMFILE) when no pipe can be made."""
        if self.idle:
            self.in_use += 1
            return self.idle.pop()
        if self.splice:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass     # over the per-user pipe limit (EPERM): the default size still works
            self.in_use += 1
            return pipe
        self.in_use += 1
        return memoryview(bytearray(COPY_SIZE))

    def put(self, item) -> None:
        self.in_use -= 1
        if len(self.idle) < self.keep:
            self.idle.append(item)
        else:
            self.discard_item(item)

    def discard(self, item) -> None:
        """Drop an item that may still hold bytes (connection torn down mid-flight)."""
        self.in_use -= 1
        self.discard_item(item)

    def discard_item(self, item) -> None:
        if self.splice:
            os.close(item[0])
            os.close(item[1])

    def close(self) -> None:
        for item in self.idle:
            self.discard_item(item)
        self.idle.clear()


def reset_socket(sock: socket.socket | None) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the peer must see the connection failed."""
    if sock is None or sock.fileno() < 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass            # already dead: close() is all that is left
    sock.close()


# Event bits: epoll's values, used by both pollers.
IN, OUT = 0x001, 0x004
_IN_ERR = IN | 0x008 | 0x010          # readable, or EPOLLERR / EPOLLHUP: a read will tell which
_OUT_ERR = OUT | 0x008 | 0x010

# The epoll poller where the platform has it (tests flip this to cover the loop poller).
USE_EPOLL = hasattr(select, "epoll")


class EpollPoller:
    """Connection sockets in one private epoll set, itself registered once with the loop.

    Why not ``loop.add_reader`` per socket: uvloop validates and re-configures the fd on every
    registration (epoll ADD + DEL probe, FIONBIO) and tears the poll handle down on removal
    (several epoll_ctl calls), which made raw sockets cost more syscalls per connection than
    transports. Here a change of interest is one ``epoll_ctl``; a socket with no interest is
    unregistered (so a pending error cannot make a level-triggered poll spin).

    ``handlers[fd](events)`` is called for each ready fd, in batches of up to 1024 per loop
    wakeup. An event can be stale (its fd closed and reused earlier in the same batch), so
    handlers must tolerate spurious readiness — they do: every operation is non-blocking and
    a connect completion is checked, not assumed."""
    __slots__ = ("ep", "handlers", "loop", "masks")

    def __init__(self, loop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.handlers: dict[int, object] = {}
        self.masks: dict[int, int] = {}
        loop.add_reader(self.ep.fileno(), self._ready)

    def attach(self, fd: int, handler) -> None:
        self.handlers[fd] = handler
        self.masks.setdefault(fd, 0)

    def want(self, fd: int, mask: int) -> None:
        old = self.masks[fd]
        if old == mask:
            return
        self.masks[fd] = mask
        if old == 0:
            self.ep.register(fd, mask)
        elif mask == 0:
            self.ep.unregister(fd)
        else:
            self.ep.modify(fd, mask)

    def detach(self, fd: int) -> None:
        """Forget ``fd``; call before closing it."""
        self.handlers.pop(fd, None)
        if self.masks.pop(fd, 0):
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def _ready(self) -> None:
        try:
            events = self.ep.poll(0, 1024)
        except InterruptedError:
            return
        handlers = self.handlers
        for fd, ev in events:
            h = handlers.get(fd)
            if h is not None:
                h(ev)

    def close(self) -> None:
        if self.ep.closed:
            return
        self.loop.remove_reader(self.ep.fileno())
        self.ep.close()
        self.handlers.clear()
        self.masks.clear()


class LoopPoller:
    """The same interface over ``loop.add_reader`` / ``add_writer``, where epoll is missing."""
    __slots__ = ("handlers", "loop", "masks")

    def __init__(self, loop) -> None:
        self.loop = loop
        self.handlers: dict[int, object] = {}
        self.masks: dict[int, int] = {}

    def attach(self, fd: int, handler) -> None:
        self.handlers[fd] = handler
        self.masks.setdefault(fd, 0)

    def want(self, fd: int, mask: int) -> None:
        old = self.masks[fd]
        if old == mask:
            return
        self.masks[fd] = mask
        changed = old ^ mask
        h = self.handlers[fd]
        if changed & IN:
            if mask & IN:
                self.loop.add_reader(fd, h, IN)
            else:
                self.loop.remove_reader(fd)
        if changed & OUT:
            if mask & OUT:
                self.loop.add_writer(fd, h, OUT)
            else:
                self.loop.remove_writer(fd)

    def detach(self, fd: int) -> None:
        if fd in self.masks:
            self.want(fd, 0)
            del self.masks[fd]
        self.handlers.pop(fd, None)

    def close(self) -> None:
        for fd in list(self.masks):
            self.detach(fd)


def make_poller(loop):
    return EpollPoller(loop) if USE_EPOLL else LoopPoller(loop)


class _Flow:
    """One direction: read ``src``, write ``dst``, through a pooled pipe or buffer.

    ``reading`` is the interest in ``src`` being readable, ``writing`` in ``dst`` being
    writable; the socket shared with the opposite flow (``peer``) gets the union of both."""
    __slots__ = (
        "conn",
        "count",
        "dfd",
        "done",
        "dst",
        "inflight",
        "item",
        "offset",
        "peer",
        "reading",
        "sfd",
        "splice",
        "src",
        "writing",
    )

    def __init__(self, conn: L4Connection, src: socket.socket, dst: socket.socket) -> None:
        self.conn = conn
        self.peer: _Flow = None  # type: ignore[assignment]
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.splice = conn.mgr.pool.splice
        self.item = None             # pipe (r, w) or buffer, held while bytes are in flight
        self.inflight = 0
        self.offset = 0              # copy mode: start of the unsent bytes in the buffer
        self.reading = self.writing = self.done = False
        self.count = 0

    def _set_reading(self, on: bool) -> None:
        self.reading = on
        self.conn.mgr.poller.want(self.sfd, (IN if on else 0) | (OUT if self.peer.writing else 0))

    def _set_writing(self, on: bool) -> None:
        self.writing = on
        self.conn.mgr.poller.want(self.dfd, (OUT if on else 0) | (IN if self.peer.reading else 0))

    # -- the state machine ---------------------------------------------------------------------

    def pump(self) -> None:
        """Source readable: move up to _READS_PER_WAKEUP reads to the destination."""
        pool = self.conn.mgr.pool
        for _ in range(_READS_PER_WAKEUP):
            if self.item is None:
                try:
                    self.item = pool.get()
                except OSError as exc:   # no descriptor for a pipe: this connection cannot go on
                    self.conn.out_of_resources(exc, "splice pipe for a connection accepted")
                    return
            try:
                n = self._fill()
            except (BlockingIOError, InterruptedError):
                break                # drained the socket for now
            except OSError as exc:   # ECONNRESET, ETIMEDOUT ...: the source died
                self.conn.broken(exc)
                return
            if n == 0:
                self._release()
                self._on_eof()
                return
            self.conn.busy = True
            self.count += n
            if self.count >= _BYTES_FLUSH:
                self.conn.flush_bytes()
            if not self._flush():
                return               # destination full: _flush switched to waiting for it
        if self.inflight == 0 and self.item is not None:
            self._release()

    def writable(self) -> None:
        """Destination writable again: finish the bytes in flight, then read again.
        (EOF is only ever read with nothing in flight, so the flow cannot be done here.)"""
        if not self._flush():
            return
        self._set_writing(False)
        self._set_reading(True)
        self.pump()

    def _flush(self) -> bool:
        """Write what is in flight. True when all is out; False when the destination is full
        (then reading stops and writability is awaited) or the connection broke."""
        try:
            while self.inflight:
                self._drain()
        except (BlockingIOError, InterruptedError):
            if not self.writing:
                if self.reading:
                    self._set_reading(False)
                self._set_writing(True)
            return False
        except OSError as exc:       # EPIPE, ECONNRESET: the destination died
            self.conn.broken(exc)
            return False
        self._release()
        return True

    def _fill(self) -> int:
        if self.splice:
            n = os.splice(self.sfd, self.item[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        else:
            n = self.src.recv_into(self.item)
            self.offset = 0
        self.inflight = n
        return n

    def _drain(self) -> None:
        if self.splice:
            self.inflight -= os.splice(self.item[0], self.dfd, self.inflight, flags=_SPLICE_FLAGS)
        else:
            m = self.dst.send(self.item[self.offset:self.offset + self.inflight])
            self.offset += m
            self.inflight -= m

    def _release(self) -> None:
        if self.item is not None and self.inflight == 0:
            self.conn.mgr.pool.put(self.item)
            self.item = None

    def _on_eof(self) -> None:
        if self.reading:
            self._set_reading(False)
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass     # the destination is already gone; its own flow reports how
        self.conn.flow_done()

    def teardown(self) -> None:
        """Give back the pipe/buffer. The poller and the sockets are the connection's job."""
        self.reading = self.writing = False
        if self.item is not None:
            if self.inflight:
                self.conn.mgr.pool.discard(self.item)   # may hold bytes: never reuse it
            else:
                self.conn.mgr.pool.put(self.item)
            self.item = None
            self.inflight = 0


class L4Connection:
    """One proxied connection: client socket, pod socket, the two flows and the bookkeeping."""
    __slots__ = (
        "backend",
        "busy",
        "client",
        "deadline",
        "down",
        "endpoint",
        "flags",
        "idle_since",
        "labels",
        "last_ep",
        "listener",
        "local_only",
        "mgr",
        "peer",
        "pod",
        "rx_total",
        "state",
        "t0",
        "timer",
        "tried",
        "tx_total",
        "up",
    )

    def __init__(self, mgr: ConnectionOwner, listener, client: socket.socket,
                 peer: tuple[str, int]) -> None:
        self.mgr = mgr
        self.listener = listener
        self.client = client
        self.pod: socket.socket | None = None
        self.up: _Flow | None = None
        self.down: _Flow | None = None
        self.backend: Backend | None = None
        self.endpoint: Endpoint | None = None
        self.labels = None
        self.peer = peer
        self.local_only = False
        self.state = _CONNECTING
        self.busy = True
        self.idle_since = 0.0
        self.deadline: float | None = None
        self.timer = None
        self.tried: frozenset[tuple[str, int]] = frozenset()
        # For the duration histogram and the access log: accept time, bytes moved (the flows'
        # counters restart at every metrics flush), the last endpoint tried, response flags.
        self.t0 = mgr.loop.time()
        self.rx_total = self.tx_total = 0
        self.last_ep: Endpoint | None = None
        self.flags = ""

    def describe(self) -> str:
        b = self.backend
        svc = f"{b.namespace}/{b.service}:{b.key[2]}" if b is not None else "?"
        ep = f"{self.endpoint.ip}:{self.endpoint.port}" if self.endpoint is not None else "-"
        return f"{self.peer[0]}:{self.peer[1]} -> {self.listener.key[0]}:{self.listener.key[1]} ({svc}) -> {ep}"

    # -- accept and connect ---------------------------------------------------------------------

    def start(self) -> None:
        mgr = self.mgr
        snap = mgr.runtime.snapshot
        lst = snap.l4.get(self.listener.key) if snap is not None else None
        if lst is None:
            # The listener is being removed (snapshot already swapped, socket not yet closed).
            self.flags = FLAG_NO_ROUTE
            self._abort()
            return
        self.local_only = lst.local_only
        if lst.routes is not None:
            # A Gateway TCP / TLS listener: the backend is chosen per connection (by SNI for
            # TLS passthrough), then begin() is called.
            route_connection(self, snap, lst)
            return
        self.begin(snap, lst.backend)

    def begin(self, snap, key: tuple[str, str, str] | None, label: tuple[str, str, str] | None = None) -> None:
        """Connect to backend ``key`` of ``snap``; None refuses the connection (counted under
        ``label``, the listener's)."""
        mgr = self.mgr
        self.labels = mgr.labels_for(key or label)
        self.labels.connections.inc()
        self.labels.active.inc()
        self.backend = snap.backends.get(key) if key is not None else None
        self._attempt()

    def _attempt(self) -> None:
        mgr = self.mgr
        backend = self.backend
        ep = mgr.balancers.pick(backend, self.peer[0], self.local_only, self.tried) if backend else None
        if ep is None:
            self.flags = FLAG_UPSTREAM_CONNECT_FAILURE if self.tried else FLAG_NO_HEALTHY_UPSTREAM
            self.labels.no_endpoints.inc()
            if self.tried:
                log.info("l4: %s: no endpoint took the connection after %d attempt(s)",
                         self.describe(), len(self.tried))
            self._abort()
            return
        self.endpoint = self.last_ep = ep
        mgr.balancers.acquire(ep)
        mgr.track(self, (backend.key, ep.addr))
        try:
            pod = socket.socket(socket.AF_INET6 if ":" in ep.ip else socket.AF_INET,
                                socket.SOCK_STREAM | _SOCK_NONBLOCK)
        except OSError as exc:       # out of fds / memory: not the endpoint's fault
            self.out_of_resources(exc, "pod socket for a connection accepted")
            return
        if mgr.accept_errors.failing:
            mgr.resources_ok(self.listener)
        self.pod = pod
        if not _SOCK_NONBLOCK:
            pod.setblocking(False)
        rc = pod.connect_ex(ep.addr)
        if rc in _CONNECT_PENDING:
            # Non-blocking connect says EINPROGRESS even when the handshake is already done
            # (always so on loopback and for a local pod): look before paying for a poll
            # registration, a timer and a loop iteration.
            if _is_connected(pod):
                rc = 0
            else:
                rc = pod.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if rc == 0:          # still handshaking: wait for writability
                    mgr.poller.attach(pod.fileno(), self.on_pod_event)
                    mgr.poller.want(pod.fileno(), OUT)
                    self.timer = mgr.loop.call_later(mgr.settings.connect_timeout, self._on_connect_timeout)
                    return
        if rc == 0:
            self._connected()
        else:
            self._connect_failed(os.strerror(rc))

    def _on_connect(self) -> None:
        pod = self.pod
        err = pod.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0 and not _is_connected(pod):
            return                   # a stale event (fd reused within one batch): keep waiting
        self.mgr.poller.want(pod.fileno(), 0)
        self.timer.cancel()
        self.timer = None
        if err:
            self._connect_failed(os.strerror(err))
        else:
            self._connected()

    def _on_connect_timeout(self) -> None:
        try:
            self.timer = None
            if self.state == _CONNECTING and self.pod is not None:
                self.mgr.poller.want(self.pod.fileno(), 0)
                self._connect_failed(f"timed out after {self.mgr.settings.connect_timeout:g}s")
        except Exception:  # noqa: BLE001 - callback boundary; crashed() logs it
            self.crashed("connect timeout")

    # -- readiness (from the poller) --------------------------------------------------------------

    def on_client_event(self, ev: int) -> None:
        try:
            down = self.down
            if ev & _OUT_ERR and down is not None and down.writing:
                down.writable()
            up = self.up                  # (None again if that tore the connection down)
            if ev & _IN_ERR and up is not None and up.reading:
                up.pump()
        except Exception:  # noqa: BLE001 - callback boundary; crashed() logs it
            self.crashed("moving bytes")

    def on_pod_event(self, ev: int) -> None:
        try:
            if self.state == _CONNECTING:
                if self.timer is not None:
                    self._on_connect()
                return
            up = self.up
            if ev & _OUT_ERR and up is not None and up.writing:
                up.writable()
            down = self.down
            if ev & _IN_ERR and down is not None and down.reading:
                down.pump()
        except Exception:  # noqa: BLE001 - callback boundary; crashed() logs it
            self.crashed("moving bytes" if self.state == _OPEN else "connecting")

    def _connect_failed(self, err: str) -> None:
        mgr = self.mgr
        ep = self.endpoint
        mgr.poller.detach(self.pod.fileno())
        self.pod.close()
        self.pod = None
        mgr.balancers.report_failure(ep, self.backend)
        mgr.balancers.release(ep)
        mgr.untrack(self, (self.backend.key, ep.addr))
        self.endpoint = None
        self.labels.connect_failures.inc()
        self.tried = self.tried | {ep.addr}
        log.debug("l4: %s:%d: connect failed: %s", ep.ip, ep.port, err)
        if len(self.tried) >= MAX_ATTEMPTS:
            self.flags = FLAG_UPSTREAM_CONNECT_FAILURE + "," + FLAG_UPSTREAM_RETRY_LIMIT
            self.labels.no_endpoints.inc()
            log.info("l4: %s: %d connect attempts failed, last to %s:%d: %s",
                     self.describe(), len(self.tried), ep.ip, ep.port, err)
            self._abort()
            return
        self._attempt()

    def _connected(self) -> None:
        self.state = _OPEN
        self.mgr.balancers.report_success(self.endpoint, self.backend)  # type: ignore[arg-type]
        client, pod = self.client, self.pod
        # A byte pump must not add Nagle delay to small writes the peers make.
        for s in (client, pod):
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        backend = self.backend
        if backend is not None and backend.proxy_protocol:
            hdr = proxy_header(backend.proxy_protocol, self.peer, self.listener.key)
            try:
                sent = pod.send(hdr)
            except OSError as exc:
                self.broken(exc)
                return
            if sent != len(hdr):
                # A fresh socket's send buffer (>= 4 KiB) always takes a <= 232 byte header.
                log.error("l4: %s: PROXY header only partly sent", self.describe())
                self._teardown(reset=True)
                return
        up = self.up = _Flow(self, client, pod)
        down = self.down = _Flow(self, pod, client)
        up.peer, down.peer = down, up
        poller = self.mgr.poller
        poller.attach(client.fileno(), self.on_client_event)
        poller.attach(pod.fileno(), self.on_pod_event)
        up._set_reading(True)
        down._set_reading(True)

    # -- the end ----------------------------------------------------------------------------------

    def flow_done(self) -> None:
        if self.up.done and self.down.done:
            self._teardown(reset=False)     # both FINs passed on: a clean close

    def out_of_resources(self, exc: OSError, what: str) -> None:
        """No descriptor (or memory) to go on with: reset this connection; the manager counts
        it, logs it (rate-limited) and pauses the listener so that the backlog waits instead of
        being accepted and reset one by one."""
        self.mgr.resource_failure(self.listener, exc, what)
        self._teardown(reset=True)

    def broken(self, exc: OSError) -> None:
        log.debug("l4: %s: %s", self.describe(), exc.strerror or exc)
        self._teardown(reset=True)

    def crashed(self, where: str) -> None:
        log.exception("l4: %s: internal error while %s; resetting", self.describe(), where)
        try:
            self._teardown(reset=True)
        except Exception:            # nothing more can be done
            log.exception("l4: teardown failed")

    def kill(self, reset: bool = True) -> None:
        """Close from our side (drain deadline, idle timeout, shutdown). ``reset`` sends RSTs;
        otherwise FINs, which is right only when no byte is stuck in flight."""
        self._teardown(reset=reset)

    def _abort(self) -> None:
        """Reject the client before anything was proxied."""
        self._teardown(reset=True)

    def _teardown(self, reset: bool) -> None:
        if self.state == _DONE and self.labels is False:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        poller = self.mgr.poller
        for sock in (self.client, self.pod):
            if sock is not None and sock.fileno() >= 0:
                poller.detach(sock.fileno())     # before close: the fd number gets reused
        for flow in (self.up, self.down):
            if flow is not None:
                flow.teardown()
        self.state = _DONE
        if reset:
            reset_socket(self.client)
            reset_socket(self.pod)
        else:
            self.client.close()
            if self.pod is not None:
                self.pod.close()
        self._finish()

    def _finish(self) -> None:
        labels = self.labels
        self.labels = False           # marks "finished": runs once
        mgr = self.mgr
        ep = self.endpoint
        attempts = len(self.tried) + (ep is not None)   # failed connects + the one in use, if any
        if ep is not None:
            mgr.balancers.release(ep)
            mgr.untrack(self, (self.backend.key, ep.addr))
            self.endpoint = None
        dt = mgr.loop.time() - self.t0
        if labels:
            self.flush_bytes(labels)
            labels.active.dec()
            labels.duration.observe(dt)
        access_log = mgr.runtime.access_log
        if access_log is not None:
            ep = self.last_ep
            access_log.log(TcpRecord(
                self.peer[0], self.peer[1], f"{self.listener.key[0]}:{self.listener.key[1]}",
                labels.service if labels else "", f"{ep.ip}:{ep.port}" if ep is not None else "",
                self.rx_total, self.tx_total, dt, attempts, self.flags))
        mgr.forget(self)
        self.up = self.down = None    # break the conn <-> flow cycles at once

    def flush_bytes(self, labels=None) -> None:
        """Add the bytes moved since the last flush to the metrics."""
        labels = labels or self.labels
        if not labels:
            return
        up, down = self.up, self.down
        if up is not None and up.count:
            labels.rx.inc(up.count)
            self.rx_total += up.count
            up.count = 0
        if down is not None and down.count:
            labels.tx.inc(down.count)
            self.tx_total += down.count
            down.count = 0

    def buffered(self) -> int:
        """Bytes in flight inside the proxy (pipes / buffers), for tests and debug."""
        return sum(f.inflight for f in (self.up, self.down) if f is not None)
