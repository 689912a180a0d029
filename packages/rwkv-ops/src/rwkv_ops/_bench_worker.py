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


def error_row(adapter, op, dtype, shape, seed):
    """Relative error of y, the final state and all seven gradients against float64 (protocol)."""
    from rwkv_ops.numpy import reference
    from rwkv_ops.numpy.testing import make_cotangents, make_inputs, rel_error

    B, T, H, K = shape
    x = make_inputs(B, T, H, K, seed=seed)
    do, ds = make_cotangents((B, T, H, K), (B, H, K, K), seed=seed)
    o, s, grads = adapter.run(op, x, dtype, grads=adapter.has_grad, do=do, dstate=ds)
    # The reference sees the inputs rounded to the implementation's dtype, the state in fp32.
    rounded = _rounded_inputs(x, dtype)
    args = [rounded[n] for n in "rwkvab"]
    ref_o, ref_s = reference.generalized_delta_rule_reference(*args, rounded["initial_state"])
    errors = {"y": rel_error(o, ref_o), "final_state": rel_error(s, ref_s)}
    if grads is not None:
        ref = reference.generalized_delta_rule_backward(*args, rounded["initial_state"], do=do, dfinal_state=ds)
        for name, g in zip(["r", "w", "k", "v", "a", "b", "initial_state"], ref):
            errors["d" + name] = rel_error(grads[name], g)
    return errors


def _rounded_inputs(x, dtype):
    """The inputs as the implementation sees them (rounded to dtype), back in float64."""
    import ml_dtypes  # shipped with jax, tensorflow and keras; only needed for bfloat16

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    out = {n: x[n].astype(np_dtype).astype(np.float64) for n in "rwkvab"}
    out["initial_state"] = x["initial_state"].astype(np.float32).astype(np.float64)
    return out


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
            errors = error_row(adapter, op, dtype, cfg["error_shape"], seed)
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
