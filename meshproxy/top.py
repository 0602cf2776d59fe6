"""``meshproxy top`` and ``meshproxy stat``: the busiest routes, backends and L4 services of a
running instance, read from its admin ``/metrics``.

Two reads of ``/metrics`` some seconds apart give every figure: request rate (the counters'
increase over the time between the reads), success rate (share of non-5xx answers, as Linkerd
counts it), and p50 / p99 latency from the increase of each histogram bucket, interpolated
linearly inside the bucket the way PromQL's ``histogram_quantile`` does (so the figures agree
with a Grafana panel over the same window). A counter that went down (the instance restarted)
counts from zero.

``top`` on a terminal redraws a full-screen table every ``--interval`` seconds (ANSI escapes on
the alternate screen; ``q`` or Ctrl-C quits); when stdout is not a terminal it prints plain
tables ``--iterations`` times (once by default). ``stat`` prints the tables once, or JSON.

Nothing of the proxy is imported: this reads the text any Prometheus scraper reads.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["run_top", "scrape", "Scrape", "compute", "quantile", "render"]

_REQ = "meshproxy_http_requests_total"
_DUR = "meshproxy_http_request_duration_seconds"
_L4_CONN = "meshproxy_l4_connections_total"
_L4_ACTIVE = "meshproxy_l4_active_connections"
_L4_BYTES = "meshproxy_l4_bytes_total"
_L4_DUR = "meshproxy_l4_connection_duration_seconds"


@dataclass
class Scrape:
    """One read of /metrics: samples by (name, sorted label items), and when it was taken."""
    at: float
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str, at: float) -> Scrape:
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Scrape(at, samples)


def scrape(host: str, port: int, timeout: float = 5.0) -> Scrape:
    """Raises OSError (urllib's errors are OSErrors) naming the URL."""
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OSError(f"cannot read {url}: {reason}") from None
    return parse(text, time.monotonic())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL histogram_quantile over (upper bound, cumulative count) pairs, +Inf last.
    None when there is nothing to rank."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound      # the highest finite bound, as PromQL answers
            if count == prev_count:
                return bound
            lower = prev_bound if prev_bound > 0 or bound <= 0 else 0.0
            return lower + (bound - lower) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


@dataclass
class Row:
    key: tuple
    rate: float = 0.0
    total: float = 0.0          # requests (or connections) in the window
    errors: float = 0.0         # 5xx in the window
    buckets: dict[float, float] = field(default_factory=dict)
    active: float = 0.0
    rx: float = 0.0
    tx: float = 0.0

    @property
    def success(self) -> float | None:
        return None if self.total <= 0 else (self.total - self.errors) / self.total

    def latency(self, q: float) -> float | None:
        return quantile(q, list(self.buckets.items()))


def _delta(now: float, before: float | None) -> float:
    if before is None or now < before:   # new series, or the instance restarted
        return now
    return now - before


def compute(prev: Scrape, cur: Scrape) -> dict[str, list[Row]]:
    """Rows for the three tables, busiest first."""
    dt = max(cur.at - prev.at, 1e-9)
    routes: dict[tuple, Row] = {}
    backends: dict[tuple, Row] = {}
    l4: dict[tuple, Row] = {}
    for (name, labels), value in cur.samples.items():
        lab = dict(labels)
        d = _delta(value, prev.samples.get((name, labels)))
        if name == _REQ:
            if not lab.get("service") and not lab.get("route"):
                rkey = ("(no route)", "", "")
            else:
                rkey = (lab.get("route", ""), lab.get("ingress", ""), f"{lab.get('namespace', '')}/{lab.get('service', '')}")
            bkey = (f"{lab.get('namespace', '')}/{lab.get('service', '')}",) if lab.get("service") else None
            for table, key in ((routes, rkey), (backends, bkey)):
                if key is None:
                    continue
                row = table.setdefault(key, Row(key))
                row.total += d
                if lab.get("code") == "5xx":
                    row.errors += d
        elif name == _DUR + "_bucket":
            le = float(lab.pop("le"))
            if not lab.get("service") and not lab.get("route"):
                rkey = ("(no route)", "", "")
            else:
                rkey = (lab.get("route", ""), lab.get("ingress", ""), f"{lab.get('namespace', '')}/{lab.get('service', '')}")
            bkey = (f"{lab.get('namespace', '')}/{lab.get('service', '')}",) if lab.get("service") else None
            for table, key in ((routes, rkey), (backends, bkey)):
                if key is None:
                    continue
                row = table.setdefault(key, Row(key))
                row.buckets[le] = row.buckets.get(le, 0.0) + d
        elif name in (_L4_CONN, _L4_ACTIVE, _L4_BYTES, _L4_DUR + "_bucket"):
            le = lab.pop("le", None)
            key = (f"{lab.get('namespace', '')}/{lab.get('service', '')}:{lab.get('port', '')}",)
            row = l4.setdefault(key, Row(key))
            if name == _L4_CONN:
                row.total += d
            elif name == _L4_ACTIVE:
                row.active += value
            elif name == _L4_BYTES:
                if lab.get("direction") == "rx":
                    row.rx += d
                else:
                    row.tx += d
            else:
                b = float(le)
                row.buckets[b] = row.buckets.get(b, 0.0) + d
    out = {}
    for name, table in (("routes", routes), ("backends", backends), ("l4", l4)):
        rows = list(table.values())
        for r in rows:
            r.rate = r.total / dt
            r.rx /= dt
            r.tx /= dt
        rows.sort(key=lambda r: (-r.rate, -r.active, r.key))
        out[name] = rows
    return out


# -- presentation ------------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f}ms" if v < 1 else f"{v:.2f}s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _bytes(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f}{unit}/s" if unit == "B" else f"{v:.1f}{unit}/s"
        v /= 1024
    return f"{v:.1f}GiB/s"


def _table(header: list[str], rows: list[list[str]], width: int | None) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = []
    for r in [header] + rows:
        line = "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
        lines.append(line[:width] if width else line)
    return lines


def tables(result: dict[str, list[Row]], limit: int | None, width: int | None = None) -> list[str]:
    lines: list[str] = []
    routes = result["routes"][:limit] if limit else result["routes"]
    lines += _table(["ROUTE", "INGRESS", "BACKEND", "RPS", "SUCCESS", "P50", "P99"],
                    [[r.key[0] or "(default backend)", r.key[1] or "-", r.key[2] if r.key[2] != "/" else "-",
                      f"{r.rate:.1f}", _pct(r.success), _ms(r.latency(0.5)), _ms(r.latency(0.99))] for r in routes],
                    width)
    lines.append("")
    backends = result["backends"][:limit] if limit else result["backends"]
    lines += _table(["BACKEND", "RPS", "SUCCESS", "P50", "P99"],
                    [[r.key[0], f"{r.rate:.1f}", _pct(r.success), _ms(r.latency(0.5)), _ms(r.latency(0.99))]
                     for r in backends], width)
    if result["l4"]:
        lines.append("")
        l4 = result["l4"][:limit] if limit else result["l4"]
        lines += _table(["L4 SERVICE", "CONN/S", "ACTIVE", "IN", "OUT", "P50", "P99"],
                        [[r.key[0], f"{r.rate:.1f}", f"{r.active:.0f}", _bytes(r.rx), _bytes(r.tx),
                          _ms(r.latency(0.5)), _ms(r.latency(0.99))] for r in l4], width)
    return lines


def as_json(result: dict[str, list[Row]], window: float) -> dict:
    def row(r: Row, kind: str) -> dict:
        d = {"rate": r.rate, "success_rate": r.success, "p50": r.latency(0.5), "p99": r.latency(0.99)}
        if kind == "routes":
            d.update(route=r.key[0], ingress=r.key[1], backend=r.key[2])
        elif kind == "backends":
            d.update(backend=r.key[0])
        else:
            d = {"service": r.key[0], "connection_rate": r.rate, "active": r.active, "rx_bytes_rate": r.rx,
                 "tx_bytes_rate": r.tx, "p50": r.latency(0.5), "p99": r.latency(0.99)}
        return d
    return {"window_seconds": window, **{k: [row(r, k) for r in v] for k, v in result.items()}}


def render(result: dict[str, list[Row]], title: str, width: int, height: int) -> str:
    """One full-screen frame: home, title, tables cut to the screen, clear to the end."""
    limit = max(1, (height - 8) // 3)
    lines = [title[:width], ""] + tables(result, limit, width)
    lines = lines[:height]
    return "\x1b[H" + "".join(line + "\x1b[K\r\n" for line in lines[:-1]) + lines[-1] + "\x1b[K\x1b[J"


# -- the commands ------------------------------------------------------------------------------------

def _plain(args, host: str, port: int) -> int:
    iterations = getattr(args, "iterations", None) or 1
    prev = scrape(host, port)
    for i in range(iterations):
        time.sleep(args.interval)
        cur = scrape(host, port)
        result = compute(prev, cur)
        if getattr(args, "output", "table") == "json":
            print(json.dumps(as_json(result, cur.at - prev.at), indent=1))
        else:
            if i:
                print()
            print("\n".join(tables(result, args.limit or 20)))
        sys.stdout.flush()
        prev = cur
    return 0


def _live(args, host: str, port: int) -> int:
    out = sys.stdout
    fd_in = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd_in) if fd_in is not None else None
    out.write("\x1b[?1049h\x1b[?25l")      # alternate screen, hide the cursor
    out.flush()
    try:
        if fd_in is not None:
            tty.setcbreak(fd_in)
        prev = None
        n = 0
        while args.iterations is None or n < args.iterations:
            size = shutil.get_terminal_size()
            title = f"meshproxy top  {host}:{port}  every {args.interval:g}s  {time.strftime('%H:%M:%S')}  (q quits)"
            try:
                cur = scrape(host, port)
            except OSError as exc:
                frame = "\x1b[H" + f"{title}\x1b[K\r\n\x1b[K\r\n{exc}; retrying\x1b[K\x1b[J"
                cur = None
            else:
                if prev is None:
                    frame = "\x1b[H" + f"{title}\x1b[K\r\n\x1b[K\r\nreading...\x1b[K\x1b[J"
                else:
                    frame = render(compute(prev, cur), title, size.columns, size.lines)
                    n += 1
            prev = cur
            out.write(frame)
            out.flush()
            if args.iterations is not None and n >= args.iterations:
                break
            if _wait_for_quit(fd_in, args.interval):
                break
    except KeyboardInterrupt:
        pass
    finally:
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
    return 0


def _wait_for_quit(fd_in: int | None, seconds: float) -> bool:
    """Sleep ``seconds``; True as soon as q / Q is typed."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd_in is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd_in], [], [], left)
        if ready:
            data = os.read(fd_in, 64)
            if not data or b"q" in data.lower():
                return True


def run_top(args) -> int:
    host, port = args.admin
    try:
        if args.command == "top" and sys.stdout.isatty():
            return _live(args, host, port)
        return _plain(args, host, port)
    except OSError as exc:
        print(f"meshproxy {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
