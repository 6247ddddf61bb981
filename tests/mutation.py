"""Mutation testing of gpufc's contract-critical code: do the tests fail when the code is wrong?

Usage (from the repository root, with the project's interpreter)::

    python tests/mutation.py                           # every mutant of every target (long: see docs/testing.md)
    python tests/mutation.py --files reference philox  # targets by name (or by path)
    python tests/mutation.py --sample 8 --seed 1       # a deterministic sample (CI: tests/test_mutation.py)
    python tests/mutation.py --list                    # print the mutants, run nothing

Each mutant is one small edit (a curated operator, see ``OPERATORS``) of one target
file. Nothing in the working tree is ever written: every worker copies the tree
into a temporary directory, writes the mutant into its copy, and runs the
target's test selection there with ``-x``, ``gpufc`` and ``gpufc.kernels``
imported from the copy (checked at start-up, and by a planted mutant that must be
killed, else the run aborts). Numba's and gpufc's on-disk caches point at
per-worker temporary directories and no bytecode is written, so no compiled
kernel or ``.pyc`` of one mutant can serve another.

Outcomes: ``killed`` (the selection failed), ``timeout`` (it ran past its limit:
a mutant that hangs is caught too), ``survived`` (all tests passed: a missing
test), ``equivalent`` (survived, and listed in ``EQUIVALENT`` with the reason
why it cannot be observed), ``error`` (the selection collected no test: a bug in
this table). The exit status is 1 when a non-equivalent mutant survives.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import difflib
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (the dev extra brings it there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
GUARD_ENV = "GPUFC_MUTATION_RUN"  # set inside every mutant's test run: tests/test_mutation.py skips itself

# ----------------------------------------------------------------------------
# What is mutated, and which tests must catch it
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One file's contract-critical regions and the tests that must kill their mutants.

    ``regions``: qualified function names (``Class.method``; a function includes the
    functions nested in it, e.g. a kernel factory's kernel) or ``=NAME`` for a
    module-level constant ``NAME = ...``. ``lines``: optional regex; only lines
    matching it are mutated. ``tests``: pytest arguments, fastest killers first
    (the run stops at the first failure).
    """

    name: str
    path: str
    regions: tuple
    tests: tuple
    lines: str | None = None
    python_drops: bool = True  # False for a code generator: its own statements only build the text


_DROPOUT_TESTS = (
    "tests/test_boundaries.py::test_threshold_word_is_kept_by_the_standalone_kernels",
    "tests/test_mutation_kills.py::test_dropout_v2_in_place_visits_each_group_once",
    "tests/test_mutation_kills.py::test_dropout_v2_in_place_one_cut_group",
    "tests/test_mutation_kills.py::test_kernel_launchers_run_the_version_asked_for",
    "tests/test_mutation_kills.py::test_packed_mask_launcher_fills_one_byte_masks",
    "tests/test_kernels_dropout.py::test_v2_forward_is_bit_exact",
    "tests/test_kernels_dropout.py::test_dropout_mask_kernel_is_bit_exact",
    "tests/test_kernels_dropout.py::test_fused_backward_matches_reference",
    "tests/test_kernels_v1.py::test_dropout_v1_is_bit_exact",
    "tests/test_kernels_dropout.py",
    "tests/test_boundaries.py::test_threshold_word_is_kept_by_the_packed_mask_kernel",
    "tests/test_boundaries.py::test_threshold_word_is_kept_by_linear_backward",
    "tests/test_mutation_kills.py",
)

_V1_TESTS = (
    "tests/test_kernels_v1.py::test_linear_v1_matches_reference",
    "tests/test_mutation_kills.py::test_v1_zero_fills_the_ragged_k_tile",
    "tests/test_kernels_v1.py",
    "tests/test_kernels_matmul.py::test_v1_still_selectable",
)
_V2_TESTS = (
    "tests/test_kernels_linear_v3.py::test_generated_kernels_read_only_names_they_define",
    "tests/test_kernels_linear_v3.py::test_shared_memory_limit_is_inclusive",
    "tests/test_kernels_matmul.py::test_awkward_shapes_every_layout",
    "tests/test_kernels_matmul.py::test_forward_plain",
    "tests/test_kernels_matmul.py::test_grad_x_layout_nt",
    "tests/test_kernels_matmul.py::test_grad_w_layout_tn",
    "tests/test_kernels_matmul.py::test_k_zero_gives_the_epilogue_of_zero",
    "tests/test_kernels_matmul.py::test_forward_full_epilogue",
    "tests/test_kernels_matmul.py::test_fused_mask_every_config",
)

_V3 = "tests/test_kernels_linear_v3.py"
_V3_TESTS = (
    f"{_V3}::test_v3_tiny_and_empty_k",
    f"{_V3}::test_v3_large_tile_full_epilogue_vector_loads",  # 3 s: the only sim test of the warp-ordered tile
    f"{_V3}::test_shared_memory_limit_is_inclusive",
    f"{_V3}::test_generated_kernels_read_only_names_they_define",
    f"{_V3}::test_v3_layouts",
    f"{_V3}::test_v3_same_bits_whatever_the_tile",
    f"{_V3}::test_splitk_matches_reference_and_applies_the_epilogue_once",
    f"{_V3}::test_splitk_bits_do_not_depend_on_the_launch_geometry",
    f"{_V3}::test_v3_large_tile_full_epilogue_vector_loads",
    _V3,
    # the scalar loader of every version-3 tile on odd shapes, the large (warp-ordered) tile's NT and TN
    *(f"tests/test_kernels_matmul.py::{test}[{cfg}-float32]"
      for cfg in ("v3_t32x32", "v3_t64x64", "v3_t128x128k16w")
      for test in ("test_grad_x_layout_nt", "test_grad_w_layout_tn", "test_forward_full_epilogue",
                   "test_fused_mask_every_config", "test_forward_plain")),
)
_SPLITK_TESTS = (
    f"{_V3}::test_choose_chunk_rule",
    f"{_V3}::test_default_table",
    f"{_V3}::test_splitk_matches_reference_and_applies_the_epilogue_once",
    f"{_V3}::test_splitk_bits_do_not_depend_on_the_launch_geometry",
    _V3,
)
_TC = "tests/test_tensorcore.py"
_TC_TESTS = ("tests/test_kernels_linear_v3.py::test_generated_kernels_read_only_names_they_define",
             "tests/test_boundaries.py::test_threshold_word_is_kept_by_the_tensor_core_epilogue",
             "tests/test_boundaries.py::test_threshold_word_is_kept_by_the_tensor_core_backward",
             f"{_TC}::test_integer_inputs_are_bit_exact", f"{_TC}::test_k_one_past_whole_slices",
             f"{_TC}::test_misaligned_operand_takes_the_element_path",
             f"{_TC}::test_launcher_flags_the_operands_it_may_copy_16_bytes_at_a_time",
             f"{_TC}::test_kernel_copies_16_bytes_at_a_time_exactly_when_both_operands_are_flagged",
             f"{_TC}::test_act_dropout_backward16", f"{_TC}::test_bias_grad16",
             f"{_TC}::test_launch_limits_at_their_boundaries",
             f"{_TC}::test_shared_layouts_are_free_of_bank_conflicts",
             f"{_TC}::test_block_tiles_that_are_not_square",
             f"{_TC}::test_forward_full_epilogue",
             f"{_TC}::test_backward_layouts_against_the_model", f"{_TC}::test_fused_dropout_mask_is_bit_exact", _TC)

