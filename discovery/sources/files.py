"""The file source: manifests named by ``-f`` (files or folders), watched for changes.

A change is applied as a diff of objects: only documents of files that changed are re-read,
and only objects that differ become events. The whole new set is validated before anything
is applied; a load with any error is refused as a whole and the last good objects stay in
force (the proxy keeps serving its last good snapshot).

Change detection uses inotify when the platform has it (through ctypes: no dependency) and
falls back to polling file stats every ``poll_interval`` seconds.

Reading and parsing run in a worker thread (``load_async``): a 34 MB manifest takes seconds to
parse, and the event loop that delivers changes also serves the data plane. Loads are
serialized — one at a time, under ``_loading`` — and the source's state (caches, the last good
set) is touched only by the load that holds it; the outcome is handed to ``on_outcome`` on the
loop. ``load`` and ``reload_now`` stay callable directly (start-up checks, tests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from ..manifests import ConfigError, LoadResult, iter_manifest_files, load_file, validate_set
from ..store import ADDED, DELETED, MODIFIED, Event

__all__ = ["FileSource", "Outcome"]

log = logging.getLogger("meshproxy.sources.files")


@dataclass(slots=True)
class Outcome:
    ok: bool
    events: list[Event]
    errors: list[ConfigError]
    skipped: list[str]
    files: int
    bytes_read: int = 0           # size of the files re-read: how heavy this load was


class FileSource:
    name = "files"

    def __init__(self, paths: Iterable[str], service_cidr: str | None = None,
                 poll_interval: float = 0.5, on_load_start: Callable[[], None] | None = None) -> None:
        self.paths = [os.path.abspath(p) for p in paths]
        self.service_cidr = service_cidr
        self.poll_interval = poll_interval
        self._cache: dict[str, tuple[tuple[int, int, int], LoadResult]] = {}
        self._current: dict[tuple, object] = {}     # object key -> object, last good set
        self._owner: dict[tuple, str] = {}          # object key -> file it is defined in
        self._owner_pending: dict[tuple, str] = {}
        self._keys_by_file: dict[str, set[tuple]] = {}   # file -> keys of its objects
        self._services: dict[tuple, object] = {}         # the Service objects of _current
        self._doc_cache: dict[str, dict] = {}          # file -> per-document parse cache
        self._task: asyncio.Task | None = None
        self._inotify: _Inotify | None = None
        self._reported_skips: set[str] = set()
        self._loading: asyncio.Lock | None = None
        # Called on the loop before each load_async goes to the thread (the process pauses the
        # garbage collector around big loads: docs/resilience.md, "Big reloads").
        self.on_load_start = on_load_start
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- loading ------------------------------------------------------------------------------

    def _stat_key(self, path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, changed: set[str] | None = None) -> Outcome:
        """Re-read what changed (every file whose stat changed when ``changed`` is None) and
        diff against the last good set. On success the new set becomes the last good one.

        Cost is O(files listed + documents re-read + services): only the changed files'
        objects are diffed, duplicates are found through the key -> file owner map, and the
        cross-object checks (nodePorts, ClusterIPs) look at Services only.
        """
        errors: list[ConfigError] = []
        for p in self.paths:
            if not os.path.exists(p):
                errors.append(ConfigError(p, 0, "", "", "no such file or directory"))
        files = list(iter_manifest_files(p for p in self.paths if os.path.exists(p)))
        file_set = set(files)
        reread: dict[str, tuple[tuple[int, int, int], LoadResult]] = {}
        for f in files:
            prev = self._cache.get(f)
            if prev is not None and changed is not None and f not in changed:
                continue
            sk = self._stat_key(f)
            if prev is not None and changed is None and sk is not None and prev[0] == sk:
                continue
            reread[f] = (sk or (0, 0, 0), load_file(f, self._doc_cache.setdefault(f, {})))
        bytes_read = sum(key[1] for key, _ in reread.values())
        gone = [f for f in self._cache if f not in file_set]
        touched = set(reread) | set(gone)

        def result_of(f: str) -> LoadResult:
            return reread[f][1] if f in reread else self._cache[f][1]

        skipped: list[str] = []
        for f in files:
            r = result_of(f)
            errors.extend(r.errors)
            if f in reread:
                skipped.extend(r.skipped)
        # Identity clashes: new objects of re-read files against owners in other files.
        owner = self._owner
        new_objs: dict[tuple, object] = {}
        for f in files:
            if f not in reread:
                continue
            for obj in result_of(f).objects:
                k = obj.key
                if (k in owner and owner[k] not in touched) or k in new_objs:
                    first_file = (owner[k] if k in owner and owner[k] not in touched
                                  else self._owner_pending.get(k, f))
                    errors.append(ConfigError(obj.origin.file, obj.origin.line, obj.ref, "metadata.name",
                                              f"defined twice (first in {first_file})"))
                    continue
                new_objs[k] = obj
                self._owner_pending[k] = f
        self._owner_pending.clear()
        # Services are few next to pods: check nodePorts / ClusterIPs across all of them.
        # Only needed when a touched file holds (or held) a Service.
        new_services = [o for k, o in new_objs.items() if k[0] == "Service"]
        if new_services or any(k[0] == "Service" for f in touched for k in self._keys_by_file.get(f, ())):
            services = [o for k, o in self._services.items() if self._owner.get(k) not in touched]
            errors.extend(validate_set(services + new_services, self.service_cidr))
        for s in skipped:
            if s not in self._reported_skips:
                self._reported_skips.add(s)
                log.info("%s: kind not used by meshproxy, skipped", s)
        if errors:
            # Keep the cache of files that parsed cleanly so the next attempt re-reads less,
            # but never adopt the new objects.
            return Outcome(False, [], errors, skipped, len(files), bytes_read)
        events = []
        old_keys = set().union(*(self._keys_by_file.get(f, ()) for f in touched))
        for k, obj in new_objs.items():
            old = self._current.get(k)
            if old is None:
                events.append(Event(ADDED, obj))
            elif old != obj:
                events.append(Event(MODIFIED, obj))
        for k in old_keys - new_objs.keys():
            events.append(Event(DELETED, self._current.pop(k)))
            del self._owner[k]
            self._services.pop(k, None)
        for f in touched:
            self._keys_by_file.pop(f, None)
        for k, obj in new_objs.items():
            self._current[k] = obj
            self._owner[k] = obj.origin.file
            self._keys_by_file.setdefault(obj.origin.file, set()).add(k)
            if k[0] == "Service":
                self._services[k] = obj
        for f in gone:
            del self._cache[f]
            self._doc_cache.pop(f, None)
        self._cache.update(reread)
        return Outcome(True, events, [], skipped, len(files), bytes_read)

    async def load_async(self, changed: set[str] | None = None, *, full: bool = False) -> Outcome:
        """``load`` (or ``reload_now`` with ``full``) in the worker thread, one at a time."""
        async with self._lock():
            return await self._in_thread(self.reload_now if full else self.load, changed)

    def _lock(self) -> asyncio.Lock:
        if self._loading is None:
            self._loading = asyncio.Lock()
        return self._loading

    async def _in_thread(self, fn, *args):
        if self.on_load_start is not None:
            self.on_load_start()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshproxy-parse")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- watching -----------------------------------------------------------------------------

    def watch(self, on_outcome: Callable[[Outcome], None], coalesce: float = 0.01) -> None:
        """Start watching in the running loop; ``on_outcome`` gets every reload's result."""
        self._inotify = _Inotify.create()
        if self._inotify is not None:
            self._task = asyncio.get_running_loop().create_task(self._watch_inotify(on_outcome, coalesce))
        else:
            self._task = asyncio.get_running_loop().create_task(self._watch_poll(on_outcome))

    def reload_now(self, _changed: set[str] | None = None) -> Outcome:
        """Full re-read (SIGHUP): stats are not trusted, every file is parsed again."""
        # Every file counts as touched: its old objects are diffed against what it holds now.
        self._cache.clear()
        self._doc_cache.clear()
        return self.load()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._inotify is not None:
            self._inotify.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _signature(self) -> dict[str, tuple[int, int, int] | None]:
        return {f: self._stat_key(f) for f in iter_manifest_files(p for p in self.paths if os.path.exists(p))}

    async def _watch_poll(self, on_outcome: Callable[[Outcome], None]) -> None:
        sig = self._signature()
        while True:
            await asyncio.sleep(self.poll_interval)
            new = self._signature()
            if new != sig:
                sig = new
                async with self._lock():   # _cache is the load's while one runs
                    changed = {f for f in new if f not in self._cache or self._cache[f][0] != new[f]}
                    outcome = await self._in_thread(self.load, changed | {f for f in new if new[f] is None})
                on_outcome(outcome)

    def _watch_dirs(self) -> set[str]:
        dirs = set()
        for p in self.paths:
            if os.path.isdir(p):
                for root, subdirs, _ in os.walk(p):
                    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                    dirs.add(root)
            else:
                dirs.add(os.path.dirname(p) or ".")
        return dirs

    async def _watch_inotify(self, on_outcome: Callable[[Outcome], None], coalesce: float) -> None:
        ino = self._inotify
        assert ino is not None
        loop = asyncio.get_running_loop()
        for d in self._watch_dirs():
            ino.add(d)
        ready = asyncio.Event()
        loop.add_reader(ino.fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                # Let a burst of writes (an editor saving, `cp -r`) gather into one reload.
                await asyncio.sleep(coalesce)
                changed: set[str] = set()
                dirs_changed = False
                for directory, name, is_dir in ino.read():
                    if is_dir:
                        dirs_changed = True
                    changed.add(os.path.join(directory, name) if name else directory)
                if dirs_changed:
                    for d in self._watch_dirs():
                        ino.add(d)
                relevant = {c for c in changed if self._relevant(c)}
                if relevant or dirs_changed:
                    on_outcome(await self.load_async(None if dirs_changed else relevant))
        finally:
            loop.remove_reader(ino.fd)

    def _relevant(self, path: str) -> bool:
        name = os.path.basename(path)
        if name.startswith("."):
            return False
        for p in self.paths:
            if path == p or (path.startswith(p.rstrip("/") + "/") and name.endswith((".yaml", ".yml", ".json"))):
                return True
        return False


# --------------------------------------------------------------------------------------------
# inotify through ctypes (Linux); None elsewhere.

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MASK = (_IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
         | _IN_DELETE_SELF | _IN_ATTRIB)
_EVENT = struct.Struct("iIII")


class _Inotify:
    def __init__(self, libc, fd: int) -> None:
        self.libc, self.fd = libc, fd
        self.wds: dict[int, str] = {}
        self.dirs: set[str] = set()

    @classmethod
    def create(cls) -> "_Inotify | None":
        if os.environ.get("MESHPROXY_NO_INOTIFY"):
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        return cls(libc, fd)

    def add(self, directory: str) -> None:
        if directory in self.dirs:
            return
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK)
        if wd >= 0:
            self.wds[wd] = directory
            self.dirs.add(directory)

    def read(self) -> list[tuple[str, str, bool]]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0").decode(errors="replace")
                pos += _EVENT.size + length
                directory = self.wds.get(wd)
                if directory is None:
                    continue
                if mask & _IN_DELETE_SELF:
                    self.wds.pop(wd, None)
                    self.dirs.discard(directory)
                out.append((directory, name, bool(mask & _IN_ISDIR)))
        return out

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
