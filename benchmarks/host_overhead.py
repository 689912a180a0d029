"""Host time per call of the PyTorch Triton entry points, and where it goes.

Each call starts on an idle GPU (a synchronize before it, not timed), so the time measured is the
host's own work for the call: validation, the launch plan, allocations, copies and kernel launches.
A call whose host time exceeds its GPU time is host-bound under ``do_bench`` too. Shapes: the
varlen comparison of ``decode_bench.py`` (8 sequences x 512, H=64, K=64, bf16), forward under
no_grad.

    python benchmarks/host_overhead.py [--profile] [--calls N] [--cpu]

Prints the median host time of each entry point in microseconds and, with ``--profile``, the
functions that take the most of it (cProfile, own time). ``--cpu`` needs no GPU: CPU tensors under
TRITON_INTERPRET=1 with every kernel replaced by a launch that does nothing, so it times this
project's host code alone (not Triton's launch binding nor the CUDA allocator); on a shared
virtual machine it is also steadier than the GPU machine's host, whose numbers moved by 1.5x
between two runs of the same code.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time


def host_us(fn, calls, profiler=None):
    """Median host time of one call of fn in microseconds, each call on an idle GPU."""
    import torch

    times = []
    for _ in range(calls):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        fn()
        if profiler is not None:
            profiler.disable()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile", action="store_true", help="cProfile each entry point")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU tensors, kernels replaced by launches that do nothing")
    args = parser.parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from rwkv_ops.numpy.testing import make_inputs
    from rwkv_ops.torch import inference, triton_launcher as launcher, varlen
    from rwkv_ops.torch.api import generalized_delta_rule

    dev = "cuda"
    if args.cpu:
        dev = "cpu"
        for module in launcher._kernels()[:2]:
            for name in dir(module):
                if name.endswith("_kernel"):
                    setattr(module, name, _NoLaunch())

    B, T, H, K = 8, 512, 64, 64
    x = make_inputs(B, T, H, K, seed=0)
    dense = [torch.tensor(x[n], device=dev).to(torch.bfloat16) for n in ("r", "w", "k", "v", "a",
                                                                          "b")]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=dev)
    packed = [x.reshape(1, B * T, H, K) for x in dense]
    cu_host = list(range(0, B * T + 1, T))
    cu_dev = torch.tensor(cu_host, device=dev, dtype=torch.int32)

    def packed_call(cu):
        return lambda: varlen.generalized_delta_rule_varlen(*packed, cu, s0, kernel_type="triton")

    cases = {
        "launcher.generalized_delta_rule (dense)":
            lambda: launcher.generalized_delta_rule(*dense, s0),
        "launcher.generalized_delta_rule_packed (device cu)":
            lambda: launcher.generalized_delta_rule_packed(*packed, cu_dev, T, s0),
        "varlen, cu_seqlens a host list": packed_call(cu_host),
        "varlen, cu_seqlens a device tensor (one host read on a GPU)": packed_call(cu_dev),
    }
    if not args.cpu:  # the automatic choice takes the native path for CPU tensors
        cases["generalized_delta_rule (dense, automatic choice)"] = (
            lambda: generalized_delta_rule(*dense, s0))
        cases["inference(cu_seqlens=host list)"] = (
            lambda: inference.generalized_delta_rule_inference(*packed, s0, cu_seqlens=cu_host))
    where = "CPU, no-op kernels" if args.cpu else torch.cuda.get_device_name()
    print(f"device: {where}, torch {torch.__version__}; "
          f"[{B}, {T}, {H}, {K}] bf16, no_grad, median of {args.calls} calls")
    print("| entry point | host us per call |\n|---|---|")
    with torch.no_grad():
        for name, fn in cases.items():
            host_us(fn, 10)  # warm-up: compilation, caches
            print(f"| {name} | {host_us(fn, args.calls):.1f} |", flush=True)
        if args.profile:
            for name, fn in cases.items():
                prof = cProfile.Profile()
                host_us(fn, args.calls, prof)
                print(f"\n### {name}: own time per call, top functions")
                stats = pstats.Stats(prof).sort_stats("tottime")
                for func, (_, ncalls, tottime, _, _) in list(
                        sorted(stats.stats.items(), key=lambda kv: -kv[1][2]))[:14]:
                    site = f"{func[0].split('/')[-1]}:{func[1]}({func[2]})"
                    print(f"  {tottime / args.calls * 1e6:8.1f} us  x{ncalls / args.calls:5.1f}  "
                          f"{site}")


if __name__ == "__main__":
    main()
