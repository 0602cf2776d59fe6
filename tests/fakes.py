"""A fake event loop, fake transports and an in-memory cluster for protocol tests.

The L7 shells (``l7.downstream.ClientConnection``, ``l7.upstream.UpstreamConnection``) and the
exchange between them run here exactly as in production, but time is a number the test moves
(``FakeLoop.advance``) and bytes go to lists (``FakeTransport.written``). Timers, deadlines,
pipelining, pause/resume and retries are checked in microseconds and deterministically, in the
style of uvicorn's tests/protocols.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from discovery.manifests import load_text
from discovery.store import ADDED, Allocator, EndpointIndex, Event, Store
from l7.server import IngressServer, RequestView  # noqa: F401 - re-exported for tests
from l7.h2_upstream import H2Pool, H2UpstreamConnection
from l7.upstream import UpstreamConnection, UpstreamPool
from meshproxy.core.runtime import Runtime
from meshproxy.core.settings import Settings
from meshproxy.core.snapshot import SnapshotBuilder


class FakeHandle:
    __slots__ = ("when", "seq", "callback", "args", "cancelled")

    def __init__(self, when: float, seq: int, callback, args) -> None:
        self.when = when
        self.seq = seq
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: FakeHandle) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class FakeLoop:
    """``time()``, ``call_at``, ``call_later``, ``call_soon``, ``create_task`` (records the
    coroutine and closes it: nothing here may need a real task). ``advance(dt)`` runs every
    timer due up to now + dt, in order, moving the clock to each timer's time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._timers: list[FakeHandle] = []
        self._seq = itertools.count()
        self.tasks: list[Any] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback, *args) -> FakeHandle:
        h = FakeHandle(when, next(self._seq), callback, args)
        heapq.heappush(self._timers, h)
        return h

    def call_later(self, delay: float, callback, *args) -> FakeHandle:
        return self.call_at(self.now + delay, callback, *args)

    def call_soon(self, callback, *args) -> FakeHandle:
        return self.call_at(self.now, callback, *args)

    def create_task(self, coro):
        self.tasks.append(coro)
        coro.close()
        return None

    def advance(self, dt: float = 0.0) -> None:
        end = self.now + dt
        for _ in range(100_000):   # bounded: a timer re-arming itself at the same time would spin
            if not self._timers or self._timers[0].when > end:
                break
            h = heapq.heappop(self._timers)
            if h.cancelled:
                continue
            self.now = max(self.now, h.when)
            h.callback(*h.args)
        else:
            raise AssertionError("timers keep firing at the same time")
        self.now = end

    def pending_timers(self) -> list[float]:
        return sorted(h.when for h in self._timers if not h.cancelled)


class FakeTransport:
    """Records writes; pause/resume and close state are flags the test reads."""

    def __init__(self, peer=("127.0.0.9", 40000), sock=("127.0.0.1", 8080), buffer_limit: int | None = None) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False
        self.aborted = False
        self.eof_written = False
        self.peer = peer
        self.sock = sock
        self.buffered = 0          # what get_write_buffer_size says
        self.protocol = None

    def data(self) -> bytes:
        return b"".join(self.written)

    def take(self) -> bytes:
        out = b"".join(self.written)
        self.written.clear()
        return out

    # -- asyncio.Transport surface used by the shells --
    def write(self, data: bytes) -> None:
        assert not self.closing or not self.aborted, "write after abort"
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.limits = (high, low)

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default=None):
        return {"peername": self.peer, "sockname": self.sock}.get(name, default)


class FakeListener:
    """What a client connection needs from its listener (l7.server.Listener) without a socket."""

    def __init__(self, port: int = 8080, tls: bool = False, http=None) -> None:
        self.tls = tls
        self.http = http
        self.port = port
        self.port_b = b"%d" % port
        self.local_host = b"127.0.0.1:%d" % port
        self.count = 0

    def opened(self) -> None:
        self.count += 1

    def closed(self) -> None:
        self.count -= 1


class FakePool(UpstreamPool):
    """The real pool without sockets: ``connect`` records the request; the test completes it
    with ``open(i)`` (a connection on a FakeTransport) or ``refuse(i)``."""

    def __init__(self, loop, settings) -> None:
        super().__init__(loop, settings)
        self.requests: list[tuple[tuple[str, int], Any, int]] = []

    def connect(self, addr, labels, exchange, token) -> None:
        self.requests.append((addr, labels, exchange, token))

    def open(self, i: int = -1) -> tuple[UpstreamConnection, FakeTransport]:
        addr, labels, exchange, token = self.requests.pop(i)
        conn = UpstreamConnection(self, addr, labels)
        t = FakeTransport(peer=addr)
        conn.connection_made(t)
        conn.state = 1   # active (l7.upstream's _ACTIVE)
        conn.counts[0] += 1
        self.connects += 1
        exchange.connected(token, conn, None)
        return conn, t

    def refuse(self, i: int = -1) -> None:
        addr, labels, exchange, token = self.requests.pop(i)
        exchange.connected(token, None, ConnectionRefusedError(111, "refused"))


class FakeH2Pool(H2Pool):
    """The real HTTP/2 pool without sockets: ``connect`` records the request; ``open(i)``
    makes a connection on a FakeTransport (its preface and SETTINGS are in ``written``) and
    hands the waiting exchange a stream on it."""

    def __init__(self, loop, settings) -> None:
        super().__init__(loop, settings)
        self.requests: list[tuple[tuple[str, int], Any, int]] = []

    def connect(self, addr, labels, exchange, token) -> None:
        self.requests.append((addr, labels, exchange, token))

    def open(self, i: int = -1) -> tuple[H2UpstreamConnection, FakeTransport]:
        addr, labels, exchange, token = self.requests.pop(i)
        conn = H2UpstreamConnection(self, addr, labels)
        t = FakeTransport(peer=addr)
        conn.connection_made(t)
        self.adopt(conn)
        exchange.connected(token, conn.new_stream(), None)
        return conn, t


def snapshot_for(manifests: str, settings: Settings):
    """Build a snapshot from manifest text, no sockets (pods at any addresses)."""
    result = load_text(manifests)
    assert not result.errors, [str(e) for e in result.errors]
    store = Store()
    index = EndpointIndex(store)
    changes = store.apply([Event(ADDED, o) for o in result.objects])
    index.on_changes(changes)
    index.recompute()
    return SnapshotBuilder(settings).build(store, index, Allocator(settings.service_cidr, settings.node_port_range))


class Harness:
    """One IngressServer on a FakeLoop with a FakePool, serving ``manifests``."""

    def __init__(self, manifests: str, **settings: Any) -> None:
        opts = dict(health_checks=False, header_timeout=10.0, keepalive_timeout=75.0, send_timeout=60.0)
        opts.update(settings)
        self.settings = Settings(**opts)
        self.runtime = Runtime(self.settings)
        self.loop = FakeLoop()
        self.server = IngressServer(self.runtime)
        self.server.loop = self.loop
        self.server.now = self.loop.time
        self.pool = self.server.pool = FakePool(self.loop, self.settings)
        self.h2pool = self.server.h2pool = FakeH2Pool(self.loop, self.settings)
        self.listener = FakeListener()
        self.publish(manifests)

    def publish(self, manifests: str) -> None:
        snap = snapshot_for(manifests, self.settings)
        self.runtime.publish(snap)
        self.pool.apply(snap)

    def client(self, peer=("127.0.0.9", 40000)):
        from l7.downstream import ClientConnection
        conn = ClientConnection(self.server, self.listener)
        t = FakeTransport(peer=peer)
        conn.connection_made(t)
        return conn, t
