"""The L7 exchange through its shells, on a fake loop with fake transports (tests/fakes.py).

Timers, deadlines, keep-alive, pipelining, pause/resume, retries, interim responses and fault
injection, checked to the microsecond and without sockets. Every state move is checked against
``l7.exchange.TRANSITIONS``. Real-socket behaviour is in test_l7_unit.py and test_l7.py.
"""

from __future__ import annotations

import pytest

import l7.exchange as exchange_mod
from l7.exchange import TRANSITIONS
from meshproxy.core import metrics

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
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: web}}
spec: {containers: [{name: web, ports: [{containerPort: 8080}]}]}
status: {podIP: 127.0.10.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default, annotations: ANNOTATIONS}
spec:
  rules:
  - host: example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
"""

GET = b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def manifests(pods: int = 2, **annotations) -> str:
    ann = "{" + ", ".join(f'"{k}": "{v}"' for k, v in annotations.items()) + "}"
    text = MANIFESTS.replace("ANNOTATIONS", ann)
    if pods == 1:   # one endpoint: every request goes to the same pooled connection
        docs = text.split("---")
        text = "---".join(d for d in docs if "web-2" not in d)
    return text


@pytest.fixture(autouse=True)
def checked_transitions(monkeypatch):
    monkeypatch.setattr(exchange_mod.Exchange, "_to", exchange_mod.checked_to)
    slot = exchange_mod.Exchange.__dict__["state"]
    monkeypatch.setattr(exchange_mod.Exchange, "state", exchange_mod.checked_state(slot))


@pytest.fixture
def h():
    return Harness(manifests())


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def test_transition_table_is_closed():
    states = {s for (s, _e) in TRANSITIONS} | {t for targets in TRANSITIONS.values() for t in targets}
    for (state, event), targets in TRANSITIONS.items():
        assert targets, (state, event)
        assert state in states
    # The two end states take no event but "abort" from DONE (client gone mid-body).
    assert not [k for k in TRANSITIONS if k[0] == exchange_mod.ABORTED]


# -- one request, keep-alive and its timers ------------------------------------------------------

def test_request_response_keepalive_and_idle_timeout(h):
    conn, t = h.client()
    conn.data_received(GET)
    assert len(h.pool.requests) == 1 and h.pool.requests[0][0][1] == 8080
    up, ut = h.pool.open()
    assert ut.data().startswith(b"GET /x HTTP/1.1\r\nHost: example.com\r\n")
    up.data_received(OK)
    data = t.take()
    assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-request-id: ") and data.endswith(b"\r\n\r\nok")
    rid = data.split(b"x-request-id: ")[1][:36]
    assert ut.data().count(b"x-request-id: " + rid + b"\r\n") == 1   # the same id went to the pod
    assert h.pool.idle_count() == 1 and not t.closing
    h.loop.advance(74.999)
    assert not t.closing
    h.loop.advance(0.002)          # --keepalive-timeout 75 s, to the millisecond
    assert t.closing


def test_second_request_reuses_the_pooled_connection():
    h = Harness(manifests(pods=1))
    conn, t = h.client()
    conn.data_received(GET)
    up, ut = h.pool.open()
    up.data_received(OK)
    ut.take()
    conn.data_received(GET)
    assert not h.pool.requests           # no new connection
    assert ut.data().startswith(b"GET /x")
    up.data_received(OK)
    assert t.data().count(b"200 OK") == 2


def test_header_timeout_counts_from_the_first_byte(h):
    conn, t = h.client()
    h.loop.advance(5)
    conn.data_received(b"GET / HTTP/1.1\r\n")
    for _ in range(9):
        h.loop.advance(1)
        conn.data_received(b"X: y\r\n")     # dribbling does not extend the deadline
    assert not t.closing
    h.loop.advance(1.001)
    assert status_of(t.data()) == 408 and t.closing


def test_pipelined_requests_wait_for_the_response_in_flight():
    h = Harness(manifests(pods=1))
    conn, t = h.client()
    conn.data_received(GET + GET)
    assert len(h.pool.requests) == 1     # one exchange at a time
    conn.data_received(b"GET /z HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert not t.reading                 # more pipelined input: reading paused
    up, ut = h.pool.open()
    up.data_received(OK)                 # first done: the second goes out on the same connection
    assert ut.data().count(b"GET /x") == 2
    up.data_received(OK)
    assert ut.data().count(b"GET /z") == 1
    up.data_received(OK)
    assert t.data().count(b"200 OK") == 3 and t.reading


# -- upstream timeouts and retries ---------------------------------------------------------------

def test_upstream_timeout_504_at_the_route_timeout():
    h = Harness(manifests(**{"meshproxy.dev/timeout": "2s"}))
    conn, t = h.client()
    conn.data_received(GET)
    up, ut = h.pool.open()
    h.loop.advance(1.999)
    assert t.data() == b""
    h.loop.advance(0.002)
    assert status_of(t.data()) == 504
    assert ut.aborted                    # the late response must not be read by anyone


def test_response_read_gap_restarts_with_each_read():
    h = Harness(manifests(**{"meshproxy.dev/timeout": "2s"}))
    conn, t = h.client()
    conn.data_received(GET)
    up, _ = h.pool.open()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    for _ in range(4):
        h.loop.advance(1.9)              # each byte within the 2 s gap
        up.data_received(b"x")
    h.loop.advance(1.9)
    assert not t.aborted
    h.loop.advance(0.2)
    assert t.aborted                     # 2 s without a byte mid-body: reset, never a short body


def test_per_try_timeout_retries_on_the_other_endpoint():
    h = Harness(manifests(**{"meshproxy.dev/per-try-timeout": "1s", "meshproxy.dev/timeout": "10s"}))
    conn, t = h.client()
    conn.data_received(GET)
    first = h.pool.requests[0][0]
    h.pool.open()
    h.loop.advance(1.001)
    assert len(h.pool.requests) == 1 and h.pool.requests[0][0] != first
    up2, _ = h.pool.open()
    up2.data_received(OK)
    assert status_of(t.data()) == 200


def test_reset_before_response_retried_once_then_502(h):
    conn, t = h.client()
    conn.data_received(GET)
    up1, _ = h.pool.open()
    up1.connection_lost(ConnectionResetError())
    up2, _ = h.pool.open()
    assert up2.addr != up1.addr
    up2.connection_lost(ConnectionResetError())
    assert status_of(t.data()) == 502 and not h.pool.requests


def test_post_not_retried_after_it_was_sent(h):
    conn, t = h.client()
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\r\nhi")
    up, ut = h.pool.open()
    assert ut.data().endswith(b"\r\n\r\nhi")
    up.connection_lost(ConnectionResetError())
    assert status_of(t.data()) == 502 and not h.pool.requests


def test_stale_pooled_connection_is_retried_on_a_fresh_one_to_the_same_pod():
    h = Harness(manifests(pods=1))
    conn, t = h.client()
    conn.data_received(GET)
    up, _ = h.pool.open()
    up.data_received(OK)
    t.take()
    conn.data_received(GET)              # reuses the pooled connection...
    up.eof_received()                    # ...which the pod closed meanwhile (nothing received)
    assert h.pool.requests[0][0] == up.addr
    up2, _ = h.pool.open()
    up2.data_received(OK)
    assert status_of(t.data()) == 200


def test_connect_failure_tries_another_endpoint(h):
    conn, t = h.client()
    conn.data_received(GET)
    h.pool.refuse()
    assert len(h.pool.requests) == 1
    up, _ = h.pool.open()
    up.data_received(OK)
    assert status_of(t.data()) == 200


def test_retry_on_503_then_relay_the_second_answer(h):
    conn, t = h.client()
    conn.data_received(GET)
    up1, _ = h.pool.open()
    up1.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    up2, _ = h.pool.open()
    up2.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    assert status_of(t.data()) == 503     # attempts spent: relayed as is
    assert h.pool.idle_count(up1.addr) == 1  # the discarded response was complete: pooled


# -- bodies and back-pressure --------------------------------------------------------------------

def test_request_body_waits_while_connecting_and_is_bounded(h):
    conn, t = h.client()
    big = 300 * 1024
    conn.data_received(b"PUT /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n\r\n" % big)
    conn.data_received(b"a" * (big // 2))
    assert t.reading
    conn.data_received(b"a" * (big // 2))
    assert not t.reading                 # > 256 KiB waiting for the connection: client paused
    up, ut = h.pool.open()
    assert t.reading and ut.data().endswith(b"a" * big)


def test_client_write_buffer_full_pauses_the_upstream(h):
    conn, t = h.client()
    conn.data_received(GET)
    up, ut = h.pool.open()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    conn.pause_writing()
    assert not ut.reading
    conn.resume_writing()
    assert ut.reading


def test_upstream_write_buffer_full_pauses_the_client(h):
    conn, t = h.client()
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\n")
    up, _ = h.pool.open()
    up.pause_writing()
    assert not t.reading
    up.resume_writing()
    assert t.reading


def test_request_body_timeout_408_when_the_client_stalls():
    h = Harness(manifests(**{"meshproxy.dev/timeout": "3s"}))
    conn, t = h.client()
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\nabc")
    up, ut = h.pool.open()
    h.loop.advance(3.001)
    assert status_of(t.data()) == 408 and t.closing and ut.aborted


def test_send_timeout_resets_a_client_that_reads_nothing():
    h = Harness(manifests(), send_timeout=4.0)
    conn, t = h.client()
    conn.data_received(GET)
    up, ut = h.pool.open()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    t.buffered = 70_000
    conn.pause_writing()
    before = metrics.http_send_timeouts._value.get()
    h.loop.advance(3.9)
    assert not t.aborted
    h.loop.advance(0.2)
    assert t.aborted and ut.aborted
    assert metrics.http_send_timeouts._value.get() == before + 1


# -- interim responses (hostile pods) ------------------------------------------------------------

def test_one_early_hint_is_relayed_and_100_is_not(h):
    conn, t = h.client()
    conn.data_received(GET)
    up, _ = h.pool.open()
    up.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)
    data = t.data()
    assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK")
    assert b"100 Continue" not in data


@pytest.mark.parametrize("status", [b"100 Continue", b"103 Early Hints"])
def test_interim_flood_fails_the_attempt_with_502(h, status):
    conn, t = h.client()
    conn.data_received(GET)
    up, ut = h.pool.open()
    before = metrics.http_interim_floods._value.get()
    up.data_received((b"HTTP/1.1 " + status + b"\r\n\r\n") * 1000)
    assert ut.aborted                    # the flooding connection is closed at once
    relayed = t.data().count(b"103 Early Hints")
    assert relayed <= exchange_mod.MAX_INTERIM
    assert metrics.http_interim_floods._value.get() == before + 1
    # Not retried (a response arrived: a protocol error), the client gets 502.
    assert t.data().rstrip().endswith(b"bad response from upstream") or b" 502 " in t.data()
    assert not h.pool.requests


def interim_head(status: bytes, size: int) -> bytes:
    """A 1xx head that the exchange counts as exactly ``size`` bytes against MAX_INTERIM_BYTES
    (32 per head plus name + value + 4 per field), with one ``Link`` field."""
    value = b"<" + b"a" * (size - 32 - 4 - 4 - 2) + b">"
    return b"HTTP/1.1 " + status + b"\r\nLink: " + value + b"\r\n\r\n"


@pytest.mark.parametrize("status", [b"100 Continue", b"103 Early Hints"])
@pytest.mark.parametrize("over", [0, 1], ids=["at-the-bound", "one-byte-over"])
def test_interim_byte_bound_is_exact_and_spares_other_clients(h, status, over):
    """Four big 1xx heads - far under the count bound (16) - that add up to exactly
    MAX_INTERIM_BYTES pass (103s relayed, 100s dropped, then the final response); one byte more
    fails the attempt with 502 and closes the pod's connection, not retried. A second client
    in flight on the other pod is served either way."""
    heads = 4
    assert heads < exchange_mod.MAX_INTERIM
    size = exchange_mod.MAX_INTERIM_BYTES // heads
    sizes = [size] * (heads - 1) + [exchange_mod.MAX_INTERIM_BYTES - size * (heads - 1) + over]
    assert sum(sizes) == exchange_mod.MAX_INTERIM_BYTES + over
    conn, t = h.client()
    conn.data_received(GET)
    up, ut = h.pool.open()
    other, ot = h.client(peer=("127.0.0.10", 40001))
    other.data_received(GET)
    up2, ut2 = h.pool.open()
    assert ut2.peer != ut.peer            # the two requests are on the two pods
    before = metrics.http_interim_floods._value.get()
    for n in sizes:                       # one head per read, as a pod writing them one by one
        up.data_received(interim_head(status, n))
    up2.data_received(OK)
    data = t.data()
    relayed = data.count(b"HTTP/1.1 103 Early Hints\r\n")
    if over:
        assert ut.aborted and metrics.http_interim_floods._value.get() == before + 1
        assert data.count(b"HTTP/1.1 502 ") == 1 and data.rfind(b"HTTP/1.1 502 ") > data.rfind(b"HTTP/1.1 103 ")
        assert not h.pool.requests        # not retried on the other pod
    else:
        assert not ut.aborted and metrics.http_interim_floods._value.get() == before
        up.data_received(OK)
        assert data.count(b"HTTP/1.1 ") == relayed    # nothing final yet before OK
        data = t.data()
        assert data.endswith(b"\r\n\r\nok") and b"HTTP/1.1 200 OK\r\n" in data
    assert relayed == (heads - over if status.startswith(b"103") else 0)
    assert b"100 Continue" not in data
    assert ot.data().startswith(b"HTTP/1.1 200 OK\r\n") and ot.data().endswith(b"ok")


def test_pipelined_requests_to_a_pod_take_one_exchange_per_turn():
    """The loop budget of a pipelining client (docs/resilience.md, "Loop budget"): however many
    requests one read holds, one exchange starts per turn and the rest waits in the parser's
    buffer (reading is paused if more arrives); the next starts when the pod's answer (a later
    turn) ends the first."""
    h = Harness(manifests(pods=1))       # one endpoint: the second request reuses the connection
    conn, t = h.client()
    conn.data_received(GET * 500)
    assert len(h.pool.requests) == 1
    conn.data_received(GET)
    assert not t.reading
    up, ut = h.pool.open()
    up.data_received(OK)
    assert t.data().count(b"HTTP/1.1 200 OK") == 1
    assert ut.data().count(b"GET /x") == 2 and not h.pool.requests   # the second, on the same connection



# -- request body buffering (--request-buffer-size) ----------------------------------------------

POST_HEAD = b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n\r\n"


def test_buffered_body_holds_no_endpoint_until_the_buffer_is_full():
    """--request-buffer-size 1000: no endpoint is chosen and no connection opened while fewer
    than 1000 body bytes are in; at 1000 the request goes on (head and the 1000 bytes in one
    write once connected) and the rest streams as without buffering."""
    h = Harness(manifests(), request_buffer_size=1000)
    conn, t = h.client()
    conn.data_received(POST_HEAD % 5000 + b"a" * 999)
    assert not h.pool.requests and t.reading
    conn.data_received(b"b")
    assert len(h.pool.requests) == 1
    up, ut = h.pool.open()
    assert ut.data().endswith(b"\r\n\r\n" + b"a" * 999 + b"b")
    conn.data_received(b"c" * 4000)
    assert ut.data().endswith(b"c" * 4000)
    up.data_received(OK)
    assert t.data().startswith(b"HTTP/1.1 200 OK\r\n")


def test_buffered_body_that_stalls_gets_408_and_never_reaches_a_pod():
    """While a body is buffered, the route timeout (60 s here) is the longest gap between two
    reads from the client; past it 408 and close - no pod saw anything."""
    h = Harness(manifests(), request_buffer_size=65536)
    conn, t = h.client()
    conn.data_received(POST_HEAD % 10 + b"ab")
    h.loop.advance(59.9)
    conn.data_received(b"cd")          # a read: the gap starts again
    h.loop.advance(59.9)
    assert not t.data() and not t.closing
    h.loop.advance(0.2)
    assert status_of(t.data()) == 408 and t.closing
    assert not h.pool.requests


def test_buffered_body_with_expect_100_continue_gets_its_100_at_once():
    """With --request-buffer-size the 100 goes out when buffering starts (the client holds its
    body back until it sees it), and only once: not again when the request is forwarded."""
    h = Harness(manifests(), request_buffer_size=65536)
    conn, t = h.client()
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n"
                       b"Expect: 100-continue\r\n\r\n")
    h.loop.advance(0.001)
    assert t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.data_received(b"0123456789")
    up, ut = h.pool.open()
    assert ut.data().endswith(b"\r\n\r\n0123456789") and b"expect" not in ut.data().lower()
    assert t.data() == b""     # no second 100


# -- filters -------------------------------------------------------------------------------------

def test_ssl_redirect_on_the_plain_listener(h):
    h.publish(manifests(**{"meshproxy.dev/ssl-redirect": "true"}))
    conn, t = h.client()
    conn.data_received(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
    data = t.data()
    assert status_of(data) == 308 and b"Location: https://example.com/a?b=1\r\n" in data
    assert not h.pool.requests


def test_client_gone_mid_request_aborts_the_attempt_and_counts_499(h):
    conn, t = h.client()
    conn.data_received(GET)
    up, ut = h.pool.open()
    conn.connection_lost(None)
    assert ut.aborted
    assert h.server.active == 0


def test_moves_outside_the_table_are_refused(h):
    """The checks installed by the autouse fixture catch a move the table does not allow."""
    conn, t = h.client()
    conn.data_received(GET)
    ex = conn.exchange
    with pytest.raises(AssertionError, match="does not lead"):
        ex._to("end", exchange_mod.DONE)          # CONNECTING --end--> is not a move
    with pytest.raises(AssertionError, match="no move"):
        ex.state = exchange_mod.TUNNEL            # CONNECTING -> TUNNEL by no event


def test_repeated_responses_reuse_the_parse_and_the_client_head():
    """The repeated-head shortcut on the response side: the same head bytes from the pod give the
    same head to the client (with this request's own id), a different head is parsed afresh,
    and a HEAD request after a GET is not mistaken for it (its answer has no body)."""
    h = Harness(manifests(pods=1))
    conn, t = h.client()
    bodies = []
    for i, answer in enumerate((OK, OK, OK.replace(b"ok", b"no"), OK)):
        conn.data_received(GET)
        if i == 0:
            up, _ = h.pool.open()
        up.data_received(answer)
        bodies.append(t.take())
    ids = [b.split(b"x-request-id: ")[1][:36] for b in bodies]
    assert len(set(ids)) == 4
    assert [b.replace(i, b"ID") for b, i in zip(bodies, ids)] == [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-request-id: ID\r\n\r\nok"] * 2 + [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-request-id: ID\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-request-id: ID\r\n\r\nok"]
    conn.data_received(b"HEAD /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    head_answer = t.take()
    assert head_answer.startswith(b"HTTP/1.1 200 OK\r\n") and head_answer.endswith(b"\r\n\r\n")
    assert b"\r\nContent-Length: 2\r\n" in head_answer and not head_answer.endswith(b"ok")
    conn.data_received(GET)
    up.data_received(OK)
    assert t.take().endswith(b"\r\n\r\nok")


def test_a_silent_connection_is_closed_at_the_header_timeout(h):
    conn, t = h.client()
    h.loop.advance(9.999)
    assert not t.closing
    h.loop.advance(0.002)          # --header-timeout 10 s from the accept, no byte needed
    assert t.closing and t.data() == b""
