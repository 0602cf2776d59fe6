"""Active health checking: every pod's readinessProbe, run the way the kubelet runs it.

A pod with a ``readinessProbe`` is ready only while its probe passes (docs/semantics.md, "Endpoints").
``HealthChecker`` keeps ``results[(namespace, name)]`` for the endpoint computation
(``discovery.endpoints.pod_ready``) and calls ``on_change(namespace, name)`` when a pod's
readiness flips, so the controller publishes a new snapshot. Semantics (docs/health.md):

- a pod is probed when it has a probe and a pod IP and is not Succeeded/Failed; terminating pods
  keep being probed (the kubelet does, and KEP-1669 needs their ``serving`` state);
- initial state not ready; nothing runs before ``initialDelaySeconds`` (counted from when this
  checker first saw the pod); then one attempt every ``periodSeconds``, each bounded by
  ``timeoutSeconds`` (connect, request and response together);
- ready after ``successThreshold`` consecutive successes, not ready after ``failureThreshold``
  consecutive failures; a timeout is a failure (kubelet ``worker.doProbe``);
- httpGet: ``GET scheme://(host or podIP):port/path``, Host ``host-or-podIP:port`` unless an
  httpHeaders entry names Host, ``Connection: close``; success is a final status 200-399;
  redirects are not followed; HTTPS does not verify the certificate; the body is read by its
  framing up to 10 KiB (kubelet ``maxRespBodyLength``) — a truncated body is a failure;
- tcpSocket: the connect succeeding is success;
- a change of the probe, pod IP, uid or resolved port restarts the pod's state (to Kubernetes
  that is a new pod); any other change keeps it.

Invariants (what keeps the cost flat as pods grow):
- ONE scheduler task and a heap of ``(due, seq, state, generation)``; per pod, only a small
  ``_PodProbe`` and one heap entry. A task exists only while a probe is in flight, and at most
  ``max_concurrency`` of them (a semaphore the scheduler acquires before launching);
- every restart or removal bumps the state's generation; heap entries and in-flight results of
  an older generation are ignored (lazy deletion; the heap is compacted when half of it is
  stale), so ``sync`` never searches the heap;
- ``results`` holds an entry only for pods whose readiness was decided at least once; an absent
  key reads as not ready. It is written only here, and only on a flip (or on removal);
- due times stay on each pod's own grid (``first + k * period``); one wake-up launches all
  probes due within min(25 ms, 1 % of their period), so wake-ups do not grow with probes/s; a
  probe that overruns its period skips the missed ticks. The first probe of pods seen in the first period after
  ``start()`` — or of a batch larger than ``max_concurrency`` — is spread uniformly over one
  period (the kubelet's start-up jitter), so 10,000 pods do not fire at once.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import logging
import math
import random as _random
import os
import socket
import ssl
import time
from typing import Callable, Mapping
from urllib.parse import quote

from .objects import Pod, Probe
from .signals import NO_SIGNALS, Signals

__all__ = ["HealthChecker", "ResponseReader", "ProbeError", "build_request", "Thresholds",
           "MAX_BODY", "MAX_HEAD"]

log = logging.getLogger("meshproxy.health")

NsName = tuple[str, str]

# kubelet pkg/probe/http: the body is read up to 10 KiB; more is a non-fatal truncation.
MAX_BODY = 10 * 1024
# Our bound on a response head (status line + headers). Go's default is far larger (1 MiB) but a
# probe endpoint that sends 64 KiB of headers is broken; refusing it is a failure, not a hang.
MAX_HEAD = 64 * 1024
# The kubelet sends "kube-probe/<major>.<minor>"; apps match the "kube-probe/" prefix.
USER_AGENT = "kube-probe/meshproxy"
# One scheduler wake-up launches every probe due within min(_SLACK, 1 % of its period) from
# now: at 1,000 probes/s that is ~25 probes per wake-up instead of ~1, which cuts the checker's
# CPU per probe by a third (bench.probe_cost: 245 -> 171 us). Starting a 10 s probe 25 ms early
# is indistinguishable from on time; the 1 % keeps sub-second test periods exact.
_SLACK = 0.025
_SLACK_SHARE = 0.01

SUCCESS, FAILURE, TIMEOUT = "success", "failure", "timeout"


class ProbeError(Exception):
    """A probe that cannot be run as specified (unknown named port, bad header): a failure."""


# -- pure parts ------------------------------------------------------------------------------------


class Thresholds:
    """Consecutive-result counting of kubelet ``worker.doProbe``: readiness flips only after
    ``success`` passes in a row (to ready) or ``failure`` failures in a row (to not ready)."""
    __slots__ = ("success", "failure", "ready", "last", "run")

    def __init__(self, success: int, failure: int) -> None:
        self.success = max(1, success)
        self.failure = max(1, failure)
        self.ready = False          # the kubelet's initial readiness is Failure
        self.last: bool | None = None
        self.run = 0

    def record(self, ok: bool) -> bool:
        """Count one result; return True when readiness flipped."""
        if ok is self.last:
            self.run += 1
        else:
            self.last, self.run = ok, 1
        if ok == self.ready:
            return False
        if self.run >= (self.success if ok else self.failure):
            self.ready = ok
            return True
        return False


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# RFC 3986 pchar plus '/', '?' (the query is kept, as the kubelet's url.Parse keeps it) and '%'
# (an already-escaped path stays as written); everything else is percent-encoded.
_PATH_SAFE = "/?:@!$&'()*+,;=-._~%"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_request(path: str, host_header: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The probe's request bytes. Defaults as the kubelet sets them (User-Agent, Accept), each
    overridable by httpHeaders, Host too; ``Connection: close`` as its client disables
    keep-alive. Raises ProbeError for a header the request line or head could not carry."""
    path = path.split("#", 1)[0] or "/"
    if not path.startswith("/"):
        path = "/" + path
    target = quote(path, safe=_PATH_SAFE)
    have = set()
    lines = []
    for name, value in headers:
        raw = name.encode("latin-1", "replace")
        if not raw or not set(raw) <= _TOKEN:
            raise ProbeError(f"httpHeaders: {name!r} is not a valid header name")
        if any(c in value for c in "\r\n\0"):
            raise ProbeError(f"httpHeaders: {name}: value contains CR, LF or NUL")
        low = name.lower()
        if low == "host":
            host_header = value   # the kubelet moves a Host entry to req.Host
            continue
        have.add(low)
        lines.append(f"{name}: {value}\r\n")
    head = [f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"]
    if "user-agent" not in have:
        head.append(f"User-Agent: {USER_AGENT}\r\n")
    if "accept" not in have:
        head.append("Accept: */*\r\n")
    head.extend(lines)
    head.append("Connection: close\r\n\r\n")
    try:
        return "".join(head).encode("latin-1")
    except UnicodeEncodeError:
        # Go sends header values as UTF-8 bytes; latin-1 first keeps the common case byte-exact.
        return "".join(head).encode("utf-8")


class _BadResponse(Exception):
    pass


class ResponseReader:
    """Just enough HTTP/1.x response parsing for a probe, fed bytes, no I/O.

    ``feed(data)`` / ``feed_eof()`` return True once the outcome is known; then ``ok`` says
    whether the probe passed. The outcome is known when the final response's body is complete
    by its framing (Content-Length, chunked, or end of stream), or 10 KiB of it have arrived.
    Interim 1xx responses other than 101 are skipped (Go's client does the same). A malformed
    head, a head above ``MAX_HEAD`` or a body cut short are failures."""
    __slots__ = ("_buf", "status", "_mode", "_left", "_body", "_done", "ok")

    _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _EOF = range(7)

    def __init__(self) -> None:
        self._buf = b""
        self.status = 0
        self._mode = self._HEAD
        self._left = 0
        self._body = 0
        self._done = False
        self.ok = False

    def _finish(self, ok: bool) -> bool:
        self._done = True
        self.ok = ok and 200 <= self.status < 400
        self._buf = b""
        return True

    def feed(self, data: bytes) -> bool:
        if self._done:
            return True
        buf = self._buf + data if self._buf else data
        try:
            return self._advance(buf)
        except _BadResponse:
            return self._finish(False)

    def feed_eof(self) -> bool:
        if self._done:
            return True
        # End of stream completes only a close-delimited body; anything else was cut short.
        return self._finish(self._mode == self._EOF)

    def _advance(self, buf: bytes) -> bool:
        while True:
            mode = self._mode
            if mode == self._HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    end2 = buf.find(b"\n\n")   # Go's reader accepts bare LF line ends
                    if end2 < 0:
                        if len(buf) > MAX_HEAD:
                            raise _BadResponse("head too large")
                        self._buf = buf
                        return False
                    head, buf = buf[:end2], buf[end2 + 2:]
                else:
                    head, buf = buf[:end], buf[end + 4:]
                if len(head) > MAX_HEAD:
                    raise _BadResponse("head too large")
                if self._parse_head(head):
                    continue          # interim 1xx: parse the next head
                if self._mode == self._HEAD:   # no body (204, 304, Content-Length: 0)
                    return self._finish(True)
            elif mode == self._LENGTH:
                take = min(len(buf), self._left)
                self._left -= take
                self._body += take
                buf = buf[take:]
                if self._left == 0 or self._body >= MAX_BODY:
                    return self._finish(True)
                self._buf = b""
                return False
            elif mode == self._EOF:
                self._body += len(buf)
                self._buf = b""
                if self._body >= MAX_BODY:
                    return self._finish(True)
                return False
            elif mode == self._CHUNK_SIZE or mode == self._CHUNK_CRLF or mode == self._TRAILER:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > 4096:
                        raise _BadResponse("chunk line too long")
                    self._buf = buf
                    return False
                line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1:]
                if mode == self._CHUNK_CRLF:
                    if line:
                        raise _BadResponse("missing CRLF after chunk")
                    self._mode = self._CHUNK_SIZE
                elif mode == self._TRAILER:
                    if not line:
                        return self._finish(True)
                else:
                    size_text = line.split(b";", 1)[0].strip()
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        raise _BadResponse("bad chunk size") from None
                    if size < 0 or not size_text.isalnum():
                        raise _BadResponse("bad chunk size")
                    if size == 0:
                        self._mode = self._TRAILER
                    else:
                        self._mode, self._left = self._CHUNK_DATA, size
            else:  # _CHUNK_DATA
                take = min(len(buf), self._left)
                self._left -= take
                self._body += take
                buf = buf[take:]
                if self._body >= MAX_BODY:
                    return self._finish(True)
                if self._left:
                    self._buf = b""
                    return False
                self._mode = self._CHUNK_CRLF

    def _parse_head(self, head: bytes) -> bool:
        """Set status and body mode from one head; True when it was an interim 1xx response."""
        lines = head.split(b"\n")
        parts = lines[0].rstrip(b"\r").split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise _BadResponse("bad status line")
        status = int(parts[1])
        if status < 100:
            raise _BadResponse("bad status code")
        self.status = status
        if 100 <= status < 200 and status != 101:
            return True
        length = None
        chunked = False
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep:
                if raw.strip():
                    raise _BadResponse("bad header line")
                continue
            name = name.lower()
            if name == b"content-length":
                v = value.strip()
                if not v.isdigit() or (length is not None and int(v) != length):
                    raise _BadResponse("bad Content-Length")
                length = int(v)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        if status in (204, 304) or status == 101:
            self._mode = self._HEAD   # no body: done
        elif chunked:
            self._mode = self._CHUNK_SIZE
        elif length is not None:
            if length == 0:
                self._mode = self._HEAD
            else:
                self._mode, self._left = self._LENGTH, length
        else:
            self._mode = self._EOF
        return False


