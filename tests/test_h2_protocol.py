"""HTTP/2 through the shells on a fake loop, frame by frame, with the ``h2`` package as the peer.

The client is an ``h2`` client connection whose bytes go straight into the proxy's client
connection (tests/fakes.py); pods are HTTP/1.1 (FakePool) or HTTP/2 (FakeH2Pool, with an ``h2``
server as the pod). Time is the fake loop's. Every exchange state move is checked against the
transition table.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

import l7.exchange as exchange_mod
from l7 import h2_downstream
from l7.downstream import H2_PREFACE
from l7.h2_downstream import H2ClientConnection
from l7.h2_fields import H2Conn

from fakes import Harness

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 127.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {containers: [{name: web, ports: [{containerPort: 8080}]}]}
status: {podIP: 127.0.10.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: rpc, namespace: default}
spec:
  clusterIP: 127.96.0.11
  selector: {app: rpc}
  ports: [{name: grpc, port: 50051, targetPort: 9000, appProtocol: grpc}]
---
apiVersion: v1
kind: Pod
metadata: {name: rpc-1, namespace: default, labels: {app: rpc}}
spec: {containers: [{name: rpc, ports: [{containerPort: 9000}]}]}
status: {podIP: 127.0.11.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 127.96.0.12
  selector: {app: nothing}
  ports: [{name: grpc, port: 50051, targetPort: 9000, appProtocol: grpc}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec:
  rules:
  - host: example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
      - {path: /test.Echo/, pathType: Prefix, backend: {service: {name: rpc, port: {number: 50051}}}}
      - {path: /test.Empty/, pathType: Prefix, backend: {service: {name: empty, port: {number: 50051}}}}
"""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(autouse=True)
def checked_transitions(monkeypatch):
    monkeypatch.setattr(exchange_mod.Exchange, "_to", exchange_mod.checked_to)


@pytest.fixture
def h():
    return Harness(MANIFESTS)


class Peer:
    """An ``h2`` connection (client or server side) fed with what the proxy wrote."""

    def __init__(self, client_side: bool, window: int | None = None) -> None:
        # H2Conn: h2's connection that keeps going after a GOAWAY (streams in flight finish).
        self.conn = H2Conn(config=h2.config.H2Configuration(
            client_side=client_side, header_encoding=None))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.events: list = []

    def out(self) -> bytes:
        return self.conn.data_to_send()

    def feed(self, data: bytes) -> list:
        evs = self.conn.receive_data(data)
        self.events += evs
        return evs

    def of(self, kind, sid: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)]


def connect(h, window: int | None = None, split: bool = False):
    """A proxy client connection that got the preface (one byte at a time when ``split``)."""
    conn, t = h.client()
    peer = Peer(True, window)
    data = peer.out()
    if split:
        for i in range(len(data)):
            (t.protocol or conn).data_received(data[i:i + 1])   # the transport's protocol after the hand-over
    else:
        conn.data_received(data)
    shell = t.protocol
    assert isinstance(shell, H2ClientConnection)
    peer.feed(drain(h, t))
    shell.data_received(peer.out())   # the SETTINGS ACK
    peer.feed(drain(h, t))
    return shell, t, peer


def get(peer: Peer, path: bytes = b"/x", authority: bytes = b"example.com", extra=(), end: bool = True,
        method: bytes = b"GET") -> int:
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, [(b":method", method), (b":scheme", b"http"), (b":path", path),
                                 (b":authority", authority), *extra], end_stream=end)
    return sid


def drain(h, t) -> bytes:
    """What the proxy wrote to the client, once the writes it deferred to the end of the loop
    turn are done."""
    h.loop.advance(0.0)
    return t.take()


def send(shell, t, peer) -> None:
    shell.data_received(peer.out())
    shell.loop.advance(0.0)
    peer.feed(t.take())


GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


# -- protocol selection ------------------------------------------------------------------------

def test_preface_hands_the_connection_to_http2_even_byte_by_byte(h):
    shell, t, peer = connect(h, split=True)
    sid = get(peer)
    send(shell, t, peer)
    up, ut = h.pool.open()
    assert ut.data().startswith(b"GET /x HTTP/1.1\r\nhost: example.com\r\n")
    up.data_received(OK)
    peer.feed(drain(h, t))
    resp = peer.of(h2.events.ResponseReceived, sid)[0]
    assert dict(resp.headers)[b":status"] == b"200"
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, sid)) == b"ok"
    assert peer.of(h2.events.StreamEnded, sid)
    assert h.listener.count == 1 and shell in h.server.connections


