"""The mesh on a cluster of network namespaces (tests/netns.py): meshed pods with
``meshproxy capture`` applied in their own namespace and ``meshproxy run --sidecar`` running
as the proxy uid beside an unmodified application.

Pods (namespace shop): ``client`` (meshed, ServiceAccount client), ``other`` (meshed, other),
``server`` (meshed, server: the application of tests/mesh_app.py, HTTP on 8080 behind the
Service port 80 with ``appProtocol: http``, a server-first TCP protocol on 9000 behind the
Service port 9000 without one) and ``legacy`` (not meshed: no capture, no sidecar). Policies are
added by rewriting the manifest file every sidecar watches. The tests share one cluster and run
in file order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from mesh_pki import Pki
from netns import Cluster, netns_cluster, requires

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_UID = 1337
ADMIN = ("127.0.0.1", 15000)
SVC = "10.96.0.10"
PODS = {   # name: (node, ip, service account, meshed)
    "client": ("node-a", "10.244.1.10", "client", True),
    "other": ("node-a", "10.244.1.11", "other", True),
    "legacy": ("node-a", "10.244.1.12", "legacy", False),
    "server": ("node-b", "10.244.2.10", "server", True),
}
SERVER_IP = PODS["server"][1]
TD = "cluster.local"


def _pod(name: str) -> str:
    node, ip, sa, meshed = PODS[name]
    ann = "annotations: {meshproxy.dev/inject: enabled}, " if meshed else ""
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, {ann}labels: {{app: {name}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}, {{name: tcp, containerPort: 9000}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
"""


BASE = """apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.77.0.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.77.0.12}]}
""" + "".join(_pod(n) for n in PODS) + f"""---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: shop}}
spec:
  clusterIP: {SVC}
  selector: {{app: server}}
  ports:
  - {{name: http, port: 80, targetPort: http, appProtocol: http}}
  - {{name: tcp, port: 9000, targetPort: tcp}}
"""


def policy_doc(*, mode: str | None = None, allow: str | None = None) -> str:
    out = ""
    if mode:
        out += f"""---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server-mtls, namespace: shop}}
spec: {{selector: {{matchLabels: {{app: server}}}}, mtls: {{mode: {mode}}}}}
"""
    if allow:
        out += f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-callers, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: ["{TD}/ns/shop/sa/{allow}"]}}}}]}}]
