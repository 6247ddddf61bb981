"""Kernels tier: the version-3 matmul (kernels/linear/v3_pipelined.py) and split-K with its
deterministic reduction (kernels/linear/splitk.py), against gpufc.reference, on the GPU or
in the simulator.

Each configuration runs the three operand layouts (NN forward, NT grad_x, TN grad_w)
with vector loads (contiguous dimensions multiples of 4) and with scalar loads (odd
dimensions). Split-K: the result bits depend on the K chunk only, never on the tile
configuration or the reduction's launch geometry, and one chunk equals the unsplit
kernel bit for bit. The simulator runs each thread in Python: shapes stay within a
few tiles, and the 8 x 8 thread-tile configurations run once each.
"""

import importlib

import numpy as np
import pytest
from helpers import Launched, StandIn, assert_close, tolerance

from gpufc import reference as ref
from gpufc.runtime import backend as _backend

pytestmark = pytest.mark.kernels

SEED = 2**33 + 7
P = 0.3
SMALL = ("v3_t32x32", "v3_t64x64")  # 2 x 2 and 4 x 4 thread tiles: cheap in the simulator


def _mods():
    _backend.kernels()  # the backend (and the simulator switch) before the kernel modules
    v3 = importlib.import_module("gpufc.kernels.linear.v3_pipelined")
    sk = importlib.import_module("gpufc.kernels.linear.splitk")
    ep = importlib.import_module("gpufc.kernels.linear.epilogue")
    return v3, sk, ep


def _cfg(name):
    v3, _, _ = _mods()
    return next(c for c in v3.CONFIGS if c.name == name)


def _run(a, b, bias, m, n, *, cfg, ep, trans_a=False, trans_b=False, chunk=None, offset=0, p=P):
    """``v3.launch`` on host arrays; returns (y, zout) on the host."""
    cuda = _backend.numba_cuda()
    v3, sk, _ = _mods()
    dtype = a.dtype
    k = a.shape[0] if trans_a else a.shape[1]
    y = cuda.device_array((m, n), dtype)
    z = cuda.device_array((m, n), dtype) if ep.save_preact else y
    ws = None if chunk is None else cuda.device_array((sk.splits_for(k, chunk), m, n), dtype)
    v3.launch(cuda.to_device(a), cuda.to_device(b), cuda.to_device(bias), y, z, cfg=cfg, trans_a=trans_a,
              trans_b=trans_b, ep=ep, key=(SEED & 0xFFFFFFFF, SEED >> 32), offset=offset,
              threshold=ref.dropout_threshold(p), scale=ref.dropout_scale(p, dtype), chunk=chunk, ws=ws)
    cuda.synchronize()
    return y.copy_to_host(), (z.copy_to_host() if ep.save_preact else None)


def _operands(rng, m, k, n, layout, dtype=np.float32):
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    a = x.T.copy() if layout[0] == "T" else x
    b = w.T.copy() if layout[1] == "T" else w
    return x, w, a, b


# ----------------------------------------------------------------------------
# Version 3: every layout, vector and scalar loads
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("layout", ["NN", "NT", "TN"])
@pytest.mark.parametrize("name", SMALL)
def test_v3_layouts(device_backend, rng, name, layout, vector):
    cfg = _cfg(name)
    # vector: every dimension a multiple of 4; scalar: odd. One more row tile than fits,
    # a ragged column tile, K = two slices plus a ragged remainder (3 slices: the pipeline's
    # first, middle and last trips).
    m, k, n = (cfg.bm + 4, 2 * cfg.bk + 4, cfg.bn - 4) if vector else (cfg.bm + 3, 2 * cfg.bk + 3, cfg.bn - 5)
    x, w, a, b = _operands(rng, m, k, n, layout)
    v3, _, ep = _mods()
    cuda = _backend.numba_cuda()
    assert v3.vector_ok(cuda.to_device(a), cuda.to_device(b), m, n, k, layout[0] == "T", layout[1] == "T") == vector
    y, _ = _run(a, b, np.zeros(n, np.float32), m, n, cfg=cfg, ep=ep.PLAIN, trans_a=layout[0] == "T",
                trans_b=layout[1] == "T")
    rtol, atol = tolerance(np.float32, k)
    assert_close(y, x.astype(np.float64) @ w.astype(np.float64), rtol=rtol, atol=atol, what=f"{name} {layout}")


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 3, 7), (3, 0, 4)])
def test_v3_tiny_and_empty_k(device_backend, rng, m, k, n):
    # one element, below one slice, K = 0 (y = epilogue(0) = act(b))
    _, _, ep = _mods()
    x, w, a, b = _operands(rng, m, k, n, "NN")
    bias = rng.standard_normal(n).astype(np.float32)
    y, _ = _run(a, b, bias, m, n, cfg=_cfg("v3_t32x32"), ep=ep.Epilogue("tanh", bias=True))
    want = ref.linear(x.astype(np.float64), w.astype(np.float64), bias.astype(np.float64), activation="tanh")
    assert_close(y, want, rtol=1e-5, atol=1e-5, what=f"{m}x{k}x{n}")


