"""The ClientHello server-name peek of Gateway TLS passthrough listeners (l4.sni): parsed whole,
byte by byte, across records, and refused for anything that is not a ClientHello."""

from __future__ import annotations

import ssl

import pytest

from l4.sni import INCOMPLETE, NOT_TLS, parse_client_hello


def hello(server_name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = server_name is not None
    if server_name is None:
        ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.mark.parametrize("name", ["a.example.com", "x.y.b.example.com", "UPPER.Example.COM"])
def test_server_name_of_a_real_client_hello(name):
    assert parse_client_hello(hello(name)) == ("ok", name.lower())


def test_no_server_name():
    assert parse_client_hello(hello(None)) == ("ok", None)


def test_every_prefix_is_incomplete_and_trailing_bytes_do_not_matter():
    data = hello("a.example.com")
    for i in range(len(data)):
        assert parse_client_hello(data[:i]) == (INCOMPLETE, None), i
    assert parse_client_hello(data + b"\x17\x03\x03garbage") == ("ok", "a.example.com")


def test_hello_split_over_two_records():
    data = hello("split.example.com")
    body = data[5:]
    cut = 40
    two = b"\x16\x03\x01" + cut.to_bytes(2, "big") + body[:cut] + \
        b"\x16\x03\x01" + (len(body) - cut).to_bytes(2, "big") + body[cut:]
    assert parse_client_hello(two) == ("ok", "split.example.com")
    assert parse_client_hello(two[:50]) == (INCOMPLETE, None)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x16\x02\x00\x00\x05hello",             # not TLS 1.x
    b"\x17\x03\x03\x00\x05hello",             # application data, not a handshake
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
    b"\x16\x03\x01\x00\x00",                  # empty record
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff",   # truncated hello body
])
def test_not_a_client_hello(data):
    assert parse_client_hello(data)[0] == NOT_TLS
