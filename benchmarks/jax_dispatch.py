"""Where the JAX launcher's time goes beyond the kernels (needs a CUDA GPU, jax-triton).

Times, for shape S (bf16, fwd with the final state) through ``rwkv_ops.jax.triton_launcher``:
the protocol's per-call median (jit, block_until_ready after each call), the same calls issued
back to back (one wait per 10 calls), and a trivial jitted function's per-call time (the fixed cost
of a dispatch and a wait). Run it twice to compare XLA settings, for example:

    python3 benchmarks/jax_dispatch.py
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/jax_dispatch.py
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from rwkv_ops.jax import triton_launcher as launcher

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_bench import protocol_numpy  # noqa: E402


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


def main():
    xs, s0 = protocol_numpy(8, 4096, 64, 64, seed=0)
    args = [jnp.asarray(x).astype(jnp.bfloat16) for x in xs] + [jnp.asarray(s0)]
    f = jax.jit(lambda *a: launcher.generalized_delta_rule(*a[:6], a[6]))
    tiny = jax.jit(lambda x: x + 1)
    x1 = jnp.ones((8,))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"S fwd, per call (protocol): {per_call(lambda: jax.block_until_ready(f(*args))):.3f} ms")
    print(f"S fwd, back to back:        {back_to_back(f, args):.3f} ms")
    print(f"trivial jit, per call:      {per_call(lambda: jax.block_until_ready(tiny(x1))):.3f} ms")


if __name__ == "__main__":
    main()
