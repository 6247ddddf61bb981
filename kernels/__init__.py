"""gpufc.kernels: the Numba CUDA kernels and their launch geometry.

Installed as ``gpufc.kernels`` (the repository folder ``kernels/``). Kernels
never allocate and never decide policy; the host API in :mod:`gpufc` validates,
allocates and picks configurations. Import this package only after the backend
is chosen (:func:`gpufc.runtime.backend.numba_cuda`), because the Numba CUDA simulator
must be switched on before numba is first imported.

Packages, one per op, and shared modules:

- :mod:`.linear`      the fully connected op: matmul-plus-bias with the fused epilogue, forward and
  backward (``configs``, ``v1_shared``, ``v2_register_tiled``, ``epilogue``, ``bias_grad``)
- :mod:`.dropout`     scale-and-mask dropout, forward and backward, and the packed mask
  (``philox``, ``v1``, ``v2``, ``mask``)
- :mod:`.activations` device activations and their derivatives (the epilogue)
- :mod:`.catalogue`   every kernel configuration, for the compile tier and the static report
"""

from . import activations, catalogue, dropout, linear  # noqa: F401
