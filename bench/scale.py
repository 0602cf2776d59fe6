"""Control-plane scale: ``python -m bench.scale --pods 10000 --services 1000``; the kernel mode's
scale (10,000 Services / 50,000 endpoints by default) with ``--proxy-mode nftables``
(bench/nft_scale.py).

For each size (by default 1,000 pods and the requested size, services in the same ratio, so the
growth is visible side by side) it:

1. writes manifests to a temporary folder: services in one file, pods ``--pods-per-file`` to a
   file, each pod Ready, selected by exactly one service;
2. starts the real process, ``python -m meshproxy run -f DIR --admin-listen 127.0.0.1:PORT``,
   and measures the time from spawn to ``/readyz`` = 200 (the first snapshot is live and the
   listeners are bound), polling only that cheap endpoint;
3. ``--changes`` times: rewrites one pod file with the *canary* pod's Ready condition flipped
   (atomic replace by default, like editors and ConfigMap updates do) and measures, polling
   every 5 ms:

   - **change → data plane**: until a connection to the canary Service's ClusterIP behaves
     accordingly — echoed through to the canary pod (a bench.tcpserver) when it became Ready,
     closed at once (no endpoints) when it became not Ready. A TCP connect is cheap and never
     touches the control plane, so this probe does not disturb what it measures; it includes
     the snapshot build, its publication and the listener reconcile.
   - **change → snapshot version**: until the admin server shows a new snapshot version, with
     the cheapest version probe there is: an ``X-Snapshot-Version`` header on ``/readyz`` if the
     admin server sends one, else ``/debug/snapshot`` (JSON "version") when that document is
     small, else ``meshproxy_snapshot_version`` in ``/metrics``. At 10,000 pods the snapshot
     document is megabytes and /metrics hundreds of milliseconds: a probe slower than
     ``--max-probe-ms`` is not polled (it would load the control plane it measures) and the
     figure is reported as skipped. ``--probe`` forces one.

The canary pod lives in the first pod file among ordinary pods, so each change rewrites a file
of ``--pods-per-file`` pods, like any other edit.

This runs the real process rather than the in-process Controller API on purpose: the API is
still moving, the command line is the stable interface (docs/semantics.md), and the process is what users run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import nft_scale, procstat
from bench._util import (
    VENV_PYTHON,
    Proc,
    check_loopback,
    free_port,
    log,
    raise_nofile,
    wait_port,
)
from bench.peers import REPO, _env, meshproxy_runnable

POLL = 0.005
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- manifests


def pod_ip(j: int) -> str:
    return f"127.10.{j // 250}.{j % 250 + 1}"


def cluster_ip(i: int) -> str:
    return f"127.96.{i // 250 + 1}.{i % 250 + 1}"  # 127.96.0.x left to other tests


def pod_doc(j: int, services: int, ready: bool) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: pod-{j:05d}, namespace: default, labels: {{app: svc-{j % services:04d}, idx: "{j}"}}}}
spec: {{containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: {pod_ip(j)}, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
"""


def service_doc(i: int, port: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: svc-{i:04d}, namespace: default}}
spec:
  clusterIP: {cluster_ip(i)}
  selector: {{app: svc-{i:04d}}}
  ports: [{{name: http, port: {port}, targetPort: http}}]
"""


CANARY_IP = "127.96.200.1"


def canary_docs(backend_port: int, svc_port: int, ready: bool) -> tuple[str, str]:
    pod = f"""apiVersion: v1
