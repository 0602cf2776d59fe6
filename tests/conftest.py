"""What every test module shares: programs the machine may lack, ports, time, event loops and
an HTTP backend. Import the plain helpers with ``from conftest import requires, free_port``;
the fixtures (``clock``, ``run``, ``loop_thread``, ``backend``) pytest hands to any test that
names them.

Programs: ``requires(program)`` and ``unavailable(reason)``: a test that needs something the
machine may lack (a program, a built binary) skips with the reason on a developer's machine, but
fails in CI (``CI`` set, as ``.ci/run`` does): there ``scripts/system-deps.sh`` and ``.ci/run``
provide everything, so a missing program is a broken CI set-up, not a reason to pass silently.
``requires_root()`` does the same for tests that need root.

Ports: ``free_port(host, *more_hosts)`` lets the kernel choose (port 0) and never guesses; see
its docstring for ``hold`` (keep the port reserved until the test ends).

Time: the ``clock`` fixture is a ``FakeClock``: a monotonic clock that moves only when the test
calls ``advance()``, with ``call_later`` / ``call_at`` timers that run inside ``advance()``.
Components that take a ``clock`` callable get it as is; components that take a ``loop`` get
``clock.on(loop)``, the real loop with its time and timers replaced. A timer, a deadline, a
drain or a backoff is then tested by advancing the clock to just before and just after the
moment, in milliseconds of real time and with no window for a busy machine to miss.

Loops: ``run(coro)`` runs a coroutine on a new uvloop loop (as meshproxy runs), bounded so that
a hung test fails instead of hanging; ``loop_thread`` is a loop running in a thread, for tests
that drive async servers from blocking client code.

Parser modes: the modules in ``PARSER_SUITES`` run every test once per L7 parser mode
(``http_parser_mode``: "auto" - the compiled core or the pure one, with the parse_whole fast
paths - and "strict", the general parser only): the fast paths must not change any verdict.
The mode is a module-scoped parameter that sets $MESHPROXY_HTTP_PARSER (read by every server
and process the tests start); a module-scoped proxy fixture names ``http_parser_mode`` so it is
started once per mode.

Backend: ``backend(host, name=...)`` is a ``tests/backends.py`` ``Backend`` (threads, keep-alive
HTTP/1.1, behaviour chosen by the path) listening on ``host`` port 0, stopped after the test.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import os
import shutil
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

IN_CI = bool(os.environ.get("CI"))

# Debian package that provides each program the tests call (scripts/system-deps.sh installs them).
PACKAGES = {
    "curl": "curl", "dnsmasq": "dnsmasq-base", "dig": "dnsutils", "promtool": "prometheus",
    "nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "nft": "nftables", "ip": "iproute2",
    "etcd": "etcd-server", "slowhttptest": "slowhttptest", "conntrack": "conntrack", "tcpdump": "tcpdump",
}


def unavailable(reason: str) -> None:
    """Skip with ``reason``; in CI fail with it instead (never returns)."""
    if IN_CI:
        pytest.fail(f"needed in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def find_program(program: str) -> str | None:
    """``program`` on $PATH, or in /usr/sbin (not on a normal user's PATH: dnsmasq, nginx)."""
    path = shutil.which(program)
    if path is None and os.access(f"/usr/sbin/{program}", os.X_OK):
        path = f"/usr/sbin/{program}"
    return path


def requires(*programs: str) -> str:
    """The path of the first of ``programs``; skips (fails in CI) when any is not installed."""
    paths = [find_program(p) for p in programs]
    missing = [p for p, path in zip(programs, paths) if path is None]
    if missing:
        what = ", ".join(f"{p} (Debian package {PACKAGES.get(p, p)})" for p in missing)
        verb = "is" if len(missing) == 1 else "are"
        unavailable(f"{what} {verb} not installed; `make system-deps` installs it as root")
    return paths[0]  # type: ignore[return-value]


def requires_root() -> None:
    """Skip (fail in CI) unless running as root (network namespaces and nftables)."""
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces and nftables)")


# -- ports --------------------------------------------------------------------------------------

_PORT_ATTEMPTS = 50
_held: list[socket.socket] = []     # reservations of the running test (free_port(hold=True))


def _bind(host: str, port: int, kind: int, reuse_port: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
    try:
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def free_port(host: str = "127.0.0.1", *more: str, udp: bool = False, hold: bool = False) -> int:
    """A port number free for TCP (and UDP too with ``udp``) on ``host`` and on every host of
    ``more``.

    The kernel picks it: a bind to port 0 on ``host``. While that socket stays bound, the same
    number is bound on each other address (and protocol); if one of them is taken, everything is
    let go and the kernel picks again, at most 50 times. Nothing is drawn at random from a range,
    which two tests running at once could both draw.

    ``hold=True`` keeps the TCP sockets bound — with SO_REUSEPORT, not listening — until the
    test ends, so that no other program and no outgoing connection's ephemeral port can take the
    number before the component under test binds it; the component can, because every meshproxy
    listener sets SO_REUSEPORT too (``meshproxy.core.sockets.listen``), and a connection to the
    held address is refused like one to a free port. Use it for ports meshproxy binds (admin,
    Ingress, L4 Service ports). Leave it off for a program that binds without SO_REUSEPORT
    (nginx, dnsmasq, a Go server, meshproxy's DNS server) and for UDP, where a held socket would
    take its share of the datagrams: then the sockets are closed on return.
    """
    hosts = (host, *more)
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
    for _ in range(_PORT_ATTEMPTS):
        socks: list[socket.socket] = []
        try:
            socks.append(_bind(hosts[0], 0, kinds[0], hold))
            port = socks[0].getsockname()[1]
            for h in hosts:
                for kind in kinds:
                    if (h, kind) != (hosts[0], kinds[0]):
                        socks.append(_bind(h, port, kind, hold and kind == socket.SOCK_STREAM))
        except OSError as exc:
            for s in socks:
                s.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        for s in socks:
            if hold and s.type == socket.SOCK_STREAM:
                _held.append(s)
            else:
                s.close()
        return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)} after {_PORT_ATTEMPTS} tries")


