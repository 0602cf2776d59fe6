"""The incremental transactions of ``l4.nftables`` sent straight to nf_tables over netlink.

libnftables refreshes its cache of the whole table (chains, sets, the elements of anonymous
sets) before every command list it runs: at 10,000 Services that is over 100 ms for a
one-endpoint change. The commands a Service's part produces need none of that cache — every
name is known and every value is typed by the map it goes to — so this module encodes them
itself, as nft would: the same messages, the same expressions in the same registers, the same
set user data, so that ``nft list`` shows (and the restart diff reads back) exactly what the
JSON path would have made. ``tests/test_nft_netlink.py`` applies every kind of change both ways
in two namespaces and compares the listings.

Encoded: chains (add, flush, delete), rules made of the expressions service parts use
(``ip[6] saddr|daddr`` matches and set lookups with their ``meta nfproto`` dependency, ``meta
l4proto``, ``fib saddr type local``, jump / goto, ``numgen random mod N vmap`` with its
anonymous map, ``update @set``, ``dnat``), rule comments, elements of the dispatch maps
(add / delete), affinity sets (add / delete). Anything else raises ``Unsupported`` before
anything is sent, and the caller uses libnftables for that transaction (the skeleton's
commands, a first sync).

One batch is one transaction: begin, the messages, end; each message asks for an ack, and
the kernel answers every one after applying all or nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Any, Iterable

__all__ = ["Unsupported", "NetlinkNft", "encode"]

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLA_F_NESTED = 0x8000
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10

NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM = 9, 11, 12, 14

NFT_REG_VERDICT, NFT_REG_1, NFT_REG_2 = 0, 1, 2
NFT_JUMP, NFT_GOTO = -3, -4
NFT_DATA_VERDICT = 0xFFFFFF00
NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_MAP, NFT_SET_TIMEOUT, NFT_SET_EVAL = 0x1, 0x2, 0x8, 0x10, 0x20
NFT_META_NFPROTO, NFT_META_L4PROTO = 15, 16
NFT_PAYLOAD_NETWORK_HEADER = 1
NFT_NG_RANDOM = 1
NFT_NAT_DNAT = 1
NF_NAT_RANGE_PROTO_SPECIFIED = 0x2
NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_SADDR = 3, 1
RTN_LOCAL = 2
NFT_DYNSET_OP_UPDATE = 1
TYPE_INTEGER, TYPE_IPADDR, TYPE_IP6ADDR = 4, 7, 8

# (offset, length) of the addresses in the IPv4 / IPv6 header
_FIELDS = {("ip", "saddr"): (12, 4), ("ip", "daddr"): (16, 4), ("ip6", "saddr"): (8, 16), ("ip6", "daddr"): (24, 16)}
_PROTO = {"tcp": 6, "udp": 17}
# Key layout of the maps the service parts fill (l4.nftables.MAPS), per field: each field of a
# concatenation takes a whole number of 32-bit registers.
_MAP_KEYS = {}
for _name, _types in (("service-ips", ("addr", "proto", "port")), ("service-nodeports", ("proto", "port")),
                      ("no-endpoint-services", ("addr", "proto", "port")), ("no-endpoint-nodeports", ("proto", "port"))):
    _MAP_KEYS[_name] = tuple("addr4" if t == "addr" else t for t in _types)
    _MAP_KEYS[_name + "-v6"] = tuple("addr6" if t == "addr" else t for t in _types)
# User data nft attaches to the anonymous map of ``numgen ... vmap``: key in host byte order,
# and the verdict's "typeof" description; copied so that nft prints the rule as it would.
_VMAP_UDATA = bytes.fromhex("000401000000" "010400000000" "0408000401000000" "0100" "060400000000")


class Unsupported(Exception):
    """A command outside what this module encodes."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(t: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, t) + data + b"\0" * (_align(n) - n)


def _nest(t: int, *attrs: bytes) -> bytes:
    return _attr(t | NLA_F_NESTED, b"".join(attrs))


def _str(s: str) -> bytes:
    return s.encode() + b"\0"


def _be32(v: int) -> bytes:
    return struct.pack("!I", v & 0xFFFFFFFF)


def _verdict(code: int, chain: str | None = None) -> bytes:
    """NFTA_IMMEDIATE_DATA / NFTA_SET_ELEM_DATA { NFTA_DATA_VERDICT { CODE, CHAIN } }."""
    inner = [_attr(1, _be32(code))]
    if chain is not None:
        inner.append(_attr(2, _str(chain)))
    return _nest(2, _nest(2, *inner))


def _value(data: bytes) -> bytes:
    return _attr(1, data)                      # NFTA_DATA_VALUE


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(1, _attr(1, _str(name)), _nest(2, *attrs))   # LIST_ELEM { NAME, DATA {...} }


