"""Where the workload's SVID comes from: a watched folder, or meshproxy's issuer.

``IdentityDirSource`` (``--identity-dir DIR``) reads ``svid.pem`` (the certificate chain, leaf
first), ``svid_key.pem`` and ``bundle.pem`` — the layout spiffe-helper writes — and watches
them. Writers replace the three files one after another, so for a moment the folder may hold a
new certificate with the old key: such a state fails ``load_svid`` (the key does not match the
leaf) and is ignored, the identity in force stays, and the folder is read again on the next
change until it is consistent. Polling the three files' stats every ``poll_interval`` (0.5 s)
costs three ``stat`` calls; it also sees a Kubernetes Secret volume's symlink swap, which an
inotify watch on the files themselves would miss.

``IssuerClient`` (``--identity-issuer URL``) makes a key and a CSR for the pod's own SPIFFE ID
(from ``POD_NAMESPACE`` / ``SERVICE_ACCOUNT``, else the token's subject), sends the CSR with the
ServiceAccount token to ``meshproxy identity serve``, and puts the answer in force; it renews
at half of the certificate's remaining life and retries failures with a capped backoff while
the current certificate is still valid.

Invariants: only ``IdentityStore.update`` changes the identity in force, and only with an SVID
that ``load_svid`` accepted (complete, consistent, valid now, chaining to its bundle, in our
trust domain — and, from the issuer, exactly the identity asked for).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import json
import logging
import os
import ssl
from typing import Callable
from urllib.parse import urlsplit

from .core import metrics
from .core.identity import IdentityError, IdentityStore, SpiffeId, Svid, iso8601, load_svid, make_csr, utcnow

__all__ = ["IdentityDirSource", "IssuerClient", "DEFAULT_TOKEN_PATH", "own_identity", "FILES"]

log = logging.getLogger("meshproxy.identity")

FILES = ("svid.pem", "svid_key.pem", "bundle.pem")
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class IdentityDirSource:
    def __init__(self, directory: str, store: IdentityStore, poll_interval: float = 0.5,
                 clock: Callable[[], datetime.datetime] = utcnow) -> None:
        self.directory = directory
        self.store = store
        self.poll_interval = poll_interval
        self.clock = clock
        self._signature: tuple | None = None
        self._pending = True            # the folder must be (re)read
        self._last_error: str | None = None
        self._warned_expiry: str | None = None
        self._task: asyncio.Task | None = None

    @property
    def source(self) -> str:
        return f"files:{self.directory}"

    def _stat(self) -> tuple:
        out = []
        for name in FILES:
            try:
                st = os.stat(os.path.join(self.directory, name))
                out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def check(self) -> Svid | None:
        """Read the folder if it changed (or the last read was refused); put a new, good SVID
        in force. Returns that SVID, else None."""
        sig = self._stat()
        if sig != self._signature:
            self._signature = sig
            self._pending = True
        self._watch_expiry()
        if not self._pending:
            return None
        try:
            parts = []
            for name in FILES:
                with open(os.path.join(self.directory, name), "rb") as f:
                    parts.append(f.read())
        except OSError as exc:
            self._refuse(f"cannot read {exc.filename or self.directory}: {exc.strerror or exc}")
            return None
        cur = self.store.current
        if cur is not None and (cur.svid.chain_pem, cur.svid.key_pem, cur.svid.bundle_pem) == tuple(parts):
            self._pending = False
            return None
        try:
            svid = load_svid(*parts, trust_domain=self.store.trust_domain, now=self.clock())
            self.store.update(svid, self.source)
        except IdentityError as exc:
            self._refuse(str(exc))
            return None
        self._pending = False
        self._last_error = None
        log.info("identity %s in force from %s: serial %s, valid until %s", svid.spiffe_id, self.directory,
                 svid.serial, iso8601(svid.not_after))
        return svid

    def _refuse(self, message: str) -> None:
        # Retried on every poll until the folder is consistent; logged once per distinct problem.
        if message != self._last_error:
            self._last_error = message
            cur = self.store.current
            keeping = (f"keeping {cur.svid.spiffe_id} serial {cur.svid.serial}" if cur is not None
                       else "no identity in force yet")
            log.warning("identity dir %s: %s; %s", self.directory, message, keeping)
            metrics.identity_updates.labels("files", "error").inc()

    def _watch_expiry(self) -> None:
        cur = self.store.current
        if cur is not None and self.clock() > cur.svid.not_after and self._warned_expiry != cur.svid.serial:
            self._warned_expiry = cur.svid.serial
            log.error("identity %s (serial %s) expired at %s and %s holds nothing newer: peers will refuse it",
                      cur.svid.spiffe_id, cur.svid.serial, iso8601(cur.svid.not_after), self.directory)

    def start(self) -> None:
        self.check()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check()
            except Exception:   # a bug here must not end the watch
                log.exception("identity dir %s: check failed", self.directory)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


# --------------------------------------------------------------------------------------------
# The issuer client


def _token_subject(token: str) -> tuple[str, str] | None:
    """(namespace, account) from a ServiceAccount JWT's ``sub`` (read, not verified: the issuer
    verifies; this only says which identity to ask for)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        sub = claims.get("sub", "")
    except (IndexError, ValueError, AttributeError):
        return None
    prefix = "system:serviceaccount:"
    if isinstance(sub, str) and sub.startswith(prefix) and sub.count(":") == 3:
        ns, sa = sub[len(prefix):].split(":")
        return ns, sa
    return None