def test_v3_large_tile_full_epilogue_vector_loads(device_backend, rng):
    # The large default with vector loads (tests/test_kernels_matmul.py runs it on odd shapes,
    # the scalar loader): gelu + bias + dropout + pre-activation, offset 3 so runs of 4 outputs
    # straddle Philox blocks; the mask exactly.
    cfg = _cfg("v3_t128x128k16w")
    m, k, n, offset = 12, cfg.bk + 4, 16, 3
    x, w, a, b = _operands(rng, m, k, n, "NN")
    bias = rng.standard_normal(n).astype(np.float32)
    _, _, ep = _mods()
    y, z = _run(a, b, bias, m, n, cfg=cfg, ep=ep.Epilogue("gelu", bias=True, dropout=True, save_preact=True),
                offset=offset)
    x64, w64, b64 = (v.astype(np.float64) for v in (x, w, bias))
    rtol, atol = tolerance(np.float32, k)
    assert_close(z, x64 @ w64 + b64, rtol=rtol, atol=atol, what="pre-activation")
    keep = ref.dropout_keep_mask((m, n), P, SEED, offset)
    assert (y[~keep] == 0).all()
    want = ref.linear(x64, w64, b64, activation="gelu", dropout_p=P, seed=SEED, offset=offset)
    assert_close(y, want, rtol=rtol, atol=atol, what="gelu + dropout")


def test_v3_same_bits_whatever_the_tile(device_backend, rng):
    # Every output is a chain of multiply-adds in ascending k from 0, whatever the tile:
    # two configurations (different block, thread tile and grid) give the same bits.
    _, _, ep = _mods()
    m, k, n = 37, 29, 41
    _, _, a, b = _operands(rng, m, k, n, "NN")
    bias = np.zeros(n, np.float32)
    y1, _ = _run(a, b, bias, m, n, cfg=_cfg("v3_t32x32"), ep=ep.PLAIN)
    y2, _ = _run(a, b, bias, m, n, cfg=_cfg("v3_t64x64"), ep=ep.PLAIN)
    assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32))


# ----------------------------------------------------------------------------
# Split-K
# ----------------------------------------------------------------------------


def test_splitk_matches_reference_and_applies_the_epilogue_once(device_backend, rng):
    # 4 chunks of 24 (the last ragged); bias, relu, dropout and the pre-activation once, after the sum.
    _, _, ep = _mods()
    m, k, n = 13, 90, 22
    x, w, a, b = _operands(rng, m, k, n, "NN")
    bias = rng.standard_normal(n).astype(np.float32)
    full = ep.Epilogue("relu", bias=True, dropout=True, save_preact=True)
    y, z = _run(a, b, bias, m, n, cfg=_cfg("v3_t32x32"), ep=full, chunk=24, offset=5)
    x64, w64, b64 = (v.astype(np.float64) for v in (x, w, bias))
    rtol, atol = tolerance(np.float32, k)
    assert_close(z, x64 @ w64 + b64, rtol=rtol, atol=atol, what="split-K pre-activation")
    assert_close(y, ref.linear(x64, w64, b64, activation="relu", dropout_p=P, seed=SEED, offset=5),
                 rtol=rtol, atol=atol, what="split-K relu + dropout")


