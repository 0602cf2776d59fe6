"""What every test module shares.

``requires(program)`` and ``unavailable(reason)``: a test that needs something the machine may
lack (a program, a built binary) skips with the reason on a developer's machine, but fails in
CI (``CI`` set, as ``.ci/run`` does): there ``scripts/system-deps.sh`` and ``.ci/run`` provide
everything, so a missing program is a broken CI set-up, not a reason to pass silently.
``requires_root()`` does the same for tests that need root. Import them with
``from conftest import requires``.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = bool(os.environ.get("CI"))

# Debian package that provides each program the tests call (scripts/system-deps.sh installs them).
PACKAGES = {
    "curl": "curl", "dnsmasq": "dnsmasq-base", "dig": "dnsutils", "promtool": "prometheus",
    "nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "nft": "nftables", "ip": "iproute2",
    "etcd": "etcd-server", "slowhttptest": "slowhttptest", "conntrack": "conntrack", "tcpdump": "tcpdump",
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


def requires(*programs: str) -> str:
    """The path of the first of ``programs``; skips (fails in CI) when any is not installed."""
    paths = [find_program(p) for p in programs]
    missing = [p for p, path in zip(programs, paths) if path is None]
    if missing:
        what = ", ".join(f"{p} (Debian package {PACKAGES.get(p, p)})" for p in missing)
        verb = "is" if len(missing) == 1 else "are"
        unavailable(f"{what} {verb} not installed; `make system-deps` installs it as root")
    return paths[0]  # type: ignore[return-value]


def requires_root() -> None:
    """Skip (fail in CI) unless running as root (network namespaces, nftables)."""
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces and nftables)")
