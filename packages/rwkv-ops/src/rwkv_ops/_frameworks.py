"""One small adapter per framework: move NumPy inputs in, run an op with gradients, time it.

Used by ``python -m rwkv_ops`` (the self-check), ``rwkv-ops bench`` and the tests, so that the
framework-specific glue exists once. Each adapter imports its framework only when created.
"""

from __future__ import annotations

import abc
import statistics
import time
from typing import Callable, Dict, Optional

import numpy as np

NAMES = ("r", "w", "k", "v", "a", "b")


class Adapter(abc.ABC):
    """Framework glue. ``x`` is a dict of float64 NumPy inputs (see rwkv_ops.numpy.testing);
    ``dtype`` a dtype name ("float32", "bfloat16", ...)."""

    name = ""
    has_grad = True

    @abc.abstractmethod
    def versions(self) -> Dict[str, str]:
        """Versions of the framework and its GPU stack."""

    @abc.abstractmethod
    def devices(self) -> list:
        """Human-readable names of the devices the framework sees."""

    @abc.abstractmethod
    def run(self, op, x, dtype, grads=False, do=None, dstate=None):
        """(o, final_state, {name: gradient} or None), all float64 NumPy."""

    @abc.abstractmethod
    def timer(self, op, x, dtype, grads) -> Callable[[], None]:
        """A no-argument function running one call (fwd, or fwd+bwd) that waits for the device."""

    def peak_memory(self, op, x, dtype):
        """Peak device bytes of one fwd+bwd call, where the framework reports it (else None)."""
        return None

    def time(self, op, x, dtype, grads, repeats=5) -> float:
        """Median seconds of one call after a warm-up call."""
        fn = self.timer(op, x, dtype, grads)
        fn()  # warm-up: compilation, autotuning, allocation
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)


class NumpyAdapter(Adapter):
    name = "numpy"
    has_grad = False

    def __init__(self):
        import numpy

        self.np = numpy

    def versions(self):
        return {"numpy": np.__version__}

    def devices(self):
        return ["cpu"]

    def run(self, op, x, dtype, grads=False, do=None, dstate=None):
        args = [x[n].astype(dtype) for n in NAMES]
        s0 = None if x["initial_state"] is None else x["initial_state"].astype(np.float32)
        o, s = op(*args, s0, mask=x.get("mask"))
        return np.asarray(o, np.float64), np.asarray(s, np.float64), None

    def timer(self, op, x, dtype, grads):
        args = [x[n].astype(dtype) for n in NAMES]
        s0 = None if x["initial_state"] is None else x["initial_state"].astype(np.float32)
        return lambda: op(*args, s0)


