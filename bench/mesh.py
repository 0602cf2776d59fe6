"""The cost of the mesh: ``python -m bench.mesh [--rounds 3] [--duration 5] [--rate 500] [--pin]``.

A client *pod* calls a server *pod* through a *node* (three network namespaces made for the
run, root only; nothing touches the machine's own network), over HTTP/1.1 keep-alive, in two
ways measured in the same run, alternating round by round:

==========  ==========================================================================================
``direct``  client → server pod address; no capture rules in either pod
``meshed``  client → the Service's ClusterIP: ``meshproxy capture`` in both pods sends the call
            through the client's sidecar (``run --sidecar``, per-request L7, endpoint pick), mutual
            TLS 1.3 between the pods, the server's sidecar (mTLS termination, authorization,
            x-forwarded-client-cert) and on to the server — the same pods and processes as
            ``direct``, only the capture rules differ
==========  ==========================================================================================

The client is bench.load in open loop at ``--rate`` requests/s (latency from each request's
intended send time, so a stall cannot hide), the server bench.tcpserver's tiny HTTP answer.
Reported per path: p50 / p90 / p99 latency; for ``meshed`` also the latency it adds over
``direct`` of the same round and the CPU time both sidecars spent per request (utime + stime
of their processes over the run, divided by the requests served). The sidecars run as uid
1337 (``--proxy-uid``) with a fresh SVID each, as in a meshed pod. With ``--pin`` the sidecars
run on CPU 0 and the client and server on the others.

Published figures of the two well-known meshes are printed beside ours for scale; they come
from other hardware, other applications and many more proxies (docs/benchmarks.md gives the
sources and what each measured).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench import procstat
from bench._util import Proc, log, raise_nofile
from bench.kernel import CLIENT, SERVER, Topology
from bench.nsutil import netns_available
from bench.peers import REPO, _env
from meshproxy.core.identity import SpiffeId
from meshproxy.issuer import CertificateAuthority

RESULTS = Path(__file__).resolve().parent / "results"
CIP, SVC_PORT, APP_PORT = "10.96.0.10", 80, 9000
PROXY_UID = 1337
ADMIN_PORT = 15000
PATHS = ("direct", "meshed")

# Published sidecar figures, for scale (sources in docs/benchmarks.md).
PUBLISHED = [
    ("Istio 1.16 (Envoy sidecars; 1,000 rps, 16 connections, 1 KiB)", "+2.65 ms at p90 (two proxies)",
     "0.35 vCPU per 1,000 rps per proxy = 350 µs CPU per request per proxy"),
    ("Linkerd 2.11.1 vs Istio 1.12 (Kinvolk harness, 2,000 rps, a multi-hop app)",
     "median +6 ms (Linkerd), +17 ms (Istio)", "proxy CPU time max 36 ms (Linkerd), 67 ms (Istio)"),
]


def _manifests() -> str:
    pods = ""
    for name, ip in (("client", CLIENT), ("server", SERVER)):
        pods += f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: bench, labels: {{app: {name}}}, annotations: {{meshproxy.dev/inject: enabled}}}}
spec: {{serviceAccountName: {name}, containers: [{{name: app, ports: [{{name: http, containerPort: {APP_PORT}}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
"""
    return pods + f"""---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: bench}}
spec:
  clusterIP: {CIP}
  selector: {{app: server}}
  ports: [{{name: http, port: {SVC_PORT}, targetPort: http, appProtocol: http}}]
"""