"""
    return out


class Mesh:
    """The cluster, the manifest file the sidecars watch, their identity folders."""

    def __init__(self, cluster: Cluster, workdir: str) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.manifest = os.path.join(workdir, "cluster.yaml")
        self.pki = Pki()
        self.sidecars: dict[str, object] = {}
        self.leaf: dict[str, bytes] = {}

    def write(self, extra: str = "") -> None:
        tmp = self.manifest + ".tmp"
        with open(tmp, "w") as f:
            f.write(BASE + extra)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.manifest)

    def identity(self, pod: str, ttl: float = 3600.0) -> bytes:
        d = os.path.join(self.workdir, f"id-{pod}")
        if not os.path.isdir(d):
            os.mkdir(d, 0o700)
        der = self.pki.write(d, "shop", PODS[pod][2], ttl, uid=PROXY_UID)
        self.leaf[pod] = der
        return der

    def start_sidecar(self, pod: str) -> None:
        node, ip, sa, _ = PODS[pod]
        env = dict(os.environ, POD_NAME=pod, POD_NAMESPACE="shop", POD_IP=ip, SERVICE_ACCOUNT=sa,
                   PYTHONPATH=os.path.join(ROOT, "tests") + os.pathsep + ROOT)
        self.sidecars[pod] = self.cluster.start(
            f"shop/{pod}", sys.executable, os.path.join(ROOT, "tests", "run_as.py"), str(PROXY_UID),
            "run", "--sidecar", "-f", self.manifest, "--service-cidr", "10.96.0.0/16", "--proxy-uid", str(PROXY_UID),
            "--identity-dir", os.path.join(self.workdir, f"id-{pod}"), "--admin-listen", "%s:%d" % ADMIN,
            "--no-health-checks", "--log-level", "info", env=env, cwd=ROOT)

    def admin(self, pod: str, path: str) -> tuple[int, bytes]:
        return self.cluster.http_get(f"shop/{pod}", ADMIN[0], ADMIN[1], path, timeout=5)

    def wait_ready(self, pod: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            proc = self.sidecars[pod]
            if not proc.alive():
                pytest.fail(f"sidecar of {pod} exited:\n{proc.output()[-3000:]}")
            try:
                last = self.admin(pod, "/readyz")
                if last[0] == 200:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        pytest.fail(f"sidecar of {pod} not ready: {last}\n{self.sidecars[pod].output()[-3000:]}")

    def curl(self, pod: str, url: str, *args: str) -> tuple[int, dict | str]:
        r = self.cluster.run(f"shop/{pod}", "curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args, url)
        body, _, code = r.stdout.rpartition("\n")
        try:
            return int(code or 0), json.loads(body)
        except ValueError:
            return int(code or 0), body

    def metrics(self, pod: str) -> str:
        return self.admin(pod, "/metrics")[1].decode()


@pytest.fixture(scope="module")
def mesh():
    requires("curl")
    requires("nft")
    workdir = tempfile.mkdtemp(prefix="mesh-")
    os.chmod(workdir, 0o755)
    try:
        with netns_cluster(BASE) as cluster:
            m = Mesh(cluster, workdir)
            m.write()
            for pod in ("client", "other", "server"):
                r = cluster.run(f"shop/{pod}", sys.executable, "-m", "meshproxy", "capture", "--proxy-uid",
                                str(PROXY_UID), "--exclude-ports", str(ADMIN[1]))
                assert r.returncode == 0, r.stderr
                m.identity(pod)
            app = cluster.start("shop/server", sys.executable, os.path.join(ROOT, "tests", "mesh_app.py"), "server",
                                "--addr", SERVER_IP)
            for pod in ("client", "other", "server"):
                m.start_sidecar(pod)
            deadline = time.monotonic() + 10
            while "ready" not in app.output() and time.monotonic() < deadline:
                time.sleep(0.05)
            for pod in ("client", "other", "server"):
                m.wait_ready(pod)
            yield m
            for pod, proc in m.sidecars.items():
                assert "Traceback" not in proc.output(), f"{pod}:\n{proc.output()[-4000:]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- packet capture ----------------------------------------------------------------------------

@contextlib.contextmanager
def pcap(cluster: Cluster, where: str, bpf: str):
    """tcpdump on ``where``'s eth0 while the block runs; yields a list that gets the TCP
    payloads seen, as (src, sport, dst, dport, bytes)."""
    requires("tcpdump")
    path = os.path.join(tempfile.mkdtemp(prefix="pcap-"), "cap.pcap")
    proc = cluster.start(where, "tcpdump", "-Z", "root", "--immediate-mode", "-i", "eth0", "-n", "-U", "-s", "0",
                         "-w", path, bpf)
    deadline = time.monotonic() + 5
    while "listening on" not in proc.output() and proc.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    out: list = []
    try:
        yield out
    finally:
        time.sleep(0.2)
        cluster.stop(proc, signal.SIGINT)
        out.extend(_payloads(path))
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _payloads(path: str) -> list[tuple[str, int, str, int, bytes]]:
    """TCP payloads of an Ethernet pcap file (IPv4)."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack("<I", data[pos + 8:pos + 12])[0]
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:total]
        off = (tcp[12] >> 4) * 4
        payload = tcp[off:]
        if payload:
            out.append((socket.inet_ntoa(ip[12:16]), struct.unpack("!H", tcp[0:2])[0],
                        socket.inet_ntoa(ip[16:20]), struct.unpack("!H", tcp[2:4])[0], payload))
    return out


def _tls_records(data: bytes) -> list[int]:
    """The content types of the TLS records ``data`` is made of; AssertionError if it is
    anything else (a capture starts at a record boundary: between requests)."""
    types = []
    pos = 0
    while pos < len(data):
        assert data[pos] in (20, 21, 22, 23) and data[pos + 1] == 3, f"not a TLS record at {pos}: {data[pos:pos + 16]!r}"
        types.append(data[pos])
        pos += 5 + int.from_bytes(data[pos + 3:pos + 5], "big")
    return types


