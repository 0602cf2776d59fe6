"""Table tests for l7.headers: hop-by-hop removal and forwarding fields (docs/l7.md "Headers")."""

from __future__ import annotations

import sys

import pytest
from cores import CORES, use_core

from l7.headers import (
    ClientInfo,
    ClientInfoCache,
    TrustedProxies,
    forwarded_element,
    forwarded_node,
    request_headers,
    response_headers,
)

# What the proxy always appends for an untrusted client 10.1.2.3 asking for example.com.
OURS = [
    (b"X-Forwarded-For", b"10.1.2.3"),
    (b"X-Forwarded-Proto", b"http"),
    (b"X-Forwarded-Port", b"80"),
    (b"X-Real-IP", b"10.1.2.3"),
    (b"X-Forwarded-Host", b"example.com"),
    (b"Forwarded", b"for=10.1.2.3;host=example.com;proto=http"),
]


@pytest.fixture(autouse=True, params=CORES)
def core(request, monkeypatch):
    """Every table here runs against both cores (tests/cores.py)."""
    use_core(monkeypatch, request.param, sys.modules[__name__])
    return request.param


def tokens(*names: bytes) -> frozenset[bytes]:
    return frozenset(n.lower() for n in names)


def run(headers, conn_tokens=frozenset(), trusted=False, ip="10.1.2.3", proto=b"http", default_host=b"",
        **kw):
    client = ClientInfo(ip, trusted, proto, b"80", default_host)
    return request_headers(headers, conn_tokens, client, **kw)


def names(out) -> list[bytes]:
    return [n.lower() for n, _ in out]


def value(out, name: bytes) -> bytes | None:
    vals = [v for n, v in out if n.lower() == name]
    assert len(vals) <= 1, f"{name!r} appears {len(vals)} times"
    return vals[0] if vals else None


# -- request: hop-by-hop ------------------------------------------------------------------------