TARGETS = (
    Target(
        "reference", "gpufc/reference.py",
        ("=PHILOX_M0", "=PHILOX_M1", "=PHILOX_W0", "=PHILOX_W1", "=PHILOX_ROUNDS", "=_MASK32",
         "philox4x32_10", "philox_key", "dropout_threshold", "dropout_scale", "dropout_keep_mask", "dropout",
         "packed_size", "pack_mask", "unpack_mask", "linear", "linear_backward"),
        ("tests/test_boundaries.py", "tests/test_reference.py", "tests/test_reference_precision.py",
         "tests/test_mutation_kills.py", "-m", "not kernels"),
        lines=r"^(?!.*(check_|isinstance|raise |dtype !=|\.shape\b.* !=))",  # the math, not the argument checks
    ),
    Target(
        "philox", "kernels/dropout/philox.py",
        ("=M0", "=M1", "=W0", "=W1", "=MASK32", "=SHIFT32", "=TWO", "=THREE",
         "_round", "_bump", "philox4x32_10", "block_counter", "select_word", "element_word", "keep_word",
         "philox_block"),
        ("tests/test_rng.py", "tests/test_boundaries.py", "-m", "kernels", "-k", "device_philox or standalone"),
    ),
    Target(
        "epilogue", "kernels/linear/epilogue.py",
        ("make_element_store", "make_epilogue", "words4", "make_group_store", "=_ONE"),
        ("tests/test_boundaries.py::test_threshold_word_is_kept_by_the_fused_epilogue",
         "tests/test_mutation_kills.py::test_every_column_remainder_of_the_group_store",
         "tests/test_kernels_matmul.py::test_fused_dropout_mask_is_bit_exact",
         "tests/test_kernels_v1.py::test_fused_dropout_mask_is_bit_exact",
         "tests/test_kernels_matmul.py::test_forward_full_epilogue",
         "tests/test_kernels_matmul.py::test_every_activation_with_dropout",
         "tests/test_kernels_v1.py::test_linear_v1_save_preact"),
    ),
    Target("dropout_v1", "kernels/dropout/v1.py", ("dropout_v1_source", "act_dropout_backward_source"),
           _DROPOUT_TESTS),
    Target("dropout_v2", "kernels/dropout/v2.py", ("=GROUP", "_group_io", "act_dropout_backward_v2_source"),
           _DROPOUT_TESTS),
    Target("dropout_mask", "kernels/dropout/mask.py", ("=GROUP", "=MASK_BITS", "dropout_mask_source"),
           _DROPOUT_TESTS),
    Target("dropout_launch", "kernels/dropout/__init__.py",
           ("vector_ok", "launch_dropout", "launch_act_dropout_backward", "launch_dropout_mask"), _DROPOUT_TESTS),
    Target("matmul_configs", "kernels/linear/configs.py",
           ("ceil_div", "V1Config.grid", "TileConfig.gm", "TileConfig.gn", "TileConfig.grid"),
           _V1_TESTS[:1] + _V2_TESTS),
    Target("matmul_v1", "kernels/linear/v1_shared.py", ("_v1_source",), _V1_TESTS),
    Target("matmul_launch", "kernels/linear/__init__.py", ("launch_matmul",), _V1_TESTS[:1] + _V2_TESTS),
    Target("bias_grad", "kernels/linear/bias_grad.py",
           ("bias_grad_v1_source", "bias_grad_v2_source", "launch_bias_grad"),
           ("tests/test_mutation_kills.py::test_bias_grad_v2_sums_in_its_fixed_order",
            "tests/test_kernels_matmul.py::test_bias_grad_v2", "tests/test_kernels_v1.py")),
    Target(
        "matmul_v2", "kernels/linear/v2_register_tiled.py",
        ("_thread_offsets", "_loader",
         "_emit_operand_setup", "_emit_loop_loads", "_emit_stores", "tiled_source"),
        _V2_TESTS,
        lines=r"^(?!.*(shared\.array|s\.depth))",  # not the indentation of the text, nor the buffers' sizes
        python_drops=False,
    ),
    Target(
        "matmul_v3", "kernels/linear/v3_pipelined.py",
        ("_Loader.__init__", "_Loader.row_offset", "_Loader.setup", "_Loader._k_and_mn", "_Loader.prologue",
         "_Loader.loop_loads", "_Loader.thread_part", "_Loader.addr_stores", "_Loader.stores", "_thread_offsets",
         "pipelined_source"),
        _V3_TESTS,
        lines=r"^(?!.*(shared\.array|s\.depth|align = ))",  # not the buffers' sizes, nor the indentation
        python_drops=False,
    ),
    Target("matmul_v3_launch", "kernels/linear/v3_pipelined.py", ("vector_ok", "launch"), _V3_TESTS),
    Target("splitk", "kernels/linear/splitk.py", ("=CHUNK_QUANTUM", "splits_for", "choose_chunk", "reduce_source"),
           _SPLITK_TESTS),
    Target(
        "tensorcore", "kernels/linear/tensorcore.py",
        ("_layout", "MmaConfig.grid", "words2", "make_element_store16", "make_pair_store", "_emit_load",
         "_emit_pipeline", "_emit_fragments", "_lane_offset", "mma_source", "launch_mma",
         "act_dropout_backward16_source", "bias_grad16_source"),
        _TC_TESTS,
        lines=r"^(?!.*(shared\.array|s\.depth))",
        python_drops=False,
    ),
    Target(
        "layers", "gpufc/nn/layers.py",
        ("_advance", "DropoutLayer.forward", "FullyConnectedLayer.forward"),
        ("tests/test_mutation_kills.py::test_layer_offset_wraps_modulo_2_to_the_64",
         "tests/test_mutation_kills.py::test_fc_backward_follows_the_last_forward",
         "tests/test_layers.py", "tests/test_mutation_kills.py", "-k", "offset or dropout or follows"),
        lines=r"offset|active",
    ),
)

# The planted mutants checked before anything else: each must be killed, else the copies do not
# import what they should (gpufc from the copy, gpufc.kernels from the copy) and the run aborts.
SANITY = (("reference", "PHILOX_M0 = 0xD2511F53", "PHILOX_M0 = 0xD2511F52"),
          ("philox", "M0 = np.uint64(0xD2511F53)", "M0 = np.uint64(0xD2511F52)"))

# Survivors that cannot be observed: (target, function, original line, mutated line) -> reason.
# Lines are stripped source lines; the report prints these keys for any new survivor.
_LAST_BUMP = "a key bump after the last round: the key is not read after it"
_SPARE_BLOCK = "one Philox block more than needed is drawn; the slice [start : start + size] drops its words"
_RUNS = ("how many runs a thread's tm rows (tn columns) are cut into is a layout choice (shared-memory loads "
         "and bank conflicts): 1 or 2 runs both cover every row once")
_PAIRS = ("2 groups per trip or 1 is a register/throughput choice: every group is still processed once "
          "by the same code")
