"""One forward + backward of the Triton path at a quarter of shape S, for a profiler (needs a CUDA GPU).

    ncu --kernel-name regex:chunk_bwd --launch-count 1 python3 benchmarks/profile_kernels.py
    python3 benchmarks/profile_kernels.py warps_bwd=8   # a configuration change
    python3 benchmarks/profile_kernels.py batch=8       # the whole of shape S (no segment split)

Arguments are ChunkConfig fields (name=value, Python literals). Prints the registers, spills and
shared memory of every compiled Triton kernel of the call.
"""

import ast
import sys

import torch

from rwkv_ops.torch import triton_launcher as launcher

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from triton_dev import protocol_inputs  # noqa: E402


def main():
    change = {}
    batch = 2
    for arg in sys.argv[1:]:
        name, value = arg.split("=", 1)
        if name == "batch":  # batch=8: the whole of shape S
            batch = int(value)
        else:
            change[name] = ast.literal_eval(value)
    real = launcher.select_config
    launcher.select_config = lambda *a: real(*a).with_(**change)
    xs, s0 = protocol_inputs(batch, 4096, 64, 64, torch.bfloat16)
    leaves = [x.detach().requires_grad_() for x in xs] + [s0.detach().requires_grad_()]
    o, final = launcher.generalized_delta_rule(*leaves[:6], leaves[6])
    torch.autograd.grad((o, final), leaves, (torch.randn_like(o), torch.randn_like(final)))
    torch.cuda.synchronize()
    chunk_fwd, chunk_bwd, _ = launcher._kernels()
    for module in (chunk_fwd, chunk_bwd):
        for name in dir(module):
            for entry in getattr(getattr(module, name), "device_caches", {}).values():
                for part in entry:
                    for compiled in (part.values() if isinstance(part, dict) else ()):
                        if hasattr(compiled, "n_regs"):
                            print(f"{name}: {compiled.n_regs} registers, {compiled.n_spills} "
                                  f"spills, {compiled.metadata.shared} B shared, "
                                  f"{compiled.metadata.num_warps} warps", flush=True)

if __name__ == "__main__":
    main()
