"""TLS termination for the ingress: one ``ssl.SSLContext`` per Secret, chosen by SNI.

``TLSContexts.listener_context`` is the context the TLS listener is created with; its
``sni_callback`` switches each handshake to the context of the certificate for the requested
name:

1. an exact ``spec.tls[].hosts`` entry (case-insensitive, one trailing dot ignored);
2. a ``*.`` wildcard entry covering exactly one more label (``*.example.com`` for
   ``a.example.com``, not for ``a.b.example.com`` nor ``example.com``);
3. the default: the ``""`` entry of ``snapshot.tls_hosts`` (``--default-tls-secret``, or a
   ``spec.tls`` item without hosts), else the first certificate in (namespace, name) order.

A client without SNI gets the default too. Contexts are rebuilt in ``update`` only for Secrets
whose bytes changed; a handshake in progress or an established connection keeps the context it
started with (an ``SSLObject`` holds a reference to it), so a rotation drops nothing.

Settings (Mozilla "intermediate"): TLS 1.2 and 1.3 only, ECDHE key exchange with AEAD ciphers
for 1.2, no compression, no renegotiation, ALPN ``h2`` then ``http/1.1`` (``http/1.1`` only
when HTTP/2 is off, ``Settings.http2``). Every context built here - the listener's and each
Secret's, which the SNI callback switches to - offers the same list.

``ssl`` loads a certificate and key only from files: each PEM pair is written to a private
temporary file (``mkstemp``: mode 0600, in a fresh 0700 directory) and removed right after
loading.
"""

from __future__ import annotations

import logging
import ssl
from typing import Mapping

from meshproxy.core.tls import base_context, make_context

__all__ = ["TLSContexts", "make_context"]

log = logging.getLogger("meshproxy.l7.tls")

def _norm(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class TLSContexts:
    """Per-Secret contexts and the SNI choice. ``update(snapshot)`` on every publish."""

    def __init__(self, label_wildcards: bool = True, http2: bool = True) -> None:
        """``label_wildcards``: a ``*.`` name covers exactly one label (Ingress); False: any
        number of them, the longest suffix first (Gateway API listeners). ``http2``: offer
        ALPN ``h2`` before ``http/1.1``."""
        self.label_wildcards = label_wildcards
        self.alpn = ("h2", "http/1.1") if http2 else ("http/1.1",)
        self._by_secret: dict[tuple[str, str], tuple[bytes, bytes, ssl.SSLContext]] = {}
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}
        self._default: ssl.SSLContext | None = None
        self.problems: tuple[str, ...] = ()
        self.listener_context = base_context(self.alpn)
        self.listener_context.sni_callback = self._sni
        self.builds = 0   # contexts built so far (tests: a rotation rebuilds one)

    def update(self, tls_hosts: Mapping[str, tuple[str, str]],
               secrets: Mapping[tuple[str, str], tuple[bytes, bytes]]) -> None:
        problems = []
        new: dict[tuple[str, str], tuple[bytes, bytes, ssl.SSLContext]] = {}
        for key in sorted(secrets):
            cert, keypem = secrets[key]
            old = self._by_secret.get(key)
            if old is not None and old[0] == cert and old[1] == keypem:
                new[key] = old
                continue
            try:
                ctx = make_context(cert, keypem, self.alpn)
            except (ssl.SSLError, ValueError, OSError) as exc:
                # A broken Secret affects only the hosts that use it (they get the default).
                msg = f"Secret/{key[0]}/{key[1]}: tls.crt/tls.key do not load: {exc}"
                problems.append(msg)
                log.error("%s", msg)
                continue
            self.builds += 1
            new[key] = (cert, keypem, ctx)
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        default = None
        for host, key in tls_hosts.items():
            entry = new.get(key)
            if entry is None:
                continue
            if host == "":
                default = entry[2]
            elif host.startswith("*."):
                wildcard[_norm(host[2:])] = entry[2]
            else:
                exact[_norm(host)] = entry[2]
        if default is None and new:
            default = new[min(new)][2]
        # Swap whole dicts: the SNI callback of a concurrent handshake sees old or new, never half.
        self._by_secret = new
        self._exact = exact
        self._wildcard = wildcard
        self._default = default
        self.problems = tuple(problems)

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name:
            name = _norm(server_name)
            ctx = self._exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(".")
            while dot > 0:
                ctx = self._wildcard.get(name[dot + 1:])
                if ctx is not None:
                    return ctx
                if self.label_wildcards:
                    break
                dot = name.find(".", dot + 1)
        return self._default

    def _sni(self, sslobj, server_name, _ctx) -> int | None:
        # Runs inside the handshake: dict lookups only; never raise (OpenSSL would abort with
        # an internal error alert).
        try:
            ctx = self.context_for(server_name)
            if ctx is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = ctx
            # The requested name, for the request path (a Gateway answers 421 when Host picks
            # another listener than SNI did): SSLObject instances take attributes.
            sslobj.meshproxy_sni = server_name
        except Exception:   # noqa: BLE001 - see above; logged, handshake refused
            log.exception("TLS: SNI callback failed")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None