def test_http11_on_the_same_port_starting_like_the_preface(h):
    conn, t = h.client()
    conn.data_received(b"P")            # could be the preface: waits
    assert not t.written and not h.pool.requests
    conn.data_received(b"UT /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n")
    assert len(h.pool.requests) == 1
    up, ut = h.pool.open()
    assert ut.data().startswith(b"PUT /x HTTP/1.1\r\n")
    up.data_received(OK)
    assert t.data().startswith(b"HTTP/1.1 200 OK")


def test_preface_prefix_then_other_bytes_is_refused_as_http11(h):
    conn, t = h.client()
    conn.data_received(H2_PREFACE[:10])
    conn.data_received(b"XXXXXXX\r\n\r\n")   # "PRI * HTTP" then garbage: an HTTP/1.1 request line error
    assert t.data().startswith(b"HTTP/1.1 400") and t.closing


# -- responses and flow control ---------------------------------------------------------------------

def test_response_waits_for_the_clients_window_and_the_upstream_pauses(h):
    shell, t, peer = connect(h, window=10)
    sid = get(peer)
    send(shell, t, peer)
    up, ut = h.pool.open()
    body = b"x" * 100_000
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for i in range(0, 80000, 20000):
        up.data_received(body[i:i + 20000])
    peer.feed(drain(h, t))
    got = b"".join(e.data for e in peer.of(h2.events.DataReceived, sid))
    assert got == b"x" * 10                       # only the window
    assert not ut.reading                         # more than _STREAM_HIGH waits: upstream paused
    peer.conn.increment_flow_control_window(200_000, sid)
    peer.conn.increment_flow_control_window(200_000)
    send(shell, t, peer)
    assert ut.reading                             # the client took it: the upstream is read again
    up.data_received(body[80000:])
    peer.feed(drain(h, t))
    got = b"".join(e.data for e in peer.of(h2.events.DataReceived, sid))
    assert got == body and peer.of(h2.events.StreamEnded, sid)


def test_client_that_opens_no_window_is_closed_at_the_send_timeout(h):
    shell, t, peer = connect(h, window=0)
    get(peer)
    send(shell, t, peer)
    up, ut = h.pool.open()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    h.loop.advance(59.9)
    assert not t.closing
    h.loop.advance(0.2)                           # --send-timeout 60 s
    assert t.aborted


def test_request_body_window_opens_only_as_the_upstream_takes_it(h):
    shell, t, peer = connect(h)
    sid = get(peer, method=b"POST", end=False, extra=[(b"content-length", b"60000")])
    send(shell, t, peer)
    up, ut = h.pool.open()
    up.pause_writing()                            # the pod reads nothing
    for _ in range(4):
        peer.conn.send_data(sid, b"a" * 15000)
    before = peer.conn.outbound_flow_control_window
    peer.events.clear()
    send(shell, t, peer)
    assert not peer.of(h2.events.WindowUpdated)   # nothing acknowledged while paused
    assert peer.conn.outbound_flow_control_window == before
    up.resume_writing()
    peer.feed(drain(h, t))
    assert peer.of(h2.events.WindowUpdated)       # reopened once the upstream took it
    assert ut.data().count(b"a") >= 60000


# -- answers made by the proxy ----------------------------------------------------------------------

def test_no_endpoint_is_a_trailers_only_unavailable_for_grpc(h):
    shell, t, peer = connect(h)
    sid = get(peer, path=b"/test.Empty/Who", method=b"POST", extra=GRPC, end=False)
    send(shell, t, peer)
    resp = peer.of(h2.events.ResponseReceived, sid)[0]
    hd = dict(resp.headers)
    assert hd[b":status"] == b"200" and hd[b"grpc-status"] == b"14" and b"no endpoint" in hd[b"grpc-message"]
    assert resp.stream_ended is not None          # one HEADERS frame with END_STREAM
    assert peer.of(h2.events.StreamReset, sid)    # the unread request body: RST_STREAM(NO_ERROR)


def test_plain_clients_get_the_http_status(h):
    shell, t, peer = connect(h)
    sid = get(peer, authority=b"other.example")
    send(shell, t, peer)
    hd = dict(peer.of(h2.events.ResponseReceived, sid)[0].headers)
    assert hd[b":status"] == b"404" and hd[b"content-type"].startswith(b"text/plain")


