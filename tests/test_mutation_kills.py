"""Tests written for mutants that survived the mutation run (tests/mutation.py, docs/testing.md).

Each test names the mutant class it kills. The dropout boundary (word == threshold) has its own
file, tests/test_boundaries.py.
"""

import numpy as np
import pytest

import gpufc
from gpufc import reference as ref

SEED = 0x0123456789ABCDEF


def _word(seed, n):
    block = n // 4
    counter = np.array([block & 0xFFFFFFFF, block >> 32, 0, 0], np.uint32)
    return int(ref.philox4x32_10(counter, np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32))[n % 4])


@pytest.mark.reference
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 * 4 + 3])
def test_one_element_masks_follow_the_contract(offset):
    # kills: a size-1 tensor treated as empty (`if size == 0` -> `if size == 1` in dropout_keep_mask)
    w = _word(SEED, offset)
    for p, kept in ((w / 2**32, True), ((w + 1) / 2**32, False), (0.0, True)):
        assert ref.dropout_keep_mask(1, p, SEED, offset).tolist() == [kept]
        assert ref.dropout_keep_mask((1, 1), p, SEED, offset).tolist() == [[kept]]
        y = ref.dropout(np.array([3.0]), p, seed=SEED, offset=offset)
        assert (y[0] != 0) == kept


@pytest.mark.reference
def test_dropout_layer_with_rate_zero_draws_no_mask(cpu_backend):
    # kills: `dropout_rate > 0` -> `>= 0` in DropoutLayer.forward (the offset would advance with no mask drawn,
    # as FullyConnectedLayer without dropout already guarantees)
    layer = gpufc.DropoutLayer(0.0, seed=3)
    x = np.ones((2, 5), np.float32)
    np.testing.assert_array_equal(layer.forward(x), x)
    assert layer.offset == 0


@pytest.mark.reference
def test_reference_takes_array_likes():
    # kills: a dropped `x = np.asarray(x)` in reference.dropout, linear and linear_backward
    x, w, b = [[1.0, -2.0, 0.5]], [[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]], [0.25, -0.5]
    xa, wa, ba = np.array(x), np.array(w), np.array(b)
    np.testing.assert_array_equal(ref.dropout(x[0], 0.5, seed=SEED), ref.dropout(xa[0], 0.5, seed=SEED))
    np.testing.assert_array_equal(ref.linear(x, w, b, activation="tanh"), ref.linear(xa, wa, ba, activation="tanh"))
    go = [[1.0, -1.0]]
    for got, want in zip(ref.linear_backward(x, w, go, biases=b, activation="tanh"),
                         ref.linear_backward(xa, wa, np.array(go), biases=ba, activation="tanh")):
        np.testing.assert_array_equal(got, want)


@pytest.mark.reference
def test_linear_backward_without_bias_recomputes_the_preactivation():
    # kills: `x @ w + (0 if biases is None ...)` -> `+ (1 ...)` when backward recomputes z = x @ w
    rng = np.random.default_rng(5)
    x, w, go = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
    g = go * (1.0 - np.tanh(x @ w) ** 2)  # d tanh(z) / dz = 1 - tanh(z)^2
    gx, gw, gb = ref.linear_backward(x, w, go, activation="tanh")
    np.testing.assert_allclose(gx, g @ w.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, x.T @ g, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb, g.sum(axis=0), rtol=1e-12, atol=1e-12)


@pytest.mark.reference
def test_packed_size_is_the_byte_count_of_every_size():
    # kills: `-(-size // 8)` -> `// 7` or `// 9` (sizes below 8 bytes' worth agree by chance)
    for size in range(80):
        assert ref.packed_size(size) == (size + 7) // 8, size
        mask = np.arange(size) % 3 == 0
        assert np.array_equal(ref.unpack_mask(ref.pack_mask(mask), size), mask)


@pytest.mark.kernels
@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 9, 10])
def test_every_column_remainder_of_the_group_store(device_backend, n):
    # kills: an off-by-one in any of the register-tiled epilogue's column guards (`col + j < n_cols`): the
    # last run of 4 columns ends 1, 2 or 3 columns past N, so every N % 4 (and N below one run) is tried
    rng = np.random.default_rng(n)
    m, k = 3, 2
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    y = gpufc.linear(x, w, b, activation="relu", dropout_p=0.25, seed=SEED, offset=1)
    want = ref.linear(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), activation="relu",
                      dropout_p=0.25, seed=SEED, offset=1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("operand", ["x", "weights"])
def test_v1_zero_fills_the_ragged_k_tile(device_backend, operand):
    # kills: a dropped `a_tile[ty, tx] = zero` / `b_tile[ty, tx] = zero` in the version-1 kernel. The last
    # K tile (K = 19 = 16 + 3) then keeps the first tile's values past K, multiplied by the other
    # operand's zeros: invisible for finite values, but inf * 0 is NaN where the right answer is +inf.
    rng = np.random.default_rng(19)
    m, k, n = 5, 19, 7
    x = rng.uniform(0.5, 1.5, (m, k)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, (k, n)).astype(np.float32)
    if operand == "x":
        x[2, 5] = np.inf  # k = 5 < 16: tile 0, at a position that is padding in the last tile
    else:
        w[5, 3] = np.inf
    y = gpufc.linear(x, w, config="v1_t16")
    want = x.astype(np.float64) @ w.astype(np.float64)  # +inf where the inf meets positive values, else finite
    assert np.isposinf(want).sum() == (n if operand == "x" else m)
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(y[finite], want[finite], rtol=1e-5)
    assert not np.isnan(y).any()


