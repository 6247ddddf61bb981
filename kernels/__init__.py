"""gpufc.kernels: the Numba CUDA kernels and their launch geometry.

Installed as ``gpufc.kernels`` (the repository folder ``kernels/``). Kernels
never allocate and never decide policy; the host API in :mod:`gpufc` validates,
allocates and picks configurations. Import this package only after the backend
is chosen (:func:`gpufc.backend.numba_cuda`), because the Numba CUDA simulator
must be switched on before numba is first imported.

Modules, one per op:

- :mod:`.philox`      device Philox4x32-10 and the dropout keep test
- :mod:`.activations` device activations and their derivatives (the epilogue)
- :mod:`.matmul`      tiled matmul-plus-bias with the fused epilogue, forward and backward
- :mod:`.dropout`     scale-and-mask dropout, forward and backward
- :mod:`.catalogue`   every kernel configuration, for the compile tier and the static report
"""

from . import activations, catalogue, dropout, epilogue, matmul, philox  # noqa: F401
