"""How far fp16 storage of the prep tiles and checkpoints moves results from fp32 storage, on the
device that runs it (torch launcher): the relative difference of every output and gradient, and
each storage's relative error against the float64 reference.

    python3 benchmarks/fp16_storage_check.py [seed]

Under Triton's interpreter the two storages give identical bits (the scales are powers of two and
the stored values tf32-exact); compiled for a GPU the kernels of the two storages may order the
tensor cores' accumulations differently, so this measures how much that moves.
"""

import sys

import numpy as np
import torch

from rwkv_ops.numpy.reference import (generalized_delta_rule_backward,
                                      generalized_delta_rule_reference)
from rwkv_ops.numpy.testing import make_cotangents, make_inputs, rel_error
from rwkv_ops.torch import triton_launcher as launcher

NAMES = ("r", "w", "k", "v", "a", "b")
OUT_NAMES = ("y", "state", "dr", "dw", "dk", "dv", "da", "db", "ds0")


def run(seed, B, T, H, K, dtype, device):
    x = make_inputs(B, T, H, K, seed=seed)
    do, dsT = make_cotangents((B, T, H, K), (B, H, K, K), seed=seed)
    configs = launcher._kernels()[2]
    real = configs.tile_dtype
    results = {}
    try:
        for storage in ("float16", "float32"):
            configs.tile_dtype = lambda precision, _s=storage: _s
            ts = [torch.tensor(x[n], dtype=dtype, device=device, requires_grad=True)
                  for n in NAMES]
            s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=device,
                              requires_grad=True)
            o, final = launcher.generalized_delta_rule(*ts, s0)
            grads = torch.autograd.grad((o, final), ts + [s0],
                                        (torch.tensor(do, dtype=dtype, device=device),
                                         torch.tensor(dsT, device=device)))
            results[storage] = [t.detach().double().cpu().numpy() for t in (o, final, *grads)]
    finally:
        configs.tile_dtype = real
    rounded = [torch.tensor(x[n], dtype=dtype).double().numpy() for n in NAMES]
    y_ref, s_ref = generalized_delta_rule_reference(*rounded, x["initial_state"])
    g_ref = generalized_delta_rule_backward(*rounded, x["initial_state"], do=do, dfinal_state=dsT)
    refs = [y_ref, s_ref, *g_ref]
    print(f"seed {seed} B={B} T={T} H={H} K={K} {dtype}:")
    for name, a, b, ref in zip(OUT_NAMES, results["float16"], results["float32"], refs):
        print(f"  {name:5s} fp16 vs fp32 storage {rel_error(a, b):.1e} (max abs "
              f"{np.abs(a - b).max():.1e}, {int((a != b).sum())} of {a.size} differ); error "
              f"fp16 {rel_error(a, ref):.2e} fp32 {rel_error(b, ref):.2e}")


if __name__ == "__main__":
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 728286967
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.bfloat16, torch.float16):
        run(seed, 2, 300, 2, 32, dtype, device)
    run(seed, 2, 1000, 2, 64, torch.bfloat16, device)