HOP_BY_HOP_CASES = [
    # (name, fields in, Connection tokens, names that must be gone)
    ("connection_close", [(b"Connection", b"close")], tokens(b"close"), [b"connection"]),
    ("keep_alive", [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5")],
     tokens(b"keep-alive"), [b"connection", b"keep-alive"]),
    ("named_by_connection", [(b"Connection", b"X-Secret, x-other"), (b"X-Secret", b"1"), (b"X-Other", b"2")],
     tokens(b"x-secret", b"x-other"), [b"x-secret", b"x-other"]),
    ("te", [(b"TE", b"trailers")], frozenset(), [b"te"]),
    ("trailer", [(b"Trailer", b"X-Checksum")], frozenset(), [b"trailer"]),
    ("transfer_encoding", [(b"Transfer-Encoding", b"chunked")], frozenset(), [b"transfer-encoding"]),
    ("content_length", [(b"Content-Length", b"5")], frozenset(), [b"content-length"]),
    ("proxy_connection", [(b"Proxy-Connection", b"keep-alive")], frozenset(), [b"proxy-connection"]),
    ("proxy_authorization", [(b"Proxy-Authorization", b"Basic Zm9vOmJhcg==")], frozenset(),
     [b"proxy-authorization"]),
    ("httpoxy", [(b"Proxy", b"http://evil:3128")], frozenset(), [b"proxy"]),
    ("expect", [(b"Expect", b"100-continue")], frozenset(), [b"expect"]),
    ("upgrade_without_tunnel", [(b"Upgrade", b"websocket")], frozenset(), [b"upgrade"]),
    # RFC 7540 §3.2.1: HTTP2-Settings is connection-specific; h2c is never tunnelled (docs/http.md).
    ("h2c_upgrade_not_tunnelled", [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
                                   (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA")],
     tokens(b"upgrade", b"http2-settings"), [b"connection", b"upgrade", b"http2-settings"]),
    ("http2_settings_not_named_by_connection", [(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c"),
                                                (b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA")],
     tokens(b"upgrade"), [b"connection", b"upgrade", b"http2-settings"]),
    ("odd_case", [(b"CONNECTION", b"X-A"), (b"x-a", b"1"), (b"kEEP-aLIVE", b"1")], tokens(b"x-a"),
     [b"connection", b"x-a", b"keep-alive"]),
]


@pytest.mark.parametrize("fields, conn_tokens, gone", [c[1:] for c in HOP_BY_HOP_CASES],
                         ids=[c[0] for c in HOP_BY_HOP_CASES])
def test_request_hop_by_hop_removed(fields, conn_tokens, gone):
    headers = [(b"Host", b"example.com")] + fields + [(b"Accept", b"*/*")]
    out = run(headers, conn_tokens)
    for name in gone:
        assert name not in names(out), name
    assert out[:2] == [(b"Host", b"example.com"), (b"Accept", b"*/*")]
    assert out[2:] == OURS


def test_request_common_case_keeps_order_and_case():
    headers = [(b"Host", b"example.com"), (b"User-Agent", b"curl/8"), (b"accept", b"*/*"),
               (b"X-Custom", b"a, b"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")]
    assert run(headers) == headers + OURS


def test_connection_cannot_remove_host():
    headers = [(b"Host", b"example.com"), (b"Connection", b"host")]
    out = run(headers, tokens(b"host"))
    assert value(out, b"host") == b"example.com"


def test_connection_naming_forwarding_fields_cannot_remove_ours():
    # "Connection: X-Forwarded-For" is the hop-by-hop abuse trick; ours are added afterwards.
    headers = [(b"Host", b"example.com"), (b"Connection", b"X-Forwarded-For, X-Real-IP")]
    out = run(headers, tokens(b"x-forwarded-for", b"x-real-ip"))
    assert value(out, b"x-forwarded-for") == b"10.1.2.3"
    assert value(out, b"x-real-ip") == b"10.1.2.3"


def test_upgrade_kept_for_tunnel():
    headers = [(b"Host", b"example.com"), (b"Connection", b"Upgrade, keep-alive"), (b"Upgrade", b"websocket"),
               (b"Sec-WebSocket-Key", b"k")]
    out = run(headers, tokens(b"upgrade", b"keep-alive"), upgrade=True)
    assert value(out, b"connection") == b"upgrade"
    assert value(out, b"upgrade") == b"websocket"
    assert value(out, b"sec-websocket-key") == b"k"


def test_tunnel_offers_only_websocket():
    """A tunnelled request offers the pod websocket alone (as the client spelt it), never h2c,
    and HTTP2-Settings is dropped even then."""
    headers = [(b"Host", b"example.com"), (b"Connection", b"Upgrade"), (b"Upgrade", b"h2c, WebSocket"),
               (b"Upgrade", b"websocket"), (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA")]
    out = run(headers, tokens(b"upgrade"), upgrade=True)
    assert value(out, b"upgrade") == b"WebSocket"
    assert value(out, b"connection") == b"upgrade"
    assert value(out, b"http2-settings") is None


def test_http2_settings_dropped_from_responses():
    assert response_headers([(b"HTTP2-Settings", b"x"), (b"X-A", b"1")], frozenset()) == [(b"X-A", b"1")]


# -- request: forwarding fields -------------------------------------------------------------------

SPOOFED = [
    (b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil.com"),
    (b"X-Forwarded-Port", b"443"), (b"X-Real-IP", b"1.1.1.1"), (b"Forwarded", b"for=1.1.1.1;proto=https"),
    (b"x-forwarded-for", b"2.2.2.2"),
]


def test_untrusted_client_spoofed_fields_replaced():
    out = run([(b"Host", b"example.com")] + SPOOFED)
    assert out == [(b"Host", b"example.com")] + OURS


def test_trusted_proxy_fields_kept_and_appended():
    out = run([(b"Host", b"example.com")] + SPOOFED, trusted=True)
    assert value(out, b"x-forwarded-for") == b"1.1.1.1, 2.2.2.2, 10.1.2.3"
    assert value(out, b"x-forwarded-proto") == b"https"
    assert value(out, b"x-forwarded-host") == b"evil.com"
    assert value(out, b"x-forwarded-port") == b"443"
    assert value(out, b"x-real-ip") == b"1.1.1.1"
    assert value(out, b"forwarded") == b"for=1.1.1.1;proto=https, for=10.1.2.3;host=example.com;proto=http"


def test_trusted_proxy_without_incoming_fields_gets_ours():
    assert run([(b"Host", b"example.com")], trusted=True) == [(b"Host", b"example.com")] + OURS


def test_forwarded_quotes_ipv6_and_host_with_port():
    out = run([(b"Host", b"example.com:8080")], ip="2001:db8::1", proto=b"https")
    assert value(out, b"forwarded") == b'for="[2001:db8::1]";host="example.com:8080";proto=https'
    assert value(out, b"x-forwarded-for") == b"2001:db8::1"
    assert value(out, b"x-forwarded-host") == b"example.com:8080"
    assert value(out, b"x-forwarded-proto") == b"https"


@pytest.mark.parametrize("ip, node", [
    ("10.0.0.1", b"10.0.0.1"), ("::1", b'"[::1]"'), ("", b"unknown"),
])
def test_forwarded_node(ip, node):
    assert forwarded_node(ip) == node


def test_forwarded_element_without_host():
    assert forwarded_element(b"10.0.0.1", b"", b"http") == b"for=10.0.0.1;proto=http"


def test_absolute_form_authority_replaces_host():
    out = run([(b"Host", b"other.com")], host=b"example.com")
    assert value(out, b"host") == b"example.com"
    assert value(out, b"x-forwarded-host") == b"example.com"


def test_missing_host_gets_default():
    out = run([(b"Accept", b"*/*")], default_host=b"127.0.0.1:8080")
    assert out[0] == (b"Host", b"127.0.0.1:8080")
    assert value(out, b"x-forwarded-host") == b"127.0.0.1:8080"


def test_via_off_by_default_kept_when_incoming_and_appended_when_on():
    assert b"via" not in names(run([(b"Host", b"example.com")]))
    assert value(run([(b"Host", b"example.com"), (b"Via", b"1.0 fred")]), b"via") == b"1.0 fred"
    out = run([(b"Host", b"example.com"), (b"Via", b"1.0 fred")], via=b"1.1 meshproxy")
    assert value(out, b"via") == b"1.0 fred, 1.1 meshproxy"


# -- response ---------------------------------------------------------------------------------------

RESPONSE_CASES = [
    ("plain", [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1")], frozenset(), False,
     [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1")]),
    ("framing_removed", [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X")],
     frozenset(), False, []),
    ("connection_and_named", [(b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"),
                              (b"ETag", b'"1"')], tokens(b"close", b"x-hop"), False, [(b"ETag", b'"1"')]),
    ("proxy_fields", [(b"Proxy-Authenticate", b"Basic"), (b"Proxy-Connection", b"close")], frozenset(), False, []),
    ("keep_alive_token", [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"Via", b"1.1 x"),
                          (b"Server", b"s")], tokens(b"keep-alive"), False, [(b"Via", b"1.1 x"), (b"Server", b"s")]),
    ("close_token_names_field", [(b"Connection", b"close"), (b"Close", b"1"), (b"Server", b"s")],
     tokens(b"close"), False, [(b"Server", b"s")]),
    ("upgrade_not_101", [(b"Upgrade", b"h2c")], frozenset(), False, []),
    ("upgrade_101", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"x")],
     tokens(b"upgrade"), True,
     [(b"Sec-WebSocket-Accept", b"x"), (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]),
]


@pytest.mark.parametrize("fields, conn_tokens, upgrade, expected", [c[1:] for c in RESPONSE_CASES],
                         ids=[c[0] for c in RESPONSE_CASES])
def test_response_headers(fields, conn_tokens, upgrade, expected):
    assert response_headers(fields, conn_tokens, upgrade=upgrade) == expected


def test_response_via():
    assert response_headers([(b"Via", b"1.1 a")], frozenset(), via=b"1.1 meshproxy") == [(b"Via", b"1.1 a, 1.1 meshproxy")]


# -- trusted proxies ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cidrs, ip, expected", [
    ((), "10.0.0.1", False),
    (("10.0.0.0/8",), "10.200.0.1", True),
    (("10.0.0.0/8",), "11.0.0.1", False),
    (("127.0.0.1/32", "::1/128"), "::1", True),
    (("10.0.0.0/8",), "::ffff:10.0.0.9", True),     # IPv4-mapped IPv6 peer
    (("10.0.0.0/8",), "not-an-ip", False),
    (("10.0.0.0/8",), "", False),
    (("fe80::/10",), "fe80::1%eth0", True),          # scoped address
])
def test_trusted_proxies(cidrs, ip, expected):
    assert TrustedProxies(cidrs).contains(ip) is expected


def test_name_spelling_cache_is_case_exact():
    # The same name in another case must still be classified (and the cache must not confuse them).
    for spelling in (b"X-Forwarded-For", b"x-forwarded-for", b"X-FORWARDED-FOR", b"x-FoRwArDeD-fOr"):
        out = run([(b"Host", b"example.com"), (spelling, b"6.6.6.6")])
        assert out == [(b"Host", b"example.com")] + OURS, spelling
    for spelling in (b"Keep-Alive", b"KEEP-ALIVE", b"keep-alive"):
        assert response_headers([(spelling, b"5"), (b"ETag", b"1")], frozenset()) == [(b"ETag", b"1")]


def test_forwarded_element_cache_follows_host():
    client = ClientInfo("10.0.0.1")
    assert client.forwarded(b"a.test") == b"for=10.0.0.1;host=a.test;proto=http"
    assert client.forwarded(b"b.test:8080") == b'for=10.0.0.1;host="b.test:8080";proto=http'
    assert client.forwarded(b"a.test") == b"for=10.0.0.1;host=a.test;proto=http"


def test_client_info_is_built_once_per_peer_and_bounded(core):
    made = []

    def make(*args):
        made.append(args)
        return ClientInfo(*args)

    cache = ClientInfoCache(TrustedProxies(["10.0.0.0/8"]), make, limit=3)
    a = cache.get("10.1.2.3", b"http", b"80", b"h")
    assert cache.get("10.1.2.3", b"http", b"80", b"h") is a and a.trusted
    assert cache.get("10.1.2.3", b"https", b"443", b"h") is not a   # another listener: its own
    assert not cache.get("192.0.2.1", b"http", b"80", b"h").trusted
    assert len(made) == 3
    for i in range(10):   # endless addresses: the cache starts over instead of growing
        cache.get(f"192.0.2.{i + 2}", b"http", b"80", b"h")
    assert len(cache._cache) <= 3
    # A shared ClientInfo builds the same fields for every connection that uses it.
    assert run([(b"Host", b"example.com")], ip="10.1.2.3", trusted=True) == run([(b"Host", b"example.com")], ip="10.1.2.3", trusted=True)
