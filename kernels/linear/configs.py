"""Matmul configurations as data: the version-1 tile, the register-tiled table, and the choice.

Every configuration the linear op can run is an entry here: :data:`V1` (the
version-1 shared-memory kernel, :mod:`.v1_shared`) and the register-tiled
:data:`CONFIGS` (:mod:`.v2_register_tiled`), looked up by name
(:func:`config_by_name`). :data:`DTYPE_CONFIGS` says which serve a dtype
(tested, compiled by the catalogue), :data:`PREFERRED` which of those
:func:`choose_config` picks from by shape; :func:`resolve_config` turns the
``config`` a caller gives (None, a name, a configuration) into one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numba import cuda

from .defaults import TABLE as DEFAULT_TABLE
from .defaults import choose as choose_default


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


GROUP = 4  # rows / columns per run of the thread tile; 4 float32 = one 16-byte shared load
SMEM_LIMIT = 48 * 1024  # static shared memory per block



@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One register-tiled configuration: the block tile ``bm x bn``, the K step ``bk``,
    the per-thread tile ``tm x tn``; ``threads = (bm / tm) * (bn / tn)``."""

    name: str
    bm: int
    bn: int
    bk: int
    tm: int
    tn: int
    min_blocks: int = 1  # resident blocks per SM to compile for: caps registers at 65536 / (threads * min_blocks)
    unbounded: tuple = ()  # operand layouts ("NN", "NT", "TN") compiled without that cap: they spill under it
    warp: tuple = ()  # (rows, columns) of thread tiles one warp covers; () = whole rows of the thread grid
    version: int = 2

    def __post_init__(self):
        for side, t, block in (("tm", self.tm, self.bm), ("tn", self.tn, self.bn)):
            assert t in (1, 2, 4, 8), f"{self.name}: {side} must be 1, 2, 4 or 8 (runs of up to 4, two runs); got {t}."
            assert block % t == 0, f"{self.name}: the block side {block} must be a multiple of {side}={t}."
        assert 32 <= self.threads <= 1024 and self.threads % 32 == 0, (
            f"A block must be whole warps, 32 to 1024 threads; {self.name} has {self.threads}."
        )
        if self.warp:
            wr, wc = self.warp
            assert wr * wc == 32 and (self.bn // self.tn) % wc == 0 and (self.bm // self.tm) % wr == 0, (
                f"{self.name}: warp={self.warp} must be 32 thread tiles tiling the "
                f"{self.bm // self.tm} x {self.bn // self.tn} thread grid."
            )
        for what, length in (("a", self.bm), ("b", self.bn)):
            assert (length * self.bk) % self.threads == 0, (
                f"{self.name}: the {what} slice ({length} x {self.bk}) must split evenly over {self.threads} threads."
            )

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    def launch_bounds(self, trans_a: bool = False, trans_b: bool = False) -> tuple[int, int] | None:
        """``(max threads per block, min blocks per SM)`` for ``cuda.jit(launch_bounds=...)``,
        or None where ptxas may use up to 255 registers (``min_blocks == 1`` or an unbounded layout)."""
        layout = ("T" if trans_a else "N") + ("T" if trans_b else "N")
        if self.min_blocks <= 1 or layout in self.unbounded:
            return None
        return self.threads, self.min_blocks

    @property
    def gm(self) -> int:
        """Row runs per thread tile (runs of ``min(4, tm)`` rows, ``bm / gm`` apart)."""
        return max(1, self.tm // GROUP)

    @property
    def gn(self) -> int:
        return max(1, self.tn // GROUP)

    def pad(self, dtype) -> int:
        """Elements of padding per shared row: 16 bytes, keeps 16-byte alignment."""
        return max(1, 16 // np.dtype(dtype).itemsize)

    def shared_bytes(self, dtype) -> int:
        """Static shared memory: two K-slice buffers per operand and the epilogue's staging rows."""
        pad = self.pad(dtype)
        elements = 2 * self.bk * (self.bm + self.bn + 2 * pad) + (self.bm // self.tm) * (self.bn + pad)
        return elements * np.dtype(dtype).itemsize

    def grid(self, m: int, n: int) -> tuple[int, int]:
        return ceil_div(m, self.bm), ceil_div(n, self.bn)

    def block(self) -> tuple[int]:
        return (self.threads,)


# The configurations, largest tile first. Evidence (static, ptxas sm_90, not
# measured on a GPU): registers / spills / FMA share in bench/kernel_report.py.
CONFIGS = (
    # 256 threads; the large-problem workhorse. Two blocks per SM cap it at 128 registers
    # (ptxas alone takes 129-156). The backward layouts spill under the cap (NT on sm_80, TN
    # on sm_90) and run unbounded: ptxas gives them 127-128 registers on sm_90 anyway.
    TileConfig("t128x128", 128, 128, 8, 8, 8, min_blocks=2, unbounded=("NT", "TN")),
    TileConfig("t128x64", 128, 64, 8, 8, 4),  # 256 threads; half the columns per block
    TileConfig("t64x64", 64, 64, 8, 4, 4),  # 256 threads; 4x the blocks of t128x128
    TileConfig("t32x32", 32, 32, 16, 2, 2),  # 256 threads; small M or N
    # Candidates for the large-problem workhorse (issue 3): timed by `gpufc bench --ops configs`,
    # compiled and tested, not chosen until measured (PREFERRED). k16: K step 16, half the
    # barriers per FFMA. w: warps cover 4 x 8 thread tiles (a 32 x 64 warp tile) instead of
    # 2 x 16, 4 shared wavefronts per k step instead of 6. u: no register cap (1 block/SM).
    TileConfig("t128x128k16", 128, 128, 16, 8, 8, min_blocks=2, unbounded=("NT", "TN")),
    TileConfig("t128x128w", 128, 128, 8, 8, 8, min_blocks=2, unbounded=("NT", "TN"), warp=(4, 8)),
    TileConfig("t128x128k16w", 128, 128, 16, 8, 8, min_blocks=2, unbounded=("NT", "TN"),
               warp=(4, 8)),
    TileConfig("t128x128u", 128, 128, 8, 8, 8),
    # Version 3 (kernels/linear/v3_pipelined.py): the same tiling with the CUTLASS-order
    # pipeline. Static evidence only (ptxas sm_90: main-loop FFMA share >= 0.90 against version
    # 2's 0.85, FFMA behind every barrier), not measured on a GPU. k16w: K step 16, 32 x 64
    # warp tiles, two blocks per SM (128 registers, no spills in any layout).
    TileConfig("v3_t128x128k16w", 128, 128, 16, 8, 8, min_blocks=2, warp=(4, 8), version=3),
    TileConfig("v3_t64x64", 64, 64, 8, 4, 4, version=3),  # 256 threads; 4x the blocks of 128 x 128
    TileConfig("v3_t32x32", 32, 32, 8, 2, 2, version=3),  # 256 threads; small M or N, split-K
)
_BY_NAME = {c.name: c for c in CONFIGS}

# Per dtype, the configurations that serve it (tested, compiled by the catalogue, timed by
# `gpufc bench --ops configs`); choose_config picks among PREFERRED only. t128x128 in
# float64 needs 49 KiB of shared memory, over the 48 KiB
# static limit, and 8 x 8 double accumulators alone take 128 registers.
DTYPE_CONFIGS = {
    np.dtype(np.float32): ("t128x128", "t128x64", "t64x64", "t32x32",
                           "t128x128k16", "t128x128w", "t128x128k16w", "t128x128u",
                           "v3_t128x128k16w", "v3_t64x64", "v3_t32x32"),
    np.dtype(np.float64): ("t128x64", "t64x64", "t32x32"),
}

# Per dtype, the configurations choose_config picks from, largest tile first (a subset of
# DTYPE_CONFIGS: the rest are candidates, compiled and tested but only run when forced):
# the rows of the device class's default table (kernels/linear/defaults.py).
PREFERRED = {np.dtype(dt): tuple(name for name, _ in rows) for (_, dt), rows in DEFAULT_TABLE.items()}

SMS = 132  # streaming multiprocessors of an H100 SXM; one wave of blocks per SM


def config_names(dtype=None) -> tuple:
    """Every configuration's name (:data:`V1`'s first); with ``dtype``, those that can run it."""
    if dtype is None:
        return (V1.name,) + tuple(c.name for c in CONFIGS)
    return (V1.name,) + tuple(DTYPE_CONFIGS.get(np.dtype(dtype), ()))


def config_by_name(name: str):
    """The configuration called ``name`` (e.g. ``"t128x128"``, or ``"v1_t16"`` for :data:`V1`)."""
    if name == V1.name:
        return V1
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"config must be one of {list(config_names())}, got config={name!r}") from None


def check_config(cfg, dtype) -> None:
    """A ``ValueError`` naming ``cfg`` when it cannot run ``dtype`` (not in :data:`DTYPE_CONFIGS`)."""
    dtype = np.dtype(dtype)
    if isinstance(cfg, V1Config) or cfg.name in DTYPE_CONFIGS.get(dtype, ()):
        return
    why = (f"it needs {cfg.shared_bytes(dtype)} bytes of shared memory in {dtype.name}, over the {SMEM_LIMIT}-byte "
           "static limit" if cfg.shared_bytes(dtype) > SMEM_LIMIT else f"it is not built or tested for {dtype.name}")
    raise ValueError(f"config={cfg.name!r} cannot run {dtype.name}: {why}; for {dtype.name} use one of "
                     f"{list(config_names(dtype))}")


def choose_config(m: int, n: int, k: int, dtype, sms: int = SMS) -> TileConfig:
    """The configuration for ``(M, K) @ (K, N)`` in ``dtype`` on a device of ``sms`` SMs, from
    the device class's default table (:func:`kernels.linear.defaults.choose`); a tuned record
    (``gpufc tune``) overrides it in ``launch_matmul``."""
    return _BY_NAME[choose_default(m, n, k, dtype, sms, config_by_name)[0]]


def choose_chunk(cfg, m: int, n: int, k: int, dtype, sms: int = SMS) -> int | None:
    """The split-K chunk the default table gives ``cfg`` for this shape, or None (one pass)."""
    name, chunk = choose_default(m, n, k, dtype, sms, config_by_name)
    return chunk if name == cfg.name else None


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
        return config_by_name(config)
    if isinstance(config, (V1Config, TileConfig)):
        return config
    raise TypeError(f"config must be None, a configuration or its name, got config={config!r}")
