"""HTTP/1.1 and HTTP/2 load generator: ``python -m bench.load URL [options]``.

``--http2`` speaks HTTP/2 (prior knowledge) with ``--streams`` requests in flight per
connection, and ``--grpc`` makes each request a gRPC unary call (bench/load_h2.py); both are
closed loop. For HTTP/1.1, two modes:

- closed loop (default): ``-c N`` connections, each sends its next request as soon as the
  previous response is complete (what wrk does). Latency is measured per request from the
  moment it was written (or, with --no-keepalive, from the start of its connect).
- open loop (``--rate R``): requests are *intended* at a constant rate, t0 + i/R, whatever the
  server does. A request that finds no idle connection waits in a queue, and its latency is
  measured from its intended send time, not from when it was finally written. This is the
  coordinated-omission correction (Gil Tene; wrk2): a stalled server cannot hide its stall by
  slowing the generator down.

Always bounded: it stops after --duration seconds (default 10), or earlier after --requests.
Targets must be loopback (127.0.0.0/8, ::1, localhost) — a rule of this workplace.

Speed notes (the generator must out-run the proxy it loads; ~30k+ req/s per process on small
keep-alive responses with uvloop):
- one asyncio.Protocol per connection, no streams, no coroutines on the request path;
- the response parser is a small state machine over positions in the received bytes: one
  ``find(b"\\r\\n\\r\\n")`` and one ``lower()`` of the head per response, body bytes are only
  counted, never copied;
- the request bytes are built once;
- latencies go into a log-linear histogram (bench/hist.py) — a few integer ops each.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import sys
import time
from urllib.parse import urlsplit

from bench._util import NotLoopback, check_loopback
from bench.hist import Histogram
from bench.load_h2 import H2Generator, grpc_frame

# Parser states.
_HEAD, _BODY_LEN, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _BODY_EOF = range(6)
_MAX_HEAD = 64 * 1024

_perf = time.perf_counter


class _Conn(asyncio.Protocol):
    __slots__ = (
        "alive",
        "buf",
        "busy",
        "close_after",
        "g",
        "nbytes",
        "remaining",
        "state",
        "status",
        "t0",
        "transport",
    )

    def __init__(self, g: _Generator, t0: float) -> None:
        self.g = g
        self.transport = None
        self.buf = b""
        self.state = _HEAD
        self.remaining = 0
        self.status = 0
        self.close_after = False
        # Start of the request in flight (perf_counter seconds): intended time in open loop,
        # write time in closed loop, connect start without keep-alive.
        self.t0 = t0
        self.busy = False
        self.alive = False
        self.nbytes = 0

    # -- asyncio callbacks (never raise out of these) --------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.alive = True
        self.g.conns.add(self)
        self.g.on_ready(self)

    def connection_lost(self, exc) -> None:
        self.alive = False
        g = self.g
        g.conns.discard(self)
        if self.state == _BODY_EOF and self.busy:
            # Close-delimited body: EOF completes the response.
            self._complete()
        elif self.busy:
            if g.running:
                g.errors["read"] += 1
            self.busy = False
        g.on_lost(self)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        n = len(data)
        g = self.g
        while pos < n:
            st = self.state
            if st == _HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > _MAX_HEAD:
                        self._fail("parse")
                        return
                    self.buf = data[pos:]
                    return
                head = data[pos:end].lower()
                pos = end + 4
                try:
                    status = int(head[9:12])
                except ValueError:
                    self._fail("parse")
                    return
                if status < 200:  # 1xx interim response: the real one follows
                    continue
                self.status = status
                self.close_after = b"\nconnection: close" in head or head.startswith(b"http/1.0")
                i = head.find(b"\ncontent-length:")
                if g.head_method or status == 204 or status == 304:
                    self._complete()
                elif i >= 0:
                    j = head.find(b"\r", i + 16)
                    try:
                        self.remaining = int(head[i + 16 : j] if j > 0 else head[i + 16 :])
                    except ValueError:
                        self._fail("parse")
                        return
                    if self.remaining == 0:
                        self._complete()
                    else:
                        self.state = _BODY_LEN
                elif b"\ntransfer-encoding:" in head and b"chunked" in head:
                    self.state = _CHUNK_SIZE
                else:
                    self.state = _BODY_EOF
            elif st == _BODY_LEN:
                take = n - pos
                if take >= self.remaining:
                    pos += self.remaining
                    self.nbytes += self.remaining
                    self.remaining = 0
                    self.state = _HEAD
                    self._complete()
                else:
                    self.remaining -= take
                    self.nbytes += take
                    pos = n
            elif st == _CHUNK_SIZE or st == _TRAILERS:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.buf = data[pos:]
                    return
                line = data[pos:eol]
                pos = eol + 2
                if st == _TRAILERS:
                    if not line:
                        self.state = _HEAD
                        self._complete()
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self._fail("parse")
                    return
                if size == 0:
                    self.state = _TRAILERS
                else:
                    self.remaining = size + 2  # chunk data + its CRLF
                    self.state = _CHUNK_DATA
            elif st == _CHUNK_DATA:
                take = n - pos
                if take >= self.remaining:
                    pos += self.remaining
                    self.nbytes += self.remaining
                    self.remaining = 0
                    self.state = _CHUNK_SIZE
                else:
                    self.remaining -= take
                    self.nbytes += take
                    pos = n
            else:  # _BODY_EOF
                self.nbytes += n - pos
                pos = n

    # -- request cycle ---------------------------------------------------------------------

    def send(self, t0: float) -> None:
        self.t0 = t0
        self.busy = True
        self.state = _HEAD
        self.transport.write(self.g.request)

    def _complete(self) -> None:
        self.busy = False
        self.state = _HEAD
        g = self.g
        now = _perf()
        if g.running or g.draining:
            g.hist.record(int((now - self.t0) * 1e6))
            g.completed += 1
            st = self.status
            g.status[st] = g.status.get(st, 0) + 1
            g.body_bytes += self.nbytes
        self.nbytes = 0
        if self.close_after or not g.keepalive or not self.alive:
            # The server (or we) end the connection after this response; a new one replaces
            # it from on_lost().
            self.alive = False
            self.transport.close()
            return
        g.on_idle(self, now)

    def _fail(self, kind: str) -> None:
        g = self.g
        if g.running:
            g.errors[kind] += 1
        self.busy = False
        self.alive = False
        self.transport.abort()


class _Generator:
    """One process's share of the load: its connections, schedule and counters."""

    def __init__(self, opts: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.host = opts["ip"]
        self.port = opts["port"]
        self.request: bytes = opts["request"]
        self.head_method = opts["method"] == "HEAD"
        self.keepalive = opts["keepalive"]
        self.nconns = opts["connections"]
        self.rate = opts["rate"]  # this process's share, 0 = closed loop
        self.phase = opts["phase"]
        self.max_requests = opts["requests"]  # this process's share, 0 = unbounded
        self.timeout = opts["timeout"]
        self.hist = Histogram()
        self.lag = Histogram()
        self.status: dict[int, int] = {}
        self.errors = collections.Counter({"connect": 0, "read": 0, "timeout": 0, "parse": 0})
        self.completed = 0
        self.issued = 0
        self.body_bytes = 0
        self.conns: set[_Conn] = set()
        self.idle: list[_Conn] = []
        self.pending: collections.deque[float] = collections.deque()
        self.connecting = 0
        self.running = False
        self.draining = False
        self.t_start = 0.0
        self.t_end = 0.0
        self.done = loop.create_future()

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, start_at: float, duration: float) -> dict:
        # Connect first (not timed), then start together with the other processes.
        for _ in range(self.nconns):
            self._spawn()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.running = True
        self.t_start = _perf()
        self.loop.call_at(self.loop.time() + duration, self._stop)
        self._watchdog()
        if self.rate:
            self._tick()
        else:
            for c in list(self.idle):
                self.idle.remove(c)
                c.send(_perf())
        await self.done
        return self._result()

    def _stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.t_end = _perf()
        if self.rate and (self.pending or any(c.busy for c in self.conns)):
            # Open loop: let requests already intended finish (they are part of the measured
            # schedule), bounded by a grace period; what is still open then counts as timeouts
            # with its latency so far, a lower bound.
            self.draining = True
            grace = min(self.timeout, 2.0)
            self.loop.call_later(grace, self._finish)
            return
        self._finish()

    def _finish(self) -> None:
        if self.done.done():
            return
        now = _perf()
        if self.draining:
            for c in self.conns:
                if c.busy:
                    self.errors["timeout"] += 1
                    self.hist.record(int((now - c.t0) * 1e6))
            for t in self.pending:
                self.errors["timeout"] += 1
                self.hist.record(int((now - t) * 1e6))
            self.pending.clear()
        self.draining = False
        for c in list(self.conns):
            c.alive = False
            c.transport.abort()
        self.done.set_result(None)

    def _result(self) -> dict:
        return {
            "requests": self.completed,
            "issued": self.issued,
            "duration_s": (self.t_end or _perf()) - self.t_start,
            "body_bytes": self.body_bytes,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": dict(self.errors),
            "hist": self.hist.to_json(),
            "lag": self.lag.to_json(),
        }

    # -- connections -----------------------------------------------------------------------

    def _spawn(self) -> None:
        self.connecting += 1
        t0 = _perf()
        task = self.loop.create_task(
            self.loop.create_connection(lambda: _Conn(self, t0), self.host, self.port)
        )
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        self.connecting -= 1
        exc = task.exception() if not task.cancelled() else None
        if exc is None:
            return
        if self.running or self.t_start == 0.0:
            self.errors["connect"] += 1
            # Back off a little so a dead target does not become a busy loop.
            self.loop.call_later(0.01, self._respawn)

    def _respawn(self) -> None:
        if self.running or self.t_start == 0.0 or (self.draining and self.pending):
            self._spawn()

    def on_ready(self, c: _Conn) -> None:
        """A new connection is up: give it work or park it."""
        if not (self.running or (self.draining and self.pending)):
            if self.t_start == 0.0:
                self.idle.append(c)  # connected before the start
            else:
                c.alive = False
                c.transport.close()
            return
        if self.rate:
            if self.pending:
                c.send(self.pending.popleft())
            else:
                self.idle.append(c)
        else:
            # Without keep-alive the latency includes connect time: c.t0 is connect start.
            c.send(c.t0 if not self.keepalive else _perf())

    def on_idle(self, c: _Conn, now: float) -> None:
        if self.max_requests and self.completed >= self.max_requests and self.running:
            self._stop()
        if self.rate:
            if self.pending:
                c.send(self.pending.popleft())
            elif self.running or self.draining:
                self.idle.append(c)
                if self.draining and not any(x.busy for x in self.conns):
                    self._finish()
        elif self.running:
            c.send(now)

    def on_lost(self, c: _Conn) -> None:
        try:
            self.idle.remove(c)
        except ValueError:
            pass
        if self.max_requests and self.completed >= self.max_requests and self.running:
            self._stop()
        if self.running or (self.draining and self.pending):
            self._spawn()
        elif self.draining and not self.pending and not any(x.busy for x in self.conns):
            self._finish()

    # -- schedule (open loop) -------------------------------------------------------------

    def _tick(self) -> None:
        if not self.running:
            return
        now = _perf()
        rate = self.rate
        t0 = self.t_start + self.phase
        due = int((now - t0) * rate) + 1
        if self.max_requests:
            due = min(due, self.max_requests)
        lag = self.lag
        while self.issued < due:
            intended = t0 + self.issued / rate
            self.issued += 1
            if self.idle:
                self.idle.pop().send(intended)
                # How late the generator itself is against the schedule when a connection was
                # free (timer granularity, its own CPU share): the floor under every latency
                # of an open-loop run. Waiting for a busy connection is the server's doing and
                # is not counted here.
                lag.record(int((now - intended) * 1e6))
            else:
                self.pending.append(intended)
        if self.max_requests and self.issued >= self.max_requests:
            return  # the last responses end the run via on_idle
        # libuv timers have 1 ms resolution; requests due within a tick go out together but
        # keep their exact intended times, so latency stays honest.
        self.loop.call_later(0.001, self._tick)

    def _watchdog(self) -> None:
        if not (self.running or self.draining):
            return
        now = _perf()
        limit = self.timeout
        for c in list(self.conns):
            if c.busy and now - c.t0 > limit:
                # Counted and recorded at the time waited so far (a lower bound).
                self.errors["timeout"] += 1
                self.hist.record(int((now - c.t0) * 1e6))
                c.busy = False
                c.alive = False
                c.transport.abort()
        self.loop.call_later(0.1, self._watchdog)


