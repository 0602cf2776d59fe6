# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The scanning halves of the parsers' fast paths, in C (the compiled twin only).

``split_fields_fast``, ``scan_request_whole`` and ``scan_response_whole`` here accept exactly
what the functions of the same names in ``l7/h1grammar.py`` accept and return the same values;
the twin's ``h1grammar`` takes them in place of its Python ones (``with_fallback``). The grammar
is the same: request-line ``token SP target SP "HTTP/" DIGIT "." DIGIT`` with target bytes
%x21-22 / %x24-7E (RFC 9112 §3), status-line ``"HTTP/" DIGIT "." DIGIT SP 3DIGIT [SP reason]``
with reason bytes HTAB / SP / VCHAR / obs-text (§4), field lines ``token ":" OWS value OWS
CRLF`` with value bytes HTAB / SP / VCHAR / obs-text and CR only in CRLF (§5, RFC 9110 §5.5).
One pass over the bytes with 256-entry tables instead of regexes, translate, counts, split and
partition per line. Whatever is not accepted is None, and the general path decides as always.
tests/fuzz_differential.py holds both versions to the same answers.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy

cdef unsigned char TCHAR[256]
cdef unsigned char VALUE[256]
cdef unsigned char TARGET[256]


cdef void _tables():
    cdef int c
    for c in range(256):
        TCHAR[c] = 0
        VALUE[c] = 1 if (c == 9 or 0x20 <= c <= 0x7E or c >= 0x80) else 0
        TARGET[c] = 1 if (c == 0x21 or c == 0x22 or 0x24 <= c <= 0x7E) else 0
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        TCHAR[c] = 1


_tables()

_py = {}


def with_fallback(func):
    """The C version of ``func`` (an ``l7.h1grammar`` function of the same name), which calls
    ``func`` itself for input that is not ``bytes`` (a bytearray buffer)."""
    _py[func.__name__] = func
    return globals()[func.__name__]


def split_fields_fast(buf, Py_ssize_t start, Py_ssize_t end):
    if type(buf) is not bytes:
        return _py["split_fields_fast"](buf, start, end)
    cdef const unsigned char *p = <const unsigned char *> PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    if start < 0:
        start = 0
    if end > n:
        end = n
    return _fields(p, start, end)


cdef object _fields(const unsigned char *p, Py_ssize_t start, Py_ssize_t end):
    cdef Py_ssize_t i = start, name_end, v0, v1, line_end
    cdef unsigned char c
    out = []
    while i < end:
        name_end = i
        while name_end < end and TCHAR[p[name_end]]:
            name_end += 1
        if name_end == i or name_end >= end or p[name_end] != 58:   # ":"
            return None
        v0 = name_end + 1
        line_end = v0
        while line_end < end:
            c = p[line_end]
            if not VALUE[c]:
                break
            line_end += 1
        # The line must end in CRLF right here: a bare CR, an LF alone or a CTL ends it early.
        if line_end + 1 >= end or p[line_end] != 13 or p[line_end + 1] != 10:
            return None
        v1 = line_end
        while v0 < v1 and (p[v0] == 32 or p[v0] == 9):
            v0 += 1
        while v1 > v0 and (p[v1 - 1] == 32 or p[v1 - 1] == 9):
            v1 -= 1
        out.append((PyBytes_FromStringAndSize(<const char *> p + i, name_end - i),
                    PyBytes_FromStringAndSize(<const char *> p + v0, v1 - v0)))
        i = line_end + 2
    return out


# What the head interpretation looks at (l7.h1grammar.name_kind), by name, case-insensitively.
cdef enum:
    K_PLAIN = 0
    K_HOST = 1
    K_CL = 2
    K_TE = 3
    K_CONNECTION = 4
    K_UPGRADE = 5
    K_EXPECT = 6
    K_UNDERSCORE = -1


