"""The netlink encoder of incremental transactions (l4/nft_netlink.py) against libnftables: in
two network namespaces made by the test, the same first sync through libnftables, then every
kind of change — one namespace through netlink, the other through libnftables — and the two
tables must list identically (what nft shows, and what a restart reads back)."""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import threading

import pytest
from netns import requires, requires_netns
from test_nft_rules import BASE3, pod, ruleset, svc

from l4 import nftables as N
from l4.nft_kernel import Nft
from l4.nft_netlink import NetlinkError, NetlinkNft, Unsupported, encode

TABLE = "t"


def _in_ns(name: str, fn):
    """Run ``fn`` on a thread that joined network namespace ``name``; returns its result."""
    out: list = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as exc:      # handed back to the test's thread
            out.append(exc)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@pytest.fixture
def two_namespaces():
    requires_netns()
    requires("nft")
    names = [f"mp{secrets.token_hex(3)}-nl{i}" for i in (1, 2)]
    made = []
    try:
        for n in names:
            subprocess.run(["ip", "netns", "add", n], check=True, capture_output=True)
            made.append(n)
        yield names
    finally:
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def _listing(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", TABLE],
                          capture_output=True, text=True, check=True).stdout


def _json(ns: str, cmds: list[dict]) -> None:
    def go():
        nft = Nft()
        try:
            nft.run(cmds)
        finally:
            nft.close()
    _in_ns(ns, go)


def _netlink(ns: str, cmds: list[dict]) -> None:
    def go():
        nl = NetlinkNft()
        try:
            nl.run(TABLE, cmds)
        finally:
            nl.close()
    _in_ns(ns, go)


AFF = "clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: %d}}"
DUAL = "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd96::10']\n  ipFamilyPolicy: RequireDualStack"
NODEPORT = "type: NodePort\n  clusterIP: 10.96.0.30\n  externalTrafficPolicy: Local"
STEPS = [
    BASE3,
    BASE3 + pod("a3", ip="10.244.1.4"),                                   # endpoint added
    BASE3,                                                                # endpoint removed
    BASE3.replace("labels: {app: other}", "labels: {app: gone}"),          # last endpoint left: reject
    pod("a1") + pod("a2", ip="10.244.1.3") + svc(spec=AFF % 60),          # service deleted, affinity on
    pod("a1") + pod("a2", ip="10.244.1.3") + svc(spec=AFF % 90),          # affinity timeout changed
    pod("a1", ip6="fd44:1::2") + svc(spec=DUAL),                          # dual stack
    pod("a1", ip6="fd44:1::2") + svc(spec=DUAL, ports="[{name: dns, port: 53, targetPort: dns, protocol: UDP}]"),
    pod("a1") + pod("b1", node="node-b", ip="10.244.2.2") + svc("np", spec=NODEPORT,
                                                                ports="[{name: http, port: 80, targetPort: http, nodePort: 30080}]"),
    pod("b1", node="node-b", ip="10.244.2.2") + svc("np", spec=NODEPORT,
                                                    ports="[{name: http, port: 80, targetPort: http, nodePort: 30080}]"),
]


def test_netlink_changes_list_exactly_as_libnftables_changes(two_namespaces):
    a, b = two_namespaces
    prev = ruleset(STEPS[0])
    first = N.setup_commands(TABLE) + N.diff(TABLE, None, prev).commands
    _json(a, first)
    _json(b, first)
    assert _listing(a) == _listing(b)
    sent = 0
    for i, text in enumerate(STEPS[1:], 1):
        cur = ruleset(text)
        tx = N.diff(TABLE, prev, cur)
        assert tx, f"step {i} changes nothing"
        encode(TABLE, tx.commands)                 # raises Unsupported if outside the vocabulary
        _netlink(a, tx.commands)
        _json(b, tx.commands)
        sent += len(tx.commands)
        assert _listing(a) == _listing(b), f"step {i}"
        for ns in (a, b):                          # the stale chains, a later transaction
            if tx.stale_chains:
                _json(ns, [{"delete": {"chain": {"family": "inet", "table": TABLE, "name": n}}} for n in tx.stale_chains])
        prev = cur
    assert sent > 50
    # and what a restart reads back of the netlink-made table diffs to nothing
    listing = _in_ns(a, lambda: Nft().list_table(TABLE))
    kernel, _ = N.ruleset_from_listing(listing)
    assert not N.diff(TABLE, N.adopt(kernel, prev), prev)


def test_a_refused_transaction_names_its_command_and_changes_nothing(two_namespaces):
    a, _ = two_namespaces
    rs = ruleset(BASE3)
    _json(a, N.setup_commands(TABLE) + N.diff(TABLE, None, rs).commands)
    before = _listing(a)
    bad = [{"add": {"chain": {"family": "inet", "table": TABLE, "name": "fresh"}}},
           {"delete": {"element": {"family": "inet", "table": TABLE, "name": "service-ips",
                                   "elem": [{"concat": ["10.96.9.9", "tcp", 80]}]}}}]
    with pytest.raises(NetlinkError, match="delete element service-ips"):
        _netlink(a, bad)
    assert _listing(a) == before


def test_the_skeleton_is_left_to_libnftables():
    with pytest.raises(Unsupported):
        encode(TABLE, N.setup_commands(TABLE))
    with pytest.raises(Unsupported):
        encode(TABLE, N.diff(TABLE, None, ruleset(BASE3)).commands)       # the base part's rules
