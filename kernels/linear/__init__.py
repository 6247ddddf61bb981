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

Files, one per piece:

- :mod:`.configs`: the configurations as data (V1, the register-tiled table) and the choice by shape;
- :mod:`.v1_shared`: version 1, the textbook shared-memory tiling (the baseline, kept forever);
- :mod:`.v2_register_tiled`: version 2, generated register-tiled kernels;
- :mod:`.v3_pipelined`: version 3, version 2's tiling with the CUTLASS-order pipeline (the float32 default);
- :mod:`.splitk`: split-K for small grids, with a reduction whose bits do not depend on the launch geometry;
- :mod:`.defaults`: the default configuration per device class (``gpufc tune`` records override it);
- :mod:`.epilogue`: the fused bias / activation / dropout / pre-activation store;
- :mod:`.bias_grad`: the bias gradient's column sums.

Version 2 (:mod:`.v2_register_tiled`): register-tiled (8 x 8 outputs per
thread at 128 x 128), double-buffered shared memory, generated straight-line
inner product (85% FFMA in the main loop's SASS, static), epilogue on the
registers staged through shared memory for coalesced stores. Its
configurations are :data:`.configs.CONFIGS`; :func:`choose_config` picks one by shape.
``launch_matmul(config=None)`` runs version 2 as chosen; ``config=V1`` (or a
configuration or its name) overrides, for benchmarks.
"""

# ruff: noqa: F401  (the op's names, gathered here from its files)

import functools

import numba
import numpy as np
from numba import cuda

from gpufc.runtime import launch as _launch
from gpufc.runtime import plan as _plan

from ..catalogue import KernelSpec, LaunchSpec, array, scalar

from . import bias_grad, configs, epilogue, splitk, v1_shared, v2_register_tiled, v3_pipelined
from .bias_grad import (
    BIAS_COLS,
    BIAS_GRAD_THREADS,
    BIAS_LANES,
    _bias_grad_sig,
    bias_grad_launch,
    bias_grad_plan,
    bias_grad_spec,
    bias_grad_v1_source,
    bias_grad_v2_source,
    launch_bias_grad,
    make_bias_grad_kernel,
)
from .configs import (
    CONFIGS,
    DTYPE_CONFIGS,
    PREFERRED,
    SMS,
    V1,
    TileConfig,
    V1Config,
    ceil_div,
    check_config,
    choose_config,
    config_by_name,
    config_names,
    device_sm_count,
    resolve_config,
)
from .defaults import V2_PEER
from .epilogue import PLAIN, Epilogue
from .v1_shared import _v1_source, signature
from .v2_register_tiled import signature as tiled_signature
from .v2_register_tiled import tiled_function

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
    "config_names",
    "launch_bias_grad",
    "launch_matmul",
    "make_matmul_kernel",
    "matmul_launch",
    "matmul_plan",
    "resolve_config",
]


@functools.cache
def make_matmul_kernel(cfg, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN):
    """Compiled kernel for one (config, dtype, transposes, epilogue), cached."""
    if isinstance(cfg, TileConfig) and cfg.version == 3:
        return v3_pipelined.make_kernel(cfg, np.dtype(dtype).type, bool(trans_a), bool(trans_b), ep, True)
    src = kernel_source(cfg, dtype, trans_a, trans_b, ep)
    if isinstance(cfg, TileConfig):
        bounds = cfg.launch_bounds(trans_a, trans_b)
        # the simulator's jit takes no launch_bounds (and has no registers to bound)
        options = {"launch_bounds": bounds} if bounds and not numba.config.ENABLE_CUDASIM else {}
        return cuda.jit(tiled_signature(dtype), **options)(src)
    return cuda.jit(signature(dtype, trans_a, trans_b))(src)


def kernel_source(cfg, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN):
    """The uncompiled Python function for ``cfg``, for ``cuda.compile_ptx`` (version 3: the
    vector-load specialisation, the one aligned operands run)."""
    if isinstance(cfg, V1Config):
        return _v1_source(cfg, np.dtype(dtype).type, trans_a, trans_b, ep)
    if isinstance(cfg, TileConfig) and cfg.version == 3:
        return v3_pipelined.pipelined_function(cfg, np.dtype(dtype).type, bool(trans_a), bool(trans_b), ep, True)
    if isinstance(cfg, TileConfig):
        return tiled_function(cfg, np.dtype(dtype).type, bool(trans_a), bool(trans_b), ep)
    raise TypeError(f"config must be a matmul configuration, got {cfg!r}")


def kernel_signature(cfg, dtype, trans_a=False, trans_b=False) -> str:
    """The launch signature of ``cfg``'s kernels (v1: 2-D operands; v2: flat operands and K)."""
    return tiled_signature(dtype) if isinstance(cfg, TileConfig) else signature(dtype, trans_a, trans_b)


U32_LIMIT = 2**32
_U32, _U64 = np.dtype(np.uint32), np.dtype(np.uint64)


@functools.cache
def matmul_spec(cfg, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN, vec=True) -> KernelSpec:
    """The kernel of one (configuration, dtype, operand layout, epilogue; version 3: vector or
    scalar loads): what the plans and the on-disk cache name it by (the catalogue's names)."""
    dtype = np.dtype(dtype)
    ta, tb = bool(trans_a), bool(trans_b)
    tag = ("T" if ta else "N") + ("T" if tb else "N")
    name = f"matmul/{cfg.name}/{dtype.name}/{tag}/{ep.tag}"
    if isinstance(cfg, TileConfig) and cfg.version == 3:
        return KernelSpec(name + ("" if vec else "/scalar"),
                          v3_pipelined.pipelined_function(cfg, dtype.type, ta, tb, ep, bool(vec)),
                          v3_pipelined.signature(dtype), main_loop=True,
                          launch_bounds=v3_pipelined._bounds(cfg, ta, tb, bool(vec)), threads=cfg.threads)
    return KernelSpec(name, kernel_source(cfg, dtype.type, ta, tb, ep), kernel_signature(cfg, dtype, ta, tb),
                      main_loop=True, launch_bounds=cfg.launch_bounds(ta, tb) if isinstance(cfg, TileConfig) else None,
                      threads=cfg.threads)


def route(config, m: int, n: int, k: int, dtype, ep: Epilogue = PLAIN, trans_a=False, trans_b=False, aligned=True):
    """``(configuration, split-K chunk or None, vector loads)`` for one matmul: a given ``config`` in
    one pass; else a tuned record for this shape bucket, epilogue and layout on this device
    (``gpufc tune``) if there is one, else the default table. Version 3 indexes the operands with
    32 bits (larger operands take the table's version-2 peer) and loads vectors when both operands
    are 16-byte ``aligned`` and their contiguous dimensions multiples of 4."""
    dtype = np.dtype(dtype)
    chunk = None
    if config is not None:
        cfg = resolve_config(config, m, n, k, dtype)
    else:
        from gpufc import tune

        layout = ("T" if trans_a else "N") + ("T" if trans_b else "N")
        rec = tune.recorded(m, n, k, dtype, ep.tag, layout)
        if rec is not None and rec["config"] in configs._BY_NAME:
            cfg, chunk = config_by_name(rec["config"]), rec["chunk"]
        else:
            cfg = resolve_config(None, m, n, k, dtype)
            chunk = configs.choose_chunk(cfg, m, n, k, dtype, sms=device_sm_count())
    check_config(cfg, dtype)
    if not (isinstance(cfg, TileConfig) and cfg.version == 3):
        return cfg, None, True
    vec = aligned and (m if trans_a else k) % 4 == 0 and (k if trans_b else n) % 4 == 0
    if config is None and max(m * k, k * n) >= v3_pipelined.U32_LIMIT:
        return config_by_name(V2_PEER[cfg.name]), None, True
    if config is None and cfg.min_blocks > 1 and not vec:
        # the register-capped tile's scalar loader would run uncapped (1 block per SM): version 2's
        # tile keeps 2 blocks per SM (measured, 39.1 TFLOP/s at 4096^3 on an H200)
        return config_by_name(V2_PEER[cfg.name]), None, True
    return cfg, chunk, vec


def _grid(cfg, m, n):
    grid = cfg.grid(m, n)
    if grid[1] > 65535:
        raise ValueError(f"y has {n} columns; {cfg.name} launches at most 65535 column tiles "
                         f"({65535 * (cfg.bn if isinstance(cfg, TileConfig) else cfg.tile)} columns)")
    return grid


def _tail(dtype):
    return (scalar("k0", _U32), scalar("k1", _U32), scalar("offset", _U64), scalar("threshold", _U64),
            scalar("scale", dtype))


def matmul_launch(m: int, n: int, k: int, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN,
                  cfg=None, vec=True) -> LaunchSpec:
    """The one-pass launch of ``y (M, N) = epilogue(op(a) @ op(b))`` with ``cfg``; M, N > 0, K >= 0.

    Per-call values, in order: the device arrays a ((M, K), or (K, M) with
    trans_a), b ((K, N), or (N, K) with trans_b), bias ((N,); None without
    ``ep.bias``), y and zout ((M, N); zout may be y without ``ep.save_preact``),
    then the dropout key words k0, k1, the element offset, the threshold and the scale.
    """
    dtype = np.dtype(dtype)
    grid = _grid(cfg, m, n)
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    operands = (array("bias", (n,) if ep.bias else (1,), dtype), array("y", (m, n), dtype),
                array("zout", (m, n), dtype))
    if isinstance(cfg, V1Config):
        args = (array("a", a_shape, dtype), array("b", b_shape, dtype)) + operands + _tail(dtype)
        return LaunchSpec(matmul_spec(cfg, dtype, trans_a, trans_b, ep), grid, cfg.block(), args)
    limit = v3_pipelined.U32_LIMIT if cfg.version == 3 else U32_LIMIT
    if max(m, n, k) >= U32_LIMIT or (cfg.version == 3 and max(m * k, k * n) >= limit):
        raise ValueError(f"{cfg.name} cannot index M={m}, N={n}, K={k} (operands of 2**32 elements or more)")
    # The tiled kernels index the operands flat (one index per run of 4 loads) and take K.
    args = (array("a", (m * k,), dtype), array("b", (k * n,), dtype)) + operands + (scalar("k", _U64, k),) + \
        _tail(dtype)
    return LaunchSpec(matmul_spec(cfg, dtype, trans_a, trans_b, ep, vec), grid, (cfg.threads,), args)


def partial_launch(m: int, n: int, k: int, dtype, trans_a, trans_b, cfg, vec, chunk) -> LaunchSpec:
    """Split-K's first pass: the partial products of K chunks into the (splits, M, N) workspace.
    Per-call values: a, b, the workspace."""
    dtype = np.dtype(dtype)
    gx, gy = _grid(cfg, m, n)
    splits = splitk.splits_for(k, chunk)
    if splits > 65535:
        raise ValueError(f"chunk={chunk} cuts K={k} into {splits} splits; at most 65535")
    ta, tb = bool(trans_a), bool(trans_b)
    tag = ("T" if ta else "N") + ("T" if tb else "N")
    spec = KernelSpec(f"splitk_partial/{cfg.name}/{dtype.name}/{tag}" + ("" if vec else "/scalar"),
                      v3_pipelined.pipelined_function(cfg, dtype.type, ta, tb, PLAIN, bool(vec), split=True),
                      splitk.partial_signature(dtype), launch_bounds=v3_pipelined._bounds(cfg, ta, tb, bool(vec)),
                      threads=cfg.threads)
    args = (array("a", (m * k,), dtype), array("b", (k * n,), dtype), array("ws", (splits, m, n), dtype),
            scalar("k", _U64, k), scalar("chunk", _U64, chunk))
    return LaunchSpec(spec, (gx, gy, splits), (cfg.threads,), args)


def reduce_launch(m: int, n: int, dtype, ep: Epilogue, splits: int) -> LaunchSpec:
    """Split-K's second pass: the workspace summed in a fixed order, then the epilogue. Per-call
    values: the workspace, bias, y, zout, then the dropout words as in :func:`matmul_launch`."""
    dtype = np.dtype(dtype)
    spec = KernelSpec(f"splitk_reduce/{dtype.name}/{ep.tag}", splitk.reduce_source(dtype.type, ep),
                      splitk.reduce_signature(dtype), threads=splitk.REDUCE_THREADS)
    args = (array("ws", (splits, m, n), dtype), array("bias", (n,) if ep.bias else (1,), dtype),
            array("y", (m, n), dtype), array("zout", (m, n), dtype)) + _tail(dtype)
    return LaunchSpec(spec, (splitk.reduce_grid(m, n, sms=device_sm_count()),), (splitk.REDUCE_THREADS,), args)


class SplitKPlan:
    """Split-K as one plan: a workspace per call (``splits x M x N``, released with the call), the
    partial pass, then the reduction with the epilogue; called like a one-pass plan."""

    __slots__ = ("dtype", "partial", "reduce", "ws_shape")

    def __init__(self, partial, reduce, ws_shape, dtype):
        self.partial, self.reduce, self.ws_shape, self.dtype = partial, reduce, ws_shape, dtype

    def __call__(self, a, b, bias, y, zout, k0, k1, offset, threshold, scale):
        ws, _keep = self.partial.launcher.workspace(self.ws_shape, self.dtype)
        self.partial.launch(a, b, ws)
        self.reduce.launch(ws, bias, y, zout, k0, k1, offset, threshold, scale)

    launch = __call__


_ROUTES: dict = {}  # plan key -> (cfg, chunk, vec): the route, resolved once per signature
_SPLITS: dict = {}  # plan key -> its SplitKPlan (the two plans it launches)
_plan.DERIVED += [_ROUTES, _SPLITS]  # emptied with the plan cache (a new launcher, a test's reset)


def matmul_plan(m: int, n: int, k: int, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN, config=None,
                device=0, stream=0, aligned=True):
    """The cached plan of ``y = epilogue(op(a) @ op(b))`` on ``stream`` (as the active launcher takes it):
    a :class:`gpufc.runtime.plan.Plan` or a :class:`SplitKPlan`, called with the per-call values of
    :func:`matmul_launch`. ``aligned``: both operands 16-byte aligned (version 3's vector loads)."""
    key = ("matmul", m, n, k, dtype, trans_a, trans_b, ep, config, aligned, device, stream)
    split = _SPLITS.get(key)
    if split is not None:
        return split
    r = _ROUTES.get(key)
    if r is None:
        if len(_ROUTES) > 4 * _plan.CAPACITY:
            _ROUTES.clear()
        r = _ROUTES[key] = route(config, m, n, k, dtype, ep, trans_a, trans_b, aligned)
    cfg, chunk, vec = r
    if chunk is None:
        return _plan.get(key, matmul_launch, m, n, k, dtype, trans_a, trans_b, ep, cfg, vec)
    splits = splitk.splits_for(k, chunk)
    part = _plan.get(key + ("partial",), partial_launch, m, n, k, dtype, trans_a, trans_b, cfg, vec, chunk)
    red = _plan.get(key + ("reduce",), reduce_launch, m, n, dtype, ep, splits)
    if len(_SPLITS) > _plan.CAPACITY:
        _SPLITS.clear()
    split = _SPLITS[key] = SplitKPlan(part, red, (splits, m, n), dtype)
    return split


def bias_grad_version(config) -> int:
    """The bias gradient's version that goes with a matmul ``config``: 1 for the version-1 family."""
    return 1 if config == V1.name or isinstance(config, V1Config) else 2


def aligned(a, b) -> bool:
    """Whether both launch arguments' data are 16-byte aligned (device pointers, or simulator arrays)."""
    pa = a if isinstance(a, int) else v3_pipelined._address(a)
    pb = b if isinstance(b, int) else v3_pipelined._address(b)
    return (pa | pb) % 16 == 0


@_launch.serialised_in_sim
def launch_matmul(a, b, bias, y, zout, *, trans_a=False, trans_b=False, ep: Epilogue = PLAIN,
                  key=(0, 0), offset=0, threshold=0, scale=0.0, config=None, stream=0):
    """Launch ``y = epilogue(op(a) @ op(b))`` on device arrays (any CUDA arrays, or simulator arrays;
    C-contiguous), through its plan. Shapes as in :func:`matmul_launch`; the caller has validated
    shapes and dtypes; M, N > 0 (K may be 0: y = epilogue(0)). ``config``: None routes by shape
    (:func:`route`); ``V1``, a :class:`TileConfig` or a configuration name overrides.
    """
    ln = _launch.launcher()
    dtype = np.dtype(y.dtype)
    m, n = y.shape
    k = a.shape[0] if trans_a else a.shape[1]
    pa, pb = ln.arg(a), ln.arg(b)
    plan = matmul_plan(m, n, k, dtype, bool(trans_a), bool(trans_b), ep, config, 0, ln.stream(stream),
                       aligned(pa, pb))
    plan(pa, pb, None if bias is None else ln.arg(bias), ln.arg(y), ln.arg(zout),
         int(key[0]), int(key[1]), int(offset), int(threshold), float(scale))


def catalogue():
    """KernelSpec entries for every configuration (see kernels.catalogue): per
    configuration and dtype, the forward (NN, plain and the full epilogue) and
    the two backward operand layouts (NT: g @ w.T, TN: x.T @ g)."""
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
