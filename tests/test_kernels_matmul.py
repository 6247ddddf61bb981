"""Kernels tier: the version-2 register-tiled matmul (kernels.linear.v2_register_tiled) and the
v2 bias-gradient reduction, against gpufc.reference, on the GPU or in the simulator.

Every configuration x dtype it serves runs the forward (plain and the full
epilogue: gelu + bias + dropout + pre-activation) and both backward operand
layouts (NT: g @ w.T, TN: x.T @ g), on shapes that straddle tile edges in every
dimension. The simulator runs each thread in Python, so a 128 x 128 tile (256
threads) costs seconds: shapes stay within two tiles per side. Each distinct
(config, dtype, layout, epilogue) is one JIT compile on a GPU; this file uses
about 40.
"""

import numpy as np
import pytest
from conftest import requires_gpu
from helpers import assert_close, numeric_grad, tolerance

import gpufc
from gpufc.runtime import backend as _backend
from gpufc import reference as ref

pytestmark = pytest.mark.kernels

SEED = 2**33 + 7  # both key words non-zero
P = 0.3


def _kernels():
    return _backend.kernels()


def _cases(table: str):
    """(config name, dtype) for every configuration in the dtype's ``table`` (of kernels.linear.v2_register_tiled)."""
    from gpufc.kernels.linear import configs as matmul_tiled

    return [(name, np.dtype(dt).type) for dt, names in getattr(matmul_tiled, table).items() for name in names]


# Every configuration runs NN with the full epilogue, NT and TN; the configurations choose_config
# picks (PREFERRED) also the plain forward and the exact mask check (simulator time).
CASES = _cases("DTYPE_CONFIGS")
CASE_IDS = [f"{name}-{np.dtype(dt).name}" for name, dt in CASES]
CHOSEN = _cases("PREFERRED")
CHOSEN_IDS = [f"{name}-{np.dtype(dt).name}" for name, dt in CHOSEN]


def _cfg(name):
    return _kernels().linear.config_by_name(name)


def _launch(a, b, bias, m, n, dtype, *, ep, trans_a=False, trans_b=False, config, p=P, seed=SEED, offset=0):
    """Run ``launch_matmul`` on host arrays; returns (y, zout) on the host."""
    cuda = _backend.numba_cuda()
    k = _kernels()
    y = cuda.device_array((m, n), dtype)
    z = cuda.device_array((m, n), dtype) if ep.save_preact else y
    k.linear.launch_matmul(
        cuda.to_device(a), cuda.to_device(b), cuda.to_device(bias), y, z, trans_a=trans_a, trans_b=trans_b,
        ep=ep, key=(seed & 0xFFFFFFFF, seed >> 32), offset=offset, threshold=ref.dropout_threshold(p),
        scale=ref.dropout_scale(p, dtype), config=config,
    )
    cuda.synchronize()
    return y.copy_to_host(), (z.copy_to_host() if ep.save_preact else None)


def _data(rng, m, k, n, dtype):
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    return x, w, b


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


# ----------------------------------------------------------------------------
# Forward and the transposed layouts, every configuration
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,dtype", CHOSEN, ids=CHOSEN_IDS)
def test_forward_plain(device_backend, rng, name, dtype):
    cfg = _cfg(name)
    # one more row than a tile, a ragged column tile, K = one slice + a ragged remainder
    m, k, n = cfg.bm + 1, cfg.bk + 3, cfg.bn - 3
    x, w, b = _data(rng, m, k, n, dtype)
    ep = _kernels().linear.epilogue.PLAIN
    y, _ = _launch(x, w, b, m, n, dtype, ep=ep, config=name)
    rtol, atol = tolerance(dtype, k)
    assert_close(y, ref.linear(*_f64(x, w)), rtol=rtol, atol=atol, what=f"{name} x @ w")


@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_forward_full_epilogue(device_backend, rng, name, dtype):
    cfg = _cfg(name)
    # N odd and offset 3: most runs of 4 outputs straddle two Philox blocks
    m, k, n, offset = cfg.bm - 5, 2 * cfg.bk + 1, cfg.bn + 3, 3
    x, w, b = _data(rng, m, k, n, dtype)
    ep = _kernels().linear.epilogue.Epilogue("gelu", bias=True, dropout=True, save_preact=True)
    y, z = _launch(x, w, b, m, n, dtype, ep=ep, config=name, offset=offset)
    x64, w64, b64 = _f64(x, w, b)
    rtol, atol = tolerance(dtype, k)
    assert_close(z, x64 @ w64 + b64, rtol=rtol, atol=atol, what=f"{name} pre-activation")
    want = ref.linear(x64, w64, b64, activation="gelu", dropout_p=P, seed=SEED, offset=offset)
    dropped = ~ref.dropout_keep_mask((m, n), P, SEED, offset)
    assert (y[dropped] == 0).all(), f"{name}: {np.count_nonzero(y[dropped])} dropped outputs are not 0"
    assert_close(y, want, rtol=rtol, atol=atol, what=f"{name} gelu + dropout")


