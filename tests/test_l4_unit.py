"""L4 in-process: an ``L4Manager`` on a uvloop loop, snapshots built from manifests by the real
store / endpoint index / snapshot builder, pure-Python pod servers, real sockets on 127/8.

Every address is drawn at random inside 127.0.0.0/8 (ClusterIPs in 127.96/16, pods in
127.0.10/24 on port 0, clients in 127.0.50/24) and every port is chosen by the kernel
(conftest.free_port, held until the test ends; NodePorts by the allocator, read back from the
snapshot), so parallel runs do not collide.

Timers (connect timeout, idle timeout, drain deadlines, drain) run on the ``clock`` fixture: the
manager is given the real loop with a fake clock (``World(clock=clock)``), and a test advances
the clock to just before and just after the moment that matters. Waits on real time in these
tests only bound a hang (``until``, 10 s); nothing is asserted on how long anything took.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
import struct

import pytest
import yaml
from conftest import free_port

from discovery.manifests import load_text
from discovery.store import (
    ADDED,
    DELETED,
    MODIFIED,
    Allocator,
    EndpointIndex,
    Event,
    Store,
)
from l4 import L4Manager
from l4.proxy_protocol import V2_SIGNATURE, header, v1_header, v2_header
from l4.pump import MAX_IN_FLIGHT
from meshproxy.core import metrics
from meshproxy.core.runtime import Runtime
from meshproxy.core.settings import Settings
from meshproxy.core.snapshot import SnapshotBuilder

# -- PROXY protocol byte format (haproxy doc/proxy-protocol.txt) ------------------------------


@pytest.mark.parametrize("src,dst,expected", [
    (("192.168.0.1", 56324), ("192.168.0.11", 443), b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    (("2001:db8::1", 1), ("2001:db8:0:0::2", 65535), b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"),
    (("::ffff:127.0.50.1", 40000), ("127.96.0.10", 80), b"PROXY TCP4 127.0.50.1 127.96.0.10 40000 80\r\n"),
    (("127.0.50.1", 40000), ("::1", 80), b"PROXY UNKNOWN\r\n"),
    (("not-an-ip", 1), ("127.0.0.1", 80), b"PROXY UNKNOWN\r\n"),
])
def test_proxy_v1_line(src, dst, expected):
    line = v1_header(src, dst)
    assert line == expected
    assert len(line) <= 107       # spec 2.1: the worst case fits 107 bytes


def test_proxy_v1_longest_line_fits_107_bytes():
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
    assert len(v1_header((a, 65535), (a, 65535))) == 104


def test_proxy_v2_ipv4():
    h = v2_header(("127.0.50.1", 40000), ("127.96.0.10", 8000))
    assert h[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a" == V2_SIGNATURE
    assert h[12] == 0x21 and h[13] == 0x11             # v2 PROXY, TCP over IPv4
    assert struct.unpack("!H", h[14:16]) == (12,)
    assert len(h) == 16 + 12
    assert h[16:20] == bytes([127, 0, 50, 1]) and h[20:24] == bytes([127, 96, 0, 10])
    assert struct.unpack("!HH", h[24:28]) == (40000, 8000)


def test_proxy_v2_ipv6():
    h = v2_header(("2001:db8::1", 1234), ("2001:db8::2", 443))
    assert h[12] == 0x21 and h[13] == 0x21             # v2 PROXY, TCP over IPv6
    assert struct.unpack("!H", h[14:16]) == (36,) and len(h) == 52
    assert h[16:32] == ipaddress.ip_address("2001:db8::1").packed
    assert h[32:48] == ipaddress.ip_address("2001:db8::2").packed
    assert struct.unpack("!HH", h[48:52]) == (1234, 443)


def test_proxy_v2_mixed_families_send_local():
    h = v2_header(("127.0.0.1", 1), ("::1", 2))
    assert h == V2_SIGNATURE + b"\x20\x00\x00\x00"      # LOCAL, AF_UNSPEC, no address


def test_proxy_header_dispatch():
    src, dst = ("10.0.0.1", 1), ("10.0.0.2", 2)
    assert header(0, src, dst) == b""
    assert header(1, src, dst) == v1_header(src, dst)
    assert header(2, src, dst) == v2_header(src, dst)


# -- harness ---------------------------------------------------------------------------------


def rand_ip(prefix: str) -> str:
    parts = prefix.split(".")
    while len(parts) < 4:
        parts.append(str(random.randint(2, 250)))
    return ".".join(parts)


def service_port(*hosts: str) -> int:
    """A port for a Service on ``hosts``, reserved until the test ends (the manager binds it
    beside the reservation: SO_REUSEPORT)."""
    return free_port(*hosts, hold=True)


def node_port(snap, service: str) -> int:
    """The NodePort the allocator gave ``service`` (the manifests leave it out: a number in
    30000-32767 chosen here could be taken; the allocator's is on random node addresses)."""
    return next(lst.port for lst in snap.l4.values() if lst.backend[1] == service and lst.scope == "node")


async def until(cond, timeout: float = 10.0, what: str = "condition"):
    """Wait for ``cond()`` (polled every 5 ms); ``timeout`` only bounds a hang."""
    async with asyncio.timeout(timeout):
        while not (value := cond()):
            await asyncio.sleep(0.005)
    return value


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


class PodServer(asyncio.Protocol):
    """A pod: greets with its name, then echoes (or does what ``mode`` says)."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.t = None
        self.buf = b""
        self.paused = False

    def connection_made(self, t):
        self.t = t
        self.pod.accepted += 1
        self.pod.conns.append(self)
        mode = self.pod.mode
        if mode == "pp":
            return
        t.write(self.pod.name.encode() + b"\n")
        if mode == "reset":
            t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.abort()
        elif mode == "halfclose":
            t.write_eof()
        elif mode == "source":
            self._pump()

    def _pump(self):
        while not self.paused and self.pod.sent < self.pod.source_bytes:
            chunk = min(65536, self.pod.source_bytes - self.pod.sent)
            self.t.write(b"x" * chunk)
            self.pod.sent += chunk
        if self.pod.sent >= self.pod.source_bytes and not self.paused:
            self.t.close()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.pod.mode == "source":
            self._pump()

    def data_received(self, data):
        mode = self.pod.mode
        if mode == "pp":
            self.buf += data
            self.pod.received.append(data)
            return
        if mode == "halfclose":
            self.buf += data
            return
        self.t.write(data)

    def eof_received(self):
        if self.pod.mode in ("halfclose", "pp"):
            self.pod.done.append(self.buf)
        # close (after flushing the echo): our FIN answers theirs

    def connection_lost(self, exc):
        self.pod.lost.append(exc)


class Pod:
    def __init__(self, name: str, ip: str, mode: str = "echo") -> None:
        self.name, self.ip, self.mode = name, ip, mode
        self.port = 0
        self.server = None
        self.accepted = 0
        self.conns: list[PodServer] = []
        self.lost: list = []
        self.done: list = []
        self.received: list = []
        self.sent = 0
        self.source_bytes = 0

    async def start(self) -> Pod:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: PodServer(self), self.ip, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in self.conns:
            if c.t is not None:
                c.t.abort()


def pod_doc(name: str, ip: str, port: int, ready: bool = True, node: str | None = None,
            labels: dict | None = None, terminating: bool = False) -> dict:
    meta = {"name": name, "namespace": "default", "labels": labels or {"app": "web"}}
    if terminating:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    spec: dict = {"containers": [{"name": "c", "ports": [{"name": "tcp", "containerPort": port}]}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def service_doc(name: str, cluster_ip: str, port: int, *, type_: str = "ClusterIP", node_port: int | None = None,
                selector: dict | None = None, affinity: int | None = None, etp: str | None = None,
                itp: str | None = None, annotations: dict | None = None, external_ips=(), lb_ips=()) -> dict:
    p: dict = {"name": "tcp", "port": port, "targetPort": "tcp"}
    if node_port:
        p["nodePort"] = node_port
    spec: dict = {"type": type_, "clusterIP": cluster_ip, "selector": selector or {"app": "web"}, "ports": [p]}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    doc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}}, "spec": spec}
    if lb_ips:
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return doc


def node_doc(name: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


class World:
    """The control plane in miniature: manifests in, snapshot published to the runtime.
    ``clock``: the manager's timers run on it (see the module docstring)."""

    def __init__(self, clock=None, **settings) -> None:
        self.clock = clock
        settings.setdefault("drain_timeout", 5.0)
        settings.setdefault("connect_timeout", 2.0)
        self.settings = Settings(**settings)
        self.runtime = Runtime(self.settings)
        self.store = Store()
        self.index = EndpointIndex(self.store)
        self.allocator = Allocator(self.settings.service_cidr, self.settings.node_port_range)
        self.builder = SnapshotBuilder(self.settings)
        self.mgr: L4Manager | None = None
        self.pods: list[Pod] = []

    def set(self, docs: list[dict]) -> None:
        res = load_text(yaml.safe_dump_all(docs), "test.yaml")
        assert not res.errors, [str(e) for e in res.errors]
        new = {o.key: o for o in res.objects}
        events = [Event(DELETED, o) for k, o in ((k, self.store.get(*k)) for k in self._keys()) if k not in new]
        for k, o in new.items():
            events.append(Event(MODIFIED if self.store.get(*k) is not None else ADDED, o))
        self.index.on_changes(self.store.apply(events))
        self.index.recompute()
        snap = self.builder.build(self.store, self.index, self.allocator)
        self.runtime.publish(snap)

    def _keys(self):
        for kind in ("Pod", "Service", "Node"):
            for (ns, name) in list(self.store.items(kind)):
                yield (kind, ns, name)

    async def start(self) -> L4Manager:
        loop = self.clock.on(asyncio.get_running_loop()) if self.clock is not None else None
        self.mgr = L4Manager(self.runtime, loop=loop)
        self.runtime.subscribe(self.mgr.apply)
        await asyncio.sleep(0.01)      # server tasks
        return self.mgr

    async def pod(self, name: str, mode: str = "echo", ip: str | None = None) -> Pod:
        p = await Pod(name, ip or rand_ip("127.0.10"), mode).start()
        self.pods.append(p)
        return p

    async def close(self) -> None:
        if self.mgr is not None:
            await self.mgr.stop_accepting()
            await self.mgr.drain(0)
        for p in self.pods:
            p.close()
        await asyncio.sleep(0.01)


async def connect(host: str, port: int, src: str | None = None):
    return await asyncio.open_connection(host, port, local_addr=(src, 0) if src else None)


async def connect_refused_or_closed(host: str, port: int, seconds: float) -> bool:
    """For a connection the proxy rejects: the reset may even overtake connect() itself."""
    try:
        r, w = await connect(host, port)
    except ConnectionResetError:
        return True
    try:
        return await closed_within(r, seconds)
    finally:
        w.close()


async def whoami(host: str, port: int, src: str | None = None) -> str:
    r, w = await connect(host, port, src)
    try:
        line = await r.readline()
        return line.decode().strip()
    finally:
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass


async def closed_within(r: asyncio.StreamReader, seconds: float) -> bool:
    """True when the proxy ends the stream (EOF or reset) within ``seconds``."""
    try:
        await asyncio.wait_for(r.read(), seconds)    # EOF
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.fixture(params=["splice", "copy"])
def pump_mode(request, monkeypatch):
    """Run a test over both data paths: os.splice + epoll, and the recv_into/send + add_reader
    fallback."""
    import l4.pump
    if request.param == "splice" and not hasattr(os, "splice"):
        pytest.skip("no os.splice on this platform")
    monkeypatch.setattr(l4.pump, "USE_SPLICE", request.param == "splice")
    # The copy path also runs on the loop poller: the combination a non-Linux host gets.
    monkeypatch.setattr(l4.pump, "USE_EPOLL", request.param == "splice" and l4.pump.USE_EPOLL)
    return request.param


# -- acceptance --------------------------------------------------------------------------------


def test_spread_over_ready_pods_only(run):
    async def main():
        w = World()
        pods = [await w.pod(f"web-{i}") for i in range(4)]
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port)] +
              [pod_doc(p.name, p.ip, p.port, ready=(i < 3)) for i, p in enumerate(pods)])
        await w.start()
        try:
            names = []
            for _ in range(6):
                names += await asyncio.gather(*(whoami(cip, port) for _ in range(50)))
            counts = {p.name: names.count(p.name) for p in pods}
            assert sum(counts.values()) == 300
            assert counts["web-3"] == 0 and pods[3].accepted == 0
            for name in ("web-0", "web-1", "web-2"):
                assert 50 <= counts[name] <= 150, counts
        finally:
            await w.close()
    run(main())


