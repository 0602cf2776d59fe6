"""PROXY protocol headers (HAProxy, ``doc/proxy-protocol.txt``), sender side only.

A Service annotated ``meshproxy.dev/proxy-protocol: v1|v2`` gets one header written to each
new upstream connection before any client byte, so the pod sees the client's address
(source) and the address the client connected to (destination: the ClusterIP / NodePort).

Rules kept (section numbers of the spec):

- v1 (2.1) is one US-ASCII line ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n``, at most
  107 bytes; when the addresses are not both IPv4 or both IPv6 the line is ``PROXY UNKNOWN\\r\\n``.
- v2 (2.2) is the 12-byte signature, then ``0x21`` (version 2, command PROXY), the family
  byte ``0x11`` (TCP over IPv4, 12 address bytes) or ``0x21`` (TCP over IPv6, 36 bytes), the
  address length as a big-endian u16, then src addr, dst addr, src port, dst port in network
  order. Mixed or unknown families send the LOCAL command (``0x20``) with family ``0x00`` and
  length 0, which receivers must accept and treat as "use the real connection endpoints".
- IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``, what a dual-stack socket reports) are sent
  as IPv4, so a v4 client on a v6 listener still yields a TCP4 / ``0x11`` header.
- No TLVs are sent: nothing in L4 knows ALPN or SNI.

The whole header is built once per connection and written in one ``write()`` (the spec asks
that it is sent at once; it is always smaller than an MSS).
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["V2_SIGNATURE", "header", "v1_header", "v2_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21          # version 2 << 4 | command PROXY
_V2_LOCAL = 0x20          # version 2 << 4 | command LOCAL
_TCP4 = 0x11              # AF_INET << 4 | STREAM
_TCP6 = 0x21              # AF_INET6 << 4 | STREAM


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])   # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def v1_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    s, d = _ip(src[0]), _ip(dst[0])
    if s is None or d is None or s.version != d.version:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if s.version == 4 else "TCP6"
    # str() of an ip_address is the canonical (compressed) form the spec asks for.
    return f"PROXY {proto} {s} {d} {int(src[1])} {int(dst[1])}\r\n".encode("ascii")


def v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    s, d = _ip(src[0]), _ip(dst[0])
    if s is None or d is None or s.version != d.version:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0x00, 0)
    fam = _TCP4 if s.version == 4 else _TCP6
    body = s.packed + d.packed + struct.pack("!HH", int(src[1]), int(dst[1]))
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, fam, len(body)) + body


def header(version: int, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The header for ``Backend.proxy_protocol`` (1 or 2); ``b""`` for 0 (off)."""
    if version == 1:
        return v1_header(src, dst)
    if version == 2:
        return v2_header(src, dst)
    return b""