def _meta(key: int) -> bytes:
    return _expr("meta", _attr(2, _be32(key)), _attr(1, _be32(NFT_REG_1)))


def _cmp_eq(data: bytes) -> bytes:
    return _expr("cmp", _attr(1, _be32(NFT_REG_1)), _attr(2, _be32(0)), _nest(3, _attr(1, data)))


def _payload(proto: str, fld: str) -> list[bytes]:
    if (proto, fld) not in _FIELDS:
        raise Unsupported(f"payload {proto} {fld}")
    off, ln = _FIELDS[(proto, fld)]
    dep = [_meta(NFT_META_NFPROTO), _cmp_eq(bytes([NFPROTO_IPV6 if proto == "ip6" else NFPROTO_IPV4]))]
    return dep + [_expr("payload", _attr(1, _be32(NFT_REG_1)), _attr(2, _be32(NFT_PAYLOAD_NETWORK_HEADER)),
                        _attr(3, _be32(off)), _attr(4, _be32(ln)))]


def _addr(text: str, v: int | None = None) -> bytes:
    ip = ipaddress.ip_address(text)
    if v is not None and ip.version != v:
        raise Unsupported(f"address {text} in an IPv{v} field")
    return ip.packed


def _key(types: tuple[str, ...], key: Any) -> bytes:
    parts = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
    if len(parts) != len(types):
        raise Unsupported(f"key {key!r}")
    out = b""
    for t, x in zip(types, parts):
        if t == "addr4":
            out += _addr(x, 4)
        elif t == "addr6":
            out += _addr(x, 6)
        elif t == "proto":
            if x not in _PROTO:
                raise Unsupported(f"protocol {x!r}")
            out += bytes([_PROTO[x], 0, 0, 0])
        elif t == "port":
            out += struct.pack("!H", int(x)) + b"\0\0"
    return out