@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_grad_x_layout_nt(device_backend, rng, name, dtype):
    # grad_x = g (M, N) @ w.T, w read in its stored (K_in, N) layout: b operand (N', K') = w.
    cfg = _cfg(name)
    m, k, n = cfg.bm - 1, 5, cfg.bn - 1  # K below one slice
    g = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)  # stored (N, K): used transposed
    y, _ = _launch(g, w, np.zeros(n, dtype), m, n, dtype, ep=_kernels().linear.epilogue.PLAIN, trans_b=True, config=name)
    rtol, atol = tolerance(dtype, k)
    assert_close(y, g.astype(np.float64) @ w.astype(np.float64).T, rtol=rtol, atol=atol, what=f"{name} g @ w.T")


@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_grad_w_layout_tn(device_backend, rng, name, dtype):
    # grad_w = x.T @ g: x read in its stored (rows, K_in) layout as the a operand.
    cfg = _cfg(name)
    m, k, n = cfg.bm + 2, cfg.bk, cfg.bn - 7  # K exactly one slice
    xs = rng.standard_normal((k, m)).astype(dtype)  # stored (K, M): used transposed
    g = rng.standard_normal((k, n)).astype(dtype)
    y, _ = _launch(xs, g, np.zeros(n, dtype), m, n, dtype, ep=_kernels().linear.epilogue.PLAIN, trans_a=True, config=name)
    rtol, atol = tolerance(dtype, k)
    assert_close(y, xs.astype(np.float64).T @ g.astype(np.float64), rtol=rtol, atol=atol, what=f"{name} x.T @ g")


# ----------------------------------------------------------------------------
# Awkward shapes and the epilogue, on the smallest configuration
# ----------------------------------------------------------------------------

SMALL = "t32x32"
# (M, K, N): one element; primes below one tile; K = 1; several tiles with ragged edges in all three.
SHAPES = [(1, 1, 1), (7, 3, 5), (31, 1, 2), (67, 37, 71)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("layout", ["NN", "NT", "TN"])
def test_awkward_shapes_every_layout(device_backend, rng, m, k, n, layout):
    dtype = np.float32
    x, w, _ = _data(rng, m, k, n, dtype)
    a = x.T.copy() if layout[0] == "T" else x
    b = w.T.copy() if layout[1] == "T" else w
    y, _ = _launch(a, b, np.zeros(n, dtype), m, n, dtype, ep=_kernels().linear.epilogue.PLAIN,
                   trans_a=layout[0] == "T", trans_b=layout[1] == "T", config=SMALL)
    rtol, atol = tolerance(dtype, k)
    assert_close(y, ref.linear(*_f64(x, w)), rtol=rtol, atol=atol, what=f"{layout} {m}x{k}x{n}")


def test_k_zero_gives_the_epilogue_of_zero(device_backend):
    # K = 0: op(a) @ op(b) is the zero matrix, so y = dropout(act(0 + b)).
    m, n = 5, 6
    b = np.linspace(-1, 1, n).astype(np.float32)
    ep = _kernels().linear.epilogue.Epilogue("sigmoid", bias=True, dropout=True)
    y, _ = _launch(np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32), b, m, n, np.float32,
                   ep=ep, config=SMALL, offset=1)
    want = ref.linear(np.zeros((m, 0)), np.zeros((0, n)), b.astype(np.float64), activation="sigmoid",
                      dropout_p=P, seed=SEED, offset=1)
    assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "relu", "gelu_tanh", "tanh", "sigmoid"])
