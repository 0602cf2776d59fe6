"""Gateway API end to end: ``meshproxy run -f`` with Gateways on their own 127.0.x.y addresses,
real backends (tests/backends.py) as the pods of the conformance layout, plain HTTP clients.

HTTP listeners (Gateway and mesh) are served by the L7 server (l7/server.py, l7/exchange.py)
from ``Snapshot.http_listeners``; TCPRoute and TLSRoute by the L4 pump; status is checked in
/debug/snapshot.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time

import pytest

from backends import Backend
from gateway_fixtures import APP, INFRA, WEB, gateway_yaml, http_listener
from proc import Meshproxy, free_port

GW_SAME, GW_ALL, GW_SEL, GW_ISO, GW_TLS = "127.0.60.1", "127.0.60.2", "127.0.60.3", "127.0.60.4", "127.0.60.5"
GW_HTTPS = "127.0.60.6"
MESH_IP = "127.96.60.1"


def pods(name: str, ns: str, backends: list[Backend]) -> str:
    docs = []
    for i, b in enumerate(backends):
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}-{i}, namespace: {ns}, labels: {{app: {name}}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {b.port}}}]}}]}}
status: {{podIP: {b.host}, conditions: [{{type: Ready, status: "True"}}]}}
""")
    docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080, targetPort: http}}]
""")
    return "---\n".join(docs)


def httproute(name: str, ns: str, parent: str, body: str, parent_ns: str | None = None) -> str:
    pns = f", namespace: {parent_ns}" if parent_ns else ""
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{{name: {parent}{pns}}}]
{body}"""


