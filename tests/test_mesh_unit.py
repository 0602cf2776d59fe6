"""The sidecar's decisions without the namespace cluster: where a captured connection goes
(``meshproxy.core.mesh.classify``), which destinations are meshed and with what identity, the
pod's own policy and HTTP ports, the --sidecar settings, and the HTTP pool's security hook
over real loopback TLS (connections of different identities never mix)."""

from __future__ import annotations

import asyncio

import pytest
from fakes import snapshot_for
from mesh_pki import Pki

from l7.upstream import UpstreamPool, UpstreamSecurity
from meshproxy.cli import build_parser, settings_from_args
from meshproxy.core.identity import IdentityError, SpiffeId, client_context, peer_identity, server_context
from meshproxy.core.mesh import HTTP, LOOP, PASSTHROUGH, POD, REJECT, TCP, classify, looks_like_http
from meshproxy.core.policy import DISABLE, PERMISSIVE, STRICT
from meshproxy.core.settings import Settings

MANIFESTS = """
apiVersion: v1
kind: Pod
metadata: {name: me, namespace: shop, labels: {app: web}, annotations: {meshproxy.dev/inject: enabled}}
spec: {serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: db, containerPort: 5432}]}]}
status: {podIP: 10.1.0.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}, annotations: {meshproxy.dev/inject: enabled}}
spec: {serviceAccountName: api, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: shop, labels: {app: old}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: quiet-1, namespace: other, labels: {app: quiet}, annotations: {meshproxy.dev/inject: enabled}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.4, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.5
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, appProtocol: http}, {name: db, port: 5432, targetPort: db}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.6
  selector: {app: api}
  ports: [{name: grpc-ish, port: 9000, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: quiet, namespace: other}
spec: {mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {"5432": {mode: PERMISSIVE}}}
"""


def sidecar_settings(**kw) -> Settings:
    s = Settings(service_cidr="10.96.0.0/16", sidecar=True, pod_name="me", pod_namespace="shop", pod_ip="10.1.0.1",
                 service_account="web")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@pytest.fixture(scope="module")
def snap():
    return snapshot_for(MANIFESTS, sidecar_settings())


@pytest.mark.parametrize("ip,port,kind,detail", [
    ("10.96.0.5", 80, HTTP, "Service shop/web:http"),          # appProtocol http: per request
    ("10.96.0.5", 5432, TCP, ("shop", "web", "db")),           # no appProtocol: opaque, per connection
    ("10.96.0.6", 9000, TCP, ("shop", "api", "grpc-ish")),
    ("10.1.0.2", 8080, POD, "api-1"),                            # a pod addressed directly
    ("10.1.0.3", 8080, POD, "old-1"),
    ("10.96.0.77", 80, REJECT, None),                            # the service range, no Service there
    ("10.96.0.5", 81, REJECT, None),                             # a Service address, not one of its ports
    ("93.184.216.34", 443, PASSTHROUGH, None),                   # outside the cluster
    ("127.0.0.1", 15001, LOOP, None),                            # our own outbound port
])
def test_where_a_captured_connection_goes(snap, ip, port, kind, detail):
    d = classify(snap, ip, port, {("127.0.0.1", 15001)})
    assert d.kind == kind
    if kind == HTTP:
        assert d.listener.name == detail
    elif kind == TCP:
        assert d.backend_key == detail
    elif kind == POD:
        assert d.pod.name == detail


def test_meshed_destinations_and_their_identities(snap):
    mesh = snap.mesh
    api, old, quiet = (mesh.pods_by_ip[ip] for ip in ("10.1.0.2", "10.1.0.3", "10.1.0.4"))
    assert api.meshed and api.identity == SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/api")
    assert not old.meshed and old.identity is None
    # A meshed pod without a ServiceAccount name is "default".
    assert quiet.identity == SpiffeId.parse("spiffe://cluster.local/ns/other/sa/default")
    assert mesh.mtls_to(api, 8080)
    assert not mesh.mtls_to(old, 8080)                 # plaintext to pods without a sidecar
    assert not mesh.mtls_to(quiet, 8080)               # its namespace says DISABLE: plaintext
    assert not mesh.mtls_to(None, 8080)
    assert not mesh.mtls_to(mesh.pods_by_ip["10.1.0.1"], 8080)   # ourselves: no peer sidecar


def test_own_pod_policy_and_http_ports(snap):
    mesh = snap.mesh
    assert (mesh.me.namespace, mesh.me.name, mesh.me.service_account) == ("shop", "me", "web")
    # Only the port a Service declares HTTP is parsed per request; 5432 stays opaque.
    assert mesh.http_ports == frozenset({8080})
    assert mesh.service_ports == frozenset({8080, 5432})
    assert mesh.policy.mtls_mode(8080) == STRICT
    assert mesh.policy.mtls_mode(5432) == PERMISSIVE
    assert snap.to_json()["mesh"]["identity"] == "spiffe://cluster.local/ns/shop/sa/web"


