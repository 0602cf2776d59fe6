"""One-off HTTP/1.1 requests the proxy makes on a request's behalf (external authentication).

``subrequest(loop, url, method, fields, connect_timeout, read_timeout, done)`` opens a new
connection to the URL's host (TLS for https, without verifying the certificate - nginx's
proxy_ssl_verify default), sends ``method`` with ``fields`` and no body, reads the response
head with the strict response parser, and calls ``done(status, fields)`` - or
``done(None, None, reason)`` when there is no valid answer in time. The response body is not
read (nginx's auth_request looks at the head only) and the connection is closed: an auth check
is not worth a pool of its own, and a fresh connection can never carry a previous answer.

Bounded: the head by the parser's limits, the whole exchange by ``connect_timeout`` plus
``read_timeout``; ``done`` is called exactly once, from the event loop, never synchronously.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import urlsplit

from .http1 import HTTPError, ResponseHead, ResponseParser

__all__ = ["subrequest"]

log = logging.getLogger("meshproxy.l7")

_MAX_HEAD = 65536
_tls_ctx: ssl.SSLContext | None = None


def _client_tls() -> ssl.SSLContext:
    global _tls_ctx
    if _tls_ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _tls_ctx = ctx
    return _tls_ctx


def subrequest(loop: asyncio.AbstractEventLoop, url: str, method: bytes, fields: list, connect_timeout: float,
               read_timeout: float, done, tasks: set | None = None) -> None:
    """Start the request; see the module docstring. ``tasks`` keeps the task referenced."""
    task = loop.create_task(_run(url, method, fields, connect_timeout, read_timeout, done))
    if tasks is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _run(url: str, method: bytes, fields: list, connect_timeout: float, read_timeout: float, done) -> None:
    try:
        result = await _fetch(url, method, fields, connect_timeout, read_timeout)
    except asyncio.CancelledError:
        done(None, None, "cancelled")
        raise
    except (OSError, TimeoutError, HTTPError, ValueError) as exc:
        # OSError: refused, reset, TLS failure; TimeoutError: our deadline; HTTPError: not a
        # valid response; ValueError: a URL we cannot use.
        log.debug("L7: subrequest to %s failed: %r", url, exc)
        done(None, None, str(exc) or type(exc).__name__)
        return
    try:
        done(result[0], result[1])
    except Exception:  # noqa: BLE001 - the caller's decision must not kill the task silently
        log.exception("L7: handling a subrequest's answer failed")


async def _fetch(url: str, method: bytes, fields: list, connect_timeout: float, read_timeout: float):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    async with asyncio.timeout(connect_timeout):
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=_client_tls() if parts.scheme == "https" else None,
            server_hostname=parts.hostname if parts.scheme == "https" else None)
    try:
        head = b"".join([method, b" ", target.encode("latin-1"), b" HTTP/1.1\r\n"]
                        + [n + b": " + v + b"\r\n" for n, v in fields]
                        + [b"Connection: close\r\n\r\n"])
        writer.write(head)
        parser = ResponseParser(_MAX_HEAD, 100)
        parser.set_request_method(b"HEAD")   # the head is all we read
        async with asyncio.timeout(read_timeout):
            while True:
                ev = parser.next_event()
                if type(ev) is ResponseHead:
                    if ev.status >= 200:
                        return ev.status, list(ev.headers)
                    continue
                data = await reader.read(65536)
                if not data:
                    parser.feed_eof()
                    ev = parser.next_event()
                    if type(ev) is ResponseHead and ev.status >= 200:
                        return ev.status, list(ev.headers)
                    raise ConnectionResetError("closed before a response head")
                parser.feed(data)
    finally:
        writer.close()
