"""The on-disk kernel cache (gpufc/runtime/cache.py): entries survive corruption, concurrent
writers and read-only directories; what it returns is what was compiled.

The cache's logic runs here with a stand-in compiler (fast, any tier); the
compile tier compiles real PTX in clean processes, two of them warming one
directory at once.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gpufc.runtime import cache as C
from gpufc.runtime.backend import kernels

ROOT = Path(__file__).resolve().parent.parent


def _spec(name="dropout_mask/v1/uint8"):
    return next(s for s in kernels().catalogue.specs() if s.name == name)


@pytest.fixture
def compiles(monkeypatch):
    """A stand-in for numba-cuda's compile: counts calls, returns PTX that names the kernel and arch."""
    calls = []

    def fake(spec, cc):
        calls.append((spec.name, tuple(cc)))
        arch = f"sm_{cc[0]}{cc[1]}"
        return C.Entry("entry_" + str(len(calls)), f"// PTX of {spec.name} for {arch}\n".encode(), b"\x7fELF" + b"x" * 64,
                       arch)

    monkeypatch.setattr(C, "compile_entry", fake)
    return calls


pytestmark = pytest.mark.reference


def test_second_get_reads_the_disk_entry(tmp_path, compiles):
    spec = _spec()
    first = C.KernelCache(tmp_path).get(spec, (9, 0))
    again = C.KernelCache(tmp_path).get(spec, (9, 0))  # a new process: an empty memory
    assert len(compiles) == 1
    assert again == first
    assert len(list(tmp_path.glob("*" + C.SUFFIX))) == 1
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_key_changes_with_arch_source_and_toolchain(monkeypatch):
    spec = _spec()
    k90 = C.key_of(C.describe(spec, (9, 0)))
    assert C.key_of(C.describe(spec, (8, 0))) != k90
    assert C.key_of(C.describe(_spec("bias_grad/v2/float32"), (9, 0))) != k90
    monkeypatch.setitem(C._digests, "toolchain", {"numba_cuda": "0.0.0", "nvvm": "x"})
    assert C.key_of(C.describe(spec, (9, 0))) != k90


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "garbage"])
def test_a_corrupt_or_foreign_entry_is_recompiled_with_a_warning(tmp_path, compiles, damage):
    spec = _spec()
    good = C.KernelCache(tmp_path).get(spec, (9, 0))
    (path,) = tmp_path.glob("*" + C.SUFFIX)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "foreign":  # another key's entry under this name
        other = C.KernelCache(tmp_path / "other").get(_spec("bias_grad/v2/float32"), (9, 0))
        assert other is not None
        path.write_bytes(next((tmp_path / "other").glob("*" + C.SUFFIX)).read_bytes())
    else:
        path.write_bytes(b"not a kernel at all")
    with pytest.warns(C.CacheWarning, match="corrupt or not this kernel's"):
        again = C.KernelCache(tmp_path).get(spec, (9, 0))
    assert again.ptx == good.ptx and again.arch == good.arch
    # the recompiled entry replaced the bad one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.KernelCache(tmp_path).get(spec, (9, 0)).ptx == good.ptx


def _readonly_dir(tmp_path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        return Path("/proc/self")  # root writes anywhere but here
    pytest.skip("no read-only directory available to root on this platform")


def test_read_only_directory_keeps_kernels_in_memory_with_one_warning(tmp_path, compiles):
    cache = C.KernelCache(_readonly_dir(tmp_path))
    with pytest.warns(C.CacheWarning, match="not writable") as record:
        a = cache.get(_spec(), (9, 0))
        b = cache.get(_spec("bias_grad/v2/float32"), (9, 0))
    assert len([w for w in record if issubclass(w.category, C.CacheWarning)]) == 1
    assert cache.get(_spec(), (9, 0)) is a and b.arch == "sm_90"
    assert len(compiles) == 2  # each compiled once, then served from memory


def test_cache_dir_that_is_a_file_is_a_clear_error(tmp_path, compiles):
    f = tmp_path / "cache"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match=str(f)):
        C.KernelCache(f).get(_spec(), (9, 0))


def test_switched_off_writes_nothing(tmp_path, compiles, monkeypatch):
    monkeypatch.setenv(C.ENV_SWITCH, "0")
    monkeypatch.setenv(C.ENV_DIR, str(tmp_path / "c"))
    cache = C.KernelCache()
    cache.get(_spec(), (9, 0))
    cache.get(_spec(), (9, 0))
    assert len(compiles) == 1 and not (tmp_path / "c").exists()
    assert cache.info()["disk"] is False


def test_info_counts_entries_and_bytes(tmp_path, compiles):
    cache = C.KernelCache(tmp_path)
    cache.get(_spec(), (8, 0))
    cache.get(_spec(), (9, 0))
    info = cache.info()
    assert info["directory"] == str(tmp_path) and info["entries"] == 2
    assert info["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*" + C.SUFFIX))


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(C.ENV_DIR, str(tmp_path / "here"))
    assert C.default_directory() == tmp_path / "here"
    monkeypatch.delenv(C.ENV_DIR)
    assert C.default_directory().name == "gpufc"


# ----------------------------------------------------------------------------
# Compile tier: real PTX, real processes
# ----------------------------------------------------------------------------


def _clean_env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUFC_BACKEND")}
    env.update(GPUFC_BACKEND="cpu", GPUFC_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    return env


@pytest.mark.compile
def test_two_processes_warming_one_directory(tmp_path):
    cmd = [sys.executable, "-m", "gpufc", "warmup", "--match", "dropout_mask", "--cc", "9.0", "-j", "1",
           "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    entries = list(tmp_path.glob("*" + C.SUFFIX))
    assert len(entries) == 1 and not list(tmp_path.glob(".*.tmp"))
    # the entry is whole and is what a fresh compile gives
    code = (
        "import sys; from gpufc.runtime import cache as C; from gpufc.runtime.backend import kernels\n"
        "spec = next(s for s in kernels().catalogue.specs() if s.name == 'dropout_mask/v1/uint8')\n"
        "meta = C.describe(spec, (9, 0)); key = C.key_of(meta)\n"
        "e = C._parse(open(sys.argv[1] + '/' + key + C.SUFFIX, 'rb').read(), key)\n"
        "fresh = C.compile_entry(spec, (9, 0))\n"
        "assert e.ptx == fresh.ptx and e.name == fresh.name, 'cached PTX differs from a fresh compile'\n"
        "print('OK', e.name[:20], len(e.ptx), e.cubin is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=_clean_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