# -- the I/O layer ---------------------------------------------------------------------------------


class _HttpProbe(asyncio.Protocol):
    """Writes the request, feeds the reader, resolves ``done`` with the finished reader."""
    __slots__ = ("request", "reader", "done")

    def __init__(self, request: bytes, done: asyncio.Future) -> None:
        self.request = request
        self.reader = ResponseReader()
        self.done = done

    def connection_made(self, transport) -> None:  # type: ignore[override]
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.reader.feed(data) and not self.done.done():
            self.done.set_result(self.reader)

    def eof_received(self) -> bool:
        if self.reader.feed_eof() and not self.done.done():
            self.done.set_result(self.reader)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.reader.feed_eof()
            self.done.set_result(self.reader)


class _RawProbe:
    """One attempt over a bare non-blocking socket, driven by loop callbacks: no Task, Future or
    transport per probe, which halves the CPU of a probe. Used for plain HTTP and TCP to an IP
    address — the common case; HTTPS and host names take the task path.

    Every exit goes through ``_end`` exactly once: it cancels the timer, unregisters the fd,
    closes the socket and hands the result to the checker (which frees the slot)."""
    __slots__ = ("checker", "loop", "st", "gen", "due", "sock", "fd", "timer", "reader", "out",
                 "reading", "writing", "ended")

    def __init__(self, checker: "HealthChecker", loop: asyncio.AbstractEventLoop, st: "_PodProbe",
                 gen: int, due: float) -> None:
        self.checker = checker
        self.loop = loop
        self.st = st
        self.gen = gen
        self.due = due
        self.sock: socket.socket | None = None
        self.fd = -1
        self.timer: asyncio.TimerHandle | None = None
        self.reader: ResponseReader | None = None
        self.out = b""
        self.reading = self.writing = False
        self.ended = False

    def start(self) -> None:
        plan = self.st.plan
        self.checker._raw.add(self)
        try:
            sock = self.sock = socket.socket(plan.family, socket.SOCK_STREAM)
            sock.setblocking(False)
            self.fd = sock.fileno()
            self.timer = self.loop.call_later(self.st.probe.timeout, self._timed_out)
            err = sock.connect_ex((plan.host, plan.port))
        except OSError as e:       # out of fds, or an address the family cannot take
            self._end(FAILURE, f"{type(e).__name__}: {e}")
            return
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            self.writing = True
            self.loop.add_writer(self.fd, self._on_connect)
        else:
            self._end(FAILURE, os.strerror(err))

    def _on_connect(self) -> None:
        try:
            self.loop.remove_writer(self.fd)
            self.writing = False
            assert self.sock is not None
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._end(FAILURE, os.strerror(err))
            else:
                self._connected()
        except Exception as e:  # a callback must not raise into the loop with the slot taken
            self._crash(e)

    def _connected(self) -> None:
        request = self.st.plan.request
        if request is None:        # tcpSocket: the connect was the probe
            self._end(SUCCESS, None)
            return
        self.reader = ResponseReader()
        self._send(request)
        if not self.ended:
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._end(FAILURE, f"{type(e).__name__}: {e}")
            return
        self.out = data[n:]
        if self.out and not self.writing:
            self.writing = True
            self.loop.add_writer(self.fd, self._on_writable)
        elif not self.out and self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)

    def _on_writable(self) -> None:
        try:
            self._send(self.out)
        except Exception as e:
            self._crash(e)

    def _on_readable(self) -> None:
        try:
            assert self.sock is not None and self.reader is not None
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # reset before the response was complete
                self._end(FAILURE, f"{type(e).__name__}: {e}")
                return
            reader = self.reader
            if data:
                if not reader.feed(data):
                    return
            else:
                reader.feed_eof()
            self._end(SUCCESS if reader.ok else FAILURE,
                      None if reader.ok else _describe(reader))
        except Exception as e:
            self._crash(e)

    def _timed_out(self) -> None:
        self.timer = None
        self._end(TIMEOUT, f"no answer within {self.st.probe.timeout:g}s")

    def _crash(self, e: Exception) -> None:
        log.error("health: probe of %s/%s crashed", *self.st.key, exc_info=e)
        self._end(FAILURE, f"internal error: {e!r}")

    def _close(self) -> None:
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reading:
            self.loop.remove_reader(self.fd)
        if self.writing:
            self.loop.remove_writer(self.fd)
        if self.sock is not None:
            self.sock.close()
        self.checker._raw.discard(self)

    def _end(self, result: str, error: str | None) -> None:
        if self.ended:
            return
        self._close()
        self.checker._finish(self.st, self.gen, self.due, result, error)

    def abort(self) -> None:
        """The checker is stopping: drop the attempt, free the slot, report nothing."""
        if not self.ended:
            self._close()
            self.checker._release(self.st, self.gen)