def test_every_activation_with_dropout(device_backend, rng, activation):
    m, k, n, dtype = 9, 7, 11, np.float32
    x, w, b = _data(rng, m, k, n, dtype)
    ep = _kernels().linear.epilogue.Epilogue(activation, bias=True, dropout=True)
    y, _ = _launch(x, w, b, m, n, dtype, ep=ep, config=SMALL, offset=2)
    want = ref.linear(*_f64(x, w, b), activation=activation, dropout_p=P, seed=SEED, offset=2)
    rtol, atol = tolerance(dtype, k)
    assert_close(y, want, rtol=rtol, atol=atol, what=str(activation))


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 - 2, 2**40 + 1])
@pytest.mark.parametrize("n", [8, 13])
def test_fused_dropout_mask_is_bit_exact(device_backend, offset, n):
    # x = 0 and b = 1 make every pre-dropout output exactly 1 (activation None),
    # so y is exactly scale where kept and exactly 0 where dropped: the mask, bit for bit.
    # n = 8 with offset % 4 == 0 takes the one-block path for every run of 4; the rest straddle.
    m, k, p = 37, 3, 0.4
    ep = _kernels().linear.epilogue.Epilogue(None, bias=True, dropout=True)
    y, _ = _launch(np.zeros((m, k), np.float32), np.ones((k, n), np.float32), np.ones(n, np.float32), m, n,
                   np.float32, ep=ep, config=SMALL, p=p, seed=77, offset=offset)
    keep = ref.dropout_keep_mask((m, n), p, 77, offset)
    assert np.array_equal(y != 0, keep)
    assert (y[keep] == ref.dropout_scale(p, np.float32)).all()


@pytest.mark.parametrize("name,dtype", CHOSEN, ids=CHOSEN_IDS)
def test_fused_mask_every_config(device_backend, name, dtype):
    # The full-epilogue specialisation of each config with x = 0, b = 1: z == 1 exactly,
    # y == scale * gelu(1) where kept and 0 where dropped.
    cfg = _cfg(name)
    m, k, n, offset = cfg.bm + 1, 2, cfg.bn - 1, 2**32 + 1
    ep = _kernels().linear.epilogue.Epilogue("gelu", bias=True, dropout=True, save_preact=True)
    y, z = _launch(np.zeros((m, k), dtype), np.ones((k, n), dtype), np.ones(n, dtype), m, n, dtype,
                   ep=ep, config=name, offset=offset)
    keep = ref.dropout_keep_mask((m, n), P, SEED, offset)
    assert (z == 1).all()
    assert np.array_equal(y != 0, keep)
    kept = y[keep]
    assert (kept == kept[0]).all()
    assert_close(kept[:1], ref.linear(np.zeros((1, 1)), np.ones((1, 1)), np.ones(1), activation="gelu")[0] *
                 ref.dropout_scale(P, dtype), rtol=4 * np.finfo(dtype).eps, atol=0)


# ----------------------------------------------------------------------------
# Configuration table and launcher contract
# ----------------------------------------------------------------------------


def test_choose_config_prefers_big_tiles_for_big_problems(device_backend):
    mm = _kernels().linear
    assert mm.choose_config(4096, 4096, 4096, np.float32).name == mm.PREFERRED[np.dtype(np.float32)][0]
    small = mm.choose_config(64, 64, 4096, np.float32)
    assert small.bm * small.bn < 128 * 128
    for dt in (np.float32, np.float64):
        for shape in ((1, 1, 1), (100000, 3, 7), (8, 4096, 8192)):
            assert mm.choose_config(*shape, dt).name in mm.PREFERRED[np.dtype(dt)]
    for dt, names in mm.PREFERRED.items():
        assert set(names) <= set(mm.DTYPE_CONFIGS[dt]), f"{dt}: PREFERRED {names} outside DTYPE_CONFIGS"