def test_one_mib_echo_through_half_close(pump_mode, run):
    async def main():
        w = World()
        pods = [await w.pod(f"web-{i}") for i in range(2)]
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port)] + [pod_doc(p.name, p.ip, p.port) for p in pods])
        await w.start()
        try:
            payload = os.urandom(1 << 20)
            rx0 = counter(metrics.l4_bytes, "default", "web", "tcp", "rx")
            r, wr = await connect(cip, port)
            greeting = await r.readline()
            assert greeting.strip() in (b"web-0", b"web-1")

            async def send():
                for i in range(0, len(payload), 100_000):
                    wr.write(payload[i:i + 100_000])
                    await wr.drain()
                wr.write_eof()              # half-close: our direction ends, theirs goes on
            sender = asyncio.ensure_future(send())
            echoed = await r.read()         # until the pod's FIN comes back through the proxy
            await sender
            assert echoed == payload
            wr.close()
            await until(lambda: w.mgr.active_connections() == 0, what="the connection to finish")
            assert counter(metrics.l4_bytes, "default", "web", "tcp", "rx") - rx0 == len(payload)
            assert w.runtime.balancers.active == {}
        finally:
            await w.close()
    run(main())


def test_bytes_sent_before_the_pod_connection_is_up_are_kept(pump_mode, run):
    async def main():
        w = World()
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            r, wr = await connect(cip, port)
            wr.write(b"early bytes")                  # before the proxy has reached the pod
            wr.write_eof()
            assert await asyncio.wait_for(r.read(), 10) == b"web-0\nearly bytes"
            wr.close()
        finally:
            await w.close()
    run(main())


