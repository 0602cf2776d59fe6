"""Workload identity: SPIFFE IDs (table), SVID checks (table of broken material), mutual TLS 1.3
between two contexts over real sockets (the peer's SPIFFE ID, a foreign CA refused, rotation that
keeps open connections), the watched --identity-dir (a half-replaced identity is ignored until
consistent) and GET /debug/identity of a real meshproxy process."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from proc import Meshproxy, http_get, wait_for

from meshproxy.cli import build_parser
from meshproxy.core.identity import (IdentityError, IdentityStore, SpiffeId, is_tls_client_hello,
                                     load_svid, make_csr, peer_identity, xfcc_value)
from meshproxy.identity_sources import IdentityDirSource, own_identity
from meshproxy.issuer import CertificateAuthority

TD = "cluster.local"
NOW = datetime.datetime.now(datetime.timezone.utc)
PEM = serialization.Encoding.PEM


# --------------------------------------------------------------------------------------------
# SPIFFE IDs

@pytest.mark.parametrize("text,td,path", [
    ("spiffe://cluster.local/ns/default/sa/web", "cluster.local", "/ns/default/sa/web"),
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://a-b_c.d/x.y/z_1-2", "a-b_c.d", "/x.y/z_1-2"),
    ("spiffe://td/ns/n/sa/Upper.Case", "td", "/ns/n/sa/Upper.Case"),
])
def test_spiffe_id_parses(text, td, path):
    sid = SpiffeId.parse(text)
    assert (sid.trust_domain, sid.path) == (td, path)
    assert str(sid) == text


@pytest.mark.parametrize("text,message", [
    ("http://cluster.local/ns/a/sa/b", "scheme must be 'spiffe'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme must be 'spiffe'"),
    ("spiffe:/cluster.local", "not a SPIFFE ID"),
    ("cluster.local/ns/a/sa/b", "not a SPIFFE ID"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe:///ns/a", "trust domain is empty"),
    ("spiffe://Cluster.Local/ns/a", "only lowercase letters"),
    ("spiffe://cluster.local:8080/ns/a", "may not carry a port"),
    ("spiffe://user@cluster.local/ns/a", "may not carry user info"),
    ("spiffe://cluster.local/", "may not end with '/'"),
    ("spiffe://cluster.local/ns//sa", "empty segments"),
    ("spiffe://cluster.local/ns/a/", "empty segments"),
    ("spiffe://cluster.local/ns/./sa", "'.' or '..' segments"),
    ("spiffe://cluster.local/ns/../sa", "'.' or '..' segments"),
    ("spiffe://cluster.local/ns/a%20b", "'%' is not allowed"),
    ("spiffe://cluster.local/ns/a?x=1", "may not have a query"),
    ("spiffe://cluster.local/ns/a#f", "may not have a fragment"),
    ("spiffe://cluster.local/" + "a" * 2048, "longer than 2048"),
    ("spiffe://" + "a" * 256 + "/x", "longer than 255"),
])
def test_spiffe_id_refused(text, message):
    with pytest.raises(IdentityError, match=message.replace("?", r"\?").replace(".", r"\.").replace("(", r"\(")):
        SpiffeId.parse(text)


def test_service_account_identity_and_principal():
    sid = SpiffeId.for_service_account("cluster.local", "shop", "web")
    assert sid.uri == "spiffe://cluster.local/ns/shop/sa/web"
    assert sid.principal == "cluster.local/ns/shop/sa/web"
    assert (sid.namespace, sid.service_account) == ("shop", "web")
    assert SpiffeId.parse("spiffe://td/other/path").namespace is None


def test_own_identity_from_env_or_token():
    assert own_identity(TD, "x", {"POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "web"}).uri == \
        "spiffe://cluster.local/ns/shop/sa/web"
    import base64
    claims = base64.urlsafe_b64encode(json.dumps({"sub": "system:serviceaccount:db:pg"}).encode()).decode().rstrip("=")
    assert own_identity(TD, f"h.{claims}.s", {}).uri == "spiffe://cluster.local/ns/db/sa/pg"
    with pytest.raises(IdentityError, match="POD_NAMESPACE and SERVICE_ACCOUNT"):
        own_identity(TD, "not-a-jwt", {})


# --------------------------------------------------------------------------------------------
# SVID material

def pem(*certs) -> bytes:
    return b"".join(c.public_bytes(PEM) for c in certs)


def key_pem(key) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class Material:
    """A CA, optionally an intermediate, and SVIDs signed by them."""

    def __init__(self, td: str = TD, intermediate: bool = False, start=None) -> None:
        self.root = CertificateAuthority.generate(td, now=start)
        self.signer = CertificateAuthority.generate(td, parent=self.root, name="intermediate") if intermediate else self.root

    def svid(self, sa: str = "web", ns: str = "shop", ttl: float = 3600, now=None, td: str = TD):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.signer.issue(SpiffeId.for_service_account(td, ns, sa), key.public_key(), ttl, now)
        chain = pem(cert, *self.signer.chain[:-1])
        return chain, key_pem(key), self.root.bundle_pem


def test_good_svid_loads():
    m = Material()
    chain, key, bundle = m.svid()
    svid = load_svid(chain, key, bundle, trust_domain=TD)
    assert svid.spiffe_id.uri == "spiffe://cluster.local/ns/shop/sa/web"
    assert svid.serial == format(svid.leaf.serial_number, "x")
    j = svid.to_json()
    assert j["spiffe_id"] == svid.spiffe_id.uri and j["serial"] == svid.serial
    assert datetime.datetime.fromisoformat(j["not_after"]) == svid.not_after.replace(microsecond=0)


def test_chain_with_intermediates_loads():
    m = Material(intermediate=True)
    chain, key, bundle = m.svid()
    svid = load_svid(chain, key, bundle, trust_domain=TD)
    assert len(svid.chain) == 2 and len(svid.bundle) == 1
    # Without the intermediate the leaf does not reach the root.
    leaf_only = chain[: chain.index(b"-----END CERTIFICATE-----") + 26]
    with pytest.raises(IdentityError, match="does not chain"):
        load_svid(leaf_only, key, bundle)


def _custom_leaf(m: Material, *, uris=("spiffe://cluster.local/ns/shop/sa/web",), ca=False):
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(m.root.chain[0].subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - datetime.timedelta(minutes=1)).not_valid_after(NOW + datetime.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(m.root.key.public_key()), critical=False))
    if uris is not None:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris] or [x509.DNSName("web")]), critical=True)
    cert = b.sign(m.root.key, hashes.SHA256())
    return pem(cert), key_pem(key), m.root.bundle_pem


def _broken(kind: str):
    m, other = Material(), Material()
    chain, key, bundle = m.svid()
    if kind == "key of another certificate":
        return chain, m.svid()[1], bundle
    if kind == "foreign CA":
        return chain, key, other.root.bundle_pem
    if kind == "expired":
        return Material(start=NOW - datetime.timedelta(hours=3)).svid(ttl=60, now=NOW - datetime.timedelta(hours=2))
    if kind == "not yet valid":
        return m.svid(now=NOW + datetime.timedelta(hours=2))
    if kind == "other trust domain":
        td = Material(td="example.org")
        return td.svid(td="example.org")
    if kind == "two URIs":
        return _custom_leaf(m, uris=("spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d"))
    if kind == "no URI":
        return _custom_leaf(m, uris=())
    if kind == "not a SPIFFE URI":
        return _custom_leaf(m, uris=("https://web.shop",))
    if kind == "leaf is a CA":
        return _custom_leaf(m, ca=True)
    if kind == "garbage chain":
        return b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", key, bundle
    if kind == "empty chain":
        return b"", key, bundle
    if kind == "garbage key":
        return chain, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n", bundle
    if kind == "empty bundle":
        return chain, key, b""
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,message", [
    ("key of another certificate", "svid_key does not belong to the leaf"),
    ("foreign CA", "does not chain to the trust bundle"),
    ("expired", "svid expired at"),
    ("not yet valid", "svid is not valid before"),
    ("other trust domain", "not in the trust domain 'cluster.local'"),
    ("two URIs", "exactly one URI SAN, this one has 2"),
    ("no URI", "exactly one URI SAN, this one has 0"),
    ("not a SPIFFE URI", "scheme must be 'spiffe'"),
    ("leaf is a CA", "is a CA certificate"),
    ("garbage chain", "svid: not valid PEM"),
    ("empty chain", "svid: no PEM certificate"),
    ("garbage key", "svid_key: not a usable"),
    ("empty bundle", "bundle: no PEM certificate"),
])
def test_bad_svid_material_is_refused(kind, message):
    with pytest.raises(IdentityError, match=message):
        load_svid(*_broken(kind), trust_domain=TD)


def test_bundle_with_two_cas_accepts_both():
    old, new = Material(), Material()
    both = old.root.bundle_pem + new.root.bundle_pem
    for m in (old, new):
        chain, key, _ = m.svid()
        assert len(load_svid(chain, key, both, trust_domain=TD).bundle) == 2


def test_issued_svid_has_the_svid_shape():
    m = Material()
    chain, key, bundle = m.svid()
    leaf = x509.load_pem_x509_certificate(chain)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert leaf.not_valid_after_utc <= m.root.chain[0].not_valid_after_utc
    csr_key, csr = make_csr(SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"))
    parsed = x509.load_pem_x509_csr(csr)
    assert parsed.is_signature_valid and b"PRIVATE KEY" not in csr and b"PRIVATE KEY" in csr_key


# --------------------------------------------------------------------------------------------
# Mutual TLS over real sockets

class TlsServer:
    """Accepts on 127.0.0.1 with the store's server context at accept time; each connection
    answers "<own serial> <peer SPIFFE ID>\\n" and then echoes lines until closed."""

    def __init__(self, store: IdentityStore) -> None:
        self.store = store
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self.peers: list = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        tls = self.store.current            # read once per connection, as the data path will
        try:
            with tls.server.wrap_socket(raw, server_side=True) as s:
                peer = peer_identity(s, trust_domain=self.store.trust_domain)
                self.peers.append((peer, s.version()))
                s.sendall(f"{tls.svid.serial} {peer.spiffe_id}\n".encode())
                f = s.makefile("rb")
                for line in f:
                    s.sendall(line)
        except (ssl.SSLError, OSError, IdentityError) as exc:
            self.errors.append(str(exc))
            raw.close()

    def close(self) -> None:
        self.sock.close()


def store_with(m: Material, sa: str) -> IdentityStore:
    st = IdentityStore(TD)
    st.update(load_svid(*m.svid(sa), trust_domain=TD), "test")
    return st


def connect(ctx: ssl.SSLContext, port: int) -> tuple[ssl.SSLSocket, str]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s = ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise
    try:
        # TLS 1.3: a server that refuses the client certificate says so after the client's
        # handshake is done, at the first read.
        line = s.makefile("rb").readline().decode().strip()
        if not line:
            raise ConnectionError("closed by the server")
        return s, line
    except BaseException:
        s.close()
        raise


def test_mutual_tls_carries_both_identities():
    m = Material(intermediate=True)
    server_store, client_store = store_with(m, "db"), store_with(m, "web")
    srv = TlsServer(server_store)
    try:
        s, line = connect(client_store.client_context(), srv.port)
        with s:
            assert s.version() == "TLSv1.3"
            assert line == f"{server_store.current.svid.serial} spiffe://cluster.local/ns/shop/sa/web"
            peer = peer_identity(s, TD, expected=SpiffeId.for_service_account(TD, "shop", "db"))
            assert peer.spiffe_id.uri == "spiffe://cluster.local/ns/shop/sa/db"
            assert peer.hash == hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()
            with pytest.raises(IdentityError, match="expected spiffe://cluster.local/ns/shop/sa/other"):
                peer_identity(s, TD, expected=SpiffeId.for_service_account(TD, "shop", "other"))
        client_peer = srv.peers[0][0]
        assert xfcc_value(server_store.spiffe_id, client_peer) == (
            f"By=spiffe://cluster.local/ns/shop/sa/db;Hash={client_peer.hash};URI=spiffe://cluster.local/ns/shop/sa/web")
    finally:
        srv.close()


def test_foreign_ca_and_missing_client_certificate_are_refused():
    m, other = Material(), Material()
    srv = TlsServer(store_with(m, "db"))
    try:
        # The client trusts the server's CA but presents a certificate of a CA the server does
        # not trust: the server refuses it.
        chain, key, _ = other.svid("web")
        foreign = IdentityStore(TD)
        foreign.update(load_svid(chain, key, other.root.bundle_pem + m.root.bundle_pem, trust_domain=TD), "test")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            connect(foreign.client_context(), srv.port)
        wait_for(lambda: srv.errors, what="the server's refusal")
        assert "certificate verify failed" in srv.errors[0] or "CERTIFICATE_VERIFY_FAILED" in srv.errors[0], srv.errors
        # And the other way round: a client does not accept a server of a foreign CA.
        srv2 = TlsServer(store_with(other, "db"))
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                connect(store_with(m, "web").client_context(), srv2.port)
        finally:
            srv2.close()
        # A client without a certificate: the server requires one.
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        plain.check_hostname = False
        plain.verify_mode = ssl.CERT_NONE
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            connect(plain, srv.port)
        wait_for(lambda: len(srv.errors) >= 2, what="a second refusal")
    finally:
        srv.close()


def test_tls12_is_not_offered_between_sidecars():
    m = Material()
    srv = TlsServer(store_with(m, "db"))
    try:
        ctx = store_with(m, "web").client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            connect(ctx, srv.port)
    finally:
        srv.close()


def test_rotation_serves_new_connections_and_keeps_open_ones():
    m = Material()
    server_store, client_store = store_with(m, "db"), store_with(m, "web")
    srv = TlsServer(server_store)
    try:
        old, line = connect(client_store.client_context(), srv.port)
        first_serial = line.split()[0]
        version = server_store.current.version
        server_store.update(load_svid(*m.svid("db"), trust_domain=TD), "test")
        assert server_store.current.version == version + 1
        new, line2 = connect(client_store.client_context(), srv.port)
        assert line2.split()[0] == server_store.current.svid.serial != first_serial
        with old, new:
            # The connection made before the rotation still works, on its old certificate.
            old.sendall(b"still here\n")
            assert old.makefile("rb").readline() == b"still here\n"
            new.sendall(b"new\n")
            assert new.makefile("rb").readline() == b"new\n"
    finally:
        srv.close()


def test_store_refuses_svid_of_another_trust_domain():
    st = IdentityStore(TD)
    svid = load_svid(*Material(td="example.org").svid(td="example.org"))
    with pytest.raises(IdentityError, match="not in the trust domain"):
        st.update(svid, "test")
    assert st.current is None and st.to_json() is None


def test_tls_client_hello_sniff():
    assert is_tls_client_hello(b"\x16\x03\x01\x02\x00")
    assert not is_tls_client_hello(b"GET / HTTP/1.1\r\n")
    assert not is_tls_client_hello(b"\x16")


# --------------------------------------------------------------------------------------------
# --identity-dir

def write(directory: str, name: str, data: bytes) -> None:
    # As writers do it: a temporary file renamed into place (each file is whole, the set is not).
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(directory, name))


def write_all(directory: str, chain: bytes, key: bytes, bundle: bytes) -> None:
    write(directory, "bundle.pem", bundle)
    write(directory, "svid.pem", chain)
    write(directory, "svid_key.pem", key)


def test_identity_dir_ignores_a_half_replaced_identity(tmp_path, caplog):
    m = Material()
    d = str(tmp_path)
    store = IdentityStore(TD)
    src = IdentityDirSource(d, store)
    with caplog.at_level(logging.WARNING, logger="meshproxy.identity"):
        assert src.check() is None and store.current is None          # nothing there yet
        assert "cannot read" in caplog.text
        first = m.svid("web")
        write_all(d, *first)
        svid1 = src.check()
        assert svid1 is not None and store.current.svid is svid1
        assert src.check() is None                                    # unchanged: nothing to do
        second = m.svid("web")
        write(d, "svid.pem", second[0])                               # new certificate, old key
        caplog.clear()
        for _ in range(3):                                            # retried, logged once
            assert src.check() is None
        assert store.current.svid is svid1
        assert caplog.text.count("svid_key does not belong") == 1
        assert f"keeping spiffe://cluster.local/ns/shop/sa/web serial {svid1.serial}" in caplog.text
        write(d, "svid_key.pem", second[1])                           # now consistent
        svid2 = src.check()
        assert svid2 is not None and store.current.svid is svid2 and svid2.serial != svid1.serial


def test_identity_dir_keeps_last_good_over_garbage_and_expired(tmp_path):
    m = Material()
    d = str(tmp_path)
    store = IdentityStore(TD)
    src = IdentityDirSource(d, store)
    write_all(d, *m.svid())
    good = src.check()
    write(d, "bundle.pem", b"garbage")
    assert src.check() is None and store.current.svid is good
    write_all(d, *Material(start=NOW - datetime.timedelta(hours=3)).svid(ttl=60, now=NOW - datetime.timedelta(hours=1)))
    assert src.check() is None and store.current.svid is good


# --------------------------------------------------------------------------------------------
# A real process: GET /debug/identity follows the folder

MANIFEST = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: None, ports: [{port: 80}]}\n"


def test_debug_identity_of_a_running_proxy(tmp_path):
    m = Material(intermediate=True)
    ident = tmp_path / "identity"
    ident.mkdir()
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    mp = Meshproxy([str(manifest)], "--identity-dir", str(ident), "--no-health-checks")
    mp.start(wait=False)
    try:
        # No identity yet: not ready, and /debug/identity says so.
        wait_for(lambda: _status(mp, "/healthz") == 200, timeout=15, what="admin up")
        assert _status(mp, "/readyz") == 503
        assert _status(mp, "/debug/identity") == 503
        first = m.svid("web")
        write_all(str(ident), *first)
        mp.wait_ready()
        doc = _identity(mp)
        leaf = x509.load_pem_x509_certificate(first[0])
        assert doc["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/web"
        assert doc["serial"] == format(leaf.serial_number, "x")
        assert datetime.datetime.fromisoformat(doc["not_after"]) == leaf.not_valid_after_utc.replace(microsecond=0)
        # Half-replaced: the process says why it ignores it and keeps serving the old one.
        second = m.svid("web")
        write(str(ident), "svid.pem", second[0])
        wait_for(lambda: "svid_key does not belong" in mp.output(), timeout=10, what="the refusal in the log")
        assert _identity(mp)["serial"] == doc["serial"]
        write(str(ident), "svid_key.pem", second[1])
        new_serial = format(x509.load_pem_x509_certificate(second[0]).serial_number, "x")
        wait_for(lambda: _identity(mp)["serial"] == new_serial, timeout=10, what="the new serial")
        assert "meshproxy_identity_expiry_timestamp_seconds" in mp.metrics()
    finally:
        mp.__exit__(None, None, None)


def test_debug_identity_without_a_source_is_404(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    with Meshproxy([str(manifest)], "--no-health-checks") as mp:
        assert _status(mp, "/debug/identity") == 404


def _status(mp: Meshproxy, path: str) -> int:
    try:
        return http_get(mp.admin + path, 2)[0]
    except OSError:
        return 0


def _identity(mp: Meshproxy) -> dict:
    st, body = http_get(mp.admin + "/debug/identity")
    assert st == 200, body
    return json.loads(body)


def test_svids_live_24_hours_by_default():
    """`meshproxy identity serve` without --ttl issues 24 h SVIDs (the lifetime the mesh docs
    promise; renewal at half of it)."""
    args = build_parser().parse_args(["identity", "serve", "--ca-dir", "/nonexistent"])
    assert args.ttl == 24 * 3600
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)   # X.509 keeps whole seconds
    ca = CertificateAuthority.generate("cluster.local", now=now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(SpiffeId.for_service_account("cluster.local", "shop", "web"), key.public_key(), args.ttl, now=now)
    assert cert.not_valid_after_utc - now == datetime.timedelta(hours=24)