class _Batch:
    def __init__(self, table: str) -> None:
        self.table = table
        self.msgs: list[tuple[int, int, bytes, str]] = []   # (type, flags, attributes, what)
        self.set_id = 0

    def msg(self, mtype: int, flags: int, attrs: Iterable[bytes], what: str) -> None:
        self.msgs.append((mtype, flags, b"".join(attrs), what))

    # -- commands ----------------------------------------------------------------------------

    def command(self, cmd: dict) -> None:
        if len(cmd) != 1:
            raise Unsupported(repr(cmd)[:80])
        (op, obj), = cmd.items()
        if len(obj) != 1:
            raise Unsupported(repr(cmd)[:80])
        (kind, body), = obj.items()
        if body.get("family") != "inet" or body.get("table") != self.table:
            raise Unsupported("another table or family")
        t = _attr(1, _str(self.table))
        if kind == "chain" and set(body) == {"family", "table", "name"}:
            name = _attr(3, _str(body["name"]))
            if op == "add":
                self.msg(NEWCHAIN, NLM_F_CREATE, (t, name), f"add chain {body['name']}")
            elif op == "delete":
                self.msg(DELCHAIN, 0, (t, name), f"delete chain {body['name']}")
            elif op == "flush":
                self.msg(DELRULE, 0, (t, _attr(2, _str(body["name"]))), f"flush chain {body['name']}")
            else:
                raise Unsupported(f"{op} chain")
        elif kind == "rule" and op == "add":
            self.rule(body)
        elif kind == "element" and op in ("add", "delete"):
            self.elements(op, body)
        elif kind == "set" and op == "add":
            self.affinity_set(body)
        elif kind == "set" and op == "delete" and set(body) == {"family", "table", "name"}:
            self.msg(DELSET, 0, (t, _attr(2, _str(body["name"]))), f"delete set {body['name']}")
        else:
            raise Unsupported(f"{op} {kind}")

    def affinity_set(self, body: dict) -> None:
        typ, timeout = body.get("type"), body.get("timeout")
        if typ not in ("ipv4_addr", "ipv6_addr") or body.get("flags") != ["timeout"] or not isinstance(timeout, int) \
                or set(body) != {"family", "table", "name", "type", "flags", "timeout"}:
            raise Unsupported("set")
        self.set_id += 1
        v6 = typ == "ipv6_addr"
        self.msg(NEWSET, NLM_F_CREATE, (
            # "dynamic" (EVAL) at once: libnftables adds it when a rule updates the set.
            _attr(1, _str(self.table)), _attr(2, _str(body["name"])), _attr(3, _be32(NFT_SET_TIMEOUT | NFT_SET_EVAL)),
            _attr(4, _be32(TYPE_IP6ADDR if v6 else TYPE_IPADDR)), _attr(5, _be32(16 if v6 else 4)),
            _attr(10, _be32(self.set_id)), _attr(11, struct.pack("!Q", timeout * 1000)),
            _attr(13, bytes.fromhex("000402000000"))), f"add set {body['name']}")   # key byte order: big endian

    def elements(self, op: str, body: dict) -> None:
        name = body.get("name")
        types = _MAP_KEYS.get(name)
        if types is None or set(body) != {"family", "table", "name", "elem"}:
            raise Unsupported(f"elements of {name}")
        items = []
        for e in body["elem"]:
            if op == "add":
                if not (isinstance(e, list) and len(e) == 2 and isinstance(e[1], dict) and set(e[1]) == {"goto"}):
                    raise Unsupported("element value")
                items.append(_nest(1, _nest(1, _value(_key(types, e[0]))),
                                   _verdict(NFT_GOTO, e[1]["goto"]["target"])))
            else:
                items.append(_nest(1, _nest(1, _value(_key(types, e)))))
        self.msg(NEWSETELEM if op == "add" else DELSETELEM, NLM_F_CREATE if op == "add" else 0,
                 (_attr(1, _str(self.table)), _attr(2, _str(name)), _nest(3, *items)), f"{op} element {name}")

    def rule(self, body: dict) -> None:
        if not set(body) <= {"family", "table", "chain", "expr", "comment"}:
            raise Unsupported("rule attributes")
        exprs: list[bytes] = []
        for e in body["expr"]:
            exprs.extend(self.expression(e))
        attrs = [_attr(1, _str(self.table)), _attr(2, _str(body["chain"])), _nest(4, *exprs)]
        comment = body.get("comment")
        if comment is not None:
            c = comment.encode() + b"\0"
            if len(c) > 255:
                raise Unsupported("comment")
            attrs.append(_attr(7, bytes([0, len(c)]) + c))       # NFTNL_UDATA_RULE_COMMENT
        self.msg(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, attrs, f"add rule to {body['chain']}")

    def expression(self, e: dict) -> list[bytes]:
        if len(e) != 1:
            raise Unsupported(repr(e)[:80])
        (kind, a), = e.items()
        if kind in ("jump", "goto"):
            return [_expr("immediate", _attr(1, _be32(NFT_REG_VERDICT)),
                          _verdict(NFT_JUMP if kind == "jump" else NFT_GOTO, a["target"]))]
        if kind == "match" and a.get("op") == "==":
            return self.match(a["left"], a["right"])
        if kind == "vmap":
            return self.numgen_vmap(a)
        if kind == "set" and a.get("op") == "update":
            el = a.get("elem", {}).get("payload", {})
            name = a.get("set", "")
            if not name.startswith("@"):
                raise Unsupported("update")
            return _payload(el.get("protocol"), el.get("field")) + [
                _expr("dynset", _attr(1, _str(name[1:])), _attr(3, _be32(NFT_DYNSET_OP_UPDATE)),
                      _attr(4, _be32(NFT_REG_1)))]
        if kind == "dnat":
            fam = a.get("family")
            if fam not in ("ip", "ip6") or set(a) != {"family", "addr", "port"}:
                raise Unsupported("dnat")
            return [_expr("immediate", _attr(1, _be32(NFT_REG_1)), _nest(2, _attr(1, _addr(a["addr"], 6 if fam == "ip6" else 4)))),
                    _expr("immediate", _attr(1, _be32(NFT_REG_2)), _nest(2, _attr(1, struct.pack("!H", int(a["port"]))))),
                    _expr("nat", _attr(1, _be32(NFT_NAT_DNAT)), _attr(2, _be32(NFPROTO_IPV6 if fam == "ip6" else NFPROTO_IPV4)),
                          _attr(3, _be32(NFT_REG_1)), _attr(5, _be32(NFT_REG_2)), _attr(7, _be32(NF_NAT_RANGE_PROTO_SPECIFIED)))]
        raise Unsupported(kind)

    def match(self, left: Any, right: Any) -> list[bytes]:
        if isinstance(left, dict) and "payload" in left:
            p = left["payload"]
            out = _payload(p.get("protocol"), p.get("field"))
            if isinstance(right, str) and right.startswith("@"):
                return out + [_expr("lookup", _attr(1, _str(right[1:])), _attr(2, _be32(NFT_REG_1)))]
            return out + [_cmp_eq(_addr(right, 6 if p.get("protocol") == "ip6" else 4))]
        if left == {"meta": {"key": "l4proto"}} and right in _PROTO:
            return [_meta(NFT_META_L4PROTO), _cmp_eq(bytes([_PROTO[right]]))]
        if left == {"fib": {"result": "type", "flags": ["saddr"]}} and right == "local":
            return [_expr("fib", _attr(1, _be32(NFT_REG_1)), _attr(2, _be32(NFT_FIB_RESULT_ADDRTYPE)),
                          _attr(3, _be32(NFTA_FIB_F_SADDR))),
                    _cmp_eq(struct.pack("=I", RTN_LOCAL))]            # address type: host byte order
        raise Unsupported(f"match {left!r}")

    def numgen_vmap(self, a: dict) -> list[bytes]:
        ng = a.get("key", {}).get("numgen")
        data = a.get("data", {})
        if not ng or ng.get("mode") != "random" or ng.get("offset", 0) != 0 or not isinstance(data, dict) \
                or "set" not in data:
            raise Unsupported("vmap")
        elems = data["set"]
        self.set_id += 1
        sid = self.set_id
        self.msg(NEWSET, NLM_F_CREATE, (
            _attr(1, _str(self.table)), _attr(2, _str("__map%d")),
            _attr(3, _be32(NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP)),
            _attr(4, _be32(TYPE_INTEGER)), _attr(5, _be32(4)), _attr(6, _be32(NFT_DATA_VERDICT)), _attr(7, _be32(0)),
            _attr(10, _be32(sid)), _nest(9, _attr(1, _be32(len(elems)))), _attr(13, _VMAP_UDATA)), "anonymous map")
        items = []
        for k, v in elems:
            if not isinstance(k, int) or not isinstance(v, dict) or set(v) != {"goto"}:
                raise Unsupported("vmap element")
            items.append(_nest(1, _nest(1, _value(struct.pack("=I", k))), _verdict(NFT_GOTO, v["goto"]["target"])))
        self.msg(NEWSETELEM, NLM_F_CREATE, (_attr(1, _str(self.table)), _attr(2, _str("__map%d")),
                                            _attr(4, _be32(sid)), _nest(3, *items)), "anonymous map elements")
        return [_expr("numgen", _attr(1, _be32(NFT_REG_1)), _attr(2, _be32(int(ng["mod"]))), _attr(3, _be32(NFT_NG_RANDOM)),
                      _attr(4, _be32(0))),
                _expr("lookup", _attr(1, _str("__map%d")), _attr(2, _be32(NFT_REG_1)), _attr(3, _be32(NFT_REG_VERDICT)),
                      _attr(4, _be32(sid)))]


