"""What a benchmark ran on: device, driver, CUDA, versions, source identity, date."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path

# Datasheet FP32 (non-tensor) peaks, TFLOP/s, matched against the device name.
FP32_PEAK_TFLOPS = (
    ("H100 PCIe", 51.2),
    ("H100 NVL", 60.0),
    ("H100", 66.9),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 66.9),
    ("A100", 19.5),
    ("L40S", 91.6),
    ("L4", 30.3),
)

MEASURED_ON = {
    "cuda": "GPU",
    "cpu": "CPU (NumPy reference): NOT a GPU measurement",
    "sim": "Numba CUDA simulator: NOT a GPU measurement, timings meaningless",
}


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_root() -> Path:
    """The folder above the gpufc package: the repository root in a source checkout."""
    return Path(__file__).resolve().parents[3]


def _git_commit() -> str | None:
    root = source_root()
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0:
                dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                       check=False, capture_output=True, text=True, timeout=10).stdout.strip()
                return out.stdout.strip() + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("GPUFC_COMMIT") or None


def source_sha256() -> str:
    """sha256 over the sources that decide the numbers (gpufc/ and kernels/ .py files), short.

    It identifies the code that ran even where no git history travels (the lent GPU
    gets a copy of the working tree): recompute it at a commit to match a result.
    """
    root = source_root()
    h = hashlib.sha256()
    for folder in ("gpufc", "kernels"):
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def fp32_peak_tflops(device: str | None) -> float | None:
    for key, peak in FP32_PEAK_TFLOPS:
        if device and key in device:
            return peak
    return None


def environment(backend: str, cp=None, torch=None) -> dict:
    """What ran: device, driver, CUDA, versions, source identity, date."""
    import gpufc

    info = gpufc.backend_info()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "measured_on": MEASURED_ON[backend],
        "device": info.get("device"),
        "compute_capability": info.get("compute_capability"),
        "driver": None,
        "cuda_driver_api": info.get("cuda_driver"),
        "cuda_runtime": None,
        "gpufc": gpufc.__version__,
        "git_commit": _git_commit(),
        "source_sha256": source_sha256(),
        "python": info.get("python"),
        "numpy": info.get("numpy"),
        "numba": info.get("numba"),
        "numba_cuda": info.get("numba_cuda"),
        "cupy": info.get("cupy"),
        "torch": _version("torch"),
        "timer": "CUDA events" if backend == "cuda" else "time.perf_counter",
        "tf32": "off: CUPY_TF32=0, NVIDIA_TF32_OVERRIDE=0, torch allow_tf32=False",
        "fp32_peak_tflops": None,
        "copy_GBps": None,
    }
    if cp is not None:
        dev = cp.cuda.Device()
        attrs = dev.attributes
        env["sm_count"] = attrs.get("MultiProcessorCount")
        env["l2_bytes"] = attrs.get("L2CacheSize")
        env["sm_clock_mhz"] = attrs.get("ClockRate", 0) // 1000
        rt = cp.cuda.runtime.runtimeGetVersion()
        env["cuda_runtime"] = f"{rt // 1000}.{rt % 1000 // 10}"
        dv = cp.cuda.runtime.driverGetVersion()
        env["cuda_driver_api"] = f"{dv // 1000}.{dv % 1000 // 10}"
        env["driver"] = _nvidia_smi("driver_version")
        env["fp32_peak_tflops"] = fp32_peak_tflops(env["device"])
    if torch is not None:
        env["torch_cuda"] = getattr(torch.version, "cuda", None)
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], check=False, capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
