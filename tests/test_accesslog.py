"""Access-log formats (meshproxy.core.logformat) as tables, and the writer
(meshproxy.core.accesslog) against real files, a stalled pipe and /dev/full."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from meshproxy.core import metrics
from meshproxy.core.accesslog import AccessLog
from meshproxy.core.logformat import FormatError, HttpRecord, TcpRecord, compile_format

T = 1700000000.5          # 2023-11-14T22:13:20.500Z


def http(**kw) -> HttpRecord:
    base = dict(method=b"GET", target=b"/api/x?y=1", authority=b"shop.test", protocol="HTTP/1.1", status=200,
                bytes_received=5, bytes_sent=1234, duration=0.0123, start_time=T, upstream_host="10.1.0.7:8080",
                upstream_service="default/shop:80", route="shop.test/api", ingress="default/shop",
                request_id=b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736", trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                attempts=2, client="127.0.0.9", client_port=40000, local="127.0.0.1:8080",
                request_headers=[(b"Host", b"shop.test"), (b"User-Agent", b"curl/8.5.0"),
                                 (b"X-Forwarded-For", b"10.9.9.9"), (b"x-forwarded-for", b"10.8.8.8")],
                response_headers=[(b"Content-Type", b"text/plain"), (b"Server", b"pod")], flags="")
    base.update(kw)
    return HttpRecord(**base)


def tcp(**kw) -> TcpRecord:
    base = dict(client="127.0.0.9", client_port=40001, local="127.96.0.10:80", service="default/db:80",
                upstream_host="10.1.0.8:5432", bytes_received=567, bytes_sent=1234, duration=1.5, attempts=1,
                flags="", start_time=T)
    base.update(kw)
    return TcpRecord(**base)


def test_text_line_is_the_one_meshproxy_always_wrote():
    f = compile_format("text")
    assert f.http(http()) == ('127.0.0.9 - - [14/Nov/2023:22:13:20 +0000] "GET /api/x?y=1 HTTP/1.1" 200 1234 0.0123 '
                              'upstream=10.1.0.7:8080 ingress=default/shop route="shop.test/api" attempts=2\n')
    # Answered by the proxy, nothing matched: dashes; a forged line break is escaped.
    line = f.http(http(target=b'/x"\n127.0.0.1 fake', status=404, upstream_host="", ingress="", route="", attempts=0))
    assert line == ('127.0.0.9 - - [14/Nov/2023:22:13:20 +0000] "GET /x\\"\\x0a127.0.0.1 fake HTTP/1.1" 404 1234 0.0123 '
                    'upstream=- ingress=- route="-" attempts=0\n')
    assert f.tcp(tcp()) == ('127.0.0.9 - - [14/Nov/2023:22:13:22 +0000] "TCP 127.96.0.10:80" - 1234 1.5000 '
                            'upstream=10.1.0.8:5432 service=default/db:80 received=567 attempts=1 flags=-\n')


def test_json_has_typed_fields_and_null_for_missing():
    d = json.loads(compile_format("json").http(http()))
    assert d == {
        "start_time": "2023-11-14T22:13:20.500Z", "method": "GET", "path": "/api/x?y=1", "authority": "shop.test",
        "protocol": "HTTP/1.1", "status": 200, "bytes_received": 5, "bytes_sent": 1234, "duration": 0.0123,
        "upstream_host": "10.1.0.7:8080", "upstream_service": "default/shop:80", "route": "shop.test/api",
        "ingress": "default/shop", "request_id": "4bf92f35-77b3-4da6-a3ce-929d0e0e4736",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "attempts": 2, "client": "127.0.0.9",
        "user_agent": "curl/8.5.0", "x_forwarded_for": "10.9.9.9,10.8.8.8", "response_flags": None,
    }
    d = json.loads(compile_format("json").http(http(upstream_host="", request_id=b"", request_headers=[],
                                                    flags="NR", status=404)))
    assert d["upstream_host"] is None and d["request_id"] is None and d["user_agent"] is None
    assert d["response_flags"] == "NR" and d["status"] == 404
    line = compile_format("json").tcp(tcp(flags="UF,URX", upstream_host=""))
    assert line.endswith("}\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "start_time": "2023-11-14T22:13:20.500Z", "protocol": "TCP", "client": "127.0.0.9", "local": "127.96.0.10:80",
        "upstream_service": "default/db:80", "upstream_host": None, "bytes_received": 567, "bytes_sent": 1234,
        "duration": 1.5, "attempts": 1, "response_flags": "UF,URX"}


TEMPLATE_CASES = [
    # (template, http line, tcp line) - without the newline every line gets
    ("%START_TIME%", "2023-11-14T22:13:20.500Z", "2023-11-14T22:13:20.500Z"),
    ("%START_TIME(%s)%", "1700000000", "1700000000"),
    ("%START_TIME(%s.%3f)%", "1700000000.500", "1700000000.500"),
    ("%START_TIME(%s.%6f)%", "1700000000.500000", "1700000000.500000"),
    ("%START_TIME(%Y/%m/%d %H:%M:%S)%", "2023/11/14 22:13:20", "2023/11/14 22:13:20"),
    ("%START_TIME(%f)%", "500000000", "500000000"),
    ("%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%", "GET /api/x?y=1 HTTP/1.1", "- - -"),
    ("%REQ_WITHOUT_QUERY(:PATH)%", "/api/x", "-"),
    ("%REQ(:AUTHORITY)% %REQ(HOST)% %REQ(:SCHEME)%", "shop.test shop.test http", "- - -"),
    ("%REQ(USER-AGENT)%", "curl/8.5.0", "-"),
    ("%REQ(user-agent):4%", "curl", "-"),
    ("%REQ(X-FORWARDED-FOR)%", "10.9.9.9,10.8.8.8", "-"),
    ("%REQ(X-MISSING)%", "-", "-"),
    ("%REQ(X-MISSING?USER-AGENT)%", "curl/8.5.0", "-"),
    ("%REQ(X-REQUEST-ID)%", "4bf92f35-77b3-4da6-a3ce-929d0e0e4736", "-"),   # the id the proxy sent on
    ("%RESP(CONTENT-TYPE)% %RESP(SERVER):2% %RESP(X-NONE)%", "text/plain po -", "- - -"),
    ("%RESPONSE_CODE% %RESPONSE_FLAGS%", "200 -", "- -"),
    ("%DURATION%", "12", "1500"),
    ("%BYTES_RECEIVED% %BYTES_SENT%", "5 1234", "567 1234"),
    ("%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_REMOTE_ADDRESS%",
     "10.1.0.7:8080 default/shop:80 10.1.0.7:8080", "10.1.0.8:5432 default/db:80 10.1.0.8:5432"),
    ("%ROUTE_NAME%", "shop.test/api", "-"),
    ("%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "2", "1"),
    ("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_REMOTE_PORT%",
     "127.0.0.9:40000 127.0.0.9 40000", "127.0.0.9:40001 127.0.0.9 40001"),
    ("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%",
     "127.0.0.9:40000 127.0.0.1:8080", "127.0.0.9:40001 127.96.0.10:80"),
    ("%TRACE_ID%", "4bf92f3577b34da6a3ce929d0e0e4736", "-"),
    ("100%% [%RESPONSE_CODE%]", "100% [200]", "100% [-]"),
    ("plain % text".replace("% ", "%% "), "plain % text", "plain % text"),
    ("%ENVIRONMENT(MESHPROXY_TEST_ENV)%", "from-env", "from-env"),
    ("%ENVIRONMENT(MESHPROXY_TEST_ENV):4%", "from", "from"),
]


@pytest.mark.parametrize("template,http_line,tcp_line", TEMPLATE_CASES)
def test_template_operators(template, http_line, tcp_line, monkeypatch):
    monkeypatch.setenv("MESHPROXY_TEST_ENV", "from-env")
    f = compile_format(template)
    assert f.http(http()) == http_line + "\n"
    assert f.tcp(tcp()) == tcp_line + "\n"


def test_template_values_are_escaped_and_missing_ones_are_dashes():
    f = compile_format('"%REQ(USER-AGENT)%" %UPSTREAM_HOST% %ROUTE_NAME% %REQ(X-REQUEST-ID)% %RESPONSE_FLAGS%')
    rec = http(request_headers=[(b"User-Agent", b'evil"\x01\\')], upstream_host="", route="", request_id=b"",
               flags="UT,URX")
    assert f.http(rec) == '"evil\\"\\x01\\\\" - - - UT,URX\n'
    # The IPv6 client address is bracketed.
    assert compile_format("%DOWNSTREAM_REMOTE_ADDRESS%").http(http(client="::1", client_port=5)) == "[::1]:5\n"


@pytest.mark.parametrize("template,message", [
    ("%FOO%", "column 1: unknown operator %FOO%"),
    ("x %REQ%", "column 3: %REQ%: needs an argument"),
    ("%REQ(A?B?C)%", "expected HEADER or HEADER?ALTERNATIVE"),
    ("%DURATION(1)%", "column 1: %DURATION%: takes no argument"),
    ("%DURATION:3%", "column 1: %DURATION% takes no :N truncation"),
    ("%RESPONSE_CODE(x):3%", "takes no :N truncation"),
    ("abc %", "column 5"),
    ("%START_TIME", "column 1"),
    ("no operators", "expected text, json or a template"),
])
def test_bad_templates_name_the_column_and_the_problem(template, message):
    with pytest.raises(FormatError) as e:
        compile_format(template)
    assert message in str(e.value)


# -- the writer ------------------------------------------------------------------------------------------

def test_lines_arrive_whole_and_close_writes_what_is_queued(tmp_path):
    path = tmp_path / "a.log"
    log = AccessLog(str(path), "json", interval=10)      # only close() (or a half-full queue) wakes it
    for i in range(100):
        log.log(http(status=200 + i % 3, target=b"/%d" % i))
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == [f"/{i}" for i in range(100)]
    assert log.written == 100 and log.dropped == 0


def test_a_stalled_pipe_drops_and_counts_instead_of_blocking(tmp_path):
    """The log is a FIFO whose reader reads nothing: the writer thread blocks in write() once the
    pipe is full; log() keeps returning at once, and records beyond the queue are counted."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    before = metrics.access_log_dropped.labels("queue_full")._value.get()
    log = AccessLog(str(fifo), "text", capacity=64, interval=0.01)
    try:
        assert stat.S_ISFIFO(os.fstat(reader).st_mode)
        t = time.monotonic()
        for i in range(20000):          # ~3 MB of lines: far more than a 64 KiB pipe holds
            log.log(http(target=b"/%d" % i))
        spent = time.monotonic() - t
        assert log.dropped > 0
        assert metrics.access_log_dropped.labels("queue_full")._value.get() - before == log.dropped
        assert spent < 5.0, spent       # it never waited for the pipe (20000 appends, not 20000 writes)
    finally:
        # Read everything so the writer thread can finish, then check no line was cut.
        data = b""
        deadline = time.monotonic() + 10
        done = threading.Thread(target=log.close, daemon=True)
        done.start()
        while done.is_alive() and time.monotonic() < deadline:
            try:
                data += os.read(reader, 1 << 16)
            except BlockingIOError:
                time.sleep(0.01)
        done.join(5)
        try:
            while True:
                chunk = os.read(reader, 1 << 16)
                if not chunk:
                    break
                data += chunk
        except BlockingIOError:
            pass
        os.close(reader)
    lines = data.decode().splitlines()
    assert len(lines) == log.written == 20000 - log.dropped
    assert all(x.startswith("127.0.0.9 - - [") and x.endswith("attempts=2") for x in lines)


