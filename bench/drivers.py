"""Load drivers: each runs one bounded load against one address in a child process and returns
a plain dict with the same keys whichever tool produced it:

    value-ish fields:  requests, duration_s, rps | gbps | cps, bytes
    latency_ms:        {p50, p90, p99, p999, max, mean} or None
    errors:            int (connect + read + write + timeout + non-2xx/3xx)
    generator_cpu_s:   CPU the load tool itself used (from wait4 rusage) — when it nears the
                       wall time, the generator is the bottleneck and the figure says so.

wrk is the headline driver for closed-loop HTTP when it is installed (C, epoll, -t1). The
built-in generator (bench.load) is used when wrk is missing, for open-loop latency (unless wrk2
is present), and once side by side with wrk (scenario l7-builtin).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from bench._util import VENV_PYTHON, Proc, check_loopback, log, split_hostport
from bench.peers import REPO

_WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"min":%d,"max":%d,"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.min, latency.max, latency.mean, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


class DriverError(RuntimeError):
    pass


class Drivers:
    """Runs load tools inside the run's workspace, pinned to the load CPUs when asked."""

    def __init__(self, workspace: Path, load_cpus: str | None, wrk: str | None,
                 wrk2: str | None = None, python: str = VENV_PYTHON) -> None:
        self.dir = workspace / "drivers"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cpus = load_cpus
        self.wrk = wrk
        self.wrk2 = wrk2
        self.python = python
        self.lua = self.dir / "report.lua"
        self.lua.write_text(_WRK_LUA)
        self._n = 0

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, name: str, argv: list[str], timeout: float) -> tuple[str, float, float]:
        """Run argv to completion; return (stdout, wall seconds, CPU seconds of the tool)."""
        self._n += 1
        out = self.dir / f"{self._n:04d}-{name}.out"
        with open(out, "wb") as fh:
            t0 = time.monotonic()
            p = Proc(name, argv, self.dir / f"{self._n:04d}-{name}.log", cpus=self.cpus,
                     stdout=fh, env=_env(), cwd=REPO)
            rc, ru = p.wait_rusage(timeout)
            wall = time.monotonic() - t0
            if rc is None:
                p.stop()
                raise DriverError(f"{name} did not finish within {timeout:.0f} s")
            p.stop()
        text = out.read_text(errors="replace")
        if rc != 0:
            raise DriverError(f"{name} exited {rc}: {(text + p.log_tail(5))[-400:]}")
        cpu = (ru.ru_utime + ru.ru_stime) if ru is not None else 0.0
        return text, wall, cpu

    # -- HTTP, closed loop -----------------------------------------------------------------

    def http_closed(self, url: str, *, connections: int, duration: float, keepalive: bool = True,
                    builtin: bool = False, processes: int = 1) -> dict:
        _check_url(url)
        if self.wrk and not builtin:
            return self._wrk(self.wrk, url, connections, duration, keepalive, rate=0)
        return self._builtin(url, connections, duration, keepalive, rate=0, processes=processes)

    # -- HTTP, open loop -------------------------------------------------------------------

    def http_open(self, url: str, *, rate: float, connections: int, duration: float,
                  processes: int = 1) -> dict:
        _check_url(url)
        if self.wrk2:
            return self._wrk(self.wrk2, url, connections, duration, True, rate=rate)
        return self._builtin(url, connections, duration, True, rate=rate, processes=processes)

    def _wrk(self, binary: str, url: str, connections: int, duration: float, keepalive: bool,
             rate: float) -> dict:
        argv = [binary, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
                "--timeout", "5s", "-s", str(self.lua)]
        if rate:
            argv += ["-R", str(int(rate))]  # wrk2: constant rate, CO-corrected latency
        if not keepalive:
            argv += ["-H", "Connection: close"]
        argv.append(url)
        text, _wall, cpu = self._run(Path(binary).name, argv, duration + 30)
        line = next((ln for ln in text.splitlines() if ln.startswith("WRKJSON ")), None)
        if line is None:
            raise DriverError(f"wrk printed no summary: {text[-300:]}")
        w = json.loads(line[8:])
        secs = w["duration_us"] / 1e6 or 1e-9
        errors = w["connect"] + w["read"] + w["write"] + w["timeout"] + w["status"]
        return {
            "tool": Path(binary).name,
            "requests": w["requests"],
            "duration_s": round(secs, 3),
            "rps": round(w["requests"] / secs, 1),
            "bytes": w["bytes"],
            "errors": errors,
            "error_detail": {k: w[k] for k in ("connect", "read", "write", "timeout", "status")},
            "latency_ms": {k: round(w[k] / 1000, 3) for k in ("p50", "p90", "p99", "p999", "max", "mean")},
            "generator_cpu_s": round(cpu, 3),
            "target_rate": rate or None,
        }

    def _builtin(self, url: str, connections: int, duration: float, keepalive: bool,
                 rate: float, processes: int) -> dict:
        argv = [self.python, "-m", "bench.load", url, "-c", str(connections), "-d", str(duration),
                "-p", str(processes), "--timeout", "5", "--json"]
        if rate:
            argv += ["--rate", str(rate)]
        if not keepalive:
            argv.append("--no-keepalive")
        text, _wall, cpu = self._run("bench.load", argv, duration + 40)
        r = json.loads(text.strip().splitlines()[-1])
        errors = sum(r["errors"].values()) + r["non_2xx_3xx"]
        return {
            "tool": "bench.load",
            "requests": r["requests"],
            "duration_s": r["duration_s"],
            "rps": r["rps"],
            "bytes": r["body_bytes"],
            "errors": errors,
            "error_detail": dict(r["errors"], status=r["non_2xx_3xx"]),
            "latency_ms": {k: r["latency_ms"][k] for k in ("p50", "p90", "p99", "p999", "max", "mean")},
            "schedule_lag_ms": r.get("schedule_lag_ms"),
            "generator_cpu_s": round(cpu, 3),
            "target_rate": rate or None,
        }

    # -- L4 --------------------------------------------------------------------------------

    def tcp_bulk(self, addr: str, *, duration: float, streams: int = 1) -> dict:
        check_loopback(split_hostport(addr)[0])
        text, _wall, cpu = self._run("tcpload-bulk", [
            self.python, "-m", "bench.tcpload", "bulk", addr, "-d", str(duration),
            "--streams", str(streams)], duration + 60)
        r = json.loads(text.strip().splitlines()[-1])
        r["generator_cpu_s"] = round(cpu, 3)
        if r["bytes"] == 0:
            raise DriverError(f"no byte acknowledged: {r['error_messages']}")
        return r

    def tcp_connrate(self, addr: str, *, duration: float, concurrency: int = 32,
                     builtin: bool = False) -> dict:
        """New TCP connections per second. With wrk: each connection carries one tiny HTTP
        exchange that bench.tcpserver answers and closes (a C client, so the generator is not
        the bottleneck). Built-in: connect, echo 16 bytes, close."""
        host, _port = split_hostport(addr)
        check_loopback(host)
        if self.wrk and not builtin:
            r = self._wrk(self.wrk, f"http://{addr}/", concurrency, duration, False, rate=0)
            r["cps"] = r["rps"]
            r["connections"] = r["requests"]
            return r
        text, _wall, cpu = self._run("tcpload-connrate", [
            self.python, "-m", "bench.tcpload", "connrate", addr, "-d", str(duration),
            "-c", str(concurrency)], duration + 40)
        r = json.loads(text.strip().splitlines()[-1])
        r["generator_cpu_s"] = round(cpu, 3)
        r["requests"] = r["connections"]
        return r

    # -- idle connections ------------------------------------------------------------------

    def idle(self, url: str, n: int, hold: float, on_ready) -> dict:
        """Open n keep-alive connections (one request each), call on_ready() while they are
        all open and idle, then let them go. Returns the tool's final report plus on_ready's
        value under "measured"."""
        _check_url(url)
        self._n += 1
        out = self.dir / f"{self._n:04d}-idle.out"
        fh = open(out, "wb")  # noqa: SIM115 - closed in the finally below, after the child
        p = Proc("tcpload-idle", [self.python, "-m", "bench.tcpload", "idle", url, "-n", str(n),
                                  "--hold", str(hold)],
                 self.dir / f"{self._n:04d}-idle.log", cpus=self.cpus, stdout=fh, env=_env(),
                 cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            first = None
            while time.monotonic() < deadline and first is None:
                lines = out.read_text().splitlines()
                if lines:
                    first = json.loads(lines[0])
                    break
                if not p.alive():
                    break
                time.sleep(0.1)
            if first is None:
                raise DriverError(f"idle client never got ready: {p.log_tail(5)}")
            time.sleep(0.5)  # let the proxy settle its buffers
            measured = on_ready()
            p.wait_rusage(hold + 60)
            lines = out.read_text().splitlines()
            final = json.loads(lines[-1]) if len(lines) > 1 else dict(first)
            final["measured"] = measured
            return final
        finally:
            p.stop()
            fh.close()


def _check_url(url: str) -> None:
    from urllib.parse import urlsplit

    check_loopback(urlsplit(url).hostname or "")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def find_wrk2() -> str | None:
    return shutil.which("wrk2")


def find_wrk(install: bool) -> str | None:
    from bench._util import ensure_binary

    w = ensure_binary("wrk", "wrk", install=install)
    if not w:
        log("wrk unavailable: the built-in generator (bench.load) drives every HTTP scenario")
    return w
