"""A test "pod" for the namespace cluster (tests/netns.py): says who it is and who called.

``python tests/netns_pod.py NAME --addr IP [--addr IP6] --tcp PORT [--udp PORT]``

- TCP: on accept, sends ``NAME PEER_IP\\n``, then echoes what it reads until EOF;
- UDP: answers each datagram with ``NAME PEER_IP `` followed by the datagram.

Prints ``ready`` once every socket is bound. SIGTERM / SIGINT stop it.
"""

import argparse
import asyncio
import signal
import socket


class _Tcp(asyncio.Protocol):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")[0]
        transport.write(self.name + b" " + peer.encode() + b"\n")

    def data_received(self, data):
        self.transport.write(data)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(self.name + b" " + addr[0].encode() + b" " + data, addr)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--addr", action="append", required=True)
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    a = ap.parse_args()
    loop = asyncio.get_running_loop()
    name = a.name.encode()
    for addr in a.addr:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        for port in a.tcp:
            await loop.create_server(lambda: _Tcp(name), addr, port, family=fam, reuse_address=True)
        for port in a.udp:
            await loop.create_datagram_endpoint(lambda: _Udp(name), local_addr=(addr, port), family=fam)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
