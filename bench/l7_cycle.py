"""The Python work per L7 request, without sockets: ``python -m bench.l7_cycle``.

An ``IngressServer`` on a fake loop with fake transports (the real shells - ``ClientConnection``,
``UpstreamConnection`` - and the real exchange, parsers and header policy) serves N request /
response cycles; only the kernel, uvloop and the sockets are missing. Deterministic when counted
with callgrind: ``--callgrind`` runs the driver twice under valgrind (N and 3N cycles) and the
difference of the two instruction counts divided by 2N is the cost of one cycle, start-up excluded.

Paths (``--path``):
* ``hit`` - keep-alive, the same request and response heads every time (wrk, health checks): the
  repeated-head shortcuts skip parsing and head building;
* ``miss`` - keep-alive, every head different (a varying request field and response field):
  parse, header policy and heads each time;
* ``newconn`` - a new client connection per request (the pooled upstream connection is reused):
  connection set-up, a fresh parser, the request parse every time.

``--core compiled|python`` picks the L7 core (``--http-parser``).

    python -m bench.l7_cycle --callgrind --core compiled --path hit
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import re
import shutil
import subprocess
import sys
import time

from discovery.manifests import load_text
from discovery.store import ADDED, Allocator, EndpointIndex, Event, Store
from l7.downstream import ClientConnection
from l7.server import IngressServer
from l7.upstream import UpstreamConnection, UpstreamPool
from meshproxy.core.runtime import Runtime
from meshproxy.core.settings import Settings
from meshproxy.core.snapshot import SnapshotBuilder

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 127.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {containers: [{name: web, ports: [{containerPort: 8080}]}]}
status: {podIP: 127.0.10.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec: {rules: [{host: example.com, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}]}}]}
"""
# What wrk sends and what nginx answers in the bench's keep-alive scenario.
REQUEST = b"GET /x HTTP/1.1\r\nHost: example.com\r\nUser-Agent: wrk\r\n%s\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 05:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n%s\r\nhello\n")


class _Handle:
    __slots__ = ("when", "seq", "callback", "args", "cancelled")

    def __init__(self, when, seq, callback, args) -> None:
        self.when, self.seq, self.callback, self.args, self.cancelled = when, seq, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class _Loop:
    """The loop surface the shells use; timers are kept, never fired (the clock stands still)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[_Handle] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when, callback, *args) -> _Handle:
        h = _Handle(when, next(self._seq), callback, args)
        if len(self._timers) > 10_000:   # cancelled re-armed timers: keep the heap small
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
        heapq.heappush(self._timers, h)
        return h

    def call_later(self, delay, callback, *args) -> _Handle:
        return self.call_at(self.now + delay, callback, *args)

    def call_soon(self, callback, *args) -> _Handle:
        return self.call_at(self.now, callback, *args)

    def create_task(self, coro):
        coro.close()


class _Transport:
    __slots__ = ("written", "peer", "closing", "protocol")

    def __init__(self, peer=("127.0.0.9", 40000)) -> None:
        self.written: list[bytes] = []
        self.peer = peer
        self.closing = False

    def write(self, data) -> None:
        self.written.append(data)

    def writelines(self, data) -> None:
        self.written.extend(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def close(self) -> None:
        self.closing = True

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8080)}.get(name, default)


class _Listener:
    def __init__(self) -> None:
        self.tls = False
        self.http = None
        self.port = 8080
        self.port_b = b"8080"
        self.local_host = b"127.0.0.1:8080"

    def opened(self) -> None:
        pass

    def closed(self) -> None:
        pass


class _Pool(UpstreamPool):
    """Connections are made at once on a fake transport (and then pooled as usual)."""

    def connect(self, addr, labels, exchange, token) -> None:
        conn = UpstreamConnection(self, addr, labels)
        conn.connection_made(_Transport(peer=addr))
        conn.state = 1
        conn.counts[0] += 1
        self.connects += 1
        self.last = conn
        exchange.connected(token, conn, None)


def _server(core: str):
    settings = Settings(health_checks=False, http_parser=core)
    runtime = Runtime(settings)
    result = load_text(MANIFESTS)
    store = Store()
    index = EndpointIndex(store)
    index.on_changes(store.apply([Event(ADDED, o) for o in result.objects]))
    index.recompute()
    snap = SnapshotBuilder(settings).build(store, index, Allocator(settings.service_cidr, settings.node_port_range))
    runtime.publish(snap)
    loop = _Loop()
    server = IngressServer(runtime)
    server.loop = loop
    server.now = loop.time
    server.pool = _Pool(loop, settings)
    server.pool.apply(snap)
    return server


def run(n: int, path: str, core: str) -> float:
    """Serve ``n`` cycles (after a warm-up); returns wall seconds per cycle."""
    server = _server(core)
    listener = _Listener()

    def client():
        c = ClientConnection(server, listener)
        t = _Transport()
        c.connection_made(t)
        return c, t

    c, t = client()
    c.data_received(REQUEST % b"")
    up = server.pool.last
    up.data_received(RESPONSE % b"")
    vary = path == "miss"
    requests = [REQUEST % (b"X-N: %d\r\n" % i if vary else b"") for i in range(256)]
    responses = [RESPONSE % (b"ETag: \"%d\"\r\n" % i if vary else b"") for i in range(256)]

    def cycles(count: int) -> None:
        nonlocal c, t
        for i in range(count):
            if path == "newconn":
                c.connection_lost(None)
                c, t = client()
            c.data_received(requests[i & 255])
            server.pool.last.data_received(responses[i & 255])
            if i & 255 == 0:
                t.written.clear()
                server.pool.last.transport.written.clear()

    cycles(2000)
    t0 = time.perf_counter()
    cycles(n)
    dt = time.perf_counter() - t0
    assert t.written or i_wrote(server), "no response was written"
    return dt / n


def i_wrote(server) -> bool:
    return bool(server.pool.last.transport.written)


def instructions(n: int, path: str, core: str) -> int:
    # The file itself, not "-m bench.l7_cycle": with PYTHONPATH set to another checkout (one
    # without this driver) the same cycles measure that version's l7.
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, os.path.abspath(__file__),
           "--cycles", str(n), "--path", path, "--core", core]
    # A fixed hash seed: dict and set layouts (and so their probe counts) are the same each run.
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    m = re.search(r"Collected : (\d+)", r.stderr)
    if m is None:
        raise SystemExit(f"no instruction count from valgrind: {r.stderr[-500:]}")
    return int(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.l7_cycle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20000)
    ap.add_argument("--path", choices=("hit", "miss", "newconn"), default="hit")
    ap.add_argument("--core", default="auto", help="--http-parser value (auto, compiled, python, ...)")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per cycle: valgrind runs of N and 3N cycles, difference / 2N")
    a = ap.parse_args(argv)
    if a.callgrind:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind is not installed (apt-get install valgrind)")
        n = min(a.cycles, 3000)
        low, high = instructions(n, a.path, a.core), instructions(3 * n, a.path, a.core)
        print(f"{a.path} {a.core}: {(high - low) / (2 * n):,.0f} instructions per cycle")
        return 0
    per = run(a.cycles, a.path, a.core)
    if not os.environ.get("VALGRIND_QUIET"):
        print(f"{a.path} {a.core}: {per * 1e6:.2f} us per cycle (wall, this machine's load included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
