"""What the data plane of one process shares: the snapshot in force, the live balancer state,
the workload identity (mesh), the settings and the lifecycle flags.

The control plane publishes a snapshot by assigning ``runtime.snapshot`` (one reference swap,
atomic under the GIL) and then calling the subscribers, so listeners can reconcile. Data-plane
code reads ``runtime.snapshot`` once per connection (L4) or per request (L7) into a local and
uses only that local for the whole decision.
"""

from __future__ import annotations

from typing import Callable

from .balancers import Balancers
from .identity import IdentityStore
from .settings import Settings
from .snapshot import Snapshot

__all__ = ["Runtime"]


class Runtime:
    __slots__ = ("settings", "snapshot", "balancers", "draining", "_subscribers", "drain_deadline", "access_log",
                 "identity")

    def __init__(self, settings: Settings, snapshot: Snapshot | None = None) -> None:
        self.settings = settings
        self.snapshot: Snapshot | None = snapshot
        self.balancers = Balancers(settings)
        # The SVID in force and its mTLS contexts; empty unless an identity source fills it.
        self.identity = IdentityStore(settings.trust_domain)
        # Set on SIGTERM: keep-alive responses carry "Connection: close", listeners stop.
        self.draining = False
        self.drain_deadline: float | None = None
        self._subscribers: list[Callable[[Snapshot], None]] = []
        # The process's access log (meshproxy.core.accesslog.AccessLog), set by the data plane
        # when --access-log is given; L4 and L7 log their records to it.
        self.access_log = None

    def subscribe(self, fn: Callable[[Snapshot], None]) -> None:
        self._subscribers.append(fn)
        if self.snapshot is not None:
            fn(self.snapshot)

    def publish(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.balancers.on_snapshot(snap)
        for fn in list(self._subscribers):
            fn(snap)
