"""Programs and privileges a test needs: skip with the reason outside CI, fail in CI.

In CI (the ``CI`` environment variable, set by ``.ci/run``) an acceptance point must not
silently skip: a missing program there is a broken machine, so the test fails and says what is
missing. On a developer's machine the test skips with the same sentence.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["requires", "requires_root", "unavailable"]


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI: acceptance tests may not skip)")
    pytest.skip(reason)


def requires(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None and not os.path.exists(f"/usr/sbin/{p}")]
    if missing:
        unavailable(f"needs {', '.join(missing)} (scripts/system-deps.sh installs it)")


def requires_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces and nftables)")