class Cluster:
    def __init__(self, tmp, port: int) -> None:
        self.port = port
        trustme = pytest.importorskip("trustme")
        self.ca = trustme.CA()
        self.certs = {name: self.ca.issue_cert(*hosts) for name, hosts in
                      (("wild", ("*.example.com",)), ("dflt", ("default.test",)))}
        self.backends: dict[str, Backend] = {}
        addrs = {"infra-backend-v1": "127.0.61.1", "infra-backend-v2": "127.0.61.2", "infra-backend-v3": "127.0.61.3",
                 "web-backend": "127.0.61.4", "app-backend-v1": "127.0.61.5", "tcp-backend": "127.0.61.6"}
        for name, addr in addrs.items():
            self.backends[name] = Backend(addr, name=name)
        self.tcp = [_TcpEcho("127.0.61.7", b"tcp-a"), _TcpEcho("127.0.61.8", b"tcp-b")]
        self.path = os.path.join(tmp, "gateway.yaml")
        with open(self.path, "w") as f:
            f.write(self.manifests())

    def manifests(self) -> str:
        p = self.port
        b = self.backends
        docs = [
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {INFRA}}}",
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {WEB}, labels: {{gateway-conformance: backend}}}}",
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {APP}, labels: {{gateway-conformance: backend}}}}",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: meshproxy}\n"
            "spec: {controllerName: meshproxy.dev/gateway-controller}",
            pods("infra-backend-v1", INFRA, [b["infra-backend-v1"]]), pods("infra-backend-v2", INFRA, [b["infra-backend-v2"]]),
            pods("infra-backend-v3", INFRA, [b["infra-backend-v3"]]), pods("web-backend", WEB, [b["web-backend"]]),
            pods("app-backend-v1", APP, [b["app-backend-v1"]]),
            gateway_yaml("same-namespace", GW_SAME, http_listener(p, "Same")),
            gateway_yaml("all-namespaces", GW_ALL, http_listener(p, "All")),
            gateway_yaml("backend-namespaces", GW_SEL, http_listener(
                p, "Selector", extra="        selector: {matchLabels: {gateway-conformance: backend}}\n")),
            gateway_yaml("isolation", GW_ISO, "".join(
                f"  - {{name: {n}, port: {p}, protocol: HTTP{', hostname: ' + repr(h) if h else ''}}}\n"
                for n, h in (("empty", None), ("wild", "*.example.com"), ("wild-foo", "*.foo.example.com"),
                             ("abc", "abc.foo.example.com")))),
            httproute("matching", INFRA, "same-namespace", """  rules:
  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /exact}, method: POST}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 301,
               path: {type: ReplacePrefixMatch, replacePrefixMatch: /elsewhere}}}]
  - matches: [{path: {type: PathPrefix, value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
  - matches: [{path: {type: PathPrefix, value: /rewrite}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: rewritten.example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Set, value: set}], add: [{name: X-Add, value: added}], remove: [X-Remove]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Resp, value: "yes"}]}
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /weights}}]
    backendRefs: [{name: infra-backend-v1, port: 8080, weight: 70}, {name: infra-backend-v2, port: 8080, weight: 30},
                  {name: infra-backend-v3, port: 8080, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: does-not-exist, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /no-grant}}]
    backendRefs: [{name: app-backend-v1, namespace: gateway-conformance-app-backend, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /granted}}]
    backendRefs: [{name: web-backend, namespace: gateway-conformance-web-backend, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /fault}}]
    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, kind: FaultInjection, name: always-503}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /host-only}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
  - matches: [{path: {type: PathPrefix, value: /strip}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /zero}}]
    backendRefs: [{name: infra-backend-v1, port: 8080, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v2, port: 8080}}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
"""),
            f"""apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: web, namespace: {WEB}}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {INFRA}}}]
  to: [{{group: "", kind: Service, name: web-backend}}]""",
            f"""apiVersion: meshproxy.dev/v1alpha1
kind: FaultInjection
metadata: {{name: always-503, namespace: {INFRA}}}
spec: {{abort: {{httpStatus: 503, percentage: 100}}}}""",
            httproute("cross-namespace", WEB, "backend-namespaces", """  rules:
  - backendRefs: [{name: web-backend, port: 8080}]
""", parent_ns=INFRA),
            httproute("not-allowed", WEB, "same-namespace", """  rules:
  - backendRefs: [{name: web-backend, port: 8080}]
""", parent_ns=INFRA),
        ]
        for n in ("empty", "wild", "wild-foo", "abc"):
            docs.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: iso-{n}, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: isolation, sectionName: {n}}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /{n}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]""")
        # HTTPS: a wildcard listener and a default one on one port, each with its certificate.
        for name, cert in self.certs.items():
            crt = "".join("    " + line + "\n" for line in cert.cert_chain_pems[0].bytes().decode().splitlines())
            key = "".join("    " + line + "\n" for line in cert.private_key_pem.bytes().decode().splitlines())
            docs.append(f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {INFRA}}}\n"
                        f"type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{crt}  tls.key: |\n{key}")
        docs.append(gateway_yaml("https", GW_HTTPS, (
            f"  - {{name: wild, port: {p}, protocol: HTTPS, hostname: '*.example.com', "
            "tls: {certificateRefs: [{name: wild}]}}\n"
            f"  - {{name: dflt, port: {p}, protocol: HTTPS, tls: {{certificateRefs: [{{name: dflt}}]}}}}\n")))
        for n, backend in (("wild", "infra-backend-v1"), ("dflt", "infra-backend-v2")):
            docs.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: https-{n}, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: https, sectionName: {n}}}]
  rules: [{{backendRefs: [{{name: {backend}, port: 8080}}]}}]""")
        # Mesh: a canary by header and a 90/10 split behind one ClusterIP.
        docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {INFRA}}}
