"""Workload identity: SPIFFE IDs, X.509-SVIDs, and the mutual-TLS contexts made from them.

A meshed workload is known by a SPIFFE ID, ``spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT``,
carried as the one URI SAN of a short-lived X.509 certificate (an X.509-SVID) that chains to
the mesh's trust bundle. This module holds everything the data plane needs of that:

- ``SpiffeId``: parse / format / validate (the SPIFFE ID specification's rules);
- ``load_svid``: PEM chain + key + bundle -> a checked ``Svid`` (leaf first, intermediates
  allowed, key matches the leaf, one URI SAN that is a SPIFFE ID of our trust domain, inside
  its validity, chaining to the bundle) — or an ``IdentityError`` that says which part is wrong;
- ``server_context`` / ``client_context``: TLS 1.3-only contexts that present the SVID and
  require and verify the peer's against the bundle;
- ``peer_identity``: the verified peer's SPIFFE ID (and leaf hash) from an ``SSLObject`` /
  ``SSLSocket`` after the handshake; ``xfcc_value`` for ``x-forwarded-client-cert``;
- ``IdentityStore``: the identity in force.

Invariants of ``IdentityStore``:
- ``current`` is None until the first good SVID, and afterwards always a complete
  ``MeshTls`` (SVID + both contexts built from it), replaced by one reference assignment in
  ``update``; a candidate that fails any check never replaces it;
- a connection keeps the ``ssl.SSLContext`` it was created with (an SSL object holds a
  reference to its context), so a rotation changes what *new* connections present and trust
  and drops nothing that is open.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from . import metrics
from .tls import load_cert_chain

__all__ = [
    "DEFAULT_TRUST_DOMAIN", "IdentityError", "SpiffeId", "Svid", "PeerIdentity", "MeshTls",
    "IdentityStore", "load_svid", "spiffe_id_of", "verify_chain", "server_context",
    "client_context", "peer_identity", "leaf_hash", "xfcc_value", "is_tls_client_hello",
    "utcnow", "iso8601", "make_csr",
]

DEFAULT_TRUST_DOMAIN = "cluster.local"

# The SPIFFE ID specification (SPIFFE-ID.md, "2. SPIFFE Identity"): a trust domain of lowercase
# letters, digits, '.', '-', '_'; path segments of letters, digits, '.', '-', '_', none empty,
# none '.' or '..'; no port, user info, query or fragment; percent-encoding not allowed.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+\Z")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+\Z")
_MAX_TRUST_DOMAIN = 255
_MAX_ID = 2048


class IdentityError(ValueError):
    """A SPIFFE ID, SVID or peer certificate that is not acceptable; the message says why."""


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso8601(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _trust_domain_problem(td: str) -> str | None:
    if not td:
        return "the trust domain is empty"
    if len(td) > _MAX_TRUST_DOMAIN:
        return f"the trust domain is longer than {_MAX_TRUST_DOMAIN} characters"
    if not _TRUST_DOMAIN.match(td):
        if ":" in td:
            return "the trust domain may not carry a port"
        if "@" in td:
            return "the trust domain may not carry user info"
        return f"the trust domain {td!r} may hold only lowercase letters, digits, '.', '-' and '_'"
    return None


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str = ""          # "" or "/segment[/segment...]"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """``spiffe://trust.domain/path`` -> SpiffeId; IdentityError names the broken rule."""
        if not isinstance(text, str):
            raise IdentityError(f"a SPIFFE ID must be a string, not {type(text).__name__}")
        if len(text.encode()) > _MAX_ID:
            raise IdentityError(f"SPIFFE ID longer than {_MAX_ID} bytes")
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise IdentityError(f"{text!r} is not a SPIFFE ID: expected spiffe://TRUST_DOMAIN/PATH")
        if scheme != "spiffe":
            raise IdentityError(f"{text!r}: the scheme must be 'spiffe' (lowercase), not {scheme!r}")
        for ch, what in (("?", "query"), ("#", "fragment")):
            if ch in rest:
                raise IdentityError(f"{text!r}: a SPIFFE ID may not have a {what}")
        td, slash, path = rest.partition("/")
        problem = _trust_domain_problem(td)
        if problem:
            raise IdentityError(f"{text!r}: {problem}")
        if slash:
            if path == "":
                raise IdentityError(f"{text!r}: the path may not end with '/'")
            for seg in path.split("/"):
                if seg == "":
                    raise IdentityError(f"{text!r}: the path may not have empty segments ('//' or a trailing '/')")
                if seg in (".", ".."):
                    raise IdentityError(f"{text!r}: the path may not have '.' or '..' segments")
                if not _SEGMENT.match(seg):
                    bad = next(c for c in seg if not _SEGMENT.match(c))
                    raise IdentityError(f"{text!r}: {bad!r} is not allowed in a path segment "
                                        "(letters, digits, '.', '-', '_'; no percent-encoding)")
        return cls(td, "/" + path if slash else "")

    @classmethod
    def for_service_account(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """The identity of a Kubernetes ServiceAccount: ``spiffe://TD/ns/NS/sa/SA``."""
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    def __str__(self) -> str:
        return self.uri

    @property
    def principal(self) -> str:
        """The form authorization policies write: ``TRUST_DOMAIN/ns/NS/sa/SA`` (no scheme)."""
        return f"{self.trust_domain}{self.path}"

    def _k8s(self) -> tuple[str, str] | None:
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    @property
    def namespace(self) -> str | None:
        """NS of a ``/ns/NS/sa/SA`` identity, else None."""
        k = self._k8s()
        return k[0] if k else None

    @property
    def service_account(self) -> str | None:
        k = self._k8s()
        return k[1] if k else None


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a leaf: its only URI SAN (X509-SVID.md §2: exactly one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no subjectAltName, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"an SVID must have exactly one URI SAN, this one has {len(uris)}"
                            + (f" ({', '.join(uris)})" if uris else ""))
    return SpiffeId.parse(uris[0])


def make_csr(spiffe_id: SpiffeId) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key and a certificate request naming only ``spiffe_id`` -> (key PEM,
    CSR PEM). The workload makes both; only the CSR ever leaves it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]), critical=True)
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def leaf_hash(der: bytes) -> str:
    """Hex SHA-256 of a certificate's DER: the ``Hash=`` of x-forwarded-client-cert."""
    return hashlib.sha256(der).hexdigest()