_UNUSED_WORD = "the placeholder word of an epilogue without dropout: no comparison reads it"
_NO_WRAP = "first_block < 2**62 (offset < 2**64), so % m is the identity for any m above it"
EQUIVALENT = {
    ("reference", "philox4x32_10", "if r + 1 < PHILOX_ROUNDS:", "if (r + 1) <= PHILOX_ROUNDS:"): _LAST_BUMP,
    ("reference", "philox4x32_10", "if r + 1 < PHILOX_ROUNDS:", "if (r - 1) < PHILOX_ROUNDS:"): _LAST_BUMP,
    ("reference", "philox4x32_10", "if r + 1 < PHILOX_ROUNDS:", "if r + 0 < PHILOX_ROUNDS:"): _LAST_BUMP,
    ("reference", "dropout_keep_mask", "first_block, last_block = n0 // 4, (n0 + size - 1) // 4",
     "first_block, last_block = n0 // 4, (((n0 + size) + 1)) // 4"): _SPARE_BLOCK,
    ("reference", "dropout_keep_mask", "first_block, last_block = n0 // 4, (n0 + size - 1) // 4",
     "first_block, last_block = n0 // 4, (n0 + size - 0) // 4"): _SPARE_BLOCK,
    ("reference", "dropout_keep_mask",
     "blocks = np.arange(last_block - first_block + 1, dtype=np.uint64) + np.uint64(first_block % 2**64)",
     "blocks = np.arange(last_block - first_block + 2, dtype=np.uint64) + np.uint64(first_block % 2**64)"):
        _SPARE_BLOCK,
    **{("reference", "dropout_keep_mask",
        "blocks = np.arange(last_block - first_block + 1, dtype=np.uint64) + np.uint64(first_block % 2**64)",
        f"blocks = np.arange(last_block - first_block + 1, dtype=np.uint64) + np.uint64(first_block % {m})"):
       _NO_WRAP for m in ("2**63", "2**65", "3**64")},
    ("epilogue", "make_epilogue", "word = uint32(0)", "word = uint32(1)"): _UNUSED_WORD,
    ("dropout_v2", "act_dropout_backward_v2_source", "no_word = uint32(0)", "no_word = uint32(1)"): _UNUSED_WORD,
    **{("dropout_v2", "act_dropout_backward_v2_source", "pairs = unroll_for(activation) == 2", after): _PAIRS
       for after in ("pairs = unroll_for(activation) != 2", "pairs = unroll_for(activation) == 1",
                     "pairs = unroll_for(activation) == 3")},
    ("matmul_configs", "TileConfig.gm", "return max(1, self.tm // GROUP)", "return max(1, (self.tm % GROUP))"):
        _RUNS,
    ("matmul_configs", "TileConfig.gn", "return max(1, self.tn // GROUP)", "return max(1, (self.tn % GROUP))"):
        _RUNS,
    ("matmul_configs", "TileConfig.gn", "return max(1, self.tn // GROUP)", "return max(2, self.tn // GROUP)"):
        _RUNS,
    ("matmul_v1", "_v1_source", "for k0_tile in range(0, k, T):", "for k0_tile in range(0, k + 1, T):"):
        "one more K tile only when T divides K, and it is all guarded zeros: it adds 0 to every sum",
    ("dropout_v2", "act_dropout_backward_v2_source", "dropout = bool(dropout)", "pass"):
        "every caller passes a bool already (the factories are cached on it)",
    ("dropout_v2", "act_dropout_backward_v2_source",
     "break  # after the pair loop only the odd group out is left: one trip, fewer registers",
     "pass  # after the pair loop only the odd group out is left: one trip, fewer registers"):
        "after the pair loop j + stride >= j_end, so the single-group loop makes one trip with or without it",
    ("epilogue", "make_group_store", "w0 = w1 = w2 = w3 = uint32(0)", "w0 = w1 = w2 = w3 = uint32(1)"):
        _UNUSED_WORD,
    **{("matmul_v2", "_loader", 'src(f"{op}_c = (tid % u64({runs_per_row}))" + (f" * u64({v})" if v > 1 else ""))',
        f'src(f"{{op}}_c = (tid % u64({{runs_per_row}}))" + (f" * u64({{v}})" if {cond} else ""))'):
       "it adds `* u64(1)` to the generated index when v == 1: a multiplication by one"
       for cond in ("v >= 1", "v > 0")},
    **{("matmul_v3", "_Loader.setup", 's(f"{op}_c = (tid % u64({self.rpr}))" + (f" * u64({v})" if v > 1 else ""))',
        f's(f"{{op}}_c = (tid % u64({{self.rpr}}))" + (f" * u64({{v}})" if {cond} else ""))'):
       "it adds `* u64(1)` to the generated index when v == 1: a multiplication by one"
       for cond in ("v >= 1", "v > 0")},
    ("matmul_v2", "_thread_offsets", "return [(i // v, i % v) for i in range(t)]",
     "return [(i // v, i % v) for i in range(t + 1)]"):
        "one more (run, offset) pair past the thread's t rows: the callers index the first t only",
    ("matmul_v2", "_emit_operand_setup", "for j in range(run.v):", "for j in range(run.v + 1):"):
        "one more element per k-contiguous run of slice 0 loaded (guarded in k) into a register no store reads",
    **{("matmul_v2", "tiled_source", 's(f"ntiles = (kd + u64({bk - 1})) // u64({bk})")', after):
       "one more K slice, in front, when K % BK is 0 or BK - 1: shift grows by BK, so that slice is all guarded "
       "zeros (0 * 0 added to the +0 accumulators first) and every later slice reads the same k"
       for after in ('s(f"ntiles = (kd + u64({(bk + 1)})) // u64({bk})")', 's(f"ntiles = (kd + u64({bk + 1})) // u64({bk})")',
                     's(f"ntiles = (kd + u64({bk - 0})) // u64({bk})")')},
    ("matmul_v2", "tiled_source", "for i in range(tm):", "for i in range(tm + 1):"):
        "one more accumulator row set to zero, which no k-step and no store reads",
    ("matmul_v2", "tiled_source", 's("for t in range(u64(1), ntiles + u64(1)):")',
     's("for t in range(u64(1), ntiles + u64(2)):")'):
        "one more K step, over the all-zero slice the last step stored (its loads are off: t >= ntiles): "
        "0 * 0 added to float accumulators, which are never -0.0 (they start at +0)",
    ("tensorcore", "make_pair_store", "w0 = w1 = uint32(0)", "w0 = w1 = uint32(1)"): _UNUSED_WORD,
    ("tensorcore", "_emit_load", 's(f"if gr < {rb} and gc < {cb}:")', 's(f"if gr < {rb} and gc <= {cb}:")'):
        "a chunk that starts at the edge (gc == cb) gets min(cb - gc, ch) = 0 bytes either way",
    ("tensorcore", "_emit_load", 's(f"    nb = u32(min({cb} - gc, u64({ch})) * u64({isz}))")',
     's(f"    nb = u32(min({cb} + gc, u64({ch})) * u64({isz}))")'):
        "the 16-byte path runs only when the operand's rows (cb) are whole chunks, so a chunk that starts "
        "inside a row is whole: the min is ch either way",
    ("tensorcore", "_emit_load",
     's(f"cp_async16_zfill({op}_s, so, {op}, gr * {ld} + gc if nb != u32(0) else u64(0), nb)")',
     's(f"cp_async16_zfill({op}_s, so, {op}, gr * {ld} + gc if nb != u32(1) else u64(0), nb)")'):
        "a zero-byte copy reads no byte of its source (PTX ISA, and the simulator's twin), and gr * ld + gc is "
        "16-byte aligned like the dummy index 0 it replaces; nb is never 1",
    **{("tensorcore", "_emit_pipeline", 'steps = cfg.bk(kind) // (8 if kind == "tf32" else 16)', after):
       "BK is 64 bytes of k: 16 TF32 or 32 16-bit values, and 16 // 7 == 16 // 8, 32 // 15 == 32 // 16 (2 k-steps)"
       for after in ('steps = cfg.bk(kind) // (7 if kind == "tf32" else 16)',
                     'steps = cfg.bk(kind) // (8 if kind == "tf32" else 15)')},
    ("tensorcore", "_emit_pipeline", 's(f"for ps in range(u64({cfg.stages - 1})):")',
     's(f"for ps in range(u64({cfg.stages - 0})):")'):
        "the prologue also copies slice stages - 1, which the loop's first step copies again: the same bytes "
        "into the same buffer, which no warp reads before both copies have landed",
    ("tensorcore", "_emit_pipeline", 's("if ps < ntiles:")', 's("if ps <= ntiles:")'):
        "slice ntiles (past K: all zero-fill) copied into a buffer no k-step reads (the loop ends at ntiles - 1)",
    ("tensorcore", "_emit_pipeline", 's("if nk < ntiles:")', 's("if nk <= ntiles:")'):
        "slice ntiles (past K: all zero-fill) copied into the buffer of slice kt - 1, which every warp is done "
        "with and no later k-step reads",
    **{("tensorcore", "mma_source", 's(f"ntiles = (kd + u64({bk - 1})) // u64({bk})")', after):
       "one more K slice, at the end, when K % BK is 0 or BK - 1: past K, so all zero-fill, and 0 * 0 added to "
       "accumulators that start at +0 (never -0.0)"
       for after in ('s(f"ntiles = (kd + u64({(bk + 1)})) // u64({bk})")', 's(f"ntiles = (kd + u64({bk + 1})) // u64({bk})")',
                     's(f"ntiles = (kd + u64({bk - 0})) // u64({bk})")')},
    ("tensorcore", "mma_source", "for i in range(cfg.mi):", "for i in range(cfg.mi + 1):"):
        "one more row of accumulators set to zero (c{mi}_j): no mma and no epilogue pair reads it",
    ("tensorcore", "mma_source", "for j in range(cfg.ni):", "for j in range(cfg.ni + 1):"):
        "one more column of accumulators set to zero (c{i}_{ni}): no mma and no epilogue pair reads it",
    ("dropout_mask", "dropout_mask_source", "for k in range(3):", "for k in range(4):"):
        "a fourth Philox block per byte: its words decide bits i = 16 + lane - head >= 13, past the byte",
    **{("dropout_mask", "dropout_mask_source", "if k < 2 or head > 0:", after):
       "the third Philox block also at offset % 4 == 0: its words decide bits i = 8 + lane, past the byte"
       for after in ("if k < 2 or head >= 0:", "if k <= 2 or head > 0:", "if k < 3 or head > 0:")},
    ("dropout_mask", "dropout_mask_source", "in_byte = i >= 0 and i < MASK_BITS and MASK_BITS * b + i < n",
     "in_byte = i >= 0 and i <= MASK_BITS and MASK_BITS * b + i < n"):
        "bit 8 of the 32-bit accumulator is cut off by the uint8 store",
    **{("dropout_v2", "act_dropout_backward_v2_source", "owner = int64(0) if c == 0 else stride - 1", after):
       "which one thread stores a cut group (the head's or the tail's, never the same group) changes no store"
       for after in ("owner = int64(0) if c != 0 else stride - 1", "owner = int64(0) if c == 1 else stride - 1")},
    ("dropout_launch", "launch_dropout", "dropout_plan(n, dtype, 1, False, 0, blocks, threads, 0, s)(ln.arg(x), ln.arg(y), *tail)",
     "dropout_plan(n, dtype, 1, False, 1, blocks, threads, 0, s)(ln.arg(x), ln.arg(y), *tail)"):
        "version 1 ignores head (v2's cut first group): it only sizes version 2's grid",
    ("dropout_launch", "launch_dropout",
     "dropout_plan(n, dtype, 2, vec, offset % GROUP, blocks, threads, 0, s)(xa, xa, ln.arg(y), *tail)",
     "dropout_plan(n, dtype, 2, vec, (offset // GROUP), blocks, threads, 0, s)(xa, xa, ln.arg(y), *tail)"):
        "head only sizes version 2's grid (launch geometry: the kernel reads the offset itself)",
    ("dropout_launch", "launch_act_dropout_backward", "dropout = bool(dropout)", "pass"):
        "the plan key and kernel factories treat any truthy value as True (True == 1 hashes alike)",
    ("matmul_v3", "_Loader.prologue", "for r in range(self.count):", "for r in range(self.count + 1):"):
        "one more run of slice 0 loaded (its row clamped, its k guarded) into registers no store reads",
    ("matmul_v3", "_Loader.prologue", "for j in range(v):", "for j in range(v + 1):"):
        "one more element per k-contiguous run of slice 0 loaded (guarded in k) into a register no store reads",
    **{("matmul_v3", "_Loader.prologue", "if self.kc and not self.vec and v > 1:", after):
       "defines the last-element clamp also for runs of 1, whose loads never read it"
       for after in ("if self.kc and not self.vec and v >= 1:", "if self.kc and not self.vec and v > 0:")},
    **{("matmul_v3", "_Loader.addr_stores", "if not self.kc and self.v == 4:", after):
       "four 4-byte shared stores in place of one 16-byte store of the same run: the same bytes"
       for after in ("if not self.kc and self.v == 3:", "if not self.kc and self.v == 5:")},
    ("matmul_v3", "_thread_offsets", "return [(i // v, i % v) for i in range(t)]",
     "return [(i // v, i % v) for i in range(t + 1)]"):
        "one more (run, offset) pair past the thread's t rows: the callers index the first t only",
    **{("matmul_v3", "pipelined_source", "gm, gn = max(1, tm // GROUP), max(1, tn // GROUP)", after): _RUNS
       for after in ("gm, gn = max(2, tm // GROUP), max(1, tn // GROUP)",
                     "gm, gn = max(1, tm // GROUP), max(2, tn // GROUP)")},
    ("matmul_v3", "pipelined_source", "ra = [r * (bm // gm) + o for r, o in _thread_offsets(tm, gm)]",
     "ra = [((r * (bm // gm)) - o) for r, o in _thread_offsets(tm, gm)]"):
        "the fragment loads read each run's first row offset only (o == 0 there)",
    ("matmul_v3", "pipelined_source", "for i in range(tm):", "for i in range(tm + 1):"):
        "one more accumulator row set to zero, which no k-step and no store reads",
    ("matmul_v3", "pipelined_source", "for i in range(tm):", "for i in range(tm + 1):", 1):
        "one more fragment register of set 1 set to zero, which no k-step reads",
    ("matmul_v3", "pipelined_source", "for j in range(tn):", "for j in range(tn + 1):"):
        "one more fragment register of set 1 set to zero, which no k-step reads",
    **{("matmul_v3", "pipelined_source", 's("last = u32(max(ntiles, u64(1)) - u64(1))")', after):
       "last is compared with t >= 1 only when ntiles >= 2, where the max is ntiles either way"
       for after in ('s("last = u32(max(ntiles, u64(0)) - u64(1))")', 's("last = u32(max(ntiles, u64(2)) - u64(1))")')},
    ("matmul_v3", "pipelined_source", "frags((kk + 1) % 2, kk + 1)", "frags(((kk - 1)) % 2, kk + 1)"):
        "kk + 1 and kk - 1 have the same parity",
    **{("bias_grad", "bias_grad_v2_source", "if lane == uint64(0) and j < n:", after):
       "every lane adds the same shared partial sums in the same order: any lane (or several) stores the same total"
       for after in ("if lane != uint64(0) and j < n:", "if lane == uint64(1) and j < n:")},
    ("splitk", "choose_chunk", "want = max(2, min(sms // max(tiles, 1), k // CHUNK_QUANTUM))",
     "want = max(1, min(sms // max(tiles, 1), k // CHUNK_QUANTUM))"):
        "past the guard tiles * 2 <= sms and K >= 2 quanta, so both terms of the min are at least 2",
    ("splitk", "choose_chunk", "want = max(2, min(sms // max(tiles, 1), k // CHUNK_QUANTUM))",
     "want = max(2, min(sms // max(tiles, 0), k // CHUNK_QUANTUM))"):
        "differs only for a grid of 0 tiles, which no launch has (M, N > 0)",
}

