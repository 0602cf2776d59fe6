"""What tracing and the access log cost the request path: ``python -m bench.tracing_cost``.

Measures, in one run, the CPU time (process time, this thread's calls only) per request of
the calls the L7 exchange makes, against doing nothing:

- tracing with ``--trace-sampling`` 0, 0.01 and 1: ``start_request`` (with an incoming
  sampled / no traceparent), one ``attempt``, ``finish``; the spans go to the real
  ``BatchSpanProcessor`` + ``OTLPSpanExporter`` posting to a local OTLP sink on 127.0.0.1, so
  the hand-over to the exporter thread is included (the thread's own work is reported apart:
  it runs beside the loop, on the GIL);
- a request id (``new_request_id``);
- the access log: building an ``HttpRecord`` and ``AccessLog.log`` (the queue append), with
  the writer thread formatting (text / json) and writing to a file in a temporary folder.

Figures are same-run ratios to the empty loop; docs/observability.md records a run.
"""

from __future__ import annotations

import argparse
import http.server
import os
import tempfile
import threading
import time

from l7.requestid import new_request_id
from l7.tracing import Tracing
from meshproxy.core.accesslog import AccessLog
from meshproxy.core.logformat import HttpRecord

_TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _sink() -> http.server.ThreadingHTTPServer:
    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass
    s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    return s


def _per_request(fn, n: int) -> float:
    """Microseconds of thread CPU per call, best of 3."""
    best = float("inf")
    for _ in range(3):
        t = time.thread_time()
        for i in range(n):
            fn(i)
        best = min(best, (time.thread_time() - t) / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--requests", type=int, default=20000)
    args = ap.parse_args()
    n = args.requests
    sink = _sink()
    url = f"http://127.0.0.1:{sink.server_address[1]}"
    rows = []
    base = _per_request(lambda i: None, n)
    rows.append(("nothing (loop overhead)", base))
    for ratio, incoming, label in ((0.0, None, "tracing, ratio 0, no traceparent"),
                                   (0.01, None, "tracing, ratio 0.01, no traceparent"),
                                   (1.0, None, "tracing, ratio 1, no traceparent"),
                                   (0.0, _TP, "tracing, incoming sampled traceparent")):
        tracing = Tracing(url, ratio)

        def one(i, tracing=tracing, incoming=incoming):
            t = tracing.start_request(incoming, None, b"GET", b"/api/items?id=7", b"shop.test", float(i))
            t.attempt("10.1.0.7:8080", i + 0.0001)
            t.finish(200, i + 0.001, {"http.route": "shop.test/api", "meshproxy.backend": "default/shop:80"})
        rows.append((label, _per_request(one, n)))
        t0 = time.monotonic()
        tracing.shutdown(30)
        rows.append(("  ... then flushing the exporter's queue (s, wall)", round(time.monotonic() - t0, 2)))
    rows.append(("request id (new_request_id)", _per_request(lambda i: new_request_id(), n)))
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("text", "json"):
            log = AccessLog(os.path.join(d, f"{fmt}.log"), fmt, capacity=n * 4)

            def rec(i, log=log):
                log.log(HttpRecord(b"GET", b"/api/items?id=7", b"shop.test", "HTTP/1.1", 200, 0, 1234, 0.0012,
                                   upstream_host="10.1.0.7:8080", route="shop.test/api", ingress="default/shop",
                                   attempts=1, client="127.0.0.1"))
            rows.append((f"access log record + queue ({fmt})", _per_request(rec, n)))
            log.close(60)
            rows.append((f"  ... lines written by the writer thread ({fmt})", log.written))
    sink.shutdown()
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  us/request (thread CPU, best of 3, {n} requests)")
    for label, v in rows:
        print(f"{label:<{width}}  {v:.2f}" if isinstance(v, float) else f"{label:<{width}}  {v}")


if __name__ == "__main__":
    main()
