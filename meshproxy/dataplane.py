"""The data plane of one process: its L4 and L7 listeners, or the kernel's rules, with one lifecycle.

The single process (``meshproxy.process``) and every ``--workers`` child
(``meshproxy.workers``) run exactly this: ``start`` subscribes the L4 listeners and the
ingress server to the runtime's snapshots, ``stop_accepting`` closes the listening sockets
(connections already queued are taken over or refused by the kernel), ``drain`` lets open
connections finish within a deadline, ``close`` does both at once.

L4 Services come in two modes (``--proxy-mode``):

- ``userspace``: TCP listeners and the byte pump (``l4.listeners``), UDP relays
  (``l4.udp``), in every process that has listeners;
- ``nftables``: the kernel translates Service addresses (``l4.nft_kernel``); no Service
  socket is bound (the L4 manager keeps only the Gateway TCP / TLS listeners, which choose a
  route per connection). The rules are programmed by exactly one process (``kernel=True``: the
  single process, or the control plane of ``--workers``, never a worker) and stay when it
  exits: traffic keeps flowing across a restart, ``meshproxy cleanup`` removes them.
  ``ready()`` is true once the rules of the first snapshot are in the kernel.

The L7 server is the same in both modes.

``--sidecar`` replaces all of it with the mesh data path (``meshproxy.sidecar``): the captured
outbound and inbound ports, nothing bound on Service addresses (in a meshed pod those are
reached through capture, not by being local).

The access log (``--access-log``) belongs to the data plane of its process: opened here, put
on the runtime for L4 and L7, reopened by ``reopen_logs`` (SIGUSR1) and closed last in
``close``, after the connections whose records it still takes.
"""

from __future__ import annotations

import asyncio

from l4.listeners import L4Manager
from l4.nft_kernel import KernelProxier, NftError
from l4.nft_kernel import cleanup as nft_cleanup
from l4.udp import UdpManager
from l7.server import IngressServer

from .core.accesslog import AccessLog
from .core.runtime import Runtime
from .sidecar import Sidecar

__all__ = ["DataPlane", "NftError", "cleanup"]


def _gateway_only(lst) -> bool:
    return lst.routes is not None


class DataPlane:
    def __init__(self, runtime: Runtime, *, listeners: bool = True, kernel: bool = True) -> None:
        """``listeners``: this process serves sockets (not the control plane of --workers);
        ``kernel``: this process owns the nftables rules (not a worker)."""
        self.runtime = runtime
        settings = runtime.settings
        self.access_log: AccessLog | None = None
        if settings.access_log and listeners:
            self.access_log = runtime.access_log = AccessLog(settings.access_log, settings.access_log_format,
                                                             settings.access_log_buffer)
        nft_mode = settings.proxy_mode == "nftables"
        self.l4: L4Manager | None = None
        self.udp: UdpManager | None = None
        self.ingress: IngressServer | None = None
        self.sidecar: Sidecar | None = None
        if listeners and settings.sidecar:
            self.sidecar = Sidecar(runtime)
        elif listeners:
            self.l4 = L4Manager(runtime, only=_gateway_only if nft_mode else None)
            self.udp = UdpManager(runtime) if not nft_mode else None
            # The L7 server is always there: besides --ingress-listen / --ingress-tls-listen it
            # serves the snapshot's http_listeners (Gateway listeners, mesh Service ports), which
            # any configuration may bring; with none of them it binds nothing.
            self.ingress = IngressServer(runtime)
        self.kernel: KernelProxier | None = None
        self._synced: asyncio.Event | None = None
        if nft_mode and kernel:
            loop = asyncio.get_running_loop()
            self._synced = asyncio.Event()
            event = self._synced
            self.kernel = KernelProxier(settings.nft_table,
                                        on_synced=lambda _v: loop.call_soon_threadsafe(event.set))

    async def start(self) -> None:
        if self.kernel is not None:
            self.kernel.start()
            self.runtime.subscribe(self.kernel.apply)
        if self.l4 is not None:
            self.runtime.subscribe(self.l4.apply)
        if self.udp is not None:
            self.runtime.subscribe(self.udp.apply)
        if self.ingress is not None:
            await self.ingress.start()
            self.runtime.subscribe(self.ingress.apply)
        if self.sidecar is not None:
            await self.sidecar.start()

    def ready(self) -> bool:
        """The first snapshot's rules are in the kernel (always true without nftables mode)."""
        return self._synced is None or self._synced.is_set()

    async def settled(self) -> None:
        """Until the listeners of the snapshot in force are bound (they are bound a few hundred
        per loop turn: a big snapshot takes a few turns)."""
        await asyncio.sleep(0)
        while self.l4 is not None and self.l4.binding:
            await asyncio.sleep(0)

    async def stop_accepting(self) -> None:
        if self.l4 is not None:
            await self.l4.stop_accepting()
        if self.udp is not None:
            self.udp.stop()
        if self.ingress is not None:
            await self.ingress.stop_accepting()
        if self.sidecar is not None:
            await self.sidecar.stop_accepting()

    async def drain(self, timeout: float) -> None:
        waits = []
        if self.l4 is not None:
            waits.append(self.l4.drain(timeout))
        if self.ingress is not None:
            waits.append(self.ingress.drain(timeout))
        if self.sidecar is not None:
            waits.append(self.sidecar.drain(timeout))
        await asyncio.gather(*waits, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_accepting()
        await self.drain(0)
        if self.kernel is not None:
            # The rules stay: the kernel keeps translating while no process runs.
            await asyncio.get_running_loop().run_in_executor(None, self.kernel.stop)
        if self.access_log is not None:
            self.access_log.close()
            self.runtime.access_log = None

    def reopen_logs(self) -> None:
        """SIGUSR1: the access log opens its path anew (logrotate moved the file)."""
        if self.access_log is not None:
            self.access_log.reopen()

    def settings_changed(self, changes: dict[str, object]) -> None:
        """Live settings changed (already set on ``runtime.settings``). Most are read where
        they are used; the ones the listeners keep in a prepared form are refreshed here."""
        if "max_connections" in changes:
            if self.l4 is not None:
                self.l4.limits_changed()
            if self.ingress is not None:
                self.ingress.limits_changed()
        if "trusted_proxies" in changes and self.ingress is not None:
            # Read once per client connection: new connections see the new list.
            self.ingress.trusted_changed()

    def listener_errors(self) -> dict[str, str]:
        out = {f"{h}:{p}": msg for (h, p), msg in sorted(self.l4.failures.items())} if self.l4 is not None else {}
        if self.udp is not None:
            out.update({f"{h}:{p}/udp": msg for (h, p), msg in sorted(self.udp.failures.items())})
        return out

    def kernel_state(self) -> dict | None:
        return dict(self.kernel.state) if self.kernel is not None else None


def cleanup(table: str) -> bool:
    """``meshproxy cleanup``: delete the nftables table of ``--proxy-mode nftables``. True when
    there was one."""
    return nft_cleanup(table)
