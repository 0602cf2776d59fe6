"""Test PKI for the mesh: a root CA of the trust domain and X.509-SVIDs signed by it, as
files in the layout ``--identity-dir`` reads (svid.pem, svid_key.pem, bundle.pem)."""

from __future__ import annotations

import datetime
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.core.identity import SpiffeId, load_svid
from meshproxy.issuer import CertificateAuthority

TD = "cluster.local"
PEM = serialization.Encoding.PEM


class Pki:
    def __init__(self, td: str = TD) -> None:
        self.td = td
        self.ca = CertificateAuthority.generate(td)

    def svid(self, ns: str, sa: str, ttl: float = 3600.0) -> tuple[bytes, bytes, bytes]:
        """(chain PEM, key PEM, bundle PEM) of a fresh SVID for ns/sa."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.ca.issue(SpiffeId.for_service_account(self.td, ns, sa), key.public_key(), ttl)
        key_pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return cert.public_bytes(PEM), key_pem, self.ca.bundle_pem

    def loaded(self, ns: str, sa: str, ttl: float = 3600.0):
        """A checked ``Svid``."""
        return load_svid(*self.svid(ns, sa, ttl), trust_domain=self.td)

    def write(self, directory: str, ns: str, sa: str, ttl: float = 3600.0, uid: int | None = None) -> bytes:
        """Write an SVID into ``directory`` (key first, as a careful writer does: a reader may see
        the new key with the old certificate for a moment, which it must ignore). Returns the
        leaf's DER."""
        chain, key, bundle = self.svid(ns, sa, ttl)
        os.makedirs(directory, exist_ok=True)
        for name, data in (("bundle.pem", bundle), ("svid_key.pem", key), ("svid.pem", chain)):
            tmp = os.path.join(directory, f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            if uid is not None:
                os.chown(tmp, uid, uid)
            os.replace(tmp, os.path.join(directory, name))
        if uid is not None:
            os.chown(directory, uid, uid)
        from cryptography import x509
        return x509.load_pem_x509_certificate(chain).public_bytes(serialization.Encoding.DER)


def not_after(der: bytes) -> datetime.datetime:
    from cryptography import x509
    return x509.load_der_x509_certificate(der).not_valid_after_utc
