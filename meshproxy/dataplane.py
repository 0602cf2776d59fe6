"""The data plane of one process: its L4 and L7 listeners, with one lifecycle.

The single process (``meshproxy.process``) and every ``--workers`` child
(``meshproxy.workers``) run exactly this: ``start`` subscribes the L4 listeners and the
ingress server to the runtime's snapshots, ``stop_accepting`` closes the listening sockets
(connections already queued are taken over or refused by the kernel), ``drain`` lets open
connections finish within a deadline, ``close`` does both at once.

The access log (``--access-log``) belongs to the data plane of its process: opened here, put
on the runtime for L4 and L7, reopened by ``reopen_logs`` (SIGUSR1) and closed last in
``close``, after the connections whose records it still takes.
"""

from __future__ import annotations

import asyncio

from l4.listeners import L4Manager
from l7.server import IngressServer

from .core.accesslog import AccessLog
from .core.runtime import Runtime

__all__ = ["DataPlane"]


class DataPlane:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        self.access_log: AccessLog | None = None
        if settings.access_log:
            self.access_log = runtime.access_log = AccessLog(settings.access_log, settings.access_log_format,
                                                             settings.access_log_buffer)
        self.l4 = L4Manager(runtime)
        # The L7 server is always there: besides --ingress-listen / --ingress-tls-listen it
        # serves the snapshot's http_listeners (Gateway listeners, mesh Service ports), which
        # any configuration may bring; with none of them it binds nothing.
        self.ingress: IngressServer | None = IngressServer(runtime)

    async def start(self) -> None:
        self.runtime.subscribe(self.l4.apply)
        if self.ingress is not None:
            await self.ingress.start()
            self.runtime.subscribe(self.ingress.apply)

    async def stop_accepting(self) -> None:
        await self.l4.stop_accepting()
        if self.ingress is not None:
            await self.ingress.stop_accepting()

    async def drain(self, timeout: float) -> None:
        waits = [self.l4.drain(timeout)]
        if self.ingress is not None:
            waits.append(self.ingress.drain(timeout))
        await asyncio.gather(*waits, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_accepting()
        await self.drain(0)
        if self.access_log is not None:
            self.access_log.close()
            self.runtime.access_log = None

    def reopen_logs(self) -> None:
        """SIGUSR1: the access log opens its path anew (logrotate moved the file)."""
        if self.access_log is not None:
            self.access_log.reopen()

    def listener_errors(self) -> dict[str, str]:
        return {f"{h}:{p}": msg for (h, p), msg in sorted(self.l4.failures.items())}