def test_grpc_timeout_ends_the_call_deadline_exceeded(h):
    shell, t, peer = connect(h)
    sid = get(peer, path=b"/test.Echo/Slow", method=b"POST", extra=GRPC + [(b"grpc-timeout", b"300m")], end=False)
    peer.conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
    send(shell, t, peer)
    up, ut = h.h2pool.open()
    h.loop.advance(0.299)
    assert not peer.of(h2.events.ResponseReceived, sid)
    h.loop.advance(0.002)
    peer.feed(drain(h, t))
    hd = dict(peer.of(h2.events.ResponseReceived, sid)[0].headers)
    assert hd[b"grpc-status"] == b"4"


@pytest.mark.parametrize("value,seconds", [(b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"250m", 0.25),
                                           (b"1500u", 0.0015), (b"7n", 7e-9), (b"12345678S", 12345678.0)])
def test_grpc_timeout_units(value, seconds):
    from l7.grpc import parse_timeout
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"1", b"1x", b"-1S", b"123456789S", b"1.5S"])
def test_grpc_timeout_invalid_is_ignored(value):
    from l7.grpc import parse_timeout
    assert parse_timeout(value) is None


# -- HTTP/2 upstream -------------------------------------------------------------------------------

def test_grpc_call_to_an_h2c_pod_with_trailers_both_ways(h):
    shell, t, peer = connect(h)
    sid = get(peer, path=b"/test.Echo/Who", method=b"POST", extra=GRPC + [(b"x-md", b"1")], end=False)
    peer.conn.send_data(sid, b"\0\0\0\0\x01a", end_stream=True)
    send(shell, t, peer)
    up, ut = h.h2pool.open()
    pod = Peer(False)
    pod.feed(drain(h, ut))
    req = pod.of(h2.events.RequestReceived)[0]
    hd = dict(req.headers)
    assert hd[b":path"] == b"/test.Echo/Who" and hd[b":authority"] == b"example.com"
    assert hd[b"te"] == b"trailers" and hd[b"x-md"] == b"1" and b"host" not in hd
    assert b"".join(e.data for e in pod.of(h2.events.DataReceived)) == b"\0\0\0\0\x01a"
    psid = req.stream_id
    pod.conn.send_headers(psid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    pod.conn.send_data(psid, b"\0\0\0\0\x01b")
    pod.conn.send_headers(psid, [(b"grpc-status", b"0"), (b"x-trailer", b"t")], end_stream=True)
    up.data_received(pod.out())
    peer.feed(drain(h, t))
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, sid)) == b"\0\0\0\0\x01b"
    tr = dict(peer.of(h2.events.TrailersReceived, sid)[0].headers)
    assert tr == {b"grpc-status": b"0", b"x-trailer": b"t"}
    # The stream is done; the connection stays for the next call (multiplexed, not per request).
    assert h.h2pool.connection_count() == 1
    sid2 = get(peer, path=b"/test.Echo/Who", method=b"POST", extra=GRPC)
    send(shell, t, peer)
    assert not h.h2pool.requests                  # a stream on the same connection
    pod.feed(drain(h, ut))
    assert len(pod.of(h2.events.RequestReceived)) == 2
    assert sid2


def test_pod_concurrency_limit_opens_another_connection(h):
    shell, t, peer = connect(h)
    get(peer, path=b"/test.Echo/A", method=b"POST", extra=GRPC)
    send(shell, t, peer)
    up, ut = h.h2pool.open()
    pod = Peer(False)
    pod.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    pod.feed(drain(h, ut))
    up.data_received(pod.out())                    # the pod's SETTINGS: one stream at a time
    get(peer, path=b"/test.Echo/B", method=b"POST", extra=GRPC)
    send(shell, t, peer)
    assert len(h.h2pool.requests) == 1             # the first connection is full: another one


def test_h2_pod_reset_before_the_head_is_unavailable(h):
    shell, t, peer = connect(h)
    sid = get(peer, path=b"/test.Echo/Who", method=b"POST", extra=GRPC)
    send(shell, t, peer)
    up, ut = h.h2pool.open()
    pod = Peer(False)
    pod.feed(drain(h, ut))
    psid = pod.of(h2.events.RequestReceived)[0].stream_id
    pod.conn.reset_stream(psid, ErrorCodes.INTERNAL_ERROR)
    up.data_received(pod.out())
    peer.feed(drain(h, t))
    hd = dict(peer.of(h2.events.ResponseReceived, sid)[0].headers)
    assert hd[b"grpc-status"] == b"14" and b"reset" in hd[b"grpc-message"]


