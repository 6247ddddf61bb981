"""The benchmark suite's plumbing, without timing assertions: every bench script's
``--quick`` mode on the cpu backend, ``gpufc bench`` on cpu and the simulator,
bench/gpu_check.sh without a GPU, the README table generator, and the
validation maths (the float32 bound rejects TF32-like rounding)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEVICE_BACKEND, ON_GPU

from gpufc.tools import bench as B

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = {
    "bench_linear.py": {"linear"},
    "bench_linear_fused.py": {"fused"},
    "bench_backward.py": {"backward", "backward_relu_dropout"},
    "bench_dropout.py": {"dropout_fwd", "dropout_bwd"},
    "bench_overhead.py": {"overhead_linear", "overhead_dropout"},
}


def _env(backend):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUFC_BACKEND")}
    env["GPUFC_BACKEND"] = backend
    if backend == "sim":
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(args, backend, timeout=300, cwd=ROOT):
    out = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=_env(backend), timeout=timeout,
                         cwd=cwd)
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


def _rows(out_dir: Path):
    with open(out_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_validated(rows, ops):
    assert {r["op"] for r in rows} == ops
    for r in rows:
        assert r["ok"] == "True", f"{r['op']} {r['shape']} {r['impl']}: {r['check']} {r['note']}"
        assert r["check"], "every row says how it was validated"
        assert float(r["median_s"]) > 0 and int(r["reps"]) >= 1


@pytest.mark.reference
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_quick_on_cpu(script, tmp_path):
    _run([str(BENCH / script), "--quick", "--backend", "cpu", "--out", str(tmp_path), "--no-plots"], "cpu")
    rows = _rows(tmp_path)
    _assert_validated(rows, SCRIPTS[script])
    assert all(r["backend"] == "cpu" and "NOT a GPU measurement" in r["measured_on"] for r in rows)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["environment"]["backend"] == "cpu"
    assert len(doc["rows"]) == len(rows)
    assert "no GPU was measured" in (tmp_path / "summary.md").read_text()


@pytest.mark.reference
def test_gpufc_bench_on_cpu_writes_csv_plot_and_says_no_gpu(tmp_path):
    out = _run(["-m", "gpufc", "bench", "--quick", "--out", str(tmp_path), "--static", "no"], "cpu")
    assert "no GPU was measured" in out.stdout
    # The summary table is the last thing printed.
    assert out.stdout.rstrip().splitlines()[-1].split()[0] in {r["op"] for r in _rows(tmp_path)}
    _assert_validated(_rows(tmp_path), {"linear", "fused", "dropout_fwd", "dropout_bwd", "overhead_linear",
                                        "overhead_dropout", "backward", "backward_relu_dropout"})
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    assert (tmp_path / "plots.png").stat().st_size > 0


@pytest.mark.kernels
def test_gpufc_bench_quick_on_the_simulator(tmp_path):
    if ON_GPU:
        pytest.skip("on a GPU the benchmark runs in bench/gpu_check.sh's bench stage, not in the test suite")
    _run(["-m", "gpufc", "bench", "--quick", "--ops", "linear", "fused", "dropout", "--out", str(tmp_path),
          "--no-plots", "--static", "no"], DEVICE_BACKEND, timeout=600)
    rows = _rows(tmp_path)
    _assert_validated(rows, {"linear", "fused", "dropout_fwd", "dropout_bwd"})
    assert {r["impl"] for r in rows} >= {"gpufc"}
    assert all("simulator" in r["measured_on"] for r in rows)


@pytest.mark.reference
def test_gpu_check_without_a_gpu_degrades_and_writes_its_files(tmp_path):
    if ON_GPU or os.environ.get("GPU_CHECK_RUNNING"):
        pytest.skip("gpu_check.sh is the device run itself here")
    env = _env("cpu")
    env.pop("GPUFC_BACKEND")
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.endswith("_no-GPU")
    names = {p.name for p in run_dir.iterdir()}
    assert names >= {"info.txt", "pytest.txt", "sanitizer.txt", "bench.log", "results.csv", "results.json",
                     "summary.md"}
    assert len(names) <= 8, "the device returns at most 8 files"
    assert "skipped" in (run_dir / "sanitizer.txt").read_text()
    last = out.stdout.rstrip().splitlines()
    assert last[-1].split()[0] in {r["op"] for r in _rows(run_dir)}, "the summary table is printed last"


@pytest.mark.reference
def test_static_report_absent_and_present(tmp_path, monkeypatch):
    monkeypatch.setattr(B.report, "source_root", lambda: tmp_path)
    assert B.static_report(tmp_path, log=lambda m: None)["status"] == "unavailable"
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "kernel_report.py").write_text(
        "import json, os, sys\n"
        "assert os.environ['GPUFC_BACKEND'] == 'cpu' and 'NUMBA_ENABLE_CUDASIM' not in os.environ\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump({'rows': [{'name': 'k', 'spill_bytes': 0}]}, open(path, 'w'))\n"
        "print('name  spill_bytes')\n"
    )
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    result = B.static_report(tmp_path, log=lambda m: None)
    assert result["status"] == "ok"
    assert json.loads((tmp_path / "kernel_report.json").read_text())["rows"][0]["spill_bytes"] == 0
    assert "spill_bytes" in (tmp_path / "kernel_report.txt").read_text()


@pytest.mark.reference
def test_readme_table_from_the_latest_gpu_result(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import make_readme_table as T
    finally:
        sys.path.remove(str(BENCH))
    assert T.latest_gpu_result(tmp_path) == (None, None)
    rows = [B.Row("linear", "64x64x64", "small", "float32", impl, "c", median_s=t, p20_s=t, p80_s=t, reps=5,
                  rate=1.0 / t, unit="TFLOP/s", ok=True) for impl, t in (("gpufc", 2.0), ("cupy", 3.0))]
    B.add_speedups(rows)
    for name, backend in (("2026-01-01_GPU", "cuda"), ("2026-02-01_cpu", "cpu")):
        (tmp_path / name).mkdir()
        B.write_json(tmp_path / name / "results.json", rows, {"backend": backend, "device": name}, [])
    folder, _ = T.latest_gpu_result(tmp_path)
    assert folder.name == "2026-01-01_GPU", "CPU runs never feed the README"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{T.START}\nold\n{T.END}\nrest\n")
    assert T.main(["--results", str(tmp_path), "--readme", str(readme), "--write"]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| linear | 64x64x64 | TFLOP/s | 0.5 | 0.333 | 1.50x |" in text


def test_speedups_are_peer_time_over_own_time():
    rows = [B.Row("op", "s", "f", "float32", impl, "", median_s=t) for impl, t in
            (("gpufc", 1.0), ("cupy", 2.0), ("torch", 0.5))]
    rows.append(B.Row("op", "other", "f", "float32", "cupy", "", median_s=9.0))
    B.add_speedups(rows)
    gpufc, cupy, _, other = rows
    assert gpufc.speedups == {"cupy": 2.0, "torch": 0.5}
    assert cupy.speedups == {"gpufc": 0.5, "torch": 0.25}
    assert other.speedups == {}, "groups are per (op, shape, dtype)"


def test_quantiles_and_row_blocks():
    assert B.quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 1.8, 4.2)
    assert B.row_blocks(10) == [(0, 10)]
    blocks = B.row_blocks(1000)
    assert blocks[0] == (0, 8) and blocks[-1] == (992, 1000), "first and last rows are always checked"


@pytest.mark.parametrize("k", [64, 1024, 8192])
def test_float32_bound_passes_float32_and_rejects_tf32(k):
    """The validation bound separates float32 accumulation from TF32 (10-bit mantissa) operands."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((16, k))
    w = rng.standard_normal((k, 32)) / math.sqrt(k)
    exact = x @ w
    f32 = (x.astype(np.float32) @ w.astype(np.float32)).astype(np.float64)

    def tf32(a):  # round to 10 explicit mantissa bits, as the tensor cores do
        m, e = np.frexp(a)
        return np.ldexp(np.round(m * 2**11) / 2**11, e)

    assert B.rel_err(f32, exact) <= B.tolerance(np.float32, k)
    assert B.rel_err(tf32(x) @ tf32(w), exact) > B.tolerance(np.float32, k)


def test_dropout_like_check_sees_a_wrong_rate_and_wrong_values():
    rng = np.random.default_rng(0)
    pre = np.abs(rng.standard_normal(20000)) + 0.1
    keep = rng.random(20000) >= 0.1
    good = np.where(keep, pre / 0.9, 0.0)
    assert B.dropout_like_check(good, pre, 0.1, 1 / 0.9, 1e-6)[2]
    assert not B.dropout_like_check(np.where(rng.random(20000) >= 0.3, pre / 0.9, 0.0), pre, 0.1, 1 / 0.9, 1e-6)[2]
    assert not B.dropout_like_check(good * 1.01, pre, 0.1, 1 / 0.9, 1e-6)[2]
