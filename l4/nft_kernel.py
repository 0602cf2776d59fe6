"""Applying the nftables model (``l4.nftables``) to the kernel of this network namespace.

``Nft`` sends nft JSON: through libnftables (``libnftables.so.1``, loaded with ctypes, so a
transaction costs no process start), else through the ``nft`` program (``nft -j -f -``). JSON
rather than nft's text language: every value goes in as data (an address or a chain name can
never be read as syntax) and the state reads back as data for the restart diff.

``KernelProxier`` keeps the table in step with the snapshots, on a thread of its own (a large
first sync takes seconds of kernel time; the event loop must not wait for it):

- ``apply(snapshot)`` (from the loop, on every publish) only records the newest snapshot;
  the thread takes the newest one each time it is free, so a burst becomes one transaction;
- the first sync reads the table back (``nft -j list table``): rules left by an earlier run
  (they outlive the process, so traffic keeps flowing across a restart) are diffed, not
  rebuilt, and a changed endpoint set is reconciled;
- each later sync diffs the new desired ruleset against the last applied one and sends the
  difference as one transaction — over netlink (``l4.nft_netlink``: no libnftables cache
  refresh, which costs more than the change itself in a large table) when every command is
  one it encodes, else through libnftables; after a failure the table is read back again
  before the next attempt (retried every ``RETRY`` seconds until one succeeds);
- chains that fell out of use are flushed in that transaction and deleted ``STALE_DELAY``
  later, in a transaction of their own (kube-proxy's caution for kernels before 6.2);
- after each sync, conntrack entries of UDP flows to removed endpoints are deleted
  (``l4.conntrack``);
- ``stop()`` ends the thread and leaves the rules in place; ``cleanup(table)`` (``meshproxy
  cleanup``) deletes the table.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from typing import Any, Callable

from meshproxy.core.snapshot import Snapshot

from . import conntrack
from .nft_netlink import NetlinkNft, Unsupported
from .nftables import FAMILY, Ruleset, RulesetBuilder, adopt, diff, diff_chunks, ruleset_from_listing, setup_commands

__all__ = ["Nft", "NftError", "KernelProxier", "cleanup", "RETRY", "STALE_DELAY"]

log = logging.getLogger("meshproxy.l4.kernel")

RETRY = 1.0               # seconds between attempts after a failed transaction
STALE_DELAY = 1.0         # seconds between flushing an unused chain and deleting it
FIRST_SYNC_CHUNK = 20000  # commands per transaction when the diff is that large (nftables.diff_chunks)
NETLINK_MAX = 5000        # larger transactions go through libnftables (a netlink batch is one buffer)

_NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(Exception):
    """nftables refused a transaction or a listing; the message is nft's."""


