# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The field-block splitter of the parsers' fast paths, in C (the compiled twin only).

``split_fields_fast`` here accepts exactly the blocks ``l7.h1grammar.split_fields_fast`` accepts
and returns the same list; the twin's ``h1grammar`` imports it in place of the Python loop. The
grammar is the same (RFC 9112 §5 field-line, RFC 9110 §5.5 field-value): each line is
``token ":" OWS value OWS CRLF``, value bytes HTAB / SP / VCHAR / obs-text, CR only in CRLF.
One pass over the bytes with two 256-entry tables instead of translate + three counts + split +
partition per line. Anything else is None, and the general path decides as it always does.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

cdef unsigned char TCHAR[256]
cdef unsigned char VALUE[256]


cdef void _tables():
    cdef int c
    for c in range(256):
        TCHAR[c] = 0
        VALUE[c] = 1 if (c == 9 or 0x20 <= c <= 0x7E or c >= 0x80) else 0
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        TCHAR[c] = 1


_tables()

_py_split = None


def with_fallback(func):
    """``split_fields_fast`` in C, calling ``func`` (the Python one) for a buffer that is not
    ``bytes``."""
    global _py_split
    _py_split = func
    return split_fields_fast


def split_fields_fast(buf, Py_ssize_t start, Py_ssize_t end):
    if type(buf) is not bytes:
        return _py_split(buf, start, end)
    cdef const unsigned char *p = <const unsigned char *> PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    if start < 0:
        start = 0
    if end > n:
        end = n
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
