"""L4 through the kernel: ``python -m bench.kernel [--rounds 3] [--duration 5] [--pin]``.

Bulk throughput and new connections per second from a client *pod* to a server *pod* through
a *node*, each a network namespace made for the run (root; nothing touches the machine's own
network), with four paths measured in the same run, interleaved round by round:

=============  ================================================================================
``direct``     client → server pod address, routed by the node (the ceiling: the same hops)
``nftables``   client → ClusterIP; ``meshproxy run --proxy-mode nftables`` in the node programs
               the DNAT, the kernel does the rest (the proxy process is idle)
``haproxy``    client → HAProxy ``mode tcp`` (splice-auto, nbthread 1) on the node's address
``meshproxy``  client → ClusterIP bound on the node by ``meshproxy run`` in user space (default
               mode: listener + splice pump)
=============  ================================================================================

Scenarios as in ``python -m bench``: ``l4-bulk`` (one connection pushing 64 MiB segments to
bench.tcpserver's sink, Gbit/s of acknowledged bytes, bench.tcpload) and ``l4-connrate`` (wrk
-c32 with ``Connection: close`` against bench.tcpserver's tiny HTTP answer: a new connection
per exchange; bench.tcpload's echo client when wrk is missing). With ``--pin`` the proxies
run on CPU 0 and the client and server on the others, like ``python -m bench --pin``; the
kernel's share of the work (routing, NAT, conntrack) runs where the packets are sent.

Ratios are to ``direct`` of the same round; the summary takes the median over rounds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._util import Proc, log, raise_nofile
from bench.nsutil import Netns, netns_available
from bench.peers import REPO, _env, nofile_limit

RESULTS = Path(__file__).resolve().parent / "results"
CLIENT, NODE_C, NODE_S, SERVER = "10.1.0.2", "10.1.0.1", "10.2.0.1", "10.2.0.2"
# One server port per path: a path's TIME_WAIT connections (the server closes first in the
# connection-rate test) must not share 4-tuples with another path's new ones — through NAT a
# client's TCP timestamps differ for the same 4-tuple (they are offset per address pair), so
# the server would take a reused tuple for an old duplicate and stall it.
SERVER_PORTS = {"direct": 9000, "nftables": 9001, "haproxy": 9002, "meshproxy": 9003}
CIP_NFT, CIP_USER, SVC_PORT = "10.96.0.10", "10.96.1.10", 80
HAPROXY_PORT = 8081
PEERS = ("direct", "nftables", "haproxy", "meshproxy")


def _manifests(cip: str, port: int) -> str:
    return f"""apiVersion: v1