def own_identity(trust_domain: str, token: str, env: dict[str, str] | None = None) -> SpiffeId:
    """The pod's SPIFFE ID: ``POD_NAMESPACE`` + ``SERVICE_ACCOUNT`` (downward API), else the
    token's subject. Raises IdentityError when neither says."""
    env = os.environ if env is None else env
    ns, sa = env.get("POD_NAMESPACE"), env.get("SERVICE_ACCOUNT")
    if not (ns and sa):
        sub = _token_subject(token)
        if sub is None:
            raise IdentityError("cannot tell this pod's ServiceAccount: set POD_NAMESPACE and SERVICE_ACCOUNT "
                                "(downward API) or use a ServiceAccount token")
        ns, sa = ns or sub[0], sa or sub[1]
    return SpiffeId.for_service_account(trust_domain, ns, sa)


class IssuerClient:
    def __init__(self, url: str, store: IdentityStore, *, token_path: str = DEFAULT_TOKEN_PATH,
                 ca_pem: bytes = b"", env: dict[str, str] | None = None, timeout: float = 10.0,
                 max_backoff: float = 30.0) -> None:
        u = urlsplit(url)
        if u.scheme != "https" or not u.hostname:
            raise IdentityError(f"--identity-issuer {url!r}: expected https://HOST[:PORT]")
        self.url = url
        self.host, self.port, self.prefix = u.hostname, u.port or 443, u.path.rstrip("/")
        self.store = store
        self.token_path = token_path
        self.ca_pem = ca_pem          # what verifies the issuer before any bundle was received
        self.env = env
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._task: asyncio.Task | None = None
        self.failures = 0

    @property
    def source(self) -> str:
        return f"issuer:{self.url}"

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        roots = self.ca_pem
        cur = self.store.current
        if cur is not None:
            # The bundle we were last given: after a CA rotation the issuer's own certificate
            # is signed by a CA the configured file may not hold yet.
            roots += b"\n" + cur.svid.bundle_pem
        if not roots.strip():
            raise IdentityError("no CA to verify the issuer with: give --identity-issuer-ca FILE")
        ctx.load_verify_locations(cadata=roots.decode("ascii", "replace"))
        return ctx

    def fetch(self) -> Svid:
        """One request: new key, CSR, POST, checked answer (blocking; run in a thread)."""
        try:
            with open(self.token_path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise IdentityError(f"cannot read the ServiceAccount token {self.token_path}: {exc.strerror or exc}") from None
        sid = own_identity(self.store.trust_domain, token, self.env)
        key_pem, csr_pem = make_csr(sid)
        body = json.dumps({"csr": csr_pem.decode()}).encode()
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._context(), timeout=self.timeout)
        try:
            conn.request("POST", self.prefix + "/v1/svid", body, {
                "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            raw = resp.read(1 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise IdentityError(f"issuer {self.url}: {exc}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise IdentityError(f"issuer {self.url}: HTTP {resp.status}, not JSON") from None
        if resp.status != 200:
            raise IdentityError(f"issuer {self.url} refused {sid}: HTTP {resp.status}: {doc.get('error', doc)}")
        try:
            svid = load_svid(doc["svid"].encode(), key_pem, doc["bundle"].encode(), trust_domain=self.store.trust_domain)
        except (KeyError, AttributeError):
            raise IdentityError(f"issuer {self.url}: the answer lacks svid / bundle") from None
        if svid.spiffe_id != sid:
            raise IdentityError(f"issuer {self.url} answered {svid.spiffe_id}, asked for {sid}")
        return svid

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def backoff(self) -> float:
        return min(self.max_backoff, 0.5 * 2 ** min(self.failures, 10))

    def next_delay(self, svid: Svid, received: datetime.datetime, now: datetime.datetime) -> float:
        return max(0.0, (svid.renew_at(received) - now).total_seconds())

    async def _run(self) -> None:
        while True:
            try:
                received = utcnow()
                svid = await asyncio.to_thread(self.fetch)
                self.store.update(svid, self.source)
                self.failures = 0
                delay = self.next_delay(svid, received, utcnow())
                log.info("identity %s from %s: serial %s, valid until %s; renewing in %.0f s", svid.spiffe_id,
                         self.url, svid.serial, iso8601(svid.not_after), delay)
            except IdentityError as exc:
                self.failures += 1
                delay = self.backoff()
                cur = self.store.current
                left = f"current one valid until {iso8601(cur.svid.not_after)}" if cur else "no identity yet"
                log.warning("identity renewal failed (%d in a row): %s; %s; retrying in %.1f s",
                            self.failures, exc, left, delay)
                metrics.identity_updates.labels("issuer", "error").inc()
            except Exception:     # a bug must not end renewals
                self.failures += 1
                delay = self.backoff()
                log.exception("identity renewal failed")
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