def _address_family(host: str) -> int:
    """AF_INET / AF_INET6 for an IP literal, 0 for a name (inet_pton: 20x cheaper than ipaddress)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except (OSError, ValueError):   # OSError: not this family; ValueError: embedded NUL
            pass
    return 0


def _describe(reader: ResponseReader) -> str:
    return f"HTTP status {reader.status}" if reader.status else "no valid HTTP response"


class _Plan:
    """How to run one pod's probe, computed once per (re)start of its state."""
    __slots__ = ("action", "host", "port", "request", "tls", "family", "error", "raw")

    def __init__(self, pod: Pod, probe: Probe) -> None:
        self.error: str | None = None
        self.request: bytes | None = None
        self.tls = probe.action == "http" and probe.scheme.upper() == "HTTPS"
        self.action = probe.action
        self.host = probe.host or pod.pod_ip or ""
        port = probe.port
        if isinstance(port, str):
            resolved = pod.named_port(port)
            if resolved is None:
                self.error = f"named port {port!r} is not a TCP port of any container"
            port = resolved or 0
        self.port = port
        if self.error is None and not 0 < port < 65536:
            self.error = f"port {port} is out of range"
        self.family = _address_family(self.host)          # 0: a name, resolved at connect
        if self.error is None and probe.action == "http":
            try:
                self.request = build_request(probe.path, _host_port(self.host, port), probe.headers)
            except ProbeError as e:
                self.error = str(e)
        # The callback path needs an address it can connect to without resolving, and no TLS.
        self.raw = self.error is None and self.family != 0 and not self.tls

    def target(self) -> str:
        scheme = ("https" if self.tls else "http") if self.action == "http" else "tcp"
        return f"{scheme}://{_host_port(self.host, self.port)}"


