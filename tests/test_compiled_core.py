"""The compiled L7 core is optional: built by the package's own build where a compiler exists,
absent elsewhere - and then the pure-Python core runs, visibly (docs/l7.md "Compiled core")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cores import package
from proc import ROOT, Meshproxy, http_get

from l7 import h1impl

# Imported first by every Python started with this directory on PYTHONPATH: makes l7.compiled
# look like a build without a compiler (the package is there, its extension modules are not).
_HIDE_COMPILED = textwrap.dedent("""\
    import importlib.abc
    import sys

    class _NoCompiledCore(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("l7.compiled.") and not name.endswith(".h1events"):
                raise ImportError("hidden by the test: no compiled core on this machine")
            return None

    sys.meta_path.insert(0, _NoCompiledCore())
    """)


@pytest.fixture
def no_compiler_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HIDE_COMPILED)
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{site}:{ROOT}"
    env.pop("MESHPROXY_HTTP_PARSER", None)
    return env


def test_build_without_a_compiler_leaves_the_package_pure(tmp_path):
    """setup.py with a C compiler that fails: the build succeeds, says why, and builds nothing."""
    root = Path(ROOT)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "l7", tmp_path / "l7", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.c"))
    env = {"PATH": "/usr/bin:/bin", "CC": "false", "LDSHARED": "false", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "compiled core not built" in r.stderr or "Cython not available" in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "l7" / "compiled").glob("*.so"))


def test_pure_core_runs_where_the_compiled_one_is_missing(no_compiler_env):
    code = textwrap.dedent("""\
        from l7 import h1impl
        assert not h1impl.available(), h1impl.compiled_status()
        assert h1impl.select("auto").mode == "python"
        assert h1impl.select("strict").mode == "python-strict"
        try:
            h1impl.select("compiled")
        except ValueError as exc:
            print("refused:", exc)
        else:
            raise SystemExit("compiled selected without a compiled core")
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=no_compiler_env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused: http_parser: the compiled core is not built" in r.stdout


def test_demo_check_passes_on_the_pure_core(no_compiler_env):
    """`make demo` on a machine without a compiler: the demo's tour passes on the pure core."""
    r = subprocess.run([sys.executable, "-m", "meshproxy", "demo", "--check"], cwd=ROOT, env=no_compiler_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo check: PASSED" in r.stdout


def _proxy_reports(tmp_path, env, *args) -> tuple[dict, str, str]:
    (tmp_path / "c.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
                                     "spec: {clusterIP: 127.96.0.9, ports: [{port: 80}]}\n")
    mp = Meshproxy([str(tmp_path)], "--no-health-checks", *args,
                   env={k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"})
    mp.start()
    try:
        status, body = http_get(mp.admin + "/debug/snapshot")
        assert status == 200
        return json.loads(body)["httpCore"], mp.metrics(), mp.output()
    finally:
        mp.stop()


def test_a_process_says_which_core_runs(tmp_path, no_compiler_env):
    core, metrics, log = _proxy_reports(tmp_path, no_compiler_env)
    assert core["running"] == "python" and core["compiled"].startswith("not built"), core
    assert 'http_core="python"' in metrics and "meshproxy_build_info{" in metrics
    assert "L7 HTTP/1.1 core: python (compiled core: not built" in log

    package("compiled")
    env = {k: v for k, v in no_compiler_env.items() if k != "PYTHONPATH"}
    core, metrics, log = _proxy_reports(tmp_path, env, "--http-parser", "auto")
    assert core == {"running": "compiled", "compiled": "built"}, core
    assert 'http_core="compiled"' in metrics
    assert "L7 HTTP/1.1 core: compiled (compiled core: built)" in log
    core, metrics, _ = _proxy_reports(tmp_path, env, "--http-parser", "strict")
    assert core["running"] == "python-strict" and 'http_core="python-strict"' in metrics


def test_asking_for_the_compiled_core_without_it_is_a_clear_startup_error(tmp_path, no_compiler_env):
    (tmp_path / "c.yaml").write_text("")
    r = subprocess.run([sys.executable, "-m", "meshproxy", "run", "-f", str(tmp_path), "--http-parser", "compiled",
                        "--admin-listen", "127.0.0.1:0"], cwd=ROOT, env=no_compiler_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--http-parser: http_parser: the compiled core is not built" in r.stderr, r.stderr


def test_stale_build_is_refused():
    """Sources edited after the build: the compiled core would not be what the sources say."""
    package("compiled")
    current = h1impl.source_hash()
    assert h1impl.BUILT_FROM == current
    assert h1impl.why_not(None, current, current, {}) is None
    assert h1impl.why_not(None, current, None, {}) is None   # no sources to compare with: trusted
    assert h1impl.why_not(None, "0" * 64, current, {}).startswith("stale")
    assert h1impl.why_not(None, current, current, {"MESHPROXY_PURE": "1"}) == "disabled by MESHPROXY_PURE=1"
    assert h1impl.why_not(ImportError("no module"), None, current, {}) == "not built (no module)"
