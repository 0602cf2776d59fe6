"""l4.relay over real loopback sockets: opaque bytes between a plain client and a plain server
through two relays joined by mutual TLS (what two sidecars do for TCP), half-close passed on
both ways, the peer's identity checked, back-pressure; and the pure parts of the sidecar
(ClientHello ALPN, destination classification)."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import uvloop
from mesh_pki import Pki

from l4.relay import RelayError, accept_side, connect_side, link
from meshproxy.core.identity import IdentityError, client_context, peer_identity, server_context
from meshproxy.core.mesh import ALPN_HTTP, ALPN_TCP, INCOMPLETE, client_hello_alpn


# Every relay test runs on both loops: uvloop (what meshproxy runs on) delivers a first read
# even when connection_made paused reading, asyncio does not.
def _uvloop_run(main):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


LOOPS = pytest.mark.parametrize("run", [asyncio.run, _uvloop_run], ids=["asyncio", "uvloop"])


def _listen() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    return s


class Mesh:
    """A client-side relay (plain in, mTLS out) and a server-side relay (mTLS in, plain out)."""

    def __init__(self, pki: Pki, app: tuple[str, int], expected_sa: str = "server") -> None:
        self.client_svid = pki.loaded("shop", "client")
        self.server_svid = pki.loaded("shop", "server")
        self.expected = pki.loaded("shop", expected_sa).spiffe_id
        self.app = app
        self.out_sock = _listen()
        self.in_sock = _listen()
        self.errors: list[BaseException] = []
        self.seen: list[str] = []
        self.tasks: set = set()

    @property
    def port(self) -> int:
        return self.out_sock.getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for lsock, fn in ((self.out_sock, self._outbound), (self.in_sock, self._inbound)):
            loop.add_reader(lsock.fileno(), self._accept, lsock, fn)

    def _accept(self, lsock, fn) -> None:
        try:
            sock, _ = lsock.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        t = asyncio.get_running_loop().create_task(fn(sock))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _outbound(self, sock) -> None:
        loop = asyncio.get_running_loop()
        up = await connect_side(loop, self.in_sock.getsockname(), 5)
        try:
            obj = await up.handshake(client_context(self.client_svid, (ALPN_TCP,)), False, 5)
            peer_identity(obj, "cluster.local", expected=self.expected)
        except (RelayError, IdentityError) as exc:
            self.errors.append(exc)
            up.abort()
            sock.close()
            return
        down = await accept_side(loop, sock)
        link(down, up)

    async def _inbound(self, sock) -> None:
        loop = asyncio.get_running_loop()
        down = await accept_side(loop, sock)
        try:
            obj = await down.handshake(server_context(self.server_svid, (ALPN_TCP,)), True, 5)
            self.seen.append(str(peer_identity(obj, "cluster.local").spiffe_id))
            self.seen.append(obj.selected_alpn_protocol())
        except (RelayError, IdentityError) as exc:
            self.errors.append(exc)
            down.abort()
            return
        up = await connect_side(loop, self.app, 5)
        link(down, up)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for s in (self.out_sock, self.in_sock):
            loop.remove_reader(s.fileno())
            s.close()


async def _reply_after_eof(reader, writer) -> None:
    """Reads until EOF, then answers (needs the client's half-close to arrive)."""
    data = await reader.read()
    writer.write(b"got " + str(len(data)).encode() + b" " + data[-16:])
    await writer.drain()
    writer.close()


async def _client(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


@LOOPS
def test_half_close_passes_through_mutual_tls_both_ways(run):
    async def main():
        pki = Pki()
        app = await asyncio.start_server(_reply_after_eof, "127.0.0.1", 0)
        mesh = Mesh(pki, app.sockets[0].getsockname()[:2])
        await mesh.start()
        try:
            small = await _client(mesh.port, b"hello")
            big_payload = bytes(range(256)) * 8192          # 2 MiB: back-pressure through TLS
            big = await _client(mesh.port, big_payload)
        finally:
            mesh.close()
            app.close()
        return small, big, big_payload, mesh
    small, big, payload, mesh = run(main())
    assert small == b"got 5 hello"
    assert big == b"got %d " % len(payload) + payload[-16:]
    assert mesh.seen[:2] == ["spiffe://cluster.local/ns/shop/sa/client", ALPN_TCP]
    assert not mesh.errors


@LOOPS
def test_server_first_bytes_and_a_server_close_reach_the_client(run):
    async def banner(reader, writer):
        writer.write(b"220 ready\n")
        await writer.drain()
        writer.close()

    async def main():
        pki = Pki()
        app = await asyncio.start_server(banner, "127.0.0.1", 0)
        mesh = Mesh(pki, app.sockets[0].getsockname()[:2])
        await mesh.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port)
            data = await asyncio.wait_for(reader.read(), 10)     # EOF arrives after the banner
            writer.close()
        finally:
            mesh.close()
            app.close()
        return data
    assert run(main()) == b"220 ready\n"


@LOOPS
def test_the_wrong_peer_identity_gets_nothing(run):
    async def main():
        pki = Pki()
        reached = []

        async def app_handler(reader, writer):
            reached.append(await reader.read())
            writer.close()
        app = await asyncio.start_server(app_handler, "127.0.0.1", 0)
        mesh = Mesh(pki, app.sockets[0].getsockname()[:2], expected_sa="database")
        await mesh.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port)
            writer.write(b"secret")
            try:
                data = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                data = b""
            writer.close()
            await asyncio.sleep(0.1)
        finally:
            mesh.close()
            app.close()
        return data, mesh.errors, reached
    data, errors, reached = run(main())
    assert data == b""
    assert errors and "expected spiffe://cluster.local/ns/shop/sa/database" in str(errors[0])
    assert reached in ([], [b""])     # not a byte of the client's reached the application


@LOOPS
def test_a_client_without_certificate_is_refused_by_the_server_side(run):
    async def main():
        pki = Pki()
        app = await asyncio.start_server(_reply_after_eof, "127.0.0.1", 0)
        mesh = Mesh(pki, app.sockets[0].getsockname()[:2])
        await mesh.start()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            reader, writer = await asyncio.open_connection(*mesh.in_sock.getsockname(), ssl=ctx, server_hostname="")
            writer.write(b"x")
            try:
                data = await asyncio.wait_for(reader.read(), 10)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            writer.close()
        finally:
            mesh.close()
            app.close()
        return data, mesh.errors
    data, errors = run(main())
    assert data == b""
    assert errors and "certificate" in str(errors[0]).lower()


# -- ClientHello ALPN ------------------------------------------------------------------------

def _hello(alpn) -> bytes:
    """A real ClientHello from OpenSSL (memory BIO)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=None)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.mark.parametrize("alpn", [(), (ALPN_HTTP,), (ALPN_TCP,), ("h2", "http/1.1")])
def test_client_hello_alpn_is_read_whole_and_byte_by_byte(alpn):
    data = _hello(alpn)
    assert client_hello_alpn(data) == tuple(alpn)
    for cut in (0, 1, 4, 5, 40, len(data) - 1):
        assert client_hello_alpn(data[:cut]) is INCOMPLETE
    # Split into two records: still read.
    body = data[5:]
    two = b"\x16\x03\x01" + (10).to_bytes(2, "big") + body[:10] + b"\x16\x03\x01" + \
        (len(body) - 10).to_bytes(2, "big") + body[10:]
    assert client_hello_alpn(two) == tuple(alpn)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                                  b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03"])
def test_client_hello_alpn_of_other_bytes_is_empty(data):
    assert client_hello_alpn(data) == ()