spec:
  clusterIP: {MESH_IP}
  selector: {{app: infra-backend-v1}}
  ports: [{{name: http, port: {p}, targetPort: http}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-canary, namespace: {INFRA}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: {p}}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: "yes"}}]}}]
    backendRefs: [{{name: infra-backend-v3, port: 8080}}]
  - backendRefs: [{{name: infra-backend-v1, port: 8080, weight: 90}}, {{name: infra-backend-v2, port: 8080, weight: 10}}]""")
        # L4: a TCPRoute with a 50/50 split on a TCP listener.
        t1, t2 = self.tcp
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: tcp-a, namespace: {INFRA}, labels: {{app: tcp-a}}}}
spec: {{containers: [{{name: c, ports: [{{name: tcp, containerPort: {t1.port}}}]}}]}}
status: {{podIP: {t1.host}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: tcp-b, namespace: {INFRA}, labels: {{app: tcp-b}}}}
spec: {{containers: [{{name: c, ports: [{{name: tcp, containerPort: {t2.port}}}]}}]}}
status: {{podIP: {t2.host}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: tcp-a, namespace: {INFRA}}}
spec: {{selector: {{app: tcp-a}}, ports: [{{port: 3000, targetPort: tcp}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: tcp-b, namespace: {INFRA}}}
spec: {{selector: {{app: tcp-b}}, ports: [{{port: 3000, targetPort: tcp}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: tcp, namespace: {INFRA}}}
spec:
  gatewayClassName: meshproxy
  addresses: [{{value: {GW_TLS}}}]
  listeners:
  - {{name: tcp, port: {p}, protocol: TCP}}
  - {{name: tls, port: {p + 1}, protocol: TLS, tls: {{mode: Passthrough}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {{name: split, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: tcp, sectionName: tcp}}]
  rules: [{{backendRefs: [{{name: tcp-a, port: 3000, weight: 1}}, {{name: tcp-b, port: 3000, weight: 1}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {{name: by-sni-a, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: tcp, sectionName: tls}}]
  hostnames: [a.example.com]
  rules: [{{backendRefs: [{{name: tcp-a, port: 3000}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {{name: by-sni-b, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: tcp, sectionName: tls}}]
  hostnames: ["*.b.example.com"]
  rules: [{{backendRefs: [{{name: tcp-b, port: 3000}}]}}]""")
        return "\n---\n".join(docs) + "\n"

    def stop(self) -> None:
        for b in self.backends.values():
            b.stop()
        for t in self.tcp:
            t.stop()


