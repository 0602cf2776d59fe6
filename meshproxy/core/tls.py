"""Server TLS contexts made from PEM material (a Secret's tls.crt / tls.key).

Settings (Mozilla "intermediate"): TLS 1.2 and 1.3 only, ECDHE key exchange with AEAD ciphers
for 1.2, no compression, no renegotiation. The control plane uses ``make_context`` to check a
Secret once when it enters the snapshot; the L7 listener uses the same factory to serve it.

``ssl`` loads a certificate and key only from files: ``load_cert_chain`` hands each PEM pair
over through an in-memory file (``memfd_create``), or a private temporary file removed right
after loading where there is none.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile

__all__ = ["base_context", "make_context", "load_cert_chain"]

_CIPHERS_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def base_context(alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """``alpn``: the protocols offered, in the server's order of preference (the L7 server
    offers ``h2`` first when it speaks HTTP/2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def make_context(cert_pem: bytes, key_pem: bytes, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A server context holding one certificate chain and its key. Raises ssl.SSLError or
    ValueError when they do not load (bad PEM, key not matching the certificate)."""
    ctx = base_context(alpn)
    load_cert_chain(ctx, cert_pem, key_pem)
    return ctx


def load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load a PEM chain (leaf first) and its key into ``ctx``. Raises ssl.SSLError / ValueError.

    ``ssl`` reads certificates only from a path. Where the kernel has ``memfd_create`` the PEM
    goes to an anonymous in-memory file read through ``/proc/self/fd`` (a private key never
    touches a file system); elsewhere to a 0600 temporary file, removed right after loading.
    """
    data = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("meshproxy-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    tmpdir = tempfile.mkdtemp(prefix="meshproxy-tls-")   # 0700
    try:
        fd, path = tempfile.mkstemp(dir=tmpdir, suffix=".pem")   # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
