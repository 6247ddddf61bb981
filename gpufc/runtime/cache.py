"""The on-disk kernel cache: what gpufc compiles is kept between processes.

A kernel is compiled once per (kernel, toolchain, device) and stored as PTX
and, where nvJitLink can link it, a cubin, under one directory:

- ``GPUFC_CACHE_DIR`` if set, else the user cache directory
  (``platformdirs.user_cache_dir("gpufc")``, e.g. ``~/.cache/gpufc`` on Linux);
- ``GPUFC_CACHE=0`` turns the disk off (kernels are still kept in memory for
  the process).

Key: sha256 over the kernel's name, launch signature and launch bounds, its
Python source (the generated source for the register-tiled matmul), a digest
of every ``.py`` file of :mod:`gpufc.kernels` (the device functions it
inlines), the numba-cuda and NVVM versions and the compute capability. Change
any of them and the entry is simply another file.

One file per entry, ``<key>.kernel``: a format line, a JSON header (the key,
what it was computed from, the entry symbol, lengths and sha256 of the
payloads), then the PTX and the cubin. Writes go to a temporary file in the
same directory and are renamed over the entry (``os.replace``, atomic on
POSIX), so a reader in another process sees a whole entry or none. A file
that does not parse, fails its checksum or belongs to another key is
recompiled with a :class:`CacheWarning`, never an error. A directory that
cannot be created or written: entries already there are still read, new ones
are kept in memory for the process, with one warning. A cache directory that
is a file is a ``NotADirectoryError`` naming it.

Nothing here changes a result: an entry holds exactly the PTX that
``numba.cuda.compile_ptx`` produced for that key. The simulator never uses
the cache (it compiles nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path

ENV_DIR = "GPUFC_CACHE_DIR"
ENV_SWITCH = "GPUFC_CACHE"
FORMAT = b"gpufc-kernel-1\n"
SUFFIX = ".kernel"
_ENTRY = re.compile(r"\.entry\s+([A-Za-z0-9_$]+)\s*\(")


class CacheWarning(UserWarning):
    """The kernel cache recovered from something (a corrupt entry, a read-only directory)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One compiled kernel: its entry symbol, PTX text and (when linked) cubin for ``arch``."""

    name: str
    ptx: bytes
    cubin: bytes | None
    arch: str


def default_directory() -> Path:
    """``GPUFC_CACHE_DIR``, else the platform's user cache directory for gpufc."""
    env = os.environ.get(ENV_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("gpufc", appauthor=False))
    except ImportError:  # platformdirs is a dependency; this keeps a broken install working
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "gpufc"


def disk_enabled() -> bool:
    """False when ``GPUFC_CACHE=0`` (or ``off``/``false``/``no``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


# ----------------------------------------------------------------------------
# What a key is computed from
# ----------------------------------------------------------------------------

_digests: dict = {}


def kernels_digest() -> str:
    """sha256 over every ``.py`` file of the kernels package (read once per process)."""
    d = _digests.get("kernels")
    if d is None:
        from . import backend

        root = Path(backend.kernels().__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        d = _digests["kernels"] = h.hexdigest()
    return d


def toolchain() -> dict:
    """numba-cuda and NVVM versions (read once per process)."""
    t = _digests.get("toolchain")
    if t is None:
        try:
            numba_cuda = importlib.metadata.version("numba-cuda")
        except importlib.metadata.PackageNotFoundError:
            numba_cuda = "unknown"
        try:
            from cuda.bindings import nvvm

            nvvm_version = ".".join(map(str, nvvm.version())) + " ir " + ".".join(map(str, nvvm.ir_version()))
        except Exception:  # noqa: BLE001 -- no NVVM bindings: the wheel's version still names the compiler
            try:
                nvvm_version = "nvidia-nvvm " + importlib.metadata.version("nvidia-nvvm")
            except importlib.metadata.PackageNotFoundError:
                nvvm_version = "unknown"
        t = _digests["toolchain"] = {"numba_cuda": numba_cuda, "nvvm": nvvm_version}
    return t


def _source(pyfunc) -> str:
    try:
        return inspect.getsource(pyfunc)
    except (OSError, TypeError):  # no source to read: the name, signature and package digest still key it
        return getattr(pyfunc, "__qualname__", repr(pyfunc))


def describe(spec, cc) -> dict:
    """What the key of ``spec`` compiled for compute capability ``cc`` is computed from."""
    return {
        "spec": spec.name,
        "signature": spec.signature,
        "launch_bounds": list(spec.launch_bounds) if spec.launch_bounds else None,
        "source_sha256": hashlib.sha256(_source(spec.pyfunc).encode()).hexdigest(),
        "kernels_sha256": kernels_digest(),
        "cc": f"{cc[0]}.{cc[1]}",
        **toolchain(),
    }


def key_of(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------


def compile_entry(spec, cc) -> Entry:
    """PTX of ``spec`` for ``cc`` (numba-cuda's ``compile_ptx``) and, where nvJitLink links it, its cubin."""
    from numba import cuda

    ptx, _ = cuda.compile_ptx(spec.pyfunc, spec.signature, cc=tuple(cc), launch_bounds=spec.launch_bounds)
    found = _ENTRY.findall(ptx)
    if len(found) != 1:
        raise RuntimeError(f"{spec.name}: expected one kernel entry in its PTX, found {len(found)}")
    arch = f"sm_{cc[0]}{cc[1]}"
    return Entry(found[0], ptx.encode(), link_cubin(ptx, arch), arch)


def link_cubin(ptx: str, arch: str) -> bytes | None:
    """The cubin of ``ptx`` for ``arch`` via cuda.core's Linker (nvJitLink; no GPU needed), or None."""
    try:
        from cuda.core import Linker, LinkerOptions, ObjectCode

        return bytes(Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=arch)).link("cubin").code)
    except Exception:  # noqa: BLE001 -- no nvJitLink: the driver JIT-compiles the PTX at load time instead
        return None


