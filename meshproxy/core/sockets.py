"""Listening sockets, registered so that an upgrade can hand them to the next process.

Every listener of the process (L4, Ingress, admin) is created by ``listen()``, which
registers it; ``meshproxy.control`` passes the registered sockets to a new process on
``run --takeover`` (see there for the procedure), and the new process adopts them here
(``adopt_inherited``) so that ``listen()`` returns the inherited socket instead of binding
again: the kernel socket, and the connections queued in its backlog, stay open throughout.
"""

from __future__ import annotations

import logging
import socket

__all__ = ["listen", "release", "registered", "adopt_inherited", "unused_inherited"]

log = logging.getLogger("meshproxy.sockets")

_registry: dict[tuple[str, int], socket.socket] = {}
_inherited: dict[tuple[str, int], socket.socket] = {}


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A non-blocking listening TCP socket on exactly (host, port), shared with other
    processes through SO_REUSEPORT; an inherited one (takeover) when there is one."""
    sock = _inherited.pop((host, port), None)
    if sock is None:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
    else:
        log.info("using inherited listener %s:%d", host, port)
    sock.setblocking(False)
    bound = sock.getsockname()[:2]
    _registry[(host, bound[1])] = sock
    return sock


def release(sock: socket.socket) -> None:
    for k, v in list(_registry.items()):
        if v is sock:
            del _registry[k]


def registered() -> dict[tuple[str, int], socket.socket]:
    return dict(_registry)


def adopt_inherited(socks: dict[tuple[str, int], socket.socket]) -> None:
    _inherited.update(socks)


def unused_inherited() -> list[tuple[str, int]]:
    """Close inherited sockets nobody asked for (listeners the new configuration dropped)."""
    gone = list(_inherited)
    for sock in _inherited.values():
        sock.close()
    _inherited.clear()
    return gone
