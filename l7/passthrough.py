"""ssl-passthrough on the Ingress TLS listener (``--enable-ssl-passthrough``).

With the flag, the TLS listener accepts connections itself and *peeks* at each one's first
bytes (``MSG_PEEK``: nothing is consumed) for the ClientHello's server name. A name that an
Ingress marks ``nginx.ingress.kubernetes.io/ssl-passthrough: "true"`` (``snapshot.passthrough``:
host -> backend) gets its bytes relayed unchanged to a pod of that backend - TLS stays end to end
between the client and the pod, as with ingress-nginx's TCP proxy in front of nginx. Any other
connection (another name, no name, not TLS) is terminated here like on a listener without the
flag: the same socket is handed to asyncio's TLS server side.

Bounded: the peek waits for at most ``MAX_HELLO`` bytes and ``settings.header_timeout``
seconds; a client that sends nothing in time is closed. A partial ClientHello is looked at
again 10 ms later (level-triggered readiness would report the same peeked bytes in a loop).
The relay keeps back-pressure in both directions (a full write buffer on one side pauses
reading on the other) and passes half-closes on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from meshproxy.core.clienthello import INCOMPLETE, MAX_HELLO, parse_client_hello

__all__ = ["Sniffer"]

log = logging.getLogger("meshproxy.l7")

_ACCEPT_BATCH = 64      # connections accepted per readiness callback before the loop gets control back


class _Pipe(asyncio.Protocol):
    """One side of a relay: what it reads goes to ``peer``'s transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Sniffer:
    """The accept side of a TLS listener with ssl-passthrough (see the module docstring)."""

    def __init__(self, server: Any, listener: Any) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.sock: socket.socket | None = None

    def start(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def stop(self) -> None:
        sock = self.sock
        if sock is not None:
            self.sock = None
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):   # already closed
                pass
            sock.close()   # our duplicate; the listener keeps the bound socket

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:            # EMFILE and friends: try again on the next readiness
                log.warning("L7: accepting on %s:%d failed: %s", self.listener.host, self.listener.port, exc)
                return
            conn.setblocking(False)
            _Peek(self, conn, peer[0] if peer else "").start()


class _Peek:
    """One accepted connection until its ClientHello says where it goes."""

    __slots__ = ("sniffer", "sock", "peer_ip", "timer", "retry")

    def __init__(self, sniffer: Sniffer, sock: socket.socket, peer_ip: str) -> None:
        self.sniffer = sniffer
        self.sock = sock
        self.peer_ip = peer_ip
        self.timer = None
        self.retry = None

    def start(self) -> None:
        loop = self.sniffer.loop
        self.timer = loop.call_later(self.sniffer.server.settings.header_timeout, self._timeout)
        loop.add_reader(self.sock.fileno(), self._readable)

    def _stop_waiting(self) -> None:
        loop = self.sniffer.loop
        try:
            loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        for h in (self.timer, self.retry):
            if h is not None:
                h.cancel()
        self.timer = self.retry = None

    def _timeout(self) -> None:
        self.timer = None
        self._stop_waiting()
        self.sock.close()

    def _again(self) -> None:
        self.retry = None
        if self.timer is not None:
            self.sniffer.loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._stop_waiting()
            self.sock.close()
            return
        if not data:
            self._stop_waiting()
            self.sock.close()
            return
        status, name = parse_client_hello(data)
        if status == INCOMPLETE and len(data) < MAX_HELLO:
            self.sniffer.loop.remove_reader(self.sock.fileno())
            self.retry = self.sniffer.loop.call_later(0.01, self._again)
            return
        self._stop_waiting()
        try:
            self._dispatch(name)
        except Exception:  # noqa: BLE001 - a callback must not raise into the loop
            log.exception("L7: ssl-passthrough dispatch failed")
            self.sock.close()

    def _dispatch(self, name: str | None) -> None:
        sniffer = self.sniffer
        server = sniffer.server
        snap = server.runtime.snapshot
        key = snap.passthrough.get(name) if (snap is not None and name) else None
        loop = sniffer.loop
        if key is None:
            lst = sniffer.listener
            loop.create_task(loop.connect_accepted_socket(
                lst.new_connection, self.sock, ssl=lst.ssl_ctx, ssl_handshake_timeout=server.settings.header_timeout))
            return
        backend = snap.backends.get(key)
        ep = server.balancers.pick(backend, self.peer_ip) if backend is not None and backend.usable else None
        if ep is None:
            log.debug("L7: ssl-passthrough for %s: no endpoint; closing", name)
            self.sock.close()
            return
        loop.create_task(self._relay(ep.ip, ep.port))

    async def _relay(self, ip: str, port: int) -> None:
        loop = self.sniffer.loop
        server = self.sniffer.server
        client = _Pipe()
        try:
            await loop.connect_accepted_socket(lambda: client, self.sock)
            client.transport.pause_reading()
            upstream = _Pipe()
            async with asyncio.timeout(server.settings.connect_timeout):
                await loop.create_connection(lambda: upstream, ip, port)
        except (OSError, TimeoutError) as exc:
            log.debug("L7: ssl-passthrough to %s:%d failed: %s", ip, port, exc)
            if client.transport is not None:
                client.transport.abort()
            else:
                self.sock.close()
            return
        client.peer, upstream.peer = upstream, client
        for chunk in client.pending:
            upstream.transport.write(chunk)
        client.pending = []
        if client.eof and upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        client.transport.resume_reading()