# ----------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------


class KernelCache:
    """Compiled kernels by key: in memory for the process, on disk between processes.

    ``directory`` None reads ``GPUFC_CACHE_DIR`` / the user cache directory at
    first use; ``disk`` None reads ``GPUFC_CACHE``.
    """

    def __init__(self, directory=None, disk: bool | None = None):
        self._directory = Path(directory) if directory is not None else None
        self._disk = disk
        self._memory: dict = {}
        self._lock = threading.Lock()
        self._checked = False
        self._readonly = False

    # -- where --------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else default_directory()

    @property
    def disk(self) -> bool:
        return (disk_enabled() if self._disk is None else self._disk) and not self._readonly

    def _ready(self) -> bool:
        """Whether entries can be read from disk; creates the directory on first use."""
        if not (disk_enabled() if self._disk is None else self._disk):
            return False
        if not self._checked:
            d = self.directory
            if d.exists() and not d.is_dir():
                raise NotADirectoryError(
                    f"the kernel cache directory {str(d)!r} ({ENV_DIR}) is a file; point {ENV_DIR} at a "
                    f"directory or set {ENV_SWITCH}=0"
                )
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                self._go_readonly(d, err)
            self._checked = True
        return self.directory.is_dir()

    def _go_readonly(self, d: Path, err: OSError) -> None:
        if not self._readonly:
            self._readonly = True
            warnings.warn(
                f"kernel cache directory {str(d)!r} is not writable ({err.strerror or err}); compiled kernels "
                f"are kept in memory for this process only (set {ENV_DIR} to a writable directory, or "
                f"{ENV_SWITCH}=0 to silence this)", CacheWarning, stacklevel=4,
            )

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    # -- entries --------------------------------------------------------------------

    def get(self, spec, cc) -> Entry:
        """The compiled ``spec`` for ``cc``: from memory, else disk, else compiled now (and stored)."""
        meta = describe(spec, cc)
        key = key_of(meta)
        entry = self._memory.get(key)
        if entry is not None:
            return entry
        with self._lock:
            entry = self._memory.get(key)
            if entry is None:
                entry = self._read(key) if self._ready() else None
                if entry is None:
                    entry = compile_entry(spec, cc)
                    if self._ready() and not self._readonly:
                        self._write(key, meta, entry)
                self._memory[key] = entry
        return entry

    def _read(self, key: str) -> Entry | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            warnings.warn(f"kernel cache entry {str(path)!r} cannot be read ({err}); recompiling", CacheWarning,
                          stacklevel=4)
            return None
        try:
            return _parse(data, key)
        except (ValueError, KeyError, TypeError) as err:
            warnings.warn(f"kernel cache entry {str(path)!r} is corrupt or not this kernel's ({err}); recompiling",
                          CacheWarning, stacklevel=4)
            return None

    def _write(self, key: str, meta: dict, entry: Entry) -> None:
        d = self.directory
        header = {
            "key": key, "meta": meta, "name": entry.name, "arch": entry.arch,
            "ptx": [len(entry.ptx), hashlib.sha256(entry.ptx).hexdigest()],
            "cubin": [len(entry.cubin), hashlib.sha256(entry.cubin).hexdigest()] if entry.cubin else None,
        }
        blob = FORMAT + json.dumps(header, sort_keys=True).encode() + b"\n" + entry.ptx + (entry.cubin or b"")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=d)
        except OSError as err:
            self._go_readonly(d, err)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path(key))  # atomic: readers see the old entry, none, or this whole one
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._go_readonly(d, err)

    # -- reporting ------------------------------------------------------------------

    def info(self) -> dict:
        """Where the cache is, whether the disk is used, its entries and bytes on disk."""
        d = self.directory
        entries = sorted(d.glob(f"*{SUFFIX}")) if d.is_dir() else []
        return {
            "directory": str(d),
            "disk": (disk_enabled() if self._disk is None else self._disk),
            "entries": len(entries),
            "bytes": sum(p.stat().st_size for p in entries),
            "in_memory": len(self._memory),
        }

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()


