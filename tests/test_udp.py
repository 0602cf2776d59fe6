"""UDP Services in user space (l4/udp.py): the real ``meshproxy run`` on 127.0.0.0/8, pods as
UDP servers in threads, clients with plain sockets; the idle timeout on a fake clock."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading

import pytest
import yaml
from proc import Meshproxy, free_port, wait_for

from discovery.manifests import load_text
from discovery.store import ADDED, Event
from l4.udp import UdpManager
from meshproxy.controller import Controller
from meshproxy.core.runtime import Runtime
from meshproxy.core.settings import Settings


class UdpPod:
    """Answers each datagram with ``NAME PEER_IP PAYLOAD``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ip = f"127.0.10.{random.randint(2, 250)}"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.ip, 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.peers.append(peer)
            self.sock.sendto(self.name.encode() + b" " + peer[0].encode() + b" " + data, peer)

    def stop(self) -> None:
        self.sock.close()


def _manifests(pods: list[UdpPod], cip: str, port: int, ready: dict[str, bool] | None = None) -> list[dict]:
    docs = []
    for p in pods:
        ok = (ready or {}).get(p.name, True)
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p.name, "labels": {"app": "dns"}},
                     "spec": {"containers": [{"name": "c", "ports": [{"name": "dns", "containerPort": p.port, "protocol": "UDP"}]}]},
                     "status": {"podIP": p.ip, "conditions": [{"type": "Ready", "status": "True" if ok else "False"}]}})
    ports = [{"name": "dns", "port": port, "targetPort": "dns", "protocol": "UDP"}]
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns"},
                 "spec": {"clusterIP": cip, "selector": {"app": "dns"}, "ports": ports}})
    return docs


def _write(path: str, docs: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump_all(docs, f)
    os.replace(tmp, path)


def _ask(sock: socket.socket, payload: bytes) -> tuple[str, str, str]:
    sock.send(payload)
    name, peer, data = sock.recv(1000).decode().split(" ", 2)
    return name, peer, data


@pytest.fixture
def setup(tmp_path):
    pods = [UdpPod("dns-1"), UdpPod("dns-2")]
    cip = f"127.96.{random.randint(1, 250)}.{random.randint(2, 250)}"
    port = free_port(cip, udp=True)     # free for TCP too (one test adds a TCP port of that number)
    path = str(tmp_path / "svc.yaml")
    _write(path, _manifests(pods, cip, port))
    yield pods, cip, port, path
    for p in pods:
        p.stop()


def test_udp_clusterip_relays_per_client_address(setup):
    pods, cip, port, path = setup
    with Meshproxy([path], "--no-health-checks") as mp:
        socks = []
        try:
            first = {}
            for i in range(20):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(10)
                s.bind(("127.0.0.1", 0))
                s.connect((cip, port))      # replies must come from the address we wrote to
                socks.append(s)
                name, peer, data = _ask(s, b"q%d" % i)
                assert data == f"q{i}" and name in ("dns-1", "dns-2")
                first[i] = name
            # every client address stays on its pod
            for i, s in enumerate(socks):
                assert _ask(s, b"again")[0] == first[i]
            assert set(first.values()) == {"dns-1", "dns-2"}      # spread over both (1 in 500,000 to fail)
            snap = mp.snapshot()
            assert {"address": f"{cip}:{port}", "protocol": "UDP"}.items() <= next(
                x for x in snap["listeners"] if x["protocol"] == "UDP").items()
        finally:
            for s in socks:
                s.close()


def test_udp_flow_moves_when_its_pod_leaves(setup):
    pods, cip, port, path = setup
    with Meshproxy([path], "--no-health-checks") as mp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(10)
        s.connect((cip, port))
        try:
            first = _ask(s, b"a")[0]
            other = "dns-2" if first == "dns-1" else "dns-1"
            _write(path, _manifests(pods, cip, port, ready={first: False}))
            wait_for(lambda: all(e["pod"] != first or not e["ready"] for es in mp.snapshot()["endpoints"]
                                 for e in es["endpoints"]), 10, what="the pod to leave")
            assert _ask(s, b"b")[0] == other
        finally:
            s.close()


def test_udp_and_tcp_share_a_port_number(setup):
    """DNS's shape: one Service, port 53 twice (UDP ``dns``, TCP ``dns-tcp``)."""
    pods, cip, port, path = setup
    tcp = socket.socket()
    tcp.bind((pods[0].ip, 0))
    tcp.listen(8)
    tport = tcp.getsockname()[1]

    def serve():
        c, _ = tcp.accept()
        c.sendall(b"tcp-pod\n")
        c.close()
    threading.Thread(target=serve, daemon=True).start()
    docs = _manifests(pods[:1], cip, port)
    docs[0]["spec"]["containers"][0]["ports"].append({"name": "dns-tcp", "containerPort": tport})
    docs[-1]["spec"]["ports"].append({"name": "dns-tcp", "port": port, "targetPort": "dns-tcp"})
    _write(path, docs)
    try:
        with Meshproxy([path], "--no-health-checks"):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(10)
            u.connect((cip, port))
            assert _ask(u, b"x")[0] == pods[0].name
            u.close()
            c = socket.create_connection((cip, port), 10)
            assert c.recv(100) == b"tcp-pod\n"
            c.close()
    finally:
        tcp.close()


def test_sctp_port_is_reported(tmp_path):
    path = str(tmp_path / "s.yaml")
    _write(path, [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                   "spec": {"clusterIP": "127.96.3.3", "selector": {"a": "b"},
                            "ports": [{"name": "s", "port": 9999, "protocol": "SCTP"}]}}])
    with Meshproxy([path], "--no-health-checks") as mp:
        problems = mp.snapshot()["problems"]
        assert "Service/default/s: spec.ports[0].protocol: SCTP is not supported; port 9999 is not served" in problems


