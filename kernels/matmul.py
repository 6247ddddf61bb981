"""Tiled matmul-plus-bias with the fused epilogue, forward and backward.

Math, one naming scheme throughout::

    forward:   x (M, K) @ w (K, N) + b (N) -> act -> dropout -> y (M, N)
    backward:  g (M, N) @ w.T -> grad_x (M, K)          (trans_b: w read as (K, N), used as (N, K))
               x.T @ g (M, N) -> grad_w (K, N)          (trans_a: x read as (M, K), used as (K, M))

Every version computes ``c = op(a) @ op(b)`` followed by an :class:`Epilogue`;
``trans_a`` / ``trans_b`` are kernel specialisations that read the operand in
its stored layout, never a host transpose. FLOPs: ``2 M N K``; the fewest
bytes moved are ``(M K + K N + M N) * itemsize`` (+ ``M N`` for a kept
pre-activation).

Version 1 (this file's ``v1``): the textbook shared-memory tiling. A block of
T x T threads owns a T x T tile of the output, one element per thread; it walks
K in steps of T, staging a T x T tile of each operand in shared memory
(``2 T^2 itemsize`` bytes: 2 KiB for float32 at T = 16). Each fused
multiply-add costs two shared loads, so it is bound by shared-memory bandwidth
at a small fraction of peak: it is the baseline every later version is
measured against, and it is kept forever.

Grid: blockIdx.x walks the row tiles (limit 2**31 - 1, so M has no practical
limit), blockIdx.y the column tiles (65535 * T columns).

Version 2 (:mod:`kernels.matmul_tiled`): register-tiled (8 x 8 outputs per
thread at 128 x 128), double-buffered shared memory, generated straight-line
inner product (85% FFMA in the main loop's SASS, static), epilogue on the
registers staged through shared memory for coalesced stores. Its
configurations are :data:`CONFIGS`; :func:`choose_config` picks one by shape.
``launch_matmul(config=None)`` runs version 2 as chosen; ``config=V1`` (or a
configuration or its name) overrides, for benchmarks.

Column sums for the bias gradient: ``bias_grad_v1`` (one thread per column,
the baseline) and ``bias_grad_v2`` (32 columns x 8 row lanes per block, four
independent sums per thread, a shared-memory reduction; deterministic).
"""

import dataclasses
import functools

import numba
import numpy as np
from numba import cuda, uint32, uint64

from .epilogue import PLAIN, Epilogue, make_epilogue
from .launch import fast, serialised_in_sim
from .matmul_tiled import (
    CONFIGS,
    DTYPE_CONFIGS,
    PREFERRED,
    SMS,
    TileConfig,
    choose_config,
    config_by_name,
    tiled_function,
)
from .matmul_tiled import signature as tiled_signature

__all__ = [
    "CONFIGS",
    "DTYPE_CONFIGS",
    "PREFERRED",
    "V1",
    "TileConfig",
    "V1Config",
    "catalogue",
    "choose_config",
    "config_by_name",
    "launch_bias_grad",
    "launch_matmul",
    "make_matmul_kernel",
    "resolve_config",
]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class V1Config:
    """Version 1: one output element per thread, ``tile`` x ``tile`` threads per block."""

    tile: int = 16
    version: int = 1

    def __post_init__(self):
        assert self.tile in (4, 8, 16, 32), (
            f"The v1 tile must be 4, 8, 16 or 32 so a block is at most 1024 threads; got {self.tile}."
        )

    @property
    def name(self) -> str:
        return f"v1_t{self.tile}"

    @property
    def threads(self) -> int:
        return self.tile * self.tile

    def shared_bytes(self, dtype) -> int:
        return 2 * self.tile * self.tile * np.dtype(dtype).itemsize

    def grid(self, m: int, n: int) -> tuple[int, int]:
        return ceil_div(m, self.tile), ceil_div(n, self.tile)

    def block(self) -> tuple[int, int]:
        return self.tile, self.tile


V1 = V1Config()