# Survivors equivalent by a rule rather than one by one: (test on a mutant, reason).
EQUIVALENT_RULES = (
    (lambda m: m.after == m.before.replace("reshape(-1", "reshape(-2") != m.before,
     "NumPy infers the dimension given as any negative number, not only -1"),
    (lambda m: "_plan(" in m.before and (
        any(m.after == m.before.replace(f", 0, {tail}", f", 1, {tail}", 1) != m.before for tail in ("s)", "ln.stream("))
        or (m.before.endswith(", 0,") and m.after == m.before[:-2] + "1,")),  # the stream on the next line
     ("the kernel-level launchers' plan key names device 0 or 1 (the argument before the stream): a different "
      "cache slot, the same plan")),
)


def equivalence(m) -> str | None:
    """Why mutant ``m`` cannot be observed, or None.

    An equivalent mutant may still make the tests slower (one more K slice of zeros, say), past the
    time limit: it is reported as equivalent then too, not as killed by the timeout."""
    if m.key in EQUIVALENT:
        return EQUIVALENT[m.key]
    return next((why for rule, why in EQUIVALENT_RULES if rule(m)), None)


# ----------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------

OPERATORS = {
    "cmp": "comparison flip: >= <-> >, < <-> <=, == <-> !=",
    "int": "integer constant +1 / -1 (Philox multipliers and key bumps, round counts, shifts, masks, "
           "bounds, index offsets)",
    "binop": "arithmetic / bitwise swap: + <-> -, << <-> >>, & -> |, | -> &, ^ -> |, // <-> %",
    "range": "loop bound off by one: range(..., b) -> b + 1 / b - 1",
    "drop": "statement dropped: an augmented assignment, a re-assignment, a call statement, a break",
    "text": "in a code generator's emitted source (string literals): the same comparison, arithmetic "
            "and integer operators applied to the generated code",
}