def _pem_certs(data: bytes, what: str) -> list[x509.Certificate]:
    if not data or b"-----BEGIN CERTIFICATE-----" not in data:
        raise IdentityError(f"{what}: no PEM certificate in it")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(f"{what}: not valid PEM certificates ({exc})") from None


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_chain(chain: Sequence[x509.Certificate], bundle: Sequence[x509.Certificate],
                 now: datetime.datetime) -> None:
    """The leaf (``chain[0]``) chains through ``chain[1:]`` to a certificate of ``bundle`` at
    ``now`` (RFC 5280 path validation by ``cryptography``). Raises IdentityError."""
    try:
        verifier = verification.PolicyBuilder().store(verification.Store(list(bundle))).time(now).build_client_verifier()
        verifier.verify(chain[0], list(chain[1:]))
    except verification.VerificationError as exc:
        raise IdentityError(f"the certificate does not chain to the trust bundle: {exc}") from None
    except ValueError as exc:       # e.g. an empty store
        raise IdentityError(f"the trust bundle is not usable: {exc}") from None


@dataclass(frozen=True, slots=True)
class Svid:
    """A checked X.509-SVID with its key and the trust bundle it was checked against."""
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]        # leaf first
    bundle: tuple[x509.Certificate, ...]       # trust anchors (two while a CA is rotated)
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes = field(repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    def renew_at(self, received: datetime.datetime) -> datetime.datetime:
        """Half of the life left when it was received (the issuer may backdate notBefore)."""
        start = max(self.not_before, received)
        return start + (self.not_after - start) / 2

    def to_json(self) -> dict:
        return {
            "spiffe_id": self.spiffe_id.uri,
            "serial": self.serial,
            "not_before": iso8601(self.not_before),
            "not_after": iso8601(self.not_after),
            "chain": [{"subject": c.subject.rfc4514_string(), "issuer": c.issuer.rfc4514_string(),
                       "serial": format(c.serial_number, "x"), "not_after": iso8601(c.not_valid_after_utc)}
                      for c in self.chain],
            "bundle": [{"subject": c.subject.rfc4514_string(), "serial": format(c.serial_number, "x"),
                        "not_after": iso8601(c.not_valid_after_utc)} for c in self.bundle],
        }


def load_svid(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, *, trust_domain: str | None = None,
              now: datetime.datetime | None = None) -> Svid:
    """Check SVID material completely; raise IdentityError naming the first problem found.

    ``trust_domain``: the SPIFFE ID must belong to it (None: any). ``now``: the time the
    validity is checked at (default: the clock).
    """
    now = now or utcnow()
    chain = _pem_certs(chain_pem, "svid")
    bundle = _pem_certs(bundle_pem, "bundle")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"svid_key: not a usable unencrypted PEM private key ({exc})") from None
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise IdentityError("svid_key does not belong to the leaf certificate of svid "
                            f"(serial {leaf.serial_number:x}): a half-written update?")
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise IdentityError("the leaf of svid is a CA certificate; an SVID must not be one")
    except x509.ExtensionNotFound:
        pass
    sid = spiffe_id_of(leaf)
    if trust_domain is not None and sid.trust_domain != trust_domain:
        raise IdentityError(f"{sid} is not in the trust domain {trust_domain!r}")
    if now < leaf.not_valid_before_utc:
        raise IdentityError(f"svid is not valid before {iso8601(leaf.not_valid_before_utc)}")
    if now > leaf.not_valid_after_utc:
        raise IdentityError(f"svid expired at {iso8601(leaf.not_valid_after_utc)}")
    verify_chain(chain, bundle, now)
    return Svid(sid, tuple(chain), tuple(bundle), chain_pem, key_pem, bundle_pem)