def test_half_close_from_the_pod_side_keeps_client_direction_open(pump_mode, run):
    async def main():
        w = World()
        pod = await w.pod("web-0", mode="halfclose")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc(pod.name, pod.ip, pod.port)])
        await w.start()
        try:
            r, wr = await connect(cip, port)
            assert await r.read() == b"web-0\n"      # greeting, then the pod's FIN
            wr.write(b"still talking after your FIN")
            wr.write_eof()
            assert await until(lambda: pod.done) == [b"still talking after your FIN"]
            wr.close()
        finally:
            await w.close()
    run(main())


def test_slow_reader_keeps_buffers_bounded(pump_mode, run):
    async def main():
        w = World()
        pod = await w.pod("src", mode="source")
        pod.source_bytes = 32 << 20
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc(pod.name, pod.ip, pod.port)])
        await w.start()
        try:
            r, wr = await connect(cip, port)
            await r.readline()
            # The client does not read. The pod is pushed back: its transport pauses it (full
            # socket buffers all the way) long before its 32 MiB are out.
            await until(lambda: (pod.conns and pod.conns[-1].paused) or pod.sent >= pod.source_bytes,
                        what="the pod to be paused or done")
            assert pod.sent < 16 << 20, pod.sent
            conn = next(iter(w.mgr.conns))
            # The proxy holds at most one pipe / buffer per direction.
            assert conn.buffered() <= 2 * MAX_IN_FLIGHT, conn.buffered()
            assert w.mgr.pool.in_use <= 2
            await asyncio.sleep(0.2)                  # and, the client still not reading, it stays so
            assert pod.sent < 16 << 20, pod.sent
            assert conn.buffered() <= 2 * MAX_IN_FLIGHT, conn.buffered()
            total = 0
            while True:
                chunk = await r.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
                assert w.mgr.conns == set() or next(iter(w.mgr.conns)).buffered() <= 2 * MAX_IN_FLIGHT
            assert total == 32 << 20
            wr.close()
        finally:
            await w.close()
    run(main(), timeout=30)


