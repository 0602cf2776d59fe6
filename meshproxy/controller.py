"""The control plane: sources -> store -> endpoints -> snapshot -> publish.

Invariants:
- all store/index mutation happens here, on the event loop, never in the data plane;
- events are applied to the store at once, but the snapshot is rebuilt at most once per
  ``coalesce_delay`` (a burst of changes becomes one publish);
- a snapshot is published by one call to ``publish`` (the runtime swaps its reference);
  a failed build leaves the last snapshot in force and is logged, never raised into a source;
- ``ready`` turns true once every source has delivered its initial state and the first
  snapshot has been published;
- configuration problems that are not in the snapshot — a refused manifest reload (the
  snapshot in force is the last good one), a refused settings file, settings that wait for a
  restart — are kept per source (``set_config_problems``), shown before the snapshot's own
  problems and counted with them in ``meshproxy_config_problems``, until that source reports
  again.

Big changes never hold the loop (docs/resilience.md, "Big reloads"): the loop also runs the
data plane, so a 45,000-Pod reload must not stop requests for seconds.

- ``apply_events_later`` / ``apply_events_async`` apply a large batch ``APPLY_CHUNK`` events
  at a time and yield to the loop between chunks;
- a large rebuild (a full one over a big store, or many changed services) runs
  ``index.recompute`` and ``builder.build`` in a worker thread; only the publish runs on the
  loop. Small changes are built on the loop as before (a thread hop costs more than they do);
- while either is under way (``_busy``) the store, the index and the builder belong to that
  work: every other mutation (``apply_events`` from any source, readiness changes) joins
  ``_queue`` and runs after it, in arrival order — one FIFO for big batches and small changes
  alike, so a source's events are never reordered; readers on the loop may read the store
  meanwhile (nothing mutates it). ``on_applied`` is told which kinds changed after every
  application, queued or not.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from typing import Callable, Iterable

from discovery.store import Allocator, EndpointIndex, Event, Store

from .core import metrics
from .core.settings import Settings
from .core.snapshot import Snapshot, SnapshotBuilder

__all__ = ["Controller", "APPLY_CHUNK"]

log = logging.getLogger("meshproxy.controller")

PROBLEMS_SHOWN = 50
# Events applied per loop turn by apply_events_async: ~15 ms of store + index work.
APPLY_CHUNK = 1000
# A rebuild goes to the worker thread when it is at least this much work (pods + 10 x services
# for a full build, 10 x services for an incremental one): a few tens of milliseconds.
OFFLOOP_COST = 4000
# Services whose endpoint gauges are updated per loop turn after a big change.
GAUGE_CHUNK = 200


class Controller:
    def __init__(self, settings: Settings, publish: Callable[[Snapshot], None]) -> None:
        self.settings = settings
        self._publish = publish
        self.store = Store()
        self.index = EndpointIndex(self.store)
        self.allocator = Allocator(settings.service_cidr, settings.node_port_range)
        self.builder = SnapshotBuilder(settings)
        self.snapshot: Snapshot | None = None
        self._pending = False
        self._handle: asyncio.TimerHandle | None = None
        self._published_problems: tuple[str, ...] = ()
        self._endpoint_labels: set[tuple[str, str, str]] = set()
        self.last_change: float = 0.0      # monotonic time of the first unapplied change
        self.waiters: list[asyncio.Future] = []
        # What changed since the last build, so the builder patches instead of redoing all.
        self._changed_services: set[tuple[str, str]] = set()
        self._full_build = True
        self._config_problems: dict[str, tuple[tuple[str, ...], int]] = {}   # source -> (shown, count)
        self.on_applied: Callable[[set[str]], None] | None = None   # kinds that changed
        # Work waiting for the store, in arrival order: callables, or ("chunked", events,
        # source, future) for a batch applied a chunk per loop turn.
        self._queue: collections.deque = collections.deque()
        self._busy = False              # a chunked batch or an off-loop build holds the store
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._build_task: asyncio.Task | None = None

    # -- input --------------------------------------------------------------------------------

    def _is_busy(self) -> bool:
        return self._busy or bool(self._queue)

    def apply_events(self, events: Iterable[Event], source: str = "files") -> None:
        """Apply now, or — while big work holds the store — after it, in arrival order."""
        events = list(events)
        if self._is_busy():
            self._queue.append(lambda: self._apply(events, source))
            self._kick()
            return
        self._apply(events, source)

    def apply_events_later(self, events: Iterable[Event], source: str = "files") -> asyncio.Future | None:
        """``apply_events`` for a batch of any size: a big one is applied ``APPLY_CHUNK`` events
        per loop turn, after everything that arrived before it and before everything after it.
        Returns a future done when it is in the store (None: it already is)."""
        events = list(events)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:        # no loop (meshproxy get): nothing else runs anyway
            loop = None
        if loop is None or (len(events) <= APPLY_CHUNK and not self._is_busy()):
            self._apply(events, source)
            return None
        fut = loop.create_future()
        self._queue.append(("chunked", events, source, fut))
        self._kick()
        return fut

    async def apply_events_async(self, events: Iterable[Event], source: str = "files") -> None:
        fut = self.apply_events_later(events, source)
        if fut is not None:
            await fut

    def _kick(self) -> None:
        if not self._busy and (self._worker is None or self._worker.done()):
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        """Run the queue in order; an off-loop build (``_busy``) kicks it again when done."""
        while self._queue and not self._busy:
            item = self._queue.popleft()
            if callable(item):
                try:
                    item()
                except Exception:   # one bad change must not lose the others
                    log.exception("applying a deferred change failed")
                continue
            _, events, source, fut = item
            self._busy = True
            kinds: set[str] = set()
            try:
                for i in range(0, len(events), APPLY_CHUNK):
                    kinds |= self._apply_chunk(events[i:i + APPLY_CHUNK], source)
                    await asyncio.sleep(0)
            except Exception:
                log.exception("applying %d events from %s failed", len(events), source)
            finally:
                self._busy = False
                if not fut.done():
                    fut.set_result(None)
            if kinds:
                self._applied(kinds)
                self._schedule()
        if self._pending and not self._is_busy():
            self._schedule()

    def _apply(self, events: list[Event], source: str) -> None:
        kinds = self._apply_chunk(events, source)
        if kinds:
            self._applied(kinds)
            self._schedule()

    def _apply_chunk(self, events: list[Event], source: str) -> set[str]:
        """Apply to the store and the index; return the kinds that really changed."""
        counts = collections.Counter((ev.obj.key[0], ev.type) for ev in events)  # type: ignore[attr-defined]
        for (kind, etype), n in counts.items():
            metrics.source_events.labels(source, kind, etype).inc(n)
        changes = self.store.apply(events)
        if not changes:
            return set()
        self.index.on_changes(changes)
        kinds = set()
        for old, new in changes:
            obj = new if new is not None else old
            kind = obj.key[0]
            kinds.add(kind)
            if kind == "Service":
                self._changed_services.add((obj.namespace, obj.name))
            elif kind == "Node":
                self._full_build = True
        return kinds

    def _applied(self, kinds: set[str]) -> None:
        if self.on_applied is not None:
            try:
                self.on_applied(kinds)
            except Exception:   # a subscriber must not break applying
                log.exception("after applying changes")

    def set_probe_results(self, results: dict[tuple[str, str], bool] | None) -> None:
        """Turn probe-driven readiness on (a dict the health checker keeps updating) or off."""
        if self._is_busy():
            self._queue.append(lambda: self.set_probe_results(results))
            self._kick()
            return
        self.index.probe_results = results
        for ns, name in list(self.store.items("Pod")):
            self.index.pod_readiness_changed(ns, name)
        self._schedule()

    def pod_readiness_changed(self, namespace: str, name: str) -> None:
        if self._is_busy():
            self._queue.append(lambda: self.pod_readiness_changed(namespace, name))
            self._kick()
            return
        self.index.pod_readiness_changed(namespace, name)
        self._schedule()

    def _schedule(self) -> None:
        """A change is in the store: build within ``coalesce_delay`` (at once without a loop)."""
        self._pending = True
        if self._handle is not None:
            return                      # the window is already open
        self.last_change = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.rebuild()
            return
        self._handle = loop.call_later(self.settings.coalesce_delay, self._rebuild_due)

    @property
    def busy(self) -> bool:
        """A big batch or an off-loop build holds the store; other changes queue behind it."""
        return self._busy

    @property
    def pending(self) -> bool:
        """Changes applied to the store (or waiting to be) that no published snapshot holds yet."""
        return self._pending or self._is_busy()

    def set_config_problems(self, source: str, problems: Iterable[str]) -> None:
        """What is wrong with ``source`` now (empty: nothing). At most ``PROBLEMS_SHOWN`` per
        source are kept for /debug/snapshot (a broken 45,000-pod file must not make that
        document huge); all of them are counted."""
        problems = list(problems)
        if not problems:
            self._config_problems.pop(source, None)
        else:
            shown = problems[:PROBLEMS_SHOWN]
            if len(problems) > PROBLEMS_SHOWN:
                shown.append(f"config: {source}: ... and {len(problems) - PROBLEMS_SHOWN} more problems")
            self._config_problems[source] = (tuple(shown), len(problems))
        self._count_problems()

    def config_problems(self, source: str) -> tuple[str, ...]:
        return self._config_problems.get(source, ((), 0))[0]

    def problems(self) -> list[str]:
        """Everything that does not work right now: configuration problems first, then the
        problems of the snapshot in force."""
        out = [p for shown, _ in self._config_problems.values() for p in shown]
        out.extend(self.snapshot.problems if self.snapshot is not None else ())
        return out

    def _count_problems(self) -> None:
        n = sum(count for _, count in self._config_problems.values())
        metrics.problems.set(n + (len(self.snapshot.problems) if self.snapshot is not None else 0))

    def settings_changed(self) -> None:
        """Settings the snapshot builder reads (balancing policies, Ingress class, timeouts)
        changed: the next build starts from nothing."""
        self.builder.forget()
        self._full_build = True
        self._schedule()

    # -- output -------------------------------------------------------------------------------

    def rebuild(self) -> Snapshot | None:
        """Build and publish now, on the caller's thread. While an off-loop build or a chunked
        application is under way, the rebuild is only marked due: that work ends with one."""
        if self._handle is not None:   # called directly while a coalesced build was due
            self._handle.cancel()
        self._handle = None
        if self._is_busy():
            self._pending = True
            return None
        self._pending = False
        t0 = time.perf_counter()
        try:
            snap, changed = self._build()
        except Exception:  # a bug in building must not stop the proxy: keep the last snapshot
            log.exception("building the snapshot failed; the previous one stays in force")
            return None
        return self._published(snap, changed, t0)

    def _build(self) -> tuple[Snapshot, set[tuple[str, str]]]:
        """recompute + build: on the loop, or in the worker thread while ``_busy`` is held."""
        changed = self.index.recompute()
        hint = None if self._full_build else changed | self._changed_services
        snap = self.builder.build(self.store, self.index, self.allocator, hint)
        self._changed_services = set()
        self._full_build = False
        return snap, changed

    def _build_cost(self) -> int:
        services = len(self.store.items("Service"))
        if self._full_build:
            return len(self.store.items("Pod")) + 10 * services
        return 10 * (len(self.index.dirty) + len(self._changed_services))

    def _rebuild_due(self) -> None:
        """The coalescing window closed: build here when it is cheap, else off the loop."""
        self._handle = None
        if not self._pending:
            return                      # a build since then already holds every change
        if self._is_busy():
            return                      # the work under way schedules again when done (_pending stays)
        if self._build_cost() < OFFLOOP_COST:
            self.rebuild()
            return
        self._busy = True               # from now on the store is the build thread's
        self._build_task = asyncio.get_running_loop().create_task(self._rebuild_off_loop())

    async def _rebuild_off_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshproxy-build")
        self._pending = False
        t0 = time.perf_counter()
        try:
            snap, changed = await loop.run_in_executor(self._executor, self._build)
        except Exception:  # as in rebuild(): keep the last snapshot
            log.exception("building the snapshot failed; the previous one stays in force")
            snap = None
        finally:
            self._busy = False
        if snap is not None:
            self._published(snap, changed, t0)
        if self._queue:
            self._kick()                # what waited runs now, then schedules its own build
        elif self._pending:
            self._schedule()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _published(self, snap: Snapshot, changed: set[tuple[str, str]], t0: float) -> Snapshot:
        metrics.snapshot_build_seconds.observe(time.perf_counter() - t0)
        self.snapshot = snap
        self._publish(snap)
        metrics.snapshot_version.set(snap.version)
        self._count_problems()
        self._update_endpoint_gauges(snap, changed)
        new_problems = set(snap.problems) - set(self._published_problems)
        for p in sorted(new_problems):
            log.warning("%s", p)
        self._published_problems = snap.problems
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(snap)
        self.waiters.clear()
        log.debug("snapshot %d published (%.1f ms)", snap.version, (time.perf_counter() - t0) * 1000)
        return snap

    def _update_endpoint_gauges(self, snap: Snapshot, changed: set[tuple[str, str]]) -> None:
        """Only services whose endpoint sets changed are touched: O(changes), not O(cluster).
        After a big change the gauges are brought up to date ``GAUGE_CHUNK`` services per loop
        turn, each from the snapshot in force at that turn (never an older one)."""
        keys = list(changed)
        self._set_endpoint_gauges(snap, keys[:GAUGE_CHUNK])
        rest = keys[GAUGE_CHUNK:]
        if rest:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._set_endpoint_gauges(snap, rest)
                return
            loop.call_soon(self._gauges_later, rest)

    def _gauges_later(self, keys: list[tuple[str, str]]) -> None:
        if self.snapshot is None:
            return
        self._update_endpoint_gauges(self.snapshot, set(keys))

    def _set_endpoint_gauges(self, snap: Snapshot, changed: Iterable[tuple[str, str]]) -> None:
        for key in changed:
            ns, name = key
            sets = snap.endpoint_sets.get(key)
            if sets is None:
                for state in ("ready", "serving", "terminating", "not_ready"):
                    if (ns, name, state) in self._endpoint_labels:
                        self._endpoint_labels.discard((ns, name, state))
                        try:
                            metrics.endpoints.remove(ns, name, state)
                        except KeyError:
                            pass
                continue
            totals = {"ready": 0, "serving": 0, "terminating": 0, "not_ready": 0}
            for es in sets:
                for k, v in es.counts().items():
                    totals[k] += v
            for state, v in totals.items():
                metrics.endpoints.labels(ns, name, state).set(v)
                self._endpoint_labels.add((ns, name, state))

    async def wait_for_snapshot(self, newer_than: int = 0) -> Snapshot:
        if self.snapshot is not None and self.snapshot.version > newer_than:
            return self.snapshot
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut
