"""What sources and probes report about themselves, for whoever counts it.

discovery imports nothing of the proxy around it: a source is handed an object with these
methods (the process passes one that writes Prometheus metrics, ``meshproxy.observe``) and
calls them when its state changes. ``Signals()`` itself ignores everything, which is what
tests and tools that embed a source get by default.
"""

from __future__ import annotations

__all__ = ["Signals"]


class Signals:
    """Reports of discovery's parts. Every method is cheap and never raises."""

    def source_up(self, source: str, up: bool) -> None:
        """``source`` is connected and synced (True), or not any more (False)."""

    def source_relisted(self, source: str) -> None:
        """``source`` replaced its whole view with a fresh list (a watch could not resume)."""

    def probe(self, result: str) -> None:
        """One readiness probe ran with ``result`` (success / failure / timeout)."""


NO_SIGNALS = Signals()