@pytest.mark.kernels
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
@pytest.mark.parametrize("vector", [True, False])
def test_dropout_v2_in_place_visits_each_group_once(device_backend, offset, vector):
    # kills: `j += 2 * stride` -> `j += 1 * stride` in version 2's pair loop, and `j_lo = 1 if head > 0`
    # -> `if head > 1` (offset % 4 == 1: the cut first group also taken by the main loop). With y apart
    # from x such a group is written twice with the same value; y may alias x (the launcher's contract),
    # and in place a second visit scales the kept values again.
    from gpufc.kernels import dropout as kd
    from numba import cuda

    if vector and offset % 4:
        pytest.skip("16-byte accesses need offset % 4 == 0")
    x = np.linspace(-3, 3, 4 * 8 * 6 + 3).astype(np.float32)  # several trips of 8 threads, a ragged tail
    xd = cuda.to_device(x)
    p = 0.25
    kd.launch_dropout(xd, xd, key=(SEED & 0xFFFFFFFF, SEED >> 32), offset=offset, threshold=ref.dropout_threshold(p),
                      scale=ref.dropout_scale(p, np.float32), version=2, vector=vector, blocks=1, threads=8)
    np.testing.assert_array_equal(xd.copy_to_host(), ref.dropout(x, p, seed=SEED, offset=offset))


@pytest.mark.kernels
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("n,offset", [(1, 1), (2, 1), (1, 3), (3, 1), (2, 2)])
def test_dropout_v2_in_place_one_cut_group(device_backend, n, offset, threads):
    # kills: `j_end > 0 or head == 0` -> `j_end >= 0` in version 2's tail rule. When the tensor lies
    # inside one Philox group cut at both ends (n + offset % 4 < 4) the head group is the tail group:
    # taken as both, it is visited twice, and in place (y aliasing x) scaled twice.
    from gpufc.kernels import dropout as kd
    from numba import cuda

    x = np.arange(1, n + 1, dtype=np.float32)
    xd = cuda.to_device(x)
    p = 0.01  # almost every element kept: a second visit shows as a second scaling
    kd.launch_dropout(xd, xd, key=(SEED & 0xFFFFFFFF, SEED >> 32), offset=offset, threshold=ref.dropout_threshold(p),
                      scale=ref.dropout_scale(p, np.float32), version=2, vector=False, blocks=1, threads=threads)
    np.testing.assert_array_equal(xd.copy_to_host(), ref.dropout(x, p, seed=SEED, offset=offset))


@pytest.mark.reference
@pytest.mark.parametrize("layer_kind", ["dropout", "fc"])
def test_layer_offset_wraps_modulo_2_to_the_64(cpu_backend, layer_kind):
    # kills: `% 2**64` -> `% 2**63`, `% 2**65`, `% 3**64` in the layers' offset advance. The counter
    # space is 2**64 elements: past its end the offset wraps, as the mask contract's offset does.
    seed, p = 11, 0.5
    layer = gpufc.DropoutLayer(p, seed=seed) if layer_kind == "dropout" else \
        gpufc.FullyConnectedLayer(2, 4, dropout_rate=p, seed=seed)
    x = np.ones((2, 4) if layer_kind == "dropout" else (2, 2), np.float32)  # 8 outputs: one 8-element advance
    for start, after in ((2**63, 2**63 + 8), (2**64 - 4, 4), (2**64 - 8, 0)):
        layer.offset = start
        layer.forward(x)
        assert layer.offset == after, (start, layer.offset)
    y = layer.forward(x)  # drawn at offset 0, the wrapped one
    keep = ref.dropout_keep_mask((2, 4), p, seed, 0)
    assert np.array_equal(np.asarray(y) != 0, keep)


@pytest.mark.kernels
def test_fc_backward_follows_the_last_forward(device_backend, rng):
    # kills: a dropped `self._ctx = ...` in FullyConnectedLayer.forward (device path, and the empty batch):
    # backward must see the inputs of the LAST forward, not a stale earlier one.
    layer = gpufc.FullyConnectedLayer(3, 4, activation="relu", seed=5)
    w, b = np.asarray(layer.weights, np.float64), np.asarray(layer.biases, np.float64)
    x1 = rng.standard_normal((5, 3)).astype(np.float32)
    x2 = rng.standard_normal((2, 3)).astype(np.float32)
    g2 = rng.standard_normal((2, 4)).astype(np.float32)
    layer.forward(x1)
    layer.forward(x2)
    gx = layer.backward(g2)
    _, gw_want, gb_want = ref.linear_backward(x2.astype(np.float64), w, g2.astype(np.float64), biases=b,
                                             activation="relu")
    np.testing.assert_allclose(np.asarray(layer.grad_weights), gw_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.grad_biases), gb_want, rtol=1e-5, atol=1e-5)
    assert np.asarray(gx).shape == (2, 3)
    layer.forward(np.zeros((0, 3), np.float32))  # an empty batch: its backward gives empty / zero gradients
    gx0 = layer.backward(np.zeros((0, 4), np.float32))
    assert np.asarray(gx0).shape == (0, 3)
    assert not np.asarray(layer.grad_weights).any() and not np.asarray(layer.grad_biases).any()


