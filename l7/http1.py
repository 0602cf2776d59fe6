"""Strict, sans-I/O HTTP/1.1 message layer for both sides of the L7 proxy.

The layer is split along h11's seams: ``h1grammar`` (patterns, limits, field helpers),
``h1events`` (heads, end of message, errors), ``h1parser`` (buffer, state machine, body framing),
``h1request`` / ``h1response`` (the two directions' heads and fast paths), ``h1writer``
(serializers). This module is their public face.

The proxy reads requests from clients with :class:`RequestParser` and responses from pods with
:class:`ResponseParser`; it writes both with the ``serialize_*`` functions. Nothing here touches a
socket: the I/O layer feeds bytes in and asks for events.

Invariants this module keeps (docs/http.md has the rule-by-rule table with RFC sections):

* One framing, or none. A message is accepted only when its body length is unambiguous under
  RFC 9112 §6: never both Content-Length and Transfer-Encoding, never a Transfer-Encoding other
  than a single final ``chunked``, never disagreeing Content-Length values. Everything that could
  make two HTTP implementations see different message boundaries is refused with
  :class:`HTTPError` - request smuggling needs exactly such a disagreement.
* Nothing of the peer's framing is forwarded. The parser reports framing as numbers/flags and
  removes the framing from the body; the serializers write a canonical head (CRLF, one framing
  header) and canonical chunks, so a forwarded message is re-framed by us, never relayed raw.
* Every head line is validated against the RFC 9110/9112 grammar as a whole line (one
  precompiled regex per line kind): tokens for names and methods, no CTL (except HTAB) in values,
  CRLF line ends only, no obs-fold. Field values are returned with their OWS stripped.
* Bounded memory: the head (and the trailer section) may not exceed ``max_head`` bytes and the
  parser refuses as soon as more than that is buffered without a complete head; chunk lines are
  bounded too. Bodies are streamed as they arrive, never accumulated.
* Split-invariant: feeding a message whole, byte by byte or cut anywhere yields the same
  events (body bytes may come in different pieces) and the same error (status and reason).
  Incomplete heads and chunk lines are rescanned only from where the previous scan stopped, so
  byte-by-byte feeding stays O(n).
* Errors are sticky: after an :class:`HTTPError` every later ``next_event`` raises it again; the
  connection must be closed (RFC 9112 §11.2: a framing error leaves no safe resume point).
* Request-side errors carry 400/413/431/501/505; response-side errors always carry 502 (the pod
  sent something we refuse; the proxy answers 502 and never reuses that connection).
"""

from .h1events import NEED_DATA, PAUSED, EndOfMessage, HTTPError, RequestHead, ResponseHead
from .h1grammar import MAX_CONTENT_LENGTH
from .h1request import RequestParser
from .h1response import ResponseParser
from .h1writer import LAST_CHUNK, chunk, serialize_request_head, serialize_response_head, serialize_trailers

__all__ = [
    "HTTPError",
    "RequestHead",
    "ResponseHead",
    "RequestParser",
    "ResponseParser",
    "EndOfMessage",
    "NEED_DATA",
    "PAUSED",
    "LAST_CHUNK",
    "MAX_CONTENT_LENGTH",
    "chunk",
    "serialize_request_head",
    "serialize_response_head",
    "serialize_trailers",
]