def test_client_ip_affinity_pins_and_moves_when_pod_is_removed(run):
    async def main():
        w = World()
        pods = [await w.pod(f"web-{i}") for i in range(3)]
        cip = rand_ip("127.96")
        port = service_port(cip)
        docs = [service_doc("web", cip, port, affinity=600)]
        w.set(docs + [pod_doc(p.name, p.ip, p.port) for p in pods])
        await w.start()
        try:
            clients = [rand_ip("127.0.50") for _ in range(6)]
            pinned = {}
            for c in clients:
                got = {await whoami(cip, port, src=c) for _ in range(10)}
                assert len(got) == 1, (c, got)
                pinned[c] = got.pop()
            # Remove the pod of the first client; its pin moves and then holds again.
            c0 = clients[0]
            gone = pinned[c0]
            w.set(docs + [pod_doc(p.name, p.ip, p.port) for p in pods if p.name != gone])
            got = {await whoami(cip, port, src=c0) for _ in range(10)}
            assert len(got) == 1 and gone not in got, got
            for c in clients[1:]:
                if pinned[c] != gone:
                    assert await whoami(cip, port, src=c) == pinned[c]
        finally:
            await w.close()
    run(main())


def test_no_endpoints_resets_at_once(run, clock):
    """kube-proxy REJECTs: the client is reset on accept. The manager's clock never moves
    here, so no timer (connect, idle, drain) can be what ended the connection."""
    async def main():
        w = World(clock=clock)
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("empty", cip, port, selector={"app": "nothing"})])
        await w.start()
        try:
            n0 = counter(metrics.l4_no_endpoints, "default", "empty", "tcp")
            assert await connect_refused_or_closed(cip, port, 10)
            assert counter(metrics.l4_no_endpoints, "default", "empty", "tcp") == n0 + 1
            assert clock() == 1000.0 and w.mgr.active_connections() == 0
        finally:
            await w.close()
    run(main())


def test_connect_failure_is_retried_invisibly(run):
    async def main():
        w = World(lb_policy="round_robin")
        live = await w.pod("live")
        dead_ips = [rand_ip("127.0.10") for _ in range(2)]
        dead = [pod_doc(f"dead-{i}", ip, service_port(ip)) for i, ip in enumerate(dead_ips)]   # held: refused
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("live", live.ip, live.port)] + dead)
        await w.start()
        try:
            f0 = counter(metrics.l4_connect_failures, "default", "web", "tcp")
            names = [await whoami(cip, port) for _ in range(12)]
            assert names == ["live"] * 12
            assert counter(metrics.l4_connect_failures, "default", "web", "tcp") - f0 >= 6
            # The failures were reported to the passive-health hook.
            assert all(w.runtime.balancers.failures.get((ip, d["spec"]["containers"][0]["ports"][0]["containerPort"]))
                       for ip, d in zip(dead_ips, dead))
        finally:
            await w.close()
    run(main())


def test_connect_completed_through_the_poller(pump_mode, monkeypatch, run):
    """A connect that is not done at once (any real network) completes on writability."""
    import l4.pump
    seen: list = []          # the sockets themselves: fd numbers are reused
    real = l4.pump._is_connected

    def not_yet_the_first_time(sock):
        if not any(x is sock for x in seen):
            seen.append(sock)
            return False
        return real(sock)
    monkeypatch.setattr(l4.pump, "_is_connected", not_yet_the_first_time)

    async def main():
        w = World()
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            for _ in range(3):
                assert await whoami(cip, port) == "web-0"
            assert len(seen) >= 3
        finally:
            await w.close()
    run(main())


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


