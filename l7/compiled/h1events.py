"""The compiled twin hands over the pure module's events: one set of classes for both
implementations (``type(ev) is ResponseHead`` and ``except HTTPError`` see no difference)."""

from ..h1events import NEED_DATA, PAUSED, EndOfMessage, HTTPError, RequestHead, ResponseHead

__all__ = ["NEED_DATA", "PAUSED", "EndOfMessage", "HTTPError", "RequestHead", "ResponseHead"]
