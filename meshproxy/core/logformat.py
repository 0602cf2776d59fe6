"""Access-log records and the formats that turn them into lines (``--access-log-format``).

A record is filled by the data plane when a request (``HttpRecord``) or an L4 connection
(``TcpRecord``) ends and handed to ``meshproxy.core.accesslog.AccessLog``; formatting happens
later, on the log's writer thread, so the data path only pays for one object. Records are
plain data and must not change once handed over (the writer reads them from another thread).

Formats:

* ``text``: the line meshproxy always wrote for HTTP (nginx-like, see ``_text_http``), and a
  line of the same shape for L4 connections;
* ``json``: one object per line, fixed keys (docs/observability.md lists them), ``null`` for
  what is missing; ``status`` and byte counts are integers, ``duration`` is seconds (float);
* a TEMPLATE with Envoy's command operators (``%START_TIME%``, ``%REQ(X?Y):Z%``,
  ``%RESPONSE_CODE%`` ...), compiled once into a %-format string plus one getter per
  operator. As in Envoy, a missing or empty value prints ``-``, and operators that mean
  nothing for L4 (``%PROTOCOL%``, ``%RESPONSE_CODE%``, ``%REQ(...)%``) print ``-`` there.
  Unlike Envoy, ``%%`` is a literal ``%`` and a line always ends with one newline.

Values a client controls (request line, header values) have control characters, ``"`` and
``\\`` escaped in text and template lines, so nobody can forge a log line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Any, Callable, Sequence

__all__ = [
    "HttpRecord",
    "TcpRecord",
    "Formatter",
    "compile_format",
    "FormatError",
    "OPERATORS",
    "FLAG_NO_ROUTE",
    "FLAG_NO_HEALTHY_UPSTREAM",
    "FLAG_UPSTREAM_CONNECT_FAILURE",
    "FLAG_UPSTREAM_RETRY_LIMIT",
    "FLAG_UPSTREAM_TIMEOUT",
    "FLAG_UPSTREAM_RESET",
    "FLAG_UPSTREAM_TERMINATION",
    "FLAG_UPSTREAM_PROTOCOL_ERROR",
    "FLAG_DOWNSTREAM_TERMINATION",
    "FLAG_DOWNSTREAM_PROTOCOL_ERROR",
    "FLAG_STREAM_IDLE_TIMEOUT",
    "FLAG_OVERFLOW",
]

# Response flags: Envoy's short codes, so dashboards and habits carry over. A record holds
# them comma-separated in ``flags`` ("" when none).
FLAG_NO_ROUTE = "NR"                    # 404: no rule matched
FLAG_NO_HEALTHY_UPSTREAM = "UH"         # 503: the backend has no usable endpoint
FLAG_UPSTREAM_CONNECT_FAILURE = "UF"    # connecting to the endpoint failed
FLAG_UPSTREAM_RETRY_LIMIT = "URX"       # attempts exhausted (HTTP retries, L4 connect attempts)
FLAG_UPSTREAM_TIMEOUT = "UT"            # 504: the response did not come in time
FLAG_UPSTREAM_RESET = "UR"              # the endpoint reset the connection
FLAG_UPSTREAM_TERMINATION = "UC"        # the endpoint closed the connection early
FLAG_UPSTREAM_PROTOCOL_ERROR = "UPE"    # 502: the endpoint's response was not valid HTTP
FLAG_DOWNSTREAM_TERMINATION = "DC"      # the client went away before the response was complete
FLAG_DOWNSTREAM_PROTOCOL_ERROR = "DPE"  # 4xx: the client's request was not valid HTTP
FLAG_STREAM_IDLE_TIMEOUT = "SI"         # 408: header / body / send timeout
FLAG_OVERFLOW = "UO"                    # refused by a limit (retry budget, max connections)


class FormatError(ValueError):
    """A TEMPLATE that cannot be compiled; the message names the column and the operator."""


class HttpRecord:
    """One HTTP request as the exchange saw it. Byte strings are as on the wire (latin-1);
    ``start_time`` is seconds since the epoch (``AccessLog.log`` fills it from ``duration``
    when left None); ``status`` 0 means no response was sent; ``upstream_host`` is the
    ``ip:port`` of the last attempt ("" when the proxy answered itself)."""

    __slots__ = (
        "method", "target", "authority", "protocol", "scheme", "status", "bytes_received", "bytes_sent",
        "duration", "start_time", "upstream_host", "upstream_service", "route", "ingress", "request_id",
        "trace_id", "attempts", "client", "client_port", "local", "sni", "request_headers",
        "response_headers", "flags",
    )
    kind = "http"

    def __init__(self, method: bytes = b"", target: bytes = b"", authority: bytes = b"",
                 protocol: str = "HTTP/1.1", status: int = 0, bytes_received: int = 0, bytes_sent: int = 0,
                 duration: float = 0.0, *, start_time: float | None = None, scheme: str = "http",
                 upstream_host: str = "", upstream_service: str = "", route: str = "", ingress: str = "",
                 request_id: bytes | str = "", trace_id: str = "", attempts: int = 0, client: str = "",
                 client_port: int = 0, local: str = "", sni: str = "",
                 request_headers: Sequence[tuple[bytes, bytes]] = (),
                 response_headers: Sequence[tuple[bytes, bytes]] = (), flags: str = "") -> None:
        self.method = method
        self.target = target
        self.authority = authority
        self.protocol = protocol
        self.scheme = scheme
        self.status = status
        self.bytes_received = bytes_received
        self.bytes_sent = bytes_sent
        self.duration = duration
        self.start_time = start_time
        self.upstream_host = upstream_host
        self.upstream_service = upstream_service
        self.route = route
        self.ingress = ingress
        self.request_id = request_id
        self.trace_id = trace_id
        self.attempts = attempts
        self.client = client
        self.client_port = client_port
        self.local = local
        self.sni = sni
        self.request_headers = request_headers
        self.response_headers = response_headers
        self.flags = flags


class TcpRecord:
    """One L4 connection: ``bytes_received`` from the client, ``bytes_sent`` to it;
    ``service`` is ``namespace/name:port``; ``local`` the listener ``ip:port``."""

    __slots__ = ("start_time", "client", "client_port", "local", "service", "upstream_host",
                 "bytes_received", "bytes_sent", "duration", "attempts", "flags")
    kind = "tcp"

    def __init__(self, client: str, client_port: int, local: str, service: str, upstream_host: str,
                 bytes_received: int, bytes_sent: int, duration: float, attempts: int = 1, flags: str = "",
                 start_time: float | None = None) -> None:
        self.start_time = start_time
        self.client = client
        self.client_port = client_port
        self.local = local
        self.service = service
        self.upstream_host = upstream_host
        self.bytes_received = bytes_received
        self.bytes_sent = bytes_sent
        self.duration = duration
        self.attempts = attempts
        self.flags = flags


# -- helpers ---------------------------------------------------------------------------------------

_ESCAPE = {c: "\\x%02x" % c for c in range(32)}
_ESCAPE.update({0x22: '\\"', 0x5C: "\\\\", 0x7F: "\\x7f"})


def _clean(text: str) -> str:
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.translate(_ESCAPE)


def _s(value) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


def _addr(ip: str, port: int) -> str:
    if not ip:
        return ""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """Every field named ``name`` (lowercase), joined with "," as RFC 9110 §5.3 allows."""
    found = None
    for n, v in headers:
        if len(n) == len(name) and n.lower() == name:
            found = v if found is None else found + b"," + v
    return None if found is None else found.decode("latin-1")


class _StampCache:
    """strftime once per second: the part of a time stamp that changes at most once a second."""
    __slots__ = ("fmt", "sec", "text")

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.sec = -1
        self.text = ""

    def get(self, sec: int) -> str:
        if sec != self.sec:
            self.sec = sec
            self.text = time.strftime(self.fmt, time.gmtime(sec))
        return self.text


def _start(rec) -> float:
    t = rec.start_time
    return t if t is not None else time.time() - rec.duration


# -- text ------------------------------------------------------------------------------------------

class _Text:
    def __init__(self) -> None:
        self.stamp = _StampCache("%d/%b/%Y:%H:%M:%S +0000")

    def http(self, r: HttpRecord) -> str:
        # The time is when the request ended, as it always was for this line.
        request = "%s %s %s" % (_s(r.method), _s(r.target), r.protocol)
        return '%s - - [%s] "%s" %d %d %.4f upstream=%s ingress=%s route="%s" attempts=%d\n' % (
            r.client or "-", self.stamp.get(int(_start(r) + r.duration)), _clean(request), r.status,
            r.bytes_sent, r.duration, r.upstream_host or "-", r.ingress or "-",
            _clean(r.route) if r.route else "-", r.attempts)

    def tcp(self, r: TcpRecord) -> str:
        return '%s - - [%s] "TCP %s" - %d %.4f upstream=%s service=%s received=%d attempts=%d flags=%s\n' % (
            r.client or "-", self.stamp.get(int(_start(r) + r.duration)), r.local or "-", r.bytes_sent,
            r.duration, r.upstream_host or "-", r.service or "-", r.bytes_received, r.attempts, r.flags or "-")


# -- json ------------------------------------------------------------------------------------------

def _iso(t: float) -> str:
    ms = int(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


class _Json:
    def http(self, r: HttpRecord) -> str:
        h = r.request_headers
        return json.dumps({
            "start_time": _iso(_start(r)),
            "method": _s(r.method) or None,
            "path": _s(r.target) or None,
            "authority": _s(r.authority) or None,
            "protocol": r.protocol,
            "status": r.status,
            "bytes_received": r.bytes_received,
            "bytes_sent": r.bytes_sent,
            "duration": round(r.duration, 6),
            "upstream_host": r.upstream_host or None,
            "upstream_service": r.upstream_service or None,
            "route": r.route or None,
            "ingress": r.ingress or None,
            "request_id": _s(r.request_id) or None,
            "trace_id": r.trace_id or None,
            "attempts": r.attempts,
            "client": r.client or None,
            "user_agent": _header(h, b"user-agent"),
            "x_forwarded_for": _header(h, b"x-forwarded-for"),
            "response_flags": r.flags or None,
        }, separators=(",", ":")) + "\n"

    def tcp(self, r: TcpRecord) -> str:
        return json.dumps({
            "start_time": _iso(_start(r)),
            "protocol": "TCP",
            "client": r.client or None,
            "local": r.local or None,
            "upstream_service": r.service or None,
            "upstream_host": r.upstream_host or None,
            "bytes_received": r.bytes_received,
            "bytes_sent": r.bytes_sent,
            "duration": round(r.duration, 6),
            "attempts": r.attempts,
            "response_flags": r.flags or None,
        }, separators=(",", ":")) + "\n"


# -- templates -------------------------------------------------------------------------------------

def _dash(text) -> str:
    return text if text else "-"


def _time_getter(fmt: str | None) -> Callable[[Any], str]:
    """``%START_TIME(FMT)%``: strftime in UTC plus Envoy's ``%s`` (epoch seconds) and ``%f`` /
    ``%1f``..``%9f`` (fraction digits, 9 by default). Default: 2024-05-01T12:00:00.123Z."""
    if not fmt:
        fmt = "%Y-%m-%dT%H:%M:%S.%3fZ"
    pieces: list = []       # str: strftime text; int: fraction digits; None: epoch seconds
    pos = 0
    for m in re.finditer(r"%%|%s|%([1-9]?)f", fmt):
        if m.group(0) == "%%":
            continue
        if m.start() > pos:
            pieces.append(_StampCache(fmt[pos:m.start()]))
        pieces.append(None if m.group(0) == "%s" else int(m.group(1) or 9))
        pos = m.end()
    if pos < len(fmt):
        pieces.append(_StampCache(fmt[pos:]))

    def get(rec) -> str:
        t = _start(rec)
        sec = int(t)
        out = []
        for p in pieces:
            if p is None:
                out.append(str(sec))
            elif isinstance(p, int):
                out.append(("%09d" % int((t - sec) * 1e9))[:p])
            else:
                out.append(p.get(sec))
        return "".join(out)
    return get


def _pseudo_http(name: str):
    """Envoy's pseudo-headers, taken from the record's own fields."""
    return {
        ":method": lambda r: _s(r.method),
        ":path": lambda r: _s(r.target),
        ":authority": lambda r: _s(r.authority),
        ":scheme": lambda r: r.scheme,
    }.get(name)


def _req_getter(arg: str, trunc: int | None, response: bool = False, strip_query: bool = False):
    names = [n.strip().lower() for n in arg.split("?")]
    if not names or len(names) > 2 or not all(names):
        raise ValueError(f"expected HEADER or HEADER?ALTERNATIVE, got {arg!r}")
    lookups = []
    for name in names:
        pseudo = None if response else _pseudo_http(name)
        key = name.encode("latin-1")
        if pseudo is not None:
            lookups.append(pseudo)
        elif response:
            lookups.append(lambda r, k=key: _header(r.response_headers, k))
        elif name == "x-request-id":
            # The id the proxy generated is part of the request it forwarded.
            lookups.append(lambda r, k=key: _s(r.request_id) or _header(r.request_headers, k))
        elif name == "host":
            lookups.append(lambda r, k=key: _header(r.request_headers, k) or _s(r.authority))
        else:
            lookups.append(lambda r, k=key: _header(r.request_headers, k))

    def get(rec) -> str:
        for lookup in lookups:
            v = lookup(rec)
            if v:
                if strip_query:
                    v = v.split("?", 1)[0]
                if trunc is not None:
                    v = v[:trunc]
                return _clean(v)
        return "-"
    return get


_HOSTNAME = socket.gethostname()

# name -> (http getter, tcp getter); the factories take (arg, truncation).
_SIMPLE: dict[str, tuple[Callable[[Any], str], Callable[[Any], str]]] = {
    "RESPONSE_CODE": (lambda r: str(r.status), lambda r: "-"),
    "DURATION": (lambda r: str(int(r.duration * 1000)), lambda r: str(int(r.duration * 1000))),
    "BYTES_RECEIVED": (lambda r: str(r.bytes_received), lambda r: str(r.bytes_received)),
    "BYTES_SENT": (lambda r: str(r.bytes_sent), lambda r: str(r.bytes_sent)),
    "PROTOCOL": (lambda r: _dash(r.protocol), lambda r: "-"),
    "UPSTREAM_HOST": (lambda r: _dash(r.upstream_host), lambda r: _dash(r.upstream_host)),
    "UPSTREAM_REMOTE_ADDRESS": (lambda r: _dash(r.upstream_host), lambda r: _dash(r.upstream_host)),
    "UPSTREAM_CLUSTER": (lambda r: _dash(r.upstream_service), lambda r: _dash(r.service)),
    "ROUTE_NAME": (lambda r: _dash(_clean(r.route)), lambda r: "-"),
    "RESPONSE_FLAGS": (lambda r: _dash(r.flags), lambda r: _dash(r.flags)),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": (lambda r: str(r.attempts), lambda r: str(r.attempts)),
    "DOWNSTREAM_REMOTE_ADDRESS": (lambda r: _dash(_addr(r.client, r.client_port)),
                                  lambda r: _dash(_addr(r.client, r.client_port))),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (lambda r: _dash(r.client), lambda r: _dash(r.client)),
    "DOWNSTREAM_REMOTE_PORT": (lambda r: str(r.client_port) if r.client else "-",
                               lambda r: str(r.client_port) if r.client else "-"),
    "DOWNSTREAM_LOCAL_ADDRESS": (lambda r: _dash(r.local), lambda r: _dash(r.local)),
    "REQUESTED_SERVER_NAME": (lambda r: _dash(_clean(r.sni)), lambda r: "-"),
    "TRACE_ID": (lambda r: _dash(r.trace_id), lambda r: "-"),
    "HOSTNAME": (lambda r: _HOSTNAME, lambda r: _HOSTNAME),
}
_SIMPLE["DOWNSTREAM_DIRECT_REMOTE_ADDRESS"] = _SIMPLE["DOWNSTREAM_REMOTE_ADDRESS"]
_SIMPLE["DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT"] = _SIMPLE["DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"]
_SIMPLE["DOWNSTREAM_DIRECT_REMOTE_PORT"] = _SIMPLE["DOWNSTREAM_REMOTE_PORT"]

_WITH_ARG = ("START_TIME", "REQ", "RESP", "REQ_WITHOUT_QUERY", "ENVIRONMENT")
_TRUNCATABLE = ("REQ", "RESP", "REQ_WITHOUT_QUERY", "ENVIRONMENT")
OPERATORS = tuple(sorted(set(_SIMPLE) | set(_WITH_ARG)))

_OPERATOR = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")


def _operator(name: str, arg: str | None, trunc: int | None) -> tuple[Callable, Callable]:
    if name in _SIMPLE:
        if arg is not None:
            raise ValueError("takes no argument")
        return _SIMPLE[name]
    if name == "START_TIME":
        g = _time_getter(arg)
        return g, g
    if arg is None:
        raise ValueError("needs an argument, as in %REQ(USER-AGENT)%")
    dash = lambda r: "-"
    if name == "REQ":
        return _req_getter(arg, trunc), dash
    if name == "REQ_WITHOUT_QUERY":
        return _req_getter(arg, trunc, strip_query=True), dash
    if name == "RESP":
        return _req_getter(arg, trunc, response=True), dash
    value = _dash(_clean(os.environ.get(arg, "")[:trunc] if trunc is not None else os.environ.get(arg, "")))
    g = lambda r: value
    return g, g


class Formatter:
    """``http(record)`` / ``tcp(record)`` -> one line ending in a newline."""

    def __init__(self, http: Callable[[HttpRecord], str], tcp: Callable[[TcpRecord], str], name: str) -> None:
        self.http = http
        self.tcp = tcp
        self.name = name

    def format(self, rec) -> str:
        return self.http(rec) if rec.kind == "http" else self.tcp(rec)


def _compile_template(template: str) -> Formatter:
    parts: list[str] = []
    http_getters: list[Callable] = []
    tcp_getters: list[Callable] = []
    i = 0
    n = len(template)
    while i < n:
        j = template.find("%", i)
        if j < 0:
            parts.append(template[i:].replace("%", "%%"))
            break
        parts.append(template[i:j])
        if template.startswith("%%", j):
            parts.append("%%")
            i = j + 2
            continue
        m = _OPERATOR.match(template, j)
        if m is None:
            raise FormatError(f"column {j + 1}: {template[j:j + 24]!r} is not a command operator "
                              "(%NAME%, %NAME(ARG)% or %NAME(ARG):N%; %% for a literal %)")
        name, arg, trunc = m.group(1), m.group(2), m.group(3)
        if name not in OPERATORS:
            raise FormatError(f"column {j + 1}: unknown operator %{name}%; known: "
                              + ", ".join(f"%{o}%" for o in OPERATORS))
        if trunc is not None and name not in _TRUNCATABLE:
            raise FormatError(f"column {j + 1}: %{name}% takes no :N truncation")
        try:
            h, t = _operator(name, arg, int(trunc) if trunc is not None else None)
        except ValueError as exc:
            raise FormatError(f"column {j + 1}: %{name}%: {exc}") from None
        parts.append("%s")
        http_getters.append(h)
        tcp_getters.append(t)
        i = m.end()
    fmt = "".join(parts).rstrip("\n") + "\n"
    hg, tg = tuple(http_getters), tuple(tcp_getters)
    return Formatter(lambda r: fmt % tuple([g(r) for g in hg]), lambda r: fmt % tuple([g(r) for g in tg]),
                     "template")


def compile_format(spec: str) -> Formatter:
    """``text``, ``json`` or a TEMPLATE; raises FormatError for a template that does not compile."""
    if spec == "text":
        t = _Text()
        return Formatter(t.http, t.tcp, "text")
    if spec == "json":
        j = _Json()
        return Formatter(j.http, j.tcp, "json")
    if "%" not in spec:
        raise FormatError(f"{spec!r}: expected text, json or a template with %OPERATORS%")
    return _compile_template(spec)
