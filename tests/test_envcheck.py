"""gpufc.envcheck: the install extra an environment matches, what it lacks, the tested version range."""

import sys
import warnings

import pytest

from gpufc import envcheck

pytestmark = pytest.mark.reference


def _fake(monkeypatch, dists: dict, driver=None):
    monkeypatch.setattr(envcheck, "installed", lambda d: dists.get(d))
    monkeypatch.setattr(envcheck, "driver_cuda_version", lambda: driver)


CU13 = {"nvidia-nvvm": "13.5.37", "nvidia-cuda-nvrtc": "13.5.37", "nvidia-cuda-nvdisasm": "13.5.37",
        "numba-cuda": "0.30.4", "numpy": "2.4.6"}
CU12 = {"nvidia-cuda-nvcc-cu12": "12.9.86", "nvidia-cuda-nvrtc-cu12": "12.9.86", "nvidia-cuda-nvdisasm": "13.5.37",
        "numba-cuda": "0.30.4", "numpy": "2.4.6"}


@pytest.mark.parametrize("dists, driver, extra", [
    ({**CU13, "cupy-cuda13x": "14.2.0"}, (13, 0), "cuda13"),
    ({**CU12, "cupy-cuda12x": "14.2.0"}, (12, 4), "cuda12"),
    ({**CU12, "cupy-cuda12x": "14.2.0"}, (13, 0), "cuda12"),  # a newer driver runs older toolkits
])
def test_matching_environment_has_nothing_missing(monkeypatch, dists, driver, extra):
    _fake(monkeypatch, dists, driver)
    r = envcheck.report()
    assert r["matches"] == extra and r["missing"] == [] and r["versions"] == []


def test_no_gpu_no_extra(monkeypatch):
    _fake(monkeypatch, {"numba-cuda": "0.30.4", "numpy": "2.4.6"})
    r = envcheck.report()
    assert r["matches"] == "none (cpu/sim only)" and r["missing"] == [] and r["driver_cuda"] is None


def test_gpu_without_cupy_says_which_extra(monkeypatch):
    _fake(monkeypatch, dict(CU13), (13, 0))
    (line,) = envcheck.report()["missing"]
    assert "CuPy" in line and "gpufc[cuda13]" in line


def test_cuda13_toolkit_on_a_cuda12_driver(monkeypatch):
    _fake(monkeypatch, {**CU13, "cupy-cuda13x": "14.2.0"}, (12, 8))
    missing = envcheck.report()["missing"]
    assert any("cannot load" in m and "gpufc[cuda12]" in m for m in missing)
    assert any("cupy-cuda13x needs a CUDA 13 driver" in m for m in missing)


def test_mixed_cupy_and_toolkit(monkeypatch):
    _fake(monkeypatch, {**CU13, "cupy-cuda12x": "14.2.0"}, (13, 0))
    r = envcheck.report()
    assert r["matches"] == "none (cpu/sim only)"
    assert any("cupy-cuda12x is built for CUDA 12 but numba-cuda's toolkit is CUDA 13" in m for m in r["missing"])


def test_missing_nvdisasm(monkeypatch):
    dists = {**CU13, "cupy-cuda13x": "14.2.0"}
    del dists["nvidia-cuda-nvdisasm"]
    _fake(monkeypatch, dists, (13, 0))
    assert any(m.startswith("nvdisasm") for m in envcheck.report()["missing"])


@pytest.mark.parametrize("dist, version, ok", [
    ("numba-cuda", "0.30.4", True), ("numba-cuda", "0.30.9", True), ("numba-cuda", "0.30.3", False),
    ("numba-cuda", "0.31.0", False), ("numba-cuda", "0.20.1", False),
    ("numpy", "2.4.6", True), ("numpy", "1.24.0", True), ("numpy", "2.5.0", False), ("numpy", "2.5.2", False),
])
def test_tested_range(monkeypatch, dist, version, ok):
    _fake(monkeypatch, {**CU13, dist: version})
    problems = envcheck.version_problems()
    assert (problems == []) == ok
    if not ok:
        assert problems == [f"{dist} {version} is outside the tested range {envcheck.TESTED[dist]}"]


def test_warns_once(monkeypatch):
    _fake(monkeypatch, {**CU13, "numpy": "2.5.2"})
    monkeypatch.setattr(envcheck, "_warned", [])
    with pytest.warns(RuntimeWarning, match=r"numpy 2\.5\.2 is outside the tested range"):
        envcheck.warn_once_if_untested()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envcheck.warn_once_if_untested()


def test_tested_ranges_match_pyproject():
    import pathlib

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser from PyPI (the dev extra)
        import tomli as tomllib
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    root = pathlib.Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in ("cuda12", "cuda13") for r in project["optional-dependencies"][extra]]
    for dist, spec in envcheck.TESTED.items():
        found = {str(r.specifier) for r in reqs if r.name == dist}
        assert found == {str(SpecifierSet(spec))}, f"{dist}: pyproject says {found}, envcheck.TESTED says {spec}"