class _TcpEcho:
    """Answers every connection with its tag, then echoes what it reads."""

    def __init__(self, host: str, tag: bytes) -> None:
        import threading
        self.tag = tag
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.settimeout(5)
            try:
                c.sendall(self.tag)
                data = c.recv(65536)
                if data:
                    c.sendall(data)
            except OSError:
                pass
            finally:
                c.close()

    def stop(self) -> None:
        self.sock.close()
        self.t.join(timeout=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port(GW_SAME)
    c = Cluster(str(tmp_path_factory.mktemp("gw")), port)
    mp = Meshproxy([c.path], "--service-cidr", "127.96.0.0/16")
    try:
        mp.start()
        c.mp = mp
        yield c
    finally:
        try:
            mp.stop()
        finally:
            c.stop()


def call(addr: str, port: int, path: str, host: str = "example.com", method: str = "GET",
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(addr, port, timeout=10)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def backend_of(addr: str, port: int, path: str, **kw) -> str:
    status, _, body = call(addr, port, path, **kw)
    assert status == 200, (status, body[:200])
    return json.loads(body)["backend"]


# -- status (served by the control plane: no L7 server needed) ---------------------------------------

def test_status_in_debug_snapshot(cluster):
    data = cluster.mp.snapshot()
    st = {(s["kind"], s["namespace"], s["name"]): s["status"] for s in data["gatewayStatus"]}
    gw = st[("Gateway", INFRA, "same-namespace")]
    assert [c["status"] for c in gw["conditions"]] == ["True", "True"]
    assert gw["addresses"] == [{"type": "IPAddress", "value": GW_SAME}]
    parents = st[("HTTPRoute", WEB, "not-allowed")]["parents"]
    assert parents[0]["conditions"][0]["reason"] == "NotAllowedByListeners"
    resolved = st[("HTTPRoute", INFRA, "matching")]["parents"][0]["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    assert any("does-not-exist not found (BackendNotFound)" in p for p in data["problems"])
    assert f"{GW_SAME}:{cluster.port}" in {x["address"] for x in data["httpListeners"]}
    assert f"{MESH_IP}:{cluster.port}" not in {x["address"] for x in data["listeners"]}   # mesh port: L7


# -- HTTP -------------------------------------------------------------------------------------------

def test_matching_and_precedence(cluster):
    p = cluster.port
    assert backend_of(GW_SAME, p, "/") == "infra-backend-v1"
    assert backend_of(GW_SAME, p, "/v2/example") == "infra-backend-v2"
    assert backend_of(GW_SAME, p, "/v2example") == "infra-backend-v1"
    assert backend_of(GW_SAME, p, "/", headers={"Version": "two"}) == "infra-backend-v2"
    assert backend_of(GW_SAME, p, "/exact", method="POST") == "infra-backend-v3"
    assert backend_of(GW_SAME, p, "/exact") == "infra-backend-v1"
    assert backend_of(GW_SAME, p, "/q?animal=whale") == "infra-backend-v3"
    assert backend_of(GW_SAME, p, "/q?animal=dolphin") == "infra-backend-v1"


def test_redirects(cluster):
    status, h, _ = call(GW_SAME, cluster.port, "/redirect/a?x=1")
    assert (status, h["location"]) == (301, "https://example.org/elsewhere/a?x=1")
    status, h, _ = call(GW_SAME, cluster.port, "/port", host="example.com:1234")
    assert (status, h["location"]) == (302, "http://example.com:8083/port")


def test_rewrite_and_header_filters(cluster):
    status, h, body = call(GW_SAME, cluster.port, "/rewrite/one?k=v", headers={"X-Remove": "x", "X-Add": "first"})
    assert status == 200 and h.get("x-resp") == "yes"
    seen = json.loads(body)
    assert seen["target"] == "/new/one?k=v"
    headers = [(n.lower(), v) for n, v in seen["headers"]]
    assert ("host", "rewritten.example.org") in headers and ("x-set", "set") in headers
    assert [v for n, v in headers if n == "x-add"] == ["first", "added"]
    assert not any(n == "x-remove" for n, _ in headers)


def test_weights(cluster):
    counts: dict[str, int] = {}
    for _ in range(200):
        b = backend_of(GW_SAME, cluster.port, "/weights")
        counts[b] = counts.get(b, 0) + 1
    # 70/30 over 200 requests: 140 expected, 4 standard deviations is +-26.
    assert 114 <= counts.get("infra-backend-v1", 0) <= 166, counts
    assert "infra-backend-v3" not in counts


def test_404_500_and_references(cluster):
    p = cluster.port
    assert call(GW_SAME, p, "/missing")[0] == 500
    assert call(GW_SAME, p, "/no-grant")[0] == 500
    assert backend_of(GW_SAME, p, "/granted") == "web-backend"
    assert backend_of(GW_SEL, p, "/") == "web-backend"              # route in a selected namespace
    assert call(GW_ALL, p, "/")[0] == 404                             # nothing attached: 404
    assert call(GW_SAME, p, "/fault")[0] == 503


def test_listener_isolation(cluster):
    owner = {"bar.com": "empty", "bar.example.com": "wild", "bar.foo.example.com": "wild-foo",
             "abc.foo.example.com": "abc"}
    for host, listener in owner.items():
        for path in owner.values():
            status = call(GW_ISO, cluster.port, f"/{path}", host=host)[0]
            assert status == (200 if path == listener else 404), (host, path, status)


def test_mesh_canary_and_split_through_one_cluster_ip(cluster):
    assert backend_of(MESH_IP, cluster.port, "/", host="echo", headers={"x-canary": "yes"}) == "infra-backend-v3"
    counts: dict[str, int] = {}
    for _ in range(200):
        b = backend_of(MESH_IP, cluster.port, "/", host="echo")
        counts[b] = counts.get(b, 0) + 1
    assert 162 <= counts.get("infra-backend-v1", 0) <= 198, counts     # 90 % of 200 +- 4 sigma
    assert set(counts) <= {"infra-backend-v1", "infra-backend-v2"}


# -- L4: TCPRoute and TLSRoute ------------------------------------------------------------------------

def _tcp_tag(addr: str, port: int, hello: bytes = b"ping") -> bytes:
    with socket.create_connection((addr, port), timeout=5) as s:
        s.sendall(hello)
        data = b""
        while len(data) < 5:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data[:5]


def test_tcp_route_weighted_split(cluster):
    seen = {_tcp_tag(GW_TLS, cluster.port) for _ in range(40)}
    assert seen == {b"tcp-a", b"tcp-b"}


def _client_hello(server_name: str) -> bytes:
    """A real ClientHello for ``server_name`` (the TLS library writes it; nothing answers it)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_more_redirects_rewrites_and_zero_weights(cluster):
    p = cluster.port
    status, h, _ = call(GW_SAME, p, "/host-only/x", host=f"example.com:{p}")
    assert (status, h["location"]) == (302, f"http://example.org:{p}/host-only/x")   # the listener's port
    seen = json.loads(call(GW_SAME, p, "/strip/three")[2])
    assert seen["target"] == "/three"
    assert json.loads(call(GW_SAME, p, "/strip")[2])["target"] == "/"
    assert call(GW_SAME, p, "/zero")[0] == 500


def test_request_mirror(cluster):
    mirror = cluster.backends["infra-backend-v2"]
    before = mirror.requests        # (``seen`` keeps only the last 50 heads)
    assert backend_of(GW_SAME, cluster.port, "/mirror/me") == "infra-backend-v1"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and mirror.requests == before:
        time.sleep(0.02)
    assert mirror.requests == before + 1
    assert mirror.seen[-1][1] == "/mirror/me"


class _Https:
    def __init__(self, cluster) -> None:
        self.ctx = ssl.create_default_context()
        cluster.ca.configure_trust(self.ctx)
        self.ctx.check_hostname = False
        self.port = cluster.port

    def get(self, server_name: str, host: str) -> tuple[int, str, str]:
        raw = socket.create_connection((GW_HTTPS, self.port), timeout=5)
        with self.ctx.wrap_socket(raw, server_hostname=server_name) as s:
            cert = s.getpeercert()
            names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        backend = json.loads(body)["backend"] if status == 200 else ""
        return status, backend, names[0]


def test_https_listeners_by_sni_and_host(cluster):
    c = _Https(cluster)
    assert c.get("a.example.com", "a.example.com") == (200, "infra-backend-v1", "*.example.com")
    assert c.get("other.test", "other.test") == (200, "infra-backend-v2", "default.test")



def test_https_wildcard_certificate_covers_several_labels(cluster):
    assert _Https(cluster).get("a.b.example.com", "a.b.example.com")[2] == "*.example.com"



def test_https_misdirected_request_gets_421(cluster):
    assert _Https(cluster).get("a.example.com", "other.test")[0] == 421


@pytest.mark.parametrize("sni, tag", [("a.example.com", b"tcp-a"), ("x.y.b.example.com", b"tcp-b"), ("c.example.com", None)])
def test_tls_route_passthrough_by_sni(cluster, sni, tag):
    hello = _client_hello(sni)
    if tag is None:
        # No route for this name: the gateway resets the connection without forwarding anything.
        with socket.create_connection((GW_TLS, cluster.port + 1), timeout=5) as s:
            s.sendall(hello)
            assert _read_all(s) == b"<RST>"
        return
    assert _tcp_tag(GW_TLS, cluster.port + 1, hello) == tag


def _read_all(s: socket.socket) -> bytes:
    out = b""
    for _ in range(100):
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return out + b"<RST>"
        if not chunk:
            return out
        out += chunk
    return out
