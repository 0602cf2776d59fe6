"""Readiness-probe cost: ``python -m bench.probe_cost --pods 10000 --period 10 --duration 30``.

Starts a few probe targets (``bench.tcpserver`` processes on 127.0.0.x: they answer an HTTP GET
with 200 and close, and close a bare TCP connect), builds ``--pods`` pods whose readinessProbes
point at them (many pods share one address:port — what is measured is the prober, not the
pods), runs ``discovery.health.HealthChecker`` on uvloop for ``--duration`` seconds and prints:

- CPU of this process (the checker alone: the targets run in their own processes), in CPU
  seconds per second of wall time and per probe, over the whole run and over the steady state
  (after the first period, when the start-up jitter has spread the first round), split into
  user and kernel time. On loopback the kernel runs both ends of each TCP handshake in the
  connecting process, so the kernel part overstates what probing a remote pod costs;
- probes per second (expected: pods / period), results by kind, peak concurrent probes;
- RSS of this process, and the number of asyncio tasks (one scheduler, whatever probes are in
  flight — never one per pod).

Every target is on loopback; the targets are stopped by pid (``bench._util.Proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench._util import Proc, check_loopback, free_port, wait_port
from bench.procstat import _rss

from discovery import objects as o
from discovery.health import HealthChecker
from discovery.signals import Signals


class _Count(Signals):
    """The benchmark counts probe results itself."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def probe(self, result: str) -> None:
        self.values[result] = self.values.get(result, 0) + 1


def build_pods(n: int, targets: list[tuple[str, int]], period: float, mix: str) -> dict:
    pods = {}
    for i in range(n):
        host, port = targets[i % len(targets)]
        kind = mix if mix in ("http", "tcp") else ("http" if i % 2 == 0 else "tcp")
        # Every other pod names its port, so named-port resolution is part of the cost.
        named = i % 4 < 2
        probe = o.Probe(action=kind, port="probe" if named else port, path="/ready",
                        period=float(period), timeout=1.0)
        pod = o.Pod(meta=o.Meta(name=f"pod-{i}", namespace="bench", uid=f"uid-{i}"),
                    ports=(o.ContainerPort("probe", port),), readiness_probe=probe, pod_ip=host)
        pods[("bench", pod.name)] = pod
    return pods


def _rss_mib() -> float:
    return _rss(os.getpid())[0] / 1048576


