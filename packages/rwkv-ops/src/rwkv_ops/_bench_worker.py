"""One implementation's part of ``rwkv-ops bench``, run in its own process.

Usage: ``python -m rwkv_ops._bench_worker '<json>'`` with keys impl ("torch:triton", "fla", ...),
shapes ([[B, T, H, K], ...]), dtype, error_shape, grads. Progress goes to stderr; each result is
one ``RWKV_OPS_BENCH {...}`` line on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import numpy as np

from rwkv_ops._frameworks import reference_errors


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(row: dict) -> None:
    print("RWKV_OPS_BENCH " + json.dumps(row), flush=True)


def fla_op():
    """flash-linear-attention's chunk_rwkv7 behind our signature (it takes log-decay -exp(w) and a
    transposed K x V state)."""
    import torch
    from fla.ops.rwkv7 import chunk_rwkv7

    def op(r, w, k, v, a, b, initial_state=None, output_final_state=True, head_first=False, *, mask=None):
        s0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
        o, s = chunk_rwkv7(r, -torch.exp(w.float()).to(w.dtype), k, v, a, b, scale=1.0, initial_state=s0,
                           output_final_state=output_final_state)
        return o, (None if s is None else s.transpose(-1, -2))

    return op


def resolve(impl: str):
    """(adapter, op, description) for an implementation name."""
    from rwkv_ops._frameworks import ADAPTERS

    if impl == "fla":
        import fla

        return ADAPTERS["torch"](), fla_op(), f"flash-linear-attention {getattr(fla, '__version__', '?')} chunk_rwkv7"
    backend, kernel_type = impl.split(":")
    module = importlib.import_module(f"rwkv_ops.{backend}")
    op, _ = module.get_generalized_delta_rule(KERNEL_TYPE=kernel_type)
    return ADAPTERS[backend](), op, f"rwkv-ops {module.__version__} {backend} {kernel_type}"


def main(argv=None) -> int:
    from rwkv_ops.numpy.testing import make_inputs, seed_from_env

    cfg = json.loads((sys.argv[1:] if argv is None else argv)[0])
    impl, dtype = cfg["impl"], cfg["dtype"]
    seed = seed_from_env(0)
    try:
        log(f"{impl}: importing")
        adapter, op, description = resolve(impl)
        emit({"impl": impl, "kind": "info", "description": description, "versions": adapter.versions(),
              "device": adapter.devices()[-1]})
        if cfg.get("error_shape"):
            log(f"{impl}: error against float64 at {cfg['error_shape']} (first call compiles)")
            errors = reference_errors(adapter, op, dtype, cfg["error_shape"], seed)
            emit({"impl": impl, "kind": "error", "shape": cfg["error_shape"], "errors": errors,
                  "worst": max(errors.values())})
        for shape in cfg["shapes"]:
            B, T, H, K = shape
            x = make_inputs(B, T, H, K, seed=seed)
            row = {"impl": impl, "kind": "time", "shape": shape, "dtype": dtype}
            log(f"{impl}: timing fwd at B={B} T={T} H={H} K={K}")
            row["fwd_ms"] = adapter.time(op, x, dtype, grads=False) * 1e3
            if cfg.get("grads", True) and adapter.has_grad:
                log(f"{impl}: timing fwd+bwd at B={B} T={T} H={H} K={K}")
                row["fwd_bwd_ms"] = adapter.time(op, x, dtype, grads=True) * 1e3
                peak = adapter.peak_memory(op, x, dtype)
                row["peak_gib"] = None if peak is None else peak / 2**30
            emit(row)
    except Exception as error:  # reported as a row: one failure must not end the whole run
        emit({"impl": impl, "kind": "failure", "reason": f"{type(error).__name__}: {error}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
