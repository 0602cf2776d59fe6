"""`meshproxy demo --check` runs its own tour (balancing, NodePort, Ingress, failover) and exits 0."""

import subprocess
import sys

from proc import ROOT


def test_demo_check_passes():
    r = subprocess.run([sys.executable, "-m", "meshproxy", "demo", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo check: PASSED" in r.stdout
    assert r.stdout.count("[ok]") == 7 and "[FAIL]" not in r.stdout