_CMP = {ast.GtE: ast.Gt, ast.Gt: ast.GtE, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
_CMP_TEXT = {ast.GtE: ">=", ast.Gt: ">", ast.Lt: "<", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!="}
_BIN = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.LShift: [ast.RShift], ast.RShift: [ast.LShift],
        ast.BitAnd: [ast.BitOr], ast.BitOr: [ast.BitAnd], ast.BitXor: [ast.BitOr], ast.FloorDiv: [ast.Mod],
        ast.Mod: [ast.FloorDiv]}
_BIN_TEXT = {ast.Add: "+", ast.Sub: "-", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|",
             ast.BitXor: "^", ast.FloorDiv: "//", ast.Mod: "%", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_AUG_TEXT = {k: v + "=" for k, v in _BIN_TEXT.items()}
# Generated code: operators between spaces (the generator's style), integer literals not part of a name.
_TEXT_OPS = [(" >= ", " > "), (" > ", " >= "), (" <= ", " < "), (" < ", " <= "), (" + ", " - "), (" - ", " + "),
             (" // ", " % "), (" % ", " // "), (" ^ ", " | ")]
_TEXT_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")
_ATOMIC = (ast.Name, ast.Constant, ast.Attribute, ast.Call, ast.Subscript, ast.Tuple, ast.List)


@dataclasses.dataclass
class Mutant:
    target: Target
    func: str
    op: str
    line: int
    text: str  # the mutated file
    before: str  # stripped original line(s)
    after: str  # stripped mutated line(s)
    nth: int = 0  # tells apart identical edits of identical lines in one function
    orig: str = ""  # the file the mutant was made from

    @property
    def key(self) -> tuple:
        return (self.target.name, self.func, self.before, self.after) + ((self.nth,) if self.nth else ())

    @property
    def ident(self) -> str:
        h = hashlib.sha1(repr(self.key).encode()).hexdigest()[:8]
        return f"{self.target.name}:{self.line}:{self.op}:{h}"


def _line_offsets(text: str) -> list[int]:
    offs, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line.encode())
        offs.append(pos)
    return offs


class _Source:
    """A file's text with byte-exact span replacement (AST columns are UTF-8 byte offsets)."""

    def __init__(self, text: str):
        self.text = text
        self.data = text.encode()
        self.offs = _line_offsets(text)
        self.lines = text.splitlines()

    def span(self, node) -> tuple[int, int]:
        return (self.offs[node.lineno - 1] + node.col_offset, self.offs[node.end_lineno - 1] + node.end_col_offset)

    def seg(self, node) -> str:
        a, b = self.span(node)
        return self.data[a:b].decode()

    def replace(self, a: int, b: int, new: str) -> str:
        return (self.data[:a] + new.encode() + self.data[b:]).decode()

    def operand(self, node) -> str:
        s = self.seg(node)
        return s if isinstance(node, _ATOMIC) else f"({s})"


def _regions(tree: ast.Module, target: Target):
    """Yield (qualified name, node) for every region of ``target`` (functions, or module constants)."""
    wanted = set(target.regions)
    found = set()

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = prefix + node.name
                if q in wanted and not isinstance(node, ast.ClassDef):
                    found.add(q)
                    yield q, node
                elif isinstance(node, ast.ClassDef):
                    yield from visit(node.body, q + ".")
            elif not prefix and isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and "=" + t.id in wanted:
                        found.add("=" + t.id)
                        yield t.id, node

    yield from visit(tree.body, "")
    missing = wanted - found
    if missing:
        raise SystemExit(f"mutation: {target.path} has no {sorted(missing)} (update TARGETS in {__file__})")


def _assigned_before(func: ast.AST) -> set[int]:
    """ids of Assign nodes in ``func`` that re-assign a name already bound earlier (or a parameter)."""
    bound = {a.arg for f in ast.walk(func) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for a in f.args.args + f.args.kwonlyargs}
    out = set()
    nodes = sorted((n for n in ast.walk(func) if isinstance(n, (ast.Assign, ast.For, ast.AugAssign))),
                   key=lambda n: (n.lineno, n.col_offset))
    for n in nodes:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target]
        names = {t.id for tt in targets for t in ast.walk(tt) if isinstance(t, ast.Name)}
        if isinstance(n, ast.Assign) and names and names <= bound:
            out.add(id(n))
        bound |= names
    return out


def _emitted_first(node):
    """For ``s(...)`` / ``src(...)`` with one argument: (the argument, its leading literal text or None);
    None for any other node."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("s", "src")
            and len(node.args) == 1):
        return None
    arg = node.args[0]
    first = arg.value if isinstance(arg, ast.Constant) else None
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        first = arg.values[0].value
    return arg, first if isinstance(first, str) else None


def _is_comment_call(node) -> bool:
    """``s(f"# ...")``: a generator emitting a comment."""
    emitted = _emitted_first(node)
    return emitted is not None and emitted[1] is not None and emitted[1].lstrip().startswith("#")


def _is_code_string_call(node) -> bool:
    """``s("...")`` / ``src(f"...")``: a generator emitting one line of code (not a comment)."""
    emitted = _emitted_first(node)
    if emitted is None or isinstance(emitted[0], ast.BinOp):  # "..." + (...) concatenations
        return False
    return not _is_comment_call(node)


def _is_async_wait_factory(node) -> bool:
    """``make_cp_async_wait(n)``: the wait's count of groups left in flight."""
    f = node.func if isinstance(node, ast.Call) else None
    return (isinstance(f, ast.Attribute) and f.attr == "make_cp_async_wait") or (
        isinstance(f, ast.Name) and f.id == "make_cp_async_wait")


def _string_parts(call: ast.Call):
    """The literal string pieces of a code-emitting call (Constant nodes, incl. f-string parts)."""
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        yield arg
    elif isinstance(arg, ast.JoinedStr):
        for v in arg.values:
            if isinstance(v, ast.Constant):
                yield v


