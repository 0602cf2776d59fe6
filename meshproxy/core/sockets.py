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

__all__ = ["listen", "release", "registered", "adopt_inherited", "unused_inherited", "original_dst"]

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


# SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/
# ip6_tables.h): both 80, read at SOL_IP / SOL_IPV6. Python's socket module names neither.
_SO_ORIGINAL_DST = 80
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a connection redirected by netfilter (``meshproxy capture``'s nftables rules) was
    going before the redirect: (address, port), from the connection's conntrack entry.

    IPv4 on an AF_INET socket, IPv6 on an AF_INET6 socket, and an IPv4 connection accepted on a
    dual-stack AF_INET6 socket (peer ``::ffff:a.b.c.d``) too. Raises OSError (ENOENT) when the
    kernel has no NAT entry for it. A connection that was *not* redirected reports its own
    destination — the listener's address — so callers must treat "original destination is my
    own listener" as a loop, not as a target.
    """
    if sock.family == socket.AF_INET6:
        peer = sock.getpeername()[0]
        if not peer.startswith("::ffff:"):
            raw = sock.getsockopt(_SOL_IPV6, _SO_ORIGINAL_DST, 28)   # struct sockaddr_in6
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    raw = sock.getsockopt(_SOL_IP, _SO_ORIGINAL_DST, 16)             # struct sockaddr_in
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
