"""Password hashes of htpasswd files, checked the way nginx's ``auth_basic_user_file`` does.

``verify(password, hashed)`` is True when ``password`` matches ``hashed`` in one of the formats
nginx (on the ingress-nginx image) accepts:

==================  ===================================================  ==========================
prefix              format                                               made by
==================  ===================================================  ==========================
``$2a$ $2b$ $2y$``  bcrypt (the ``bcrypt`` package)                      ``htpasswd -B``
``$apr1$``          Apache's MD5 variant of md5-crypt                    ``htpasswd -m`` (default)
``$1$``             md5-crypt                                            ``openssl passwd -1``
``$5$ $6$``         SHA-256 / SHA-512 crypt (rounds= honoured)           ``openssl passwd -5 / -6``
``{SHA}``           base64 of SHA-1                                      ``htpasswd -s``
``{SSHA}``          base64 of SHA-1 of password + salt, then the salt    slappasswd
``{PLAIN}``         the password itself                                  -
==================  ===================================================  ==========================

Anything else (the 13-character DES crypt of ``htpasswd -d``, yescrypt) never matches: the
request gets 401, it is never let through. ``expensive(hashed)`` says whether a check costs
enough (bcrypt, many SHA-crypt rounds) that the caller should run it off the event loop.
Comparisons of digests are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["verify", "expensive", "md5_crypt", "sha_crypt"]

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# SHA-crypt rounds (Drepper's specification): default 5000, clamped to [1000, 999999999].
_SHA_ROUNDS_DEFAULT, _SHA_ROUNDS_MIN, _SHA_ROUNDS_MAX = 5000, 1000, 999_999_999
# Above this many SHA-crypt rounds a check is worth a thread (5000 rounds: ~5 ms in Python).
_CHEAP_SHA_ROUNDS = 5000


def _b64_from_24bit(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


def md5_crypt(password: bytes, salt: bytes, magic: bytes = b"$1$") -> str:
    """md5-crypt (Poul-Henning Kamp's) with ``magic`` "$1$", or Apache's "$apr1$"."""
    salt = salt[:8]
    ctx = hashlib.md5(password + magic + salt)
    final = hashlib.md5(password + salt + password).digest()
    n = len(password)
    while n > 0:
        ctx.update(final[:min(16, n)])
        n -= 16
    i = len(password)
    while i:
        ctx.update(b"\0" if i & 1 else password[:1])
        i >>= 1
    final = ctx.digest()
    for i in range(1000):
        c = hashlib.md5()
        c.update(password if i & 1 else final)
        if i % 3:
            c.update(salt)
        if i % 7:
            c.update(password)
        c.update(final if i & 1 else password)
        final = c.digest()
    f = final
    out = (_b64_from_24bit(f[0], f[6], f[12], 4) + _b64_from_24bit(f[1], f[7], f[13], 4)
           + _b64_from_24bit(f[2], f[8], f[14], 4) + _b64_from_24bit(f[3], f[9], f[15], 4)
           + _b64_from_24bit(f[4], f[10], f[5], 4) + _b64_from_24bit(0, 0, f[11], 2))
    return magic.decode() + salt.decode("latin-1") + "$" + out


# Byte order of the final SHA-256 / SHA-512 crypt encoding (Drepper's specification).
_SHA256_ORDER = [(0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5), (6, 16, 26),
                 (27, 7, 17), (18, 28, 8), (9, 19, 29)]
_SHA512_ORDER = [(0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
                 (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13),
                 (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41)]


def sha_crypt(password: bytes, salt: bytes, rounds: int | None, bits: int) -> str:
    """SHA-256 (``bits`` 256, "$5$") or SHA-512 (512, "$6$") crypt."""
    h = hashlib.sha256 if bits == 256 else hashlib.sha512
    size = 32 if bits == 256 else 64
    explicit = rounds is not None
    rounds = _SHA_ROUNDS_DEFAULT if rounds is None else max(_SHA_ROUNDS_MIN, min(_SHA_ROUNDS_MAX, rounds))
    salt = salt[:16]
    b = h(password + salt + password).digest()
    a = h(password + salt)
    n = len(password)
    while n > size:
        a.update(b)
        n -= size
    a.update(b[:n])
    i = len(password)
    while i:
        a.update(b if i & 1 else password)
        i >>= 1
    a_digest = a.digest()
    dp = h(password * len(password)).digest()
    p = (dp * (len(password) // size + 1))[:len(password)]
    ds = h(salt * (16 + a_digest[0])).digest()
    s = (ds * (len(salt) // size + 1))[:len(salt)]
    c = a_digest
    for i in range(rounds):
        ctx = h(p if i & 1 else c)
        if i % 3:
            ctx.update(s)
        if i % 7:
            ctx.update(p)
        ctx.update(c if i & 1 else p)
        c = ctx.digest()
    if bits == 256:
        out = "".join(_b64_from_24bit(c[x], c[y], c[z], 4) for x, y, z in _SHA256_ORDER)
        out += _b64_from_24bit(0, c[31], c[30], 3)
        magic = "$5$"
    else:
        out = "".join(_b64_from_24bit(c[x], c[y], c[z], 4) for x, y, z in _SHA512_ORDER)
        out += _b64_from_24bit(0, 0, c[63], 2)
        magic = "$6$"
    rounds_part = f"rounds={rounds}$" if explicit else ""
    return magic + rounds_part + salt.decode("latin-1") + "$" + out


def _sha_parts(hashed: str) -> tuple[int | None, bytes] | None:
    rest = hashed[3:]
    rounds = None
    if rest.startswith("rounds="):
        num, sep, rest = rest[7:].partition("$")
        if not sep or not num.isdigit():
            return None
        rounds = int(num)
    salt = rest.rpartition("$")[0]
    return rounds, salt.encode("latin-1")


def expensive(hashed: str) -> bool:
    """Is checking against ``hashed`` slow enough to be run off the event loop?"""
    if hashed.startswith(("$2a$", "$2b$", "$2y$")):
        return True
    if hashed.startswith(("$5$", "$6$")):
        parts = _sha_parts(hashed)
        return parts is not None and parts[0] is not None and parts[0] > _CHEAP_SHA_ROUNDS
    return False


def verify(password: bytes, hashed: str) -> bool:
    """Does ``password`` match ``hashed`` (one htpasswd entry's hash)? Never raises."""
    try:
        return _verify(password, hashed)
    except (ValueError, TypeError, UnicodeError):
        return False


def _verify(password: bytes, hashed: str) -> bool:
    if hashed.startswith(("$2a$", "$2b$", "$2y$")):
        import bcrypt   # third-party, loaded only by deployments that use bcrypt hashes
        h = hashed.encode("ascii")
        if h.startswith(b"$2y$"):
            h = b"$2b$" + h[4:]   # the same algorithm; the package knows it as $2b$
        return bcrypt.checkpw(password, h)
    if hashed.startswith("$apr1$"):
        salt = hashed[6:].partition("$")[0].encode("latin-1")
        return hmac.compare_digest(md5_crypt(password, salt, b"$apr1$"), hashed)
    if hashed.startswith("$1$"):
        salt = hashed[3:].partition("$")[0].encode("latin-1")
        return hmac.compare_digest(md5_crypt(password, salt, b"$1$"), hashed)
    if hashed.startswith(("$5$", "$6$")):
        parts = _sha_parts(hashed)
        if parts is None:
            return False
        return hmac.compare_digest(sha_crypt(password, parts[1], parts[0], 256 if hashed[1] == "5" else 512), hashed)
    if hashed.startswith("{SHA}"):
        digest = base64.b64encode(hashlib.sha1(password).digest()).decode()
        return hmac.compare_digest(digest, hashed[5:])
    if hashed.startswith("{SSHA}"):
        raw = base64.b64decode(hashed[6:], validate=True)
        if len(raw) <= 20:
            return False
        return hmac.compare_digest(hashlib.sha1(password + raw[20:]).digest(), raw[:20])
    if hashed.startswith("{PLAIN}"):
        return hmac.compare_digest(password, hashed[7:].encode("utf-8"))
    return False
