"""A demo/test "pod": a small keep-alive HTTP/1.1 server in its own process.

``python tests/podserver.py NAME HOST PORT [STATUS]`` answers every request with ``NAME PATH``
and STATUS (default 200; ``/healthz`` always 200 ``ok``). On SIGTERM it behaves like a well-written pod: it stops accepting,
finishes what is in flight, closes idle keep-alive connections and exits. SIGKILL is the crash.
Prints ``ready PORT`` on stdout once it listens (PORT 0 lets the kernel choose).
"""

import asyncio
import signal
import sys


class _Conn(asyncio.Protocol):
    def __init__(self, name: bytes, conns: set, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.conns = conns
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.conns.add(self)

    def connection_lost(self, exc):
        self.conns.discard(self)

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            line = head.split(b"\r\n", 1)[0].split(b" ")
            path = line[1] if len(line) > 1 else b"/"
            length = 0
            for h in head.split(b"\r\n")[1:]:
                k, _, v = h.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(self.buf) < length:        # tiny bodies only in these tests
                self.buf = head + b"\r\n\r\n" + self.buf
                return
            self.buf = self.buf[length:]
            status = 200 if path == b"/healthz" else self.status
            body = b"ok\n" if path == b"/healthz" else self.name + b" " + path + b"\n"
            self.transport.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))

    def close_if_idle(self):
        if not self.buf:
            self.transport.close()


async def main(name: str, host: str, port: int, status: int = 200) -> None:
    loop = asyncio.get_running_loop()
    conns: set = set()
    server = await loop.create_server(lambda: _Conn(name.encode(), conns, status), host, port, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await stop.wait()
    server.close()
    await asyncio.sleep(0.2)
    for c in list(conns):
        c.close_if_idle()
    await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 200))