def test_a_pod_not_in_the_configuration_is_known_from_the_downward_api():
    snap = snapshot_for(MANIFESTS.replace("name: me,", "name: someone-else,"), sidecar_settings())
    me = snap.mesh.me
    assert (me.namespace, me.name, me.ips, str(me.identity)) == ("shop", "me", ("10.1.0.1",),
                                                                 "spiffe://cluster.local/ns/shop/sa/web")
    assert snap.mesh.policy.mode == PERMISSIVE       # no labels: no workload policy selects it
    assert snap.mesh.destination_mode(snap.mesh.pods_by_ip["10.1.0.4"], 8080) == DISABLE


@pytest.mark.parametrize("first,http", [(b"GET / HT", True), (b"OPTIONS ", True), (b"POST /x", True),
                                        (b"\x16\x03\x01", False), (b"SSH-2.0-", False), (b"get / ", False),
                                        (b"GET/", False), (b"", False)])
def test_http_is_recognised_only_by_a_request_line(first, http):
    assert looks_like_http(first) is http


def test_no_mesh_view_without_sidecar():
    assert snapshot_for(MANIFESTS, Settings(service_cidr="10.96.0.0/16")).mesh is None


# -- settings ---------------------------------------------------------------------------------

def _parse(argv):
    args = build_parser().parse_args(["run", "-f", "x.yaml", *argv])
    return settings_from_args(args)


def test_sidecar_settings_come_from_flags_and_the_downward_api(monkeypatch):
    for k, v in {"POD_NAME": "web-1", "POD_NAMESPACE": "shop", "POD_IP": "10.1.0.9", "SERVICE_ACCOUNT": "web"}.items():
        monkeypatch.setenv(k, v)
    s = _parse(["--sidecar", "--proxy-uid", "1337", "--outbound-port", "16001", "--service-cidr", "10.96.0.0/12"])
    assert (s.sidecar, s.outbound_port, s.inbound_port, s.proxy_uid) == (True, 16001, 15006, 1337)
    assert (s.pod_name, s.pod_namespace, s.pod_ip, s.service_account) == ("web-1", "shop", "10.1.0.9", "web")
    assert s.service_cidr == "10.96.0.0/12"


@pytest.mark.parametrize("argv,env,message", [
    (["--inbound-port", "15001"], {}, "must differ"),
    (["--outbound-port", "0"], {}, "is not a port"),
    (["--workers", "2"], {}, "--workers must be 1"),
    (["--ingress-listen", "127.0.0.1:8080"], {}, "--ingress-listen does not apply"),
    ([], {"POD_IP": "not-an-ip"}, "POD_IP 'not-an-ip'"),
])
def test_bad_sidecar_settings_are_refused(monkeypatch, argv, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        _parse(["--sidecar", *argv])


# -- the pool's security hook -------------------------------------------------------------------

class _Exchange:
    def __init__(self) -> None:
        self.result = asyncio.get_running_loop().create_future()

    def connected(self, token, conn, exc) -> None:
        self.result.set_result((conn, exc))

    def internal_error(self, exc) -> None:
        self.result.set_exception(exc)


def test_pool_reaches_pods_over_mutual_tls_keyed_by_identity():
    pki = Pki()
    server_svid, client_svid = pki.loaded("shop", "api"), pki.loaded("shop", "web")
    api_id = server_svid.spiffe_id

    async def main():
        loop = asyncio.get_running_loop()
        seen = []

        async def handler(reader, writer):
            seen.append(str(peer_identity(writer.get_extra_info("ssl_object")).spiffe_id))
            await reader.read()
            writer.close()
        srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context(server_svid))
        addr = srv.sockets[0].getsockname()[:2]
        pool = UpstreamPool(loop, Settings())
        ctx = client_context(client_svid)

        def check(expected):
            return lambda obj: peer_identity(obj, "cluster.local", expected=expected)
        right = UpstreamSecurity(("mtls", str(api_id)), ctx, "", check(api_id), str(api_id))
        wrong_id = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")
        wrong = UpstreamSecurity(("mtls", str(wrong_id)), ctx, "", check(wrong_id))
        no_ctx = UpstreamSecurity(("mtls", "x"), None)
        current = {"sec": right}
        pool.security = lambda a: current["sec"] if a == addr else None

        async def connect():
            ex = _Exchange()
            pool.connect(addr, ("shop", "api"), ex, 1)
            return await ex.result

        conn, exc = await connect()
        assert exc is None and conn.pool_key == (addr, ("mtls", str(api_id)))
        assert conn.peer_id == str(api_id)        # what the attempt's span is told (meshproxy.server_id)
        pool.release(conn)
        assert pool.take(addr) is conn            # same security: reused
        pool.release(conn)
        current["sec"] = wrong
        assert pool.take(addr) is None            # another expected identity: never that connection
        conn2, exc2 = await connect()
        assert conn2 is None and isinstance(exc2, IdentityError) and "expected spiffe://cluster.local/ns/shop/sa/db" in str(exc2)
        current["sec"] = no_ctx
        conn3, exc3 = await connect()
        assert conn3 is None and isinstance(exc3, ConnectionRefusedError)
        current["sec"] = None                     # plain text: keyed by the bare address
        assert pool.take(addr) is None
        assert pool.idle_count(addr) == 1
        assert pool.drop_idle(lambda key: key == addr) == 1
        pool.close()
        srv.close()
        await asyncio.sleep(0.05)
        return seen
    seen = asyncio.run(main())
    assert seen and set(seen) == {"spiffe://cluster.local/ns/shop/sa/web"}

