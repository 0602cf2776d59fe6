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
new bytes. ``parse_client_hello`` (meshproxy.core.clienthello, shared with the L7 TLS
listener's ssl-passthrough) is pure and tested byte by byte.
"""

from __future__ import annotations

import logging
import random
import socket
import select
from typing import Any

from meshproxy.core.clienthello import INCOMPLETE, MAX_HELLO, NOT_TLS, parse_client_hello

__all__ = ["MAX_HELLO", "INCOMPLETE", "NOT_TLS", "parse_client_hello", "route_connection"]

log = logging.getLogger("meshproxy.l4")

_ET = getattr(select, "EPOLLET", 1 << 31)
_IN = 0x001


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
