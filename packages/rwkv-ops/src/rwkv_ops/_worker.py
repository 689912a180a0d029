"""One framework's part of ``python -m rwkv_ops``, run in its own process.

TensorFlow and Triton abort when they share a process, so the main job starts
``python -m rwkv_ops._worker <backend>`` for each installed backend and reads one JSON line back.
"""

from __future__ import annotations

import json
import sys
import traceback

CHECK_SHAPE = dict(B=2, T=100, H=2, K=64)   # T not a multiple of the chunk on purpose
TIME_SHAPE = dict(B=2, T=1024, H=8, K=64)
TOLERANCE = {"float32": 1e-4}


def check_backend(backend: str, kernel_type=None, seed=None) -> dict:
    """Versions, devices, kernel types, a float64-reference check and a timing of one backend."""
    import importlib

    from rwkv_ops._frameworks import ADAPTERS, reference_errors
    from rwkv_ops.numpy.testing import make_inputs, seed_from_env

    module = importlib.import_module(f"rwkv_ops.{backend}")
    adapter = ADAPTERS[backend]()
    available = list(module.available_kernel_types())
    op, use_kernel = module.get_generalized_delta_rule(HEAD_SIZE=CHECK_SHAPE["K"], KERNEL_TYPE=kernel_type)
    report = {
        "backend": backend,
        "package_version": getattr(module, "__version__", "?"),
        "versions": adapter.versions(),
        "devices": adapter.devices(),
        "available_kernel_types": available,
        "kernel_type": kernel_type or available[0],
        "uses_gpu_kernel": bool(use_kernel),
    }
    seed = seed_from_env() if seed is None else seed
    dtype = "float32"
    shape = [CHECK_SHAPE[n] for n in "BTHK"]
    errors = reference_errors(adapter, op, dtype, shape, seed)
    worst = max(errors.values())
    report["check"] = {"seed": seed, "shape": CHECK_SHAPE, "dtype": dtype, "errors": errors,
                       "worst": worst, "tolerance": TOLERANCE[dtype], "passed": worst <= TOLERANCE[dtype]}
    xt = make_inputs(**TIME_SHAPE, seed=seed)
    timing = {"shape": TIME_SHAPE, "dtype": dtype, "fwd_s": adapter.time(op, xt, dtype, grads=False)}
    if adapter.has_grad:
        timing["fwd_bwd_s"] = adapter.time(op, xt, dtype, grads=True)
    report["timing"] = timing
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    backend = argv[0]
    kernel_type = argv[1] if len(argv) > 1 and argv[1] != "auto" else None
    try:
        report = check_backend(backend, kernel_type)
    except Exception as error:  # reported, not raised: one backend must not hide the others
        report = {"backend": backend, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
    print("RWKV_OPS_REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
