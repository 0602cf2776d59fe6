"""``--workers N``: one control plane, N data-plane processes sharing the listeners.

The parent process runs discovery, health checks, the controller and the admin server. Each
worker is a child process (``python -m meshproxy.workers``) that binds the same listeners with
SO_REUSEPORT — the kernel spreads new connections over them — and serves from the snapshots
the parent sends it.

Wire protocol on the socketpair (parent <-> worker), one message per frame: 4-byte big-endian
length + pickle. Parent -> worker: ``("settings", Settings)`` once, then ``("snapshot",
Snapshot)`` on every publish, ``("draining",)`` at SIGTERM (responses carry ``Connection:
close`` from then on while the listeners still accept during ``--shutdown-delay``),
``("settings-changed", {field: value})`` when live settings change (``--config`` re-read),
``("drain", seconds)`` once that delay has passed (close the listeners, finish the open
connections, exit), ``("reopen",)`` at SIGUSR1 (reopen the access log: each worker has its own
descriptor of the file), ``("stop",)``. Worker ->
parent: ``("ready", pid)`` once its listeners for the first snapshot are bound.

Metrics: with workers, prometheus-client runs in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
is set by the CLI before anything imports prometheus_client); the parent's ``/metrics`` adds
up every process's values.

A worker that dies is started again and given the snapshot in force.

``run --workers N --takeover``: the parent takes over the old instance's admin listener; the
new workers bind the data-plane ports next to the old workers (SO_REUSEPORT), and the old
instance is told to drain only once every new worker is ready (``Process.start``).
"""

from __future__ import annotations

import asyncio
import copyreg
import dataclasses
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import types

from prometheus_client import multiprocess

from .core.runtime import Runtime
from .core.settings import Settings
from .dataplane import DataPlane
from .process import Process, install_uvloop, raise_fd_limit_logged

__all__ = ["run_workers", "enable_pickling"]

log = logging.getLogger("meshproxy.workers")

_LEN = struct.Struct(">I")


def _mapping_proxy(d: dict) -> types.MappingProxyType:
    return types.MappingProxyType(d)


def enable_pickling() -> None:
    """Snapshots use read-only mappings, which pickle cannot handle by itself."""
    copyreg.pickle(types.MappingProxyType, lambda m: (_mapping_proxy, (dict(m),)))


def _frame(msg) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader):
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    return pickle.loads(await reader.readexactly(n))


# ------------------------------------------------------------------------------------------------
# worker side


async def _worker_main(fd: int) -> int:
    loop = asyncio.get_running_loop()
    # First of all: SIGUSR1 would otherwise end the process (a logrotate script may signal the
    # whole process group); until the data plane exists there is no log to reopen.
    reopen = [lambda: None]
    loop.add_signal_handler(signal.SIGUSR1, lambda: reopen[0]())
    enable_pickling()
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    kind, settings = await _read_frame(reader)
    assert kind == "settings"
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker-{os.getpid()} %(name)s: %(message)s")
    runtime = Runtime(settings)
    dataplane = DataPlane(runtime, kernel=False)    # nftables rules: the control plane's job
    await dataplane.start()
    reopen[0] = dataplane.reopen_logs
    # The parent decides when to stop; a Ctrl-C in the terminal reaches the whole group.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    told_ready = False
    try:
        while True:
            try:
                msg = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("control plane went away; stopping")
                break
            if msg[0] == "snapshot":
                runtime.publish(_keep_identity(runtime.snapshot, msg[1]))
                if not told_ready:
                    await dataplane.settled()
                    writer.write(_frame(("ready", os.getpid())))
                    told_ready = True
            elif msg[0] == "settings-changed":
                for name, value in msg[1].items():
                    setattr(settings, name, value)
                if "log_level" in msg[1]:
                    logging.getLogger().setLevel(getattr(logging, settings.log_level.upper(), logging.INFO))
                dataplane.settings_changed(msg[1])
            elif msg[0] == "draining":
                runtime.draining = True
            elif msg[0] == "reopen":
                dataplane.reopen_logs()
            elif msg[0] == "drain":
                runtime.draining = True
                await dataplane.stop_accepting()
                await dataplane.drain(msg[1])
                break
            elif msg[0] == "stop":
                break
    finally:
        await dataplane.close()
    return 0


