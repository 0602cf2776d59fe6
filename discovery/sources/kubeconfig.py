"""Where the Kubernetes API server is and how to prove who we are: kubeconfig and in-cluster.

``load_kubeconfig(path, context)`` reads a kubeconfig file the way client-go does for the parts
meshproxy needs: ``clusters`` / ``users`` / ``contexts``, ``current-context`` (or ``--context``),
the cluster's ``server``, ``certificate-authority`` (file) or ``certificate-authority-data``,
``insecure-skip-tls-verify``, ``tls-server-name``, and the user's ``token`` / ``tokenFile``,
``client-certificate`` / ``client-key`` (files or ``-data``) and ``username`` / ``password``.
Relative file names are relative to the kubeconfig's folder (client-go's rule). Users that need
``exec`` or ``auth-provider`` plugins are refused with a message that says so: running a plugin
is more than a proxy should do implicitly.

``in_cluster_config(base)`` is a pod's view: ``KUBERNETES_SERVICE_HOST`` / ``_PORT`` and the
service-account files ``token``, ``ca.crt``, ``namespace`` under ``base``
(``/var/run/secrets/kubernetes.io/serviceaccount``).

``load_config(kubeconfig, context)`` picks: an explicit file, else in-cluster when the
environment says we run in a pod, else ``$KUBECONFIG`` (first file) or ``~/.kube/config``.

Tokens from files are re-read when older than ``TOKEN_REFRESH`` seconds: bound service-account
tokens are rotated by the kubelet (client-go re-reads them each minute too).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml

__all__ = [
    "SERVICEACCOUNT_DIR",
    "KubeConfig",
    "KubeConfigError",
    "in_cluster_available",
    "in_cluster_config",
    "load_config",
    "load_kubeconfig",
]

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REFRESH = 60.0


class KubeConfigError(Exception):
    """A kubeconfig / in-cluster problem, with the file and field in the message."""


@dataclass(slots=True)
class KubeConfig:
    server: str                              # https://host:port[/prefix]
    ca_file: str | None = None
    ca_data: bytes | None = None             # PEM
    insecure: bool = False
    tls_server_name: str | None = None
    token: str | None = None
    token_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    client_cert_data: bytes | None = None    # PEM
    client_key_data: bytes | None = None     # PEM
    username: str | None = None
    password: str | None = None
    namespace: str | None = None             # the context's / pod's namespace (informational)
    origin: str = ""                         # "kubeconfig PATH context NAME" or "in-cluster"
    _token_cache: tuple[float, str] | None = field(default=None, repr=False)

    # -- derived ------------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return urlsplit(self.server).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.server).hostname or ""

    @property
    def port(self) -> int:
        u = urlsplit(self.server)
        return u.port or (443 if u.scheme == "https" else 80)

    @property
    def path_prefix(self) -> str:
        """A server URL may carry a path (a proxy in front of the API server)."""
        return urlsplit(self.server).path.rstrip("/")

    @property
    def host_header(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def bearer_token(self) -> str | None:
        if self.token:
            return self.token
        if not self.token_file:
            return None
        now = time.monotonic()
        if self._token_cache is not None and now - self._token_cache[0] < TOKEN_REFRESH:
            return self._token_cache[1]
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            if self._token_cache is not None:
                return self._token_cache[1]   # keep the last one; the file is being rotated
            raise KubeConfigError(f"{self.origin}: cannot read token file {self.token_file}: {exc}") from None
        self._token_cache = (now, token)
        return token

    def auth_header(self) -> str | None:
        token = self.bearer_token()
        if token:
            return f"Bearer {token}"
        if self.username is not None and self.password is not None:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (None for a plain http:// server)."""
        if self.scheme != "https":
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            try:
                if self.ca_data is not None:
                    ctx.load_verify_locations(cadata=self.ca_data.decode("ascii", "replace"))
                elif self.ca_file is not None:
                    ctx.load_verify_locations(cafile=self.ca_file)
                # else: the system trust store (a public endpoint, e.g. a managed cluster's)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise KubeConfigError(f"{self.origin}: certificate authority: {exc}") from None
        if self.client_cert_file or self.client_cert_data:
            self._load_client_cert(ctx)
        return ctx

    def _load_client_cert(self, ctx: ssl.SSLContext) -> None:
        # ssl.load_cert_chain only reads files: -data goes to private 0600 temp files that
        # live exactly as long as the call.
        made: list[str] = []
        try:
            cert = self.client_cert_file
            key = self.client_key_file
            if self.client_cert_data is not None:
                cert = _private_temp(self.client_cert_data, made)
            if self.client_key_data is not None:
                key = _private_temp(self.client_key_data, made)
            if cert is None or key is None:
                raise KubeConfigError(f"{self.origin}: a client certificate needs both the certificate and the key")
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise KubeConfigError(f"{self.origin}: client certificate: {exc}") from None
        finally:
            for p in made:
                try:
                    os.unlink(p)
                except OSError:
                    pass

    def server_hostname(self) -> str | None:
        """SNI / the name the certificate is checked against."""
        return self.tls_server_name or self.host or None