def signature(dtype, trans_a=False, trans_b=False) -> str:
    """The one launch signature every matmul version shares (C-contiguous operands).

    (a, b, bias, y, zout, k0, k1, offset, threshold, scale)
    """
    t = numba.from_dtype(np.dtype(dtype))
    return (
        f"void({t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], "
        f"uint32, uint32, uint64, uint64, {t})"
    )


def _v1_source(cfg: V1Config, dtype, trans_a: bool, trans_b: bool, ep: Epilogue):
    """The Python function of a version-1 kernel (not yet compiled)."""
    T = cfg.tile
    nbtype = numba.from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)
    store = make_epilogue(ep, dtype)

    def matmul_v1(a, b, bias, y, zout, k0, k1, offset, threshold, scale):
        # a is (M, K) ((K, M) if trans_a), b is (K, N) ((N, K) if trans_b), y and zout (M, N)
        m, n = y.shape
        k = a.shape[0] if trans_a else a.shape[1]
        a_tile = cuda.shared.array((T, T), nbtype)
        b_tile = cuda.shared.array((T, T), nbtype)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.x * T + ty
        col = cuda.blockIdx.y * T + tx
        acc = zero
        for k0_tile in range(0, k, T):
            # Populate the shared tiles; out-of-range elements are zeros so the
            # inner loop needs no bounds checks. tx runs along rows in memory
            # for the untransposed operands, so those loads coalesce.
            ka = k0_tile + tx
            if row < m and ka < k:
                a_tile[ty, tx] = a[ka, row] if trans_a else a[row, ka]
            else:
                a_tile[ty, tx] = zero
            kb = k0_tile + ty
            if kb < k and col < n:
                b_tile[ty, tx] = b[col, kb] if trans_b else b[kb, col]
            else:
                b_tile[ty, tx] = zero
            # Both tiles must be complete before any thread reads them.
            cuda.syncthreads()
            for kk in range(T):
                acc += a_tile[ty, kk] * b_tile[kk, tx]
            # Every thread must be done reading before the next step overwrites the tiles.
            cuda.syncthreads()
        if row < m and col < n:
            store(y, zout, bias, row, col, acc, n, k0, k1, offset, threshold, scale)

    return matmul_v1


@functools.cache
def make_matmul_kernel(cfg, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN):
    """Compiled kernel for one (config, dtype, transposes, epilogue), cached."""
    src = kernel_source(cfg, dtype, trans_a, trans_b, ep)
    if isinstance(cfg, TileConfig):
        bounds = cfg.launch_bounds(trans_a, trans_b)
        # the simulator's jit takes no launch_bounds (and has no registers to bound)
        options = {"launch_bounds": bounds} if bounds and not numba.config.ENABLE_CUDASIM else {}
        return cuda.jit(tiled_signature(dtype), **options)(src)
    return cuda.jit(signature(dtype, trans_a, trans_b))(src)


def kernel_source(cfg, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN):
    """The uncompiled Python function for ``cfg``, for ``cuda.compile_ptx``."""
    if isinstance(cfg, V1Config):
        return _v1_source(cfg, np.dtype(dtype).type, trans_a, trans_b, ep)
    if isinstance(cfg, TileConfig):
        return tiled_function(cfg, np.dtype(dtype).type, bool(trans_a), bool(trans_b), ep)
    raise TypeError(f"config must be a matmul configuration, got {cfg!r}")


def kernel_signature(cfg, dtype, trans_a=False, trans_b=False) -> str:
    """The launch signature of ``cfg``'s kernels (v1: 2-D operands; v2: flat operands and K)."""
    return tiled_signature(dtype) if isinstance(cfg, TileConfig) else signature(dtype, trans_a, trans_b)


_sm_count: list = []


