"""UDP Services in user space: one relay per client address, forgotten after an idle timeout.

``UdpManager.apply(snapshot)`` makes the bound UDP sockets equal to ``snapshot.udp`` (one per
ClusterIP:port, NodePort and external address of a UDP service port, bound to exactly that
address with SO_REUSEADDR + SO_REUSEPORT, like the TCP listeners).

A datagram from a client address not seen before reads the snapshot once, picks an endpoint
(``Balancers.pick``: the policy, ClientIP affinity, ``local`` endpoints for a Local traffic
policy) and opens a *flow*: a UDP socket connected to that endpoint. Every later datagram of
that client address goes through the same flow, and what the pod sends back on it goes to
the client from the service address it wrote to — what conntrack does for kube-proxy. So a
request/response protocol (DNS) and a long stream (media, QUIC) both stay on one pod.

Invariants:

- a flow lives while datagrams pass in either direction; one idle for ``udp_idle_timeout``
  seconds (30 by default, conntrack's own UDP timeout) is closed by the periodic sweep —
  nothing is scheduled per datagram;
- on each snapshot, flows whose endpoint left their backend (or whose listener went away)
  are closed at once, so the client's next datagram picks a live endpoint: the user-space
  counterpart of deleting stale conntrack entries;
- no endpoint: the datagram is dropped and counted (``l4_no_endpoints``); user space cannot
  send the ICMP error the kernel would;
- at most ``MAX_FLOWS`` flows: datagrams of new client addresses beyond that are dropped
  until flows expire (each flow holds a socket);
- no exception escapes a reader callback; a socket error on a flow closes that flow only.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from typing import Callable

from meshproxy.core import metrics
from meshproxy.core.runtime import Runtime
from meshproxy.core.snapshot import Backend, L4Listener, Snapshot

__all__ = ["UdpManager", "MAX_FLOWS", "MAX_DATAGRAM"]

log = logging.getLogger("meshproxy.l4.udp")

MAX_FLOWS = 16384
MAX_DATAGRAM = 65535
_READS_PER_WAKEUP = 32          # datagrams read per readiness callback before yielding
_SOCKET_ERRORS = (ConnectionRefusedError, ConnectionResetError, OSError)

Key = tuple[str, int]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_udp(host: str, port: int) -> socket.socket:
    if ipaddress.ip_address(host).is_unspecified:
        raise OSError(errno.EINVAL, f"refusing to listen on the wildcard address {host}")
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Flow:
    """One client address relayed to one endpoint."""
    __slots__ = ("backend", "client", "endpoint", "key", "last", "listener", "sock")

    def __init__(self, listener: _Listener, client: tuple, backend: Backend, endpoint, sock: socket.socket,
                 now: float) -> None:
        self.listener = listener
        self.client = client
        self.backend = backend
        self.endpoint = endpoint
        self.sock = sock
        self.last = now
        self.key = (backend.key, endpoint.addr)


class _Listener:
    __slots__ = ("closed", "flows", "key", "mgr", "sock", "spec")

    def __init__(self, mgr: UdpManager, key: Key, spec: L4Listener, sock: socket.socket) -> None:
        self.mgr = mgr
        self.key = key
        self.spec = spec
        self.sock = sock
        self.flows: dict[tuple, _Flow] = {}
        self.closed = False

    def on_readable(self) -> None:
        mgr = self.mgr
        for _ in range(_READS_PER_WAKEUP):
            try:
                data, client = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:           # an ICMP error for an earlier reply: nothing to do
                continue
            try:
                flow = self.flows.get(client)
                if flow is None:
                    flow = mgr.open_flow(self, client)
                    if flow is None:
                        continue
                flow.last = mgr.clock()
                try:
                    flow.sock.send(data)
                    mgr.count_bytes(flow.backend, "rx", len(data))
                except (BlockingIOError, InterruptedError):
                    pass              # the pod's socket buffer is full: UDP may drop
                except _SOCKET_ERRORS:
                    mgr.close_flow(flow)
            except Exception:         # callback boundary
                log.exception("udp: error relaying a datagram on %s:%d", *self.key)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.mgr.loop.remove_reader(self.sock.fileno())
        for flow in list(self.flows.values()):
            self.mgr.close_flow(flow)
        self.sock.close()


class UdpManager:
    def __init__(self, runtime: Runtime, clock: Callable[[], float] | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.balancers = runtime.balancers
        self.loop = asyncio.get_running_loop()
        self.clock = clock or time.monotonic
        self.listeners: dict[Key, _Listener] = {}
        self.failures: dict[Key, str] = {}
        self.flow_count = 0
        self._full_logged = False
        self._stopped = False
        self._tick = max(0.05, min(1.0, self.settings.udp_idle_timeout / 4))
        self._timer: asyncio.TimerHandle | None = None

    # -- reconciliation ------------------------------------------------------------------------

    def apply(self, snap: Snapshot) -> None:
        try:
            self._apply(snap)
        except Exception:            # a subscriber must not break publishing
            log.exception("udp: applying snapshot %d failed", snap.version)

    def _apply(self, snap: Snapshot) -> None:
        wanted = snap.udp
        for key in [k for k in self.listeners if k not in wanted]:
            self.listeners.pop(key).close()
        for key in [k for k in self.failures if k not in wanted]:
            del self.failures[key]
        if not self._stopped:
            for key, spec in wanted.items():
                lst = self.listeners.get(key)
                if lst is None:
                    self._open(key, spec)
                else:
                    lst.spec = spec
        self._close_gone_endpoints(snap)
        if self.listeners and self._timer is None:
            self._timer = self.loop.call_later(self._tick, self._sweep)

    def _open(self, key: Key, spec: L4Listener) -> None:
        try:
            sock = bind_udp(*key)
        except (OSError, ValueError) as exc:
            if spec.scope == "external" and isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
                return                # another machine's LoadBalancer / external IP
            msg = f"cannot listen on {key[0]}:{key[1]}/udp: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
            if self.failures.get(key) != msg:
                log.error("udp: %s/%s:%s: %s", *spec.backend, msg)
                metrics.l4_listener_errors.labels(*spec.backend).inc()
            self.failures[key] = msg
            return
        self.failures.pop(key, None)
        lst = _Listener(self, key, spec, sock)
        self.listeners[key] = lst
        self.loop.add_reader(sock.fileno(), lst.on_readable)

    def _close_gone_endpoints(self, snap: Snapshot) -> None:
        for lst in self.listeners.values():
            if not lst.flows:
                continue
            spec = snap.udp.get(lst.key)
            b = snap.backends.get(spec.backend) if spec is not None else None
            live = {e.addr for e in (b.local if spec.local_only else b.usable)} if b is not None else set()
            for flow in [f for f in lst.flows.values() if f.endpoint.addr not in live]:
                self.close_flow(flow)

    # -- flows ----------------------------------------------------------------------------------

    def open_flow(self, lst: _Listener, client: tuple) -> _Flow | None:
        snap = self.runtime.snapshot
        spec = snap.udp.get(lst.key) if snap is not None else None
        b = snap.backends.get(spec.backend) if spec is not None else None
        if b is None:
            return None
        ep = self.balancers.pick(b, client[0], spec.local_only)
        if ep is None:
            metrics.l4_no_endpoints.labels(*b.key).inc()
            return None
        if self.flow_count >= MAX_FLOWS:
            if not self._full_logged:
                log.warning("udp: %d flows open; datagrams of new clients are dropped until some expire", MAX_FLOWS)
                self._full_logged = True
            return None
        try:
            sock = socket.socket(_family(ep.ip), socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(ep.addr)
        except OSError as exc:
            log.warning("udp: %s -> %s:%d: %s", client[0], ep.ip, ep.port, exc)
            return None
        flow = _Flow(lst, client, b, ep, sock, self.clock())
        lst.flows[client] = flow
        self.flow_count += 1
        self.balancers.acquire(ep)
        metrics.l4_connections.labels(*b.key).inc()
        metrics.l4_active.labels(*b.key).inc()
        self.loop.add_reader(sock.fileno(), self._on_reply, flow)
        return flow

    def _on_reply(self, flow: _Flow) -> None:
        try:
            for _ in range(_READS_PER_WAKEUP):
                try:
                    data = flow.sock.recv(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except _SOCKET_ERRORS:        # ICMP port unreachable from the pod, ...
                    self.close_flow(flow)
                    return
                flow.last = self.clock()
                try:
                    flow.listener.sock.sendto(data, flow.client)
                    self.count_bytes(flow.backend, "tx", len(data))
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    pass                      # the client is gone; the flow expires
        except Exception:             # callback boundary
            log.exception("udp: error relaying a reply")
            self.close_flow(flow)

    def close_flow(self, flow: _Flow) -> None:
        lst = flow.listener
        if lst.flows.get(flow.client) is not flow:
            return
        del lst.flows[flow.client]
        self.flow_count -= 1
        self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        self.balancers.release(flow.endpoint)
        metrics.l4_active.labels(*flow.backend.key).dec()

    def count_bytes(self, b: Backend, direction: str, n: int) -> None:
        metrics.l4_bytes.labels(*b.key, direction).inc(n)

    # -- timers ---------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Close flows idle for ``udp_idle_timeout``; returns how many."""
        now = self.clock() if now is None else now
        limit = self.settings.udp_idle_timeout
        idle = [f for lst in self.listeners.values() for f in lst.flows.values() if now - f.last >= limit]
        for flow in idle:
            self.close_flow(flow)
        if idle and self.flow_count < MAX_FLOWS:
            self._full_logged = False
        return len(idle)

    def _sweep(self) -> None:
        self._timer = None
        try:
            self.sweep()
        except Exception:            # the sweep must keep running
            log.exception("udp: sweep failed")
        if self.listeners and not self._stopped:
            self._timer = self.loop.call_later(self._tick, self._sweep)

    def stop(self) -> None:
        """Close every socket (SIGTERM / shutdown): UDP has nothing to drain."""
        self._stopped = True
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flows(self) -> int:
        return self.flow_count