def _private_temp(data: bytes, made: list[str]) -> str:
    fd, path = tempfile.mkstemp(prefix="meshproxy-kube-", suffix=".pem")  # mode 0600
    made.append(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------------------------
# kubeconfig files


def _named(doc: dict, section: str, name: str, path: str) -> dict:
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise KubeConfigError(f"{path}: {section}: must be a list")
    for e in entries:
        if isinstance(e, dict) and e.get("name") == name:
            inner = e.get(section[:-1])      # clusters -> cluster, users -> user, ...
            if inner is None:
                return {}
            if not isinstance(inner, dict):
                raise KubeConfigError(f"{path}: {section}[{name}].{section[:-1]}: must be a mapping")
            return inner
    raise KubeConfigError(f"{path}: {section}: no entry named {name!r}")


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise KubeConfigError(f"{where}: must be a base64 string")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KubeConfigError(f"{where}: is not valid base64") from None


def _file(value: object, base_dir: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise KubeConfigError(f"{where}: must be a file name")
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.join(base_dir, value)


def load_kubeconfig(path: str, context: str | None = None) -> KubeConfig:
    """Read one kubeconfig file; ``context`` overrides ``current-context``."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise KubeConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise KubeConfigError(f"{path}: not a kubeconfig (expected a mapping)")
    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeConfigError(f"{path}: no current-context set and no --context given")
    ctx = _named(doc, "contexts", ctx_name, path)
    where = f"{path}: context {ctx_name!r}"
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    if not cluster_name:
        raise KubeConfigError(f"{where}: names no cluster")
    cluster = _named(doc, "clusters", cluster_name, path)
    user = _named(doc, "users", user_name, path) if user_name else {}
    base_dir = os.path.dirname(os.path.abspath(path))
    cw = f"{path}: cluster {cluster_name!r}"
    uw = f"{path}: user {user_name!r}"

    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise KubeConfigError(f"{cw}: server: required field is missing")
    u = urlsplit(server)
    if u.scheme not in ("https", "http") or not u.hostname:
        raise KubeConfigError(f"{cw}: server: {server!r} is not an http(s) URL")
    cfg = KubeConfig(server=server, origin=f"kubeconfig {path} context {ctx_name}")
    ns = ctx.get("namespace")
    cfg.namespace = ns if isinstance(ns, str) and ns else None

    if cluster.get("certificate-authority-data") is not None:
        cfg.ca_data = _b64(cluster["certificate-authority-data"], f"{cw}: certificate-authority-data")
    elif cluster.get("certificate-authority") is not None:
        cfg.ca_file = _file(cluster["certificate-authority"], base_dir, f"{cw}: certificate-authority")
    cfg.insecure = cluster.get("insecure-skip-tls-verify") is True
    if isinstance(cluster.get("tls-server-name"), str):
        cfg.tls_server_name = cluster["tls-server-name"]

    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported) is not None:
            raise KubeConfigError(f"{uw}: {unsupported}: credential plugins are not supported; "
                                  "use a token, tokenFile or a client certificate")
    if user.get("token") is not None:
        if not isinstance(user["token"], str):
            raise KubeConfigError(f"{uw}: token: must be a string")
        cfg.token = user["token"].strip()
    elif user.get("tokenFile") is not None:
        cfg.token_file = _file(user["tokenFile"], base_dir, f"{uw}: tokenFile")
    if user.get("client-certificate-data") is not None:
        cfg.client_cert_data = _b64(user["client-certificate-data"], f"{uw}: client-certificate-data")
    elif user.get("client-certificate") is not None:
        cfg.client_cert_file = _file(user["client-certificate"], base_dir, f"{uw}: client-certificate")
    if user.get("client-key-data") is not None:
        cfg.client_key_data = _b64(user["client-key-data"], f"{uw}: client-key-data")
    elif user.get("client-key") is not None:
        cfg.client_key_file = _file(user["client-key"], base_dir, f"{uw}: client-key")
    has_cert = cfg.client_cert_data is not None or cfg.client_cert_file is not None
    has_key = cfg.client_key_data is not None or cfg.client_key_file is not None
    if has_cert != has_key:
        raise KubeConfigError(f"{uw}: client-certificate and client-key must be given together")
    if isinstance(user.get("username"), str) and isinstance(user.get("password"), str):
        cfg.username, cfg.password = user["username"], user["password"]
    return cfg


# --------------------------------------------------------------------------------------------
# in-cluster


def in_cluster_available(env: dict[str, str] | None = None, base: str = SERVICEACCOUNT_DIR) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(os.path.join(base, "token"))


def in_cluster_config(base: str = SERVICEACCOUNT_DIR, env: dict[str, str] | None = None) -> KubeConfig:
    """A pod's service-account view of its API server (client-go's rest.InClusterConfig)."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeConfigError("in-cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set "
                              "(not running in a pod? use --kubeconfig)")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    token_file = os.path.join(base, "token")
    ca_file = os.path.join(base, "ca.crt")
    for p in (token_file, ca_file):
        if not os.path.exists(p):
            raise KubeConfigError(f"in-cluster: {p} is missing (is automountServiceAccountToken off?)")
    cfg = KubeConfig(server=f"https://{host}:{port}", ca_file=ca_file, token_file=token_file,
                     origin=f"in-cluster ({base})")
    cfg.bearer_token()       # fail now, with the file's name, if it cannot be read
    try:
        with open(os.path.join(base, "namespace"), encoding="utf-8") as f:
            cfg.namespace = f.read().strip() or None
    except OSError:
        cfg.namespace = None
    return cfg


def load_config(kubeconfig: str | None = None, context: str | None = None,
                base: str = SERVICEACCOUNT_DIR, env: dict[str, str] | None = None) -> KubeConfig:
    """``--kubeconfig`` when given; else in-cluster when running in a pod; else ``$KUBECONFIG``
    (its first file) or ``~/.kube/config``."""
    env = os.environ if env is None else env
    if kubeconfig:
        return load_kubeconfig(kubeconfig, context)
    if in_cluster_available(env, base) and not context:
        return in_cluster_config(base, env)
    path = (env.get("KUBECONFIG") or "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    if not os.path.exists(path):
        raise KubeConfigError("no Kubernetes API configuration: give --kubeconfig PATH, set KUBECONFIG, "
                              "or run in a pod with a service-account token")
    return load_kubeconfig(path, context)