kind: Node
metadata: {{name: node}}
status: {{addresses: [{{type: InternalIP, address: {NODE_S}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: bench}}
spec: {{clusterIP: {cip}, ports: [{{name: tcp, port: {SVC_PORT}, targetPort: {port}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: bench-a, labels: {{kubernetes.io/service-name: bench}}}}
addressType: IPv4
endpoints: [{{addresses: [{SERVER}]}}]
ports: [{{name: tcp, port: {port}}}]
"""


class Topology:
    """client ── node ── server, three namespaces, two veth pairs."""

    def __init__(self) -> None:
        self.node = Netns("node")
        self.client = f"{self.node.name[:-4]}client"
        self.server = f"{self.node.name[:-4]}server"
        try:
            for ns, here, there, addr, gw in ((self.client, "n0", "c0", CLIENT, NODE_C),
                                             (self.server, "n1", "s0", SERVER, NODE_S)):
                self.node.add(ns)
                self.node.ip("link", "set", "lo", "up", ns=ns)
                self.node.veth(ns, here, there)
                self.node.ip("addr", "add", f"{gw}/24", "dev", here)
                self.node.ip("addr", "add", f"{addr}/24", "dev", there, ns=ns)
                self.node.ip("route", "add", "default", "via", gw, ns=ns)
            self.node.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            self.node.ip("addr", "add", f"{CIP_USER}/32", "dev", "lo")    # the user-space ClusterIP is local
        except BaseException:
            self.node.close()
            raise

    def argv(self, where: str, argv: list[str]) -> list[str]:
        ns = {"node": self.node.name, "client": self.client, "server": self.server}[where]
        return self.node.exec_argv(argv, ns)

    def close(self) -> None:
        self.node.close()


def _wait_port(topo: Topology, where: str, host: str, port: int, proc: Proc, timeout: float = 15) -> None:
    ns = {"node": topo.node.name, "client": topo.client, "server": topo.server}[where]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        s = topo.node.socket(ns=ns)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise RuntimeError(f"{host}:{port} not reachable from {where} after {timeout}s:\n{proc.log_tail()}")


def _ready(topo: Topology, admin: int, proc: Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        s = topo.node.socket()
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", admin))
            s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            if s.recv(100).split(b" ")[1:2] == [b"200"]:
                return
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready:\n{proc.log_tail()}")


def start_peers(topo: Topology, work: Path, pin: dict | None) -> dict[str, tuple[str, int]]:
    """Start the server and the proxies; returns the address each peer is measured at."""
    py = sys.executable
    proxy_cpus = pin and pin["proxy"]
    for peer, port in SERVER_PORTS.items():
        srv = Proc(f"kernel-bench-server-{peer}", topo.argv("server", [py, "-m", "bench.tcpserver", "--listen",
                                                                       f"{SERVER}:{port}"]),
                   work / f"server-{peer}.log", cwd=REPO, env=_env(), cpus=pin and pin["load"])
        _wait_port(topo, "client", SERVER, port, srv)
    addrs = {"direct": (SERVER, SERVER_PORTS["direct"])}
    for cip, mode, admin in ((CIP_NFT, "nftables", 9901), (CIP_USER, "userspace", 9902)):
        f = work / f"{mode}.yaml"
        f.write_text(_manifests(cip, SERVER_PORTS["nftables" if mode == "nftables" else "meshproxy"]))
        p = Proc(f"meshproxy-{mode}", topo.argv("node", [py, "-m", "meshproxy", "run", "-f", str(f), "--node", "node",
                                                         "--proxy-mode", mode, "--nft-table", "meshproxy-bench",
                                                         "--service-cidr", "10.96.0.0/16", "--no-health-checks",
                                                         "--admin-listen", f"127.0.0.1:{admin}", "--log-level", "warning"]),
                 work / f"meshproxy-{mode}.log", cwd=REPO, env=_env(), cpus=proxy_cpus)
        _ready(topo, admin, p)
        addrs["nftables" if mode == "nftables" else "meshproxy"] = (cip, SVC_PORT)
    haproxy = shutil.which("haproxy")
    if haproxy:
        cfg = work / "haproxy.cfg"
        maxconn = max(256, min(20000, (nofile_limit() - 2 * 1024 - 200) // 2))   # as bench.peers sizes it
        cfg.write_text(f"""global
    nbthread 1
    maxconn {maxconn}
    maxpipes 1024
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend fe
    bind {NODE_C}:{HAPROXY_PORT} backlog 4096
    default_backend be
backend be
    option splice-auto
    server s1 {SERVER}:{SERVER_PORTS["haproxy"]}
""")
        hp = Proc("haproxy", topo.argv("node", [haproxy, "-db", "-f", str(cfg)]), work / "haproxy.log",
                  cpus=proxy_cpus)
        _wait_port(topo, "client", NODE_C, HAPROXY_PORT, hp)
        addrs["haproxy"] = (NODE_C, HAPROXY_PORT)
    else:
        log("haproxy not installed: its row is skipped (MESHPROXY_BENCH_DEPS=1 bash scripts/system-deps.sh)")
    for addr in addrs.values():
        _wait_port(topo, "client", *addr, srv)
    return addrs


def bulk(topo: Topology, addr: tuple[str, int], duration: float, cpus: str | None) -> float:
    argv = topo.argv("client", [sys.executable, "-m", "bench.tcpload", "bulk", f"{addr[0]}:{addr[1]}",
                                "-d", str(duration)])
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpus, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=duration + 60)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if not d.get("bytes"):
        raise RuntimeError(f"bulk to {addr}: nothing acknowledged: {r.stderr[-500:]}")
    return float(d["gbps"])


def connrate(topo: Topology, addr: tuple[str, int], duration: float, cpus: str | None) -> float:
    wrk = shutil.which("wrk")
    if wrk:
        argv = topo.argv("client", [wrk, "-t1", "-c32", f"-d{int(duration)}s", "-H", "Connection: close",
                                    f"http://{addr[0]}:{addr[1]}/"])
    else:
        argv = topo.argv("client", [sys.executable, "-m", "bench.tcpload", "connrate", f"{addr[0]}:{addr[1]}",
                                    "-d", str(duration), "-c", "32"])
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpus, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=duration + 60)
    if wrk:
        m = re.search(r"Requests/sec:\s*([\d.]+)", r.stdout)
        if not m:
            raise RuntimeError(f"wrk to {addr}: {r.stdout[-500:]} {r.stderr[-500:]}")
        return float(m.group(1))
    return float(json.loads(r.stdout.strip().splitlines()[-1])["cps"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per sample [5]")
    p.add_argument("--pin", action="store_true", help="proxies on CPU 0, client and server on the other CPUs")
    p.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}")
    p.add_argument("--scenario", action="append", choices=("l4-bulk", "l4-connrate"),
                   help="repeatable; default both")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    why = netns_available()
    if why:
        print(f"bench.kernel: {why}", file=sys.stderr)
        return 2
    scenarios = a.scenario or ["l4-bulk", "l4-connrate"]
    raise_nofile()
    pin = None
    if a.pin:
        ncpu = os.cpu_count() or 1
        pin = {"proxy": "0", "load": "1" if ncpu == 2 else f"1-{ncpu - 1}"} if ncpu >= 2 else None
    work = Path(tempfile.mkdtemp(prefix="meshproxy-kernel-bench-"))
    topo = Topology()
    results: dict = {sc: {peer: [] for peer in PEERS} for sc in scenarios}
    try:
        addrs = start_peers(topo, work, pin)
        peers = [x for x in a.peers.split(",") if x in addrs]
        for rnd in range(a.rounds):
            for sc in scenarios:
                for peer in peers:
                    fn = bulk if sc == "l4-bulk" else connrate
                    v = fn(topo, addrs[peer], a.duration, pin and pin["load"])
                    results[sc][peer].append(v)
                    log(f"round {rnd + 1}: {sc} {peer}: {v:,.2f}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        Proc.stop_all()
        # The nftables rules stay when meshproxy exits; the namespace goes with them.
        topo.close()
        shutil.rmtree(work, ignore_errors=True)
    doc = {"started": _dt.datetime.now().isoformat(timespec="seconds"), "pin": pin, "rounds": a.rounds,
           "duration_s": a.duration, "results": results}
    out = RESULTS / f"kernel-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1) if a.json else markdown(results))
    log(f"JSON: {out}")
    return 0


def markdown(results: dict) -> str:
    L = []
    for sc, rows in results.items():
        unit = "Gbit/s" if sc == "l4-bulk" else "conn/s"
        direct = rows.get("direct") or []
        L.append(f"### {sc} ({unit}, median of rounds; ratio to direct in the same round)")
        L.append("")
        L.append("| path | median | × direct |")
        L.append("|---|---:|---:|")
        for peer, vals in rows.items():
            if not vals:
                continue
            ratios = [v / d for v, d in zip(vals, direct) if d]
            L.append(f"| {peer} | {statistics.median(vals):,.2f} | "
                     f"{statistics.median(ratios):.2f} |" if ratios else f"| {peer} | {statistics.median(vals):,.2f} | – |")
        L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
