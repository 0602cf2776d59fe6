"""L4: TCP listeners reconciled from the snapshot (``listeners``), the per-connection byte pump
(``pump``: raw non-blocking sockets, ``os.splice``), PROXY protocol headers towards pods
(``proxy_protocol``), UDP relays (``udp``), and the kernel mode: the nftables ruleset as data
(``nftables``), applied by ``nft_kernel`` (changes over netlink: ``nft_netlink``), with
``conntrack`` clean-up of UDP flows.

The control plane creates one ``L4Manager(runtime)`` in the running loop and subscribes its
``apply`` to snapshot publishes; see docs/l4.md for the semantics.
"""

from .listeners import L4Manager, bind_listener
from .nft_kernel import KernelProxier, Nft, NftError
from .udp import UdpManager
from .proxy_protocol import header as proxy_protocol_header
from .pump import MAX_ATTEMPTS, MAX_IN_FLIGHT, L4Connection

__all__ = [
           "MAX_ATTEMPTS",
           "MAX_IN_FLIGHT",
           "L4Connection",
           "L4Manager",
           "KernelProxier",
           "Nft",
           "NftError",
           "UdpManager",
           "bind_listener",
           "proxy_protocol_header",
]
