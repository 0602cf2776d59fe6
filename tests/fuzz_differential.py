"""Differential fuzz target: the compiled L7 core against the pure-Python reference.

Both cores (l7.h1impl: ``l7`` and ``l7.compiled``) are fed the same bytes - whole, and cut in two
at every offset - on both sides (a request parser; a response parser after GET, and after HEAD
then GET) and must produce the same events (every head field, every body piece, trailers, the
PAUSED / NEED_DATA points) and the same verdicts (HTTPError status and reason). The one-call
fast paths (``parse_whole``) must agree too, and so must the header policy on every head both
accepted (``request_headers`` for an untrusted and a trusted client, with and without Via and
upgrade; ``response_headers`` likewise) and the serializers on it.

Run under pytest (hypothesis, bounded: tests/test_differential.py), or as an atheris target:

    python tests/fuzz_differential.py -max_total_time=600 CORPUS_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l7 import h1grammar, h1request, h1response, h1writer, headers  # noqa: E402
from l7.h1events import NEED_DATA, PAUSED, EndOfMessage, HTTPError, RequestHead, ResponseHead  # noqa: E402

try:
    from l7.compiled import h1grammar as c_h1grammar  # noqa: E402
    from l7.compiled import h1request as c_h1request  # noqa: E402
    from l7.compiled import h1response as c_h1response  # noqa: E402
    from l7.compiled import h1writer as c_h1writer  # noqa: E402
    from l7.compiled import headers as c_headers  # noqa: E402
except ImportError:  # pragma: no cover - the test module reports it
    c_h1request = None

CORPUS = Path(__file__).resolve().parent / "corpus" / "http1"
# (side, methods) configurations every input is fed to.
SIDES = ((False, ()), (True, (b"GET",)), (True, (b"HEAD", b"GET")))


def _head_key(ev) -> tuple:
    if type(ev) is RequestHead:
        return ("req",) + tuple(getattr(ev, s) for s in RequestHead.__slots__)
    return ("resp",) + tuple(getattr(ev, s) for s in ResponseHead.__slots__)


def events(request_cls, response_cls, pieces, response: bool, methods, eof: bool = True) -> list:
    """Every event the parser hands out for ``pieces`` (then EOF), in order, ending with the
    verdict: ("error", status, reason), or ("stopped",) after a tunnel / the last method."""
    parser = response_cls(max_head=512, max_headers=12) if response else request_cls(max_head=512, max_headers=12, max_body=300)
    methods = list(methods)
    if response:
        parser.set_request_method(methods.pop(0))
    out: list = []

    def drain() -> bool:
        for _ in range(10_000):   # bounded: each turn consumes input or ends
            ev = parser.next_event()
            if ev is NEED_DATA:
                out.append("need")
                return False
            t = type(ev)
            if t is bytes:
                out.append(("data", ev))
            elif t is EndOfMessage:
                out.append(("end", tuple(ev.trailers)))
                if parser.next_event() is not PAUSED:
                    raise AssertionError("no PAUSED after EndOfMessage")
                last = next(e for e in reversed(out) if type(e) is tuple and e[0] in ("req", "resp"))
                if response:
                    if last[1] == 101 or not methods:
                        return True
                    parser.start_next()
                    parser.set_request_method(methods.pop(0))
                else:
                    if last[1] == b"CONNECT" or last[11] is not None:   # tunnel follows
                        return True
                    parser.start_next()
            else:
                out.append(_head_key(ev))
        raise AssertionError("parser does not make progress")

    try:
        for piece in pieces:
            parser.feed(piece)
            if drain():
                out.append(("stopped", parser.buffered))
                return out
        if eof:
            parser.feed_eof()
            if drain():
                out.append(("stopped", parser.buffered))
                return out
    except HTTPError as exc:
        out.append(("error", exc.status, exc.reason))
    return out


def fast(request_cls, response_cls, data: bytes, response: bool, method: bytes):
    """What ``parse_whole`` says about ``data`` (None: declined, the general path decides)."""
    if response:
        p = response_cls(max_head=512, max_headers=12)
        p.set_request_method(method)
        got = p.parse_whole(data)
        return None if got is None else (_head_key(got[0]), got[1], p.next_event() is PAUSED)
    p = request_cls(max_head=512, max_headers=12, max_body=300)
    got = p.parse_whole(data)
    return None if got is None else (_head_key(got), p.next_event() is PAUSED)


def policy(hmod, wmod, head) -> list:
    """The header policy and the serializers on one accepted head, as bytes."""
    out = []
    if type(head) is RequestHead:
        for trusted in (False, True):
            client = headers.ClientInfo("10.1.2.3", trusted, b"http", b"80", b"default.example")
            for upgrade in (False, True):
                for via in (None, b"1.1 meshproxy"):
                    fields = hmod.request_headers(head.headers, head.connection_tokens, client, upgrade,
                                                  None if upgrade else head.host, via)
                    out.append(fields)
                    out.append(wmod.request_head_bytes(head.method, head.target, fields, head.content_length,
                                                       head.chunked))
                    out.append(_serialize(wmod.serialize_request_head, head.method, head.target, fields,
                                          content_length=head.content_length, chunked=head.chunked))
    else:
        for upgrade in (False, True):
            for via in (None, b"1.1 meshproxy"):
                fields = hmod.response_headers(head.headers, head.connection_tokens, upgrade, via)
                out.append(fields)
                out.append(wmod.response_head_bytes(head.status, head.reason, fields, head.content_length,
                                                    head.chunked))
                out.append(_serialize(wmod.serialize_response_head, head.status, head.reason, fields,
                                      content_length=head.content_length, chunked=head.chunked,
                                      version=head.version))
    return out


def _serialize(func, *args, **kw):
    try:
        return func(*args, **kw)
    except ValueError as exc:
        return ("ValueError", str(exc))


def _heads(request_cls, response_cls, data, response, methods):
    """The heads one core accepts from ``data`` fed whole (for the policy comparison)."""
    got = []
    parser = response_cls(max_head=512, max_headers=12) if response else request_cls(max_head=512, max_headers=12, max_body=300)
    if response:
        parser.set_request_method(methods[0])
    try:
        parser.feed(data)
        parser.feed_eof()
        for _ in range(100):
            ev = parser.next_event()
            if type(ev) in (RequestHead, ResponseHead):
                got.append(ev)
            elif ev is NEED_DATA or ev is PAUSED:
                break
    except HTTPError:
        pass
    return got


def scans(data: bytes) -> None:
    """The C scanners against the Python functions they replace, called directly (with limits
    that bite, too) - including inputs the parsers would not pass them."""
    for max_head, max_headers in ((65536, 100), (len(data) - 1, 100), (65536, 2)):
        for name in ("scan_request_whole", "scan_response_whole"):
            a = getattr(h1grammar, name)(data, max_head, max_headers)
            b = getattr(c_h1grammar, name)(data, max_head, max_headers)
            assert a == b, (name, data, max_head, max_headers, a, b)
    end = data.find(b"\r\n\r\n")
    start = data.find(b"\r\n") + 2
    if end >= 0 and start <= end + 2:
        a = h1grammar.split_fields_fast(data, start, end + 2)
        b = c_h1grammar.split_fields_fast(data, start, end + 2)
        assert a == b, ("split_fields_fast", data, a, b)


def compare(data: bytes, every_cut: bool = True) -> None:
    """Fails (AssertionError naming the input, side and cut) on any difference."""
    scans(data)
    py = (h1request.RequestParser, h1response.ResponseParser)
    cc = (c_h1request.RequestParser, c_h1response.ResponseParser)
    n = len(data)
    cuts = range(n + 1) if every_cut else sorted({0, n // 3, n // 2, n})
    for response, methods in SIDES:
        for cut in cuts:
            pieces = [p for p in (data[:cut], data[cut:]) if p]
            a = events(*py, pieces, response, methods)
            b = events(*cc, pieces, response, methods)
            assert a == b, (data, response, methods, cut, a, b)
        method = methods[0] if methods else b"GET"
        a = fast(*py, data, response, method)
        b = fast(*cc, data, response, method)
        assert a == b, ("parse_whole", data, response, method, a, b)
        for ha, hb in zip(_heads(*py, data, response, methods or (b"GET",)),
                          _heads(*cc, data, response, methods or (b"GET",))):
            assert _head_key(ha) == _head_key(hb)
            assert policy(headers, h1writer, ha) == policy(c_headers, c_h1writer, hb), ("policy", data)


def _atheris_one_input(data: bytes) -> None:
    compare(data, every_cut=len(data) <= 96)


if __name__ == "__main__":
    import atheris

    if c_h1request is None:
        sys.exit("the compiled core is not built (make venv)")
    atheris.instrument_all()
    atheris.Setup(sys.argv, _atheris_one_input)
    atheris.Fuzz()
