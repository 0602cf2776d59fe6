"""A test application for the mesh: ``python tests/mesh_app.py NAME --addr IP --http PORT
--tcp PORT``.

- HTTP/1.1 (keep-alive) on --http: every request is answered 200 with a JSON object of what
  the application saw: its name, the peer address, the method, the path and the request
  headers (lower-case names, repeats joined with ", ");
- TCP on --tcp: sends ``NAME PEER_IP\\n`` first (a server-first protocol), then echoes what it
  reads; at EOF it writes ``bye\\n`` and closes.

Prints ``ready`` once both listen; SIGTERM stops it.
"""

import argparse
import asyncio
import json
import signal


class Http(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")[0]

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers: dict[str, str] = {}
            length = 0
            for line in lines[1:]:
                k, _, v = line.partition(":")
                k, v = k.strip().lower(), v.strip()
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
                if k == "content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            body = json.dumps({"name": self.name, "peer": self.peer, "method": method, "path": path,
                               "headers": headers}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))


class Tcp(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name

    def connection_made(self, transport):
        self.transport = transport
        transport.write(f"{self.name} {transport.get_extra_info('peername')[0]}\n".encode())

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.write(b"bye\n")
        self.transport.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--addr", required=True)
    ap.add_argument("--http", type=int, default=8080)
    ap.add_argument("--tcp", type=int, default=9000)
    a = ap.parse_args()
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Http(a.name), a.addr, a.http, reuse_address=True)
    await loop.create_server(lambda: Tcp(a.name), a.addr, a.tcp, reuse_address=True)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
