"""The shape of the code base, as checks that fail (docs/architecture.md, "Layers").

* import-linter's contracts (``.importlinter``): the process layer over ``l4`` | ``l7`` over
  ``meshproxy.core`` over ``discovery``, nothing reaching up, no cycles inside any package;
* no product module imports another module's private (``_``) names or reaches into another
  module's private attributes;
* no project module is imported inside a function (where an import can hide a cycle from the
  reader), except the late imports of the CLI, which exist for one stated reason;
* no product module grows past ~900 lines.
"""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("meshproxy", "l4", "l7", "discovery")
MAX_LINES = 900

# Function-local imports allowed, by file: the module docstring of each says why.
LATE_IMPORTS = {
    # prometheus_client must be imported after --workers sets up multiprocess metrics.
    "meshproxy/cli.py": {".controller", ".process", ".workers", ".demo", ".top", ".issuer", ".dataplane"},
}
# Private attributes of other code that product code reads on purpose, by file, with the reason.
PRIVATE_ACCESS = {
    # Histogram children are fed n observations at once (one lock instead of n): prometheus-client
    # has no public call for that; l7 flushes its per-request integers into them once a second.
    "l7/stats.py": {"_buckets", "_sum"},
}


def _product_files() -> list[pathlib.Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _rel(p: pathlib.Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _names_defined(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            names.update(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: install the test extras (pip install -e '.[test]')")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_private_names_across_modules():
    problems = []
    for p in _product_files():
        tree = ast.parse(p.read_text())
        own = _names_defined(tree)
        allowed = PRIVATE_ACCESS.get(_rel(p), set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if _private(a.name):
                        problems.append(f"{_rel(p)}:{node.lineno}: imports {a.name} from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                v = node.value
                if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                    continue
                if node.attr in own or node.attr in allowed:
                    continue
                problems.append(f"{_rel(p)}:{node.lineno}: {ast.unparse(v)}.{node.attr} belongs to another module")
    assert not problems, "\n".join(problems)


def test_project_modules_are_imported_at_the_top():
    problems = []
    for p in _product_files():
        tree = ast.parse(p.read_text())
        allowed = LATE_IMPORTS.get(_rel(p), set())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    mod = "." * node.level + (node.module or "")
                    if (node.level or mod.split(".")[0] in PACKAGES) and mod not in allowed:
                        problems.append(f"{_rel(p)}:{node.lineno}: from {mod} import ... inside {fn.name}()")
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] in PACKAGES and a.name not in allowed:
                            problems.append(f"{_rel(p)}:{node.lineno}: import {a.name} inside {fn.name}()")
    assert not problems, "\n".join(problems)


def test_product_modules_stay_small():
    big = [f"{_rel(p)}: {n} lines" for p in _product_files()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, "split along the module's seams:\n" + "\n".join(big)


def test_cli_imports_no_prometheus_client_before_the_multiprocess_setup():
    """``run --workers N`` must point prometheus-client at its multiprocess directory before
    the first import of it; a top-level import in the CLI's reach would break the parent's
    metrics (its gauges would vanish from /metrics)."""
    import subprocess
    r = subprocess.run([sys.executable, "-c", "import sys, meshproxy.cli; print('prometheus_client' in sys.modules)"],
                       capture_output=True, text=True, timeout=60, cwd=str(pathlib.Path(__file__).resolve().parent.parent))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
