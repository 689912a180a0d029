"""Serving benchmarks on a CUDA GPU: the decode step, packed (varlen) batches, the inference forward.

Protocol of ANCHORS.md (bf16 inputs in the model's decay range, fp32 state, median of
``triton.testing.do_bench``; JAX: jit-compiled, median of timed calls after warm-up):

* decode, shape D (B=32, H=64, K=64, one step, fp32 state): the Triton decode kernel from PyTorch
  eager, replayed from a CUDA graph (one step per graph, and 16 steps per graph), a launch
  configuration sweep, the native torch step, flash-linear-attention's ``fused_recurrent_rwkv7``
  when importable; JAX jit (one call per step, and 16 steps in one jitted ``lax.scan``).
* varlen: 8 sequences x 512 packed ([1, 4096, H, K] + cu_seqlens) vs the dense [8, 512] batch,
  forward and forward+backward, and 8 ragged sequences of the same total length.
* inference forward, shape S (B=8, T=4096, H=64, K=64, bf16): ``generalized_delta_rule_inference``
  vs the training op's forward when it must keep checkpoints.

Prints one table per part; the floor of decode D is one read and one write of the fp32 state
(33.6 MB, 15.7 us at 4.27 TB/s on an H200).

    python benchmarks/decode_bench.py [--part torch|jax|all] [--quick] [--sections varlen,...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

NAMES = ("r", "w", "k", "v", "a", "b")
SHAPE_D = (32, 64, 64)          # B, H, K
SHAPE_S = (8, 4096, 64, 64)     # B, T, H, K
SECTIONS = ("decode", "varlen", "inference")  # of the torch part


def protocol_numpy(B, T, H, K, seed=0):
    """Inputs of the protocol (``rwkv_ops.numpy.testing.make_inputs``) as float32 NumPy arrays."""
    from rwkv_ops.numpy.testing import make_inputs

    x = make_inputs(B, T, H, K, seed=seed)
    return [x[n].astype(np.float32) for n in NAMES], x["initial_state"].astype(np.float32)


def row(name, value, unit="us", extra=""):
    print(f"| {name:<58} | {value:>10.2f} {unit} | {extra}", flush=True)


# ---------------------------------------------------------------------------------------------
# PyTorch


def torch_part(quick, sections=SECTIONS):
    import torch
    import triton

    from rwkv_ops.torch import decode, inference, triton_launcher as launcher, varlen
    from rwkv_ops.torch.api import generalized_delta_rule

    warm, rep = (100, 400) if quick else (500, 1500)

    def bench_ms(fn, w=warm, r=rep):
        return triton.testing.do_bench(fn, warmup=w, rep=r, return_mode="median")

    def capture(fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}")

    if "decode" in sections:
        # ---- decode D
        B, H, K = SHAPE_D
        xs_np, s_np = protocol_numpy(B, 1, H, K)
        xs = [torch.tensor(x, device=dev).to(torch.bfloat16) for x in xs_np]
        state = torch.tensor(s_np, device=dev)
        state_bytes = 2 * state.numel() * 4 + sum(x.numel() * 2 for x in xs) + xs[0].numel() * 2
        floor_us = state_bytes / 4.27e12 * 1e6
        print(f"\n## decode, shape D (B={B}, H={H}, K={K}, bf16 inputs, fp32 state); bytes "
              f"{state_bytes / 1e6:.1f} MB, H200 floor {floor_us:.1f} us")
        print("| what | time | note |\n|---|---|---|")

        # accuracy of one step at D against a float64 step
        with torch.no_grad():
            o_k, s_k = decode.rwkv7_op_rnn(*xs, state)
            o_r, s_r = decode.decode_native(*(x.double() for x in xs), state.double())
        err_o = ((o_k.double() - o_r).norm() / o_r.norm()).item()
        err_s = ((s_k.double() - s_r).norm() / s_r.norm()).item()
        print(f"| error vs float64 step (o bf16, state fp32) | {err_o:.1e} / {err_s:.1e} | |")

        s_work = state.clone()
        with torch.no_grad():
            t_eager = bench_ms(lambda: decode.rwkv7_op_rnn(*xs, s_work, inplace=True)) * 1e3
        row("triton decode, eager (inplace)", t_eager, extra="includes Python + launch")

        def one_step():
            return decode.rwkv7_op_rnn(*xs, s_work, inplace=True)

        g1 = capture(one_step)
        t_g1 = bench_ms(g1.replay) * 1e3
        row("triton decode, CUDA graph of 1 step (replay)", t_g1,
            extra=f"{state_bytes / (t_g1 * 1e-6) / 1e12:.2f} TB/s")

        def sixteen():
            for _ in range(16):
                decode.rwkv7_op_rnn(*xs, s_work, inplace=True)

        g16 = capture(sixteen)
        t_g16 = bench_ms(g16.replay) * 1e3 / 16
        row("triton decode, CUDA graph of 16 steps, per step", t_g16,
            extra=f"{state_bytes / (t_g16 * 1e-6) / 1e12:.2f} TB/s")

        def not_inplace():
            return decode.rwkv7_op_rnn(*xs, state)

        g_np = capture(not_inplace)
        row("triton decode, CUDA graph of 1 step, new state buffer", bench_ms(g_np.replay) * 1e3)

        with torch.no_grad():
            s_nat = state.clone()
            t_native = bench_ms(lambda: decode.decode_native(*xs, s_nat, inplace=True),
                                w=50, r=200) * 1e3
        row("native torch step, eager", t_native)
        g_nat = capture(lambda: decode.decode_native(*xs, s_nat, inplace=True))
        row("native torch step, CUDA graph", bench_ms(g_nat.replay, w=50, r=200) * 1e3)

        try:
            from fla.ops.rwkv7 import fused_recurrent_rwkv7
            log_d = [xs[0], -torch.exp(xs[1].float()).to(torch.bfloat16), *xs[2:]]
            s_fla = state.transpose(-1, -2).contiguous()

            def fla_step():
                return fused_recurrent_rwkv7(*log_d, scale=1.0, initial_state=s_fla,
                                             output_final_state=True)

            for _ in range(3):
                fla_step()           # autotune outside the graph
            row("flash-linear-attention fused_recurrent_rwkv7, eager", bench_ms(fla_step) * 1e3)
            g_fla = capture(fla_step)
            row("flash-linear-attention fused_recurrent_rwkv7, CUDA graph",
                bench_ms(g_fla.replay) * 1e3, extra="K x V state, no transposes timed")
        except Exception as error:  # noqa: BLE001 - an optional comparison
            print(f"| flash-linear-attention | n/a | {type(error).__name__}: {error} |")

        # ---- launch configuration sweep (16-step graphs, per step)
        kernels = decode._kernel()
        default = kernels.decode_config(K)
        print(f"\n### decode kernel configurations at D (16-step CUDA graph, us per step; default "
              f"BV={default[0]}, warps={default[1]})")
        flat = [x.contiguous() for x in xs]
        o_buf = torch.empty_like(xs[0])
        results = []
        for bv in (4, 8, 16, 32, 64):
            cells = []
            for warps in (1, 2, 4, 8):
                grid = (B * H * (K // bv),)

                def launch(bv=bv, warps=warps, grid=grid):
                    for _ in range(16):
                        kernels.decode_kernel[grid](*flat, s_work, o_buf, s_work, K=K, BV=bv,
                                                    num_warps=warps)

                try:
                    t = bench_ms(capture(launch).replay, w=50, r=300) * 1e3 / 16
                except Exception as error:  # noqa: BLE001 - a config that does not compile
                    print(f"BV={bv} warps={warps}: {type(error).__name__}: {error}")
                    t = float("nan")
                cells.append(t)
                results.append((t, bv, warps))
            print(f"BV={bv:>2}: "
                  + "  ".join(f"w{w}={t:6.2f}" for w, t in zip((1, 2, 4, 8), cells)))
        best = min(r for r in results if r[0] == r[0])
        print(f"best: BV={best[1]}, warps={best[2]}: {best[0]:.2f} us per step")
        for Kx in (32, 128):
            Hx = H * 64 // Kx
            xs_x = [torch.tensor(x.reshape(B, 1, Hx, Kx), device=dev).to(torch.bfloat16)
                    for x in protocol_numpy(B, 1, Hx, Kx)[0]]
            s_x = torch.randn(B, Hx, Kx, Kx, device=dev) * 0.1
            flat_x = [x.contiguous() for x in xs_x]
            o_x = torch.empty_like(xs_x[0])
            bytes_x = 2 * s_x.numel() * 4
            cells = []
            for bv in sorted({min(Kx, n // Kx) for n in (1024, 2048, 4096)}):
                for warps in (2, 4, 8):
                    def kx_steps(bv=bv, warps=warps):
                        for _ in range(16):
                            kernels.decode_kernel[(B * Hx * (Kx // bv),)](
                                *flat_x, s_x, o_x, s_x, K=Kx, BV=bv, num_warps=warps)

                    t = bench_ms(capture(kx_steps).replay, w=50, r=300) * 1e3 / 16
                    cells.append(f"BV={bv}/w{warps}={t:.2f}")
            print(f"K={Kx} (H={Hx}, state {bytes_x / 2e6:.1f} MB, "
                  f"floor {bytes_x / 4.27e12 * 1e6:.1f} us), 16-step graph, us per step: "
                  + "  ".join(cells))

    if "varlen" in sections:
        # ---- varlen vs dense
        Bv, Tv, Hv, Kv = 8, 512, 64, 64
        print(f"\n## packed 8 x 512 (varlen) vs dense [8, 512], H={Hv}, K={Kv}, bf16 (ms)")
        print("| what | time | note |\n|---|---|---|")
        xv_np, sv_np = protocol_numpy(Bv, Tv, Hv, Kv, seed=1)
        dense = [torch.tensor(x, device=dev).to(torch.bfloat16) for x in xv_np]
        s0 = torch.tensor(sv_np, device=dev)
        packed = [x.reshape(1, Bv * Tv, Hv, Kv) for x in dense]
        cu = torch.arange(0, Bv * Tv + 1, Tv, device=dev, dtype=torch.int32)
        cu_host = cu.tolist()
        with torch.no_grad():
            o_d, s_d = generalized_delta_rule(*dense, s0)
            o_v, s_v = varlen.generalized_delta_rule_varlen(*packed, cu, s0)
        diff = ((o_v.float().reshape(o_d.shape) - o_d.float()).norm() / o_d.float().norm()).item()
        print(f"| varlen vs dense outputs, relative difference | {diff:.1e} | |")
        with torch.no_grad():
            row("dense forward", bench_ms(lambda: generalized_delta_rule(*dense, s0)), "ms")
            row("varlen forward (cu_seqlens on GPU: one host read)",
                bench_ms(lambda: varlen.generalized_delta_rule_varlen(*packed, cu, s0)), "ms")
            row("varlen forward (cu_seqlens as a host list)",
                bench_ms(lambda: varlen.generalized_delta_rule_varlen(*packed, cu_host, s0)), "ms")
            row("inference(cu_seqlens=...) forward",
                bench_ms(lambda: inference.generalized_delta_rule_inference(
                    *packed, s0, cu_seqlens=cu_host)), "ms")
        leaves_d = [x.detach().requires_grad_() for x in dense] + [s0.detach().requires_grad_()]
        leaves_v = [x.detach().requires_grad_() for x in packed] + [s0.detach().requires_grad_()]
        dy = torch.randn_like(dense[0])
        ds = torch.randn_like(s0)

        def fb_dense():
            o, s = generalized_delta_rule(*leaves_d[:6], leaves_d[6])
            return torch.autograd.grad((o, s), leaves_d, (dy, ds))

        def fb_varlen():
            o, s = varlen.generalized_delta_rule_varlen(*leaves_v[:6], cu_host, leaves_v[6])
            return torch.autograd.grad((o, s), leaves_v, (dy.reshape(o.shape), ds))

        row("dense forward+backward", bench_ms(fb_dense, w=50, r=300), "ms")
        row("varlen forward+backward", bench_ms(fb_varlen, w=50, r=300), "ms")

        # The same work replayed from CUDA graphs: the GPU's time alone, without the host's work per
        # call (validation, launch plan, launches), which the rows above include whenever it takes
        # longer than the GPU's. The packed call goes through the launcher with cu_seqlens already
        # on the device (the wrapper reads the boundaries on the host, which a graph cannot hold).
        def fb_packed():
            o, s = launcher.generalized_delta_rule_packed(*leaves_v[:6], cu, Tv, leaves_v[6])
            return torch.autograd.grad((o, s), leaves_v, (dy.reshape(o.shape), ds))

        def replay_ms(fn, grad):
            with torch.set_grad_enabled(grad):
                graph = capture(fn)
            return bench_ms(graph.replay)

        pairs = (("forward", False, lambda: generalized_delta_rule(*dense, s0),
                  lambda: launcher.generalized_delta_rule_packed(*packed, cu, Tv, s0)),
                 ("forward+backward", True, fb_dense, fb_packed))
        for what, grad, fn_dense, fn_packed in pairs:
            t_d, t_p = replay_ms(fn_dense, grad), replay_ms(fn_packed, grad)
            row(f"dense {what}, CUDA graph (GPU time)", t_d, "ms")
            row(f"varlen {what}, CUDA graph (GPU time)", t_p, "ms", extra=f"{t_p / t_d:.2f}x dense")
        rng = np.random.default_rng(2)
        cuts = np.sort(rng.choice(np.arange(1, Bv * Tv), size=Bv - 1, replace=False))
        ragged = [0, *cuts.tolist(), Bv * Tv]
        lengths = np.diff(ragged)
        with torch.no_grad():
            t_r = bench_ms(lambda: varlen.generalized_delta_rule_varlen(*packed, ragged, s0))
        row("varlen forward, 8 ragged sequences, same total", t_r, "ms",
            extra=f"lengths {lengths.min()}..{lengths.max()} (padded to {lengths.max()})")

    if "inference" in sections:
        # ---- inference forward at S
        Bs, Ts, Hs, Ks = SHAPE_S
        print(f"\n## inference forward, shape S (B={Bs}, T={Ts}, H={Hs}, K={Ks}, bf16) (ms); "
              "H200 floor 0.44 ms")
        print("| what | time | note |\n|---|---|---|")
        xs_np, s_np = protocol_numpy(Bs, Ts, Hs, Ks, seed=3)
        big = [torch.tensor(x, device=dev).to(torch.bfloat16) for x in xs_np]
        del xs_np
        s0 = torch.tensor(s_np, device=dev)
        t_inf = bench_ms(lambda: inference.generalized_delta_rule_inference(*big, s0))
        row("generalized_delta_rule_inference", t_inf, "ms")
        with torch.no_grad():
            row("generalized_delta_rule under no_grad",
                bench_ms(lambda: generalized_delta_rule(*big, s0)), "ms")
        tracked = [x.detach().requires_grad_() for x in big]

        def training_forward():
            return generalized_delta_rule(*tracked, s0)

        row("training forward (keeps the state checkpoints)",
            bench_ms(training_forward, w=50, r=300), "ms")
        for name, fn in (("inference",
                          lambda: inference.generalized_delta_rule_inference(*big, s0)),
                         ("no_grad training op", lambda: generalized_delta_rule(*big, s0))):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.no_grad():
                fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            print(f"| {name}: peak memory above the inputs | {peak:.3f} GiB | outputs: 0.276 GiB |")


# ---------------------------------------------------------------------------------------------
# JAX


def jax_part(quick):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp

    from rwkv_ops.jax import decode

    calls = 10 if quick else 50
    print(f"\n## JAX decode, shape D (jax {jax.__version__}, {jax.devices()[0].device_kind})")
    print("| what | time | note |\n|---|---|---|")
    B, H, K = SHAPE_D
    xs_np, s_np = protocol_numpy(B, 1, H, K)
    xs = [jnp.asarray(x, jnp.bfloat16) for x in xs_np]

    def per_call(fn, n_steps=1):
        state = jnp.asarray(s_np)
        for _ in range(5):
            state = fn(*xs, state)[1]
        state.block_until_ready()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            state = fn(*xs, state)[1]
            state.block_until_ready()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e6 / n_steps

    reason = decode.triton_unavailable_reason(K, "float32")
    auto = "triton (jax-triton)" if reason is None else f"automatic = native ({reason})"
    for name, op in ((auto, decode.rwkv7_op_rnn), ("native", decode.decode_native)):
        step = jax.jit(op, donate_argnums=6)
        row(f"{name}, jit, one call per step (donated state)", per_call(step),
            extra="includes dispatch")

        def scan16(*args, op=op):
            *ins, state = args

            def body(s, _):
                o, s = op(*ins, s)
                return s, o

            state, outs = jax.lax.scan(body, state, None, length=16)
            return outs, state

        row(f"{name}, jit, 16 steps in one lax.scan, per step",
            per_call(jax.jit(scan16, donate_argnums=6), 16))

    if reason is None:
        for alias in (True, False):
            def scan_kernel(*args, alias=alias):
                *ins, state = args

                def body(s, _):
                    o, s = decode._kernel_step(*ins, s, alias=alias)
                    return s, o

                state, outs = jax.lax.scan(body, state, None, length=16)
                return outs, state

            t = per_call(jax.jit(scan_kernel, donate_argnums=6), 16)
            row(f"kernel, 16-step lax.scan, input_output_aliases={'on' if alias else 'off'}", t)
        s0 = jnp.asarray(s_np)
        _, s1 = jax.jit(lambda *a: decode._kernel_step(*a, alias=True))(*xs, s0)
        _, s2 = jax.jit(lambda *a: decode._kernel_step(*a, alias=False))(*xs, s0)
        _, s3 = decode.decode_native(*(x.astype(jnp.float32) for x in xs), s0)
        print(f"| alias on/off max difference; vs native | {float(jnp.max(jnp.abs(s1 - s2))):.1e} / "
              f"{float(jnp.linalg.norm(s1 - s3) / jnp.linalg.norm(s3)):.1e} | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("torch", "jax", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma list of the torch part's sections to run")
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.part == "torch":
        torch_part(args.quick, sections)
    elif args.part == "jax":
        jax_part(args.quick)
    else:
        # one framework per process: both would otherwise compete for GPU memory
        for part in ("torch", "jax"):
            cmd = [sys.executable, __file__, "--part", part, "--sections", args.sections]
            cmd += ["--quick"] if args.quick else []
            code = subprocess.call(cmd)
            if code:
                print(f"part {part} exited with {code}", flush=True)


if __name__ == "__main__":
    main()
