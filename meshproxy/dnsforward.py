"""Forwarding of names outside the cluster domain, as CoreDNS's ``forward`` plugin does.

The cluster DNS (``meshproxy.dnsserver``) answers ``<domain>`` itself; every other question
is passed, unchanged, to an upstream resolver and the upstream's answer goes back to the
client — so a pod needs no second resolver. Upstreams are ``--dns-upstream HOST[:PORT]``
(repeatable), else the ``nameserver`` lines of ``/etc/resolv.conf``.

Rules (CoreDNS ``forward`` defaults where they apply):

- the query keeps its transport: a UDP question goes to the upstream over UDP (a truncated
  answer is passed on as it is, and the client retries over TCP), a TCP one over TCP;
- upstreams are tried in a random order, each for ``timeout`` seconds (2), the next one after
  a timeout or a network error; when all fail the client gets SERVFAIL;
- an answer counts only if it is a response (QR), has the query's ID and repeats its question
  (case-insensitive) — anything else from the network is ignored and the wait goes on;
- at most ``max_concurrent`` (1000) questions are out at a time; beyond that the client gets
  REFUSED at once (CoreDNS answers REFUSED there too), so a flood cannot pile up sockets;
- an upstream that is this server's own address is left out (a forwarding loop otherwise).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
from typing import Iterable

__all__ = ["Forwarder", "resolv_conf_servers"]

log = logging.getLogger("meshproxy.dns")

TIMEOUT = 2.0
MAX_CONCURRENT = 1000


def resolv_conf_servers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` addresses of a resolv.conf, port 53; unreadable file: none."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    addr = parts[1].split("%", 1)[0]
                    try:
                        ipaddress.ip_address(addr)
                    except ValueError:
                        continue
                    out.append((addr, 53))
    except OSError:
        pass
    return out


def _question(wire: bytes) -> bytes | None:
    """The question section (name lowercased, type, class) of a message with one question."""
    if len(wire) < 12 or struct.unpack_from("!H", wire, 4)[0] != 1:
        return None
    pos = 12
    out = bytearray()
    while pos < len(wire):
        n = wire[pos]
        if n & 0xC0:
            return None                   # questions are never compressed in practice
        out.append(n)
        if n == 0:
            pos += 1
            break
        out += wire[pos + 1:pos + 1 + n].lower()
        pos += 1 + n
    if pos + 4 > len(wire):
        return None
    return bytes(out) + wire[pos:pos + 4]


class _UdpWait(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes, question: bytes | None) -> None:
        self.qid = qid
        self.question = question
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if _matches(data, self.qid, self.question) and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


def _matches(data: bytes, qid: bytes, question: bytes | None) -> bool:
    return len(data) >= 12 and data[:2] == qid and bool(data[2] & 0x80) and \
        (question is None or _question(data) == question)


class Forwarder:
    def __init__(self, upstreams: Iterable[tuple[str, int]], own: tuple[str, int] | None = None,
                 timeout: float = TIMEOUT, max_concurrent: int = MAX_CONCURRENT) -> None:
        self.upstreams = [u for u in upstreams if own is None or (u[0], u[1]) != own]
        self.timeout = timeout
        self.max_concurrent = max_concurrent
        self.inflight = 0
        self.stats = {"forwarded": 0, "upstream_errors": 0, "servfail": 0, "refused": 0}

    async def forward(self, wire: bytes, udp: bool) -> bytes:
        """The upstream's answer to ``wire``, or a SERVFAIL / REFUSED made from it."""
        if not self.upstreams:
            self.stats["servfail"] += 1
            return _with_rcode(wire, 2)
        if self.inflight >= self.max_concurrent:
            self.stats["refused"] += 1
            return _with_rcode(wire, 5)
        self.inflight += 1
        self.stats["forwarded"] += 1
        try:
            order = list(self.upstreams)
            random.shuffle(order)
            question = _question(wire)
            for host, port in order:
                try:
                    if udp:
                        return await asyncio.wait_for(self._udp(wire, host, port, question), self.timeout)
                    return await asyncio.wait_for(self._tcp(wire, host, port, question), self.timeout)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.stats["upstream_errors"] += 1
                    log.debug("DNS forward to %s:%d: %s", host, port, exc or type(exc).__name__)
            self.stats["servfail"] += 1
            return _with_rcode(wire, 2)
        finally:
            self.inflight -= 1

    async def _udp(self, wire: bytes, host: str, port: int, question: bytes | None) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(lambda: _UdpWait(wire[:2], question),
                                                               remote_addr=(host, port))
        try:
            transport.sendto(wire)
            return await proto.answer
        finally:
            transport.close()

    async def _tcp(self, wire: bytes, host: str, port: int, question: bytes | None) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                if _matches(data, wire[:2], question):
                    return data
        finally:
            writer.close()


def _with_rcode(query: bytes, rcode: int) -> bytes:
    """A header-and-question answer to ``query`` with ``rcode`` (QR and RA set, RD copied)."""
    if len(query) < 12:
        return query
    flags = struct.unpack_from("!H", query, 2)[0]
    flags = (flags & 0x7900) | 0x8080 | rcode     # keep opcode and RD, set QR and RA
    q = _question(query)
    body = query[12:12 + len(q)] if q is not None else b""
    return query[:2] + struct.pack("!HHHHH", flags, 1 if q else 0, 0, 0, 0) + body