def test_reopen_follows_a_renamed_file(tmp_path):
    path = tmp_path / "a.log"
    log = AccessLog(str(path), "text", interval=0.01)
    try:
        log.log(http(target=b"/before"))
        assert log.flush()
        os.rename(path, tmp_path / "a.log.1")             # what logrotate does
        log.log(http(target=b"/still-old"))                # not reopened yet: goes to the old file
        assert log.flush()
        log.reopen()
        log.log(http(target=b"/after"))
        assert log.flush()
    finally:
        log.close()
    assert "/before" in (tmp_path / "a.log.1").read_text() and "/still-old" in (tmp_path / "a.log.1").read_text()
    assert path.read_text().count("\n") == 1 and "/after" in path.read_text()


def test_reopen_that_fails_keeps_the_old_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    path = d / "a.log"
    log = AccessLog(str(path), "text", interval=0.01)
    try:
        os.rename(path, tmp_path / "moved.log")
        os.rmdir(d)                                        # the path cannot be opened any more
        log.reopen()
        log.log(http(target=b"/kept"))
        assert log.flush()
    finally:
        log.close()
    assert "/kept" in (tmp_path / "moved.log").read_text()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_full_disk_counts_lost_lines_and_goes_on():
    before = metrics.access_log_dropped.labels("write_error")._value.get()
    log = AccessLog("/dev/full", "text", interval=0.01)
    try:
        for _ in range(10):
            log.log(http())
        assert log.flush()
    finally:
        log.close()
    assert log.write_errors == 10 and log.written == 0
    assert metrics.access_log_dropped.labels("write_error")._value.get() - before == 10


def test_open_errors_and_bad_formats_are_raised_at_start(tmp_path):
    with pytest.raises(OSError):
        AccessLog(str(tmp_path / "no" / "such" / "dir.log"))
    with pytest.raises(FormatError):
        AccessLog(str(tmp_path / "x.log"), "%NOPE%")