# -- RFC 9113 §8 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,headers", [
    ("connection_header", [(b"connection", b"keep-alive")]),
    ("transfer_encoding", [(b"transfer-encoding", b"chunked")]),
    ("te_not_trailers", [(b"te", b"gzip")]),
    ("uppercase_name", [(b"X-Upper", b"1")]),
    ("newline_in_value", [(b"x-a", b"1\r\nx-b: 2")]),
    ("nul_in_value", [(b"x-a", b"1\x00")]),
    ("authority_host_mismatch", [(b"host", b"evil.example")]),
])
def test_malformed_requests_end_the_connection(h, name, headers):
    shell, t, peer = connect(h)
    peer.conn.config.validate_outbound_headers = False
    peer.conn.config.normalize_outbound_headers = False
    get(peer, extra=headers)
    send(shell, t, peer)
    assert peer.of(h2.events.ConnectionTerminated)[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert t.closing and not h.pool.requests


@pytest.mark.parametrize("authority,path,status", [
    (b"exa mple.com", b"/x", 400), (b"example.com", b"/a b", 400), (b"example.com", b"x", 400),
    (b"example.com:99999", b"/x", 400), (b"example.com", b"*", 400),
])
def test_bad_authority_or_path_is_400_and_never_forwarded(h, authority, path, status):
    shell, t, peer = connect(h)
    peer.conn.config.validate_outbound_headers = False
    sid = get(peer, authority=authority, path=path)
    send(shell, t, peer)
    assert dict(peer.of(h2.events.ResponseReceived, sid)[0].headers)[b":status"] == b"%d" % status
    assert not h.pool.requests


def test_content_length_must_match_the_data(h):
    shell, t, peer = connect(h)
    peer.conn.config.validate_outbound_headers = False
    sid = get(peer, method=b"POST", end=False, extra=[(b"content-length", b"10")])
    send(shell, t, peer)
    h.pool.open()
    peer.conn.send_data(sid, b"12345", end_stream=True)
    send(shell, t, peer)
    assert peer.of(h2.events.ConnectionTerminated)[0].error_code == ErrorCodes.PROTOCOL_ERROR


# -- graceful drain ---------------------------------------------------------------------------------

def test_drain_sends_goaway_and_the_stream_in_flight_finishes(h):
    shell, t, peer = connect(h)
    sid = get(peer)
    send(shell, t, peer)
    up, ut = h.pool.open()
    shell.close_if_idle()
    peer.feed(drain(h, t))
    ga = peer.of(h2.events.ConnectionTerminated)[0]
    assert ga.error_code == ErrorCodes.NO_ERROR and ga.last_stream_id == sid
    assert not t.closing
    late = get(peer, path=b"/late")               # after GOAWAY: refused, never forwarded
    send(shell, t, peer)
    assert peer.of(h2.events.StreamReset, late)[0].error_code == ErrorCodes.REFUSED_STREAM
    up.data_received(OK)
    peer.feed(drain(h, t))
    assert peer.of(h2.events.StreamEnded, sid) and t.closing


def test_keepalive_idle_connection_gets_goaway(h):
    shell, t, peer = connect(h)
    h.loop.advance(74.9)
    assert not t.closing
    h.loop.advance(0.2)
    peer.feed(drain(h, t))
    assert peer.of(h2.events.ConnectionTerminated) and t.closing


# -- abuse ---------------------------------------------------------------------------------------

def _calm(peer) -> bool:
    ga = peer.of(h2.events.ConnectionTerminated)
    return bool(ga) and ga[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_rapid_reset_gets_enhance_your_calm(h):
    shell, t, peer = connect(h)
    for _ in range(h2_downstream.LIMITS["rapid_reset"] + 1):
        sid = get(peer)
        peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
    send(shell, t, peer)
    assert _calm(peer) and t.closing


def test_ping_flood_gets_enhance_your_calm(h):
    shell, t, peer = connect(h)
    shell.data_received(b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize()
                                 for i in range(h2_downstream.LIMITS["control_flood"] + 1)))
    peer.feed(drain(h, t))
    assert _calm(peer) and t.closing


def test_settings_flood_gets_enhance_your_calm(h):
    shell, t, peer = connect(h)
    shell.data_received(SettingsFrame(0, settings={4: 65535}).serialize() * (h2_downstream.LIMITS["control_flood"] + 1))
    peer.feed(drain(h, t))
    assert _calm(peer) and t.closing


def test_empty_data_flood_gets_enhance_your_calm(h):
    shell, t, peer = connect(h)
    sid = get(peer, method=b"POST", end=False)
    send(shell, t, peer)
    shell.data_received(DataFrame(sid, data=b"").serialize() * (h2_downstream.LIMITS["empty_data_flood"] + 1))
    peer.feed(drain(h, t))
    assert _calm(peer) and t.closing


def test_continuation_flood_ends_the_connection(h):
    shell, t, peer = connect(h)
    hf = HeadersFrame(1, data=b"\x82")           # :method GET, END_HEADERS not set
    frames = [hf.serialize()] + [ContinuationFrame(1, data=b"\x00\x01a\x01b").serialize() for _ in range(200)]
    shell.data_received(b"".join(frames))
    peer.feed(drain(h, t))
    assert peer.of(h2.events.ConnectionTerminated) and t.closing
    assert not h.pool.requests


def test_hpack_bomb_ends_the_connection(h):
    shell, t, peer = connect(h)
    # One 4 KiB field put in the dynamic table, then referenced 100 times in the next block:
    # tiny on the wire, 400 KiB decoded - over SETTINGS_MAX_HEADER_LIST_SIZE.
    enc = peer.conn.encoder
    big = (b"x-bomb", b"a" * 4000)
    block1 = enc.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"example.com"), big])
    block2 = enc.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"example.com")] + [big] * 100)
    shell.data_received(HeadersFrame(1, data=block1, flags=["END_HEADERS", "END_STREAM"]).serialize())
    shell.data_received(HeadersFrame(3, data=block2, flags=["END_HEADERS", "END_STREAM"]).serialize())
    peer.feed(drain(h, t))
    assert peer.of(h2.events.ConnectionTerminated) and t.closing
    assert len(h.pool.requests) <= 1              # the bomb itself went nowhere


