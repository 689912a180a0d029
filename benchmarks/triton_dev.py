"""Development timing of the Triton kernels through the PyTorch launcher (needs a CUDA GPU).

Protocol of ANCHORS.md: bf16 inputs, S = (B=8, T=4096, H=64, K=64), L = (B=1, T=65536, H=32,
K=64); fwd under no_grad with the final state; fwd+bwd = forward then autograd.grad of (o, final
state) w.r.t. the six inputs and s0 with random cotangents; median of triton.testing.do_bench.

Prints: the S / L table (ms) and S peak memory; the worst relative error at the error shape
(B=2, T=256, H=4, K=64) per tensor for bf16 and fp32 inputs; a per-kernel time breakdown (torch
profiler) with the bytes each kernel must move and the bandwidth that implies. ``--sweep`` also
times a few alternative launch configurations.

    python benchmarks/triton_dev.py [--sweep] [--quick] [--shape NAME=B,T,H,K ...] [--dtype float32]

Results and the sweeps tried so far: docs/benchmarks.md ("Where the Triton time goes").
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
import triton

from rwkv_ops.numpy.reference import (generalized_delta_rule_backward,
                                      generalized_delta_rule_reference)
from rwkv_ops.numpy.testing import make_cotangents, make_inputs, rel_error
from rwkv_ops.torch import triton_launcher as launcher

SHAPES = {"S": (8, 4096, 64, 64), "L": (1, 65536, 32, 64)}
NAMES = ("r", "w", "k", "v", "a", "b")


def protocol_inputs(B, T, H, K, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = [torch.randn(B, T, H, K, device="cuda", generator=g) for _ in NAMES]
    r, w, k, v, a, b = x
    w = -F.softplus(w) - 0.5
    a = a / a.norm(dim=-1, keepdim=True)
    b = -a * torch.sigmoid(b)
    s0 = 0.1 * torch.randn(B, H, K, K, device="cuda", generator=g)
    return [t.to(dtype).contiguous() for t in (r, w, k, v, a, b)], s0


def bench(fn, quick):
    if quick:
        return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")
    return triton.testing.do_bench(fn, warmup=500, rep=1500, return_mode="median")


def time_shape(name, quick, dtype):
    B, T, H, K = SHAPES[name]
    xs, s0 = protocol_inputs(B, T, H, K, dtype)
    def infer():
        with torch.no_grad():
            return launcher.generalized_delta_rule(*xs, s0)

    fwd = bench(infer, quick)
    leaves = [x.detach().requires_grad_() for x in xs] + [s0.detach().requires_grad_()]
    dy = torch.randn(B, T, H, K, device="cuda", dtype=dtype)
    ds = torch.randn(B, H, K, K, device="cuda")

    def step():
        o, final = launcher.generalized_delta_rule(*leaves[:6], leaves[6])
        return torch.autograd.grad((o, final), leaves, (dy, ds))

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30  # absolute, inputs included
    both = bench(step, quick)
    step.infer = infer
    return fwd, both, peak, step


def errors_at_error_shape(dtype, seed=1234):
    """({output: relative error}, digest) of a forward and backward at the error shape; the
    digest (sha256 of every output's bits) tells whether a change meant to be exact is."""
    B, T, H, K = 2, 256, 4, 64
    x = make_inputs(B, T, H, K, seed=seed)
    ts = [torch.tensor(x[n], dtype=dtype, device="cuda", requires_grad=True) for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device="cuda", requires_grad=True)
    o, final = launcher.generalized_delta_rule(*ts, s0)
    do, ds = make_cotangents(o.shape, final.shape, seed=seed)
    do_t = torch.tensor(do, dtype=dtype, device="cuda")
    grads = torch.autograd.grad((o, final), ts + [s0], (do_t, torch.tensor(ds, device="cuda",
                                                                              dtype=torch.float32)))
    rounded = [t.detach().double().cpu().numpy() for t in ts]
    y_ref, s_ref = generalized_delta_rule_reference(*rounded, x["initial_state"])
    refs = generalized_delta_rule_backward(*rounded, x["initial_state"],
                                           do=do_t.double().cpu().numpy(), dfinal_state=ds)
    sha = hashlib.sha256()
    for out in (o, final, *grads):
        sha.update(out.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    errs = {"y": rel_error(o.detach().double().cpu().numpy(), y_ref),
            "state": rel_error(final.detach().cpu().numpy(), s_ref)}
    for n, g, ref in zip(("dr", "dw", "dk", "dv", "da", "db", "ds0"), grads, refs):
        errs[n] = rel_error(g.double().cpu().numpy(), ref)
    return errs, sha.hexdigest()[:16]


def no_grad_errors(dtype=torch.bfloat16, seed=1234):
    """Relative errors of o and the final state of a forward under no_grad (error shape)."""
    B, T, H, K = 2, 256, 4, 64
    x = make_inputs(B, T, H, K, seed=seed)
    ts = [torch.tensor(x[n], dtype=dtype, device="cuda") for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device="cuda")
    with torch.no_grad():
        o, final = launcher.generalized_delta_rule(*ts, s0)
    rounded = [t.double().cpu().numpy() for t in ts]
    y_ref, s_ref = generalized_delta_rule_reference(*rounded, x["initial_state"])
    return {"y": rel_error(o.double().cpu().numpy(), y_ref),
            "state": rel_error(final.double().cpu().numpy(), s_ref)}


def kernel_bytes(B, T, H, K, n_seg, dtype):
    """Bytes each kernel must move at least in a forward + backward, by name: inputs and outputs
    in ``dtype``; the prep tiles W, b_bar, Kc, R2 and the checkpoints fp16 for bf16 / fp16 inputs
    and fp32 for fp32 ones (configs.tile_dtype), with fp32 scales; Qc, dec and the pair matrices
    fp32."""
    io = torch.finfo(dtype).bits // 8
    store = 4 if dtype == torch.float32 else 2
    tok = B * T * H * K * io                    # one [B, T, H, K] input or output
    nc = math.ceil(T / 16)
    per_chunk = B * H * nc
    ck = per_chunk * (K * K * store + K * 4)    # one stored state per chunk and its row scales
    tile = per_chunk * 16 * K * store           # one stored [16, K] tile per chunk
    small = per_chunk * (16 * 16 * 4 + K * 4)   # Qc and dec
    scales = per_chunk * 4 * 4                  # the four tiles' scales
    pairs = per_chunk * 4 * 16 * 16 * 4         # the pair matrices kept for the gradient kernel
    return {
        "chunk_prep_kernel": 5 * tok + 4 * tile + small + scales + pairs,
        "chunk_scan_fwd_kernel": tok + 4 * tile + small + scales + tok + ck,
        "chunk_scan_bwd_kernel": tok + 3 * tile + per_chunk * K * 4 + scales + ck,
        "chunk_bwd_kernel": 7 * tok + 2 * ck + 6 * tok + pairs,
    }


def kernel_times(step, n=3):
    """Mean CUDA time per call of each kernel over n calls of step (torch profiler)."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    times = defaultdict(float)
    counts = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name.split("(")[0][:48]
            times[name] += ev.time_range.elapsed_us() / 1e3 / n
            counts[name] += 1
    return times, {k: v // n for k, v in counts.items()}


def breakdown(name, step, dtype):
    B, T, H, K = SHAPES[name]
    cfg = launcher.select_config(K, dtype, T, B * H,
                                 torch.cuda.get_device_properties(0).multi_processor_count)
    n_seg = math.ceil(math.ceil(T / 16) / cfg.chunks_per_segment)
    times, counts = kernel_times(step)
    need = kernel_bytes(B, T, H, K, n_seg, dtype)
    print(f"  per-kernel (shape {name}, fwd+bwd, {n_seg} segment(s), {cfg}):")
    for kname, ms in sorted(times.items(), key=lambda kv: -kv[1]):
        gb = need.get(kname)
        bw = f"{gb / 1e9:6.2f} GB min, {gb / ms / 1e6:7.0f} GB/s" if gb and counts[kname] == 1 else ""
        print(f"    {kname:48s} {ms:8.3f} ms  x{counts[kname]}  {bw}")


def run_table(quick, label, dtype):
    rows = {}
    for name in SHAPES:
        t0 = time.time()
        fwd, both, peak, step = time_shape(name, quick, dtype)
        rows[name] = (fwd, both, peak, step)
        print(f"  [{label}] {name}: fwd {fwd:7.3f} ms  fwd+bwd {both:7.3f} ms  peak {peak:5.2f} GiB"
              f"  ({time.time() - t0:.0f}s)", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time alternative configs")
    parser.add_argument("--quick", action="store_true", help="shorter do_bench windows")
    parser.add_argument("--no-errors", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated sweep variants to run")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=B,T,H,K",
                        help="time this shape instead of S and L (repeatable), e.g. "
                             "K128=8,4096,32,128")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the timed inputs (the errors are measured for bf16 and "
                             "fp32 either way)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)  # of the timed inputs; the protocol's is bf16
    if args.shape:
        SHAPES.clear()
        for spec in args.shape:
            name, dims = spec.split("=")
            SHAPES[name] = tuple(int(d) for d in dims.split(","))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, timed inputs {args.dtype}")

    if not args.no_errors:
        for checked in (torch.bfloat16, torch.float32):
            errs, digest = errors_at_error_shape(checked)
            worst = max(errs, key=errs.get)
            print(f"error {str(checked):15s} worst {worst}={errs[worst]:.2e}  "
                  + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + f"  outputs sha256 {digest}", flush=True)

        errs = no_grad_errors()
        print(f"error under no_grad (bf16): y {errs['y']:.2e} state {errs['state']:.2e}")

    rows = run_table(args.quick, "default", dtype)
    print("\n| shape | fwd ms | fwd+bwd ms | peak GiB |\n|---|---|---|---|")
    for name, (fwd, both, peak, _) in rows.items():
        print(f"| {name} | {fwd:.3f} | {both:.3f} | {peak:.2f} |")
    for name, (_, _, _, step) in rows.items():
        breakdown(name, step, dtype)
        times, counts = kernel_times(step.infer)
        print(f"  per-kernel (shape {name}, fwd under no_grad): " + "  ".join(
            f"{k}={v:.3f}x{counts[k]}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])))

    if args.sweep:
        real = launcher.select_config
        variants = {
            "fwd-bv64-w4": dict(bv_fwd=64, warps_fwd=4),
            "prep-w2": dict(warps_prep=2),
            "prep-g2-w2": dict(prep_chunks=2, warps_prep=2),
            "fwd-bv16-w1": dict(bv_fwd=16, warps_fwd=1),
            "fwd-bv16-w2": dict(bv_fwd=16, warps_fwd=2),
            "fwd-bv16-s1": dict(bv_fwd=16, warps_fwd=2, stages_fwd=1),
            "fwd-s1": dict(stages_fwd=1),
            "state-bv32-w2": dict(bv_state=32, warps_state=2),
            "state-bv32-w4": dict(bv_state=32, warps_state=4),
            "bwd-w8": dict(warps_bwd=8),
            "bwd-kb16": dict(kb_bwd=16),
            "bwd-kb32": dict(kb_bwd=32),
            "bwd-kb64": dict(kb_bwd=64),
            "bwd-w2": dict(warps_bwd=2),
            "bwd-kb16-w8": dict(kb_bwd=16, warps_bwd=8),
            **{f"bwd-kb{kb}-r{n}": dict(kb_bwd=kb, maxnreg_bwd=n)
               for kb in (32, 64) for n in (168, 200)},
            **{f"bwd-kb64-r{n}-p{p}": dict(kb_bwd=64, maxnreg_bwd=n, prefetch_bwd=p)
               for n in (128, 168) for p in (0, 198, 264, 396)},
            "bwd-kb32-w8": dict(kb_bwd=32, warps_bwd=8),
            "bwd-uncapped": dict(maxnreg_bwd=None),
            "bwd-no-l1": dict(l1_prefetch_bwd=False),
            "state-l1": dict(l1_prefetch_state=True),
            **{f"fwd-prefetch-l1-{n}": dict(prefetch_fwd=n, prefetch_fwd_l1=True)
               for n in (1, 2, 4)},
            "bwd-uncapped-p132": dict(maxnreg_bwd=None, prefetch_bwd=132),
            **{f"bwd-w8-r{n}{f'-p{p}' if p else ''}": dict(warps_bwd=8, maxnreg_bwd=n,
                                                           prefetch_bwd=p)
               for n in (112, 128) for p in (0, 132)},
            "bwd-w8-kb32-r128": dict(warps_bwd=8, kb_bwd=32, maxnreg_bwd=128),
            "fwd-bv32-w2": dict(bv_fwd=32, warps_fwd=2),
            "fwd-stages3": dict(stages_fwd=3),
            "state-stages2": dict(stages_state=2),
            "state-stages3": dict(stages_state=3),
            "state-stages1": dict(stages_state=1),
            # the L2 prefetch distances: the gradient kernel's in programs (1 per SM at K <= 64,
            # none at K = 128; configs.BWD_PROGRAMS_PER_SM), the forward scan's with checkpoints
            # in chunks (configs.FWD_PREFETCH_CHUNKS)
            **{f"bwd-prefetch-{n}": dict(prefetch_bwd=n)
               for n in (0, 33, 66, 99, 132, 165, 198, 264, 330, 396)},
            **{f"fwd-prefetch-{n}": dict(prefetch_fwd=n) for n in (0, 2, 8)},
        }
        if args.only:
            variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
        for label, change in variants.items():
            launcher.select_config = lambda *a, _c=change: real(*a).with_(**_c)
            for name in SHAPES:
                try:
                    B, T, H, K = SHAPES[name]
                    _, _, _, step = rows[name]
                    times, counts = kernel_times(step)
                    listing = "  ".join(f"{k.replace('_kernel', '')}={v:.3f}x{counts[k]}"
                                        for k, v in sorted(times.items(), key=lambda kv: -kv[1])
                                        if v > 0.02)
                    if name == "S":
                        errs = no_grad_errors(dtype)
                        print(f"  [{label}] no_grad error: y {errs['y']:.2e} state "
                              f"{errs['state']:.2e}", flush=True)
                    infer_times, _ = kernel_times(rows[name][3].infer)
                    print(f"  [{label}] {name}: fwd {sum(infer_times.values()):7.3f} ms, fwd+bwd "
                          f"{sum(times.values()):7.3f} ms | {listing}", flush=True)
                except Exception as error:  # a config that does not compile is a result too
                    print(f"  [{label}] {name} failed: {type(error).__name__}: {str(error)[:300]}")
        launcher.select_config = real


if __name__ == "__main__":
    main()