def _mutations(src: _Source, func_node, regex, python_drops=True):
    """Yield (op, byte start, byte end, replacement, line) for one region."""
    reassign = _assigned_before(func_node)
    line_ok = (lambda ln: re.search(regex, src.lines[ln - 1]) is not None) if regex else (lambda ln: True)
    # messages and assertions are not the contract: nothing under a raise or an assert is mutated
    quiet = {id(c) for n in ast.walk(func_node) if isinstance(n, (ast.Raise, ast.Assert)) for c in ast.walk(n)}
    # nor default arguments (stream=0, version=2), nor the dimension argument of cuda.grid(1)
    quiet |= {id(c) for n in ast.walk(func_node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
              for d in n.args.defaults + [d for d in n.args.kw_defaults if d is not None] for c in ast.walk(d)}
    # nor annotations (types for readers and checkers: they do not change what the code computes)
    quiet |= {id(c) for n in ast.walk(func_node) for ann in _annotations(n) for c in ast.walk(ann)}
    quiet |= {id(a) for n in ast.walk(func_node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr in ("grid", "gridsize") for a in n.args}
    # nor the emitted comments, nor how many cp.async groups a wait leaves in flight (a race, as a barrier)
    quiet |= {id(c) for n in ast.walk(func_node) if _is_comment_call(n) or _is_async_wait_factory(n)
              for a in n.args for c in ast.walk(a)}
    nodes = [n for n in ast.walk(func_node) if id(n) not in quiet]
    code_calls = [n for n in nodes if _is_code_string_call(n)]
    code_calls_ids = {id(c) for c in code_calls}
    code_parts = {id(p) for c in code_calls for p in _string_parts(c)}
    in_fstring = {id(v) for n in nodes if isinstance(n, ast.JoinedStr) for v in n.values}
    for n in nodes:
        if not hasattr(n, "lineno") or not line_ok(n.lineno):
            continue
        if isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in _CMP:
            new = _CMP_TEXT[_CMP[type(n.ops[0])]]
            a, b = src.span(n)
            yield "cmp", a, b, f"{src.operand(n.left)} {new} {src.operand(n.comparators[0])}", n.lineno
        elif isinstance(n, ast.BinOp) and type(n.op) in _BIN and not _is_text(n.left) and not _is_text(n.right):
            a, b = src.span(n)
            for op in _BIN[type(n.op)]:
                yield "binop", a, b, f"({src.operand(n.left)} {_BIN_TEXT[op]} {src.operand(n.right)})", n.lineno
        elif (isinstance(n, ast.Constant) and type(n.value) is int and id(n) not in in_fstring):
            a, b = src.span(n)
            old = src.seg(n)
            if not re.fullmatch(r"(0[xX][0-9a-fA-F_]+|\d[\d_]*)", old):
                continue
            fmt = (lambda v: hex(v).upper().replace("0X", "0x")) if old.lower().startswith("0x") else str
            for v in (n.value + 1, n.value - 1):
                if v >= 0:
                    yield "int", a, b, fmt(v), n.lineno
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) in code_parts:
            yield from _text_mutations(src, n)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "range"
              and n.args and id(n) not in code_calls_ids):
            bound = n.args[1] if len(n.args) >= 2 else n.args[0]
            if isinstance(bound, ast.Constant):
                continue  # the int operator covers range(4)
            a, b = src.span(bound)
            for d in ("+ 1", "- 1"):
                yield "range", a, b, f"{src.operand(bound)} {d}", n.lineno
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and _is_emit(n.value):
            if _emits_a_store(n.value):
                a, b = src.span(n)
                yield "drop", a, b, "pass", n.lineno
            continue
        if not python_drops:
            continue
        if (isinstance(n, ast.AugAssign) and type(n.op) in _BIN) or isinstance(n, ast.Break) or (
                isinstance(n, ast.Assign) and id(n) in reassign) or (
                isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and not _is_barrier(n.value)):
            a, b = src.span(n)
            yield "drop", a, b, "pass", n.lineno


def _annotations(node):
    """The annotation expressions of a function's signature or of an annotated assignment."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        args = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
        yield from (x.annotation for x in args if x.annotation is not None)
        if node.returns is not None:
            yield node.returns
    elif isinstance(node, ast.AnnAssign):
        yield node.annotation


def _is_text(node) -> bool:
    """A string expression (``"..." + ...`` builds generated code; ``-`` on it is no mutant)."""
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)) or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join")


def _is_emit(call) -> bool:
    return isinstance(call.func, ast.Name) and call.func.id in ("s", "src")


def _emits_a_store(call) -> bool:
    """An emitted line whose loss leaves valid code: an augmented assignment, a store to an array,
    a call (``store(...)``) or the buffer swap; not a barrier (see :func:`_is_barrier`)."""
    if not _is_code_string_call(call) or _is_barrier(call):
        return False
    arg = call.args[0]
    parts = [arg] if isinstance(arg, ast.Constant) else getattr(arg, "values", [])
    t = "".join(p.value if isinstance(p, ast.Constant) else "X" for p in parts).strip()
    lhs = t.split(" = ", 1)[0] if " = " in t else ""
    return bool(re.match(r"[\w{}X]+ [-+*/|&^%]= ", t) or "[" in lhs or re.match(r"\w+\(", t) or t == "cur = nxt")


def _is_barrier(call) -> bool:
    """``cuda.syncthreads()`` and the emitting of one, or of a cp.async commit or wait: a missing
    barrier is a race, invisible to the simulator (whose cp.async copies at once; docs/testing.md);
    compute-sanitizer's racecheck on a GPU is the tool for those."""
    if isinstance(call.func, ast.Attribute) and call.func.attr == "syncthreads":
        return True
    if _is_emit(call) and call.args and isinstance(call.args[0], ast.Constant):
        return any(b in str(call.args[0].value) for b in ("syncthreads", "cp_async_wait", "cp_async_commit"))
    return False


def _text_mutations(src: _Source, node):
    """Operators applied inside one literal piece of generated code."""
    a, b = src.span(node)
    raw = src.data[a:b].decode()  # with its quotes (or, inside an f-string, the bare text)
    for old, new in _TEXT_OPS:
        for m in re.finditer(re.escape(old), raw):
            # " > " must not be the tail of " >> " etc.: the operator stands alone between spaces
            yield "text", a, b, raw[: m.start()] + new + raw[m.end():], node.lineno
    for m in _TEXT_INT.finditer(raw):
        v = int(m.group())
        for w in (v + 1, v - 1):
            if w >= 0:
                yield "text", a, b, raw[: m.start()] + str(w) + raw[m.end():], node.lineno


_FROM_HEAD = []  # [True] with --head


def read_source(rel: str) -> str:
    """A target file as the copies hold it: the working tree's, or the last commit's (``--head``)."""
    if _FROM_HEAD:
        return subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
    return (ROOT / rel).read_text()


def generate(target: Target) -> list[Mutant]:
    """Every mutant of ``target``, in a stable order; only those that still parse."""
    text = read_source(target.path)
    src = _Source(text)
    tree = ast.parse(text)
    out, seen = [], set()
    for qual, region in _regions(tree, target):
        for op, a, b, new, line in _mutations(src, region, target.lines, target.python_drops):
            mutated = src.replace(a, b, new)
            if mutated == text or mutated in seen:
                continue
            try:
                ast.parse(mutated)
            except SyntaxError:
                continue
            seen.add(mutated)
            before, after = _changed_lines(text, mutated)
            nth = sum(1 for m in out if (m.func, m.before, m.after) == (qual, before, after))
            out.append(Mutant(target, qual, op, line, mutated, before, after, nth, text))
    out.sort(key=lambda m: (m.line, m.op, m.after))
    return out


def _changed_lines(old: str, new: str) -> tuple[str, str]:
    a, b = old.splitlines(), new.splitlines()
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    before, after = [], []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag != "equal":
            before += [s.strip() for s in a[i1:i2]]
            after += [s.strip() for s in b[j1:j2]]
    return " / ".join(before), " / ".join(after)


def diff(m: Mutant) -> str:
    old = m.orig.splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, m.text.splitlines(keepends=True), m.target.path, m.target.path, n=1))


# ----------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------


