"""A bounded HTTP/2 soak: does meshproxy's memory stay flat under hours-like churn?

    python -m bench.h2soak [--duration 600] [--sample 10]

For ``--duration`` seconds (default 10 minutes), against one meshproxy (pinned like
bench.h2bench, HTTP/1.1 and h2c nginx backends):

* h2load in a loop, alternating h2-keepalive GETs and gRPC-shaped unary calls, each run short
  (``-D 20``) so connections keep being opened and closed;
* a resetting client: connections that open streams and reset them at once (below the proxy's
  rapid-reset limit, so they are served, not refused) and connections dropped mid-response;
* RSS of the proxy sampled every ``--sample`` seconds.

The figure is the RSS of the last minute against the first minute after warm-up (the median of
each): flat means the churn leaves nothing behind. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time

from hyperframe.frame import HeadersFrame, RstStreamFrame, SettingsFrame

from bench import procstat
from bench._util import wait_port
from bench.h2bench import Candidate, start_backend, start_meshproxy
from bench.peers import Workspace

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()


def _headers(sid: int, path: bytes) -> bytes:
    def lit(n: bytes, v: bytes) -> bytes:
        return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
    block = lit(b":method", b"GET") + lit(b":scheme", b"http") + lit(b":path", path) + lit(b":authority", b"soak")
    return HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()


def resetter(port: int, stop: threading.Event, counts: dict) -> None:
    """Streams opened and reset at once (50 per connection, under the 200 / 10 s limit), and
    connections closed with responses in flight."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                frames = b"".join(_headers(sid, b"/") + RstStreamFrame(sid, error_code=8).serialize()
                                  for sid in range(1, 101, 2))
                s.sendall(_PREFACE + frames)
                counts["reset_streams"] += 50
                if n % 2:
                    # The other half: real requests, then gone before reading the answers.
                    s.sendall(b"".join(_headers(sid, b"/") for sid in range(101, 141, 2)))
                    counts["dropped_streams"] += 20
                time.sleep(0.05)
        except OSError:
            counts["errors"] += 1
        stop.wait(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.h2soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--sample", type=float, default=10.0)
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    args = ap.parse_args(argv)
    ws = Workspace()
    d = ws.sub("h2soak")
    backend = c = None
    stop = threading.Event()
    counts = {"reset_streams": 0, "dropped_streams": 0, "errors": 0}
    samples: list[tuple[float, float]] = []
    h2load_runs = {"runs": 0, "succeeded": 0, "failed": 0}
    try:
        backend, h1, h2p = start_backend(d, args.load_cpu)
        c = Candidate("meshproxy", d, args.proxy_cpu)
        start_meshproxy(c, h1, h2p)
        if not wait_port("127.0.0.1", c.port, 15, c.proc):
            raise RuntimeError("meshproxy did not open its listener")
        t = threading.Thread(target=resetter, args=(c.port, stop, counts), daemon=True)
        t.start()
        t0 = time.monotonic()
        end = t0 + args.duration
        next_sample = t0
        body = d / "grpc.bin"
        body.write_bytes(b"\x00\x00\x00\x00\x05hello")
        i = 0
        while time.monotonic() < end:
            run = min(20.0, max(1.0, end - time.monotonic()))
            argv = ["taskset", "-c", args.load_cpu, "h2load", "-c", "8", "-m", "8", "-D", str(int(run))]
            if i % 2:
                argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                         f"http://127.0.0.1:{c.port}/bench.Echo/Unary"]
            else:
                argv.append(f"http://127.0.0.1:{c.port}/")
            i += 1
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            while p.poll() is None:
                now = time.monotonic()
                if now >= next_sample:
                    rss = procstat.tree([c.proc.popen.pid]).rss_mib
                    samples.append((now - t0, rss))
                    next_sample = now + args.sample
                time.sleep(0.2)
            out = p.stdout.read() if p.stdout else ""
            h2load_runs["runs"] += 1
            for line in out.splitlines():
                if line.startswith("requests:"):
                    parts = line.replace(",", "").split()
                    h2load_runs["succeeded"] += int(parts[parts.index("succeeded") - 1])
                    h2load_runs["failed"] += int(parts[parts.index("failed") - 1])
            if not c.proc.alive():
                raise RuntimeError("meshproxy died during the soak")
    finally:
        stop.set()
        if c is not None:
            c.stop()
        if backend is not None:
            backend.stop()
        ws.cleanup()
    warm = [r for s, r in samples if 60 <= s < 120] or [r for _s, r in samples[: max(1, len(samples) // 5)]]
    last = [r for s, r in samples if s >= samples[-1][0] - 60] if samples else []
    first_mib, last_mib = statistics.median(warm), statistics.median(last)
    print(f"h2soak: {args.duration:.0f} s, {h2load_runs['runs']} h2load runs, {h2load_runs['succeeded']} requests "
          f"succeeded, {h2load_runs['failed']} failed; {counts['reset_streams']} streams reset by the client, "
          f"{counts['dropped_streams']} dropped mid-response, {counts['errors']} resetter errors")
    print(f"h2soak: RSS MiB after warm-up (2nd minute, median) {first_mib:.1f}, last minute {last_mib:.1f}, "
          f"growth {last_mib - first_mib:+.1f} MiB; max {max(r for _s, r in samples):.1f}")
    print("h2soak: samples (s, MiB): " + ", ".join(f"{s:.0f}:{r:.1f}" for s, r in samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