@pytest.mark.kernels
def test_kernel_launchers_run_the_version_asked_for(device_backend, monkeypatch):
    # kills: `version == 1` -> `== 0` in launch_dropout, `version == 2` flips in launch_act_dropout_backward's
    # vec16 choice, and a dropped `_check_version`. Both versions give the same bits (the contract), so only
    # the plan each launcher asks for shows which kernel ran: a benchmark of version 1 must run version 1.
    from gpufc.kernels import dropout as kd
    from numba import cuda

    asked = []
    plan, bwd_plan = kd.dropout_plan, kd.act_dropout_backward_plan
    monkeypatch.setattr(kd, "dropout_plan", lambda n, dtype, version, *a: asked.append(("fwd", version)) or
                        plan(n, dtype, version, *a))
    monkeypatch.setattr(kd, "act_dropout_backward_plan", lambda n, dtype, act, drop, vec16, *a:
                        asked.append(("bwd", 2 if vec16 else 1)) or bwd_plan(n, dtype, act, drop, vec16, *a))
    x = cuda.to_device(np.linspace(-1, 1, 16).astype(np.float32))
    y = cuda.device_array(16, np.float32)
    kw = {"key": (3, 4), "offset": 0, "threshold": ref.dropout_threshold(0.5), "scale": 2.0}
    for version in (1, 2):
        kd.launch_dropout(x, y, version=version, **kw)
        kd.launch_act_dropout_backward(x, x, y, activation="relu", dropout=True, version=version, **kw)
    assert asked == [("fwd", 1), ("bwd", 1), ("fwd", 2), ("bwd", 2)]
    for launch in (lambda: kd.launch_dropout(x, y, version=3, **kw),
                   lambda: kd.launch_act_dropout_backward(x, x, y, activation="relu", dropout=True, version=3, **kw)):
        with pytest.raises(ValueError, match="version must be 1 or 2, got version=3"):
            launch()


@pytest.mark.kernels
@pytest.mark.parametrize("size", [1, 5, 8, 9])
def test_packed_mask_launcher_fills_one_byte_masks(device_backend, size):
    # kills: `nbytes == 0` -> `== 1` in launch_dropout_mask (a mask of one byte left unwritten)
    from gpufc.kernels import dropout as kd
    from numba import cuda

    p, offset = 0.25, 3
    mask = cuda.to_device(np.full(-(-size // 8), 0xA5, np.uint8))  # a pattern the kernel must overwrite
    kd.launch_dropout_mask(mask, size=size, key=(SEED & 0xFFFFFFFF, SEED >> 32), offset=offset,
                           threshold=ref.dropout_threshold(p))
    np.testing.assert_array_equal(mask.copy_to_host(), ref.dropout_keep_mask_packed(size, p, SEED, offset))


def _bias_grad_v2_order(g):
    """Version 2's column sums in its own order, in g's dtype: lane l of 8 sums rows l, l + 8, ...
    into four partial sums (rows l + 32 t + 8 u into s_u while a whole group of four fits, the rest
    into s0), adds (s0 + s1) + (s2 + s3), and lane 0 adds the eight lanes in order."""
    m, n = g.shape
    lanes, step, zero = 8, 32, g.dtype.type(0)
    out = np.empty(n, g.dtype)
    for j in range(n):
        partial = []
        for lane in range(lanes):
            s = [zero] * 4
            i = lane
            while i + 3 * lanes < m:
                for u in range(4):
                    s[u] = s[u] + g[i + u * lanes, j]
                i += step
            while i < m:
                s[0] = s[0] + g[i, j]
                i += lanes
            partial.append((s[0] + s[1]) + (s[2] + s[3]))
        acc = zero
        for p in partial:
            acc = acc + p
        out[j] = acc
    return out


@pytest.mark.kernels
@pytest.mark.parametrize("m", [23, 24, 25, 31, 32, 56, 57, 91])
def test_bias_grad_v2_sums_in_its_fixed_order(device_backend, rng, m):
    # kills: the unrolled loop's bound (`i + 3 lanes < m` made `<=`: a read past the last row when a
    # group of four ends exactly at M; made `i - 3 lanes`: the unrolled loop skipped, other sums). The
    # order is fixed, so the bits are too: they equal a float32 model of that order exactly.
    from gpufc.kernels import linear as kl
    from numba import cuda

    g = rng.standard_normal((m, 37)).astype(np.float32)
    out = cuda.device_array(37, np.float32)
    kl.launch_bias_grad(cuda.to_device(g), out)
    np.testing.assert_array_equal(out.copy_to_host().view(np.uint32), _bias_grad_v2_order(g).view(np.uint32))
