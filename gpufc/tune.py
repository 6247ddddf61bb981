"""The matmul autotuner: time the candidate configurations once per shape bucket, keep the winner.

For an ``(M, K) @ (K, N)`` product, Triton-style: the shape falls in a bucket
(each of M, N, K rounded up to a power of two), and for a bucket, dtype,
epilogue and operand layout the tuner times every candidate configuration of
the dtype (and split-K chunks where the grid is small) on the current GPU,
then keeps the fastest in a record on disk, beside the compiled kernels
(``tuning.json`` in the kernel cache directory: ``GPUFC_CACHE_DIR``, else the
user cache directory). Later calls with no ``config=`` use the record.

A record is used only by the same device (name and compute capability), the
same numba-cuda version and the same kernel source (sha256 of the
``kernels`` package's ``.py`` files): a record from anywhere else is ignored
(and retuned by the next ``gpufc tune``), never used. ``GPUFC_TUNE=0`` ignores
every record. Without a record the measured default table of the device class
(``kernels.linear.configs``'s ``choose_config``) decides.

Timing needs a GPU: ``gpufc tune`` on a machine without one says so and exits
non-zero without writing anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

FORMAT = "gpufc-tuning-1"
FILENAME = "tuning.json"
ENV_SWITCH = "GPUFC_TUNE"
LAYOUTS = ("NN", "NT", "TN")
BUCKET_CAP = 2**20  # dimensions above this share the last bucket


class TuningWarning(UserWarning):
    """The tuning store was unreadable and was ignored."""


def bucket(m: int, n: int, k: int) -> tuple[int, int, int]:
    """Each dimension rounded up to a power of two (at least 1, at most :data:`BUCKET_CAP`)."""
    for name, v in (("m", m), ("n", n), ("k", k)):
        if not isinstance(v, (int,)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {name}={v!r}")
    return tuple(min(BUCKET_CAP, 1 << max(0, int(v) - 1).bit_length()) for v in (m, n, k))


def source_digest() -> str:
    """sha256 (16 hex digits) over the ``.py`` files of ``gpufc.kernels``, by relative path."""
    from . import backend

    root = Path(backend.kernels().__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def environment(device: str, cc: tuple[int, int] | str, numba_cuda: str, source: str) -> dict:
    """What a record must match to be used."""
    cc = cc if isinstance(cc, str) else f"{cc[0]}.{cc[1]}"
    return {"device": str(device), "cc": cc, "numba_cuda": str(numba_cuda), "source": str(source)}


def current_environment() -> dict | None:
    """The environment of the current CUDA device, or None without one (cpu or sim backend)."""
    from . import backend

    if backend.get_backend() != "cuda":
        return None
    import importlib.metadata

    dev = backend.numba_cuda().get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    return environment(name, dev.compute_capability, importlib.metadata.version("numba-cuda"), source_digest())


def store_path(directory: str | os.PathLike | None = None) -> Path:
    """``tuning.json`` in ``directory``, else in the kernel cache directory."""
    if directory is None:
        from .runtime import cache

        directory = cache.default_directory()
    return Path(directory) / FILENAME


def load(path: Path) -> list[dict]:
    """Every record of the store at ``path`` ([] when missing; unreadable: [] with a warning)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring the unreadable tuning store {path}: {err}", TuningWarning, stacklevel=2)
        return []
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("records"), list):
        warnings.warn(f"ignoring the tuning store {path}: not a {FORMAT} file", TuningWarning, stacklevel=2)
        return []
    return [r for r in doc["records"] if isinstance(r, dict)]