def device_sm_count() -> int:
    """Streaming multiprocessors of the current device, read once (the H100's 132 in the simulator)."""
    if not _sm_count:
        try:
            _sm_count.append(int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
        except Exception:  # noqa: BLE001 -- the simulator's device has no attribute table
            _sm_count.append(SMS)
    return _sm_count[0]


def resolve_config(config, m: int, n: int, k: int, dtype):
    """``config`` as a configuration object: None -> :func:`choose_config`; a name -> that
    configuration (``"v1_t16"`` is V1); a V1Config or TileConfig as given."""
    if config is None:
        return choose_config(m, n, k, dtype, sms=device_sm_count())
    if isinstance(config, str):
        return V1 if config == V1.name else config_by_name(config)
    if isinstance(config, (V1Config, TileConfig)):
        return config
    raise TypeError(f"config must be None, a configuration or its name, got config={config!r}")


U32_LIMIT = 2**32


@serialised_in_sim
def launch_matmul(a, b, bias, y, zout, *, trans_a=False, trans_b=False, ep: Epilogue = PLAIN,
                  key=(0, 0), offset=0, threshold=0, scale=0.0, config=None, stream=0):
    """Launch ``y = epilogue(op(a) @ op(b))`` on device arrays (Numba views, C-contiguous).

    Shapes: a (M, K) or (K, M) with trans_a; b (K, N) or (N, K) with trans_b;
    bias (N,) (any 1-element array when ``ep.bias`` is False); y (M, N);
    zout (M, N) (may be ``y`` when ``ep.save_preact`` is False).
    The caller has validated shapes and dtypes; M, N > 0 (K may be 0: y = epilogue(0)).
    ``config``: None picks by shape (:func:`choose_config`); ``V1``, a
    :class:`TileConfig` or a configuration name overrides.
    """
    dtype = np.dtype(y.dtype)
    m, n = y.shape
    k = a.shape[0] if trans_a else a.shape[1]
    cfg = resolve_config(config, m, n, k, dtype)
    kern = make_matmul_kernel(cfg, dtype.type, bool(trans_a), bool(trans_b), ep)
    grid = cfg.grid(m, n)
    if grid[1] > 65535:
        raise ValueError(f"y has {n} columns; {cfg.name} launches at most 65535 column tiles "
                         f"({65535 * (cfg.bn if isinstance(cfg, TileConfig) else cfg.tile)} columns)")
    tail = (np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset), np.uint64(threshold), dtype.type(scale))
    if isinstance(cfg, V1Config):
        fast(kern)(grid, cfg.block(), stream, a, b, bias, y, zout, *tail)
        return
    if max(m, n, k) >= U32_LIMIT:
        raise ValueError(f"M, N and K must each be below 2**32 for {cfg.name}, got M={m}, N={n}, K={k}")
    # The tiled kernels index the operands flat (one index per run of 4 loads).
    fast(kern)(grid, cfg.block(), stream, a.reshape(a.size), b.reshape(b.size), bias, y, zout, np.uint64(k), *tail)


def bias_grad_v1_source(dtype):
    zero = np.dtype(dtype).type(0)

    def bias_grad_v1(g, out):
        # g is (M, N), out is (N,): out[j] = sum_i g[i, j]. One thread per column;
        # consecutive threads read consecutive columns of a row, so loads coalesce.
        j = cuda.grid(1)
        if j < out.size:
            acc = zero
            for i in range(g.shape[0]):
                acc += g[i, j]
            out[j] = acc

    return bias_grad_v1


def _bias_grad_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[:, ::1], {t}[::1])"


BIAS_COLS = 32  # columns per block: a warp reads 32 consecutive elements of a row
BIAS_LANES = 8  # row lanes per block: 256 threads; lane l sums rows l, l + 8, ...
BIAS_UNROLL = 4  # independent partial sums per thread, so 4 loads are in flight


