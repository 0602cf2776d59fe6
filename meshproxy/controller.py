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
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

from discovery.store import Allocator, EndpointIndex, Event, Store

from .core import metrics
from .core.settings import Settings
from .core.snapshot import Snapshot, SnapshotBuilder

__all__ = ["Controller"]

log = logging.getLogger("meshproxy.controller")

PROBLEMS_SHOWN = 50


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

    # -- input --------------------------------------------------------------------------------

    def apply_events(self, events: Iterable[Event], source: str = "files") -> None:
        events = list(events)
        for ev in events:
            metrics.source_events.labels(source, ev.obj.key[0], ev.type).inc()  # type: ignore[attr-defined]
        changes = self.store.apply(events)
        if not changes:
            return
        self.index.on_changes(changes)
        for old, new in changes:
            obj = new if new is not None else old
            kind = obj.key[0]
            if kind == "Service":
                self._changed_services.add((obj.namespace, obj.name))
            elif kind == "Node":
                self._full_build = True
        self._schedule()

    def set_probe_results(self, results: dict[tuple[str, str], bool] | None) -> None:
        """Turn probe-driven readiness on (a dict the health checker keeps updating) or off."""
        self.index.probe_results = results
        for ns, name in list(self.store.items("Pod")):
            self.index.pod_readiness_changed(ns, name)
        self._schedule()

    def pod_readiness_changed(self, namespace: str, name: str) -> None:
        self.index.pod_readiness_changed(namespace, name)
        self._schedule()

    def _schedule(self) -> None:
        if self._pending:
            return
        self._pending = True
        self.last_change = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._pending = False
            self.rebuild()
            return
        self._handle = loop.call_later(self.settings.coalesce_delay, self.rebuild)

    @property
    def pending(self) -> bool:
        """Changes applied to the store that no published snapshot holds yet."""
        return self._pending

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
        self._pending = False
        if self._handle is not None:   # called directly while a coalesced build was due
            self._handle.cancel()
        self._handle = None
        t0 = time.perf_counter()
        try:
            changed = self.index.recompute()
            hint = None if self._full_build else changed | self._changed_services
            snap = self.builder.build(self.store, self.index, self.allocator, hint)
            self._changed_services = set()
            self._full_build = False
        except Exception:  # a bug in building must not stop the proxy: keep the last snapshot
            log.exception("building the snapshot failed; the previous one stays in force")
            return None
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
        """Only services whose endpoint sets changed are touched: O(changes), not O(cluster)."""
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
