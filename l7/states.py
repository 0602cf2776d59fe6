"""The L7 exchange's states and the events that move them, as data (h11's ``_state.py`` is
the model). ``l7.exchange.Exchange`` (and its upstream half, ``l7.attempts``) move the response
side only as ``TRANSITIONS`` allows; tests install ``checked_to`` and ``checked_state`` to hold
every move to it.

The response side is one of:

=========== ===================================================================================
ROUTING     head received, nothing decided yet
CONNECTING  an endpoint is chosen, a new upstream connection is being opened
WAITING     the request (head, and body as it comes) is going upstream; no final head yet
STREAMING   the final response head went to the client; body bytes follow
TUNNEL      a 101 Switching Protocols: bytes flow both ways unparsed
DONE        the response is complete (relayed or answered by the proxy)
ABORTED     the exchange ended without a complete response (client gone, truncated upstream)
=========== ===================================================================================

and the request side is RECEIVING (body bytes may still come) or COMPLETE. Timeouts and retries
decide on that pair (``Exchange.on_deadline``, ``Attempts._upstream_failed``).
"""

from __future__ import annotations

__all__ = [
    "ABORTED", "COMPLETE", "CONNECTING", "DONE", "RECEIVING", "ROUTING", "STREAMING", "TUNNEL",
    "WAITING", "TRANSITIONS", "checked_state", "checked_to", "successors",
]

# Response side.
ROUTING, CONNECTING, WAITING, STREAMING, TUNNEL, DONE, ABORTED = (
    "routing", "connecting", "waiting", "streaming", "tunnel", "done", "aborted")
# Request side.
RECEIVING, COMPLETE = "receiving", "complete"

# Every legal move of the response side: (state, event) -> states it may go to. Events:
#   routed       the route, backend and endpoint are chosen (a pooled connection or a new one)
#   answer       the proxy answers itself (no route, redirect, no endpoint, fault, error ...)
#   connected    the new upstream connection is open
#   retry        the attempt failed and another one starts (connect failure, reset, timeout,
#                a retryable status)
#   interim      a 1xx other than 101 arrived
#   head         the final response head arrived and went to the client
#   whole        a complete response arrived in one piece and went to the client
#   tunnel       a 101 arrived
#   end          the response body ended
#   fail         the attempt failed and is answered (502 / 503 / 504) - before any response byte
#   abort        the exchange ends without a complete response: client gone, failure after the
#                head went out, a framing error in the request body, an internal error
#   retract      the attempt failed in the same read that brought the head, which had not been
#                written yet: as if it never came
TRANSITIONS: dict[tuple[str, str], frozenset[str]] = {
    (ROUTING, "routed"): frozenset((CONNECTING, WAITING)),
    (ROUTING, "answer"): frozenset((DONE,)),
    (ROUTING, "abort"): frozenset((ABORTED,)),
    (CONNECTING, "connected"): frozenset((WAITING,)),
    (CONNECTING, "retry"): frozenset((CONNECTING, WAITING)),
    (CONNECTING, "fail"): frozenset((DONE,)),
    (CONNECTING, "answer"): frozenset((DONE,)),
    (CONNECTING, "abort"): frozenset((ABORTED,)),
    (WAITING, "interim"): frozenset((WAITING,)),
    (WAITING, "head"): frozenset((STREAMING, DONE)),
    (WAITING, "whole"): frozenset((DONE,)),
    (WAITING, "tunnel"): frozenset((TUNNEL,)),
    (WAITING, "retry"): frozenset((CONNECTING, WAITING)),
    (WAITING, "fail"): frozenset((DONE,)),
    (WAITING, "answer"): frozenset((DONE,)),
    (WAITING, "abort"): frozenset((ABORTED,)),
    (STREAMING, "end"): frozenset((DONE,)),
    (STREAMING, "abort"): frozenset((ABORTED,)),
    (STREAMING, "retract"): frozenset((WAITING,)),
    (TUNNEL, "end"): frozenset((DONE,)),
    (TUNNEL, "abort"): frozenset((ABORTED,)),
    (DONE, "abort"): frozenset((ABORTED,)),    # the client left before the request body ended
}


def successors(state: str) -> frozenset[str]:
    """Every state TRANSITIONS lets ``state`` move to, whatever the event."""
    return frozenset(t for (s, _e), targets in TRANSITIONS.items() if s == state for t in targets)


def checked_state(slot):
    """A property over the ``state`` slot that refuses a move TRANSITIONS does not allow from
    the current state by any event (tests install it on Exchange; see ``_to``)."""
    def get(self):
        return slot.__get__(self)

    def set(self, new):
        try:
            old = slot.__get__(self)
        except AttributeError:   # the first assignment, in __init__
            old = None
        if old is not None and old != new and new not in successors(old):
            raise AssertionError(f"exchange: no move from {old} to {new}")
        slot.__set__(self, new)
    return property(get, set)


def checked_to(self, event: str, state: str) -> None:
    """``Exchange._to`` checking every move against TRANSITIONS (tests install it; the check is a
    dict probe per move, saved in production)."""
    if state not in TRANSITIONS.get((self.state, event), ()):
        raise AssertionError(f"exchange: {event!r} does not lead from {self.state} to {state}")
    self.state = state
