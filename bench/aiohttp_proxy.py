"""A plain aiohttp reverse proxy, the way most people write one — the "≥ 4× aiohttp" yardstick.

    python -m bench.aiohttp_proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT

aiohttp.web server + one shared ClientSession with a keep-alive pool; request and response
bodies are read whole (fine for the small / 10 KiB responses the target is about); hop-by-hop
headers are dropped; no access log; uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bench._util import check_loopback, split_hostport

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "content-length", "host"}


async def serve(listen: str, upstream: str) -> None:
    from aiohttp import ClientSession, TCPConnector, web

    host, port = split_hostport(listen)
    base = f"http://{upstream}"
    session = ClientSession(connector=TCPConnector(limit=256, keepalive_timeout=300),
                            auto_decompress=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read() if request.body_exists else None
        async with session.request(request.method, base + request.path_qs, headers=headers,
                                   data=body, allow_redirects=False) as r:
            data = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP}
            return web.Response(status=r.status, body=data, headers=out)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda: stop.done() or stop.set_result(None))
    await stop
    await runner.cleanup()
    await session.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aiohttp_proxy")
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args(argv)
    check_loopback(split_hostport(a.listen)[0])
    check_loopback(split_hostport(a.upstream)[0])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(a.listen, a.upstream))
    else:
        uvloop.run(serve(a.listen, a.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
