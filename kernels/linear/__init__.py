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

from gpufc.runtime.launch import fast, serialised_in_sim

from . import bias_grad, configs, epilogue, splitk, v1_shared, v2_register_tiled, v3_pipelined
from .bias_grad import (
    BIAS_COLS,
    BIAS_GRAD_THREADS,
    BIAS_LANES,
    _bias_grad_sig,
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
    choose_config,
    config_by_name,
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
    "launch_bias_grad",
    "launch_matmul",
    "make_matmul_kernel",
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


def _choose(config, m, n, k, dtype, ep, trans_a, trans_b, a, b):
    """(configuration, split-K chunk or None): a tuned record for this shape bucket, epilogue and
    layout on this device (``gpufc tune``) if there is one, else the default table; a given
    ``config`` runs in one pass. Version 3 indexes the operands with 32 bits: larger operands
    take the default table's version-2 peer."""
    if config is not None:
        return resolve_config(config, m, n, k, dtype), None
    from gpufc import tune

    layout = ("T" if trans_a else "N") + ("T" if trans_b else "N")
    rec = tune.recorded(m, n, k, dtype, ep.tag, layout)
    if rec is not None and rec["config"] in configs._BY_NAME:
        cfg, chunk = config_by_name(rec["config"]), rec["chunk"]
    else:
        cfg = resolve_config(None, m, n, k, dtype)
        chunk = configs.choose_chunk(cfg, m, n, k, dtype, sms=device_sm_count())
    if cfg.version == 3 and max(a.size, b.size) >= v3_pipelined.U32_LIMIT:
        return config_by_name(V2_PEER[cfg.name]), None
    if cfg.version == 3 and cfg.min_blocks > 1 and not v3_pipelined.vector_ok(a, b, m, n, k, trans_a, trans_b):
        # the register-capped tile's scalar loader would run uncapped (1 block per SM): version 2's
        # tile keeps 2 blocks per SM (measured, 39.1 TFLOP/s at 4096^3 on an H200)
        return config_by_name(V2_PEER[cfg.name]), None
    return cfg, chunk


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
    cfg, chunk = _choose(config, m, n, k, dtype, ep, trans_a, trans_b, a, b)
    if isinstance(cfg, TileConfig) and cfg.version == 3:
        ws = None
        if chunk is not None:
            # split-K's partial sums: one (splits, M, N) workspace per call, freed with it
            ws = cuda.device_array((splitk.splits_for(k, chunk), m, n), dtype)
        v3_pipelined.launch(a, b, bias, y, zout, cfg=cfg, trans_a=trans_a, trans_b=trans_b, ep=ep, key=key,
                            offset=offset, threshold=threshold, scale=scale, stream=stream, chunk=chunk, ws=ws)
        return
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


def catalogue():
    """KernelSpec entries for every configuration (see kernels.catalogue): per
    configuration and dtype, the forward (NN, plain and the full epilogue) and
    the two backward operand layouts (NT: g @ w.T, TN: x.T @ g)."""
    from ..catalogue import KernelSpec

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
