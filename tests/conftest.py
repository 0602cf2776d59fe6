"""What every test module shares.

``requires(program)`` and ``unavailable(reason)``: a test that needs something the machine may
lack (a program, a built binary) skips with the reason on a developer's machine, but fails in
CI (``CI`` set, as ``.ci/run`` does): there ``scripts/system-deps.sh`` and ``.ci/run`` provide
everything, so a missing program is a broken CI set-up, not a reason to pass silently.
Import them with ``from conftest import requires``.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = bool(os.environ.get("CI"))

# Debian package that provides each program the tests call (scripts/system-deps.sh installs them).
PACKAGES = {
    "curl": "curl", "dnsmasq": "dnsmasq-base", "dig": "dnsutils", "promtool": "prometheus",
    "nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk",
}


def unavailable(reason: str) -> None:
    """Skip with ``reason``; in CI fail with it instead (never returns)."""
    if IN_CI:
        pytest.fail(f"needed in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def find_program(program: str) -> str | None:
    """``program`` on $PATH, or in /usr/sbin (not on a normal user's PATH: dnsmasq, nginx)."""
    path = shutil.which(program)
    if path is None and os.access(f"/usr/sbin/{program}", os.X_OK):
        path = f"/usr/sbin/{program}"
    return path


def requires(program: str) -> str:
    """The path of ``program``; skips (fails in CI) when it is not installed."""
    path = find_program(program)
    if path is None:
        package = PACKAGES.get(program, program)
        unavailable(f"{program} is not installed (Debian package {package}; `make system-deps` installs it as root)")
    return path  # type: ignore[return-value]
