"""``rwkv-ops bench``: the benchmark protocol for every implementation that can run here.

Each implementation (backend x kernel type, plus flash-linear-attention's ``chunk_rwkv7`` when it
is importable) runs in its own process with a timeout; a failure becomes a row saying why. Output:
a markdown table on stdout, a JSON file, and (with matplotlib) a PNG of time against sequence length
at a fixed number of tokens.

Protocol (docs/benchmarks.md): inputs in the RWKV-7 model's range, fp32 initial state; fwd without
gradients, fwd+bwd = forward then the gradients of (y, final_state) with random cotangents w.r.t.
all six inputs and the initial state; GPU torch: median of ``triton.testing.do_bench(warmup=500,
rep=1500)``; JAX: jit, median of 10 calls after warm-up; CPU: median of 5 calls after warm-up.
Error: B=2, T=256, H=4, K=64, ||x - ref|| / ||ref|| against a float64 reference on the rounded
inputs, worst over y, final state and the seven gradients.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

SHAPES = {
    "S": (8, 4096, 64, 64),      # training
    "L": (1, 65536, 32, 64),     # long context
    "cpu": (2, 1024, 8, 64),     # the CPU benchmark of the native implementations
    "quick": (1, 512, 4, 64),
}
ERROR_SHAPE = (2, 256, 4, 64)
# --sweep: T at a fixed number of tokens B x T (GPU, CPU).
SWEEP = {True: (8 * 4096, (1024, 4096, 16384, 65536)), False: (4096, (256, 1024, 4096))}


def _probe(backend: str) -> list:
    """Kernel types that can run for ``backend``, asked in a child process (TF and Triton)."""
    code = f"import json, rwkv_ops.{backend} as m; print(json.dumps(m.available_kernel_types()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else []
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        return []


def discover(include_fla: bool = True) -> list:
    impls = []
    for backend in ("torch", "jax", "tensorflow", "numpy"):
        if importlib.util.find_spec(f"rwkv_ops.{backend}") is not None:
            impls += [f"{backend}:{kind}" for kind in _probe(backend)]
    if include_fla and importlib.util.find_spec("fla") is not None:
        impls.append("fla")
    return impls


def run_impl(impl, shapes, dtype, error_shape, grads, timeout):
    cfg = json.dumps({"impl": impl, "shapes": shapes, "dtype": dtype, "error_shape": error_shape, "grads": grads})
    rows = []
    start = time.time()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "rwkv_ops._bench_worker", cfg], stdout=subprocess.PIPE,
                                stderr=None, text=True)
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        rows.append({"impl": impl, "kind": "failure", "reason": f"timed out after {timeout} s"})
    for line in (out or "").splitlines():
        if line.startswith("RWKV_OPS_BENCH "):
            rows.append(json.loads(line[len("RWKV_OPS_BENCH "):]))
    if not rows:
        rows.append({"impl": impl, "kind": "failure", "reason": f"worker exited with {proc.returncode}"})
    print(f"  {impl}: done in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def _ms(value):
    return "-" if value is None else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def table(rows, shapes) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    names = {s: n for n, s in ((n, tuple(s)) for n, s in SHAPES.items())}
    head = ["implementation"]
    for shape in shapes:
        label = names.get(tuple(shape), "x".join(map(str, shape)))
        head += [f"{label} fwd ms", f"{label} fwd+bwd ms"]
    head += ["worst error", "peak GiB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        info = next((r for r in mine if r["kind"] == "info"), {})
        cells = [info.get("description", impl)]
        peak = None
        for shape in shapes:
            t = next((r for r in mine if r["kind"] == "time" and r["shape"] == list(shape)), {})
            cells += [_ms(t.get("fwd_ms")), _ms(t.get("fwd_bwd_ms"))]
            if t.get("peak_gib") is not None and peak is None:
                peak = t["peak_gib"]
        err = next((r for r in mine if r["kind"] == "error"), None)
        cells.append("-" if err is None else f"{err['worst']:.1e} ({max(err['errors'], key=err['errors'].get)})")
        cells.append("-" if peak is None else f"{peak:.2f}")
        fail = next((r for r in mine if r["kind"] == "failure"), None)
        cells.append("" if fail is None else f"failed: {fail['reason']}"[:160])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path, tokens) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot; pip install 'rwkv-ops[plot]')", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax in zip(("fwd_ms", "fwd_bwd_ms"), axes):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["shape"][1], r[key]) for r in rows
                         if r["impl"] == impl and r["kind"] == "time" and r.get(key) is not None and r.get("sweep"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"T (B x T = {tokens} tokens)")
        ax.set_ylabel("ms")
        ax.set_title("forward" if key == "fwd_ms" else "forward + backward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rwkv-ops bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, no sweep (CPU: well under 2 min)")
    parser.add_argument("--shapes", default=None,
                        help="comma list of S, L, cpu, quick or BxTxHxK (default: S,L on a GPU, cpu otherwise)")
    parser.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--impl", default=None, help="comma list like torch:triton,jax:native,fla (default: all)")
    parser.add_argument("--no-fla", action="store_true", help="leave flash-linear-attention out")
    parser.add_argument("--sweep", action="store_true", help="add T from 1024 to 65536 at a fixed token count (plot)")
    parser.add_argument("--no-error", action="store_true", help="skip the error measurement")
    parser.add_argument("--timeout", type=int, default=900,
                        help="seconds per implementation (flash-linear-attention autotunes for minutes)")
    parser.add_argument("--json", default="rwkv-ops-bench.json", help="where to write the results")
    parser.add_argument("--plot", default="rwkv-ops-bench.png", help="where to write the plot (with --sweep)")
    args = parser.parse_args(argv)

    gpu = _has_gpu()
    if args.shapes:
        names = args.shapes.split(",")
    else:
        names = ["quick"] if args.quick else (["S", "L"] if gpu else ["cpu"])
    shapes = [list(SHAPES[n]) if n in SHAPES else [int(v) for v in n.split("x")] for n in names]
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.impl:
        impls = args.impl.split(",")
    else:
        impls = discover(include_fla=not args.no_fla)
        if gpu:  # the NumPy path runs on the CPU: minutes per call at the GPU shapes
            impls = [i for i in impls if not i.startswith("numpy:")]
    sweep = []
    tokens, lengths = SWEEP[gpu]
    if args.sweep:
        sweep = [[max(1, tokens // t), t, shapes[0][2], shapes[0][3]] for t in lengths]
    print(f"rwkv-ops bench: {len(impls)} implementation(s): {', '.join(impls)}; shapes {shapes}; {dtype}",
          file=sys.stderr, flush=True)
    header = (f"rwkv-ops bench, {time.strftime('%Y-%m-%d')}, {dtype}, shapes "
              + ", ".join("x".join(map(str, s)) for s in shapes) + f" (B x T x H x K); error shape "
              + "x".join(map(str, ERROR_SHAPE)))
    rows = []
    for impl in impls:
        mine = run_impl(impl, shapes, dtype, None if args.no_error else list(ERROR_SHAPE), True, args.timeout)
        if sweep and not any(r["kind"] == "failure" for r in mine):
            extra = run_impl(impl, sweep, dtype, None, True, args.timeout)
            for r in extra:
                r["sweep"] = True
            mine += [r for r in extra if r["kind"] != "info"]
        rows += mine
        # each implementation's row as soon as it is done, and the results so far on disk: a run
        # stopped from outside keeps what it measured
        print("  " + table(mine, shapes).splitlines()[-1], file=sys.stderr, flush=True)
        _write_json(args.json, header, rows)
    print(header)
    print()
    print(table(rows, shapes))
    if rows:  # written after each implementation above
        print(f"\nresults: {os.path.abspath(args.json)}", file=sys.stderr)
    if sweep and plot(rows, args.plot, tokens):
        print(f"plot: {os.path.abspath(args.plot)}", file=sys.stderr)
    return 1 if any(r["kind"] == "failure" for r in rows) else 0


def _write_json(path, header, rows):
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)


def _has_gpu() -> bool:
    """A CUDA GPU visible to torch or jax, asked in a child process (keeps this one framework-free)."""
    code = ("import importlib.util as u\n"
            "ok = False\n"
            "if u.find_spec('torch'):\n import torch; ok = torch.cuda.is_available()\n"
            "if not ok and u.find_spec('jax'):\n import jax; ok = jax.default_backend() == 'gpu'\n"
            "print(ok)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return proc.stdout.strip().endswith("True")
    except subprocess.TimeoutExpired:
        return False