def _tree_files() -> list[str]:
    """Tracked files and untracked files git does not ignore (the working tree as others see it)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and (ROOT / p).is_file()]


def _package_links(copy: Path):
    """pyproject's package-dir mapping (``gpufc.kernels = "kernels"``) as symlinks inside the copy, so the
    copy's ``gpufc.kernels`` is found on the copy's path before the editable install's finder is asked."""
    conf = tomllib.loads((copy / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    for pkg, where in conf.get("package-dir", {}).items():
        if not pkg:
            continue
        link = copy.joinpath(*pkg.split("."))
        if not link.exists() and (copy / where).is_dir():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((copy / where).resolve(), target_is_directory=True)


# One per worker: imports the heavy third-party modules once (numpy, numba, numba.cuda, pytest, hypothesis:
# about 80% of a test run's start-up), then forks a child per test run. gpufc and the tests are imported
# in the child only, from the copy, so every run sees the file on disk now.
_SERVER = r"""
import json, os, resource, sys, traceback
import numpy, numba, numba.cuda, pytest, hypothesis  # noqa: F401 -- preloaded for every child
proto = os.fdopen(os.dup(1), "w", buffering=1)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            os.setpgid(0, 0)
            limit = req["memory"]
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))  # a mutant may ask for terabytes
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
            rc = int(pytest.main(req["args"]))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
    proto.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
"""
MEMORY_LIMIT = 6 * 2**30  # bytes of data per test run
ORDERED = {}  # a target's test selection -> its node ids, fastest killers first (Worker.ordered)


def _uses_simulator() -> bool:
    """As tests/conftest.py decides: the simulator unless asked otherwise and the driver reports a GPU."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return True
    code = "from gpufc.runtime import backend; print(backend.driver_device_count())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    return not (out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) > 0)


class Worker:
    """A private copy of the tree, its caches, its test environment and its fork server."""

    def __init__(self, base: Path, index: int, files: list[str] | None, sim: bool):
        self.copy = base / f"tree{index}"
        self.log = base / f"run{index}.log"
        if files is None:  # the last commit, not the working tree
            self.copy.mkdir(parents=True)
            archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(self.copy)], input=archive, check=True)
        for rel in files or ():
            dst = self.copy / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst)
        _package_links(self.copy)
        caches = base / f"cache{index}"
        self.env = dict(os.environ)
        for k in ("NUMBA_ENABLE_CUDASIM", "GPUFC_BACKEND"):  # tests/conftest.py decides, as in a plain run
            self.env.pop(k, None)
        if sim:
            self.env["NUMBA_ENABLE_CUDASIM"] = "1"  # what conftest would set, before the server imports numba
        self.env.update({
            "PYTHONPATH": str(self.copy), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
            "NUMBA_CACHE_DIR": str(caches / "numba"), "GPUFC_CACHE": "0", "GPUFC_CACHE_DIR": str(caches / "gpufc"),
            GUARD_ENV: "1",
        })
        self.server = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=self.copy, env=self.env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.replies = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.server.stdout:
            self.replies.put(json.loads(line))
        self.replies.put({"eof": True})

    def close(self):
        self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()

    def check_imports(self):
        code = "import gpufc, gpufc.kernels, gpufc.reference; print(gpufc.__file__); print(gpufc.kernels.__file__)"
        out = subprocess.run([sys.executable, "-c", code], cwd=self.copy, env=self.env, capture_output=True,
                             text=True, check=False)
        paths = out.stdout.split()
        if out.returncode or len(paths) != 2 or not all(Path(p).is_relative_to(self.copy) for p in paths):
            raise SystemExit(f"mutation: the copy at {self.copy} does not import its own gpufc: "
                             f"{out.stdout}{out.stderr}")

    def ordered(self, tests: tuple) -> tuple:
        """``tests`` as explicit node ids in the order given (options kept). pytest collects a file
        once and runs it in file order, so a file listed after some of its own tests would run
        those tests in file order too: the fastest killers would no longer come first."""
        opts, picks, i = [], [], 0
        while i < len(tests):
            if tests[i] in ("-m", "-k"):
                opts += tests[i:i + 2]
                i += 2
            else:
                picks.append(tests[i])
                i += 1
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-o", "addopts=", *tests], cwd=self.copy, env=self.env, capture_output=True,
                             text=True, check=False)
        ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
        if out.returncode or not ids:
            raise SystemExit(f"mutation: cannot collect {tests}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        rank = {}
        for node in ids:
            for j, pick in enumerate(picks):
                if node == pick or node.startswith((pick + "[", pick + "::")):
                    rank[node] = j
                    break
            else:
                rank[node] = len(picks)
        return tuple(opts) + tuple(sorted(ids, key=lambda n: rank[n]))  # a stable sort: file order within a pick

    def _reply(self, timeout=None):
        msg = self.replies.get(timeout=timeout)
        if "eof" in msg:
            raise SystemExit(f"mutation: the test server of {self.copy} died")
        return msg

    def run(self, target: Target, text: str | None, timeout: float) -> tuple[str, float, str]:
        """Run ``target``'s tests with ``text`` as its file (None: unmutated). -> (outcome, seconds, tail)."""
        path = self.copy / target.path
        original = path.read_text()
        if text is not None:
            path.write_text(text)
        t0 = time.monotonic()
        args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", "--strict-markers",
                *ORDERED.get(target.tests, target.tests)]
        try:
            self.server.stdin.write(json.dumps({"args": args, "log": str(self.log), "memory": MEMORY_LIMIT}) + "\n")
            pid = self._reply(timeout=600)["pid"]
            try:
                rc = self._reply(timeout=timeout)["rc"]
                outcome = {0: "survived", 5: "error", 4: "error"}.get(rc, "killed")
            except queue.Empty:
                os.killpg(pid, signal.SIGKILL)
                self._reply()
                outcome = "timeout"
        finally:
            if text is not None:
                path.write_text(original)
        out = self.log.read_text(errors="replace") if self.log.exists() else ""
        return outcome, time.monotonic() - t0, "\n".join(out.splitlines()[-6:])


class Pool:
    def __init__(self, n: int, head: bool = False):
        self.base = Path(tempfile.mkdtemp(prefix="gpufc-mutation-"))
        files = None if head else _tree_files()
        sim = _uses_simulator()
        self.workers = [Worker(self.base, i, files, sim) for i in range(n)]
        self.free = list(self.workers)
        self.lock = threading.Condition()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for w in self.workers:
            w.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def run(self, target, text, timeout):
        with self.lock:
            while not self.free:
                self.lock.wait()
            w = self.free.pop()
        try:
            return w.run(target, text, timeout)
        finally:
            with self.lock:
                self.free.append(w)
                self.lock.notify()


def _pmap(pool: Pool, jobs, fn):
    with concurrent.futures.ThreadPoolExecutor(len(pool.workers)) as ex:
        yield from ex.map(fn, jobs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="*", help="targets by name or path (default: all): "
                    + ", ".join(t.name for t in TARGETS))
    ap.add_argument("--sample", type=int, help="run a deterministic sample of N mutants")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, help="seconds per mutant (default: 2x the unmutated run + 60 s)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated run of each selection (then --timeout is needed)")
    ap.add_argument("--head", action="store_true",
                    help="mutate the last commit instead of the working tree (others' unfinished edits stay out)")
    ap.add_argument("--list", action="store_true", help="print the mutants and stop")
    ap.add_argument("--report-from", nargs="*", metavar="LOG",
                    help="print the report of the mutants that these runs' logs record (an interrupted run too), "
                         "with today's EQUIVALENT table")
    ap.add_argument("--skip-from", nargs="*", metavar="LOG",
                    help="skip the mutants these runs' logs record (resume an interrupted run; report all the logs "
                         "together with --report-from)")
    ap.add_argument("--only", nargs="*", help="only the mutants whose id (target:line:op:hash) contains one of these")
    ap.add_argument("--ops", nargs="*", choices=sorted(OPERATORS), help="only these operators")
    args = ap.parse_args(argv)
    if os.environ.get(GUARD_ENV):
        print("mutation: already inside a mutation run; refusing to nest", file=sys.stderr)
        return 2

    if args.head:
        _FROM_HEAD.append(True)
    targets = [t for t in TARGETS if not args.files or t.name in args.files or t.path in args.files]
    if args.files and len(targets) != len(set(args.files)):
        raise SystemExit(f"mutation: unknown target in {args.files}; targets: {[t.name for t in TARGETS]}")
    if args.files:  # in the order asked for
        targets.sort(key=lambda t: next(i for i, f in enumerate(args.files) if f in (t.name, t.path)))
    mutants = [m for t in targets for m in generate(t) if not args.ops or m.op in args.ops]
    if args.only:
        mutants = [m for m in mutants if any(o in m.ident for o in args.only)]
    if args.skip_from:
        done = set(_logged(args.skip_from))
        mutants = [m for m in mutants if m.ident.rsplit(":", 1)[1] not in done]
    if args.sample is not None and args.sample < len(mutants):
        mutants = sorted(random.Random(args.seed).sample(mutants, args.sample),
                         key=lambda m: (targets.index(m.target), m.line))
    if args.report_from:
        return report_from_logs(args.report_from, mutants, targets)
    if args.list:
        for m in mutants:
            print(f"{m.ident}  {m.func}: {m.before}  ->  {m.after}")
        print(f"{len(mutants)} mutants")
        return 0
    if args.no_baseline and not args.timeout:
        raise SystemExit("mutation: --no-baseline needs --timeout")

    start = time.monotonic()
    by_name = {t.name: t for t in TARGETS}
    with Pool(max(1, args.workers), args.head) as pool:
        for w in pool.workers:
            w.check_imports()
        print(f"mutation: {len(pool.workers)} workers, copies under {pool.base}; gpufc and gpufc.kernels "
              "import from the copies", flush=True)
        # planted mutants: each must be killed
        sanity = []
        for name, old, new in SANITY:
            t = by_name[name]
            text = read_source(t.path)
            if old not in text:
                raise SystemExit(f"mutation: planted mutant's line {old!r} not in {t.path}; update SANITY")
            sanity.append((t, text.replace(old, new, 1)))
        for (t, _), (outcome, secs, tail) in zip(sanity, _pmap(pool, sanity, lambda j: pool.run(j[0], j[1], 900))):
            print(f"mutation: planted mutant in {t.path}: {outcome} ({secs:.0f} s)", flush=True)
            if outcome not in ("killed", "timeout"):
                print(tail)
                raise SystemExit("mutation: a planted mutant was not killed: the test runs do not see the "
                                 "mutated copy; aborting")
        timeouts = {}
        used = [t for t in targets if any(m.target is t for m in mutants)]
        for t in used:
            if t.tests not in ORDERED:
                ORDERED[t.tests] = pool.workers[0].ordered(t.tests)
        if args.no_baseline:
            timeouts = {t.name: args.timeout for t in used}
        else:
            firsts = list({t.tests: t for t in reversed(used)}.values())  # one run per distinct selection
            took = {}
            for t, (outcome, secs, tail) in zip(firsts, _pmap(pool, firsts, lambda t: pool.run(t, None, 3600))):
                names = [u.name for u in used if u.tests == t.tests]
                print(f"mutation: unmutated tests of {', '.join(names)}: {outcome} in {secs:.0f} s", flush=True)
                if outcome != "survived":
                    print(tail)
                    raise SystemExit(f"mutation: the unmutated tests of {t.name} do not pass; fix them first")
                took[t.tests] = secs
            timeouts = {t.name: args.timeout or 2 * took[t.tests] + 60 for t in used}

        results = []
        done = [0]

        def one(m):
            outcome, secs, tail = pool.run(m.target, m.text, timeouts[m.target.name])
            if outcome in ("survived", "timeout") and equivalence(m):
                outcome = "equivalent"  # slower past the limit is not killed: see equivalence()
            done[0] += 1
            print(f"[{done[0]}/{len(mutants)}] {outcome:10s} {secs:5.0f} s  {m.ident}  {m.before}  ->  {m.after}",
                  flush=True)
            return m, outcome, tail

        print(f"mutation: {len(mutants)} mutants", flush=True)
        results = list(_pmap(pool, mutants, one))
    return report(results, targets, time.monotonic() - start)


