"""The L7 per-message cores the tests hold to the same verdicts (l7.h1impl, docs/l7.md "Compiled core").

``CORES`` are the pytest parameters: the pure-Python reference and the compiled twin. The
compiled one must be built (``make venv`` builds it): outside CI a checkout without it skips
those cases and says why; in CI that is a failure (``requires.unavailable``).

``use_core(monkeypatch, name, *modules)`` rebinds, in each given test module, the names it
imported from ``l7.http1`` / ``l7.headers`` to that core's objects, so a table written against
the pure names runs unchanged against either core.
"""

from __future__ import annotations

import importlib

from conftest import unavailable

from l7 import h1impl

CORES = ("python", "compiled")

# name in a test module -> the module of the core that defines it
_SOURCES = {
    "RequestParser": "h1request",
    "ResponseParser": "h1response",
    "serialize_request_head": "h1writer",
    "serialize_response_head": "h1writer",
    "serialize_trailers": "h1writer",
    "chunk": "h1writer",
    "request_head_bytes": "h1writer",
    "response_head_bytes": "h1writer",
    "request_headers": "headers",
    "response_headers": "headers",
    "forwarded_element": "headers",
    "forwarded_node": "headers",
    "ClientInfo": "headers",
    "ClientInfoCache": "headers",
    "TrustedProxies": "headers",
    "split_fields": "h1grammar",
    "split_fields_fast": "h1grammar",
}


def package(name: str) -> str:
    """The package a core's modules live in; skips / fails when that core is not built."""
    if name == "python":
        return "l7"
    if not h1impl.available():
        unavailable(f"the compiled core is {h1impl.compiled_status()} (make venv builds it)")
    return "l7.compiled"


def module(name: str, mod: str):
    return importlib.import_module(f"{package(name)}.{mod}")


def use_core(monkeypatch, name: str, *modules) -> None:
    pkg = package(name)
    for test_module in modules:
        for attr, src in _SOURCES.items():
            if hasattr(test_module, attr):
                monkeypatch.setattr(test_module, attr, getattr(importlib.import_module(f"{pkg}.{src}"), attr))