def test_connect_timeout_is_retried_on_another_endpoint(run, clock):
    async def main():
        w = World(clock=clock, connect_timeout=0.3)
        live = await w.pod("live")
        # A listener whose accept queue is full drops SYNs: connects to it hang until timeout.
        stuck_ip = rand_ip("127.0.10")
        stuck = socket.socket()
        stuck.bind((stuck_ip, 0))
        stuck.listen(0)
        fillers = []
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(stuck.getsockname())
            fillers.append(f)
        await until(lambda: any(_connected(f) for f in fillers), what="the stuck pod's accept queue to fill")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port, annotations={"meshproxy.dev/lb-policy": "round_robin"}),
               pod_doc("live", live.ip, live.port), pod_doc("stuck", stuck_ip, stuck.getsockname()[1])])
        await w.start()
        try:
            f0 = counter(metrics.l4_connect_failures, "default", "web", "tcp")
            # Round robin sends one of two connections to the stuck pod and one to the live pod.
            clients = [await connect(cip, port) for _ in range(2)]
            greetings = [asyncio.ensure_future(r.readline()) for r, _ in clients]
            timeout_at = clock() + 0.3
            await until(lambda: timeout_at in clock.pending(), what="a connect waiting for its timeout")
            await until(lambda: sum(g.done() for g in greetings) == 1, what="the live pod's greeting")
            # Until the connect timeout the other connection waits: no failure, no retry.
            clock.advance(0.299)
            await asyncio.sleep(0.05)
            assert sum(g.done() for g in greetings) == 1
            assert counter(metrics.l4_connect_failures, "default", "web", "tcp") == f0
            # At the timeout the attempt is counted as failed and retried on the live pod,
            # which the client sees as an ordinary answer.
            clock.advance(0.001)
            assert [await asyncio.wait_for(g, 10) for g in greetings] == [b"live\n", b"live\n"]
            assert counter(metrics.l4_connect_failures, "default", "web", "tcp") == f0 + 1
            for _, wr in clients:
                wr.close()
        finally:
            for f in fillers:
                f.close()
            stuck.close()
            await w.close()
    run(main())


def test_removed_pod_drains_until_deadline(run, clock):
    async def main():
        w = World(clock=clock, drain_timeout=0.6, lb_policy="round_robin")
        pods = [await w.pod(f"web-{i}") for i in range(2)]
        cip = rand_ip("127.96")
        port = service_port(cip)
        svc = service_doc("web", cip, port)
        w.set([svc] + [pod_doc(p.name, p.ip, p.port) for p in pods])
        await w.start()
        try:
            # One open connection to each pod.
            conns = {}
            while len(conns) < 2:
                r, wr = await connect(cip, port)
                name = (await r.readline()).decode().strip()
                if name in conns:
                    wr.close()
                else:
                    conns[name] = (r, wr)
            w.set([svc, pod_doc("web-1", pods[1].ip, pods[1].port)])      # web-0 removed
            # New connections avoid it at once.
            assert {await whoami(cip, port) for _ in range(10)} == {"web-1"}
            # The old one still works until the deadline (0.6 s) ...
            clock.advance(0.59)
            r, wr = conns["web-0"]
            wr.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            # ... and is reset once it has passed, by the next sweep (every 0.6 / 4 s).
            clock.advance(0.01 + 0.15 + 0.01)
            assert await closed_within(r, 10)
            # The connection to the pod that stayed is untouched.
            r1, w1 = conns["web-1"]
            w1.write(b"pong")
            assert await asyncio.wait_for(r1.readexactly(4), 10) == b"pong"
            for _, x in conns.values():
                x.close()
        finally:
            await w.close()
    run(main())


def test_drain_is_per_service_when_a_pod_leaves_only_one(run, clock):
    async def main():
        w = World(clock=clock, drain_timeout=0.4)
        pod = await w.pod("web-0")
        cip1, cip2 = rand_ip("127.96"), rand_ip("127.96")
        p1, p2 = service_port(cip1), service_port(cip2)
        svcs = [service_doc("web", cip1, p1, selector={"app": "web"}),
                service_doc("other", cip2, p2, selector={"tier": "x"})]
        w.set(svcs + [pod_doc("web-0", pod.ip, pod.port, labels={"app": "web", "tier": "x"})])
        await w.start()
        try:
            r1, w1 = await connect(cip1, p1)
            r2, w2 = await connect(cip2, p2)
            await r1.readline()
            await r2.readline()
            # The pod stops matching "web" but still backs "other" (same address and port).
            w.set(svcs + [pod_doc("web-0", pod.ip, pod.port, labels={"tier": "x"})])
            clock.advance(0.39)
            w1.write(b"a")
            assert await asyncio.wait_for(r1.readexactly(1), 10) == b"a"        # "web" until its deadline
            clock.advance(0.01 + 0.1 + 0.01)                                     # deadline + one sweep tick
            assert await closed_within(r1, 10)                                   # drained from "web"
            w2.write(b"still")
            assert await asyncio.wait_for(r2.readexactly(5), 10) == b"still"    # "other" untouched
            w1.close()
            w2.close()
        finally:
            await w.close()
    run(main())