def save(path: Path, records: list[dict]) -> None:
    """Write the store atomically (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "records": records}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key(m, n, k, dtype, epilogue: str, layout: str) -> dict:
    import numpy as np

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got layout={layout!r}")
    return {"bucket": list(bucket(m, n, k)), "dtype": np.dtype(dtype).name, "epilogue": str(epilogue), "layout": layout}


def valid(record: dict, env: dict) -> bool:
    """Whether ``record`` was made in ``env`` (device, compute capability, numba-cuda, kernel
    source) and names a configuration: anything else is ignored, never used."""
    return (all(record.get(f) == v for f, v in env.items())
            and isinstance(record.get("config"), str)
            and (record.get("chunk") is None or (isinstance(record.get("chunk"), int) and record["chunk"] > 0)))


def lookup(m: int, n: int, k: int, dtype, epilogue: str, layout: str, env: dict | None,
           records: list[dict]) -> dict | None:
    """The valid record for this problem in ``env`` (``{"config": name, "chunk": int | None}``), or None."""
    if env is None or os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return None
    key = _key(m, n, k, dtype, epilogue, layout)
    for r in reversed(records):  # the newest wins
        if all(r.get(f) == v for f, v in key.items()) and valid(r, env):
            return {"config": r["config"], "chunk": r.get("chunk")}
    return None


def merge(records: list[dict], new: dict) -> list[dict]:
    """``records`` with ``new`` replacing any record of the same problem and environment."""
    fields = ("bucket", "dtype", "epilogue", "layout", "device", "cc", "numba_cuda", "source")
    return [r for r in records if any(r.get(f) != new.get(f) for f in fields)] + [new]


_cached: dict = {}


def recorded(m: int, n: int, k: int, dtype, epilogue: str, layout: str) -> dict | None:
    """The tuned choice for this problem on the current device, or None (no GPU, tuning off,
    no valid record). The switch, the device and the store are read once per process (a
    launch pays one dictionary lookup when nothing is tuned)."""
    if "records" not in _cached:
        _cached["env"], _cached["records"] = None, []
        if os.environ.get(ENV_SWITCH, "1").strip() != "0":
            try:
                env = current_environment()
                _cached["env"], _cached["records"] = env, (load(store_path()) if env else [])
            except Exception as err:  # noqa: BLE001 -- tuning is an optimisation: never fail a call over it
                warnings.warn(f"tuning records unavailable: {err}", TuningWarning, stacklevel=2)
    if not _cached["records"]:  # the common case: nothing tuned, nothing to build per call
        return None
    return lookup(m, n, k, dtype, epilogue, layout, _cached["env"], _cached["records"])


# ----------------------------------------------------------------------------
# Timing (GPU only)
# ----------------------------------------------------------------------------


def candidates(m: int, n: int, k: int, dtype) -> list[tuple[str, int | None]]:
    """(configuration name, split-K chunk or None) pairs to time for this problem."""
    import numpy as np

    from .kernels.linear import splitk
    from .kernels.linear.configs import DTYPE_CONFIGS, config_by_name, device_sm_count

    sms = device_sm_count()
    out = []
    for name in DTYPE_CONFIGS[np.dtype(dtype)]:
        out.append((name, None))
        cfg = config_by_name(name)
        if getattr(cfg, "version", 2) == 3:
            gx, gy = cfg.grid(m, n)
            chunk = splitk.choose_chunk(m, n, k, gx * gy, sms)
            if chunk:
                out.append((name, chunk))
    return out


def time_problem(m: int, n: int, k: int, dtype, layout: str = "NN", repeats: int = 10) -> list[dict]:
    """Median milliseconds of every candidate on the current GPU (CUDA events), fastest first."""
    import numpy as np

    from . import backend
    from .kernels.linear import epilogue as E
    from .kernels.linear import v3_pipelined as v3
    from .kernels.linear.configs import config_by_name

    cuda = backend.numba_cuda()
    dtype = np.dtype(dtype)
    ta, tb = layout[0] == "T", layout[1] == "T"
    rng = np.random.default_rng(0)
    a = cuda.to_device(rng.standard_normal((k, m) if ta else (m, k)).astype(dtype))
    b = cuda.to_device(rng.standard_normal((n, k) if tb else (k, n)).astype(dtype))
    bias = cuda.to_device(np.zeros(n, dtype))
    y = cuda.device_array((m, n), dtype)
    k_ = backend.kernels()
    rows = []
    for name, chunk in candidates(m, n, k, dtype):
        cfg = config_by_name(name)
        ws = None
        if chunk:
            from .kernels.linear import splitk

            ws = cuda.device_array((splitk.splits_for(k, chunk), m, n), dtype)

        def run(cfg=cfg, chunk=chunk, ws=ws):
            if getattr(cfg, "version", 2) == 3:
                v3.launch(a, b, bias, y, y, cfg=cfg, trans_a=ta, trans_b=tb, ep=E.PLAIN, chunk=chunk, ws=ws)
            else:
                k_.linear.launch_matmul(a, b, bias, y, y, trans_a=ta, trans_b=tb, ep=E.PLAIN, config=cfg)

        run()  # compile and warm up
        cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, stop = cuda.event(), cuda.event()
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(cuda.event_elapsed_time(start, stop))
        rows.append({"config": name, "chunk": chunk, "ms": float(np.median(times))})
    return sorted(rows, key=lambda r: r["ms"])


def tune(shapes, dtype="float32", layouts=("NN",), epilogue="id", directory=None, progress=None) -> list[dict]:
    """Time every candidate for each ``(M, N, K)`` in ``shapes`` and layout; write the winners.

    Raises RuntimeError without a CUDA GPU (nothing is written)."""
    env = current_environment()
    if env is None:
        raise RuntimeError("gpufc tune needs a CUDA GPU (the active backend is not 'cuda'); nothing was written")
    path = store_path(directory)
    records = load(path)
    made = []
    jobs = [(s, lay) for s in shapes for lay in layouts]
    for i, ((m, n, k), layout) in enumerate(jobs):
        rows = time_problem(m, n, k, dtype, layout)
        best = rows[0]
        rec = {**_key(m, n, k, dtype, epilogue, layout), **env, "config": best["config"], "chunk": best["chunk"],
               "shape": [m, n, k], "timings_ms": rows}
        records = merge(records, rec)
        made.append(rec)
        if progress:
            progress(i + 1, len(jobs), rec)
    save(path, records)
    _cached.clear()
    return made


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"MxKxN"`` (the benchmarks' order: x (M, K) @ w (K, N)) -> (M, N, K)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a shape must be MxKxN with positive integers, e.g. 4096x4096x4096; got {text!r}")
    m, k, n = (int(p) for p in parts)
    return m, n, k


DEFAULT_SHAPES = ("4096x4096x4096", "8192x8192x8192", "256x1024x1024", "2048x4096x1024", "256x4096x4096",
                  "64x512x512", "8x1024x1024", "2048x1024x4096", "16384x4096x1024")


def cmd_tune(args) -> int:
    """``gpufc tune [SHAPE ...]``: time the candidates for each shape, keep the winners."""
    import sys

    try:
        shapes = [parse_shape(s) for s in (args.shapes or DEFAULT_SHAPES)]
    except ValueError as err:
        print(f"gpufc tune: {err}", file=sys.stderr)
        return 2
    try:
        env = current_environment()
    except Exception as err:  # noqa: BLE001 -- a broken driver is "no GPU" here
        env, reason = None, f"{type(err).__name__}: {err}"
    else:
        reason = "the active backend is not 'cuda' (no GPU reported by the driver, or GPUFC_BACKEND)"
    if env is None:
        print(f"gpufc tune: needs a CUDA GPU; {reason}. Nothing was timed or written.", file=sys.stderr)
        return 2
    layouts = tuple(args.layout or ("NN",))

    def progress(i, total, rec):
        bar = "#" * (30 * i // total)
        m, n, k = rec["shape"]
        print(f"[{bar:30s}] {i}/{total} {m}x{k}x{n} {rec['layout']}: {rec['config']}"
              + (f" split-K chunk {rec['chunk']}" if rec["chunk"] else "") + f" {rec['timings_ms'][0]['ms']:.3f} ms",
              flush=True)

    made = tune(shapes, args.dtype, layouts, directory=args.dir, progress=progress)
    print(f"wrote {len(made)} records to {store_path(args.dir)}")
    return 0


def _configure(p) -> None:
    p.add_argument("shapes", nargs="*", help="MxKxN shapes (x (M, K) @ w (K, N)); default: the benchmark list")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--layout", action="append", choices=LAYOUTS, help="operand layout(s); default NN")
    p.add_argument("--dir", default=None, help="store directory (default: the kernel cache directory)")


cmd_tune.configure = _configure