cdef bint _is(const unsigned char *p, Py_ssize_t n, const char *lower, Py_ssize_t m):
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != m:
        return False
    for i in range(n):
        c = p[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char> lower[i]:
            return False
    return True


cdef int _kind(const unsigned char *p, Py_ssize_t n):
    cdef Py_ssize_t i
    if _is(p, n, b"host", 4):
        return K_HOST
    if _is(p, n, b"content-length", 14):
        return K_CL
    if _is(p, n, b"transfer-encoding", 17):
        return K_TE
    if _is(p, n, b"connection", 10):
        return K_CONNECTION
    if _is(p, n, b"upgrade", 7):
        return K_UPGRADE
    if _is(p, n, b"expect", 6):
        return K_EXPECT
    for i in range(n):
        if p[i] == 95:   # "_"
            return K_UNDERSCORE
    return K_PLAIN


cdef Py_ssize_t _blank_line(const unsigned char *p, Py_ssize_t n):
    """Offset of the first CRLFCRLF, or -1."""
    cdef Py_ssize_t i
    for i in range(n - 3):
        if p[i] == 13 and p[i + 1] == 10 and p[i + 2] == 13 and p[i + 3] == 10:
            return i
    return -1


cdef Py_ssize_t _line_end(const unsigned char *p, Py_ssize_t n):
    cdef Py_ssize_t i
    for i in range(n - 1):
        if p[i] == 13 and p[i + 1] == 10:
            return i
    return -1


cdef int _version(const unsigned char *p, Py_ssize_t i, Py_ssize_t stop):
    """ "HTTP/" DIGIT "." DIGIT at p[i:stop] exactly: 11, 10, 0 for another valid version, -1
    when the grammar fails."""
    if stop - i != 8 or p[i] != 72 or p[i + 1] != 84 or p[i + 2] != 84 or p[i + 3] != 80 or p[i + 4] != 47:
        return -1
    if not (48 <= p[i + 5] <= 57) or p[i + 6] != 46 or not (48 <= p[i + 7] <= 57):
        return -1
    if p[i + 5] == 49 and p[i + 7] == 49:
        return 11
    if p[i + 5] == 49 and p[i + 7] == 48:
        return 10
    return 0


def scan_request_whole(data, Py_ssize_t max_head, Py_ssize_t max_headers):
    if type(data) is not bytes:
        return _py["scan_request_whole"](data, max_head, max_headers)
    cdef const unsigned char *p = <const unsigned char *> PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t end = _blank_line(p, n)
    if end < 0 or end + 4 != n or end + 4 > max_head:
        return None
    cdef Py_ssize_t line_end = _line_end(p, n)
    cdef Py_ssize_t i = 0, m_end, t0, t_end
    while i < line_end and TCHAR[p[i]]:
        i += 1
    if i == 0 or i >= line_end or p[i] != 32:
        return None
    m_end = i
    t0 = i = i + 1
    while i < line_end and TARGET[p[i]]:
        i += 1
    if i == t0 or i >= line_end or p[i] != 32:
        return None
    t_end = i
    cdef int version = _version(p, i + 1, line_end)
    if version <= 0 or p[t0] != 47:   # another version, a bad line; origin-form only
        return None
    if m_end == 7 and memcmp(p, b"CONNECT", 7) == 0:   # method names are case-sensitive
        return None
    headers = _fields(p, line_end + 2, end + 2)
    if headers is None or len(headers) > max_headers:
        return None
    cdef Py_ssize_t k
    cdef int kind
    cdef bytes name
    hosts = conns = None
    for k in range(len(headers)):
        name = headers[k][0]
        kind = _kind(<const unsigned char *> PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        if kind != K_PLAIN:
            if kind == K_HOST and hosts is None:
                hosts = headers[k][1]
            elif kind == K_CONNECTION and conns is None:
                conns = headers[k][1]
            else:
                return None
    if hosts is None:
        return None
    return (PyBytes_FromStringAndSize(<const char *> p, m_end),
            PyBytes_FromStringAndSize(<const char *> p + t0, t_end - t0),
            version, headers, hosts, conns)


cdef Py_ssize_t MAX_CONTENT_LENGTH_C = 0x7FFFFFFFFFFFFFFF


def scan_response_whole(data, Py_ssize_t max_head, Py_ssize_t max_headers):
    if type(data) is not bytes:
        return _py["scan_response_whole"](data, max_head, max_headers)
    cdef const unsigned char *p = <const unsigned char *> PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t end = _blank_line(p, n)
    if end < 0 or end + 4 > max_head:
        return None
    cdef Py_ssize_t line_end = _line_end(p, n)
    # "HTTP/x.y SSS" then nothing, or SP and a reason
    if line_end < 12:
        return None
    cdef int version = _version(p, 0, 8)
    if version < 0 or p[8] != 32:
        return None
    cdef int status = 0, d
    for d in range(9, 12):
        if not (48 <= p[d] <= 57):
            return None
        status = status * 10 + (p[d] - 48)
    cdef Py_ssize_t i
    if line_end > 12:
        if p[12] != 32:
            return None
        for i in range(13, line_end):
            if not VALUE[p[i]]:
                return None
        reason = PyBytes_FromStringAndSize(<const char *> p + 13, line_end - 13)
    else:
        reason = b""
    if version == 0 or status < 200 or status > 599 or status == 204 or status == 304:
        return None
    fields = _fields(p, line_end + 2, end + 2)
    if fields is None or len(fields) > max_headers:
        return None
    cdef Py_ssize_t k, cl_at = -1
    cdef int kind
    cdef bytes name, cl
    conns = None
    for k in range(len(fields)):
        name = fields[k][0]
        kind = _kind(<const unsigned char *> PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        if kind == K_CL:
            if cl_at >= 0:
                return None
            cl_at = k
        elif kind == K_TE:
            return None
        elif kind == K_CONNECTION:
            if conns is not None:
                return None
            conns = fields[k][1]
    if cl_at < 0:
        return None
    cl = fields[cl_at][1]
    cdef const unsigned char *q = <const unsigned char *> PyBytes_AS_STRING(cl)
    cdef Py_ssize_t cl_len = PyBytes_GET_SIZE(cl)
    if cl_len == 0 or cl_len > 19:
        return None
    cdef unsigned long long length = 0
    for i in range(cl_len):
        if not (48 <= q[i] <= 57):
            return None
        length = length * 10 + (q[i] - 48)
    if length > <unsigned long long> MAX_CONTENT_LENGTH_C or <unsigned long long> n != <unsigned long long> (end + 4) + length:
        return None
    del fields[cl_at]
    return version, status, reason, fields, length, conns, end


# ---- the proxy's head serializers (l7.h1writer.request_head_bytes / response_head_bytes)

cdef Py_ssize_t _fields_size(fields) except -2:
    """Bytes of "name: value CRLF" for every field, or -1 when a field is not a (bytes, bytes)
    tuple (then the Python version runs)."""
    cdef Py_ssize_t size = 0
    for item in fields:
        if type(item) is not tuple or len(<tuple> item) != 2:
            return -1
        name = (<tuple> item)[0]
        value = (<tuple> item)[1]
        if type(name) is not bytes or type(value) is not bytes:
            return -1
        size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
    return size


cdef char *_put(char *w, const char *src, Py_ssize_t n):
    memcpy(w, src, n)
    return w + n


cdef char *_put_fields(char *w, fields):
    cdef bytes name, value
    for item in fields:
        name = (<tuple> item)[0]
        value = (<tuple> item)[1]
        w = _put(w, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        w = _put(w, b": ", 2)
        w = _put(w, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        w = _put(w, b"\r\n", 2)
    return w


cdef int _framing(char *buf, content_length, bint chunked) except -2:
    """The framing field into buf (at least 48 bytes): its length, or -1 for the Python path."""
    cdef long long v
    if chunked:
        memcpy(buf, b"Transfer-Encoding: chunked\r\n", 28)
        return 28
    if content_length is None:
        return 0
    if type(content_length) is not int or content_length < 0 or content_length > 0x7FFFFFFFFFFFFFFF:
        return -1
    v = content_length
    return snprintf(buf, 48, b"Content-Length: %lld\r\n", v)


def request_head_bytes(method, target, fields, content_length, chunked):
    cdef char framing[48]
    cdef Py_ssize_t fsize = -1
    cdef int flen = -1
    if type(method) is bytes and type(target) is bytes and (type(fields) is list or type(fields) is tuple):
        fsize = _fields_size(fields)
        if fsize >= 0:
            flen = _framing(framing, content_length, chunked)
    if fsize < 0 or flen < 0:
        return _py["request_head_bytes"](method, target, fields, content_length, chunked)
    cdef Py_ssize_t m = PyBytes_GET_SIZE(method), t = PyBytes_GET_SIZE(target)
    out = PyBytes_FromStringAndSize(NULL, m + 1 + t + 11 + fsize + flen + 2)
    cdef char *w = PyBytes_AS_STRING(out)
    w = _put(w, PyBytes_AS_STRING(method), m)
    w = _put(w, b" ", 1)
    w = _put(w, PyBytes_AS_STRING(target), t)
    w = _put(w, b" HTTP/1.1\r\n", 11)
    w = _put_fields(w, fields)
    w = _put(w, framing, flen)
    _put(w, b"\r\n", 2)
    return out


def response_head_bytes(status, reason, fields, content_length, chunked):
    cdef char framing[48]
    cdef Py_ssize_t fsize = -1
    cdef int flen = -1, code = 0
    if (type(status) is int and 100 <= status <= 999 and type(reason) is bytes
            and (type(fields) is list or type(fields) is tuple)):
        code = status
        fsize = _fields_size(fields)
        if fsize >= 0:
            flen = _framing(framing, content_length, chunked)
    if fsize < 0 or flen < 0:
        return _py["response_head_bytes"](status, reason, fields, content_length, chunked)
    cdef Py_ssize_t r = PyBytes_GET_SIZE(reason)
    out = PyBytes_FromStringAndSize(NULL, 13 + r + 2 + fsize + flen + 2)
    cdef char *w = PyBytes_AS_STRING(out)
    w = _put(w, b"HTTP/1.1 ", 9)
    w[0] = <char> (48 + code // 100)
    w[1] = <char> (48 + code // 10 % 10)
    w[2] = <char> (48 + code % 10)
    w[3] = 32
    w = _put(w + 4, PyBytes_AS_STRING(reason), r)
    w = _put(w, b"\r\n", 2)
    w = _put_fields(w, fields)
    w = _put(w, framing, flen)
    _put(w, b"\r\n", 2)
    return out