def test_terminating_pod_gets_no_new_connections_and_drains(run, clock):
    async def main():
        w = World(clock=clock, drain_timeout=0.5)
        pods = [await w.pod(f"web-{i}") for i in range(2)]
        cip = rand_ip("127.96")
        port = service_port(cip)
        svc = service_doc("web", cip, port)
        w.set([svc, pod_doc("web-0", pods[0].ip, pods[0].port)])
        await w.start()
        try:
            r, wr = await connect(cip, port)
            assert (await r.readline()).strip() == b"web-0"
            w.set([svc, pod_doc("web-0", pods[0].ip, pods[0].port, terminating=True),
                   pod_doc("web-1", pods[1].ip, pods[1].port)])
            assert {await whoami(cip, port) for _ in range(5)} == {"web-1"}
            clock.advance(0.49)
            wr.write(b"a")
            assert await asyncio.wait_for(r.readexactly(1), 10) == b"a"      # served until the deadline
            clock.advance(0.01 + 0.125 + 0.01)                                # deadline + one sweep tick
            assert await closed_within(r, 10)
            wr.close()
        finally:
            await w.close()
    run(main())


def test_service_deletion_closes_listener_and_drains(run, clock):
    async def main():
        w = World(clock=clock, drain_timeout=0.6)
        pod = await w.pod("web-0")
        cip, cip2 = rand_ip("127.96"), rand_ip("127.96")
        port, port2 = service_port(cip), service_port(cip2)
        other = service_doc("other", cip2, port2)
        w.set([service_doc("web", cip, port), other, pod_doc("web-0", pod.ip, pod.port)])
        mgr = await w.start()
        kept = mgr.listeners[(cip2, port2)]
        try:
            r, wr = await connect(cip, port)
            await r.readline()
            w.set([other, pod_doc("web-0", pod.ip, pod.port)])
            assert mgr.listeners[(cip2, port2)] is kept          # untouched
            with pytest.raises(OSError):
                await connect(cip, port)                          # listening socket gone at once
            clock.advance(0.59)
            wr.write(b"x")
            assert await r.readexactly(1) == b"x"                 # open connection continues ...
            clock.advance(0.01 + 0.15 + 0.01)
            assert await closed_within(r, 10)                     # ... until the drain deadline
            wr.close()
            assert await whoami(cip2, port2) == "web-0"
        finally:
            await w.close()
    run(main())


def test_external_traffic_policy_local_and_cluster(run):
    async def main():
        w = World(node="node-a")
        a = [await w.pod(f"a-{i}") for i in range(2)]
        b = [await w.pod(f"b-{i}") for i in range(2)]
        node_a, node_b = rand_ip("127.0.1"), rand_ip("127.0.1")
        while node_b == node_a:     # two nodes need two addresses
            node_b = rand_ip("127.0.1")
        nodes = [node_doc("node-a", node_a), node_doc("node-b", node_b)]
        pods = [pod_doc(p.name, p.ip, p.port, node="node-a") for p in a] + \
               [pod_doc(p.name, p.ip, p.port, node="node-b") for p in b]
        cip_l, cip_c = rand_ip("127.96"), rand_ip("127.96")
        local_svc = service_doc("local", cip_l, service_port(cip_l), type_="NodePort", etp="Local")
        w.set(nodes + pods + [
            local_svc, service_doc("cluster", cip_c, service_port(cip_c), type_="NodePort", etp="Cluster")])
        np_l, np_c = node_port(w.runtime.snapshot, "local"), node_port(w.runtime.snapshot, "cluster")
        mgr = await w.start()
        try:
            assert (node_a, np_l) in mgr.listeners and (node_b, np_l) not in mgr.listeners
            local = {await whoami(node_a, np_l) for _ in range(30)}
            assert local == {"a-0", "a-1"}
            cluster = {await whoami(node_a, np_c) for _ in range(60)}
            assert cluster == {"a-0", "a-1", "b-0", "b-1"}
            # Local with no local pod: refused (reset), not sent elsewhere.
            w.set(nodes + pods[2:] + [local_svc])
            assert node_port(w.runtime.snapshot, "local") == np_l
            assert await connect_refused_or_closed(node_a, np_l, 10)
        finally:
            await w.close()
    run(main())


