"""Discovery's reports (``discovery.signals``) turned into this process's Prometheus metrics."""

from __future__ import annotations

from discovery.signals import Signals

from .core import metrics

__all__ = ["MetricSignals"]


class MetricSignals(Signals):
    def __init__(self) -> None:
        # Children looked up once: labels() costs a lock and a dict lookup per call.
        self._probes: dict[str, object] = {}

    def source_up(self, source: str, up: bool) -> None:
        metrics.source_up.labels(source).set(1 if up else 0)

    def source_relisted(self, source: str) -> None:
        metrics.source_relists.labels(source).inc()

    def probe(self, result: str) -> None:
        child = self._probes.get(result)
        if child is None:
            child = self._probes[result] = metrics.probes.labels(result)
        child.inc()
