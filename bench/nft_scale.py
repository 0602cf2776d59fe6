"""Kernel-mode scale: ``python -m bench.scale --proxy-mode nftables --services 10000 --endpoints 5``.

For each size (by default 1,000 services and ``--services``, ``--endpoints`` endpoints each),
in a network namespace made for the run (root; nothing touches the machine's own ruleset):

1. writes manifests: one Node, the Services (selector-less, ClusterIPs from 10.96.0.0/16) and
   one EndpointSlice per Service (``--endpoints`` addresses in 10.200/16), a hundred slices to
   a file, plus a *canary* Service whose one endpoint is a bench.tcpserver inside the namespace;
2. starts ``meshproxy run --proxy-mode nftables`` inside and measures spawn → ``/readyz`` = 200,
   which in this mode includes the first sync of the kernel's table; meshproxy's own account
   of that sync (``/debug/snapshot`` → ``nftables``) splits it into the Python side (desired
   ruleset and diff) and nftables' side (libnftables and the kernel's commits);
3. ``--changes`` times, flips the canary's one endpoint between ready and not ready (a file
   of one slice rewritten) and measures, polling every 2 ms from inside the namespace:
   **change → data plane**, until a new connection to the canary ClusterIP is echoed (ready)
   or refused (not ready: the no-endpoint reject). Then the same number of times it replaces
   one endpoint address of an ordinary 5-endpoint Service and reads meshproxy's account of
   that one sync: **build ms** (Python) and **apply ms** (libnftables + kernel).

The apply figure is what the kernel-side change costs end to end; on kernels up to at least
6.18 it grows with the table: a transaction that adds a jump or a goto (every endpoint change
does) makes the kernel re-validate every chain reachable from each base chain, and
libnftables refreshes its cache of the table before each command. docs/l4-kernel.md has the
measurements and the discussion.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._util import Proc, log
from bench.nsutil import Netns, netns_available
from bench.peers import REPO, _env

POLL = 0.002
CANARY_IP = "10.96.250.1"
CANARY_BACKEND = ("10.250.0.1", 8080)
NODE_IP = "10.250.1.1"
ADMIN = ("127.0.0.1", 9901)


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def ep_ip(i: int, k: int, bump: int = 0) -> str:
    j = i * 8 + k + bump * 7919
    return f"10.200.{(j // 250) % 250}.{j % 250 + 1}"


def service_doc(i: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: svc-{i:05d}}}
spec: {{clusterIP: {cluster_ip(i)}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"""


def slice_doc(name: str, ips: list[str], port: int, ready: bool = True) -> str:
    eps = ", ".join(f"{{addresses: [{ip}], conditions: {{ready: {str(ready).lower()}}}}}" for ip in ips)
    return f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-a, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: http, port: {port}}}]
"""


def canary_docs(ready: bool) -> tuple[str, str]:
    svc = f"""apiVersion: v1
kind: Service
metadata: {{name: canary}}
spec: {{clusterIP: {CANARY_IP}, ports: [{{name: http, port: 80, targetPort: {CANARY_BACKEND[1]}}}]}}
"""
    return svc, slice_doc("canary", [CANARY_BACKEND[0]], CANARY_BACKEND[1], ready)


def write_manifests(d: Path, services: int, endpoints: int) -> None:
    node = f"""apiVersion: v1
