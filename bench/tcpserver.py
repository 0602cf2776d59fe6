"""Tiny uvloop TCP backend for the L4 scenarios: ``python -m bench.tcpserver --listen HOST:PORT``.

One port, three behaviours chosen by the first byte a connection sends (so one Service / one
listener serves every L4 scenario):

- ``B`` + 8-byte big-endian N: *sink* — read and discard N bytes, then answer with the 8-byte
  count; the client may send the next ``B`` segment on the same connection. Throughput is
  measured end to end (the ack proves the bytes went through the proxy, without depending on
  half-close).
- ``S`` + 8-byte N: *source* — send N bytes (downstream direction), then wait for a command.
- ``G`` (``GET ...``): *HTTP* — answers every request head with a fixed 6-byte 200 response
  and closes when the request said ``Connection: close``. This lets wrk (C) drive the L4
  connection-rate scenario, so the client is not the bottleneck.
- anything else: *echo* — every byte received is sent back (connection-rate scenario with the
  Python client).

BufferedProtocol with one preallocated 256 KiB buffer per connection: discarding costs one
recv_into per chunk and no allocation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from bench._util import check_loopback, split_hostport

_BUF = 256 * 1024
_ZEROS = memoryview(bytes(1024 * 1024))
_CMD, _SINK, _ECHO, _HTTP = range(4)
_HTTP_KEEP = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n"
_HTTP_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n"


class _Conn(asyncio.BufferedProtocol):
    __slots__ = ("count", "hdr", "mv", "paused", "remaining", "state", "to_send", "transport")

    def __init__(self) -> None:
        self.transport = None
        self.mv = memoryview(bytearray(_BUF))
        self.state = _CMD
        self.hdr = b""
        self.remaining = 0
        self.count = 0
        self.to_send = 0
        self.paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int):
        return self.mv

    def buffer_updated(self, nbytes: int) -> None:
        if self.state == _ECHO:
            self.transport.write(bytes(self.mv[:nbytes]))
            return
        if self.state == _HTTP or (self.state == _CMD and not self.hdr and self.mv[0] == 0x47):
            self._http(nbytes)
            return
        pos = 0
        while pos < nbytes:
            if self.state == _SINK:
                take = min(nbytes - pos, self.remaining)
                pos += take
                self.remaining -= take
                self.count += take
                if self.remaining == 0:
                    self.transport.write(self.count.to_bytes(8, "big"))
                    self.count = 0
                    self.state = _CMD
            elif self.state == _CMD:
                if not self.hdr and self.mv[pos] not in (0x42, 0x53):  # not 'B' / 'S'
                    self.state = _ECHO
                    self.transport.write(bytes(self.mv[pos:nbytes]))
                    return
                need = 9 - len(self.hdr)
                self.hdr += bytes(self.mv[pos : pos + need])
                pos += min(need, nbytes - pos)
                if len(self.hdr) == 9:
                    n = int.from_bytes(self.hdr[1:], "big")
                    cmd = self.hdr[0]
                    self.hdr = b""
                    if cmd == 0x42:
                        self.remaining = n
                        self.state = _SINK
                        if n == 0:
                            self.transport.write((0).to_bytes(8, "big"))
                            self.state = _CMD
                    else:
                        self.to_send = n
                        self._pump()
            else:
                return

    def _http(self, nbytes: int) -> None:
        self.state = _HTTP
        data = self.hdr + bytes(self.mv[:nbytes])
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                break
            head = data[:end].lower()
            data = data[end + 4 :]
            if b"\nconnection: close" in head:
                self.transport.write(_HTTP_CLOSE)
                self.transport.close()
                return
            self.transport.write(_HTTP_KEEP)
        if len(data) > 65536:
            self.transport.abort()
            return
        self.hdr = data

    def _pump(self) -> None:
        while self.to_send and not self.paused:
            k = min(self.to_send, len(_ZEROS))
            self.transport.write(_ZEROS[:k])
            self.to_send -= k

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, host, port, backlog=4096, reuse_address=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"listening {host}:{port} pid {os.getpid()}", flush=True)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tcpserver", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT on loopback")
    a = p.parse_args(argv)
    host, port = split_hostport(a.listen)
    check_loopback(host)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port))
    else:
        uvloop.run(serve(host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
