"""``meshproxy identity serve``: the mesh's certificate issuer.

A workload proves its ServiceAccount with a token (the kubelet-projected one) and sends a
certificate signing request made from a key it generated itself: the key never leaves the pod.
The issuer asks the API server who the token belongs to (a TokenReview,
``authentication.k8s.io/v1``) and, when the request names exactly that ServiceAccount's SPIFFE
ID, signs a short-lived X.509-SVID for it.

HTTP API (TLS; the serving certificate is signed by the CA itself, so workloads verify the
issuer with the trust bundle they are given):

- ``POST /v1/svid`` with ``Authorization: Bearer TOKEN`` and ``{"csr": "<PEM>"}`` ->
  200 ``{"spiffe_id", "serial", "not_after", "svid": "<PEM chain, leaf first>", "bundle": "<PEM>"}``;
  400 malformed request or CSR, 401 token not accepted, 403 the CSR asks for another identity,
  503 the API server could not be asked. Errors are ``{"error": "..."}``.
- ``GET /v1/bundle`` -> the trust bundle (PEM); ``GET /healthz``.

The CA: ``--ca-dir DIR`` holds ``ca.pem`` (the signing certificate, followed by its parents
when it is an intermediate) and ``ca_key.pem``; both are generated (self-signed root, 10
years) when absent. ``--trust-bundle FILE`` adds roots to the bundle handed out: during a CA
rotation it holds the other CA, so workloads trust both while SVIDs of both are alive
(docs/mesh.md, "Rotating the CA").

Invariants:
- a certificate is signed only after the API server said ``authenticated: true`` for a
  ServiceAccount user (``system:serviceaccount:NS:SA``) and the CSR's only name is that
  account's SPIFFE ID in our trust domain; anything else is refused before signing;
- an SVID never outlives its CA.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import json
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass
from typing import Sequence

import h11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from discovery.sources.kubeconfig import KubeConfig, KubeConfigError, load_config

from .admin import AdminServer
from .core import metrics
from .core.identity import IdentityError, SpiffeId, iso8601, utcnow
from .core.sockets import listen
from .core.tls import load_cert_chain

__all__ = ["CertificateAuthority", "IssuerError", "ReviewResult", "TokenReviewer", "IssuerServer",
           "serve_issuer", "init_ca", "DEFAULT_SVID_TTL"]

log = logging.getLogger("meshproxy.issuer")

DEFAULT_SVID_TTL = 24 * 3600.0
# notBefore is set this far back, so a workload whose clock is a little behind can use a fresh
# certificate at once (renewal timing uses the time of receipt, not notBefore).
_BACKDATE = datetime.timedelta(seconds=30)
_ROOT_TTL = datetime.timedelta(days=3650)
_SERVING_TTL = datetime.timedelta(days=30)
_MAX_BODY = 65536
_READ_TIMEOUT = 10.0
_SA_PREFIX = "system:serviceaccount:"


class IssuerError(Exception):
    """A refused request: ``status`` is the HTTP answer, the message what the caller did wrong."""

    def __init__(self, status: int, message: str, result: str) -> None:
        super().__init__(message)
        self.status = status
        self.result = result        # the metrics label


def _key_usage(*, cert_sign: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=key_encipherment,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _check_public_key(pub) -> None:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ("secp256r1", "secp384r1"):
            raise IssuerError(400, f"EC curve {pub.curve.name} is not accepted (P-256 or P-384)", "bad_csr")
    elif isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise IssuerError(400, f"RSA key of {pub.key_size} bits is too small (at least 2048)", "bad_csr")
    elif not isinstance(pub, ed25519.Ed25519PublicKey):
        raise IssuerError(400, f"key type {type(pub).__name__} is not accepted (EC P-256/P-384, RSA, Ed25519)", "bad_csr")


class CertificateAuthority:
    """A signing certificate (root or intermediate) and its key, plus the roots handed out."""

    def __init__(self, chain: Sequence[x509.Certificate], key, trust_domain: str,
                 extra_roots: Sequence[x509.Certificate] = ()) -> None:
        self.chain = tuple(chain)         # signing certificate first, then its parents
        self.key = key
        self.trust_domain = trust_domain
        cert = self.chain[0]
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise IdentityError("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                cert.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise IdentityError("the CA key does not belong to the CA certificate")
        root = self.chain[-1]
        roots = [root] + [r for r in extra_roots if r != root]
        self.roots = tuple(roots)
        self.bundle_pem = b"".join(r.public_bytes(serialization.Encoding.PEM) for r in self.roots)

    # -- making CAs -------------------------------------------------------------------------------

    @classmethod
    def generate(cls, trust_domain: str, *, parent: CertificateAuthority | None = None,
                 name: str = "meshproxy root CA", ttl: datetime.timedelta = _ROOT_TTL,
                 now: datetime.datetime | None = None, extra_roots: Sequence[x509.Certificate] = ()) -> CertificateAuthority:
        """A new CA: self-signed root, or an intermediate signed by ``parent``."""
        now = now or utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        not_after = now + ttl
        if parent is not None:
            not_after = min(not_after, parent.chain[0].not_valid_after_utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(parent.chain[0].subject if parent else subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - _BACKDATE)
                   .not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(_key_usage(cert_sign=True), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   # A signing certificate may name its trust domain (SPIFFE X509-SVID.md §3).
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False))
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False)
        cert = builder.sign(parent.key if parent else key, hashes.SHA256())
        chain = (cert,) + (parent.chain if parent else ())
        return cls(chain, key, trust_domain, extra_roots or (parent.roots if parent else ()))

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, trust_domain: str,
                 extra_roots_pem: bytes = b"") -> CertificateAuthority:
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as exc:
            raise IdentityError(f"CA certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"CA key: {exc}") from None
        extra = []
        if extra_roots_pem.strip():
            try:
                extra = x509.load_pem_x509_certificates(extra_roots_pem)
            except ValueError as exc:
                raise IdentityError(f"trust bundle: {exc}") from None
        return cls(chain, key, trust_domain, extra)

    @classmethod
    def from_dir(cls, directory: str, trust_domain: str, extra_roots_pem: bytes = b"") -> CertificateAuthority:
        """``DIR/ca.pem`` + ``DIR/ca_key.pem``; a new root is generated and written when both
        are absent (the key 0600), so a restarted issuer keeps its CA."""
        cert_path, key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca_key.pem")
        have = [os.path.exists(p) for p in (cert_path, key_path)]
        if not any(have):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            ca = cls.generate(trust_domain)
            _write_private(key_path, ca.key_pem())
            _write_private(cert_path, ca.chain_pem())
            log.info("generated a new root CA in %s (serial %x, until %s)", directory,
                     ca.chain[0].serial_number, iso8601(ca.chain[0].not_valid_after_utc))
        elif not all(have):
            missing = cert_path if not have[0] else key_path
            raise IdentityError(f"{missing} is missing (both ca.pem and ca_key.pem, or neither)")
        with open(cert_path, "rb") as f:
            chain_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
        return cls.from_pem(chain_pem, key_pem, trust_domain, extra_roots_pem)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    # -- signing ---------------------------------------------------------------------------------

    def issue(self, spiffe_id: SpiffeId, public_key, ttl: float, now: datetime.datetime | None = None) -> x509.Certificate:
        """An X.509-SVID for ``spiffe_id`` (X509-SVID.md: one URI SAN, not a CA, digitalSignature,
        serverAuth + clientAuth), never outliving the CA."""
        now = now or utcnow()
        ca_cert = self.chain[0]
        if not ca_cert.not_valid_before_utc <= now < ca_cert.not_valid_after_utc:
            raise IssuerError(503, f"the CA (serial {ca_cert.serial_number:x}) is not valid now: "
                              f"{iso8601(ca_cert.not_valid_before_utc)} - {iso8601(ca_cert.not_valid_after_utc)}", "ca_expired")
        not_after = min(now + datetime.timedelta(seconds=ttl), ca_cert.not_valid_after_utc)
        return (x509.CertificateBuilder()
                # No subject: the identity is the URI SAN, which is then critical (RFC 5280 4.2.1.6).
                .subject_name(x509.Name([]))
                .issuer_name(ca_cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(max(now - _BACKDATE, ca_cert.not_valid_before_utc))
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(cert_sign=False, key_encipherment=isinstance(public_key, rsa.RSAPublicKey)),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: float,
                 now: datetime.datetime | None = None) -> x509.Certificate:
        """Sign ``csr_pem`` for ``spiffe_id`` — the identity the caller proved, which must be
        the CSR's one and only name. Raises IssuerError (400 / 403)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise IssuerError(400, f"csr: not a PEM certificate request ({exc})", "bad_csr") from None
        if not csr.is_signature_valid:
            raise IssuerError(400, "csr: the signature does not verify (not made with the key it carries)", "bad_csr")
        _check_public_key(csr.public_key())
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise IssuerError(400, f"csr: no subjectAltName; it must ask for {spiffe_id}", "bad_csr") from None
        names = [str(getattr(n, "value", n)) for n in san]
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris != [spiffe_id.uri] or len(names) != 1:
            raise IssuerError(403, f"csr asks for {', '.join(names) or 'nothing'}; the token proves {spiffe_id} "
                              "and only that identity is issued", "identity_mismatch")
        return self.issue(spiffe_id, csr.public_key(), ttl, now)

    def serving_credentials(self, dns_names: Sequence[str], ips: Sequence[str]) -> tuple[bytes, bytes]:
        """A TLS server certificate for the issuer itself (chain PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = utcnow()
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        ca_cert = self.chain[0]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(dns_names) + list(ips) + ["issuer"])[0])]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(min(now + _SERVING_TTL, ca_cert.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(cert_sign=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.chain_pem()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return chain, key_pem


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------------------------
# TokenReview


@dataclass(frozen=True, slots=True)
class ReviewResult:
    namespace: str
    service_account: str
    pod: str | None          # the pod a bound token belongs to, when the API server says


class TokenReviewer:
    """Asks the API server who a bearer token belongs to (blocking; run it in a thread)."""

    def __init__(self, cfg: KubeConfig, audiences: Sequence[str] = (), timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.audiences = tuple(audiences)
        self.timeout = timeout
        self._ctx = cfg.ssl_context()

    def review(self, token: str) -> ReviewResult:
        spec: dict = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Host": self.cfg.host_header}
        auth = self.cfg.auth_header()
        if auth:
            headers["Authorization"] = auth
        if self._ctx is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.cfg.host, self.cfg.port, context=self._ctx, timeout=self.timeout)
        else:
            conn = http.client.HTTPConnection(self.cfg.host, self.cfg.port, timeout=self.timeout)
        try:
            conn.request("POST", self.cfg.path_prefix + "/apis/authentication.k8s.io/v1/tokenreviews", body, headers)
            resp = conn.getresponse()
            raw = resp.read(1 << 20)
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            raise IssuerError(503, f"the API server could not be asked about the token: {exc}", "apiserver_error") from None
        finally:
            conn.close()
        if resp.status not in (200, 201):
            raise IssuerError(503, f"TokenReview: HTTP {resp.status} from the API server "
                              f"(does the issuer's ServiceAccount may create tokenreviews?)", "apiserver_error")
        try:
            status = json.loads(raw).get("status") or {}
        except ValueError:
            raise IssuerError(503, "TokenReview: the API server's answer is not JSON", "apiserver_error") from None
        if not status.get("authenticated"):
            raise IssuerError(401, f"token not accepted: {status.get('error') or 'not authenticated'}", "bad_token")
        if self.audiences and not set(status.get("audiences") or ()) & set(self.audiences):
            raise IssuerError(401, "token not accepted: not issued for this audience", "bad_token")
        user = status.get("user") or {}
        username = user.get("username") or ""
        if not username.startswith(_SA_PREFIX) or username.count(":") != 3:
            raise IssuerError(401, f"token of {username!r} is not a ServiceAccount's", "bad_token")
        ns, sa = username[len(_SA_PREFIX):].split(":")
        pods = (user.get("extra") or {}).get("authentication.kubernetes.io/pod-name") or []
        return ReviewResult(ns, sa, pods[0] if pods else None)


# --------------------------------------------------------------------------------------------
# The HTTP server


class IssuerServer:
    def __init__(self, ca: CertificateAuthority, reviewer: TokenReviewer, *, ttl: float = DEFAULT_SVID_TTL,
                 host: str = "127.0.0.1", port: int = 0, dns_names: Sequence[str] = ()) -> None:
        self.ca = ca
        self.reviewer = reviewer
        self.ttl = ttl
        self.host, self.port = host, port
        self.dns_names = tuple(dns_names)
        self._server: asyncio.base_events.Server | None = None
        self._ctx: ssl.SSLContext | None = None
        self._renew: asyncio.Task | None = None

    def _load_serving(self) -> None:
        ips = []
        try:
            if not ipaddress.ip_address(self.host).is_unspecified:
                ips.append(self.host)
        except ValueError:
            pass
        chain, key = self.ca.serving_credentials(self.dns_names or ("localhost",), ips)
        assert self._ctx is not None
        # Loading into the same context: handshakes from now on present the new certificate.
        load_cert_chain(self._ctx, chain, key)

    async def start(self) -> None:
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx.set_alpn_protocols(["http/1.1"])
        self._load_serving()
        sock = listen(self.host, self.port, 128)
        self._server = await asyncio.start_server(self._handle, sock=sock, ssl=self._ctx)
        self.port = sock.getsockname()[1]
        self._renew = asyncio.get_running_loop().create_task(self._renew_serving())

    async def _renew_serving(self) -> None:
        while True:
            await asyncio.sleep(_SERVING_TTL.total_seconds() / 3)
            self._load_serving()

    async def close(self) -> None:
        if self._renew is not None:
            self._renew.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def issue(self, token: str, csr_pem: bytes) -> dict:
        if not token:
            raise IssuerError(401, "no bearer token", "bad_token")
        review = await asyncio.to_thread(self.reviewer.review, token)
        try:
            sid = SpiffeId.for_service_account(self.ca.trust_domain, review.namespace, review.service_account)
        except IdentityError as exc:
            raise IssuerError(403, f"no SPIFFE ID for {review.namespace}/{review.service_account}: {exc}", "bad_token") from None
        cert = self.ca.sign_csr(csr_pem, sid, self.ttl)
        chain = cert.public_bytes(serialization.Encoding.PEM) + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.ca.chain[:-1])
        log.info("issued %s serial %x until %s%s", sid, cert.serial_number, iso8601(cert.not_valid_after_utc),
                 f" (pod {review.namespace}/{review.pod})" if review.pod else "")
        return {"spiffe_id": sid.uri, "serial": format(cert.serial_number, "x"),
                "not_after": iso8601(cert.not_valid_after_utc),
                "svid": chain.decode(), "bundle": self.ca.bundle_pem.decode()}

    async def _answer(self, req: h11.Request, body: bytes) -> tuple[int, str, bytes]:
        path = req.target.split(b"?", 1)[0]
        if path == b"/healthz" and req.method in (b"GET", b"HEAD"):
            return 200, "text/plain", b"ok\n"
        if path == b"/v1/bundle" and req.method in (b"GET", b"HEAD"):
            return 200, "application/x-pem-file", self.ca.bundle_pem
        if path != b"/v1/svid":
            return 404, "application/json", b'{"error": "not found: POST /v1/svid, GET /v1/bundle"}\n'
        if req.method != b"POST":
            return 405, "application/json", b'{"error": "POST a CSR"}\n'
        token = ""
        for name, value in req.headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip().decode("ascii", "replace")
        try:
            try:
                doc = json.loads(body)
                csr = doc["csr"].encode()
            except (ValueError, KeyError, TypeError, AttributeError):
                raise IssuerError(400, 'the body must be JSON {"csr": "<PEM certificate request>"}', "bad_request") from None
            answer = await self.issue(token, csr)
        except IssuerError as exc:
            metrics.issuer_requests.labels(exc.result).inc()
            log.warning("refused a certificate request (%d): %s", exc.status, exc)
            return exc.status, "application/json", json.dumps({"error": str(exc)}).encode() + b"\n"
        metrics.issuer_requests.labels("issued").inc()
        return 200, "application/json", json.dumps(answer).encode() + b"\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_BODY)
        try:
            req: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), _READ_TIMEOUT)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    req, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > _MAX_BODY:
                        raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
                elif isinstance(event, h11.EndOfMessage) and req is not None:
                    status, ctype, payload = await self._answer(req, bytes(body))
                    writer.write(conn.send(h11.Response(status_code=status, headers=[
                        ("content-type", ctype), ("content-length", str(len(payload)))])))
                    if req.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=payload)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE:
                        break
                    conn.start_next_cycle()
                    req = None
                else:        # ConnectionClosed, PAUSED
                    break
        except h11.RemoteProtocolError as exc:
            try:
                msg = json.dumps({"error": f"bad request: {exc}"}).encode()
                writer.write(conn.send(h11.Response(status_code=exc.error_status_hint, headers=[
                    ("content-length", str(len(msg))), ("connection", "close")])))
                writer.write(conn.send(h11.Data(data=msg)))
                writer.write(conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
        # The client went away, timed out, or broke TLS: nothing to answer.
        except (asyncio.TimeoutError, ConnectionError, OSError, ssl.SSLError, h11.LocalProtocolError):
            pass
        except Exception:   # one bad request must never take the issuer down
            log.exception("issuer request failed")
        finally:
            writer.close()


def serve_issuer(args) -> int:
    """``meshproxy identity serve``: returns the exit status."""
    try:
        extra = b""
        if args.trust_bundle:
            with open(args.trust_bundle, "rb") as f:
                extra = f.read()
        ca = CertificateAuthority.from_dir(args.ca_dir, args.trust_domain, extra)
        cfg = load_config(args.kubeconfig, args.context)
        reviewer = TokenReviewer(cfg, args.token_audience or ())
    except (IdentityError, KubeConfigError, OSError) as exc:
        print(f"meshproxy identity serve: {exc}", file=sys.stderr)
        return 2
    host, port = args.listen

    async def main() -> int:
        server = IssuerServer(ca, reviewer, ttl=args.ttl, host=host, port=port, dns_names=args.dns_name or ())
        await server.start()
        admin = AdminServer(*args.admin_listen, is_ready=lambda: True, snapshot_json=lambda: None)
        await admin.start()
        log.info("issuer for trust domain %s on %s:%d (SVIDs for %s), CA serial %x, %d root(s) in the bundle; admin on %s:%d",
                 ca.trust_domain, host, server.port, _duration(args.ttl), ca.chain[0].serial_number,
                 len(ca.roots), args.admin_listen[0], admin.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.close()
        await admin.close()
        return 0

    try:
        return asyncio.run(main())
    except OSError as exc:
        print(f"meshproxy identity serve: {exc}", file=sys.stderr)
        return 1


def init_ca(args) -> int:
    """``meshproxy identity init-ca``: a new root in ``--ca-dir`` (refuses to overwrite one)."""
    for name in ("ca.pem", "ca_key.pem"):
        if os.path.exists(os.path.join(args.ca_dir, name)):
            print(f"meshproxy identity init-ca: {os.path.join(args.ca_dir, name)} exists; not overwriting a CA",
                  file=sys.stderr)
            return 1
    try:
        ca = CertificateAuthority.from_dir(args.ca_dir, args.trust_domain)
    except (IdentityError, OSError) as exc:
        print(f"meshproxy identity init-ca: {exc}", file=sys.stderr)
        return 1
    cert = ca.chain[0]
    print(f"{args.ca_dir}/ca.pem: root CA for {args.trust_domain}, serial {cert.serial_number:x}, "
          f"valid until {iso8601(cert.not_valid_after_utc)}; {args.ca_dir}/ca_key.pem: its key (0600)")
    return 0


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
