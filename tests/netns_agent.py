"""A small program run inside a test's network namespace (``ip netns exec NS python ...``).

    netns_agent.py serve SPEC...      listen; print "ready"; answer until killed
        SPEC = orig:NAME:HOST:PORT    answer {"listener": NAME, "original": [addr, port]} (SO_ORIGINAL_DST)
             | tcp:NAME:HOST:PORT     answer {"listener": NAME}
             | udp:NAME:HOST:PORT     answer each datagram with {"listener": NAME}
    netns_agent.py connect HOST PORT [--uid UID] [--udp]
                                      connect (as UID if given), print the answer line
    netns_agent.py no-nat             connect to itself on loopback; print what original_dst says

HOST may be an IPv6 address (no brackets). Every connection is answered at once and closed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshproxy.core.sockets import original_dst  # noqa: E402


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _tcp(kind: str, name: str, host: str, port: int) -> None:
    srv = socket.socket(_family(host), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if host.startswith("::ffff:"):
        # An IPv4-mapped address on an AF_INET6 socket: IPv4 connections arrive on it.
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((host, port))
    srv.listen(64)

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                answer: dict = {"listener": name}
                if kind == "orig":
                    try:
                        answer["original"] = list(original_dst(conn))
                    except OSError as exc:
                        answer["error"] = str(exc)
                conn.sendall(json.dumps(answer).encode() + b"\n")
    threading.Thread(target=loop, daemon=True).start()


def _udp(name: str, host: str, port: int) -> None:
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind((host, port))

    def loop() -> None:
        while True:
            _, addr = s.recvfrom(2048)
            s.sendto(json.dumps({"listener": name}).encode() + b"\n", addr)
    threading.Thread(target=loop, daemon=True).start()


def serve(specs: list[str]) -> None:
    for spec in specs:
        kind, name, rest = spec.split(":", 2)
        host, _, port = rest.rpartition(":")
        if kind == "udp":
            _udp(name, host, int(port))
        else:
            _tcp(kind, name, host, int(port))
    print("ready", flush=True)
    threading.Event().wait()


def connect(host: str, port: int, uid: int | None, udp: bool) -> None:
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    if udp:
        s = socket.socket(_family(host), socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(b"q", (host, port))
        print(s.recvfrom(2048)[0].decode().strip())
        return
    try:
        # A numeric address needs no resolver (which, after setuid, could not load its codecs).
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect((host, port))
            print(s.makefile("rb").readline().decode().strip() or json.dumps({"error": "closed"}))
    except OSError as exc:
        print(json.dumps({"error": type(exc).__name__}))


def no_nat() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        print(json.dumps({"original": list(original_dst(conn))}))
    except OSError as exc:
        print(json.dumps({"error": exc.errno}))
    c.close()
    conn.close()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(args)
    elif cmd == "connect":
        uid = int(args[args.index("--uid") + 1]) if "--uid" in args else None
        connect(args[0], int(args[1]), uid, "--udp" in args)
    elif cmd == "no-nat":
        no_nat()