class Nft:
    """nft JSON in, nft JSON out; one instance per thread."""

    def __init__(self) -> None:
        self._lib = None
        self._ctx = None
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise OSError("nft_ctx_new failed")
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            # JSON output also makes libnftables read its input as JSON (nftables 1.0.x).
            lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
            self._lib, self._ctx = lib, ctx
        except (OSError, AttributeError):
            if shutil.which("nft") is None:
                raise NftError("neither libnftables nor the nft program is installed (Debian: apt-get install nftables)") from None

    @property
    def via(self) -> str:
        return "libnftables" if self._lib is not None else "nft -j"

    def close(self) -> None:
        if self._lib is not None and self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
            self._lib = None

    def _cmd(self, text: str) -> str:
        if self._lib is not None:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            if rc != 0:
                raise NftError(err.decode(errors="replace").strip() or f"nftables error {rc}")
            return out.decode(errors="replace")
        argv = ["nft", "-j", "-f", "-"] if text.startswith("{") else ["nft", "-j", *text.split()]
        r = subprocess.run(argv, input=text if text.startswith("{") else None, capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise NftError(r.stderr.strip() or f"nft exited with {r.returncode}")
        return r.stdout

    def run(self, commands: list[dict]) -> None:
        """One transaction: all of ``commands`` or none."""
        if commands:
            self._cmd(json.dumps({"nftables": commands}, separators=(",", ":")))

    def list_table(self, table: str) -> list[dict] | None:
        """The table's objects as nft JSON items; None when there is no such table."""
        try:
            out = self._cmd(f"list table {FAMILY} {table}")
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        items = json.loads(out).get("nftables", []) if out.strip() else []
        return [i for i in items if "metainfo" not in i]


def cleanup(table: str) -> bool:
    """Delete the table (``meshproxy cleanup``). True when there was one."""
    nft = Nft()
    try:
        if nft.list_table(table) is None:
            return False
        nft.run([{"delete": {"table": {"family": FAMILY, "name": table}}}])
        return True
    finally:
        nft.close()


class KernelProxier:
    def __init__(self, table: str, on_synced: Callable[[int], None] | None = None) -> None:
        self.table = table
        self._on_synced = on_synced
        self._cond = threading.Condition()
        self._want: Snapshot | None = None
        self._want_changed: frozenset | None = frozenset()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._builder = RulesetBuilder()
        self._applied: Ruleset | None = None      # None: unknown, read the kernel first
        self._applied_snap: Snapshot | None = None
        self._known = False
        self._stale: dict[str, float] = {}        # flushed chain -> when
        self._netlink: NetlinkNft | None = None
        self.synced_version = 0
        self.state: dict[str, Any] = {"table": f"{FAMILY} {table}", "syncs": 0, "errors": 0,
                                      "lastError": None, "lastSyncSeconds": None, "lastCommands": 0}

    # -- loop side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meshproxy-nftables", daemon=True)
        self._thread.start()

    def apply(self, snap: Snapshot) -> None:
        with self._cond:
            self._want = snap
            # The services changed since the last sync, over every snapshot in between (a
            # burst is applied once); None once any of them was a full build.
            if snap.changed is None or self._want_changed is None:
                self._want_changed = None
            else:
                self._want_changed = self._want_changed | snap.changed
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread; the rules stay in the kernel."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- thread side --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            nft = Nft()
        except NftError as exc:
            log.error("nftables: %s; Services are not programmed in the kernel", exc)
            self.state["lastError"] = str(exc)
            return
        if os.environ.get("MESHPROXY_NFT_NETLINK", "1") != "0":
            try:
                self._netlink = NetlinkNft()
            except OSError as exc:        # no netlink here: libnftables does everything
                log.info("nftables: netlink unavailable (%s); every change goes through %s", exc, nft.via)
        log.info("nftables: programming table %s %s through %s%s", FAMILY, self.table, nft.via,
                 " (changes after the first sync: netlink)" if self._netlink is not None else "")
        retry_at = None
        try:
            while True:
                with self._cond:
                    while True:
                        if self._stopped:
                            return
                        now = time.monotonic()
                        sync_due = self._want is not None and (retry_at is None or now >= retry_at)
                        stale_at = min(self._stale.values()) + STALE_DELAY if self._known and self._stale else None
                        if sync_due or (stale_at is not None and now >= stale_at):
                            break
                        waits = [t for t in (retry_at if self._want is not None else None, stale_at) if t is not None]
                        self._cond.wait(max(0.0, min(waits) - now) if waits else None)
                    snap = self._want if sync_due else None
                    changed = self._want_changed
                    if sync_due:
                        self._want = None
                        self._want_changed = frozenset()
                if snap is not None:
                    try:
                        self._sync(nft, snap, changed)
                        retry_at = None
                    except (NftError, OSError, ValueError) as exc:     # NetlinkError is an OSError
                        self._failed(exc)
                        retry_at = time.monotonic() + RETRY
                        with self._cond:
                            if self._want is None:
                                self._want = snap
                            self._want_changed = None      # after a failure: look at everything
                self._delete_stale(nft)
        finally:
            nft.close()
            if self._netlink is not None:
                self._netlink.close()

    def _failed(self, exc: BaseException) -> None:
        self._known = False
        self.state["errors"] += 1
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.state["lastError"] != msg:
            log.error("nftables: sync failed: %s; reading the table back and retrying every %.0fs", msg, RETRY)
        self.state["lastError"] = msg

    def _sync(self, nft: Nft, snap: Snapshot, changed: frozenset | None = None) -> None:
        t0 = time.perf_counter()
        setup: list[dict] = []
        if not self._known:
            listing = nft.list_table(self.table)
            if listing is None:
                self._applied, empty = None, set()
            else:
                self._applied, empty = ruleset_from_listing(listing)
            self._stale = {name: self._stale.get(name, time.monotonic()) for name in empty}
            setup = setup_commands(self.table)
        desired = self._builder.build(snap, changed if self._known else None)
        if not self._known and self._applied is not None:
            self._applied = adopt(self._applied, desired)
        if self._known:
            txs = [diff(self.table, self._applied, desired, self._stale)]
        else:
            txs = diff_chunks(self.table, self._applied, desired, self._stale, FIRST_SYNC_CHUNK)
        t1 = time.perf_counter()
        count = 0
        via = nft.via
        for i, tx in enumerate(txs):
            cmds = setup + tx.commands if i == 0 else tx.commands
            if self._known and self._netlink is not None and 0 < len(cmds) <= NETLINK_MAX:
                try:
                    self._netlink.run(self.table, cmds)
                    via = "netlink"
                    count += len(cmds)
                    continue
                except Unsupported:
                    pass                  # the skeleton's commands: libnftables below
            nft.run(cmds)
            count += len(cmds)
        t2 = time.perf_counter()
        now = time.monotonic()
        chains = desired.chains()
        for tx in txs:
            for name in tx.stale_chains:
                self._stale.setdefault(name, now)
        for name in [n for n in self._stale if n in chains]:
            del self._stale[name]
        touched = set().union(*(tx.touched for tx in txs))
        old_snap = self._applied_snap
        self._applied, self._applied_snap, self._known = desired, snap, True
        elapsed = time.perf_counter() - t0
        # UDP flows to endpoints that left are cut before the snapshot counts as applied: from
        # then on no datagram may still reach a removed endpoint.
        flows = conntrack.flows_to_clear(old_snap, snap, touched) if snap.udp or (old_snap is not None and old_snap.udp) else []
        if flows:
            conntrack.clear(flows)
        # lastSyncSeconds = lastBuildSeconds (desired ruleset and diff, in Python) +
        # lastApplySeconds (libnftables / nft: its cache refresh and the kernel's commit).
        self.state.update(syncs=self.state["syncs"] + 1, lastSyncSeconds=round(elapsed, 6), lastCommands=count,
                          lastBuildSeconds=round(t1 - t0, 6), lastApplySeconds=round(t2 - t1, 6),
                          lastTransactions=len(txs), lastVia=via, lastError=None, version=snap.version)
        if "firstSyncSeconds" not in self.state:
            self.state["firstSyncSeconds"] = round(elapsed, 6)
        if count:
            log.debug("nftables: snapshot %d in %d commands, %.1f ms", snap.version, count, elapsed * 1000)
        self.synced_version = snap.version
        if self._on_synced is not None:
            self._on_synced(snap.version)

    def _delete_stale(self, nft: Nft) -> None:
        if not self._stale or not self._known:
            return
        now = time.monotonic()
        due = sorted(n for n, t in self._stale.items() if now - t >= STALE_DELAY)
        if not due:
            return
        cmds = [{"delete": {"chain": {"family": FAMILY, "table": self.table, "name": n}}} for n in due]
        try:
            if self._netlink is not None and len(cmds) <= NETLINK_MAX:
                self._netlink.run(self.table, cmds)
            else:
                nft.run(cmds)
        except (NftError, OSError) as exc:
            # Still referenced (an older kernel that has not noticed yet): try again later.
            log.debug("nftables: deleting %d unused chains: %s", len(due), exc)
            for n in due:
                self._stale[n] = now
            return
        for n in due:
            del self._stale[n]