def test_config_by_name_and_errors(device_backend):
    mm = _kernels().linear
    for cfg in mm.CONFIGS:
        assert mm.config_by_name(cfg.name) is cfg
        assert cfg.threads == (cfg.bm // cfg.tm) * (cfg.bn // cfg.tn)
    assert mm.resolve_config("v1_t16", 1, 1, 1, np.float32) is mm.V1
    with pytest.raises(ValueError, match="config must be one of"):
        mm.config_by_name("t7x7")


def test_v1_still_selectable(device_backend, rng):
    m, k, n = 17, 5, 9
    x, w, b = _data(rng, m, k, n, np.float64)
    y, _ = _launch(x, w, b, m, n, np.float64, ep=_kernels().linear.epilogue.Epilogue(None, bias=True), config="v1_t16")
    assert_close(y, ref.linear(x, w, b), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# Backward: bias gradient, the functional path, finite differences
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n", [(0, 5), (1, 1), (37, 70), (203, 33)])
def test_bias_grad_v2(device_backend, rng, dtype, m, n):
    cuda = _backend.numba_cuda()
    g = rng.standard_normal((m, n)).astype(dtype)
    out = cuda.device_array(n, dtype)
    _kernels().linear.launch_bias_grad(cuda.to_device(g) if m else cuda.device_array((0, n), dtype), out)
    rtol, atol = tolerance(dtype, m)
    assert_close(out.copy_to_host(), g.astype(np.float64).sum(0), rtol=rtol, atol=atol, what="column sums")


@pytest.mark.parametrize("activation,dropout_p", [(None, 0.0), ("tanh", 0.5), ("gelu", 0.25)])
def test_linear_backward_matches_reference(device_backend, rng, activation, dropout_p):
    m, k, n = 19, 13, 10
    x, w, b = _data(rng, m, k, n, np.float64)
    go = rng.standard_normal((m, n))
    kw = {"activation": activation, "dropout_p": dropout_p, "seed": 5, "offset": 6}
    _, z = gpufc.linear_forward(x, w, b, save_preact=True, **kw)
    got = gpufc.linear_backward(x, w, go, z, biases=b, **kw)
    want = ref.linear_backward(x, w, go, biases=b, **kw)
    for name, g, e in zip(("grad_x", "grad_weights", "grad_biases"), got, want):
        assert_close(g, e, rtol=1e-12, atol=1e-12, what=name)


def test_linear_backward_matches_finite_differences(device_backend, rng):
    # L = sum(go * linear(x, w, b)) in float64; central differences of the reference forward
    # (the mask is fixed by seed/offset, so L is smooth away from no kinks with tanh).
    m, k, n = 4, 3, 5
    x, w, b = _data(rng, m, k, n, np.float64)
    go = rng.standard_normal((m, n))
    kw = {"activation": "tanh", "dropout_p": 0.25, "seed": 9, "offset": 1}

    def loss(x_, w_, b_):
        return float((go * ref.linear(x_, w_, b_, **kw)).sum())

    gx, gw, gb = gpufc.linear_backward(x, w, go, biases=b, **kw)

    def f():  # closes over the arrays numeric_grad() perturbs in place
        return loss(x, w, b)

    assert_close(gx, numeric_grad(f, x), rtol=1e-6, atol=1e-7, what="grad_x vs finite differences")
    assert_close(gw, numeric_grad(f, w), rtol=1e-6, atol=1e-7, what="grad_weights vs finite differences")
    assert_close(gb, numeric_grad(f, b), rtol=1e-6, atol=1e-7, what="grad_biases vs finite differences")


# ----------------------------------------------------------------------------
# Real GPU only: grid and index limits
# ----------------------------------------------------------------------------


@requires_gpu
def test_rows_beyond_the_grid_y_limit(device_backend, rng):
    # 65537 row tiles of t32x32: row tiles live on grid.x, whose limit is 2**31 - 1.
    m, k, n = 65536 * 32 + 5, 3, 5
    x, w, b = _data(rng, m, k, n, np.float32)
    ep = _kernels().linear.epilogue.Epilogue(None, bias=True, dropout=True)
    y, _ = _launch(x, w, b, m, n, np.float32, ep=ep, config=SMALL, offset=7)
    want = ref.linear(*_f64(x, w, b), dropout_p=P, seed=SEED, offset=7)
    assert_close(y, want, rtol=1e-5, atol=1e-5)


@requires_gpu
def test_output_past_2_to_the_31_elements(device_backend):
    # y has 2**31 + 2048 elements (8 GiB); the last rows' values and dropout mask must be right.
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    cuda = _backend.numba_cuda()
    m, n = 2**20 + 1, 2048
    x = cupy.ones((m, 1), cupy.float32)
    x[-3:, 0] = cupy.asarray([2.0, 3.0, 4.0], cupy.float32)
    w = cupy.ones((1, n), cupy.float32)
    b = cupy.zeros(n, cupy.float32)
    y = cupy.empty((m, n), cupy.float32)
    yv = cuda.as_cuda_array(y)
    _kernels().linear.launch_matmul(
        cuda.as_cuda_array(x), cuda.as_cuda_array(w), cuda.as_cuda_array(b), yv, yv,
        ep=_kernels().linear.epilogue.Epilogue(None, bias=True, dropout=True), key=(SEED & 0xFFFFFFFF, SEED >> 32),
        offset=5, threshold=ref.dropout_threshold(P), scale=ref.dropout_scale(P, np.float32), config=SMALL,
    )
    tail = cupy.asnumpy(y[-3:])
    del y, yv
    keep = ref.dropout_keep_mask((3, n), P, SEED, 5 + (m - 3) * n)  # rows m-3.. start at this element
    want = np.where(keep, np.array([[2.0], [3.0], [4.0]], np.float32) * ref.dropout_scale(P, np.float32), 0)
    assert np.array_equal(tail, want)