# -- the relay on a fake clock -----------------------------------------------------------------


def test_idle_flows_expire_and_no_endpoint_drops(run, clock):
    pod = UdpPod("only")
    cip = f"127.96.{random.randint(1, 250)}.{random.randint(2, 250)}"
    port = free_port(cip, udp=True)
    text = yaml.safe_dump_all(_manifests([pod], cip, port))
    objs = load_text(text).objects

    async def main():
        settings = Settings(paths=["x"], udp_idle_timeout=30.0, health_checks=False)
        runtime = Runtime(settings)
        ctl = Controller(settings, runtime.publish)
        ctl.apply_events([Event(ADDED, o) for o in objs])
        ctl.rebuild()
        mgr = UdpManager(runtime, clock=clock)
        runtime.subscribe(mgr.apply)
        loop = asyncio.get_running_loop()
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.setblocking(False)
        c.connect((cip, port))
        try:
            c.send(b"hello")
            reply = await asyncio.wait_for(loop.sock_recv(c, 1000), 10)
            assert reply.startswith(b"only ")
            assert mgr.flows() == 1
            clock.advance(29)
            assert mgr.sweep() == 0                      # not idle long enough
            c.send(b"again")                             # traffic keeps it alive
            await asyncio.wait_for(loop.sock_recv(c, 1000), 10)
            clock.advance(29)
            assert mgr.sweep() == 0 and mgr.flows() == 1
            clock.advance(31)
            assert mgr.sweep() == 1 and mgr.flows() == 0
            # the next datagram opens a new flow
            c.send(b"back")
            assert (await asyncio.wait_for(loop.sock_recv(c, 1000), 10)).endswith(b" back")
            assert mgr.flows() == 1
            # the pod leaves: its flow is closed at once, and with no endpoint left datagrams drop
            ctl.apply_events([Event("DELETED", next(o for o in objs if o.kind == "Pod"))])
            ctl.rebuild()
            assert mgr.flows() == 0
            before = len(pod.peers)
            c.send(b"lost")
            await asyncio.sleep(0.2)
            assert len(pod.peers) == before and mgr.flows() == 0
        finally:
            c.close()
            mgr.stop()

    try:
        run(main())
    finally:
        pod.stop()
