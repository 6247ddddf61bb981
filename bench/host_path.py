"""Host time per call of gpufc's whole host path, on any machine (no GPU needed).

``gpufc.linear``, ``FullyConnectedLayer.forward`` and ``gpufc.dropout`` run on
CuPy-like device operands (a stand-in CuPy with fake device pointers) through
the same code as on a GPU: validation, the stream scope, the launch-plan
lookup, the output allocation call, the argument-buffer writes and the result
in the caller's type. Only the final ``cuLaunchKernel`` (and kernel loading,
once per plan) is replaced by a recorder (gpufc/tools/hostpath.py). The
stand-in allocates no memory: CuPy's own ``cupy.empty`` (a few microseconds on
a GPU machine) is not in these figures.

    python bench/host_path.py [--calls 20000] [--repeats 7] [--json out.json]
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's gpufc, not another installed copy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)  # the cuda path, as on a GPU machine
    from gpufc.tools import hostpath

    result = hostpath.measure(calls=args.calls, repeats=args.repeats)
    env = result.pop("_env")
    print("gpufc host path per call: the real code up to the driver; ONLY the driver launch (cuLaunchKernel) and")
    print("kernel loading are stubbed (a recorder), CuPy is a stand-in with fake device pointers (no allocation cost).")
    load = ", ".join(f"{v:.1f}" for v in env["load_average"])
    print(f"CPU: {env['processor']} ({env['cores']} cores, load average {load}), Python {env['python']}; "
          f"not measured on a GPU; median of {env['repeats']} runs x {env['calls']} calls")
    print("  CPU us/call [min, max]   wall us/call   path")
    for name, r in result.items():
        print(f"  {r['cpu_median_s'] * 1e6:7.2f} [{r['cpu_min_s'] * 1e6:.2f}, {r['cpu_max_s'] * 1e6:.2f}]  "
              f"{r['wall_median_s'] * 1e6:9.2f}     {name} -> {r['launches']} launch(es), the last "
              f"{r['kernel']} grid {r['grid']} block {r['block']}")
    print(f"launches recorded: {env['launches_recorded']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
