"""Tooling outside the runtime's import path: the benchmark harness (:mod:`.bench`, ``gpufc bench``)
and the PTX/SASS compile report (:mod:`.compile`, the compile tier and ``bench/kernel_report.py``)."""
