"""The HTTP/2 fuzz target (tests/fuzz_h2.py) under hypothesis, bounded for CI."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import Harness
from fuzz_h2 import drive, frames, same_outcome
from test_h2_protocol import MANIFESTS

_EXAMPLES = int(os.environ.get("MESHPROXY_FUZZ_EXAMPLES", "300"))
_H = Harness(MANIFESTS)


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(), st.lists(st.integers(0, 2000), max_size=6))
def test_any_frames_are_served_or_refused_never_raise(fs, cuts):
    data = b"".join(fs)
    whole = drive(_H, data, [])
    cut = drive(_H, data, cuts)
    assert same_outcome(whole, cut), (whole, cut)


@settings(max_examples=max(20, _EXAMPLES // 10), deadline=None)
@given(frames())
def test_byte_at_a_time_gives_the_same_outcome(fs):
    data = b"".join(fs)
    whole = drive(_H, data, [])
    split = drive(_H, data, list(range(1, 24 + 9 + len(data))))
    assert same_outcome(whole, split), (whole, split)
