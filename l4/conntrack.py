"""Conntrack entries that outlive a UDP endpoint, and their removal.

UDP has no connection the kernel could reset: a conntrack entry made while a client talked to
endpoint E keeps translating that client's datagrams to E for as long as they keep coming,
even after E left the Service. kube-proxy therefore deletes, after each sync
(``pkg/proxy/conntrack/cleanup.go``):

- entries of a UDP service address (ClusterIP, external IP, or this node's NodePort) whose
  reply source is an endpoint that is no longer used for it;
- entries of a UDP service address that had no endpoint and now has one (datagrams sent
  while it was rejected may have left entries that would keep them rejected).

TCP needs nothing: a connection to a gone pod is reset by the pod's node or times out, and
new connections are translated afresh. ``flows_to_clear`` is pure; ``clear`` runs the
``conntrack`` program (conntrack-tools) once per filter.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable

from meshproxy.core.snapshot import Backend, L4Listener, Snapshot

__all__ = ["Flow", "flows_to_clear", "clear"]

log = logging.getLogger("meshproxy.l4.kernel")


@dataclass(frozen=True, slots=True, order=True)
class Flow:
    """A conntrack filter: UDP entries to ``dst`` (None: any of this node's addresses, for a
    NodePort) port ``port`` whose reply comes from ``reply_src`` (None: any)."""
    version: int
    dst: str | None
    port: int
    reply_src: str | None


def _targets(b: Backend | None, lst: L4Listener, v: int) -> set[str]:
    if b is None:
        return set()
    eps = b.local if lst.local_only else b.usable
    return {ip for ip in (e.ip_of(v) for e in eps) if ip is not None}


def flows_to_clear(old: Snapshot | None, new: Snapshot, services: Iterable[tuple[str, str]]) -> list[Flow]:
    """The conntrack filters to run after ``new`` replaced ``old`` in the kernel, looking at
    the UDP listeners of ``services`` (the ones whose rules changed)."""
    if old is None:
        return []
    wanted = set(services)
    out: set[Flow] = set()
    for (host, port), lst in old.udp.items():
        if lst.backend[:2] not in wanted:
            continue
        v = 6 if ":" in host else 4
        before = _targets(old.backends.get(lst.backend), lst, v)
        now_lst = new.udp.get((host, port))
        after = _targets(new.backends.get(now_lst.backend), now_lst, v) if now_lst is not None else set()
        dst = None if lst.scope == "node" else host
        for ip in sorted(before - after):
            out.add(Flow(v, dst, port, ip))
    for (host, port), lst in new.udp.items():
        if lst.backend[:2] not in wanted:
            continue
        v = 6 if ":" in host else 4
        prev = old.udp.get((host, port))
        had = _targets(old.backends.get(prev.backend), prev, v) if prev is not None else set()
        if not had and _targets(new.backends.get(lst.backend), lst, v):
            out.add(Flow(v, None if lst.scope == "node" else host, port, None))
    return sorted(out, key=lambda f: (f.version, f.dst or "", f.port, f.reply_src or ""))


def _argv(f: Flow) -> list[str]:
    argv = ["conntrack", "-D", "-f", "ipv6" if f.version == 6 else "ipv4", "-p", "udp"]
    if f.dst is not None:
        argv += ["--orig-dst", f.dst]
    argv += ["--orig-port-dst", str(f.port)]
    if f.reply_src is not None:
        argv += ["--reply-src", f.reply_src]
    return argv


def clear(flows: Iterable[Flow]) -> int:
    """Delete the entries; returns how many filters ran. ``conntrack`` exits 1 when nothing
    matched, which is not an error."""
    flows = list(flows)
    if not flows:
        return 0
    if shutil.which("conntrack") is None:
        log.warning("conntrack (conntrack-tools) is not installed: stale UDP flows to %d removed endpoints "
                    "stay until they time out", len(flows))
        return 0
    for f in flows:
        try:
            r = subprocess.run(_argv(f), capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("conntrack %s: %s", " ".join(_argv(f)[1:]), exc)
            continue
        if r.returncode not in (0, 1):
            log.warning("conntrack %s: %s", " ".join(_argv(f)[1:]), (r.stderr or r.stdout).strip()[:200])
    return len(flows)