# ------------------------------------------------------------------------------ processes


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _worker(opts: dict, start_at: float, duration: float, conn) -> None:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        g = H2Generator(opts, loop) if opts.get("http2") else _Generator(opts, loop)
        res = loop.run_until_complete(g.run(start_at, duration))
        usage = os.times()
        res["cpu_s"] = usage.user + usage.system
        conn.send(res)
    except Exception as e:  # noqa: BLE001 - report to the parent rather than hang it
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        loop.close()
        conn.close()


def _split(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


def build_request(method: str, path: str, host_header: str, headers: list[str], body: bytes,
                  keepalive: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    names = {h.split(":", 1)[0].strip().lower() for h in headers}
    if "host" not in names:
        lines.append(f"Host: {host_header}")
    if "user-agent" not in names:
        lines.append("User-Agent: meshproxy-bench/1")
    if not keepalive and "connection" not in names:
        lines.append("Connection: close")
    lines.extend(headers)
    if body and "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def run_load(
    url: str,
    *,
    connections: int = 50,
    duration: float = 10.0,
    requests: int = 0,
    rate: float = 0.0,
    keepalive: bool = True,
    processes: int = 1,
    method: str = "GET",
    headers: list[str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
    http2: bool = False,
    streams: int = 10,
    grpc: bool = False,
) -> dict:
    """Run the load and return the merged result (see `--json` for the shape)."""
    u = urlsplit(url)
    if u.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    if not u.hostname:
        raise ValueError(f"no host in {url!r}")
    ip = check_loopback(u.hostname)
    port = u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    host_header = u.netloc
    if duration <= 0:
        raise ValueError("--duration must be > 0 (the run is always bounded)")
    processes = max(1, min(processes, connections))
    request = build_request(method, path, host_header, headers or [], body, keepalive)
    start_at = time.time() + 0.2 + 0.05 * processes
    base = {
        "ip": ip, "port": port, "request": request, "method": method,
        "keepalive": keepalive, "timeout": timeout,
    }
    if http2 or grpc:
        if rate or not keepalive:
            raise ValueError("--http2 / --grpc: closed loop on kept connections only")
        if grpc:
            method = "POST"
            body = grpc_frame(body)
        h2h = [(b":method", method.encode()), (b":scheme", b"http"), (b":path", path.encode()),
               (b":authority", host_header.encode())]
        if grpc:
            h2h += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        for h in headers or []:
            n, _, v = h.partition(":")
            h2h.append((n.strip().lower().encode(), v.strip().encode()))
        base.update(http2=True, streams=streams, grpc=grpc, body=body, h2_headers=h2h)
    per = []
    for i in range(processes):
        o = dict(base)
        o["connections"] = _split(connections, processes, i)
        o["rate"] = rate / processes if rate else 0.0
        # Interleave the processes' schedules so the sum is evenly spaced.
        o["phase"] = (i / rate) if rate else 0.0
        o["requests"] = _split(requests, processes, i) if requests else 0
        per.append(o)
    t_wall = time.time()
    if processes == 1:
        loop = _new_loop()
        try:
            g = H2Generator(per[0], loop) if base.get("http2") else _Generator(per[0], loop)
            results = [loop.run_until_complete(g.run(start_at, duration))]
            usage = os.times()
            results[0]["cpu_s"] = usage.user + usage.system
        finally:
            loop.close()
    else:
        ctx = multiprocessing.get_context("fork")
        pipes, procs = [], []
        for o in per:
            a, b = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(o, start_at, duration, b), daemon=True)
            p.start()
            b.close()
            pipes.append(a)
            procs.append(p)
        results = []
        hard = duration + timeout + 30
        for a, p in zip(pipes, procs):
            if a.poll(max(1.0, start_at - time.time() + hard)):
                results.append(a.recv())
            else:
                results.append({"error": "worker did not report"})
            p.join(5)
            if p.is_alive():
                p.kill()  # our own child, by its handle
        for r in results:
            if "error" in r:
                raise RuntimeError(r["error"])
    return _merge(results, url=url, connections=connections, processes=processes, rate=rate,
                  keepalive=keepalive, wall=time.time() - t_wall)


def _merge(results: list[dict], **meta) -> dict:
    hist = Histogram()
    lag = Histogram()
    status: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    reqs = issued = body = 0
    dur = 0.0
    cpu = 0.0
    for r in results:
        hist.merge(Histogram.from_json(r["hist"]))
        lag.merge(Histogram.from_json(r["lag"]))
        status.update({k: v for k, v in r["status"].items()})
        errors.update(r["errors"])
        reqs += r["requests"]
        issued += r["issued"]
        body += r["body_bytes"]
        dur = max(dur, r["duration_s"])
        cpu += r.get("cpu_s", 0.0)
    bad_status = sum(v for k, v in status.items() if not (200 <= int(k) < 400))
    dur = dur or 1e-9
    return {
        "tool": "bench.load",
        "url": meta["url"],
        "mode": "open" if meta["rate"] else "closed",
        "connections": meta["connections"],
        "processes": meta["processes"],
        "keepalive": meta["keepalive"],
        "target_rate": meta["rate"] or None,
        "duration_s": round(dur, 4),
        "requests": reqs,
        "issued": issued if meta["rate"] else reqs,
        "rps": round(reqs / dur, 1),
        "body_bytes": body,
        "body_mbps": round(body * 8 / dur / 1e6, 2),
        "status": dict(sorted(status.items())),
        "errors": dict(errors),
        "non_2xx_3xx": bad_status,
        "latency_ms": hist.summary_ms(),
        # open loop only: send time minus intended time for requests that found a free
        # connection (the generator's own lateness, a floor under the latencies)
        "schedule_lag_ms": lag.summary_ms() if meta["rate"] else None,
        "generator_cpu_s": round(cpu, 3),
        "hist": hist.to_json(),
    }


def _human(r: dict) -> str:
    lat = r["latency_ms"]
    mode = (f"open loop at {r['target_rate']:g} req/s" if r["mode"] == "open"
            else "closed loop")
    errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items())
    st = ", ".join(f"{k}={v}" for k, v in r["status"].items()) or "none"
    return "\n".join([
        (f"target      {r['url']}  ({mode}, {r['connections']} connections, "
         f"{r['processes']} process(es), "
         f"{'keep-alive' if r['keepalive'] else 'new connection per request'})"),
        (f"requests    {r['requests']} in {r['duration_s']:.2f} s = {r['rps']:.1f} req/s, "
         f"body {r['body_mbps']:.1f} Mbit/s"),
        (f"latency ms  p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
         f"p99.9 {lat['p999']}  max {lat['max']}  mean {lat['mean']}"),
        f"errors      {errs}; status {st}; non-2xx/3xx {r['non_2xx_3xx']}",
        *([(f"send lag ms p50 {r['schedule_lag_ms']['p50']}  p99 {r['schedule_lag_ms']['p99']}  "
            f"max {r['schedule_lag_ms']['max']}  (generator lateness vs the schedule; a floor "
            "under the latencies)")] if r.get("schedule_lag_ms") else []),
        f"generator   {r['generator_cpu_s']} s CPU",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=(
            "HTTP/1.1 load generator (uvloop + asyncio Protocols). Closed loop with -c N "
            "connections, or open loop with --rate R requests/s constant, latency measured from "
            "each request's intended send time (coordinated-omission correction). Always "
            "bounded by --duration. Only loopback targets (127.0.0.0/8, ::1, localhost)."
        ),
    )
    p.add_argument("url", help="http://127.0.0.1:PORT/path (loopback only)")
    p.add_argument("-c", "--connections", type=int, default=50,
                   help="connections (closed loop: concurrency; open loop: pool size) [50]")
    p.add_argument("-d", "--duration", type=float, default=10.0,
                   help="seconds to run; always applies [10]")
    p.add_argument("-n", "--requests", type=int, default=0,
                   help="stop after this many requests (whichever comes first with --duration)")
    p.add_argument("-r", "--rate", type=float, default=0.0,
                   help="open loop: requests/s, constant; latency from intended send time")
    p.add_argument("--no-keepalive", action="store_true",
                   help="new connection per request (sends Connection: close; latency includes connect)")
    p.add_argument("-p", "--processes", type=int, default=1,
                   help="worker processes sharing connections and rate, merged at the end [1]")
    p.add_argument("-m", "--method", default="GET")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("--data", default="", help="request body (sent with Content-Length)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s [10]")
    p.add_argument("--http2", action="store_true", help="HTTP/2 with prior knowledge (closed loop)")
    p.add_argument("--streams", type=int, default=10, help="--http2: requests in flight per connection [10]")
    p.add_argument("--grpc", action="store_true",
                   help="gRPC unary calls over HTTP/2 (--data is the message; grpc-status != 0 counts as an error)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--histogram", action="store_true",
                   help="with --json: keep the sparse histogram buckets in the output")
    a = p.parse_args(argv)
    try:
        r = run_load(
            a.url, connections=a.connections, duration=a.duration, requests=a.requests,
            rate=a.rate, keepalive=not a.no_keepalive, processes=a.processes,
            method=a.method.upper(), headers=a.header, body=a.data.encode(), timeout=a.timeout,
            http2=a.http2, streams=a.streams, grpc=a.grpc,
        )
    except (NotLoopback, ValueError) as e:
        print(f"bench.load: error: {e}", file=sys.stderr)
        return 2
    if not a.histogram:
        r.pop("hist", None)
    if a.json:
        print(json.dumps(r))
    else:
        print(_human(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