@pytest.mark.parametrize("layout", ["NN", "NT", "TN"])
def test_splitk_bits_do_not_depend_on_the_launch_geometry(device_backend, rng, layout):
    # Same chunk, different tile configurations (block 32 x 32 / 64 x 64, 2 x 2 / 4 x 4 thread
    # tiles: different grids) and reduction geometries (blocks of 32, 64 or 256 threads, one
    # block looping over every output or one thread per run of 4): identical bits.
    cuda = _backend.numba_cuda()
    _, sk, ep = _mods()
    m, k, n, chunk = 20, 40, 13, 16  # 3 chunks, the last ragged
    _, _, a, b = _operands(rng, m, k, n, layout)
    bias = rng.standard_normal(n).astype(np.float32)
    full = ep.Epilogue("sigmoid", bias=True, dropout=True)
    ta, tb = layout[0] == "T", layout[1] == "T"
    y1, _ = _run(a, b, bias, m, n, cfg=_cfg("v3_t32x32"), ep=full, trans_a=ta, trans_b=tb, chunk=chunk)
    y2, _ = _run(a, b, bias, m, n, cfg=_cfg("v3_t64x64"), ep=full, trans_a=ta, trans_b=tb, chunk=chunk)
    assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32)), "the tile configuration changed the bits"
    # the reduction alone, over one workspace, at two geometries
    v3, _, _ = _mods()
    splits = sk.splits_for(k, chunk)
    ws = cuda.device_array((splits, m, n), np.float32)
    part = v3.make_partial_kernel(_cfg("v3_t32x32"), np.float32, ta, tb, False)
    cfg = _cfg("v3_t32x32")
    part[(-(-m // cfg.bm), -(-n // cfg.bn), splits), (cfg.threads,)](
        cuda.to_device(a.ravel()), cuda.to_device(b.ravel()), ws, np.uint64(k), np.uint64(chunk))
    red = sk.make_reduce_kernel(np.float32, full)
    outs = []
    runs = m * -(-n // 4)  # runs of 4 outputs: one per thread per trip of the grid-stride loop
    for blocks, threads in ((1, 32), (-(-runs // 32), 32), (3, 64), (sk.reduce_grid(m, n), sk.REDUCE_THREADS)):
        y = cuda.device_array((m, n), np.float32)
        red[blocks, threads](ws, cuda.to_device(bias), y, y, np.uint32(SEED & 0xFFFFFFFF), np.uint32(SEED >> 32),
                             np.uint64(0), np.uint64(ref.dropout_threshold(P)), np.float32(ref.dropout_scale(P, np.float32)))
        outs.append(y.copy_to_host())
    for out in outs[1:]:
        assert np.array_equal(outs[0].view(np.uint32), out.view(np.uint32)), "the reduction geometry changed the bits"
    assert np.array_equal(outs[0].view(np.uint32), y1.view(np.uint32))


def test_one_chunk_equals_the_unsplit_kernel(device_backend, rng):
    _, _, ep = _mods()
    m, k, n = 21, 40, 19
    _, _, a, b = _operands(rng, m, k, n, "NN")
    bias = rng.standard_normal(n).astype(np.float32)
    e = ep.Epilogue("gelu_tanh", bias=True)
    y1, _ = _run(a, b, bias, m, n, cfg=_cfg("v3_t32x32"), ep=e)
    y2, _ = _run(a, b, bias, m, n, cfg=_cfg("v3_t32x32"), ep=e, chunk=64)
    assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32))


def test_splitk_workspace_is_checked(device_backend, rng):
    cuda = _backend.numba_cuda()
    v3, _, ep = _mods()
    a, b = np.ones((4, 40), np.float32), np.ones((40, 4), np.float32)
    y = cuda.device_array((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"ws must be a \(3, 4, 4\) float32 workspace"):
        v3.launch(cuda.to_device(a), cuda.to_device(b), cuda.to_device(np.zeros(4, np.float32)), y, y,
                  cfg=_cfg("v3_t32x32"), ep=ep.PLAIN, chunk=16, ws=cuda.device_array((2, 4, 4), np.float32))


def test_choose_chunk_rule(device_backend):
    _, sk, _ = _mods()
    assert sk.choose_chunk(4096, 4096, 4096, tiles=1024, sms=132) is None  # the grid fills the GPU
    assert sk.choose_chunk(8, 1024, 300, tiles=32, sms=132) is None  # K too short for two chunks
    chunk = sk.choose_chunk(64, 512, 512, tiles=16, sms=132)
    assert chunk % sk.CHUNK_QUANTUM == 0 and sk.splits_for(512, chunk) == 2
    chunk = sk.choose_chunk(8, 1024, 4096, tiles=32, sms=132)
    assert chunk % sk.CHUNK_QUANTUM == 0 and 2 <= sk.splits_for(4096, chunk) <= 132 // 32
    with pytest.raises(ValueError, match="chunk must be a positive"):
        sk.splits_for(10, 0)


def test_default_table(device_backend):
    # The device class's default table: the largest tile that fills 132 SMs, else split-K on the
    # smallest; float64 keeps version 2's tiles; every row names a configuration of the table.
    _backend.kernels()
    lin = importlib.import_module("gpufc.kernels.linear")
    assert lin.choose_config(4096, 4096, 4096, np.float32).name == "v3_t128x128k16w"
    small = lin.choose_config(64, 512, 512, np.float32)
    assert small.name == "v3_t32x32" and lin.configs.choose_chunk(small, 64, 512, 512, np.float32) == 256
    assert lin.configs.choose_chunk(small, 4096, 4096, 4096, np.float32) is None
    assert lin.choose_config(4096, 4096, 4096, np.float64).name == "t128x64"
    for names in lin.PREFERRED.values():
        assert all(lin.config_by_name(name) for name in names)


def test_launch_matmul_routes_to_split_k(device_backend, rng, monkeypatch):
    # gpufc.linear on a skinny shape runs split-K through the default table, with the same
    # bits as version 3 forced with that chunk.
    import gpufc

    lin = importlib.import_module("gpufc.kernels.linear")
    monkeypatch.setattr(lin.configs, "choose_chunk", lambda *args, **kwargs: 16)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    w = rng.standard_normal((40, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    y = gpufc.linear(x, w, b, activation="relu")
    _, _, ep = _mods()
    want, _ = _run(x, w, b, 5, 6, cfg=lin.choose_config(5, 6, 40, np.float32), ep=ep.Epilogue("relu", bias=True),
                   chunk=16)
    assert np.array_equal(np.asarray(y).view(np.uint32), want.view(np.uint32))


# ----------------------------------------------------------------------------
# The split-K rule, the vector-load test and the launch limits, at their boundaries
# ----------------------------------------------------------------------------


def test_choose_chunk_boundaries(device_backend):
    # The documented rule, case by case (Q = CHUNK_QUANTUM = 256, 132 SMs): split only when
    # tiles * 2 <= sms and K >= 2 Q; aim at want = max(2, min(sms // tiles, K // Q)) splits;
    # chunk = ceil(ceil(K / want) / Q) * Q.
    _, sk, _ = _mods()
    q = sk.CHUNK_QUANTUM
    assert q == 256
    assert sk.choose_chunk(8, 8, 4096, tiles=66, sms=132) is not None  # 66 * 2 == 132: half idle is enough
    assert sk.choose_chunk(8, 8, 4096, tiles=67, sms=132) is None
    assert sk.choose_chunk(8, 8, 2 * q, tiles=1, sms=132) == q  # K = 2 Q: two chunks of Q
    assert sk.choose_chunk(8, 8, 2 * q - 1, tiles=1, sms=132) is None
    # want = min(132 // 4, 4096 // 256) = min(33, 16) = 16 -> ceil(4096 / 16) = 256
    assert sk.choose_chunk(8, 8, 4096, tiles=4, sms=132) == 256
    # want = min(132 // 1, 51200 // 256) = min(132, 200) = 132 -> ceil(51200 / 132) = 388 -> 512
    assert sk.choose_chunk(8, 8, 51200, tiles=1, sms=132) == 512
    # want = max(2, min(132 // 66, 16)) = 2 -> 2048
    assert sk.choose_chunk(8, 8, 4096, tiles=66, sms=132) == 2048
    # want = min(132 // 20, 1000 // 256) = min(6, 3) = 3 -> ceil(1000 / 3) = 334 -> 512
    assert sk.choose_chunk(8, 8, 1000, tiles=20, sms=132) == 512


def test_splits_for(device_backend):
    _, sk, _ = _mods()
    assert sk.splits_for(0, 256) == 1  # K = 0: one (empty) chunk, the epilogue of zero
    assert sk.splits_for(10, 16) == 1
    assert sk.splits_for(32, 16) == 2
    assert sk.splits_for(33, 16) == 3
    assert sk.splits_for(5, 1) == 5
    for bad in (0, -16):
        with pytest.raises(ValueError, match="chunk must be a positive"):
            sk.splits_for(10, bad)


@pytest.mark.parametrize("dim", [1, 2, 3, 5, 6, 7, 9, 10, 12, 15, 20])
def test_vector_ok_needs_multiples_of_4_and_16_byte_alignment(device_backend, dim):
    # host NumPy arrays stand in for device arrays: vector_ok reads their addresses only
    v3, _, _ = _mods()
    buf = np.zeros(64, np.float32)
    base = buf[(-buf.ctypes.data % 16) // 4:]  # 16-byte aligned
    a, b, off = base[:32], base[:32], base[1:33]
    four = dim % 4 == 0
    # the stored contiguous dimension: K of a (NN), M of a (TN); N of b (NN), K of b (NT)
    assert v3.vector_ok(a, b, 8, 8, dim, False, False) is four
    assert v3.vector_ok(a, b, dim, 8, 8, True, False) is four
    assert v3.vector_ok(a, b, 8, dim, 8, False, False) is four
    assert v3.vector_ok(a, b, 8, 8, dim, False, True) is four
    assert v3.vector_ok(a, b, 8, 8, 8, False, False)
    assert not v3.vector_ok(off, b, 8, 8, 8, False, False)
    assert not v3.vector_ok(a, off, 8, 8, 8, False, False)


def test_launch_limits_at_their_boundaries(device_backend, monkeypatch):
    v3, sk, ep = _mods()

    def launched(*args, **kwargs):
        raise Launched

    monkeypatch.setattr(v3, "make_kernel", launched)
    monkeypatch.setattr(v3, "make_partial_kernel", launched)
    cfg = _cfg("v3_t32x32")
    bias = StandIn(8)

    def go(a, b, y, **kw):
        v3.launch(a, b, bias, y, y, cfg=cfg, ep=ep.PLAIN, **kw)

    # operands of 2**32 - 1 elements go through, of 2**32 do not (32-bit indices)
    big = v3.U32_LIMIT
    with pytest.raises(Launched):
        go(StandIn(1, big - 1), StandIn(big - 1, 1), StandIn(1, 1))
    with pytest.raises(ValueError, match=r"fewer than 2\*\*32 elements, got 4294967296"):
        go(StandIn(1, big), StandIn(big, 1), StandIn(1, 1))
    with pytest.raises(ValueError, match=r"fewer than 2\*\*32 elements"):
        go(StandIn(1, 8), StandIn(8, big // 8), StandIn(1, big // 8))
    # 65535 column tiles go through, one column more does not
    n = 65535 * cfg.bn
    with pytest.raises(Launched):
        go(StandIn(1, 8), StandIn(8, n), StandIn(1, n))
    with pytest.raises(ValueError, match=r"at most 65535 column tiles"):
        go(StandIn(1, 8), StandIn(8, n + 1), StandIn(1, n + 1))
    # 65535 K chunks go through, 65536 do not
    for splits, ok in ((65535, True), (65536, False)):
        k = splits * sk.CHUNK_QUANTUM
        a, b, y = StandIn(1, k), StandIn(k, 1), StandIn(1, 1)
        ws = StandIn(splits, 1, 1)
        with pytest.raises(Launched) if ok else pytest.raises(ValueError, match="into 65536 splits; at most 65535"):
            go(a, b, y, chunk=sk.CHUNK_QUANTUM, ws=ws)


@pytest.mark.parametrize("version", [2, 3])
def test_shared_memory_limit_is_inclusive(device_backend, monkeypatch, version):
    # A tile that needs exactly the static limit compiles; one byte less of limit refuses it, naming both.
    v3, _, ep = _mods()
    if version == 2:
        gen = importlib.import_module("gpufc.kernels.linear.v2_register_tiled")
        cfg, source = importlib.import_module("gpufc.kernels.linear.configs").config_by_name("t64x64"), "tiled_source"
    else:
        gen, cfg, source = v3, _cfg("v3_t64x64"), "pipelined_source"
    need = cfg.shared_bytes(np.dtype(np.float32))
    monkeypatch.setattr(gen, "SMEM_LIMIT", need)
    getattr(gen, source)(cfg, np.float32, False, False, ep.PLAIN)
    monkeypatch.setattr(gen, "SMEM_LIMIT", need - 1)
    with pytest.raises(ValueError, match=rf"{cfg.name} needs {need} bytes of shared memory in float32, over the "
                                         rf"{need - 1}-byte static limit"):
        getattr(gen, source)(cfg, np.float32, False, False, ep.PLAIN)


def _undefined_names(text: str, known) -> set:
    """Names the generated kernel reads that nothing in it binds (nor its globals, nor builtins)."""
    import ast
    import builtins

    tree = ast.parse(text)
    bound = set(known) | set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.Lambda)):
            bound.update(a.arg for a in node.args.args)
            if isinstance(node, ast.FunctionDef):
                bound.add(node.name)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def test_generated_kernels_read_only_names_they_define(device_backend):
    # Numba compiles every branch of a kernel, the simulator runs only the taken ones: a name read in
    # a branch no test reaches (say, the epilogue's staging of an accumulator row past the tile) would
    # pass the simulator and fail to compile on a GPU. Every v2, v3 and tensor-core specialisation,
    # every layout (the tensor-core kernel holds both its copy paths; a test takes one of them).
    _backend.kernels()
    v2 = importlib.import_module("gpufc.kernels.linear.v2_register_tiled")
    configs = importlib.import_module("gpufc.kernels.linear.configs")
    tc = importlib.import_module("gpufc.kernels.linear.tensorcore")
    v3, _, ep = _mods()
    full = ep.Epilogue("gelu", bias=True, dropout=True, save_preact=True)
    checked = 0
    for ta in (False, True):
        for tb in (False, True):
            for cfg in tc.CONFIGS:
                for kind in tc.KINDS:
                    for e in (ep.PLAIN, full):
                        text, glb = tc.mma_source(cfg, kind, ta, tb, e)
                        assert not _undefined_names(text, glb), (cfg.name, kind, ta, tb)
                        checked += 1
            for cfg in v3.CONFIGS:
                for vec in (False, True):
                    for e, split in ((ep.PLAIN, False), (full, False), (ep.PLAIN, True)):
                        text, glb = v3.pipelined_source(cfg, np.float32, ta, tb, e, vec, split)
                        assert not _undefined_names(text, glb), (cfg.name, ta, tb, vec, split)
                        checked += 1
            for cfg in (c for c in configs.CONFIGS if c.version == 2):
                for dt in configs.DTYPE_CONFIGS:
                    if cfg.name not in configs.DTYPE_CONFIGS[dt]:
                        continue
                    text, glb = v2.tiled_source(cfg, dt, ta, tb, full)
                    assert not _undefined_names(text, glb), (cfg.name, dt, ta, tb)
                    checked += 1
    assert checked > 150