class _PodProbe:
    __slots__ = ("key", "pod", "probe", "incarnation", "plan", "thresholds", "gen", "due",
                 "inflight", "attempts", "last_result", "last_error", "logged_error")

    def __init__(self, key: NsName, pod: Pod, incarnation: tuple) -> None:
        self.key = key
        self.pod = pod
        self.probe: Probe = pod.readiness_probe  # type: ignore[assignment]
        self.incarnation = incarnation
        self.plan = _Plan(pod, self.probe)
        self.thresholds = Thresholds(self.probe.success_threshold, self.probe.failure_threshold)
        self.gen = 0
        self.due = 0.0
        self.inflight = False
        self.attempts = 0
        self.last_result: str | None = None
        self.last_error: str | None = None
        self.logged_error = False


def _probeable(pod: Pod) -> bool:
    return pod.readiness_probe is not None and bool(pod.pod_ip) and pod.phase not in ("Succeeded", "Failed")


def _incarnation(pod: Pod) -> tuple:
    probe = pod.readiness_probe
    port = probe.port if probe is not None else None
    if isinstance(port, str):
        port = (port, pod.named_port(port))
    return (probe, pod.pod_ip, pod.meta.uid, port)


def _insecure_context() -> ssl.SSLContext:
    # The kubelet's prober sets InsecureSkipVerify: probes check liveness of a port, not identity.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class HealthChecker:
    """Runs the readiness probes of the pods handed to ``sync``; see the module docstring."""

    def __init__(self, results: dict[NsName, bool], on_change: Callable[[str, str], None], *,
                 max_concurrency: int = 256, clock: Callable[[], float] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 jitter=_random, signals: Signals = NO_SIGNALS) -> None:
        """``jitter`` has a ``random()`` in [0, 1) (the ``random`` module, a ``random.Random``);
        ``signals.probe(result)`` is told of every probe run (``discovery.signals``).
        ``loop``: the running loop by default; the scheduler's wake-ups and the probes'
        timeouts are its timers (``call_later``). ``clock`` reads the time probes are due at:
        ``loop.time`` when a loop is given, else ``time.monotonic``. So a loop with another
        clock drives the whole schedule."""
        self.results = results
        self.on_change = on_change
        self.max_concurrency = max(1, max_concurrency)
        self._loop = loop
        self._clock = clock or (loop.time if loop is not None else time.monotonic)
        self._jitter = jitter
        self._signal_probe = signals.probe
        self._states: dict[NsName, _PodProbe] = {}
        self._heap: list[tuple[float, int, _PodProbe, int]] = []
        self._stale = 0
        self._seq = itertools.count()
        self._sem: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._probes: set[asyncio.Task] = set()
        self._raw: set[_RawProbe] = set()
        self._wake: asyncio.Future | None = None
        self._wake_at = math.inf
        self._started: float | None = None
        self._ssl: ssl.SSLContext | None = None
        # Counters for tests, the benchmark and /debug.
        self.probes_run = 0
        self.inflight = 0
        self.peak_inflight = 0

    # -- state changes (called by the controller, on the loop) ------------------------------------

    def sync(self, pods: Mapping[NsName, Pod]) -> None:
        """Bring probe states in line with ``pods`` (all pods, probed or not). Unchanged pods
        (same object) cost one dict lookup each."""
        states = self._states
        matched = 0
        fresh: list[_PodProbe] = []
        for key, pod in pods.items():
            st = states.get(key)
            if st is not None and st.pod is pod:
                matched += 1
                continue
            if not _probeable(pod):
                continue            # an existing state for it is removed below
            inc = _incarnation(pod)
            if st is None:
                st = _PodProbe(key, pod, inc)
                states[key] = st
                fresh.append(st)
            elif st.incarnation == inc:
                st.pod = pod        # labels, conditions, deletionTimestamp: probing goes on
            else:
                self._restart(st, pod, inc)
                fresh.append(st)
            matched += 1
        if matched != len(states):
            for key in [k for k, st in states.items()
                        if (p := pods.get(k)) is None or (p is not st.pod and not _probeable(p))]:
                self._remove(key)
        if fresh:
            self._schedule_first(fresh)

    def _restart(self, st: _PodProbe, pod: Pod, inc: tuple) -> None:
        st.gen += 1
        if not st.inflight:
            self._stale += 1        # its heap entry is now dead (an in-flight probe has none)
        was_ready = st.thresholds.ready
        new = _PodProbe(st.key, pod, inc)
        for name in _PodProbe.__slots__:
            if name != "gen":
                setattr(st, name, getattr(new, name))
        if was_ready:
            self._publish(st.key, False)

    def _remove(self, key: NsName) -> None:
        st = self._states.pop(key)
        st.gen += 1
        if not st.inflight:
            self._stale += 1
        # No on_change: the pod left the store (or lost its probe), so the controller already
        # recomputes its services; the entry must not outlive it.
        self.results.pop(key, None)

    def _schedule_first(self, fresh: list[_PodProbe]) -> None:
        now = self._clock()
        big_batch = len(fresh) > self.max_concurrency
        for st in fresh:
            period = st.probe.period
            delay = st.probe.initial_delay
            # The kubelet sleeps a random part of the period before a worker's first probe when
            # it has itself just started; a pod that appears later is probed right away so that
            # a new pod of a rolling update turns ready at once. A large batch (a new file of
            # thousands of pods) is spread too, or it would stay in phase forever.
            if big_batch or self._started is None or now - self._started < period:
                delay += self._jitter.random() * period
            self._push(st, now + delay)
        self._maybe_compact()

    def _push(self, st: _PodProbe, due: float) -> None:
        st.due = due
        heapq.heappush(self._heap, (due, next(self._seq), st, st.gen))
        if due < self._wake_at and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _maybe_compact(self) -> None:
        if self._stale > 64 and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2].gen == e[3] and self._states.get(e[2].key) is e[2]]
            heapq.heapify(self._heap)
            self._stale = 0

    def _publish(self, key: NsName, ready: bool) -> None:
        self.results[key] = ready
        try:
            self.on_change(*key)
        except Exception:  # the controller's bug must not stop probing of every other pod
            log.exception("health: on_change(%s/%s) failed", *key)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            return
        loop = self._loop or asyncio.get_running_loop()
        self._started = self._clock()
        self._sem = asyncio.Semaphore(self.max_concurrency)
        # Pods synced before start() were scheduled from their sync time; that is still right.
        self._task = loop.create_task(self._scheduler(), name="meshproxy-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        tasks = [t for t in (task, *self._probes) if t is not None]
        for raw in list(self._raw):
            raw.abort()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()

    # -- the scheduler ------------------------------------------------------------------------

    async def _scheduler(self) -> None:
        loop = self._loop or asyncio.get_running_loop()
        assert self._sem is not None
        sem = self._sem
        while True:
            heap = self._heap            # _maybe_compact may have replaced the list
            now = self._clock()
            while heap:
                due, _, st, gen = heap[0]
                if due > now + min(_SLACK, st.probe.period * _SLACK_SHARE):
                    break
                heapq.heappop(heap)
                if st.gen != gen:
                    self._stale = max(0, self._stale - 1)
                    continue
                if sem.locked():
                    # Back-pressure: launch nothing more until a probe finishes. Pods keep their
                    # grid; the ones that waited simply run late this once.
                    await sem.acquire()
                    heap = self._heap
                    if st.gen != gen:    # removed or restarted while we waited
                        sem.release()
                        self._stale = max(0, self._stale - 1)
                        continue
                else:
                    await sem.acquire()  # a free slot: returns without suspending
                self._launch(loop, st, gen, due)
            self._wake_at = heap[0][0] if heap else math.inf
            self._wake = fut = loop.create_future()
            handle = None
            if heap:
                handle = loop.call_later(max(0.0, self._wake_at - self._clock()), _wake_up, fut)
            try:
                await fut
            finally:
                if handle is not None:
                    handle.cancel()
                self._wake = None
                self._wake_at = math.inf
            self._maybe_compact()

    def _launch(self, loop: asyncio.AbstractEventLoop, st: _PodProbe, gen: int, due: float) -> None:
        st.inflight = True
        self.inflight += 1
        if self.inflight > self.peak_inflight:
            self.peak_inflight = self.inflight
        if st.plan.raw:
            _RawProbe(self, loop, st, gen, due).start()
            return
        task = loop.create_task(self._probe(st, gen, due))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, st: _PodProbe, gen: int, due: float) -> None:
        """The general path (HTTPS, host names, plans that cannot run): one task per attempt."""
        try:
            result, error = await self._attempt(st.plan, st.probe.timeout)
        except asyncio.CancelledError:
            self._release(st, gen)
            raise
        except Exception as e:   # a bug here must fail one probe, not the checker
            log.exception("health: probe of %s/%s crashed", *st.key)
            result, error = FAILURE, f"internal error: {e!r}"
        self._finish(st, gen, due, result, error)

    def _release(self, st: _PodProbe, gen: int) -> None:
        if st.gen == gen:        # after a restart, the flag belongs to the new generation
            st.inflight = False
        self.inflight -= 1
        assert self._sem is not None
        self._sem.release()

    def _finish(self, st: _PodProbe, gen: int, due: float, result: str, error: str | None) -> None:
        """One attempt is over: free its slot, count it, apply thresholds, schedule the next."""
        self._release(st, gen)
        self.probes_run += 1
        self._signal_probe(result)
        if st.gen != gen or self._task is None:
            return                 # restarted or removed while in flight, or stopping: moot
        st.attempts += 1
        st.last_result = result
        st.last_error = error
        if st.plan.error is not None and not st.logged_error:
            st.logged_error = True
            log.warning("Pod/%s/%s: readinessProbe cannot run: %s", st.key[0], st.key[1], st.plan.error)
        th = st.thresholds
        if th.record(result == SUCCESS):
            ready = th.ready
            self._publish(st.key, ready)
            # Turning ready is the normal course (10,000 lines at start-up); losing it is news.
            log.log(logging.DEBUG if ready else logging.INFO, "Pod/%s/%s: readiness probe %s%s -> %s",
                    st.key[0], st.key[1], result, f" ({error})" if error else "",
                    "ready" if ready else "not ready")
        elif st.key not in self.results and th.last is False and th.run >= th.failure:
            # The first verdict is "not ready" (no flip from the initial state): publish it
            # anyway, since until a result exists the pod's Ready condition stands in.
            self._publish(st.key, False)
            log.info("Pod/%s/%s: readiness probe %s%s -> not ready", st.key[0], st.key[1], result,
                     f" ({error})" if error else "")
        period = st.probe.period
        nxt = due + period
        now = self._clock()
        if nxt < now:             # overran its period: skip the missed ticks, stay on the grid
            nxt += math.ceil((now - nxt) / period) * period
        self._push(st, nxt)

    async def _attempt(self, plan: _Plan, timeout: float) -> tuple[str, str | None]:
        if plan.error is not None:
            return FAILURE, plan.error
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if plan.action == "tcp":
                    transport, _ = await loop.create_connection(asyncio.Protocol, plan.host, plan.port,
                                                                family=plan.family)
                    transport.close()
                    return SUCCESS, None
                done = loop.create_future()
                if plan.tls:
                    if self._ssl is None:
                        self._ssl = _insecure_context()
                    transport, _ = await loop.create_connection(
                        lambda: _HttpProbe(plan.request, done), plan.host, plan.port, family=plan.family,  # type: ignore[arg-type]
                        ssl=self._ssl)
                else:
                    transport, _ = await loop.create_connection(
                        lambda: _HttpProbe(plan.request, done), plan.host, plan.port, family=plan.family)  # type: ignore[arg-type]
                try:
                    reader = await done
                finally:
                    transport.close()
                return (SUCCESS, None) if reader.ok else (FAILURE, _describe(reader))
        except TimeoutError:
            return TIMEOUT, f"no answer within {timeout:g}s"
        # Every way a connect or TLS handshake can fail is an OSError (ssl.SSLError included).
        except OSError as e:
            return FAILURE, f"{type(e).__name__}: {e}"

    # -- introspection ------------------------------------------------------------------------

    def readiness(self, namespace: str, name: str) -> bool | None:
        st = self._states.get((namespace, name))
        return None if st is None else st.thresholds.ready

    def state(self) -> dict:
        """JSON for /debug: counters and per-pod probe state (sorted by namespace/name)."""
        now = self._clock()
        pods = []
        for (ns, name), st in sorted(self._states.items()):
            t = st.thresholds
            pods.append({"namespace": ns, "name": name, "target": st.plan.target(),
                         "ready": t.ready, "attempts": st.attempts, "lastResult": st.last_result,
                         "lastError": st.last_error, "consecutive": t.run,
                         "nextProbeIn": round(max(0.0, st.due - now), 3), "inflight": st.inflight})
        return {"probed": len(self._states), "probesRun": self.probes_run, "inflight": self.inflight,
                "peakInflight": self.peak_inflight, "maxConcurrency": self.max_concurrency,
                "pods": pods}


def _wake_up(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
