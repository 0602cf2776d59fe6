"""``meshproxy identity serve`` against a real kube-apiserver (scripts/kube-apiserver.sh): tokens
come from the TokenRequest API, the issuer asks the API server about them with TokenReviews, and a
real ``meshproxy run --identity-issuer`` gets and renews its SVID from it.

Runs where the cached kube-apiserver binary exists; skips with the reason elsewhere, and fails
in CI (an acceptance point of the mesh: the issuer refuses a CSR with a bad token)."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from proc import ROOT, Meshproxy, free_port, http_get, wait_for
from conftest import unavailable

from meshproxy.core.identity import SpiffeId, load_svid, make_csr

AUDIENCE = "meshproxy-issuer"
TD = "cluster.local"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api():
    from test_kube_apiserver import BINARY, ApiServer
    if not os.path.exists(BINARY):
        unavailable(f"no kube-apiserver binary at {BINARY}: build it once with `scripts/kube-apiserver.sh build`")
    directory = tempfile.mkdtemp(prefix="meshproxy-issuer-kube-")
    server = ApiServer(directory)
    server.start()
    try:
        for ns in ("shop", "other"):
            server.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for ns, sa in (("shop", "web"), ("shop", "db"), ("shop", "gone")):
            server.create(f"/api/v1/namespaces/{ns}/serviceaccounts",
                          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}})
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def token(api, ns: str, sa: str, audience: str = AUDIENCE) -> str:
    doc = api.create(f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [audience], "expirationSeconds": 3600}})
    return doc["status"]["token"]


class Issuer:
    def __init__(self, api, ca_dir: str, *extra: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.ca_dir = ca_dir
        self.log = tempfile.NamedTemporaryFile(prefix="meshproxy-issuer-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "identity", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--admin-listen", f"127.0.0.1:{self.admin_port}", "--ca-dir", ca_dir, "--kubeconfig", api.kubeconfig,
             "--token-audience", AUDIENCE, "--trust-domain", TD, *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._up, timeout=20, what="the issuer's admin port")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"issuer exited {self.proc.returncode}: {self.output()}")
        try:
            return http_get(f"http://127.0.0.1:{self.admin_port}/healthz", 1)[0] == 200
        except OSError:
            return False

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=os.path.join(self.ca_dir, "ca.pem"))

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(), timeout=10)
        try:
            conn.request(method, path, body, headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def request(self, tok: str | None, csr_pem: bytes) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        st, body = self.call("POST", "/v1/svid", json.dumps({"csr": csr_pem.decode()}).encode(), headers)
        return st, json.loads(body)

    def metric(self, result: str) -> float:
        text = http_get(f"http://127.0.0.1:{self.admin_port}/metrics")[1].decode()
        for line in text.splitlines():
            if line.startswith(f'meshproxy_issuer_requests_total{{result="{result}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def issuer(api):
    d = tempfile.mkdtemp(prefix="meshproxy-ca-")
    iss = Issuer(api, os.path.join(d, "ca"), "--ttl", "1h")
    try:
        yield iss
    finally:
        iss.stop()
        shutil.rmtree(d, ignore_errors=True)


def sid(ns: str, sa: str, td: str = TD) -> SpiffeId:
    return SpiffeId.for_service_account(td, ns, sa)


def test_issues_exactly_the_tokens_identity(api, issuer):
    key, csr = make_csr(sid("shop", "web"))
    st, doc = issuer.request(token(api, "shop", "web"), csr)
    assert st == 200, doc
    svid = load_svid(doc["svid"].encode(), key, doc["bundle"].encode(), trust_domain=TD)
    assert svid.spiffe_id == sid("shop", "web") and doc["spiffe_id"] == svid.spiffe_id.uri
    assert doc["serial"] == svid.serial
    life = svid.not_after - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=55) < life <= datetime.timedelta(hours=1)
    # The CA generated in --ca-dir is what the bundle holds, and the key stayed here.
    with open(os.path.join(issuer.ca_dir, "ca.pem"), "rb") as f:
        assert x509.load_pem_x509_certificate(f.read()) == svid.bundle[0]
    assert oct(os.stat(os.path.join(issuer.ca_dir, "ca_key.pem")).st_mode & 0o777) == "0o600"
    st, bundle = issuer.call("GET", "/v1/bundle")
    assert st == 200 and bundle == doc["bundle"].encode()


@pytest.mark.parametrize("case", ["garbage", "none", "other audience", "deleted account"])
def test_bad_tokens_are_refused(api, issuer, case):
    _, csr = make_csr(sid("shop", "gone" if case == "deleted account" else "web"))
    before = issuer.metric("bad_token")
    if case == "garbage":
        tok = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6c2hvcDp3ZWIifQ.c2ln"
    elif case == "none":
        tok = None
    elif case == "other audience":
        tok = token(api, "shop", "web", audience="something-else")
    else:
        tok = token(api, "shop", "gone")
        api.delete("/api/v1/namespaces/shop/serviceaccounts/gone")
    st, doc = issuer.request(tok, csr)
    assert st == 401, doc
    assert "token" in doc["error"]
    assert issuer.metric("bad_token") == before + 1


@pytest.mark.parametrize("case,status", [
    ("another account", 403), ("another trust domain", 403), ("an extra DNS name", 403),
    ("not a CSR", 400), ("not JSON", 400),
])
def test_csr_must_ask_for_the_tokens_identity(api, issuer, case, status):
    tok = token(api, "shop", "web")
    if case == "another account":
        _, csr = make_csr(sid("shop", "db"))
    elif case == "another trust domain":
        _, csr = make_csr(sid("shop", "web", td="evil.example"))
    elif case == "an extra DNS name":
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid("shop", "web").uri),
                                                           x509.DNSName("web.shop.svc")]), critical=True)
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    elif case == "not a CSR":
        csr = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    else:
        st, body = issuer.call("POST", "/v1/svid", b"csr=1", {"Authorization": f"Bearer {tok}"})
        assert st == status, body
        return
    st, doc = issuer.request(tok, csr)
    assert st == status, doc
    if status == 403:
        assert "spiffe://cluster.local/ns/shop/sa/web" in doc["error"]
        assert issuer.metric("identity_mismatch") >= 1


def test_ca_rotation_hands_out_both_roots(api, tmp_path, issuer):
    # Second phase of a rotation: sign with the new CA, keep the old root in the bundle.
    old_ca = os.path.join(issuer.ca_dir, "ca.pem")
    new = Issuer(api, str(tmp_path / "new-ca"), "--trust-bundle", old_ca)
    try:
        key, csr = make_csr(sid("shop", "web"))
        st, doc = new.request(token(api, "shop", "web"), csr)
        assert st == 200, doc
        svid = load_svid(doc["svid"].encode(), key, doc["bundle"].encode(), trust_domain=TD)
        assert len(svid.bundle) == 2
        with open(old_ca, "rb") as f:
            assert x509.load_pem_x509_certificate(f.read()) in svid.bundle
        # SVIDs of the old CA still verify against the new bundle.
        key2, csr2 = make_csr(sid("shop", "web"))
        st, doc2 = issuer.request(token(api, "shop", "web"), csr2)
        assert st == 200
        load_svid(doc2["svid"].encode(), key2, doc["bundle"].encode(), trust_domain=TD)
    finally:
        new.stop()


def test_sidecar_gets_and_renews_its_identity(api, tmp_path):
    iss = Issuer(api, str(tmp_path / "ca"), "--ttl", "4s")
    tok = tmp_path / "token"
    tok.write_text(token(api, "shop", "web"))
    manifest = tmp_path / "m.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: None, ports: [{port: 80}]}\n")
    mp = Meshproxy([str(manifest)], "--no-health-checks", "--identity-issuer", iss.url,
                   "--identity-issuer-ca", os.path.join(iss.ca_dir, "ca.pem"), "--identity-token-file", str(tok),
                   env={"POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "web", "POD_NAME": "web-1"})
    try:
        mp.start(timeout=30)
        first = json.loads(http_get(mp.admin + "/debug/identity")[1])
        assert first["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/web"
        assert first["source"] == f"issuer:{iss.url}"
        # 4 s certificates are renewed at half-life: two new serials well within their lives.
        seen = {first["serial"]}

        def renewed_twice() -> bool:
            seen.add(json.loads(http_get(mp.admin + "/debug/identity")[1])["serial"])
            return len(seen) >= 3
        wait_for(renewed_twice, timeout=20, interval=0.2, what="two renewals")
        assert iss.metric("issued") >= 3
        assert "renewal failed" not in mp.output()
    finally:
        mp.__exit__(None, None, None)
        iss.stop()


def test_sidecar_with_a_bad_token_gets_nothing_and_says_why(api, tmp_path, issuer):
    tok = tmp_path / "token"
    tok.write_text("not-a-token")
    manifest = tmp_path / "m.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: None, ports: [{port: 80}]}\n")
    mp = Meshproxy([str(manifest)], "--no-health-checks", "--identity-issuer", issuer.url,
                   "--identity-issuer-ca", os.path.join(issuer.ca_dir, "ca.pem"), "--identity-token-file", str(tok),
                   env={"POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "web"})
    try:
        mp.start(wait=False)
        wait_for(lambda: "HTTP 401" in mp.output(), timeout=20, what="the refusal in the sidecar's log")
        assert http_get(mp.admin + "/readyz")[0] == 503
        assert http_get(mp.admin + "/debug/identity")[0] == 503
    finally:
        mp.__exit__(None, None, None)
