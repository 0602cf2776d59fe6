"""``meshproxy capture``: send a pod's TCP through its sidecar, with nftables.

What an init container runs, as root with NET_ADMIN, in the pod's network namespace (the
namespace this process is in — it never reaches another). One table of its own,
``inet meshproxy_capture`` (IPv4 and IPv6 alike), two NAT chains:

- ``output`` (connections the pod makes): TCP is redirected to the sidecar's outbound port
  (``--outbound-port``, 15001) — except the sidecar's own connections (socket owner
  ``--proxy-uid``: this is what keeps capture from looping), loopback (``oif lo``: localhost and
  the pod's own addresses), DNS (port 53; UDP is never touched, so DNS is untouched) and
  ``--exclude-ports``;
- ``prerouting`` (connections to the pod): TCP to any port is redirected to the inbound port
  (``--inbound-port``, 15006) — except the two sidecar ports themselves and ``--exclude-ports``.

The sidecar reads where each connection was going with ``meshproxy.core.sockets.original_dst``
(SO_ORIGINAL_DST). Applying is one ``nft -f`` transaction that creates the table if missing,
deletes it and writes it whole, so running twice leaves the same rules (idempotent) and a
half-applied state never exists; ``--remove`` deletes the table (also when there is none).
The command exits 0 once the kernel holds the rules, 1 with nft's message otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import Sequence

__all__ = ["TABLE", "DEFAULT_OUTBOUND_PORT", "DEFAULT_INBOUND_PORT", "DEFAULT_PROXY_UID", "ruleset",
           "removal", "parse_ports", "add_arguments", "run_capture"]

TABLE = "meshproxy_capture"
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_PROXY_UID = 1337       # the uid Istio's sidecars run as: existing pod security setups know it
DNS_PORT = 53


def parse_ports(text: str) -> tuple[str, ...]:
    """``"15090,15021"`` or ``"8000-8100"`` items -> nft set elements. Raises ValueError."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        lo, sep, hi = item.partition("-")
        nums = [lo, hi] if sep else [lo]
        if not all(n.isdigit() and 1 <= int(n) <= 65535 for n in nums):
            raise ValueError(f"--exclude-ports: {item!r} is not a port (1-65535) or range A-B")
        if sep and int(lo) > int(hi):
            raise ValueError(f"--exclude-ports: {item!r}: the range is reversed")
        out.append(f"{int(lo)}-{int(hi)}" if sep else str(int(lo)))
    return tuple(out)


def _set(items: Sequence[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def ruleset(*, outbound_port: int = DEFAULT_OUTBOUND_PORT, inbound_port: int = DEFAULT_INBOUND_PORT,
            proxy_uid: int = DEFAULT_PROXY_UID, exclude_ports: Sequence[str] = (), table: str = TABLE) -> str:
    """The nft script that (re)installs the capture table."""
    inbound_skip = [str(outbound_port), str(inbound_port), *exclude_ports]
    outbound_skip = [str(DNS_PORT), *exclude_ports]
    return f"""\
table inet {table}
delete table inet {table}
table inet {table} {{
	chain prerouting {{
		type nat hook prerouting priority -100; policy accept;
		meta l4proto != tcp return
		iifname "lo" return
		tcp dport {_set(inbound_skip)} return comment "the sidecar's own ports and --exclude-ports"
		meta l4proto tcp redirect to :{inbound_port} comment "inbound -> sidecar"
	}}
	chain output {{
		type nat hook output priority -100; policy accept;
		meta l4proto != tcp return
		oifname "lo" return comment "localhost and the pod's own addresses"
		meta skuid {proxy_uid} return comment "the sidecar's own connections"
		tcp dport {_set(outbound_skip)} return comment "DNS and --exclude-ports"
		meta l4proto tcp redirect to :{outbound_port} comment "outbound -> sidecar"
	}}
}}
"""


def removal(table: str = TABLE) -> str:
    # Declaring the table first makes the delete succeed when it is absent: --remove is idempotent.
    return f"table inet {table}\ndelete table inet {table}\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outbound-port", type=int, default=DEFAULT_OUTBOUND_PORT,
                   help="the sidecar's outbound port: the pod's outgoing TCP goes there (default %(default)s)")
    p.add_argument("--inbound-port", type=int, default=DEFAULT_INBOUND_PORT,
                   help="the sidecar's inbound port: TCP to the pod's ports goes there (default %(default)s)")
    p.add_argument("--proxy-uid", type=int, default=DEFAULT_PROXY_UID,
                   help="uid the sidecar runs as; its own connections are not captured (default %(default)s)")
    p.add_argument("--exclude-ports", default="", metavar="PORT[,PORT|A-B...]",
                   help="ports left alone in both directions (e.g. the sidecar's admin port)")
    p.add_argument("--remove", action="store_true", help="remove the capture rules (idempotent)")
    p.add_argument("--dry-run", action="store_true", help="print the nft script instead of applying it")


def _nft(script: str) -> tuple[int, str]:
    nft = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if nft is None:
        return 127, "nft is not installed (package nftables)"
    try:
        r = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, f"nft: {exc}"
    return r.returncode, (r.stderr or r.stdout).strip()


def run_capture(args: argparse.Namespace) -> int:
    for flag in ("outbound_port", "inbound_port"):
        v = getattr(args, flag)
        if not 1 <= v <= 65535:
            print(f"meshproxy capture: --{flag.replace('_', '-')} {v} is not a port (1-65535)", file=sys.stderr)
            return 2
    if args.outbound_port == args.inbound_port:
        print("meshproxy capture: --outbound-port and --inbound-port must differ", file=sys.stderr)
        return 2
    if args.proxy_uid < 0:
        print("meshproxy capture: --proxy-uid must not be negative", file=sys.stderr)
        return 2
    try:
        exclude = parse_ports(args.exclude_ports)
    except ValueError as exc:
        print(f"meshproxy capture: {exc}", file=sys.stderr)
        return 2
    script = removal() if args.remove else ruleset(outbound_port=args.outbound_port, inbound_port=args.inbound_port,
                                                   proxy_uid=args.proxy_uid, exclude_ports=exclude)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    rc, message = _nft(script)
    if rc != 0:
        print(f"meshproxy capture: nft refused the rules (exit {rc}): {message}"
              + (" — run as root with NET_ADMIN in the pod's network namespace" if "permitted" in message else ""),
              file=sys.stderr)
        return 1
    if args.remove:
        print(f"meshproxy capture: table inet {TABLE} removed", file=sys.stderr)
    else:
        print(f"meshproxy capture: outbound TCP -> :{args.outbound_port} (not uid {args.proxy_uid}, loopback, "
              f"port {DNS_PORT}{', ' + ','.join(exclude) if exclude else ''}); inbound TCP -> :{args.inbound_port}"
              f"{' (not ' + ','.join(exclude) + ')' if exclude else ''}", file=sys.stderr)
    return 0