def test_stream_ids_running_out_gets_goaway(h):
    shell, t, peer = connect(h)
    sid = (1 << 31) - 1                           # a client may jump to the last id at once
    peer.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
                                 (b":authority", b"example.com")], end_stream=True)
    send(shell, t, peer)
    ga = peer.of(h2.events.ConnectionTerminated)
    assert ga and ga[0].error_code == ErrorCodes.NO_ERROR and ga[0].last_stream_id == sid
    up, ut = h.pool.open()                        # the last stream is still served
    up.data_received(OK)
    peer.feed(drain(h, t))
    assert peer.of(h2.events.StreamEnded, sid) and t.closing


def test_reset_of_a_finished_stream_is_harmless(h):
    shell, t, peer = connect(h)
    sid = get(peer)
    send(shell, t, peer)
    up, ut = h.pool.open()
    up.data_received(OK)
    peer.feed(drain(h, t))
    assert peer.of(h2.events.StreamEnded, sid)
    shell.data_received(RstStreamFrame(sid, error_code=8).serialize())
    get(peer)
    send(shell, t, peer)
    assert h.pool.requests or h.pool.idle_count() == 0
    assert not t.closing


def test_reset_of_an_idle_stream_is_a_connection_error(h):
    shell, t, peer = connect(h)
    shell.data_received(RstStreamFrame(7, error_code=8).serialize())
    peer.feed(drain(h, t))
    assert peer.of(h2.events.ConnectionTerminated)[0].error_code == ErrorCodes.PROTOCOL_ERROR


def test_h1_and_h2_clients_share_a_pooled_connection_and_its_remembered_head(h):
    """The upstream connection remembers the serialized HTTP/1.1 head of a repeated response for
    its next client; an HTTP/2 client taking the same pooled connection gets the fields back."""
    resp = b"HTTP/1.1 200 OK\r\nX-Pod: one\r\nContent-Length: 2\r\n\r\nok"
    c1, t1 = h.client()
    c1.data_received(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    up, ut = h.pool.open()
    up.data_received(resp)
    assert t1.take().startswith(b"HTTP/1.1 200 OK")
    c1.data_received(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n")   # the head is remembered now
    up.data_received(resp)
    assert b"X-Pod: one" in t1.take()
    c1.connection_lost(None)
    shell, t, peer = connect(h)
    sid = get(peer)
    send(shell, t, peer)
    assert not h.pool.requests                    # the pooled connection, not a new one
    up.data_received(resp)
    peer.feed(drain(h, t))
    hd = dict(peer.of(h2.events.ResponseReceived, sid)[0].headers)
    assert hd[b":status"] == b"200" and hd[b"x-pod"] == b"one" and hd[b"content-length"] == b"2"
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, sid)) == b"ok"