def release_ports() -> None:
    """Let go of every port ``free_port(hold=True)`` reserved (done after each test)."""
    while _held:
        _held.pop().close()


@pytest.fixture(autouse=True)
def _release_held_ports():
    yield
    release_ports()


# -- time ---------------------------------------------------------------------------------------


class FakeTimer:
    """What ``FakeClock.call_at`` returns: the subset of ``asyncio.TimerHandle`` components use."""
    __slots__ = ("_when", "_callback", "_args", "_done")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple) -> None:
        self._when = when
        self._callback = callback
        self._args = args
        self._done = False            # cancelled, or already run

    def cancel(self) -> None:
        self._done = True

    def cancelled(self) -> bool:
        return self._done

    def when(self) -> float:
        return self._when


class FakeClock:
    """A monotonic clock that moves only when the test calls ``advance``.

    ``clock()`` and ``clock.time()`` read it; ``call_later`` / ``call_at`` schedule on it. The
    timers run inside ``advance``, each at its own deadline (``now`` is the deadline while it
    runs) and in deadline order, including timers those callbacks schedule within the interval.
    So a timer can never fire early or late, and "not yet" is a fact, not a race: until the test
    advances past a deadline, nothing scheduled for it has run.
    """

    # A callback that re-arms itself with no delay would keep advance() busy for ever.
    MAX_CALLBACKS_PER_ADVANCE = 100_000

    def __init__(self, start: float = 1000.0) -> None:
        self.now = float(start)
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any, context=None) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any, context=None) -> FakeTimer:
        return self.call_at(self.now + max(0.0, delay), callback, *args)

    def advance(self, seconds: float) -> int:
        """Move ``seconds`` forward, running the timers that come due; returns how many ran."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        target = self.now + seconds
        ran = 0
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if timer._done:
                continue
            timer._done = True
            self.now = max(self.now, when)
            timer._callback(*timer._args)
            ran += 1
            if ran > self.MAX_CALLBACKS_PER_ADVANCE:
                raise RuntimeError(f"timers keep re-arming within {seconds} s: {timer._callback!r}")
        self.now = target
        return ran

    def pending(self) -> list[float]:
        """Deadlines of the timers not yet run nor cancelled, earliest first."""
        return sorted(w for w, _, t in self._timers if not t._done)

    def on(self, loop: asyncio.AbstractEventLoop) -> ClockedLoop:
        return ClockedLoop(loop, self)


class ClockedLoop:
    """``loop`` with its clock and timers taken from a ``FakeClock``: what a component given it
    schedules with ``call_later`` / ``call_at`` runs only when the test advances the clock, and
    ``time()`` is the fake time; sockets, readers, futures and tasks are the real loop's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: FakeClock) -> None:
        self._loop = loop
        self.clock = clock

    def time(self) -> float:
        return self.clock.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any, context=None) -> FakeTimer:
        return self.clock.call_later(delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any, context=None) -> FakeTimer:
        return self.clock.call_at(when, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


# -- L7 parser modes ---------------------------------------------------------------------------

PARSER_SUITES = frozenset({"test_l7", "test_l7_unit", "test_smuggling_e2e", "test_retries"})
PARSER_TEST_MODES = ("auto", "strict")


def pytest_generate_tests(metafunc) -> None:
    if metafunc.module.__name__ in PARSER_SUITES:
        if "http_parser_mode" not in metafunc.fixturenames:
            metafunc.fixturenames.append("http_parser_mode")
        metafunc.parametrize("http_parser_mode", PARSER_TEST_MODES, indirect=True, scope="module",
                             ids=[f"parser-{m}" for m in PARSER_TEST_MODES])


@pytest.fixture(scope="module")
def http_parser_mode(request):
    """The L7 parser mode this module runs under (None outside ``PARSER_SUITES``)."""
    mode = getattr(request, "param", None)
    if mode is None:
        yield None
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHPROXY_HTTP_PARSER", mode)
        yield mode


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- event loops ----------------------------------------------------------------------------------


def run_coroutine(coro, timeout: float = 30.0, *, loop_factory=uvloop.new_event_loop):
    """Run ``coro`` to its end on a new event loop (uvloop unless ``loop_factory`` says
    otherwise) and close the loop; ``timeout`` seconds of real time only keep a hung test from
    hanging for ever — nothing is asserted on it."""
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bounded())


@pytest.fixture
def run():
    """``run(coro, timeout=30, loop_factory=uvloop.new_event_loop)``: see ``run_coroutine``."""
    return run_coroutine


class LoopThread:
    """A uvloop loop running in a daemon thread; the test thread hands it work."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 10.0):
        """Run ``coro`` on the loop and wait (at most ``timeout``: a hang guard) for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0):
        """``fn(*args)`` on the loop's thread; its result."""
        async def call():
            return fn(*args)
        return self.run(call(), timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


# -- backends -------------------------------------------------------------------------------------


@pytest.fixture
def backend():
    """``backend(host="127.0.0.1", name=None)``: a started ``backends.Backend`` on ``host`` port 0;
    every one made is stopped after the test."""
    from backends import Backend   # here, not at the top: backends imports the L7 package
    made = []

    def make(host: str = "127.0.0.1", name: str | None = None) -> Backend:
        b = Backend(host, name=name)
        made.append(b)
        return b
    yield make
    for b in made:
        b.stop()