def encode(table: str, commands: list[dict]) -> list[tuple[int, int, bytes, str]]:
    """The messages of one transaction; raises Unsupported when a command is outside this
    module's vocabulary (nothing is sent then)."""
    b = _Batch(table)
    for cmd in commands:
        b.command(cmd)
    return b.msgs


class NetlinkError(OSError):
    """nf_tables refused the transaction; the message names the command."""


class NetlinkNft:
    """One netlink socket to nf_tables, in the network namespace of the thread that made it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.seq = 1

    def close(self) -> None:
        self.sock.close()

    def run(self, table: str, commands: list[dict]) -> None:
        msgs = encode(table, commands)
        if not msgs:
            return
        out = bytearray()
        first = self.seq

        def put(mtype: int, flags: int, family: int, res_id: int, attrs: bytes) -> None:
            body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
            out.extend(struct.pack("=IHHII", 16 + len(body), mtype, flags, self.seq, 0) + body)
            self.seq += 1

        put(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")
        for mtype, flags, attrs, _ in msgs:
            put((NFNL_SUBSYS_NFTABLES << 8) | mtype, NLM_F_REQUEST | NLM_F_ACK | flags, NFPROTO_INET, 0, attrs)
        put(NFNL_MSG_BATCH_END, NLM_F_REQUEST, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")
        self.seq &= 0x7FFFFFFF
        size = max(len(out) * 2, 1 << 20)
        for opt in (33, socket.SO_SNDBUF):            # SO_SNDBUFFORCE (root), else what we may
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, size)
                break
            except OSError:
                continue
        self.sock.sendall(bytes(out))
        self._acks(first + 1, len(msgs), msgs)

    def _acks(self, first_seq: int, n: int, msgs) -> None:
        """Read one answer per message; the first error (the kernel then applied nothing) is
        raised, naming the command."""
        pending = set(range(first_seq, first_seq + n))
        error: tuple[int, int] | None = None
        self.sock.settimeout(10.0)
        while pending:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                if error is not None:
                    break
                raise NetlinkError(errno.ETIMEDOUT, "nf_tables did not answer the transaction") from None
            pos = 0
            while pos + 16 <= len(data):
                length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, pos)
                if length < 16:
                    break
                if mtype == NLMSG_ERROR and seq in pending:
                    pending.discard(seq)
                    code = struct.unpack_from("=i", data, pos + 16)[0]
                    if code != 0 and error is None:
                        error = (-code, seq - first_seq)
                pos += _align(length)
            if error is not None and not pending:
                break
            if error is not None:
                # The remaining answers may not come once one command failed: do not wait.
                self.sock.settimeout(0.2)
        if error is not None:
            code, idx = error
            what = msgs[idx][3] if 0 <= idx < len(msgs) else "?"
            raise NetlinkError(code, f"{os.strerror(code)} ({what})")
