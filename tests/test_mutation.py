"""A fixed sample of the mutation run (tests/mutation.py, docs/testing.md): every sampled mutant of the
contract-critical code must make its tests fail, unless it is listed as equivalent.

The full run takes long in the simulator; this sample keeps the check in every CI run. Each mutant
runs its target's tests in a temporary copy of the tree, never in this one.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ON_GPU

ROOT = Path(__file__).resolve().parent.parent
SAMPLE, SEED = 8, 2026
TIMEOUT_S = 240  # per mutant: a hanging mutant is killed (and counts as caught)

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(bool(os.environ.get("GPUFC_MUTATION_RUN")), reason="inside a mutation run: no nesting"),
    pytest.mark.skipif(ON_GPU, reason="the sample runs the kernels in the simulator; on a GPU the kernels tier "
                                      "itself runs there"),
]


def test_sampled_mutants_are_killed():
    cmd = [sys.executable, str(ROOT / "tests" / "mutation.py"), "--sample", str(SAMPLE), "--seed", str(SEED),
           "--no-baseline", "--timeout", str(TIMEOUT_S)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20 * 60, check=False)
    assert run.returncode == 0, f"{' '.join(cmd)} exited {run.returncode}:\n{run.stdout[-6000:]}{run.stderr[-3000:]}"
    assert "planted mutant" in run.stdout and f"[{SAMPLE}/{SAMPLE}]" in run.stdout, run.stdout[-3000:]
