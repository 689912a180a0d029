"""Where the JAX launcher's time goes beyond the kernels (needs a CUDA GPU, jax-triton).

Times, for shape S (bf16, fwd with the final state) through ``rwkv_ops.jax.triton_launcher``:
the per-call median (jit; waiting with block_until_ready, and polling is_ready as the bench
does: rwkv_ops._frameworks.wait_ready), the same calls issued
back to back (one wait per 10 calls), and a trivial jitted function's per-call time (the fixed cost
of a dispatch and a wait). Run it twice to compare XLA settings, for example:

    python3 benchmarks/jax_dispatch.py
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/jax_dispatch.py

With ``--grad`` it times fwd+bwd too (the protocol's random cotangents). With ``--trace`` it also
records a few calls with the JAX profiler and prints, for the last one,
every host and device event (thunks, custom calls, kernel launches, kernels) with its start
relative to the call's start and its duration: the place where the host time goes.

It prints the size of every launch's serialized call (jax-triton compresses the kernel's PTX
and TTIR into the custom call's backend config, and the runtime finds the kernel by that string
at every launch). ``--strip-ttir`` (an experiment, run it against a plain run in the same call)
builds the calls without their TTIR, to see whether a smaller call launches faster; nothing in
the library does this.
"""

import glob
import os
import statistics
import tempfile
import sys
import time

import jax
import jax.numpy as jnp

from rwkv_ops._frameworks import JaxAdapter, wait_ready
from rwkv_ops.jax import triton_launcher as launcher
from rwkv_ops.numpy.testing import make_inputs


def per_call(fn, n=10):
    fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def back_to_back(f, args, n=10, rounds=5):
    jax.block_until_ready(f(*args))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [f(*args) for _ in range(n)]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples) * 1e3


def trace_last_call(f, args, calls=4, top=80):
    """Profile `calls` calls of f; print the events of the last one, in start order."""
    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for i in range(calls):
            with jax.profiler.TraceAnnotation(f"rwkv_call_{i}"):
                jax.block_until_ready(f(*args))
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            print("trace: no xplane file written")
            return
        data = jax.profiler.ProfileData.from_file(files[0])
    mark = f"rwkv_call_{calls - 1}"
    window = None
    events = []
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name == mark:
                    window = (ev.start_ns, ev.end_ns)
                events.append((plane.name, line.name, ev.name, ev.start_ns, ev.duration_ns))
    if window is None:
        print("trace: call annotation not found")
        return
    t0, t1 = window
    print(f"trace of one call: {(t1 - t0) / 1e3:.1f} us between annotation start and end")
    # Python-tracer events ("$file:line name") are left out: the call is one jitted function
    inside = sorted((e for e in events if t0 <= e[3] <= t1 and e[2] != mark
                     and not e[2].startswith("$")), key=lambda e: e[3])
    print(f"{'start us':>9} {'dur us':>9}  plane / line / event")
    for plane, line, name, start, dur in inside[:top]:
        print(f"{(start - t0) / 1e3:9.1f} {dur / 1e3:9.1f}  {plane[-28:]} / {line[-20:]} / {name[:90]}")
    if len(inside) > top:
        print(f"... {len(inside) - top} more events")


def instrument_jax_triton(strip_ttir):
    """Record the compressed size of every serialized kernel call jax-triton lowers (jax-triton
    0.3: ``triton_lib`` compresses it with its module's zlib); with strip_ttir, give every kernel
    an empty TTIR. Benchmark-only: the proxies replace two of triton_lib's module globals."""
    import types
    import zlib
    from jax_triton import triton_lib
    sizes = []

    def compress(data, *a):
        out = zlib.compress(data, *a)
        sizes.append((len(data), len(out)))
        return out

    triton_lib.zlib = types.SimpleNamespace(compress=compress)
    if strip_ttir:
        real = triton_lib.triton_kernel_call_lib

        class Calls(types.SimpleNamespace):
            def __getattr__(self, name):
                return getattr(real, name)

        def kernel(name, num_warps, num_ctas, shared, binary, ttir, *rest):
            return real.TritonKernel(name, num_warps, num_ctas, shared, binary, "", *rest)

        triton_lib.triton_kernel_call_lib = Calls(TritonKernel=kernel)
    return sizes


def main():
    sizes = instrument_jax_triton("--strip-ttir" in sys.argv[1:])
    adapter = JaxAdapter()
    x = make_inputs(8, 4096, 64, 64, seed=0)
    # the bench's own jitted calls (fwd; fwd+bwd with the protocol's random cotangents)
    f, args = adapter.jitted(launcher.generalized_delta_rule, x, "bfloat16", grads=False)
    tiny = jax.jit(lambda x: x + 1)
    x1 = jnp.ones((8,))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, strip TTIR: "
          f"{'--strip-ttir' in sys.argv[1:]}")
    jax.block_until_ready(f(*args))  # compiles: the launches are lowered (and sized) here
    print("serialized kernel calls (bytes, raw -> compressed): "
          + ", ".join(f"{raw} -> {packed}" for raw, packed in sizes))
    print(f"S fwd, per call, block_until_ready: {per_call(lambda: jax.block_until_ready(f(*args))):.3f} ms")
    print(f"S fwd, per call, polling is_ready:  {per_call(lambda: wait_ready(f(*args))):.3f} ms")
    print(f"S fwd, back to back:        {back_to_back(f, args):.3f} ms")
    print(f"trivial jit, per call:      {per_call(lambda: jax.block_until_ready(tiny(x1))):.3f} ms")
    print(f"trivial jit, polling:       {per_call(lambda: wait_ready(tiny(x1))):.3f} ms")
    if "--grad" in sys.argv[1:]:
        g, args = adapter.jitted(launcher.generalized_delta_rule, x, "bfloat16", grads=True)
        print(f"S fwd+bwd, per call, polling:  {per_call(lambda: wait_ready(g(*args))):.3f} ms")
        print(f"S fwd+bwd, back to back:       {back_to_back(g, args):.3f} ms")
        if "--trace" in sys.argv[1:]:
            trace_last_call(g, args)
    elif "--trace" in sys.argv[1:]:
        trace_last_call(f, args)


if __name__ == "__main__":
    main()
