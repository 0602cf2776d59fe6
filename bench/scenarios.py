"""What the benchmark measures: one entry per scenario, and the code that runs one sample
(one candidate, one round) of it.

A sample is a plain dict: the driver's figures plus the proxy's CPU and memory over the run
(bench.procstat, delta of utime+stime of the proxy's process tree). The harness (__main__)
decides the order — candidates interleaved, round after round — and report.py summarises.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import procstat
from bench.drivers import Drivers
from bench.peers import Peer

MiB = 1048576
SLOW_READERS = 1000


@dataclass
class RunContext:
    drivers: Drivers
    duration: float
    connections: int = 50
    idle_connections: int = 10000
    latency_base: dict = field(default_factory=dict)  # {"rps": float, "from": "nginx ..."}


@dataclass(frozen=True)
class Scenario:
    name: str
    layer: str  # "l7" | "l4"
    title: str
    measures: str  # one line for --help and docs
    unit: str  # unit of the headline value
    op: str  # what CPU time is divided by: "req", "conn", "MiB"
    refs: tuple[str, ...]  # ratios are taken against these candidates, per round
    fn: Callable[[RunContext, Peer, object], dict]
    levels: tuple = (None,)  # l7-latency: percent of the base rate
    higher_is_better: bool = True
    rounds: int | None = None  # fixed number of rounds (None: --rounds)
    skip_direct: bool = False


# ------------------------------------------------------------------------------- samples


def _http(url: str, path: str) -> str:
    return url.rstrip("/") + path


def _l7_keepalive(r: RunContext, peer: Peer, level) -> dict:
    d = r.drivers.http_closed(_http(peer.l7_url, "/"), connections=r.connections, duration=r.duration)
    return dict(d, value=d["rps"], ops=d["requests"])


def _l7_newconn(r: RunContext, peer: Peer, level) -> dict:
    d = r.drivers.http_closed(_http(peer.l7_url, "/"), connections=r.connections,
                              duration=r.duration, keepalive=False)
    return dict(d, value=d["rps"], ops=d["requests"])


def _l7_body(path: str, conns: int):
    def run(r: RunContext, peer: Peer, level) -> dict:
        d = r.drivers.http_closed(_http(peer.l7_url, path), connections=conns, duration=r.duration)
        d["gbps"] = round(d["bytes"] * 8 / max(d["duration_s"], 1e-9) / 1e9, 3)
        return dict(d, value=d["rps"], ops=d["requests"])

    return run


def _l7_builtin(r: RunContext, peer: Peer, level) -> dict:
    d = r.drivers.http_closed(_http(peer.l7_url, "/"), connections=r.connections,
                              duration=r.duration, builtin=True)
    return dict(d, value=d["rps"], ops=d["requests"])


def _l7_latency(r: RunContext, peer: Peer, level) -> dict:
    base = r.latency_base.get("rps")
    if not base:
        raise RuntimeError("no base rate (nginx's maximum) was measured")
    rate = max(1.0, base * level / 100.0)
    d = r.drivers.http_open(_http(peer.l7_url, "/"), rate=rate, connections=r.connections,
                            duration=r.duration)
    return dict(d, value=d["rps"], ops=d["requests"], target_rate=round(rate, 1))


def _l7_idle(r: RunContext, peer: Peer, level) -> dict:
    roots = peer.roots()
    before = procstat.tree(roots)

    def measure():
        return procstat.tree(roots)

    d = r.drivers.idle(_http(peer.l7_url, "/"), r.idle_connections, hold=2.0, on_ready=measure)
    after: procstat.TreeStat = d.pop("measured")
    added = (after.rss_bytes - before.rss_bytes) / MiB
    return dict(d, value=round(added, 1), ops=d["ready"], errors=d["failed"],
                rss_before_mib=round(before.rss_mib, 1), rss_with_idle_mib=round(after.rss_mib, 1),
                pss_added_mib=round((after.pss_bytes - before.pss_bytes) / MiB, 1),
                requests=d["ready"], duration_s=0.0, latency_ms=None)


def _l7_slowread(r: RunContext, peer: Peer, level) -> dict:
    """slowhttptest -X: N slow readers of a 1 MiB file, three requests pipelined each, a 512-1024
    byte window, 32 bytes read every 5 s; the proxy's RSS growth at its peak, and what is left
    of it 5 s after the readers are gone."""
    tool = shutil.which("slowhttptest")
    if tool is None:
        raise RuntimeError("slowhttptest is not installed (apt-get install slowhttptest)")
    roots = peer.roots()
    before = procstat.tree(roots)
    n = SLOW_READERS
    proc = subprocess.Popen([tool, "-X", "-c", str(n), "-r", "1000", "-w", "512", "-y", "1024", "-n", "5",
                             "-z", "32", "-k", "3", "-l", "15", "-u", _http(peer.l7_url, "/files/1m.bin")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = before.rss_bytes
    try:
        for _ in range(16):
            time.sleep(1)
            peak = max(peak, procstat.tree(roots).rss_bytes)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(5)
    after = procstat.tree(roots)
    added = (peak - before.rss_bytes) / MiB
    return dict(value=round(added, 1), ops=n, errors=0, requests=n, duration_s=0.0, latency_ms=None,
                rss_before_mib=round(before.rss_mib, 1), rss_peak_mib=round(peak / MiB, 1),
                rss_after_mib=round(after.rss_mib, 1),
                kib_per_reader=round((peak - before.rss_bytes) / 1024 / n, 1))


def _l4_bulk(r: RunContext, peer: Peer, level) -> dict:
    d = r.drivers.tcp_bulk(peer.l4_addr, duration=r.duration)
    return dict(d, value=d["gbps"], ops=d["bytes"] / MiB, latency_ms=None, requests=0)


def _l4_connrate(r: RunContext, peer: Peer, level) -> dict:
    d = r.drivers.tcp_connrate(peer.l4_addr, duration=r.duration, concurrency=32)
    return dict(d, value=d["cps"], ops=d["connections"])


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("l7-keepalive", "l7", "L7 keep-alive, small response",
             "wrk -t1 -c50, keep-alive, 6-byte body: requests/s through the proxy",
             "req/s", "req", ("nginx",), _l7_keepalive),
    Scenario("l7-newconn", "l7", "L7 new connection per request",
             "wrk -t1 -c50 -H 'Connection: close': one TCP connection per request",
             "req/s", "req", ("nginx",), _l7_newconn),
    Scenario("l7-10k", "l7", "L7 10 KiB responses",
             "wrk -t1 -c50, keep-alive, 10 KiB file body", "req/s", "req", ("nginx",),
             _l7_body("/files/10k.bin", 50)),
    Scenario("l7-1m", "l7", "L7 1 MiB responses",
             "wrk -t1 -c16, keep-alive, 1 MiB file body", "req/s", "req", ("nginx",),
             _l7_body("/files/1m.bin", 16)),
    Scenario("l7-builtin", "l7", "L7 keep-alive, built-in generator",
             "same as l7-keepalive driven by bench.load (compare the two drivers once)",
             "req/s", "req", ("nginx",), _l7_builtin),
    Scenario("l7-latency", "l7", "L7 latency at a fixed request rate (open loop)",
             "constant rate at 25/50/75 % of nginx's l7-keepalive maximum; p50/p99/p99.9 from "
             "intended send times (coordinated-omission corrected)",
             "req/s", "req", ("nginx",), _l7_latency, levels=(25, 50, 75)),
    Scenario("l7-idle", "l7", "Memory of idle keep-alive connections",
             "RSS the proxy gains while N (10,000) idle keep-alive client connections are open",
             "MiB", "conn", ("nginx",), _l7_idle, higher_is_better=False, rounds=1,
             skip_direct=True),
    Scenario("l7-slowread", "l7", "Memory under a slow-read attack",
             f"RSS the proxy gains while {SLOW_READERS} slowhttptest -X slow readers fetch a 1 MiB file "
             "(and what is left 5 s after they go)",
             "MiB", "conn", ("nginx", "haproxy"), _l7_slowread, higher_is_better=False, rounds=1,
             skip_direct=True),
    Scenario("l4-bulk", "l4", "L4 bulk throughput",
             "one TCP connection pushing 64 MiB segments through the listener to a sink, Gbit/s",
             "Gbit/s", "MiB", ("haproxy", "direct"), _l4_bulk),
    Scenario("l4-connrate", "l4", "L4 new connections per second",
             "a new TCP connection per tiny exchange through the listener (wrk -c32 "
             "Connection: close against bench.tcpserver; built-in: 16-byte echo)",
             "conn/s", "conn", ("haproxy", "direct"), _l4_connrate),
]}

QUICK = ("l7-keepalive", "l7-latency", "l4-bulk", "l4-connrate")
QUICK_LEVELS = (50,)


def sample(r: RunContext, sc: Scenario, peer: Peer, level) -> dict:
    """Run one sample and add the proxy's CPU and memory over it."""
    roots = peer.roots()
    before = procstat.tree(roots) if roots else None
    t0 = time.monotonic()
    d = sc.fn(r, peer, level)
    wall = time.monotonic() - t0
    after = procstat.tree(roots) if roots else None
    out = dict(d)
    if before is not None and after is not None:
        cpu = max(0.0, after.cpu_s - before.cpu_s)
        out["proxy_cpu_s"] = round(cpu, 3)
        out["cpu_us_per_op"] = round(cpu * 1e6 / d["ops"], 2) if d.get("ops") else None
        out["rss_mib"] = round(after.rss_mib, 1)
        out["pss_mib"] = round(after.pss_mib, 1)
        out["proxy_cpu_pct"] = round(100 * cpu / max(d.get("duration_s") or wall, 1e-9), 1)
    else:
        out.update(proxy_cpu_s=None, cpu_us_per_op=None, rss_mib=None, pss_mib=None,
                   proxy_cpu_pct=None)
    dur = d.get("duration_s") or wall
    out["generator_cpu_pct"] = round(100 * d.get("generator_cpu_s", 0.0) / max(dur, 1e-9), 1)
    return out
