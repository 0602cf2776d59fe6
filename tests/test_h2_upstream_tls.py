"""HTTP/2 to pods over TLS (``H2Pool.security``: the mesh's mutual TLS to h2c / grpc ports):
a real TLS pod speaking HTTP/2 (the ``h2`` package, trustme certificate), the proxy in process.
A peer the check refuses is a connect failure (503), never a request in the clear."""

from __future__ import annotations

import asyncio
import ssl
import threading

import h2.config
import h2.connection
import h2.events
import pytest
import trustme

import h2_client
from backends import Proxy, ingress_yaml
from l7.upstream import UpstreamSecurity


_TRANSPORTS: list = []


class _TlsH2Pod(asyncio.Protocol):
    def __init__(self, seen: list) -> None:
        self.seen = seen
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False, header_encoding=None))

    def connection_made(self, transport) -> None:
        self.t = transport
        _TRANSPORTS.append(transport)
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.seen.append(dict(ev.headers))
            elif isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id
                self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                self.conn.send_data(sid, b"tls-pod")
                self.conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        self.t.write(self.conn.data_to_send())


@pytest.fixture(scope="module")
def pod():
    ca = trustme.CA()
    cert = ca.issue_cert("pod.test")
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(sctx)
    sctx.set_alpn_protocols(["h2"])
    loop = asyncio.new_event_loop()
    seen: list = []
    server = loop.run_until_complete(loop.create_server(lambda: _TlsH2Pod(seen), "127.0.0.1", 0, ssl=sctx))
    port = server.sockets[0].getsockname()[1]
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield port, ca, seen
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    t.join(timeout=5)
    for tr in list(_TRANSPORTS):
        tr.abort()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


def _yaml(port: int) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: p, namespace: default, labels: {{app: p}}}}
spec: {{containers: [{{name: c, ports: [{{name: grpc, containerPort: {port}}}]}}]}}
status: {{podIP: 127.0.0.1, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: p, namespace: default}}
spec:
  selector: {{app: p}}
  ports: [{{name: grpc, port: 50051, targetPort: grpc, appProtocol: grpc}}]
---
""" + ingress_yaml("p", [(None, "/", "Prefix", "p")], port=50051)


def _security(ca, expected: str):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["h2"])

    def check(ssl_object) -> None:
        names = [v for k, v in ssl_object.getpeercert().get("subjectAltName", ()) if k == "DNS"]
        if expected not in names:
            raise ValueError(f"peer is {names}, not {expected}")

    return lambda addr: UpstreamSecurity(("id", expected), ctx, "pod.test", check)


def test_h2_streams_to_a_pod_over_tls(pod):
    port, ca, seen = pod
    with Proxy(_yaml(port)) as p:
        p.server.h2pool.security = _security(ca, "pod.test")
        c = h2_client.Client(p.port)
        try:
            for _ in range(3):
                sid = c.request([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc/M"),
                                 (b":authority", b"example.com"), (b"content-type", b"application/grpc"),
                                 (b"te", b"trailers")], body=b"\0\0\0\0\0")
                r = c.response(sid)
                assert r.headers[b":status"] == b"200" and r.data == b"tls-pod" and r.trailers[b"grpc-status"] == b"0"
        finally:
            c.close()
        assert p.server.h2pool.connection_count(("127.0.0.1", port)) == 1   # one TLS connection, three streams
    assert len(seen) >= 3 and seen[-1][b":path"] == b"/svc/M"


def test_a_refused_peer_is_a_connect_failure(pod):
    port, ca, seen = pod
    before = len(seen)
    with Proxy(_yaml(port)) as p:
        p.server.h2pool.security = _security(ca, "someone-else.test")
        c = h2_client.Client(p.port)
        try:
            sid = c.request([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc/M"),
                             (b":authority", b"example.com"), (b"content-type", b"application/grpc")],
                            body=b"\0\0\0\0\0")
            r = c.response(sid)
            assert r.headers[b"grpc-status"] == b"14"          # UNAVAILABLE: no endpoint could be reached
        finally:
            c.close()
    assert len(seen) == before                                   # nothing reached the pod
