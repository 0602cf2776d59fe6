"""Which implementation of the per-message work runs: the pure-Python modules or their compiled twin.

The per-message work - head parsing (``h1request``, ``h1response`` over ``h1parser`` and
``h1grammar``), the header policy (``headers.request_headers`` / ``response_headers``) - exists
twice: as the pure-Python modules, which are the reference, and as ``l7.compiled``, the same
source files compiled by Cython at install time (plus the C field splitter of the fast paths).
A server picks one when it is built (``select``); both can run side by side in one process,
which is how the tests hold them to the same verdicts.

``--http-parser`` (``Settings.http_parser``; $MESHPROXY_HTTP_PARSER when the setting is "auto"):

* ``auto`` - the compiled core with the fast paths when it is built and current, else ``python``.
* ``compiled`` - the compiled core with the fast paths; an error when it is not available.
* ``python`` (or ``fast``, its older name) - the pure-Python modules with the fast paths.
* ``python-strict`` (or ``strict``) / ``compiled-strict`` - that core's general parser only (no
  ``parse_whole``): the fast paths are not a second set of verdicts, and the test suites run
  without them to show it.

The compiled core is "current" when it was built from the sources beside it (a hash of them is
compiled in); a checkout edited since the build is refused rather than silently run stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import h1request, h1response, h1writer, headers

__all__ = ["MODES", "Implementation", "available", "compiled_status", "select"]

MODES = ("auto", "compiled", "python", "compiled-strict", "python-strict", "fast", "strict")
# The modules the twin is compiled from (setup.py's TWIN, in the same order) and its C helper.
_TWIN = ("h1grammar", "h1parser", "h1request", "h1response", "h1writer", "headers")
_HELPER = "compiled/_h1scan.pyx"


class Implementation:
    """What a server calls per message. ``name``: "compiled" or "python"; ``fast_parse``: the
    ``parse_whole`` fast paths are used."""

    __slots__ = ("name", "fast_parse", "RequestParser", "ResponseParser", "request_headers",
                 "response_headers", "ClientInfo", "request_head_bytes", "response_head_bytes")

    def __init__(self, name: str, fast_parse: bool, request_mod, response_mod, headers_mod, writer_mod) -> None:
        self.name = name
        self.fast_parse = fast_parse
        self.RequestParser = request_mod.RequestParser
        self.ResponseParser = response_mod.ResponseParser
        self.request_headers = headers_mod.request_headers
        self.response_headers = headers_mod.response_headers
        self.ClientInfo = headers_mod.ClientInfo
        self.request_head_bytes = writer_mod.request_head_bytes
        self.response_head_bytes = writer_mod.response_head_bytes

    @property
    def mode(self) -> str:
        """What the startup log, /debug/snapshot and meshproxy_build_info show."""
        return self.name if self.fast_parse else self.name + "-strict"

    def __repr__(self) -> str:
        return f"Implementation({self.mode})"


def source_hash() -> str:
    """What the compiled core must have been built from to be current (setup.py computes the
    same hash at build time)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _TWIN:
        h.update(name.encode() + b"\0" + (here / f"{name}.py").read_bytes() + b"\0")
    helper = here / _HELPER
    if helper.exists():
        h.update(helper.read_bytes())
    return h.hexdigest()


def why_not(import_error: ImportError | None, built_from: str | None, current: str | None, env) -> str | None:
    """None when the compiled core may run, else the reason (shown in the log and snapshot).
    ``current`` None: the sources are not there to compare with (then the build is trusted)."""
    if env.get("MESHPROXY_PURE") == "1":
        return "disabled by MESHPROXY_PURE=1"
    if import_error is not None:
        return f"not built ({import_error})"
    if current is not None and built_from != current:
        return "stale: l7 sources changed since it was built (run make venv)"
    return None


# Importing the extension modules is harmless even when they are not to be used (stale, or
# disabled): nothing runs until a server selects them.
try:
    from .compiled import h1request as c_request
    from .compiled import h1response as c_response
    from .compiled import h1writer as c_writer
    from .compiled import headers as c_headers
    from .compiled.stamp import SOURCE_HASH as BUILT_FROM
    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:
    BUILT_FROM = None
    _IMPORT_ERROR = exc
try:
    _CURRENT: str | None = source_hash()
except OSError:   # installed without its sources: nothing to compare with
    _CURRENT = None
_WHY_NOT = why_not(_IMPORT_ERROR, BUILT_FROM, _CURRENT, os.environ)
_COMPILED = None if _WHY_NOT is not None else (c_request, c_response, c_headers, c_writer)
_PYTHON = Implementation("python", True, h1request, h1response, headers, h1writer)
_STRICT = Implementation("python", False, h1request, h1response, headers, h1writer)
_CORE = None if _COMPILED is None else Implementation("compiled", True, *_COMPILED)
_CORE_STRICT = None if _COMPILED is None else Implementation("compiled", False, *_COMPILED)


def available() -> bool:
    return _CORE is not None


def compiled_status() -> str:
    """"built" or why the compiled core does not run (for the startup log)."""
    return "built" if _CORE is not None else _WHY_NOT or "unavailable"


def implementations() -> dict[str, Implementation]:
    """Every implementation this process can run, by mode name (tests parametrize on these)."""
    out = {"python": _PYTHON, "python-strict": _STRICT}
    if _CORE is not None:
        out["compiled"] = _CORE
        out["compiled-strict"] = _CORE_STRICT
    return out


def select(setting: str | None) -> Implementation:
    """The implementation for ``Settings.http_parser`` (see the module docstring). Raises
    ValueError for an unknown mode, or "compiled" when the compiled core cannot run."""
    mode = setting or "auto"
    if mode == "auto":
        mode = os.environ.get("MESHPROXY_HTTP_PARSER", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"http_parser: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "strict" or mode == "python-strict":
        return _STRICT
    if mode == "python" or mode == "fast":
        return _PYTHON
    if mode == "compiled" or mode == "compiled-strict":
        if _CORE is None:
            raise ValueError(f"http_parser: the compiled core is {compiled_status()}")
        return _CORE if mode == "compiled" else _CORE_STRICT
    return _CORE if _CORE is not None else _PYTHON