def test_internal_traffic_policy_local(run):
    async def main():
        w = World(node="node-a")
        a, b = await w.pod("a-0"), await w.pod("b-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([node_doc("node-a", rand_ip("127.0.1")), node_doc("node-b", rand_ip("127.0.1")),
               pod_doc("a-0", a.ip, a.port, node="node-a"), pod_doc("b-0", b.ip, b.port, node="node-b"),
               service_doc("web", cip, port, itp="Local")])
        await w.start()
        try:
            assert {await whoami(cip, port) for _ in range(20)} == {"a-0"}
        finally:
            await w.close()
    run(main())


def test_bind_failure_is_reported_once_and_retried(run):
    async def main():
        w = World()
        pod = await w.pod("web-0")
        cip_ok, cip_bad = rand_ip("127.96"), rand_ip("127.96")
        port_ok = service_port(cip_ok)
        squatter = socket.socket()                   # no SO_REUSEPORT: nobody may share it
        squatter.bind((cip_bad, 0))
        squatter.listen(1)
        port_bad = squatter.getsockname()[1]
        docs = [service_doc("ok", cip_ok, port_ok), service_doc("bad", cip_bad, port_bad),
                pod_doc("web-0", pod.ip, pod.port)]
        e0 = counter(metrics.l4_listener_errors, "default", "bad", "tcp")
        w.set(docs)
        mgr = await w.start()
        try:
            assert (cip_bad, port_bad) in mgr.failures
            assert "cannot listen on" in mgr.failures[(cip_bad, port_bad)]
            assert await whoami(cip_ok, port_ok) == "web-0"   # the others are served
            w.set(docs + [pod_doc("web-1", pod.ip, pod.port + 0, labels={"app": "x"})])   # another publish
            assert counter(metrics.l4_listener_errors, "default", "bad", "tcp") == e0 + 1   # once
            squatter.close()
            w.set(docs)                                         # retried on the next apply
            assert (cip_bad, port_bad) not in mgr.failures
            assert await whoami(cip_bad, port_bad) == "web-0"
        finally:
            squatter.close()
            await w.close()
    run(main())


def test_external_addresses_bind_when_local_and_are_skipped_otherwise(run):
    async def main():
        w = World(node="node-a")        # the NodePort on a random node address, not 127.0.0.1
        pod = await w.pod("web-0")
        cip, ext = rand_ip("127.96"), rand_ip("127.0.60")
        port = service_port(cip, ext)
        w.set([node_doc("node-a", rand_ip("127.0.1")),
               service_doc("lb", cip, port, type_="LoadBalancer", external_ips=[ext], lb_ips=["192.0.2.10"]),
               pod_doc("web-0", pod.ip, pod.port)])
        mgr = await w.start()
        try:
            assert (ext, port) in mgr.listeners
            assert ("192.0.2.10", port) not in mgr.listeners and not mgr.failures
            assert await whoami(ext, port) == "web-0"
        finally:
            await w.close()
    run(main())


def test_reset_from_pod_reaches_client(pump_mode, run):
    async def main():
        w = World()
        pod = await w.pod("web-0", mode="reset")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            r, wr = await connect(cip, port)
            with pytest.raises(ConnectionResetError):
                while True:
                    if not await asyncio.wait_for(r.read(100), 10):
                        raise AssertionError("clean EOF instead of a reset")
            wr.close()
        finally:
            await w.close()
    run(main())


def test_reset_from_client_reaches_pod(pump_mode, run):
    async def main():
        w = World()
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            r, wr = await connect(cip, port)
            await r.readline()
            wr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            wr.transport.abort()
            await until(lambda: pod.lost, what="the pod connection to end")
            assert isinstance(pod.lost[0], ConnectionResetError), pod.lost
        finally:
            await w.close()
    run(main())


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_protocol_header_reaches_the_pod_first(version, pump_mode, run):
    async def main():
        w = World()
        pod = await w.pod("pp", mode="pp")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port, annotations={"meshproxy.dev/proxy-protocol": f"v{version}"}),
               pod_doc("pp", pod.ip, pod.port)])
        await w.start()
        try:
            client = rand_ip("127.0.50")
            _, wr = await connect(cip, port, src=client)
            wr.write(b"hello")
            wr.write_eof()
            await until(lambda: pod.done, what="the pod to see the client's FIN")
            src = wr.get_extra_info("sockname")
            assert pod.done == [header(version, (src[0], src[1]), (cip, port)) + b"hello"]
            wr.close()
        finally:
            await w.close()
    run(main())


def test_idle_timeout_closes_quiet_connections_only(run, clock):
    """idle_timeout 0.3 s: connection 1 says nothing and is closed (a FIN: nothing is pending)
    once it has been idle that long; connection 2 carries a byte every 0.05 s and lives on."""
    async def main():
        w = World(clock=clock, idle_timeout=0.3)
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            r1, w1 = await connect(cip, port)
            r2, w2 = await connect(cip, port)
            await r1.readline()
            await r2.readline()
            for step in range(1, 15):                    # 0.7 s of the manager's time
                w2.write(b"k")
                assert await r2.readexactly(1) == b"k"
                clock.advance(0.05)
                if step * 0.05 < 0.3:                    # neither was idle for 0.3 s yet
                    assert w.mgr.active_connections() == 2, step
            assert await asyncio.wait_for(r1.read(), 10) == b""     # connection 1 was idle: closed
            assert w.mgr.active_connections() == 1
            w2.write(b"z")
            assert await r2.readexactly(1) == b"z"       # connection 2 lives
            w1.close()
            w2.close()
        finally:
            await w.close()
    run(main())