async def run(args) -> dict:
    targets: list[tuple[str, int]] = []
    procs: list[Proc] = []
    logdir = Path(tempfile.mkdtemp(prefix="probe_cost-"))
    try:
        for i in range(args.targets):
            host = check_loopback(f"127.0.0.{i + 1}")
            port = free_port(host)
            procs.append(Proc(f"target-{i}", [sys.executable, "-m", "bench.tcpserver", "--listen", f"{host}:{port}"],
                              logdir / f"target-{i}.log"))
            targets.append((host, port))
        for (host, port), proc in zip(targets, procs):
            if not wait_port(host, port, 10, proc):
                raise SystemExit(f"probe target {host}:{port} did not start (log: {proc.logfile})")

        rss0 = _rss_mib()
        pods = build_pods(args.pods, targets, args.period, args.mix)
        results: dict = {}
        flips = 0

        def on_change(ns: str, name: str) -> None:
            nonlocal flips
            flips += 1

        counter = _Count()
        checker = HealthChecker(results, on_change, max_concurrency=args.max_concurrency, signals=counter)
        t_sync = time.perf_counter()
        checker.sync(pods)
        sync_ms = (time.perf_counter() - t_sync) * 1000
        t_resync = time.perf_counter()
        checker.sync(pods)            # what every later store change costs when no pod changed
        resync_ms = (time.perf_counter() - t_resync) * 1000

        wall0, cpu0 = time.monotonic(), time.process_time()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        checker.start()
        max_tasks = 0
        steady = None
        end = wall0 + args.duration
        while (now := time.monotonic()) < end:
            await asyncio.sleep(0.25)
            max_tasks = max(max_tasks, len(asyncio.all_tasks()))
            if steady is None and now - wall0 >= args.period:
                steady = (time.monotonic(), time.process_time(), checker.probes_run)
        wall1, cpu1, probes1 = time.monotonic(), time.process_time(), checker.probes_run
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        await checker.stop()
        rss1 = _rss_mib()
    finally:
        for p in procs:
            p.stop()

    out = {
        "pods": args.pods, "period": args.period, "duration": round(wall1 - wall0, 2),
        "mix": args.mix, "max_concurrency": args.max_concurrency,
        "probes": probes1, "probes_per_s": round(probes1 / (wall1 - wall0), 1),
        "expected_per_s": round(args.pods / args.period, 1),
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_per_s": round((cpu1 - cpu0) / (wall1 - wall0), 4),
        "cpu_us_per_probe": round((cpu1 - cpu0) / max(1, probes1) * 1e6, 1),
        "user_us_per_probe": round((ru1.ru_utime - ru0.ru_utime) / max(1, probes1) * 1e6, 1),
        "sys_us_per_probe": round((ru1.ru_stime - ru0.ru_stime) / max(1, probes1) * 1e6, 1),
        "results": dict(sorted(counter.values.items())),
        "ready": sum(1 for v in results.values() if v), "flips": flips,
        "peak_inflight": checker.peak_inflight, "max_tasks": max_tasks,
        "sync_ms": round(sync_ms, 1), "resync_ms": round(resync_ms, 2),
        "rss_mib_before_pods": round(rss0, 1), "rss_mib": round(rss1, 1),
    }
    if steady is not None and wall1 - steady[0] > 1:
        w, c, n = wall1 - steady[0], cpu1 - steady[1], probes1 - steady[2]
        out["steady"] = {"seconds": round(w, 2), "probes_per_s": round(n / w, 1),
                         "cpu_per_s": round(c / w, 4), "cpu_us_per_probe": round(c / max(1, n) * 1e6, 1)}
    return out


def report(r: dict) -> str:
    lines = [
        f"# Probe cost: {r['pods']} pods, periodSeconds {r['period']:g}, {r['mix']} probes, {r['duration']} s",
        "",
        "| measure | value |",
        "|---|---|",
        f"| probes run | {r['probes']} ({r['probes_per_s']}/s, expected {r['expected_per_s']}/s) |",
        f"| results | {r['results']} |",
        f"| CPU, whole run | {r['cpu_s']} s = {r['cpu_per_s'] * 100:.1f} % of one core, {r['cpu_us_per_probe']} µs/probe |",
        f"| of which user / kernel | {r['user_us_per_probe']} / {r['sys_us_per_probe']} µs/probe "
        "(on loopback the kernel part includes the targets' side of each TCP handshake) |",
    ]
    if "steady" in r:
        s = r["steady"]
        lines.append(f"| CPU, steady state (last {s['seconds']} s) | {s['cpu_per_s'] * 100:.1f} % of one core, "
                     f"{s['cpu_us_per_probe']} µs/probe at {s['probes_per_s']} probes/s |")
    lines += [
        f"| peak concurrent probes | {r['peak_inflight']} (limit {r['max_concurrency']}) |",
        f"| asyncio tasks, max seen | {r['max_tasks']} |",
        f"| pods ready | {r['ready']} / {r['pods']} |",
        f"| sync(): first / unchanged | {r['sync_ms']} ms / {r['resync_ms']} ms |",
        f"| RSS | {r['rss_mib']} MiB ({r['rss_mib_before_pods']} MiB before building the pods) |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=10000)
    p.add_argument("--period", type=float, default=10.0, help="periodSeconds of every probe")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run")
    p.add_argument("--mix", choices=("http", "tcp", "both"), default="both",
                   help="probe kinds: all httpGet, all tcpSocket, or half each (default)")
    p.add_argument("--targets", type=int, default=2, help="probe target processes (127.0.0.1, .2, ...)")
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    a = p.parse_args(argv)
    try:
        import uvloop
        r = uvloop.run(run(a))
    except ImportError:
        r = asyncio.run(run(a))
    print(report(r))
    if a.json:
        import json
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
