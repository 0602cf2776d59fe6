"""L4 load clients for the benchmark (talk to bench/tcpserver.py, directly or through a proxy).

    python -m bench.tcpload bulk HOST:PORT [--duration S] [--streams K] [--direction up|down]
    python -m bench.tcpload connrate HOST:PORT [--duration S] [-c N] [--processes P]
    python -m bench.tcpload idle URL -n 10000 [--hold S]

Each prints one JSON object (idle prints a "ready" line first, then the final one). All are
bounded in time and refuse non-loopback targets.

- bulk: K connections each push 64 MiB segments (``B`` + length, acknowledged by the server)
  until the duration is over; reports Gbit/s counted from acknowledged bytes only. Blocking
  sockets with 1 MiB ``sendall``/``recv_into``: the kernel copy dominates, so Python is not the
  bottleneck (a thread per stream; the calls release the GIL).
- connrate: new TCP connection per exchange: connect, send 16 bytes, read them back, close.
  Reports completed connections/s and the connect+echo latency.
- idle: opens N HTTP/1.1 keep-alive connections, one GET on each, then holds them idle so the
  caller can read the proxy's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

from bench._util import NotLoopback, check_loopback, split_hostport
from bench.hist import Histogram

_perf = time.perf_counter


# ------------------------------------------------------------------------------------ bulk


def _bulk_stream(ip: str, port: int, deadline: float, seg: int, direction: str, out: list) -> None:
    buf = memoryview(bytes(1 << 20)) if direction == "up" else memoryview(bytearray(1 << 20))
    done = 0
    t_first = t_last = 0.0
    err = None
    try:
        s = socket.create_connection((ip, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t_first = _perf()
        while _perf() < deadline:
            if direction == "up":
                s.sendall(b"B" + seg.to_bytes(8, "big"))
                left = seg
                while left:
                    k = min(left, len(buf))
                    s.sendall(buf[:k])
                    left -= k
                ack = b""
                while len(ack) < 8:
                    b = s.recv(8 - len(ack))
                    if not b:
                        raise ConnectionError("closed before the segment was acknowledged")
                    ack += b
                if int.from_bytes(ack, "big") != seg:
                    raise ConnectionError(f"server acknowledged {int.from_bytes(ack, 'big')} of {seg}")
            else:
                s.sendall(b"S" + seg.to_bytes(8, "big"))
                left = seg
                while left:
                    n = s.recv_into(buf, min(left, len(buf)))
                    if not n:
                        raise ConnectionError("closed mid-segment")
                    left -= n
            done += seg
            t_last = _perf()
        s.close()
    except OSError as e:
        err = f"{type(e).__name__}: {e}"
    out.append({"bytes": done, "t_first": t_first, "t_last": t_last, "error": err})


def bulk(addr: str, duration: float, streams: int, direction: str, segment_mib: int) -> dict:
    host, port = split_hostport(addr)
    ip = check_loopback(host)
    seg = segment_mib << 20
    deadline = _perf() + duration
    out: list = []
    t0 = os.times()
    threads = [
        threading.Thread(target=_bulk_stream, args=(ip, port, deadline, seg, direction, out))
        for _ in range(streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 60)
    t1 = os.times()
    total = sum(r["bytes"] for r in out)
    starts = [r["t_first"] for r in out if r["t_first"]]
    ends = [r["t_last"] for r in out if r["t_last"]]
    secs = (max(ends) - min(starts)) if starts and ends else 0.0
    errors = [r["error"] for r in out if r["error"]]
    return {
        "tool": "bench.tcpload bulk",
        "target": addr,
        "direction": direction,
        "streams": streams,
        "bytes": total,
        "duration_s": round(secs, 4),
        "gbps": round(total * 8 / secs / 1e9, 3) if secs else 0.0,
        "errors": len(errors),
        "error_messages": errors[:3],
        "generator_cpu_s": round((t1.user - t0.user) + (t1.system - t0.system), 3),
    }


# -------------------------------------------------------------------------------- connrate


class _Echo(asyncio.Protocol):
    __slots__ = ("g", "got", "ok", "t0", "transport")

    def __init__(self, g: _ConnRate, t0: float) -> None:
        self.g = g
        self.t0 = t0
        self.got = 0
        self.ok = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.g.payload)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(self.g.payload) and not self.ok:
            self.ok = True
            g = self.g
            if g.running:
                g.done += 1
                g.hist.record(int((_perf() - self.t0) * 1e6))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        g = self.g
        if not self.ok and g.running:
            g.errors += 1
        g.next()


class _ConnRate:
    def __init__(self, ip: str, port: int, conc: int, payload: bytes, loop) -> None:
        self.ip, self.port, self.conc, self.payload, self.loop = ip, port, conc, payload, loop
        self.hist = Histogram()
        self.done = 0
        self.errors = 0
        self.running = False
        self.finished = loop.create_future()
        self.active = 0

    async def run(self, start_at: float, duration: float) -> dict:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.running = True
        t0 = _perf()
        self.loop.call_later(duration, self._stop)
        for _ in range(self.conc):
            self._spawn()
        await self.finished
        return {"done": self.done, "errors": self.errors, "secs": duration,
                "hist": self.hist.to_json(), "t0": t0}

    def _stop(self) -> None:
        self.running = False
        # Let in-flight exchanges end (not counted) so their sockets close cleanly.
        self.loop.call_later(0.5, lambda: self.finished.done() or self.finished.set_result(None))

    def _spawn(self) -> None:
        self.active += 1
        t0 = _perf()
        task = self.loop.create_task(
            self.loop.create_connection(lambda: _Echo(self, t0), self.ip, self.port)
        )
        task.add_done_callback(self._connected)

    def _connected(self, task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.active -= 1
            if self.running:
                self.errors += 1
                self.loop.call_later(0.005, self._respawn)

    def _respawn(self) -> None:
        if self.running:
            self._spawn()

    def next(self) -> None:
        self.active -= 1
        if self.running:
            self._spawn()


def _new_loop():
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _connrate_proc(ip, port, conc, payload, start_at, duration, conn=None):
    loop = _new_loop()
    try:
        g = _ConnRate(ip, port, conc, payload, loop)
        r = loop.run_until_complete(g.run(start_at, duration))
        tm = os.times()
        r["cpu_s"] = tm.user + tm.system
    finally:
        loop.close()
    if conn is not None:
        conn.send(r)
        conn.close()
    return r


def connrate(addr: str, duration: float, conc: int, processes: int, payload_size: int) -> dict:
    host, port = split_hostport(addr)
    ip = check_loopback(host)
    payload = b"E" * payload_size  # never 'B' / 'S': the server's echo mode
    start_at = time.time() + 0.2
    if processes <= 1:
        results = [_connrate_proc(ip, port, conc, payload, start_at, duration)]
    else:
        ctx = multiprocessing.get_context("fork")
        pairs = []
        for i in range(processes):
            a, b = ctx.Pipe(duplex=False)
            share = conc // processes + (1 if i < conc % processes else 0)
            p = ctx.Process(target=_connrate_proc,
                            args=(ip, port, share, payload, start_at, duration, b), daemon=True)
            p.start()
            b.close()
            pairs.append((a, p))
        results = []
        for a, p in pairs:
            if a.poll(duration + 30):
                results.append(a.recv())
            p.join(5)
            if p.is_alive():
                p.kill()  # our own child, by its handle
    h = Histogram()
    for r in results:
        h.merge(Histogram.from_json(r["hist"]))
    done = sum(r["done"] for r in results)
    return {
        "tool": "bench.tcpload connrate",
        "target": addr,
        "concurrency": conc,
        "processes": processes,
        "connections": done,
        "duration_s": duration,
        "cps": round(done / duration, 1),
        "errors": sum(r["errors"] for r in results),
        "latency_ms": h.summary_ms(),
        "generator_cpu_s": round(sum(r.get("cpu_s", 0.0) for r in results), 3),
    }


# ------------------------------------------------------------------------------------ idle


class _Idle(asyncio.Protocol):
    def __init__(self, req: bytes, fut) -> None:
        self.req, self.fut, self.buf, self.transport = req, fut, b"", None
        self.open = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.open = True
        transport.write(self.req)

    def data_received(self, data: bytes) -> None:
        if self.fut.done():
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        i = head.find(b"\ncontent-length:")
        n = int(head[i + 16 :].split(b"\r", 1)[0]) if i >= 0 else 0
        if len(self.buf) - end - 4 >= n:
            self.buf = b""
            self.fut.set_result(int(head[9:12]))

    def connection_lost(self, exc) -> None:
        self.open = False
        if not self.fut.done():
            self.fut.set_result(0)


async def _idle(url: str, n: int, hold: float, batch: int) -> None:
    u = urlsplit(url)
    ip = check_loopback(u.hostname or "")
    port = u.port or 80
    req = (f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\n"
           f"User-Agent: meshproxy-bench/1\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    conns: list[_Idle] = []
    ok = failed = 0
    t0 = _perf()
    deadline = _perf() + 120.0  # bounded even when the proxy stops accepting (maxconn)
    for start in range(0, n, batch):
        if _perf() > deadline:
            failed += n - start
            break
        futs = []
        for _ in range(min(batch, n - start)):
            fut = loop.create_future()
            futs.append((fut, loop.create_connection(lambda f=fut: _Idle(req, f), ip, port)))
        try:
            made = await asyncio.wait_for(
                asyncio.gather(*(c for _, c in futs), return_exceptions=True), 10)
        except TimeoutError:
            # The target stopped accepting: count this batch and the rest as failed.
            failed += n - start
            break
        waiting = []
        for (fut, _), m in zip(futs, made):
            if isinstance(m, BaseException):
                failed += 1
                continue
            conns.append(m[1])
            waiting.append(fut)
        if waiting:
            await asyncio.wait(waiting, timeout=10)
        for fut in waiting:
            st = fut.result() if fut.done() else 0
            if 200 <= st < 400:
                ok += 1
            else:
                failed += 1
    print(json.dumps({"ready": ok, "failed": failed, "open_s": round(_perf() - t0, 2)}), flush=True)
    await asyncio.sleep(hold)
    still = sum(1 for c in conns if c.open)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    print(json.dumps({"tool": "bench.tcpload idle", "target": url, "requested": n, "ready": ok,
                      "failed": failed, "still_open": still}), flush=True)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tcpload", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bulk", help="throughput in Gbit/s through HOST:PORT to bench.tcpserver")
    b.add_argument("addr")
    b.add_argument("-d", "--duration", type=float, default=5.0)
    b.add_argument("--streams", type=int, default=1)
    b.add_argument("--direction", choices=("up", "down"), default="up")
    b.add_argument("--segment-mib", type=int, default=64)
    c = sub.add_parser("connrate", help="new TCP connections/s (connect, echo 16 bytes, close)")
    c.add_argument("addr")
    c.add_argument("-d", "--duration", type=float, default=5.0)
    c.add_argument("-c", "--concurrency", type=int, default=32)
    c.add_argument("-p", "--processes", type=int, default=1)
    c.add_argument("--payload", type=int, default=16)
    i = sub.add_parser("idle", help="hold N idle HTTP keep-alive connections")
    i.add_argument("url")
    i.add_argument("-n", "--connections", type=int, default=10000)
    i.add_argument("--hold", type=float, default=3.0)
    i.add_argument("--batch", type=int, default=250)
    a = p.parse_args(argv)
    try:
        if a.cmd == "bulk":
            r = bulk(a.addr, a.duration, a.streams, a.direction, a.segment_mib)
        elif a.cmd == "connrate":
            r = connrate(a.addr, a.duration, a.concurrency, a.processes, a.payload)
        else:
            loop = _new_loop()
            try:
                loop.run_until_complete(_idle(a.url, a.connections, min(a.hold, 600), a.batch))
            finally:
                loop.close()
            return 0
    except (NotLoopback, ValueError) as e:
        print(f"bench.tcpload: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
