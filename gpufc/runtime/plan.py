"""Launch plans: everything about a kernel launch that depends only on the call's signature, resolved once.

A call signature is the op, the shapes, the dtype, the epilogue, the
configuration, the device and the stream. For each one a :class:`Plan` holds

- the compiled kernel (loaded once through the launcher, from the on-disk
  cache :mod:`gpufc.runtime.cache` on a GPU),
- the grid and the block,
- the constant arguments (shapes and strides of every array, scalars such as K),
- a reusable argument buffer: one slot per kernel parameter, of which a call
  writes only what changes (the operands' device pointers, the dropout key,
  offset, threshold and scale).

Plans live in a bounded, thread-safe LRU (:data:`PLANS`, 256 entries): a
training loop with fixed shapes builds each plan once and then only looks it
up. The hot path of every op is: validate, look the plan up, allocate the
outputs, write the pointers, launch.

The kernels' side (:mod:`gpufc.kernels`) describes a launch as data, a
:class:`~gpufc.kernels.catalogue.LaunchSpec` (the kernel, grid, block and
parameters); this module turns it into a plan with the active launcher
(:mod:`gpufc.runtime.launch`): the CUDA driver on a GPU, Numba's simulator on
``sim``. The launcher is the one seam a host-path benchmark or a test may
replace (:func:`gpufc.runtime.launch.use_launcher`); nothing else differs.
"""

from __future__ import annotations

import collections
import threading

CAPACITY = 256  # plans kept; a model has a few per layer (forward, two backward products, bias grad, dropout)


class Plan:
    """One resolved launch: ``plan(*values)`` launches with the per-call ``values``.

    ``values`` are the launch's per-call parameters in the kernel's order
    (the :class:`~gpufc.kernels.catalogue.Arg` entries without a fixed
    ``value``): device pointers (ints) on a GPU or simulator arrays on ``sim``
    for the arrays, Python numbers for the scalars.
    """

    __slots__ = ("__weakref__", "block", "grid", "key", "launch", "launcher", "spec")

    def __init__(self, key, spec, launcher, stream):
        self.key = key
        self.spec = spec
        self.launcher = launcher
        kernel = launcher.load(spec.kernel)
        grid = spec.grid
        if callable(grid):
            grid = grid(launcher.resident_blocks(kernel, _threads(spec.block)))
        self.grid = _dim3(grid)
        self.block = _dim3(spec.block)
        self.launch = launcher.bind(kernel, self.grid, self.block, spec.args, stream)

    def __call__(self, *values):
        self.launch(*values)

    def __repr__(self):
        return f"Plan({self.spec.kernel.name}, grid={self.grid}, block={self.block})"


def _dim3(d) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, int) else tuple(int(v) for v in d)
    return (d + (1, 1, 1))[:3]


def _threads(block) -> int:
    b = _dim3(block)
    return b[0] * b[1] * b[2]


class PlanCache:
    """A bounded LRU of plans, safe to use from many threads.

    ``get(key, build, *args)`` returns the plan for ``key``, calling
    ``build(*args)`` (a :class:`~gpufc.kernels.catalogue.LaunchSpec`) only on
    a miss. ``builds`` counts the misses (tests read it).
    """

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, key, build, *args) -> Plan:
        plans = self._plans
        plan = plans.get(key)  # one C call each, atomic under the GIL: a hit takes no lock
        if plan is not None:
            try:
                plans.move_to_end(key)
            except KeyError:  # evicted by another thread meanwhile; the plan is still good for this call
                pass
            return plan
        from . import launch

        # built outside this cache's lock: a first compile may take seconds, other signatures need
        # not wait. In the simulator the build holds the simulator's lock: while a simulated kernel
        # runs, its module sees the simulator's fake ``cuda``, so a kernel built meanwhile would fail.
        with launch.launch_lock():
            plan = Plan(key, build(*args), launch.launcher(), key[-1])
        with self._lock:
            found = self._plans.get(key)
            if found is not None:  # another thread built it meanwhile: keep one
                return found
            self._plans[key] = plan
            self.builds += 1
            while len(self._plans) > self.capacity:
                self._plans.popitem(last=False)
        return plan

    def __len__(self):
        return len(self._plans)

    def __contains__(self, key):
        return key in self._plans

    def clear(self):
        with self._lock:
            self._plans.clear()
            for d in DERIVED:
                d.clear()


DERIVED: list = []  # caches built on plans (e.g. routes, split-K pairs): emptied with PLANS
PLANS = PlanCache()


def get(key, build, *args) -> Plan:
    """The plan for ``key`` (its last element is the stream the plan launches on), built on a miss."""
    return PLANS.get(key, build, *args)