def test_stop_accepting_then_drain(run, clock):
    async def main():
        w = World(clock=clock)
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        mgr = await w.start()
        try:
            r, wr = await connect(cip, port)
            await r.readline()
            await mgr.stop_accepting()
            with pytest.raises(OSError):
                await connect(cip, port)
            wr.write(b"a")
            assert await r.readexactly(1) == b"a"
            assert mgr.active_connections() == 1
            w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])   # no re-bind
            assert not mgr.listeners
            drain = asyncio.ensure_future(mgr.drain(0.3))
            timeout_at = clock() + 0.3
            await until(lambda: timeout_at in clock.pending(), what="the drain to wait")
            clock.advance(0.299)
            await asyncio.sleep(0.05)
            assert not drain.done() and mgr.active_connections() == 1
            wr.write(b"b")
            assert await r.readexactly(1) == b"b"        # served while the drain waits
            clock.advance(0.001)                         # the drain timeout: the rest is reset
            await asyncio.wait_for(drain, 10)
            assert mgr.active_connections() == 0
            assert await closed_within(r, 10)
            wr.close()
        finally:
            await w.close()
    run(main())


def test_drain_returns_as_soon_as_connections_finish(run, clock):
    async def main():
        w = World(clock=clock)
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        mgr = await w.start()
        try:
            r, wr = await connect(cip, port)
            await r.readline()
            await mgr.stop_accepting()
            drain = asyncio.ensure_future(mgr.drain(10))
            await asyncio.sleep(0.05)
            assert not drain.done()
            wr.close()
            # The manager's clock never moves: its 10 s timer cannot be what ended the drain.
            await asyncio.wait_for(drain, 10)
            assert mgr.active_connections() == 0 and clock() == 1000.0
        finally:
            await w.close()
    run(main())


def test_max_connections_pauses_accepting_until_one_ends(run):
    async def main():
        w = World(max_connections=2)
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("web", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            first = [await connect(cip, port) for _ in range(2)]
            for r, _ in first:
                await r.readline()
            r3, w3 = await connect(cip, port)        # the kernel completes it: it waits in the backlog
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r3.readline(), 0.3)
            assert w.mgr.active_connections() == 2
            first[0][1].close()
            assert await asyncio.wait_for(r3.readline(), 10) == b"web-0\n"
            first[1][1].close()
            w3.close()
        finally:
            await w.close()
    run(main())


def test_max_connections_counts_all_l4_listeners_together(run):
    """The limit bounds the process's L4 connections (descriptors are per process), not each
    listener's: a second listener waits too, and both resume when a connection ends."""
    async def main():
        w = World(max_connections=2)
        pod = await w.pod("web-0")
        cip_a, cip_b = rand_ip("127.96"), rand_ip("127.96")
        port_a, port_b = service_port(cip_a), service_port(cip_b)
        w.set([service_doc("a", cip_a, port_a), service_doc("b", cip_b, port_b),
               pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            first = [await connect(cip_a, port_a), await connect(cip_b, port_b)]
            for r, _ in first:
                await r.readline()
            waiting = [await connect(cip_a, port_a), await connect(cip_b, port_b)]
            await until(lambda: len(w.mgr.full) == 2, what="both listeners to find the manager full")
            assert w.mgr.active_connections() == 2
            first[0][1].close()
            first[1][1].close()
            for r, _ in waiting:
                assert await asyncio.wait_for(r.readline(), 10) == b"web-0\n"
            for _, wr in waiting:
                wr.close()
        finally:
            await w.close()
    run(main())


def test_metrics_count_connections_and_active(run):
    async def main():
        w = World()
        pod = await w.pod("web-0")
        cip = rand_ip("127.96")
        port = service_port(cip)
        w.set([service_doc("metered", cip, port), pod_doc("web-0", pod.ip, pod.port)])
        await w.start()
        try:
            c0 = counter(metrics.l4_connections, "default", "metered", "tcp")
            r, wr = await connect(cip, port)
            await r.readline()
            assert counter(metrics.l4_active, "default", "metered", "tcp") == 1
            wr.write(b"12345")
            await r.readexactly(5)
            wr.close()
            await until(lambda: w.mgr.active_connections() == 0, what="the connection to finish")
            assert counter(metrics.l4_connections, "default", "metered", "tcp") == c0 + 1
            assert counter(metrics.l4_active, "default", "metered", "tcp") == 0
            assert counter(metrics.l4_bytes, "default", "metered", "tcp", "tx") >= len("web-0\n12345")
        finally:
            await w.close()
    run(main())