_LOG_LINE = re.compile(r"^\[\d+/\d+\] (\w+)\s+(\d+) s  (\S+)  ")


def _logged(logs) -> dict:
    """{mutant hash: (outcome, seconds)} of every mutant the run logs record (later logs win)."""
    seen = {}
    for log in logs:
        for line in Path(log).read_text().splitlines():
            hit = _LOG_LINE.match(line)
            if hit:
                seen[hit.group(3).rsplit(":", 1)[1]] = (hit.group(1), int(hit.group(2)))
    return seen


def report_from_logs(logs, mutants, targets) -> int:
    """The report of the mutants recorded in ``logs`` (later logs win), matched to today's mutants by id."""
    by_hash = {m.ident.rsplit(":", 1)[1]: m for m in mutants}
    seen = {h: rec for h, rec in _logged(logs).items() if h in by_hash}
    results = []
    for h, (outcome, _) in seen.items():
        m = by_hash[h]
        if outcome in ("survived", "equivalent"):
            outcome = "equivalent" if equivalence(m) else "survived"
        elif outcome == "timeout" and equivalence(m):
            outcome = "equivalent"
        results.append((m, outcome, ""))
    print(f"mutation: {len(results)} of {len(mutants)} mutants recorded in {', '.join(map(str, logs))}")
    totals = {t.name: sum(1 for m in mutants if m.target is t) for t in targets}
    worker_seconds = sum(sec for _, sec in seen.values())
    return report(results, targets, worker_seconds, totals, what="worker-seconds summed over these records")


def report(results, targets, seconds, totals=None, what="wall time") -> int:
    """Counts per target (``totals``: {target name: mutants it has}, shown as "tried of total");
    ``seconds`` is the run's ``what``."""
    kinds = ("killed", "timeout", "survived", "equivalent", "error")
    width = 11 if totals else 5
    print("\n== mutation report ==")
    print(f"{'target':16s} {'path':32s} {'tried':>{width}s} " + " ".join(f"{k:>10s}" for k in kinds) + "  score")
    tot = dict.fromkeys(kinds, 0)
    for t in targets:
        rs = [o for m, o, _ in results if m.target is t]
        if not rs and not totals:
            continue
        c = {k: rs.count(k) for k in kinds}
        for k in kinds:
            tot[k] += c[k]
        live = len(rs) - c["equivalent"]
        score = f"{100.0 * (c['killed'] + c['timeout']) / live:5.1f}%" if live else ("100.0%" if rs else "    -")
        tried = f"{len(rs)} of {totals[t.name]}" if totals else str(len(rs))
        print(f"{t.name:16s} {t.path:32s} {tried:>{width}s} " + " ".join(f"{c[k]:10d}" for k in kinds)
              + f"  {score}")
    n = len(results)
    live = n - tot["equivalent"]
    score = 100.0 * (tot["killed"] + tot["timeout"]) / live if live else 100.0
    tried = f"{n} of {sum(totals.values())}" if totals else str(n)
    print(f"{'total':16s} {'':32s} {tried:>{width}s} " + " ".join(f"{tot[k]:10d}" for k in kinds)
          + f"  {score:5.1f}%")
    print(f"duration: {seconds:.0f} s ({what})")
    bad = [(m, o, tail) for m, o, tail in results if o in ("survived", "error")]
    for m, o, tail in bad:
        print(f"\n{o.upper()} {m.ident} in {m.func}\n  EQUIVALENT key: {m.key!r}\n{diff(m)}")
        if o == "error":
            print(tail)
    eq = [m for m, o, _ in results if o == "equivalent"]
    if eq:
        print("\nequivalent (EQUIVALENT in tests/mutation.py):")
        for m in eq:
            print(f"  {m.ident} {m.before} -> {m.after}: {equivalence(m)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
