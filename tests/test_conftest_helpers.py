"""The shared helpers of tests/conftest.py: "needs program X" (skip with the reason on a
developer's machine, fail in CI), the port helper, the fake clock and the loop fixtures."""

import asyncio
import errno
import socket
import threading

import pytest

import conftest
from meshproxy.core import sockets


def test_missing_program_skips_with_the_package_outside_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="dnsmasq \\(Debian package dnsmasq-base\\) is not installed"):
        monkeypatch.setenv("PATH", "/nonexistent")
        monkeypatch.setattr(conftest.os, "access", lambda *a: False)
        conftest.requires("dnsmasq")


def test_missing_program_fails_in_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="needed in CI: no-such-program-for-meshproxy \\(Debian package no-such-program-for-meshproxy\\) is not installed"):
        conftest.requires("no-such-program-for-meshproxy")


def test_present_program_is_found():
    assert conftest.requires("sh").endswith("/sh")


# -- free_port ------------------------------------------------------------------------------------


def _plain_bind(host: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def test_free_port_is_free_on_every_host_given():
    hosts = ("127.0.0.1", "127.0.1.1", "127.0.1.2")
    for _ in range(20):
        port = conftest.free_port(*hosts)
        assert all(_plain_bind(h, port) for h in hosts), port


def test_free_port_for_udp_is_free_for_both_protocols():
    port = conftest.free_port("127.0.0.1", udp=True)
    assert _plain_bind("127.0.0.1", port, socket.SOCK_DGRAM) and _plain_bind("127.0.0.1", port)


def test_a_held_port_is_taken_by_reuseport_listeners_only_until_released():
    port = conftest.free_port("127.0.0.1", "127.0.1.1", hold=True)
    # Held: a plain bind (another program, an outgoing connection's port) cannot take it ...
    assert not _plain_bind("127.0.0.1", port) and not _plain_bind("127.0.1.1", port)
    # ... nothing answers there yet ...
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # ... and a listener made the way meshproxy makes them binds it and gets the connections.
    with sockets.listen("127.0.0.1", port) as lst:
        sockets.release(lst)
        lst.setblocking(True)
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        lst.settimeout(5)
        conn, _ = lst.accept()
        client.close()                         # the client closes first: its side keeps TIME_WAIT
        conn.settimeout(5)
        assert conn.recv(1) == b""
        conn.close()
    conftest.release_ports()
    assert _plain_bind("127.0.0.1", port) and _plain_bind("127.0.1.1", port)


def test_free_port_tries_again_when_the_number_is_taken_on_another_host(monkeypatch):
    real = conftest._bind
    refused = []

    def bind(host, port, kind, reuse_port):
        if host == "127.0.1.3" and len(refused) < 3:
            refused.append(port)
            raise OSError(errno.EADDRINUSE, "taken")
        return real(host, port, kind, reuse_port)
    monkeypatch.setattr(conftest, "_bind", bind)
    port = conftest.free_port("127.0.0.1", "127.0.1.3")
    assert len(refused) == 3
    assert _plain_bind("127.0.0.1", port) and _plain_bind("127.0.1.3", port)
    refused.clear()
    monkeypatch.setattr(conftest, "_PORT_ATTEMPTS", 3)
    with pytest.raises(RuntimeError, match="no port free on all of 127.0.0.1, 127.0.1.3 after 3 tries"):
        conftest.free_port("127.0.0.1", "127.0.1.3")


# -- the fake clock ---------------------------------------------------------------------------------


def test_timers_run_in_deadline_order_each_at_its_own_time(clock):
    seen = []
    clock.call_later(0.3, lambda: seen.append(("c", clock())))
    clock.call_later(0.1, lambda: seen.append(("a", clock())))
    cancelled = clock.call_later(0.2, lambda: seen.append(("never", clock())))
    # A timer scheduled by a timer, due within the same advance, runs in it.
    clock.call_later(0.15, lambda: clock.call_later(0.1, lambda: seen.append(("b", clock()))))
    cancelled.cancel()
    assert clock.advance(0.099) == 0 and seen == []
    assert clock.advance(0.301) == 4
    assert seen == [("a", 1000.1), ("b", 1000.25), ("c", 1000.3)]
    assert clock() == pytest.approx(1000.4) and clock.pending() == []
    assert cancelled.cancelled() and cancelled.when() == pytest.approx(1000.2)


def test_the_fake_clock_refuses_to_go_back_or_spin(clock):
    with pytest.raises(ValueError):
        clock.advance(-1)

    def again():
        clock.call_later(0, again)
    clock.call_later(0, again)
    with pytest.raises(RuntimeError, match="re-arming"):
        clock.advance(1)


def test_a_clocked_loop_takes_time_and_timers_from_the_clock(clock, run):
    async def main():
        real = asyncio.get_running_loop()
        loop = clock.on(real)
        fired = real.create_future()
        loop.call_later(5, fired.set_result, "fired")
        assert loop.time() == clock() and loop.create_future().get_loop() is real
        await asyncio.sleep(0.01)
        assert not fired.done()                # five fake seconds are not 10 ms of real time
        clock.advance(5)
        return await fired
    assert run(main()) == "fired"


# -- loops --------------------------------------------------------------------------------------------


def test_run_returns_the_result_and_bounds_a_hung_test(run):
    async def answer():
        return 42
    assert run(answer()) == 42
    with pytest.raises(TimeoutError):
        run(asyncio.Event().wait(), timeout=0.05)


def test_loop_thread_runs_coroutines_for_blocking_code(loop_thread):
    async def where():
        return threading.current_thread().name
    assert loop_thread.run(where()) == "test-loop"
    assert loop_thread.call(lambda: asyncio.get_running_loop() is loop_thread.loop)


def test_backend_listens_on_port_zero_and_answers(backend):
    b = backend("127.0.0.1", name="web")
    assert b.port != 0
    with socket.create_connection(b.addr, timeout=5) as s:
        s.sendall(b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 204")
