"""The control socket: handing our listening sockets to a new process on upgrade
(``run --takeover``).

Every listener of the process (L4, Ingress, admin) is created by
``meshproxy.core.sockets.listen()``, which registers it. An upgrade must not lose connections
that the kernel has already accepted into a listener's queue: with plain SO_REUSEPORT, closing
the old process's socket resets what sat in its queue. So the old process passes its listening sockets themselves (SCM_RIGHTS over a
unix control socket) to the new one; the kernel socket — and its queue — stays open while
either process holds it. Procedure:

1. the new process starts with ``--takeover``: it connects to the control socket of the
   running one, receives its listening sockets, and uses them instead of binding again
   (sockets it does not need any more are closed after its first snapshot);
2. once the new process is ready it sends ``drain``: the old one stops accepting (closes its
   copies, which does not close the kernel sockets), finishes its open connections within
   ``--drain-timeout``, and exits;
3. the new process then owns the control socket path.

The socket file is removed when the process closes, but never after a takeover (the new
process puts its own socket at the same path, and the old one leaving must not delete it), and
only while the path is still the file this process created (same device, inode and change
time: an inode number alone is reused at once by tmpfs when another process replaced the file).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Callable

from .core.sockets import adopt_inherited, registered

__all__ = ["ControlServer", "Takeover", "control_path", "request_takeover"]

log = logging.getLogger("meshproxy.control")


def control_path(admin: tuple[str, int]) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"meshproxy-{admin[0]}-{admin[1]}.sock")


class ControlServer:
    """Unix socket on which a newer process asks for our listeners and then tells us to go."""

    def __init__(self, path: str, on_drain: Callable[[], None]) -> None:
        self.path = path
        self.on_drain = on_drain
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int, int] | None = None   # the file we made; None: not ours to remove

    async def start(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)
        os.chmod(self.path, 0o600)
        self._identity = _identity(self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._identity is not None:
            identity, self._identity = self._identity, None
            try:
                if _identity(self.path) == identity:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:   # a stale file is harmless: the next start() replaces it
                log.warning("control socket %s: not removed: %s", self.path, exc)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            if line.strip() != b"takeover":
                return
            socks = registered()
            names = json.dumps([[h, p] for (h, p) in socks]).encode() + b"\n"
            raw = writer.get_extra_info("socket")
            # The fds travel with the first message; asyncio's transport cannot send ancillary
            # data, so this one small write goes through the socket directly (blocking is fine:
            # a few hundred bytes to a local peer).
            dup = socket.socket(fileno=os.dup(raw.fileno()))
            try:
                dup.setblocking(True)
                socket.send_fds(dup, [names], [s.fileno() for s in socks.values()])
            finally:
                dup.close()
            line = await asyncio.wait_for(reader.readline(), 120)
            if line.strip() == b"drain":
                log.info("takeover: a new process took our listeners; draining")
                self._identity = None        # the path is the new process's from now on
                self.on_drain()
        except (asyncio.TimeoutError, ConnectionError, OSError) as exc:
            log.warning("takeover request failed: %s", exc)
        finally:
            writer.close()


def _identity(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class Takeover:
    """The new process's side: holds the connection until it says ``drain``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def finish(self) -> None:
        try:
            self.sock.sendall(b"drain\n")
        finally:
            self.sock.close()


def request_takeover(path: str, timeout: float = 10.0) -> Takeover:
    """Connect to the running process and adopt its listening sockets."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(b"takeover\n")
    msg, fds, _flags, _addr = socket.recv_fds(s, 65536, 1024)
    names = json.loads(msg.split(b"\n", 1)[0])
    socks = {}
    for (host, port), fd in zip(names, fds):
        sock = socket.socket(fileno=fd)
        socks[(host, int(port))] = sock
    adopt_inherited(socks)
    log.info("takeover: received %d listening sockets", len(socks))
    return Takeover(s)