class TorchAdapter(Adapter):
    name = "torch"

    def __init__(self, device: Optional[str] = None):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def versions(self):
        out = {"torch": self.torch.__version__}
        if self.torch.cuda.is_available():
            out["cuda"] = str(self.torch.version.cuda)
        try:
            import triton

            out["triton"] = triton.__version__
        except ImportError:
            pass
        return out

    def devices(self):
        t = self.torch
        devs = ["cpu"]
        if t.cuda.is_available():
            devs += [f"cuda:{i} {t.cuda.get_device_name(i)}" for i in range(t.cuda.device_count())]
        return devs

    def _inputs(self, x, dtype, grads):
        t = self.torch
        td = getattr(t, dtype)
        args = [t.tensor(x[n], device=self.device).to(td).requires_grad_(grads) for n in NAMES]
        s0 = None
        if x["initial_state"] is not None:
            s0 = t.tensor(x["initial_state"], dtype=t.float32, device=self.device).requires_grad_(grads)
        mask = None if x.get("mask") is None else t.tensor(x["mask"], device=self.device)
        return args, s0, mask

    def run(self, op, x, dtype, grads=False, do=None, dstate=None):
        t = self.torch
        args, s0, mask = self._inputs(x, dtype, grads)
        o, s = op(*args, s0, mask=mask)
        grad_out = None
        if grads:
            leaves = args + ([s0] if s0 is not None else [])
            outs = [o, s]
            cots = [t.tensor(do, device=self.device).to(o.dtype), t.tensor(dstate, device=self.device).to(s.dtype)]
            g = t.autograd.grad(outs, leaves, cots)
            grad_out = {n: gi.double().cpu().numpy() for n, gi in zip(list(NAMES) + ["initial_state"], g)}
        return o.detach().double().cpu().numpy(), s.detach().double().cpu().numpy(), grad_out

    def timer(self, op, x, dtype, grads, wait=True):
        # wait=False for do_bench, which times the GPU work between CUDA events (a host wait
        # inside the timed function would add the host's launch time to every sample)
        t = self.torch
        args, s0, _ = self._inputs(x, dtype, grads)
        sync = t.cuda.synchronize if wait and self.device.startswith("cuda") else (lambda: None)
        if not grads:
            def fn():
                with t.no_grad():
                    op(*args, s0)
                sync()
            return fn
        leaves = args + ([s0] if s0 is not None else [])
        gen = t.Generator(device=self.device).manual_seed(0)
        cots = None

        def fn():
            nonlocal cots
            o, s = op(*args, s0)
            if cots is None:  # random, non-symmetric cotangents, as in the protocol
                cots = [t.randn(o.shape, generator=gen, device=self.device).to(o.dtype),
                        t.randn(s.shape, generator=gen, device=self.device).to(s.dtype)]
            t.autograd.grad([o, s], leaves, cots)
            sync()
        return fn

    def time(self, op, x, dtype, grads, repeats=5):
        if not self.device.startswith("cuda"):
            return super().time(op, x, dtype, grads, repeats)
        from triton.testing import do_bench

        # The protocol of docs/benchmarks.md: median of do_bench(warmup=500 ms, rep=1500 ms).
        return do_bench(self.timer(op, x, dtype, grads, wait=False), warmup=500, rep=1500,
                        return_mode="median") / 1e3

    def peak_memory(self, op, x, dtype):
        """Peak bytes allocated over one fwd+bwd call, inputs included (CUDA only, else None)."""
        if not self.device.startswith("cuda"):
            return None
        t = self.torch
        fn = self.timer(op, x, dtype, True)
        fn()
        t.cuda.synchronize()
        t.cuda.reset_peak_memory_stats()
        fn()
        return t.cuda.max_memory_allocated()


def wait_ready(out):
    """Wait for every array in out by polling ``is_ready()`` instead of sleeping in
    ``jax.block_until_ready``: a host thread that sleeps through a call of several milliseconds
    can wake up a few hundred microseconds after the device finished (seen on the H200 virtual
    machine, benchmarks/jax_dispatch.py), which is the host's latency, not the call's. The
    PyTorch timer (CUDA events) excludes the host's wake-up too."""
    import jax

    leaves = jax.tree_util.tree_leaves(out)
    while not all(leaf.is_ready() for leaf in leaves):
        pass
    return out