def _streams(payloads, port: int) -> dict[tuple, bytes]:
    """Client-to-server bytes per connection to ``port``."""
    out: dict[tuple, bytes] = {}
    for src, sport, _dst, dport, data in payloads:
        if dport == port:
            out[(src, sport)] = out.get((src, sport), b"") + data
    return out


# -- the tests -------------------------------------------------------------------------------------

def _xfcc(mesh: Mesh, caller: str) -> str:
    return (f"By=spiffe://{TD}/ns/shop/sa/server;Hash={hashlib.sha256(mesh.leaf[caller]).hexdigest()};"
            f"URI=spiffe://{TD}/ns/shop/sa/{caller}")


def test_tls_on_the_wire_is_1_3_with_the_mesh_alpn(mesh):
    # First in the file: the sidecars have no pooled connection yet, so both handshakes are seen.
    requires("tshark")
    path = os.path.join(tempfile.mkdtemp(prefix="pcap-"), "cap.pcap")
    try:
        proc = mesh.cluster.start("shop/server", "tcpdump", "-Z", "root", "--immediate-mode", "-i", "eth0", "-n",
                                  "-U", "-s", "0", "-w", path, "tcp port 8080 or tcp port 9000")
        deadline = time.monotonic() + 5
        while "listening on" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mesh.curl("client", f"http://{SVC}/")[0] == 200
        s = mesh.cluster.connect("shop/client", (SVC, 9000))
        s.recv(100)
        s.close()
        time.sleep(0.2)
        mesh.cluster.stop(proc, signal.SIGINT)
        r = subprocess.run(["tshark", "-r", path, "-d", "tcp.port==8080,tls", "-d", "tcp.port==9000,tls", "-Y", "tls.handshake.type == 2 || tls.handshake.type == 1",
                            "-T", "fields", "-e", "tls.handshake.type", "-e", "tls.handshake.extensions.supported_version",
                            "-e", "tls.handshake.extensions_alpn_str"], capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    lines = [line.split("\t") for line in r.stdout.splitlines() if line.strip()]
    hellos = [x for x in lines if x[0] == "1"]
    servers = [x for x in lines if x[0] == "2"]
    assert hellos and servers, r.stdout + r.stderr
    assert all("0x0304" in x[1] for x in servers), servers          # the server chose TLS 1.3
    alpns = {x[2] for x in hellos}
    assert "http/1.1" in alpns and "meshproxy.dev/tcp" in alpns, alpns


def test_unmodified_curl_reaches_the_server_through_both_sidecars_over_mutual_tls(mesh):
    with pcap(mesh.cluster, "shop/server", "tcp port 8080") as seen:
        code, body = mesh.curl("client", f"http://{SVC}/hello?x=1", "-H", "X-Forwarded-Client-Cert: By=forged;URI=spiffe://evil")
    assert code == 200, body
    assert body["name"] == "server" and body["path"] == "/hello?x=1"
    # The caller's verified identity, in Envoy's format; the client's own value was replaced.
    assert body["headers"]["x-forwarded-client-cert"] == _xfcc(mesh, "client")
    # On the wire between the pods: a TLS handshake first (no preamble), never plaintext HTTP.
    streams = _streams(seen, 8080)
    assert streams, "no connection to the server pod was captured"
    for (src, _), data in streams.items():
        assert src == PODS["client"][1]
        # TLS records only: a new connection starts with the handshake (no preamble), a pooled
        # one (made by an earlier test) carries application-data records.
        types = _tls_records(data)
        assert types[0] == 22 or set(types) == {23}, types
    wire = b"".join(p[4] for p in seen)
    for plain in (b"GET /hello", b"HTTP/1.1", b"x-forwarded-client-cert", b"forged", b"server"):
        assert plain not in wire


def test_a_meshed_client_calling_the_pod_address_gets_mutual_tls_and_its_identity_through(mesh):
    # Not through the Service: the client's sidecar relays the bytes (one connection, mTLS);
    # the server's sidecar serves its HTTP port per request all the same.
    with pcap(mesh.cluster, "shop/server", "tcp port 8080") as seen:
        code, body = mesh.curl("client", f"http://{SERVER_IP}:8080/direct")
    assert code == 200 and body["path"] == "/direct"
    assert body["headers"]["x-forwarded-client-cert"] == _xfcc(mesh, "client")
    streams = _streams(seen, 8080)
    assert streams and all(_tls_records(d)[0] == 22 for d in streams.values())
    assert b"GET /direct" not in b"".join(p[4] for p in seen)


def test_opaque_tcp_port_is_relayed_inside_mutual_tls(mesh):
    with pcap(mesh.cluster, "shop/server", "tcp port 9000") as seen:
        s = mesh.cluster.connect("shop/client", (SVC, 9000))
        try:
            banner = s.recv(100)                  # the server speaks first: nothing waits for the client
            s.sendall(b"opaque-bytes-123")
            echo = b""
            while len(echo) < 16:
                chunk = s.recv(100)
                if not chunk:
                    break
                echo += chunk
            s.shutdown(socket.SHUT_WR)            # half-close reaches the server, which says bye
            rest = b""
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break
                rest += chunk
        finally:
            s.close()
    # The application sees its own sidecar's connection from the pod's own address.
    assert banner == f"server {SERVER_IP}\n".encode()
    assert echo == b"opaque-bytes-123" and rest == b"bye\n"
    streams = _streams(seen, 9000)
    assert streams and all(_tls_records(d)[0] == 22 for d in streams.values())
    assert b"opaque-bytes-123" not in b"".join(p[4] for p in seen)


def test_http_is_balanced_per_request_over_a_pooled_connection(mesh):
    # Several requests from the client pod reuse the sidecars' pooled mTLS connection: one
    # TLS connection between the pods for many requests.
    with pcap(mesh.cluster, "shop/server", "tcp port 8080") as seen:
        for _ in range(5):
            assert mesh.curl("client", f"http://{SVC}/")[0] == 200
    assert len(_streams(seen, 8080)) <= 1


ROUTE = """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server-v2, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-route, value: v2}]}}]
    backendRefs: [{name: server, port: 80}]
"""


def test_a_route_attached_to_the_service_applies_to_the_next_request_of_an_open_connection(mesh):
    import http.client
    conn = http.client.HTTPConnection(SVC, 80, timeout=10)
    conn.sock = mesh.cluster.connect("shop/client", (SVC, 80))
    try:
        def get() -> dict:
            conn.request("GET", "/keep")
            r = conn.getresponse()
            assert r.status == 200
            return json.loads(r.read())
        assert "x-route" not in get()["headers"]
        mesh.write(ROUTE)
        deadline = time.monotonic() + 15
        seen = None
        while time.monotonic() < deadline:
            seen = get()["headers"]           # the same keep-alive connection every time
            if seen.get("x-route") == "v2":
                break
            time.sleep(0.2)
        assert seen.get("x-route") == "v2", seen
        assert seen["x-forwarded-client-cert"] == _xfcc(mesh, "client")
    finally:
        conn.close()
        mesh.write()


def test_other_destinations_pass_through_and_unused_service_addresses_are_refused(mesh):
    # Outside the cluster (the fixture's outside client namespace, which needs a way back to
    # node-a's pods): passed through as it is.
    mesh.cluster.route("client", f"{PODS['client'][1]}/32", "10.77.0.11")
    outside = mesh.cluster.start("client", sys.executable, os.path.join(ROOT, "tests", "mesh_app.py"), "outside",
                                 "--addr", "10.77.0.100", "--http", "8000", "--tcp", "8001")
    try:
        deadline = time.monotonic() + 10
        while "ready" not in outside.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, body = mesh.curl("client", "http://10.77.0.100:8000/out", "-H", "X-Forwarded-Client-Cert: kept")
        assert code == 200 and body["name"] == "outside"
        # Untouched: no mesh headers were added or removed on the way out.
        assert body["headers"]["x-forwarded-client-cert"] == "kept" and "x-request-id" not in body["headers"]
        assert body["peer"] == PODS["client"][1]
    finally:
        mesh.cluster.stop(outside)
    # An address of the service range that no Service has: refused at once, as kube-proxy does.
    s = mesh.cluster.connect("shop/client", ("10.96.0.99", 80))
    try:
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
    finally:
        s.close()
    assert got == b""


def _wait(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"{what}: still not so after {timeout:g}s ({last!r})")


def test_authorization_policy_allows_one_identity_and_denies_another(mesh):
    mesh.write(policy_doc(allow="client"))
    try:
        _wait(lambda: mesh.curl("other", f"http://{SVC}/")[0] == 403, "policy applied")
        code, body = mesh.curl("other", f"http://{SVC}/")
        assert code == 403 and "RBAC: access denied" in body
        code, body = mesh.curl("client", f"http://{SVC}/")
        assert code == 200 and body["headers"]["x-forwarded-client-cert"].endswith("/sa/client")
        # TCP: the denied caller's connection is closed before the application sees a byte.
        s = mesh.cluster.connect("shop/other", (SVC, 9000))
        try:
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
        finally:
            s.close()
        assert got == b""
        s = mesh.cluster.connect("shop/client", (SVC, 9000))
        try:
            assert s.recv(100).startswith(b"server ")
        finally:
            s.close()
        text = mesh.metrics("server")
        # "not_allowed": no ALLOW policy matched (so no policy decided it).
        assert (f'meshproxy_mesh_authz_decisions_total{{client_id="spiffe://{TD}/ns/shop/sa/other",decision="deny",'
                f'policy="",protocol="http",reason="not_allowed"}}') in text
        assert (f'meshproxy_mesh_authz_decisions_total{{client_id="spiffe://{TD}/ns/shop/sa/client",decision="allow",'
                f'policy="shop/server-callers",protocol="http",reason="allow_policy"}}') in text
        assert f'client_id="spiffe://{TD}/ns/shop/sa/other",decision="deny",policy="",protocol="tcp"' in text
    finally:
        mesh.write()
    _wait(lambda: mesh.curl("other", f"http://{SVC}/")[0] == 200, "policy removed")


def test_strict_refuses_an_unmeshed_client_and_permissive_accepts_it(mesh):
    url = f"http://{SERVER_IP}:8080/"
    # No PeerAuthentication: PERMISSIVE. The legacy pod has no sidecar and speaks plaintext;
    # whatever it says in x-forwarded-client-cert is removed.
    code, body = mesh.curl("legacy", url, "-H", "X-Forwarded-Client-Cert: By=forged;URI=spiffe://cluster.local/ns/shop/sa/client")
    assert code == 200 and "x-forwarded-client-cert" not in body["headers"], body
    assert body["headers"]["x-forwarded-for"] == PODS["legacy"][1]     # the caller's own address
    mesh.write(policy_doc(mode="STRICT"))
    try:
        _wait(lambda: mesh.curl("legacy", url)[0] == 0, "STRICT applied")
        s = mesh.cluster.socket("shop/legacy")
        s.settimeout(5)
        try:
            s.connect((SERVER_IP, 9000))
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
        finally:
            s.close()
        assert got == b""
        # Meshed callers still get through.
        assert mesh.curl("client", f"http://{SVC}/")[0] == 200
        assert 'meshproxy_mesh_peer_authentication_total{mode="STRICT",result="refused",tls="plaintext"}' in mesh.metrics("server")
        mesh.write(policy_doc(mode="PERMISSIVE"))
        _wait(lambda: mesh.curl("legacy", url)[0] == 200, "PERMISSIVE applied")
    finally:
        mesh.write()


def test_sixty_second_svids_rotate_under_load_without_a_failed_request(mesh):
    failures: list = []
    hashes: set[str] = set()
    done = threading.Event()
    counts = [0]

    def load() -> None:
        # New connections (each curl) and a keep-alive connection, side by side.
        while not done.is_set():
            code, body = mesh.curl("client", f"http://{SVC}/load")
            counts[0] += 1
            if code != 200:
                failures.append((code, body))
            else:
                hashes.add(body["headers"]["x-forwarded-client-cert"].split(";")[1])
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        rotations = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            for pod in ("client", "server"):
                mesh.identity(pod, ttl=60)
            rotations += 1
            time.sleep(1.0)
        # A few more requests after the last rotation (new connections use the newest SVID).
        time.sleep(1.5)
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert counts[0] >= 20
    # New handshakes presented new SVIDs: the server saw several client certificates.
    assert len(hashes) >= 3, hashes
    ident = json.loads(mesh.admin("client", "/debug/identity")[1])
    from mesh_pki import not_after
    assert ident["not_after"] == not_after(mesh.leaf["client"]).strftime("%Y-%m-%dT%H:%M:%SZ")