def bias_grad_v2_source(dtype):
    nbtype = numba.from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)
    cols, lanes = np.uint64(BIAS_COLS), np.uint64(BIAS_LANES)
    step = np.uint64(BIAS_LANES * BIAS_UNROLL)
    two, three = np.uint64(2), np.uint64(3)

    def bias_grad_v2(g, out):
        # g is (M, N), out is (N,): out[j] = sum_i g[i, j]. Block: BIAS_COLS columns x
        # BIAS_LANES row lanes; a warp reads 32 consecutive columns of one row.
        partial = cuda.shared.array((BIAS_LANES, BIAS_COLS), nbtype)
        c = uint64(uint32(cuda.threadIdx.x)) % cols
        lane = uint64(uint32(cuda.threadIdx.x)) // cols
        j = uint64(uint32(cuda.blockIdx.x)) * cols + c
        m = uint64(g.shape[0])
        n = uint64(g.shape[1])
        s0 = s1 = s2 = s3 = zero
        if j < n:
            i = lane
            while i + three * lanes < m:
                s0 += g[i, j]
                s1 += g[i + lanes, j]
                s2 += g[i + two * lanes, j]
                s3 += g[i + three * lanes, j]
                i += step
            while i < m:
                s0 += g[i, j]
                i += lanes
        partial[lane, c] = (s0 + s1) + (s2 + s3)
        # Every lane's partial sum must be in shared memory before lane 0 adds them.
        cuda.syncthreads()
        if lane == uint64(0) and j < n:
            acc = zero
            for r in range(BIAS_LANES):
                acc += partial[r, c]
            out[j] = acc

    return bias_grad_v2


@functools.cache
def make_bias_grad_kernel(dtype, version=2):
    src = bias_grad_v2_source if version == 2 else bias_grad_v1_source
    return cuda.jit(_bias_grad_sig(dtype))(src(np.dtype(dtype).type))


BIAS_GRAD_THREADS = 128  # v1


@serialised_in_sim
def launch_bias_grad(g, out, *, stream=0, version=2):
    """``out (N,) = g (M, N).sum(0)``, N > 0 (M may be 0: the sum is then 0). ``version=1`` runs the baseline."""
    kern = make_bias_grad_kernel(np.dtype(g.dtype).type, version)
    if version == 1:
        fast(kern)(ceil_div(out.size, BIAS_GRAD_THREADS), BIAS_GRAD_THREADS, stream, g, out)
    else:
        fast(kern)(ceil_div(out.size, BIAS_COLS), BIAS_COLS * BIAS_LANES, stream, g, out)


def catalogue():
    """KernelSpec entries for every configuration (see kernels.catalogue): per
    configuration and dtype, the forward (NN, plain and the full epilogue) and
    the two backward operand layouts (NT: g @ w.T, TN: x.T @ g)."""
    from .catalogue import KernelSpec

    full = Epilogue("gelu", bias=True, dropout=True, save_preact=True)
    variants = ((False, False, PLAIN, "NN"), (False, False, full, "NN"), (False, True, PLAIN, "NT"),
                (True, False, PLAIN, "TN"))
    for dt in (np.float32, np.float64):
        dn = np.dtype(dt).name
        for cfg in [V1] + [config_by_name(c) for c in DTYPE_CONFIGS[np.dtype(dt)]]:
            # a candidate choose_config does not pick yet: the forward only, for sm_90 (compile-tier time)
            candidate = cfg is not V1 and cfg.name not in PREFERRED[np.dtype(dt)]
            for ta, tb, ep, tag in variants[:1] if candidate else variants:
                yield KernelSpec(
                    f"matmul/{cfg.name}/{dn}/{tag}/{ep.tag}", kernel_source(cfg, dt, ta, tb, ep),
                    kernel_signature(cfg, dt, ta, tb), main_loop=True,
                    launch_bounds=cfg.launch_bounds(ta, tb) if isinstance(cfg, TileConfig) else None,
                    threads=cfg.threads, archs=((9, 0),) if candidate else None,
                )
    for act in ("relu", "gelu_tanh", "tanh", "sigmoid"):
        ep = Epilogue(act, bias=True, dropout=True, save_preact=False)
        yield KernelSpec(f"matmul/{V1.name}/float32/NN/{ep.tag}", kernel_source(V1, np.float32, ep=ep),
                         signature(np.float32), threads=V1.threads)
    for dt in (np.float32, np.float64):
        dn = np.dtype(dt).name
        yield KernelSpec(f"bias_grad/v1/{dn}", bias_grad_v1_source(dt), _bias_grad_sig(dt), threads=BIAS_GRAD_THREADS)
        yield KernelSpec(f"bias_grad/v2/{dn}", bias_grad_v2_source(dt), _bias_grad_sig(dt),
                         threads=BIAS_COLS * BIAS_LANES)
