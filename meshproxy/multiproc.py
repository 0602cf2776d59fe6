"""Prometheus multiprocess mode for ``--workers N``: set up before anything imports
prometheus_client (it reads ``PROMETHEUS_MULTIPROC_DIR`` when it is imported), which is why
this module imports nothing of the project."""

from __future__ import annotations

import os
import tempfile

__all__ = ["prepare_multiprocess_metrics"]


def prepare_multiprocess_metrics() -> str:
    """Every process keeps its own values in this directory; the parent's /metrics adds them."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="meshproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path
