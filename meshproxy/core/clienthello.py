"""The server name (SNI) of a TLS ClientHello, parsed from the first bytes of a connection.

``parse_client_hello(data)`` is pure: the L4 passthrough listeners (l4.sni) and the L7 TLS
listener's ssl-passthrough (l7.passthrough) peek at a new connection's first bytes and ask it
which name the client wants, without consuming anything. Tested byte by byte in
tests/test_sni.py.
"""

from __future__ import annotations

__all__ = ["MAX_HELLO", "INCOMPLETE", "NOT_TLS", "parse_client_hello"]

# A ClientHello fits one 16 KiB record in practice; two records cover any sane one (large
# post-quantum key shares included) and stay well inside a socket's receive buffer.
MAX_HELLO = 2 * (16384 + 5)
INCOMPLETE = "incomplete"
NOT_TLS = "not-tls"


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