# --------------------------------------------------------------------------------------------
# TLS between sidecars


def _context(protocol: int, svid: Svid, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    # Both ends are ours: TLS 1.3 only, no negotiation down.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        # SVIDs name a workload, not a host: the peer is checked by its SPIFFE ID after the
        # handshake (peer_identity), as SPIFFE's X509-SVID.md §5 prescribes.
        ctx.check_hostname = False
    ctx.load_verify_locations(cadata=svid.bundle_pem.decode("ascii", "replace"))
    load_cert_chain(ctx, svid.chain_pem, svid.key_pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(svid: Svid, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """Inbound mTLS: presents ``svid``, requires a client certificate chaining to its bundle."""
    return _context(ssl.PROTOCOL_TLS_SERVER, svid, alpn)


def client_context(svid: Svid, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """Outbound mTLS: presents ``svid``, requires a server certificate chaining to its bundle."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, svid, alpn)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    spiffe_id: SpiffeId
    hash: str           # hex SHA-256 of the peer's leaf (DER)


# Peers are few (bounded by service accounts x live certificates): parse each leaf once.
_PEER_CACHE: dict[bytes, PeerIdentity] = {}
_PEER_CACHE_MAX = 1024


def peer_identity(ssl_obj: ssl.SSLObject | ssl.SSLSocket, trust_domain: str | None = None,
                  expected: Iterable[SpiffeId] | SpiffeId | None = None) -> PeerIdentity:
    """The SPIFFE ID of a peer whose handshake (with a context of this module, so its chain was
    verified against the bundle) has completed. ``expected``: the identity (or identities)
    the peer must have — the destination's, on the client side. Raises IdentityError."""
    der = ssl_obj.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("the peer presented no certificate")
    peer = _PEER_CACHE.get(der)
    if peer is None:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise IdentityError(f"the peer certificate does not parse: {exc}") from None
        peer = PeerIdentity(spiffe_id_of(cert), leaf_hash(der))
        if len(_PEER_CACHE) >= _PEER_CACHE_MAX:
            _PEER_CACHE.clear()
        _PEER_CACHE[der] = peer
    if trust_domain is not None and peer.spiffe_id.trust_domain != trust_domain:
        raise IdentityError(f"peer {peer.spiffe_id} is not in the trust domain {trust_domain!r}")
    if expected is not None:
        allowed = (expected,) if isinstance(expected, SpiffeId) else tuple(expected)
        if peer.spiffe_id not in allowed:
            raise IdentityError(f"peer is {peer.spiffe_id}, expected {' or '.join(map(str, allowed))}")
    return peer


def xfcc_value(own: SpiffeId, peer: PeerIdentity) -> str:
    """``x-forwarded-client-cert`` for a verified caller, in Envoy's element format. The data
    path sets it (replacing whatever the client sent) and removes it for plaintext callers."""
    return f"By={own.uri};Hash={peer.hash};URI={peer.spiffe_id.uri}"


def is_tls_client_hello(prefix: bytes) -> bool:
    """Whether the first bytes of a connection are a TLS handshake record (RFC 8446 §5.1:
    content type 22, legacy version 3.x) — how a PERMISSIVE port tells mTLS from plaintext."""
    return len(prefix) >= 2 and prefix[0] == 0x16 and prefix[1] == 0x03


# --------------------------------------------------------------------------------------------
# The identity in force


@dataclass(frozen=True, slots=True)
class MeshTls:
    svid: Svid
    server: ssl.SSLContext = field(repr=False)
    client: ssl.SSLContext = field(repr=False)
    version: int
    source: str             # where it came from ("files:DIR", "issuer:URL")
    updated: datetime.datetime


class IdentityStore:
    """The workload's identity: read ``current`` (or the two context helpers) per connection."""

    __slots__ = ("trust_domain", "alpn", "current", "_subscribers")

    def __init__(self, trust_domain: str = DEFAULT_TRUST_DOMAIN, alpn: Sequence[str] = ()) -> None:
        problem = _trust_domain_problem(trust_domain)
        if problem:
            raise IdentityError(problem)
        self.trust_domain = trust_domain
        self.alpn = tuple(alpn)
        self.current: MeshTls | None = None
        self._subscribers: list[Callable[[MeshTls], None]] = []

    def update(self, svid: Svid, source: str) -> MeshTls:
        """Put ``svid`` in force for new connections. The contexts are built first: if that
        fails (IdentityError / ssl.SSLError) the identity in force stays."""
        if svid.spiffe_id.trust_domain != self.trust_domain:
            raise IdentityError(f"{svid.spiffe_id} is not in the trust domain {self.trust_domain!r}")
        try:
            server, client = server_context(svid, self.alpn), client_context(svid, self.alpn)
        except (ssl.SSLError, ValueError) as exc:
            raise IdentityError(f"TLS refused the SVID: {exc}") from None
        prev = self.current
        tls = MeshTls(svid, server, client, (prev.version + 1) if prev else 1, source, utcnow())
        self.current = tls
        metrics.identity_expiry.set(svid.not_after.timestamp())
        metrics.identity_updates.labels(source.partition(":")[0], "ok").inc()
        for fn in list(self._subscribers):
            fn(tls)
        return tls

    def subscribe(self, fn: Callable[[MeshTls], None]) -> None:
        self._subscribers.append(fn)

    def server_context(self) -> ssl.SSLContext | None:
        cur = self.current
        return cur.server if cur is not None else None

    def client_context(self) -> ssl.SSLContext | None:
        cur = self.current
        return cur.client if cur is not None else None

    @property
    def spiffe_id(self) -> SpiffeId | None:
        cur = self.current
        return cur.svid.spiffe_id if cur is not None else None

    def to_json(self) -> dict | None:
        """``GET /debug/identity``: None while no identity is in force."""
        cur = self.current
        if cur is None:
            return None
        data = cur.svid.to_json()
        data.update(trust_domain=self.trust_domain, source=cur.source, version=cur.version,
                    updated=iso8601(cur.updated))
        return data