def _write_identity(ca: CertificateAuthority, directory: Path, sa: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(SpiffeId.for_service_account(ca.trust_domain, "bench", sa), key.public_key(), 3600)
    directory.mkdir(mode=0o700)
    pem = serialization.Encoding.PEM
    files = {"svid.pem": cert.public_bytes(pem), "bundle.pem": ca.bundle_pem,
             "svid_key.pem": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        os.chown(directory / name, PROXY_UID, PROXY_UID)
    os.chown(directory, PROXY_UID, PROXY_UID)


def _http_ok(topo: Topology, where: str, host: str, port: int, path: str = "/") -> bool:
    s = topo.node.socket(ns={"client": topo.client, "server": topo.server}[where])
    s.settimeout(1)
    try:
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return s.recv(100).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False
    finally:
        s.close()


def _wait(check, what: str, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready:\n{proc.log_tail()}")


def _capture(topo: Topology, on: bool) -> None:
    for ns in (topo.client, topo.server):
        args = ["--remove"] if not on else ["--proxy-uid", str(PROXY_UID), "--exclude-ports", str(ADMIN_PORT)]
        topo.node.run(sys.executable, "-m", "meshproxy", "capture", *args, ns=ns)


def start(topo: Topology, work: Path, pin: dict | None) -> list[Proc]:
    py = sys.executable
    os.chmod(work, 0o755)
    manifest = work / "cluster.yaml"
    manifest.write_text(_manifests())
    manifest.chmod(0o644)
    ca = CertificateAuthority.generate("cluster.local")
    srv = Proc("mesh-bench-server", topo.argv("server", [py, "-m", "bench.tcpserver", "--listen", f"{SERVER}:{APP_PORT}"]),
               work / "server.log", cwd=REPO, env=_env(), cpus=pin and pin["load"])
    _wait(lambda: _http_ok(topo, "client", SERVER, APP_PORT), "the server", srv)
    sidecars = []
    for name, ip in (("client", CLIENT), ("server", SERVER)):
        _write_identity(ca, work / f"id-{name}", name)
        env = dict(_env(), POD_NAME=name, POD_NAMESPACE="bench", POD_IP=ip, SERVICE_ACCOUNT=name)
        p = Proc(f"sidecar-{name}", topo.argv(name, [
            py, str(REPO / "tests" / "run_as.py"), str(PROXY_UID), "run", "--sidecar", "-f", str(manifest),
            "--service-cidr", "10.96.0.0/16", "--proxy-uid", str(PROXY_UID), "--identity-dir", str(work / f"id-{name}"),
            "--admin-listen", f"127.0.0.1:{ADMIN_PORT}", "--no-health-checks", "--log-level", "warning"]),
            work / f"sidecar-{name}.log", cwd=REPO, env=env, cpus=pin and pin["proxy"])
        _wait(lambda n=name: _http_ok(topo, n, "127.0.0.1", ADMIN_PORT, "/readyz"), f"sidecar of {name}", p)
        sidecars.append(p)
    return sidecars


def run_load(topo: Topology, url: str, rate: float, duration: float, cpus: str | None) -> dict:
    argv = topo.argv("client", [sys.executable, "-m", "bench.load", url, "--rate", str(rate), "-c", "16",
                                "-d", str(duration), "--json"])
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpus, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=duration + 60)
    if r.returncode != 0:
        raise RuntimeError(f"bench.load {url}: {r.stderr[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mesh", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per sample [5]")
    p.add_argument("--rate", type=float, default=500.0, help="requests/s, open loop [500]")
    p.add_argument("--pin", action="store_true", help="sidecars on CPU 0, client and server on the others")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    why = netns_available()
    if why:
        print(f"bench.mesh: {why}", file=sys.stderr)
        return 2
    raise_nofile()
    pin = None
    if a.pin and (os.cpu_count() or 1) >= 2:
        ncpu = os.cpu_count() or 1
        pin = {"proxy": "0", "load": "1" if ncpu == 2 else f"1-{ncpu - 1}"}
    work = Path(tempfile.mkdtemp(prefix="meshproxy-mesh-bench-"))
    topo = Topology()
    rows: dict[str, list[dict]] = {path: [] for path in PATHS}
    try:
        sidecars = start(topo, work, pin)
        # Warm up both paths (pooled connections, caches), then measure.
        for on in (True, False):
            _capture(topo, on)
            run_load(topo, f"http://{CIP}:{SVC_PORT}/" if on else f"http://{SERVER}:{APP_PORT}/", a.rate, 1.0,
                     pin and pin["load"])
        for rnd in range(a.rounds):
            order = PATHS if rnd % 2 == 0 else tuple(reversed(PATHS))
            for path in order:
                meshed = path == "meshed"
                _capture(topo, meshed)
                url = f"http://{CIP}:{SVC_PORT}/" if meshed else f"http://{SERVER}:{APP_PORT}/"
                before = procstat.tree([s.popen.pid for s in sidecars]).cpu_s
                r = run_load(topo, url, a.rate, a.duration, pin and pin["load"])
                cpu = procstat.tree([s.popen.pid for s in sidecars]).cpu_s - before
                lat = r["latency_ms"]
                row = {"p50": lat["p50"], "p90": lat["p90"], "p99": lat["p99"], "requests": r["requests"],
                       "errors": r["errors"], "non_2xx_3xx": r["non_2xx_3xx"],
                       "sidecar_cpu_us_per_request": round(cpu / max(1, r["requests"]) * 1e6, 1)}
                rows[path].append(row)
                log(f"round {rnd + 1}: {path}: p50 {row['p50']} ms, p99 {row['p99']} ms, {r['requests']} requests, "
                    f"sidecars {row['sidecar_cpu_us_per_request']} µs CPU/request, errors {r['errors'] or 0}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        Proc.stop_all()
        topo.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rows)
    doc = {"started": _dt.datetime.now().isoformat(timespec="seconds"), "pin": pin, "rounds": a.rounds,
           "duration_s": a.duration, "rate": a.rate, "rows": rows, "summary": summary}
    out = RESULTS / f"mesh-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1) if a.json else markdown(summary, a.rate))
    log(f"JSON: {out}")
    return 0


def summarize(rows: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for path, vals in rows.items():
        if vals:
            out[path] = {k: statistics.median(v[k] for v in vals) for k in ("p50", "p90", "p99")}
    if rows["direct"] and rows["meshed"]:
        pairs = list(zip(rows["direct"], rows["meshed"]))
        out["added"] = {k: round(statistics.median(m[k] - d[k] for d, m in pairs), 3) for k in ("p50", "p90", "p99")}
        out["sidecar_cpu_us_per_request"] = statistics.median(m["sidecar_cpu_us_per_request"] for m in rows["meshed"])
    return out


def markdown(s: dict, rate: float) -> str:
    L = [f"### meshed call vs direct (HTTP/1.1 keep-alive, open loop {rate:g} req/s; median of rounds)", "",
         "| path | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|"]
    for path in PATHS:
        if path in s:
            L.append(f"| {path} | {s[path]['p50']:.3f} | {s[path]['p90']:.3f} | {s[path]['p99']:.3f} |")
    if "added" in s:
        ad = s["added"]
        L.append(f"| added by the mesh (two sidecars, mTLS) | +{ad['p50']:.3f} | +{ad['p90']:.3f} | +{ad['p99']:.3f} |")
        L += ["", f"CPU of both sidecars: {s['sidecar_cpu_us_per_request']:.0f} µs per request "
                  f"({s['sidecar_cpu_us_per_request'] / 2:.0f} µs per sidecar)."]
    L += ["", "Published figures, for scale (other hardware and workloads; docs/benchmarks.md):", ""]
    L += [f"- {who}: latency {lat}; CPU {cpu}" for who, lat, cpu in PUBLISHED]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
