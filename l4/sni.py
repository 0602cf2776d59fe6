"""Per-connection routing of Gateway TCP and TLS passthrough listeners.

``route_connection(conn, snap, listener)`` decides which backend an accepted connection goes
to when its ``L4Listener`` carries routes (``meshproxy.core.listeners.L4Routes``): a weighted
choice among the backends of the matching route - for TLS passthrough, the route matching
the server name (SNI) of the client's ClientHello. The ClientHello is *peeked*
(``MSG_PEEK``), never consumed: once the backend is chosen the pump forwards every byte the
client sent, handshake included, and TLS stays end to end between client and backend.

Waiting for the ClientHello is bounded: at most ``MAX_HELLO`` bytes (a ClientHello spread
over several records included) and ``settings.header_timeout`` seconds; a client that sends
no TLS at all, or no server name, gets the listener's route for "any name" if it has one.
No route, or a weighted choice that lands on an invalid backend reference, refuses the
connection with a reset, as the Gateway API asks (rejections respect weights).

The peek waits on the connection manager's epoll set in edge-triggered mode: a partial
ClientHello stays readable, so level-triggered readiness would call back in a loop without
new bytes. ``parse_client_hello`` is pure and tested byte by byte.
"""

from __future__ import annotations

import logging
import random
import socket
import select
from typing import Any

__all__ = ["MAX_HELLO", "INCOMPLETE", "NOT_TLS", "parse_client_hello", "route_connection"]

log = logging.getLogger("meshproxy.l4")

# A ClientHello fits one 16 KiB record in practice; two records cover any sane one (large
# post-quantum key shares included) and stay well inside a socket's receive buffer.
MAX_HELLO = 2 * (16384 + 5)
INCOMPLETE = "incomplete"
NOT_TLS = "not-tls"
_ET = getattr(select, "EPOLLET", 1 << 31)
_IN = 0x001


def parse_client_hello(data: bytes) -> tuple[str, str | None]:
    """``("ok", server name or None)``, ``(INCOMPLETE, None)`` (more bytes needed), or
    ``(NOT_TLS, None)`` for anything that is not the start of a TLS ClientHello."""
    # Reassemble the handshake message from consecutive handshake records.
    msg = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return INCOMPLETE, None
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != 0x16 or major != 3 or not 0 < length <= 16384:
            return NOT_TLS, None
        body = data[pos + 5:pos + 5 + length]
        msg += body
        if len(msg) >= 4:
            if msg[0] != 0x01:                          # not a ClientHello
                return NOT_TLS, None
            need = 4 + int.from_bytes(msg[1:4], "big")
            if need > MAX_HELLO:
                return NOT_TLS, None
            if len(msg) >= need:
                break
        if len(body) < length:
            return INCOMPLETE, None
        pos += 5 + length
    try:
        return "ok", _server_name(bytes(msg[4:need]))
    except (IndexError, ValueError):
        return NOT_TLS, None


def _server_name(hello: bytes) -> str | None:
    p = 2 + 32                                          # client_version, random
    p += 1 + hello[p]                                   # session_id
    p += 2 + int.from_bytes(hello[p:p + 2], "big")      # cipher_suites
    p += 1 + hello[p]                                   # compression_methods
    if p >= len(hello):
        return None                                     # no extensions
    end = p + 2 + int.from_bytes(hello[p:p + 2], "big")
    if end > len(hello):
        raise ValueError("extensions overrun")
    p += 2
    while p + 4 <= end:
        etype, elen = int.from_bytes(hello[p:p + 2], "big"), int.from_bytes(hello[p + 2:p + 4], "big")
        p += 4
        if etype == 0:                                  # server_name (RFC 6066 section 3)
            q = p + 2
            list_end = p + 2 + int.from_bytes(hello[p:p + 2], "big")
            while q + 3 <= list_end:
                ntype, nlen = hello[q], int.from_bytes(hello[q + 1:q + 3], "big")
                if ntype == 0:
                    name = hello[q + 3:q + 3 + nlen].decode("ascii")
                    if not name or any(c <= " " or c == "\x7f" for c in name):
                        raise ValueError("bad host name")
                    return name.lower().rstrip(".")
                q += 3 + nlen
            return None
        p += elen
    return None


def route_connection(conn: Any, snap: Any, listener: Any, rand=random.random) -> None:
    """Choose the backend of ``conn`` (an ``l4.pump.L4Connection`` just accepted on
    ``listener``) and hand it to ``conn.begin``; see the module docstring."""
    routes = listener.routes
    if not routes.sni:
        wb = routes.choose(None)
        conn.begin(snap, wb.pick(rand()) if wb is not None else None, listener.backend)
        return
    _SniPeek(conn, snap, listener, rand).start()


class _SniPeek:
    __slots__ = ("conn", "fd", "listener", "rand", "snap")

    def __init__(self, conn: Any, snap: Any, listener: Any, rand) -> None:
        self.conn, self.snap, self.listener, self.rand = conn, snap, listener, rand
        self.fd = conn.client.fileno()

    def start(self) -> None:
        mgr = self.conn.mgr
        mgr.poller.attach(self.fd, self.on_event)
        mgr.poller.want(self.fd, _IN | _ET)
        self.conn.timer = mgr.loop.call_later(mgr.settings.header_timeout, self.on_timeout)
        self.on_event(_IN)          # the ClientHello is often there already

    def on_timeout(self) -> None:
        self.conn.timer = None
        log.debug("l4: %s: no ClientHello within the header timeout; closing", self.conn.describe())
        self._done(None, refuse=True)

    def on_event(self, _events: int) -> None:
        try:
            try:
                data = self.conn.client.recv(MAX_HELLO, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._done(None, refuse=True)
                return
            if not data:
                self._done(None, refuse=True)     # the client left before saying anything
                return
            status, name = parse_client_hello(data)
            if status == INCOMPLETE and len(data) < MAX_HELLO:
                mgr = self.conn.mgr
                if not hasattr(mgr.poller, "ep"):
                    # The add_reader fallback is level-triggered: look again a little later
                    # instead of being called back in a loop for the same bytes.
                    mgr.poller.want(self.fd, 0)
                    mgr.loop.call_later(0.01, self._rearm)
                return                            # edge-triggered: called again when more arrives
            self._done(name, refuse=False)
        except Exception:            # callback boundary
            self.conn.crashed("reading the ClientHello")

    def _rearm(self) -> None:
        if self.conn.timer is not None and self.conn.client.fileno() == self.fd:
            self.conn.mgr.poller.want(self.fd, _IN)

    def _done(self, name: str | None, refuse: bool) -> None:
        conn = self.conn
        conn.mgr.poller.detach(self.fd)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        key = None
        if not refuse:
            wb = self.listener.routes.choose(name)
            key = wb.pick(self.rand()) if wb is not None else None
        conn.begin(self.snap, key, self.listener.backend)
