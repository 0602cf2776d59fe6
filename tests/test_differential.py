"""The compiled L7 core against the pure-Python reference, byte for byte (tests/fuzz_differential.py).

Every parser table input and corpus file, then hypothesis-generated messages (the structured
generators of tests/fuzz_http1.py and raw bytes), then a bounded atheris run: each input is fed
to both cores whole and cut at every offset, on both sides; any difference in events, verdicts,
fast-path answers, header policy or serialized heads fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cores import package
from conftest import unavailable
from fuzz_differential import compare
from fuzz_http1 import corpus_files, requests, responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http1 import _all_request_inputs, _all_response_inputs


@pytest.fixture(autouse=True)
def compiled_core():
    package("compiled")   # skips outside CI / fails in CI when the compiled core is not built


def test_every_table_input_and_corpus_file_alike():
    seen = set()
    inputs = [d for d, _ in _all_request_inputs()] + [d for d, _ in _all_response_inputs()]
    inputs += [p.read_bytes() for p in corpus_files()]
    for data in inputs:
        if data not in seen:
            seen.add(data)
            compare(data)
    assert len(seen) > 300


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.one_of(requests(), responses(), st.binary(max_size=160)))
def test_hypothesis_inputs_alike(data: bytes) -> None:
    compare(data)


def test_atheris_run_finds_no_difference(tmp_path):
    """A bounded coverage-guided run (3,000 inputs or 30 s, whichever comes first; inputs over 96
    bytes are cut at a few offsets, not all; the compiled modules are not
    instrumented, so coverage steers by the reference's branches)."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        unavailable("atheris is not installed (the test extra installs it)")
    corpus = tmp_path / "corpus"
    shutil.copytree(Path(__file__).parent / "corpus" / "http1", corpus)
    runs = os.environ.get("MESHPROXY_DIFF_RUNS", "3000")
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "fuzz_differential.py"),
                        f"-runs={runs}", "-max_total_time=30", "-max_len=400", str(corpus)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Done" in r.stderr or "DONE" in r.stderr, r.stderr[-2000:]
