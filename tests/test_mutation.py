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


def test_report_from_logs_takes_the_latest_record_of_each_mutant(tmp_path):
    # The full run is resumed and reported from its logs: a later log's record replaces an earlier
    # one (a survivor re-run after its test was written), a survivor fails the report, and the
    # duration is the seconds of the records kept, summed.
    script = str(ROOT / "tests" / "mutation.py")
    listed = subprocess.run([sys.executable, script, "--list", "--files", "philox"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True).stdout.splitlines()
    ids = [line.split()[0] for line in listed if line.startswith("philox:")][:3]
    total = sum(line.startswith("philox:") for line in listed)
    assert len(ids) == 3 and total > 3

    def log(name, records):
        path = tmp_path / name
        path.write_text("".join(f"[{i + 1}/{len(records)}] {outcome:10s} {secs:5d} s  {ident}  a  ->  b\n"
                                for i, (outcome, secs, ident) in enumerate(records)))
        return str(path)

    first = log("first.log", [("killed", 10, ids[0]), ("survived", 200, ids[1]), ("killed", 5, ids[2])])
    again = log("again.log", [("killed", 7, ids[1])])

    def report(*logs):
        return subprocess.run([sys.executable, script, "--files", "philox", "--report-from", *logs], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)

    run = report(first)
    assert run.returncode == 1 and f"SURVIVED {ids[1]}" in run.stdout, run.stdout[-3000:]
    run = report(first, again)
    row = next(line.split() for line in run.stdout.splitlines() if line.startswith("philox "))
    assert run.returncode == 0 and "SURVIVED" not in run.stdout, run.stdout[-3000:]
    assert row[2:8] == ["3", "of", str(total), "3", "0", "0"], row
    assert "duration: 22 s (worker-seconds" in run.stdout, run.stdout[-3000:]