kind: Pod
metadata: {{name: canary, namespace: default, labels: {{app: canary}}}}
spec: {{containers: [{{name: tcp, ports: [{{name: tcp, containerPort: {backend_port}}}]}}]}}
status: {{podIP: 127.0.0.1, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
"""
    svc = f"""apiVersion: v1
kind: Service
metadata: {{name: canary, namespace: default}}
spec:
  clusterIP: {CANARY_IP}
  selector: {{app: canary}}
  ports: [{{name: tcp, port: {svc_port}, targetPort: tcp}}]
"""
    return pod, svc


def first_file_text(pods: int, services: int, per_file: int, canary_pod: str) -> str:
    return "---\n".join([canary_pod] + [pod_doc(j, services, True)
                                         for j in range(min(pods, per_file))])


def write_manifests(d: Path, pods: int, services: int, per_file: int, port: int,
                    canary: tuple[str, str]) -> list[Path]:
    (d / "services.yaml").write_text(
        "---\n".join([canary[1]] + [service_doc(i, port) for i in range(services)]))
    files = []
    for start in range(0, pods, per_file):
        f = d / f"pods-{start // per_file:05d}.yaml"
        if start == 0:
            f.write_text(first_file_text(pods, services, per_file, canary[0]))
        else:
            f.write_text("---\n".join(pod_doc(j, services, True)
                                      for j in range(start, min(pods, start + per_file))))
        files.append(f)
    return files


def rewrite(d: Path, name: str, text: str, atomic: bool) -> None:
    f = d / name
    if atomic:
        # Staged outside the watched folder (same file system), then renamed over the file.
        staging = d.parent / "staging"
        staging.mkdir(exist_ok=True)
        tmp = staging / f.name
        tmp.write_text(text)
        os.replace(tmp, f)
    else:
        with open(f, "w") as fh:
            fh.write(text)


def canary_up(port: int) -> bool:
    """True when a connection through the canary Service is echoed by the canary pod."""
    try:
        s = socket.create_connection((CANARY_IP, port), timeout=0.5)
    except OSError:
        return False
    try:
        s.settimeout(0.5)
        s.sendall(b"EEEE")  # bench.tcpserver echoes anything not starting with B / S / G
        got = b""
        while len(got) < 4:
            b = s.recv(4 - len(got))
            if not b:
                return False
            got += b
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------------------- probe


class Probe:
    """One keep-alive HTTP connection to the admin server, reading the snapshot version."""

    def __init__(self, host: str, port: int, mode: str) -> None:
        check_loopback(host)
        self.host, self.port, self.mode = host, port, mode
        self.sock: socket.socket | None = None
        self.rtts: list[float] = []
        self.last_head = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                if self.sock is None:
                    self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sock.settimeout(timeout)
                self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
                return self._read()
            except (OSError, ValueError):
                self.close()
                if attempt:
                    raise
        raise OSError("unreachable")

    def _read(self) -> tuple[int, bytes]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            b = self.sock.recv(65536)
            if not b:
                raise ConnectionError("closed")
            buf += b
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"content-length:")
        if i < 0:
            raise ValueError("no content-length")
        n = int(low[i + 15:].split(b"\r\n", 1)[0])
        chunks = [body]
        have = len(body)
        while have < n:
            b = self.sock.recv(max(65536, n - have))
            if not b:
                raise ConnectionError("closed mid-body")
            chunks.append(b)
            have += len(b)
        if b"connection: close" in low:
            self.close()
        self.last_head = low
        return status, b"".join(chunks)

    def version(self) -> str | None:
        t0 = time.perf_counter()
        try:
            if self.mode == "header":
                self.get("/readyz")
                i = self.last_head.find(b"\r\nx-snapshot-version:")
                return None if i < 0 else self.last_head[i + 21:].split(b"\r\n", 1)[0].strip().decode()
            if self.mode == "metrics":
                st, body = self.get("/metrics")
                if st != 200:
                    return None
                for line in body.split(b"\n"):
                    if line.startswith(b"meshproxy_snapshot_version"):
                        return line.rsplit(b" ", 1)[1].decode()
                return None
            st, body = self.get("/debug/snapshot")
            if st != 200:
                return None
            v = json.loads(body).get("version")
            return None if v is None else str(v)
        except (OSError, ValueError):
            return None
        finally:
            self.rtts.append(time.perf_counter() - t0)


def choose_probe(host: str, port: int, forced: str) -> tuple[str, str]:
    if forced != "auto":
        return forced, "forced"
    p = Probe(host, port, "snapshot")
    try:
        p.get("/readyz")
        if b"\r\nx-snapshot-version:" in p.last_head:
            return "header", "X-Snapshot-Version header on /readyz"
        t0 = time.perf_counter()
        st, body = p.get("/debug/snapshot")
        dt = time.perf_counter() - t0
        big = len(body) > 256 * 1024 or dt > 0.005
        why = f"/debug/snapshot is {len(body) / 1024:.0f} KiB, {dt * 1000:.1f} ms"
        if st == 200 and not big:
            return "snapshot", why
        st, m = p.get("/metrics")
        if st == 200 and b"\nmeshproxy_snapshot_version" in b"\n" + m:
            return "metrics", why + " -> polling meshproxy_snapshot_version in /metrics"
        return "snapshot", why + " (no meshproxy_snapshot_version metric; polling it anyway)"
    except (OSError, ValueError) as e:
        return "snapshot", f"probe check failed: {e}"
    finally:
        p.close()


# ---------------------------------------------------------------------------- one size


def measure(pods: int, services: int, *, per_file: int, changes: int, probe_mode: str,
            atomic: bool, timeout: float, python: str, keep: bool, workers: int,
            max_probe_ms: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"meshproxy-scale-{pods}-"))
    mdir = work / "manifests"
    mdir.mkdir()
    res: dict = {"pods": pods, "services": services, "pods_per_file": per_file}
    proc = canary = None
    try:
        backend_port = free_port()
        canary = Proc("scale-canary", [python, "-m", "bench.tcpserver", "--listen",
                                       f"127.0.0.1:{backend_port}"], work / "canary.log",
                      cwd=REPO, env=_env())
        if not wait_port("127.0.0.1", backend_port, 10, canary):
            raise RuntimeError("the canary backend (bench.tcpserver) did not start")
        svc_port = free_port("127.96.1.1")
        canary_port = free_port(CANARY_IP)
        t0 = time.perf_counter()
        files = write_manifests(mdir, pods, services, per_file, svc_port,
                                canary_docs(backend_port, canary_port, True))
        res["files"] = len(files) + 1
        res["generate_s"] = round(time.perf_counter() - t0, 3)
        admin = free_port()
        t_spawn = time.perf_counter()
        proc = Proc(f"meshproxy-scale-{pods}", [
            python, "-m", "meshproxy", "run", "-f", str(mdir),
            "--admin-listen", f"127.0.0.1:{admin}", "--workers", str(workers),
            "--log-level", "warning",
        ], work / "meshproxy.log", cwd=REPO, env=_env())
        # Start-up: only /readyz, the cheapest endpoint (/debug/snapshot serialises every
        # endpoint and /metrics every series — polling those every 5 ms would slow the very
        # start-up being measured). /readyz turns 200 once the first snapshot is live and the
        # listeners are bound, so it is "first snapshot" from the outside.
        probe = Probe("127.0.0.1", admin, "header")
        ready = None
        while time.perf_counter() - t_spawn < timeout:
            if not proc.alive():
                raise RuntimeError("meshproxy exited during start:\n" + proc.log_tail())
            try:
                if probe.get("/readyz")[0] == 200:
                    ready = time.perf_counter() - t_spawn
                    break
            except OSError:
                pass
            time.sleep(POLL)
        probe.close()
        if ready is None:
            raise RuntimeError(f"not ready within {timeout:.0f} s:\n" + proc.log_tail())
        res["first_snapshot_s"] = round(ready, 3)
        st = procstat.tree([proc.pid])
        res["rss_mib"] = round(st.rss_mib, 1)
        res["cpu_s_at_ready"] = round(st.cpu_s, 2)
        dp_ok = False
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline and not (dp_ok := canary_up(canary_port)):
            time.sleep(POLL)
        res["canary"] = "ok" if dp_ok else "the canary Service never echoed: data-plane probe off"

        mode, why = choose_probe("127.0.0.1", admin, probe_mode)
        vprobe = Probe("127.0.0.1", admin, mode)
        vprobe.version()
        vprobe.rtts.clear()
        for _ in range(3):
            vprobe.version()
        rtt = statistics.median(vprobe.rtts) * 1000 if vprobe.rtts else 0.0
        use_version = probe_mode != "auto" or rtt <= max_probe_ms
        res["version_probe"] = mode
        res["version_probe_ms"] = round(rtt, 2)
        res["version_probe_note"] = why + ("" if use_version else
                                           f"; {rtt:.0f} ms > --max-probe-ms {max_probe_ms:g}: "
                                           "not polled")
        time.sleep(1.0)  # let the file watcher settle after start

        ready_now = True
        dp_times: list[float] = []
        v_times: list[float] = []
        missed = 0
        for k in range(changes):
            ready_now = not ready_now
            before = vprobe.version() if use_version else None
            text = first_file_text(pods, services, per_file,
                                   canary_docs(backend_port, canary_port, ready_now)[0])
            t_change = time.perf_counter()
            rewrite(mdir, "pods-00000.yaml", text, atomic)
            dp_seen = None if dp_ok else -1.0
            v_seen = None if use_version else -1.0
            while time.perf_counter() - t_change < 10.0 and (dp_seen is None or v_seen is None):
                if dp_seen is None and canary_up(canary_port) == ready_now:
                    dp_seen = time.perf_counter() - t_change
                if v_seen is None:
                    v = vprobe.version()
                    if v is not None and v != before:
                        v_seen = time.perf_counter() - t_change
                time.sleep(POLL)
            if dp_seen is None or v_seen is None:
                missed += 1
                log(f"{pods} pods: change {k + 1}: not seen within 10 s")
            if dp_seen is not None and dp_seen >= 0:
                dp_times.append(dp_seen)
            if v_seen is not None and v_seen >= 0:
                v_times.append(v_seen)
            time.sleep(0.3)  # separate the changes (bursts coalesce by design)
        vprobe.close()

        def stats(name: str, xs: list[float]) -> None:
            res[f"{name}_ms"] = [round(t * 1000, 1) for t in xs]
            res[f"{name}_median_ms"] = round(1000 * statistics.median(xs), 1) if xs else None
            res[f"{name}_max_ms"] = round(1000 * max(xs), 1) if xs else None

        stats("change_to_dataplane", dp_times)
        stats("change_to_version", v_times)
        res["changes"] = changes
        res["changes_missed"] = missed
        st = procstat.tree([proc.pid])
        res["rss_mib_end"] = round(st.rss_mib, 1)
    except RuntimeError as e:
        res["error"] = str(e)
    finally:
        for p in (proc, canary):
            if p is not None:
                p.stop()
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return res


def markdown(rows: list[dict]) -> str:
    L = [("| pods | services | files | first snapshot (/readyz) s | change → data plane ms "
          "(median / max) | change → snapshot version ms (median / max) | missed | RSS MiB |"),
         "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def mm(r, name):
        med = r.get(f"{name}_median_ms")
        return "–" if med is None else f"{med} / {r[f'{name}_max_ms']}"

    for r in rows:
        if "error" in r:
            L.append(f"| {r['pods']:,} | {r['services']:,} | {r.get('files', '')} | error: "
                     f"{r['error'].splitlines()[0][:120]} | | | | |")
            continue
        L.append(f"| {r['pods']:,} | {r['services']:,} | {r['files']:,} | {r['first_snapshot_s']} | "
                 f"{mm(r, 'change_to_dataplane')} | {mm(r, 'change_to_version')} | "
                 f"{r['changes_missed']} of {r['changes']} | {r['rss_mib']} |")
    L.append("")
    for r in rows:
        if "error" not in r:
            L.append(f"- {r['pods']:,} pods: version probe {r['version_probe']} "
                     f"({r['version_probe_ms']} ms per poll): {r['version_probe_note']}; "
                     f"canary: {r['canary']}")
    L.append("")
    L.append("Target: change → snapshot under 50 ms, and not growing with the number of pods.")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description="Control-plane scale of meshproxy: time to the first snapshot and from a "
                    "one-pod change to the new snapshot, at 1,000 pods and at --pods (services "
                    "in the same ratio), running the real `meshproxy run` process.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--pods", type=int, default=10000)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--sizes", default=None, metavar="N,N",
                   help="pod counts to measure (default 1000,<--pods>); services scale with pods")
    p.add_argument("--pods-per-file", type=int, default=10)
    p.add_argument("--changes", type=int, default=5, help="one-pod changes measured per size")
    p.add_argument("--probe", choices=("auto", "header", "snapshot", "metrics"), default="auto",
                   help="how to read the snapshot version: X-Snapshot-Version header on /readyz "
                        "(cheapest, if the admin server sends it), /debug/snapshot JSON, or "
                        "meshproxy_snapshot_version in /metrics; auto picks the cheapest available")
    p.add_argument("--max-probe-ms", type=float, default=20.0,
                   help="with --probe auto, do not poll a version probe slower than this "
                        "(it would load the control plane it measures) [20]")
    p.add_argument("--in-place", action="store_true",
                   help="rewrite the pod file in place instead of an atomic rename")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the first snapshot")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the generated manifests")
    p.add_argument("--proxy-mode", choices=("userspace", "nftables"), default="userspace",
                   help="nftables: Services in the kernel, measured in a network namespace of its own "
                        "(root; bench/nft_scale.py): first sync and endpoint changes at --services")
    p.add_argument("--endpoints", type=int, default=5, help="with --proxy-mode nftables: endpoints per Service [5]")
    a = p.parse_args(argv)
    if a.proxy_mode == "nftables":
        if a.services == 1000 and "--services" not in (argv or sys.argv):
            a.services = 10000
        return nft_scale.main(a)
    if a.pods < 1 or a.services < 1 or a.pods_per_file < 1:
        p.error("--pods, --services and --pods-per-file must be >= 1")
    ok, why = meshproxy_runnable(VENV_PYTHON)
    if not ok:
        print(f"bench.scale: meshproxy not runnable yet: {why}", file=sys.stderr)
        return 2
    raise_nofile()
    sizes = ([int(x) for x in a.sizes.split(",")] if a.sizes
             else sorted({min(1000, a.pods), a.pods}))
    rows = []
    try:
        for n in sizes:
            svcs = max(1, round(a.services * n / a.pods))
            log(f"measuring {n:,} pods / {svcs:,} services …")
            r = measure(n, svcs, per_file=a.pods_per_file, changes=a.changes, probe_mode=a.probe,
                        atomic=not a.in_place, timeout=a.timeout, python=VENV_PYTHON, keep=a.keep,
                        workers=a.workers, max_probe_ms=a.max_probe_ms)
            rows.append(r)
            log(json.dumps(r))
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        Proc.stop_all()
    doc = {"started": _dt.datetime.now().isoformat(timespec="seconds"), "rows": rows,
           "target": "change → snapshot under 50 ms and not growing with the number of pods"}
    out = RESULTS / f"scale-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1) if a.json else markdown(rows))
    log(f"JSON: {out}")
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
