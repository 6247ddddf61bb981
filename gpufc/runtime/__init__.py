"""The runtime: where gpufc runs and how a call reaches the device.

- :mod:`.backend`   which backend (``cuda``, ``sim``, ``cpu``) and the lazy imports behind it
- :mod:`.transfer`  the caller's arrays: classification, device views, outputs in the caller's type
- :mod:`.streams`   the caller's ``stream=`` and CuPy's current stream
- :mod:`.plan`      launch plans: one per call signature, kept in a bounded LRU
- :mod:`.launch`    launchers: the CUDA driver, Numba's own launch, the simulator, a recorder
- :mod:`.cache`     the on-disk kernel cache (``GPUFC_CACHE_DIR``, ``gpufc warmup``)

Nothing here is imported by ``import gpufc`` beyond :mod:`.backend`'s light part.
"""
