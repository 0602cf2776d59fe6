"""Fuzz target for l7/http1.py.

Invariant: for ANY input bytes, the parsers either

* accept: every complete message re-serialized with our serializers re-parses to the same fields,
  body and trailers (and, where h11 also accepts, h11 agrees on method/target/status, headers and
  body), or
* raise HTTPError whose status is one we document (4xx/5xx; 502 on the response side),

never any other exception - and the outcome is the same whether the input is fed whole, one byte
at a time, or cut at arbitrary points.

Run under pytest (hypothesis, bounded; collected through tests/test_http1.py, which also replays
the seed corpus in tests/corpus/http1/), or as an atheris target when atheris is installed:

    python tests/fuzz_http1.py tests/corpus/http1/ -max_total_time=600
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l7.http1 import (  # noqa: E402
    EndOfMessage,
    HTTPError,
    NEED_DATA,
    PAUSED,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    chunk,
    serialize_request_head,
    serialize_response_head,
    serialize_trailers,
)

CORPUS = Path(__file__).resolve().parent / "corpus" / "http1"
REQUEST_STATUSES = {400, 413, 431, 501, 505}

# --------------------------------------------------------------------------------------------
# Driver: feed pieces, collect a canonical outcome.


def request_fields(head: RequestHead) -> tuple:
    return (
        head.method, head.target, head.path, head.query, head.version, tuple(head.headers),
        head.host, head.content_length, head.chunked, head.keep_alive, head.upgrade,
        head.expect_continue, tuple(sorted(head.connection_tokens)),
    )


def response_fields(head: ResponseHead) -> tuple:
    return (
        head.status, head.reason, head.version, tuple(head.headers), head.content_length,
        head.chunked, head.keep_alive, tuple(sorted(head.connection_tokens)),
    )


class Message:
    __slots__ = ("heads", "body", "trailers", "complete")

    def __init__(self) -> None:
        self.heads: list = []
        self.body = b""
        self.trailers = None
        self.complete = False

    def key(self) -> tuple:
        fields = request_fields if isinstance(self.heads[0], RequestHead) else response_fields
        return (tuple(fields(h) for h in self.heads), self.body, self.trailers, self.complete)


def drive(pieces, *, response=False, methods=(b"GET",), eof=False, **limits):
    """Feed ``pieces`` to a fresh parser; return ("ok", [Message], trailing) or
    ("error", status, reason). Requests: parse every pipelined message until a CONNECT.
    Responses: one response per entry of ``methods``; stops after a 101 / CONNECT 2xx."""
    parser = ResponseParser(**limits) if response else RequestParser(**limits)
    all_methods = list(methods)
    methods = list(methods)
    if response:
        parser.set_request_method(methods.pop(0))
    messages: list[Message] = []
    state = {"stopped": False, "current": None}

    def drain() -> None:
        while not state["stopped"]:
            event = parser.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, (RequestHead, ResponseHead)):
                if state["current"] is None:
                    state["current"] = Message()
                    messages.append(state["current"])
                state["current"].heads.append(event)
            elif isinstance(event, bytes):
                assert event, "empty body chunk"
                state["current"].body += event
            elif isinstance(event, EndOfMessage):
                msg = state["current"]
                msg.trailers = tuple(event.trailers)
                msg.complete = True
                state["current"] = None
                assert parser.next_event() is PAUSED
                last = msg.heads[-1]
                if response:
                    tunnel = last.status == 101 or (
                        last.status < 300 and msg_method(messages) == b"CONNECT"
                    )
                    if tunnel or not methods:
                        state["stopped"] = True
                        return
                    parser.start_next()
                    parser.set_request_method(methods.pop(0))
                else:
                    if last.method == b"CONNECT":
                        state["stopped"] = True
                        return
                    parser.start_next()
            else:  # pragma: no cover - the invariant itself
                raise AssertionError(f"unexpected event {event!r}")

    def msg_method(msgs) -> bytes:
        return all_methods[len(msgs) - 1]

    try:
        for piece in pieces:
            parser.feed(piece)
            drain()
        if eof:
            parser.feed_eof()
            drain()
    except HTTPError as exc:
        # Errors are sticky.
        try:
            parser.next_event()
        except HTTPError as again:
            assert again is exc
        else:  # pragma: no cover
            raise AssertionError("error not sticky")
        return ("error", exc.status, exc.reason)
    return ("ok", [m.key() for m in messages], parser.trailing)


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


# --------------------------------------------------------------------------------------------
# The invariant


def _reserialize_request(msg_heads, body: bytes, trailers) -> bytes:
    head: RequestHead = msg_heads[0]
    headers = list(head.headers)
    if not any(n.lower() == b"host" for n, _ in headers):
        headers.append((b"Host", b"fuzz.invalid"))
    out = serialize_request_head(
        head.method, head.target, headers,
        content_length=head.content_length, chunked=head.chunked,
    )
    if head.chunked:
        return out + chunk(body) + serialize_trailers(list(trailers or ()))
    return out + body


def _reserialize_response(msg_heads, body: bytes, trailers, method: bytes) -> bytes:
    out = b""
    for head in msg_heads:
        out += serialize_response_head(
            head.status, head.reason, head.headers,
            content_length=head.content_length, chunked=head.chunked, version=head.version,
        )
    if msg_heads[-1].body_kind(method) == "chunked":
        out += chunk(body) + serialize_trailers(list(trailers or ()))
    else:
        out += body
    return out


def _comparable_request(fields: tuple, *, as_11: bool) -> tuple:
    (method, target, path, query, version, headers, host, cl, chunked, keep_alive, upgrade,
     expect, tokens) = fields
    headers = tuple(h for h in headers if h != (b"Host", b"fuzz.invalid"))
    if as_11:
        # Re-serialized as HTTP/1.1: version-dependent semantics may legitimately change.
        return (method, target, path, query, headers, cl, chunked, tokens)
    return fields


def check_request(data: bytes, cuts=()) -> tuple:
    outcome = drive(whole(data))
    assert drive(bytewise(data)) == outcome, "byte-by-byte differs from whole"
    if cuts:
        assert drive(split_at(data, *cuts)) == outcome, f"split at {cuts} differs from whole"
    if outcome[0] == "error":
        assert outcome[1] in REQUEST_STATUSES, outcome
        return outcome
    for i, (heads, body, trailers, complete) in enumerate(outcome[1]):
        if not complete:
            continue
        original = heads[0]
        head = RequestHead(*_unpack_request(original))
        wire = _reserialize_request([head], body, trailers)
        again = drive(whole(wire))
        assert again[0] == "ok", (wire, again)
        (heads2, body2, trailers2, complete2) = again[1][0]
        assert complete2 and body2 == body and trailers2 == trailers, (wire, again)
        as_11 = original[4] == 10 or original[6] == b""
        assert _comparable_request(heads2[0], as_11=as_11) == _comparable_request(
            original, as_11=as_11
        ), (wire, heads2[0], original)
        if i == 0:
            h11_agrees_request(data, original, body)
    return outcome


def _unpack_request(fields: tuple) -> tuple:
    (method, target, path, query, version, headers, host, cl, chunked, keep_alive, upgrade,
     expect, tokens) = fields
    return (method, target, path, query, version, list(headers), host, cl, chunked, keep_alive,
            upgrade, expect, frozenset(tokens))


def check_response(data: bytes, methods=(b"GET",), cuts=(), eof=True) -> tuple:
    outcome = drive(whole(data), response=True, methods=methods, eof=eof)
    assert drive(bytewise(data), response=True, methods=methods, eof=eof) == outcome
    if cuts:
        assert drive(split_at(data, *cuts), response=True, methods=methods, eof=eof) == outcome
    if outcome[0] == "error":
        assert outcome[1] == 502, outcome
        return outcome
    for i, (heads, body, trailers, complete) in enumerate(outcome[1]):
        if not complete:
            continue
        objs = [ResponseHead(*_unpack_response(h)) for h in heads]
        final = objs[-1]
        method = methods[i]
        wire = _reserialize_response(objs, body, trailers, method)
        close = final.body_kind(method) == "close"
        again = drive(whole(wire), response=True, methods=[method], eof=close)
        assert again[0] == "ok", (wire, again)
        heads2, body2, trailers2, complete2 = again[1][0]
        assert complete2 and body2 == body, (wire, again)
        assert trailers2 == trailers
        assert heads2 == heads, (wire, heads2, heads)
    return outcome


def _unpack_response(fields: tuple) -> tuple:
    status, reason, version, headers, cl, chunked, keep_alive, tokens = fields
    return (status, reason, version, list(headers), cl, chunked, keep_alive, frozenset(tokens))


# --------------------------------------------------------------------------------------------
# h11 as a differential oracle: where both accept, both must agree.


def h11_agrees_request(data: bytes, fields: tuple, body: bytes) -> None:
    try:
        import h11
    except ImportError:  # pragma: no cover
        return
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
        while event is h11.NEED_DATA:  # pragma: no cover - data is complete here
            return
        if not isinstance(event, h11.Request):
            return
        got_body = b""
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.Data):
                got_body += ev.data
            elif isinstance(ev, h11.EndOfMessage) or ev is h11.NEED_DATA:
                break
            else:  # pragma: no cover
                return
    except h11.RemoteProtocolError:
        return  # h11 refuses something we accept: allowed (documented deviations)
    method, target = fields[0], fields[1]
    assert event.method == method and event.target == target, (event, fields)
    ours = [(n.lower(), v) for n, v in fields[5]]
    theirs = [(n, v) for n, v in event.headers if n not in (b"content-length",
                                                             b"transfer-encoding")]
    # We drop "_" names; h11 keeps them.
    theirs = [(n, v) for n, v in theirs if b"_" not in n or (n, v) in ours]
    assert ours == theirs, (ours, theirs)
    if isinstance(ev, h11.EndOfMessage):
        assert got_body == body, (got_body, body)


# --------------------------------------------------------------------------------------------
# Hypothesis strategies: structured messages with targeted mutations, plus raw bytes.

try:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - atheris-only environment
    st = None

if st is not None:

    def _mostly(good, bad, good_weight: int = 6):
        """``good`` good_weight times as often as ``bad``: most examples should get past the
        head and exercise framing, chunked bodies and trailers; the rest probes each refusal."""
        # (st.one_of's branch choice is boundary-biased, which would over-draw ``bad``.)
        return st.sampled_from([False] * good_weight + [True]).flatmap(
            lambda is_bad: bad if is_bad else good
        )

    _EOL = _mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]), 12)
    _NAME = _mostly(
        st.sampled_from(
            [b"Host", b"host", b"Content-Length", b"content-length", b"Transfer-Encoding",
             b"Connection", b"Upgrade", b"Expect", b"X-A", b"Cookie", b"Trailer", b"Te", b"Via"]
        ),
        st.sampled_from(
            [b"Transfer_Encoding", b"Content_Length", b"X_Real_IP", b"Transfer-Encoding ",
             b" Host", b"Host\t", b"", b"X Y", b"\xefoo", b"Content-Length\x85"]
        ) | st.binary(max_size=6),
    )
    _VALUE = _mostly(
        st.sampled_from(
            [b"a", b"example.com", b"Example.COM:8080", b"[::1]:80", b"0", b"5", b"10", b"005",
             b"5, 5", b"chunked", b"CHUNKED", b",chunked", b"close", b"keep-alive", b"Upgrade",
             b"keep-alive, Upgrade", b"websocket", b"100-continue", b"caf\xc3\xa9",
             b"  spaced  ", b"a\tb", b""]
        ),
        st.sampled_from(
            [b"a b", b"5, 6", b"+5", b"0x5", b"-1", b"99999999999999999999", b"chunked, chunked",
             b"gzip, chunked", b"chunked, identity", b"xchunked", b"\x0bchunked", b"v\x00x",
             b"user@host"]
        ) | st.binary(max_size=8),
        3,
    )
    _SEP = _mostly(st.just(b": "), st.sampled_from([b":", b":\t", b" : ", b":  "]), 3)
    _field = st.tuples(_NAME, _SEP, _VALUE, _EOL).map(b"".join)
    _BODY = _mostly(
        st.sampled_from(
            [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n",
             b"5;a=b\r\nhello\r\n0\r\n\r\n", b'5 ;a="q\\"x"\r\nhello\r\n0\r\n\r\n',
             b"1\r\nZ\r\n0\r\nHost: x\r\nContent-Length: 3\r\nX-Sum: 9\r\n\r\n",
             b"A\r\n0123456789\r\n0\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]
        ),
        st.sampled_from(
            [b"0x5\r\nhello\r\n0\r\n\r\n", b"5\nhello\r\n0\r\n\r\n",
             b"fffffffffffffffff\r\n", b"5\r\nhelloXX", b"-5\r\n", b"5;\x00\r\n",
             b"0\r\nX: y\n\r\n", b"\r\n\r\n"]
        ) | st.binary(max_size=24),
        3,
    )
    # A request most likely to be valid, so that framing decides the outcome.
    _FRAMING = st.sampled_from(
        [[], [b"Content-Length: 5\r\n"], [b"Transfer-Encoding: chunked\r\n"],
         [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"],
         [b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\r\n"],
         [b"Content-Length: 5\r\n", b"Content-Length: 5\r\n"]]
    )

    @st.composite
    def requests(draw):
        method = draw(_mostly(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT"]),
                              st.sampled_from([b"CONNECT", b"PRI", b"G T", b"get", b""]), 4))
        target = draw(_mostly(
            st.sampled_from([b"/", b"/a/b?x=1", b"http://a.example/x?y", b"HTTPS://A:443"]),
            st.sampled_from([b"*", b"a.example:443", b"/a#f", b"/\xc3\xa9", b"//x",
                             b"http://u@a/", b"http:///x", b"ftp://a/", b""])
            | st.binary(max_size=6), 4))
        version = draw(_mostly(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
                               st.sampled_from([b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1"])))
        sep = draw(_mostly(st.just(b" "), st.sampled_from([b"  ", b"\t"]), 12))
        fields = draw(st.lists(_field, max_size=5)) + draw(_FRAMING)
        if draw(st.integers(0, 5)):
            fields.append(b"Host: a.example\r\n")
        fields = draw(st.permutations(fields))
        data = (draw(st.sampled_from([b""] * 6 + [b"\r\n", b"\r\n\r\n"])) + method + sep + target
                + sep + version + draw(_EOL) + b"".join(fields) + draw(_EOL) + draw(_BODY))
        if draw(st.booleans()):  # a pipelined follower
            data += b"GET /next HTTP/1.1\r\nHost: b\r\n\r\n"
        return _mutate(draw, data)

    @st.composite
    def responses(draw):
        status = draw(_mostly(st.sampled_from([b"200", b"404", b"204", b"304", b"100", b"101",
                                               b"103"]),
                              st.sampled_from([b"099", b"600", b"20", b"2000"])))
        version = draw(_mostly(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
                               st.sampled_from([b"HTTP/2.0", b"http/1.1"])))
        reason = draw(_mostly(st.sampled_from([b" OK", b"", b" ", b" Not Found", b" \xff"]),
                              st.just(b" a\x00")))
        fields = draw(st.permutations(draw(st.lists(_field, max_size=4)) + draw(_FRAMING)))
        data = (version + b" " + status + reason + draw(_EOL) + b"".join(fields) + draw(_EOL)
                + draw(_BODY))
        if status in (b"100", b"103") and draw(st.booleans()):
            data += b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        return _mutate(draw, data)

    def _mutate(draw, data: bytes) -> bytes:
        for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
            if not data:
                break
            i = draw(st.integers(0, len(data) - 1))
            op = draw(st.integers(0, 2))
            byte = bytes([draw(st.sampled_from([0, 9, 10, 13, 32, 44, 58, 59, 127, 255]))])
            if op == 0:
                data = data[:i] + byte + data[i:]
            elif op == 1:
                data = data[:i] + data[i + 1 :]
            else:
                data = data[:i] + byte + data[i + 1 :]
        return data

    _SETTINGS = settings(
        max_examples=300, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    @_SETTINGS
    @given(data=st.one_of(requests(), requests(), requests(), st.binary(max_size=200)),
           cut=st.integers(0, 400))
    @example(data=b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", cut=30)
    def test_fuzz_request_invariant(data: bytes, cut: int) -> None:
        check_request(data, cuts=(min(cut, len(data)),))

    @_SETTINGS
    @given(data=st.one_of(responses(), responses(), responses(), st.binary(max_size=200)),
           cut=st.integers(0, 400),
           methods=st.sampled_from([(b"GET",), (b"HEAD",), (b"POST",), (b"CONNECT",),
                                    (b"GET", b"GET"), (b"HEAD", b"GET")]))
    def test_fuzz_response_invariant(data: bytes, cut: int, methods: tuple) -> None:
        check_response(data, methods=methods, cuts=(min(cut, len(data)),))


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file())


def check_corpus_file(path: Path) -> tuple:
    data = path.read_bytes()
    if path.name.startswith("resp-"):
        method = b"HEAD" if "-head-" in path.name else b"GET"
        return check_response(data, methods=(method,), cuts=(len(data) // 2,))
    return check_request(data, cuts=(len(data) // 2,))


def test_corpus_replay() -> None:
    """Every seed in tests/corpus/http1/ satisfies the invariant; the expected verdict is in the
    file name ("-ok" accepted, "-<status>" refused with that status)."""
    files = corpus_files()
    assert files, "empty corpus"
    for path in files:
        outcome = check_corpus_file(path)
        verdict = path.stem.rsplit("-", 1)[-1]
        if verdict == "ok":
            assert outcome[0] == "ok", (path.name, outcome)
        else:
            assert outcome[:2] == ("error", int(verdict)), (path.name, outcome)


# --------------------------------------------------------------------------------------------
# atheris entry point


def _atheris_one_input(data: bytes) -> None:
    check_request(data)
    check_response(data)
    check_response(data, methods=(b"HEAD", b"GET"))


if __name__ == "__main__":
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed; run the hypothesis version with pytest instead")
    atheris.instrument_all()
    if len(sys.argv) == 1 and CORPUS.is_dir():
        sys.argv.append(os.fspath(CORPUS))
    atheris.Setup(sys.argv, _atheris_one_input)
    atheris.Fuzz()