def _keep_identity(prev, snap):
    """Unpickling makes every object new; give unchanged backends their previous objects back
    so the balancers' tables (cached by endpoint-tuple identity) survive the publish."""
    if prev is None:
        return snap
    old = prev.backends
    backends = {}
    for key, b in snap.backends.items():
        o = old.get(key)
        backends[key] = o if o is not None and o == b else b
    return dataclasses.replace(snap, backends=types.MappingProxyType(backends))


def worker_entry() -> int:
    install_uvloop()
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    return asyncio.run(_worker_main(fd))


# ------------------------------------------------------------------------------------------------
# parent side


class _Worker:
    __slots__ = ("index", "proc", "writer", "reader", "ready", "task")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.ready = False
        self.task: asyncio.Task | None = None


class WorkerPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.snapshot = None
        self.stopping = False
        self.draining = False
        self._monitor: asyncio.Task | None = None

    async def _spawn(self, w: _Worker) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        w.proc = subprocess.Popen([sys.executable, "-m", "meshproxy.workers", "--fd", str(child_sock.fileno())],
                                  pass_fds=(child_sock.fileno(),), env=env)
        child_sock.close()
        w.reader, w.writer = await asyncio.open_connection(sock=parent_sock)
        w.ready = False
        w.writer.write(_frame(("settings", self.settings)))
        if self.snapshot is not None:
            w.writer.write(_frame(("snapshot", self.snapshot)))
        if self.draining:   # restarted during --shutdown-delay
            w.writer.write(_frame(("draining",)))
        w.task = asyncio.get_running_loop().create_task(self._listen(w))
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    async def _listen(self, w: _Worker) -> None:
        assert w.reader is not None
        try:
            while True:
                msg = await _read_frame(w.reader)
                if msg[0] == "ready":
                    w.ready = True
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            w.ready = False

    async def start(self) -> None:
        for w in self.workers:
            await self._spawn(w)
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None and not self.stopping:
                    log.error("worker %d (pid %d) exited with %s; starting it again", w.index, w.proc.pid, w.proc.returncode)
                    _remove_dead_metrics(w.proc.pid)
                    await self._spawn(w)

    def publish(self, snap) -> None:
        self.snapshot = snap
        data = _frame(("snapshot", snap))
        for w in self.workers:
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(data)

    def settings_changed(self, changes: dict) -> None:
        """Live settings changed in the parent (``self.settings`` is the parent's object, so
        a worker started later gets them with its first message)."""
        data = _frame(("settings-changed", changes))
        for w in self.workers:
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(data)

    def start_draining(self) -> None:
        """SIGTERM: responses carry ``Connection: close`` from now on; listeners stay open."""
        self.draining = True
        data = _frame(("draining",))
        for w in self.workers:
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(data)

    def reopen_logs(self) -> None:
        """SIGUSR1: every worker reopens its access log."""
        data = _frame(("reopen",))
        for w in self.workers:
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(data)

    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers)

    async def stop(self, drain: float | None) -> None:
        self.stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        for w in self.workers:
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(_frame(("drain", drain) if drain is not None else ("stop",)))
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(loop.run_in_executor(None, w.proc.wait), (drain or 0) + 5)
            except asyncio.TimeoutError:
                w.proc.kill()
                w.proc.wait()
            _remove_dead_metrics(w.proc.pid)


def _remove_dead_metrics(pid: int) -> None:
    try:
        multiprocess.mark_process_dead(pid)
    except Exception:  # metrics bookkeeping must never stop a restart
        pass


def run_workers(settings: Settings) -> int:
    """``meshproxy run --workers N`` (N > 1)."""
    install_uvloop()
    enable_pickling()
    raise_fd_limit_logged()

    async def main() -> int:
        pool = WorkerPool(settings)
        proc = Process(settings, data_plane=False, publish_hook=pool.publish)
        proc.extra_ready = pool.all_ready
        proc.on_draining = pool.start_draining
        proc.on_stop = pool.stop
        proc.on_reopen_logs = pool.reopen_logs
        proc.on_settings = pool.settings_changed
        await pool.start()
        try:
            return await proc.serve()
        finally:
            if not pool.stopping:
                await pool.stop(None)
            path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
            if path.startswith(os.path.join(os.path.realpath(os.environ.get("TMPDIR", "/tmp")), "meshproxy-metrics-")):
                shutil.rmtree(path, ignore_errors=True)
    return asyncio.run(main())


if __name__ == "__main__":
    sys.exit(worker_entry())