def _parse(data: bytes, key: str) -> Entry:
    if not data.startswith(FORMAT):
        raise ValueError("not a gpufc kernel entry")
    rest = data[len(FORMAT):]
    line, sep, payload = rest.partition(b"\n")
    if not sep:
        raise ValueError("truncated header")
    header = json.loads(line)
    if header["key"] != key:
        raise ValueError(f"entry for key {str(header['key'])[:12]}..., expected {key[:12]}...")
    n_ptx, sha_ptx = header["ptx"]
    ptx, cubin = payload[:n_ptx], payload[n_ptx:]
    if len(ptx) != n_ptx or hashlib.sha256(ptx).hexdigest() != sha_ptx:
        raise ValueError("PTX checksum mismatch")
    if header["cubin"] is None:
        if cubin:
            raise ValueError("unexpected bytes after the PTX")
        cubin = None
    else:
        n_cubin, sha_cubin = header["cubin"]
        if len(cubin) != n_cubin or hashlib.sha256(cubin).hexdigest() != sha_cubin:
            raise ValueError("cubin checksum mismatch")
    return Entry(str(header["name"]), ptx, cubin, str(header["arch"]))


_default: list = []
_default_lock = threading.Lock()


def default() -> KernelCache:
    """The process-wide cache (its directory is read from the environment at first use)."""
    if not _default:
        with _default_lock:
            if not _default:
                _default.append(KernelCache())
    return _default[0]


# ----------------------------------------------------------------------------
# Warm-up: compile ahead of the first call
# ----------------------------------------------------------------------------

NO_GPU_ARCHS = ((8, 0), (9, 0))  # what `gpufc warmup` compiles for on a machine without a GPU


def target_archs() -> tuple:
    """The current device's compute capability, or sm_80 and sm_90 when there is no GPU."""
    from . import backend

    if backend.driver_device_count() > 0:
        try:
            from cuda.core import Device

            cc = Device().compute_capability
            return ((int(cc[0]), int(cc[1])),)
        except Exception:  # noqa: BLE001 -- a driver without a usable device: compile for the usual ones
            pass
    return NO_GPU_ARCHS


def warmup_specs(match: str | None = None) -> list:
    """The kernels of the default configurations (the catalogue without candidates), optionally filtered."""
    from . import backend

    specs = [s for s in backend.kernels().catalogue.specs() if s.default]
    return [s for s in specs if match is None or match in s.name]


_jobs: list = []


def _warm_one(i: int) -> tuple[str, str, bool]:
    spec, cc = _jobs[i]
    cache = default()
    key = key_of(describe(spec, cc))
    had = cache.path(key).is_file()
    cache.get(spec, cc)
    return spec.name, f"sm_{cc[0]}{cc[1]}", had


def warmup(specs, archs, jobs: int = 1, progress=None) -> dict:
    """Compile ``specs`` for each of ``archs`` into the cache (``jobs`` processes); counts what was done.

    ``progress(name)`` is called after each kernel. Entries already on disk
    are read, not recompiled; concurrent warm-ups of one directory are safe.
    """
    import concurrent.futures
    import multiprocessing

    _jobs[:] = [(s, cc) for cc in archs for s in specs if s.archs is None or cc in s.archs]
    done = {"compiled": 0, "cached": 0, "total": len(_jobs)}

    def tally(result):
        name, arch, had = result
        done["cached" if had else "compiled"] += 1
        if progress is not None:
            progress(f"{name} {arch}")

    if jobs <= 1 or len(_jobs) <= 1:
        for i in range(len(_jobs)):
            tally(_warm_one(i))
    else:
        ctx = multiprocessing.get_context("fork")  # workers inherit the specs (their Python functions)
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            for result in pool.map(_warm_one, range(len(_jobs))):
                tally(result)
    return done