kind: Node
metadata: {{name: n1}}
status: {{addresses: [{{type: InternalIP, address: {NODE_IP}}}]}}
"""
    csvc, cslice = canary_docs(True)
    (d / "services.yaml").write_text("---\n".join([node, csvc] + [service_doc(i) for i in range(services)]))
    (d / "canary.yaml").write_text(cslice)
    for start in range(0, services, 100):
        (d / f"slices-{start // 100:04d}.yaml").write_text("---\n".join(
            slice_doc(f"svc-{i:05d}", [ep_ip(i, k) for k in range(endpoints)], 8080)
            for i in range(start, min(services, start + 100))))


def replace(d: Path, name: str, text: str) -> None:
    staging = d.parent / "staging"
    staging.mkdir(exist_ok=True)
    (staging / name).write_text(text)
    os.replace(staging / name, d / name)


class Admin:
    def __init__(self, ns: Netns) -> None:
        self.ns = ns

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        s = self.ns.socket()
        s.settimeout(timeout)
        try:
            s.connect(ADMIN)
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def nftables(self) -> dict:
        st, body = self.get("/debug/snapshot")
        d = json.loads(body) if st == 200 else {}
        return dict(d.get("nftables", {}), snapshot=d.get("version"))


def canary_state(ns: Netns) -> str:
    """"up" (echoed), "down" (refused at once) or "?" (anything else, e.g. a timeout)."""
    s = ns.socket()
    s.settimeout(0.5)
    try:
        s.connect((CANARY_IP, 80))
        s.sendall(b"EEEE")
        return "up" if s.recv(4) == b"EEEE" else "?"
    except ConnectionRefusedError:
        return "down"
    except OSError:
        return "?"
    finally:
        s.close()


def measure(services: int, endpoints: int, changes: int, python: str, timeout: float, keep: bool) -> dict:
    res: dict = {"services": services, "endpoints": services * endpoints, "proxy_mode": "nftables"}
    work = Path(tempfile.mkdtemp(prefix=f"meshproxy-nftscale-{services}-"))
    mdir = work / "manifests"
    mdir.mkdir()
    ns = Netns("scale")
    proc = backend = None
    try:
        # A veth pair with both ends here stands in for a dummy interface (not every kernel has
        # the dummy driver): a carrier for the local addresses and the default route.
        ns.ip("link", "add", "mp0", "type", "veth", "peer", "name", "mp1")
        ns.ip("link", "set", "mp0", "up")
        ns.ip("link", "set", "mp1", "up")
        for ip in (NODE_IP, CANARY_BACKEND[0]):     # the node's address first: the probes' source
            ns.ip("addr", "add", f"{ip}/32", "dev", "mp0")
        ns.ip("route", "add", "default", "dev", "mp0")       # every address routable: rejects, not "no route"
        backend = Proc("nftscale-canary", ns.exec_argv([python, "-m", "bench.tcpserver", "--listen",
                                                         f"{CANARY_BACKEND[0]}:{CANARY_BACKEND[1]}"]),
                       work / "canary.log", cwd=REPO, env=_env())
        t0 = time.perf_counter()
        write_manifests(mdir, services, endpoints)
        res["generate_s"] = round(time.perf_counter() - t0, 2)
        admin = Admin(ns)
        t_spawn = time.perf_counter()
        proc = Proc(f"meshproxy-nftscale-{services}", ns.exec_argv([
            python, "-m", "meshproxy", "run", "-f", str(mdir), "--node", "n1", "--proxy-mode", "nftables",
            "--service-cidr", "10.96.0.0/16", "--admin-listen", "%s:%d" % ADMIN, "--no-health-checks",
            "--log-level", "warning"]), work / "meshproxy.log", cwd=REPO, env=_env())
        ready = None
        while time.perf_counter() - t_spawn < timeout:
            if not proc.alive():
                raise RuntimeError("meshproxy exited during start:\n" + proc.log_tail())
            try:
                if admin.get("/readyz", 2)[0] == 200:
                    ready = time.perf_counter() - t_spawn
                    break
            except OSError:
                pass
            time.sleep(0.05)
        if ready is None:
            raise RuntimeError(f"not ready within {timeout:.0f} s:\n" + proc.log_tail())
        res["ready_s"] = round(ready, 2)
        st = admin.nftables()
        res["first_sync"] = {k: st.get(k) for k in ("firstSyncSeconds", "lastBuildSeconds", "lastApplySeconds",
                                                     "lastCommands", "lastTransactions")}
        chains = ns.run("nft", "list", "chains", "inet", check=False).stdout.count("chain ")
        res["kernel_chains"] = chains
        deadline = time.perf_counter() + 10
        while canary_state(ns) != "up":
            if time.perf_counter() > deadline:
                raise RuntimeError("the canary Service never answered through the kernel")
            time.sleep(0.05)
        time.sleep(1.0)
        dp: list[float] = []
        ready_now = True
        for _ in range(changes):
            ready_now = not ready_now
            want = "up" if ready_now else "down"
            t_change = time.perf_counter()
            replace(mdir, "canary.yaml", canary_docs(ready_now)[1])
            seen = None
            while time.perf_counter() - t_change < 10:
                if canary_state(ns) == want:
                    seen = time.perf_counter() - t_change
                    break
                time.sleep(POLL)
            if seen is not None:
                dp.append(seen)
            else:
                log(f"{services} services: canary change not seen within 10 s")
            time.sleep(0.3)
        res["change_to_dataplane_ms"] = [round(t * 1000, 1) for t in dp]
        res["change_to_dataplane_median_ms"] = round(1000 * statistics.median(dp), 1) if dp else None
        builds, applies, cmds = [], [], []
        for k in range(changes):
            before = admin.nftables().get("version")
            ips = [ep_ip(0, j) for j in range(endpoints)]
            ips[0] = ep_ip(0, 0, bump=k + 1)                   # one endpoint replaced by another
            text = "---\n".join(slice_doc(f"svc-{i:05d}", ips if i == 0 else [ep_ip(i, j) for j in range(endpoints)], 8080)
                                for i in range(0, min(services, 100)))
            replace(mdir, "slices-0000.yaml", text)
            deadline = time.perf_counter() + 10
            while time.perf_counter() < deadline:
                time.sleep(0.2)
                st = admin.nftables()
                if st.get("version") != before and st.get("version") == st.get("snapshot"):
                    break
            builds.append(st.get("lastBuildSeconds") or 0)
            applies.append(st.get("lastApplySeconds") or 0)
            cmds.append(st.get("lastCommands"))
        res["endpoint_change"] = {
            "build_ms": [round(x * 1000, 1) for x in builds], "apply_ms": [round(x * 1000, 1) for x in applies],
            "commands": cmds,
            "build_median_ms": round(1000 * statistics.median(builds), 1) if builds else None,
            "apply_median_ms": round(1000 * statistics.median(applies), 1) if applies else None,
        }
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        res["error"] = str(e)
    finally:
        for p in (proc, backend):
            if p is not None:
                p.stop()
        ns.close()
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return res


def markdown(rows: list[dict]) -> str:
    L = ["| services | endpoints | kernel chains | ready (incl. first sync) s | first sync: build / apply s | "
         "canary change → data plane ms (median) | endpoint change: build / apply ms (median) | commands |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['services']:,} | {r['endpoints']:,} | error: {r['error'].splitlines()[0][:100]} | | | | | |")
            continue
        fs, ec = r["first_sync"], r["endpoint_change"]
        L.append(f"| {r['services']:,} | {r['endpoints']:,} | {r['kernel_chains']:,} | {r['ready_s']} | "
                 f"{fs.get('lastBuildSeconds')} / {fs.get('lastApplySeconds')} ({fs.get('lastTransactions')} tx) | "
                 f"{r['change_to_dataplane_median_ms']} | {ec['build_median_ms']} / {ec['apply_median_ms']} | "
                 f"{ec['commands'][-1] if ec['commands'] else ''} |")
    L.append("")
    L.append("Target: an endpoint change applied in the kernel in under 50 ms, not growing with the cluster.")
    return "\n".join(L)


def main(a) -> int:
    why = netns_available()
    if why:
        print(f"bench.scale --proxy-mode nftables: {why}", file=sys.stderr)
        return 2
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else sorted({min(1000, a.services), a.services})
    rows = []
    try:
        for n in sizes:
            log(f"measuring {n:,} services x {a.endpoints} endpoints in the kernel …")
            r = measure(n, a.endpoints, a.changes, sys.executable, a.timeout, a.keep)
            rows.append(r)
            log(json.dumps(r))
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        Proc.stop_all()
    print(json.dumps(rows, indent=1) if a.json else markdown(rows))
    return 0 if rows and all("error" not in r for r in rows) else 1