class JaxAdapter(Adapter):
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def versions(self):
        import jaxlib

        return {"jax": self.jax.__version__, "jaxlib": jaxlib.__version__}

    def devices(self):
        return [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in self.jax.devices()]

    def _inputs(self, x, dtype):
        jnp = self.jnp
        args = [jnp.asarray(x[n]).astype(dtype) for n in NAMES]
        s0 = None if x["initial_state"] is None else jnp.asarray(x["initial_state"], jnp.float32)
        mask = None if x.get("mask") is None else jnp.asarray(x["mask"])
        return args, s0, mask

    def run(self, op, x, dtype, grads=False, do=None, dstate=None):
        jax, jnp = self.jax, self.jnp
        args, s0, mask = self._inputs(x, dtype)
        leaves = args + ([s0] if s0 is not None else [])

        def f(*leaves):
            return op(*leaves[:6], leaves[6] if len(leaves) == 7 else None, mask=mask)

        (o, s), vjp = jax.vjp(f, *leaves)
        grad_out = None
        if grads:
            g = vjp((jnp.asarray(do).astype(o.dtype), jnp.asarray(dstate).astype(s.dtype)))
            grad_out = {n: np.asarray(gi).astype(np.float64)
                        for n, gi in zip(list(NAMES) + ["initial_state"], g)}
        return np.asarray(o).astype(np.float64), np.asarray(s).astype(np.float64), grad_out

    def timer(self, op, x, dtype, grads):
        f, args = self.jitted(op, x, dtype, grads)
        return lambda: wait_ready(f(*args))

    def jitted(self, op, x, dtype, grads):
        """(f, args): the jitted call the timer times (fwd, or fwd+bwd with the protocol's
        cotangents) and its arguments, the six inputs in dtype and the fp32 initial state."""
        jax, jnp = self.jax, self.jnp
        args, s0, _ = self._inputs(x, dtype)
        if not grads:
            f = jax.jit(lambda *a: op(*a[:6], a[6]))
        else:
            # the protocol's cotangents: random dy and a random (non-symmetric) d final_state
            key_o, key_s = jax.random.split(jax.random.key(0))
            do = jax.random.normal(key_o, args[0].shape, jnp.float32).astype(args[0].dtype)
            ds = jax.random.normal(key_s, s0.shape, jnp.float32)

            def fwd_bwd(*a):
                (o, s), vjp = jax.vjp(lambda *b: op(*b[:6], b[6]), *a)
                return vjp((do, ds))

            f = jax.jit(fwd_bwd)
        return f, args + [s0]

    def time(self, op, x, dtype, grads, repeats=10):
        # The protocol for JAX: jit-compiled, median of 10 timed calls after warm-up.
        return super().time(op, x, dtype, grads, repeats)


class TensorflowAdapter(Adapter):
    name = "tensorflow"

    def __init__(self):
        import tensorflow as tf

        self.tf = tf

    def versions(self):
        return {"tensorflow": self.tf.__version__}

    def devices(self):
        return [d.name for d in self.tf.config.list_logical_devices()]

    def _inputs(self, x, dtype):
        tf = self.tf
        td = tf.as_dtype(dtype)
        args = [tf.cast(tf.constant(x[n]), td) for n in NAMES]
        s0 = None if x["initial_state"] is None else tf.constant(x["initial_state"], tf.float32)
        mask = None if x.get("mask") is None else tf.constant(x["mask"])
        return args, s0, mask

    def run(self, op, x, dtype, grads=False, do=None, dstate=None):
        tf = self.tf
        args, s0, mask = self._inputs(x, dtype)
        leaves = args + ([s0] if s0 is not None else [])
        with tf.GradientTape() as tape:
            for leaf in leaves:
                tape.watch(leaf)
            o, s = op(*args, s0, mask=mask)
        grad_out = None
        if grads:
            g = tape.gradient([o, s], leaves, output_gradients=[tf.cast(do, o.dtype), tf.cast(dstate, s.dtype)])
            grad_out = {n: np.asarray(tf.cast(gi, tf.float64)) for n, gi in zip(list(NAMES) + ["initial_state"], g)}
        return np.asarray(tf.cast(o, tf.float64)), np.asarray(tf.cast(s, tf.float64)), grad_out

    def timer(self, op, x, dtype, grads):
        tf = self.tf
        args, s0, _ = self._inputs(x, dtype)
        if not grads:
            return lambda: op(*args, s0)[0].numpy()

        def fn():
            with tf.GradientTape() as tape:
                for leaf in args + [s0]:
                    tape.watch(leaf)
                o, s = op(*args, s0)
            g = tape.gradient([o, s], args + [s0])
            g[0].numpy()
        return fn


def reference_errors(adapter, op, dtype, shape, seed):
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
    if dtype == "bfloat16":
        import ml_dtypes  # shipped with jax, tensorflow and keras

        np_dtype = ml_dtypes.bfloat16
    else:
        np_dtype = np.dtype(dtype)
    out = {n: x[n].astype(np_dtype).astype(np.float64) for n in "rwkvab"}
    out["initial_state"] = x["initial_state"].astype(np.float32).astype(np.float64)
    return out


ADAPTERS = {"numpy": NumpyAdapter, "torch": TorchAdapter, "jax": JaxAdapter, "tensorflow": TensorflowAdapter}
