"""CPU-side behaviour of the JAX Triton path: why it cannot run, the error of an explicit request,
lazy imports, and how its sharding rule partitions a program over several (virtual CPU) devices.

None of this needs a GPU. Sharded programs are compiled here, not run: the kernels run on CPU only
in Triton's interpreter, through host callbacks that XLA cannot call from a partitioned program
(the GPU test suite runs them on a device mesh).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from rwkv_ops.common import KernelUnavailableError, check_head_size
from rwkv_ops.jax import triton_launcher

NO_GPU = jax.default_backend() != "gpu"
needs_cpu_only = pytest.mark.skipif(not NO_GPU, reason="checks the behaviour without a GPU backend")
needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="Triton's interpreter needs triton and torch")


def _python(code, **env):
    """Run ``code`` in a fresh interpreter (own environment, own JAX devices); return stdout."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TRITON_INTERPRET", "XLA_FLAGS", "JAX_PLATFORMS")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@needs_cpu_only
def test_unavailable_reason_without_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend = jax.default_backend()
    expected = (f"no GPU backend in JAX (jax.default_backend() is '{backend}')", True)
    assert triton_launcher.unavailable_reason() == expected
    assert triton_launcher.unavailable_reason(64) == expected


def test_unavailable_reason_without_jax_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_launcher.jax, "default_backend", lambda: "gpu")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(triton_launcher.importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax_triton" else real_find_spec(name, *a))
    assert triton_launcher.unavailable_reason(64) == (
        "jax-triton is not installed: pip install rwkv-ops-jax[gpu]", False)


@needs_interpreter
def test_unavailable_reason_head_size(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_launcher.unavailable_reason(64) == (None, False)
    expected = check_head_size(48, triton_launcher.SUPPORTED_HEAD_SIZES, "triton")
    assert expected is not None
    assert triton_launcher.unavailable_reason(48) == (expected, False)


@needs_cpu_only
def test_explicit_request_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import rwkv_ops.jax as rj

    with pytest.raises(KernelUnavailableError, match="KERNEL_TYPE='triton' cannot run here with jax"):
        rj.get_generalized_delta_rule(64, KERNEL_TYPE="triton")
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 2, 64)).astype(np.float32)
    with pytest.raises(KernelUnavailableError,
                       match=r"KERNEL_TYPE='triton' cannot run here with jax: no GPU backend in JAX"):
        triton_launcher.generalized_delta_rule(*x)
    assert "triton" not in rj.available_kernel_types()


@needs_interpreter
def test_explicit_request_unsupported_head_size(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 2, 48)).astype(np.float32)
    with pytest.raises(KernelUnavailableError, match=r"head sizes K in \{32, 64, 128\}, got K = 48"):
        triton_launcher.generalized_delta_rule(*x)


def test_import_loads_neither_triton_nor_jax_triton():
    out = _python("""
        import sys
        import numpy as np
        import rwkv_ops.jax as rj
        import rwkv_ops.jax.triton_launcher as t
        t.unavailable_reason(64)
        rj.available_kernel_types()
        x = np.random.default_rng(0).standard_normal((6, 1, 4, 2, 32)).astype(np.float32)
        rj.generalized_delta_rule(*x)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "jax_triton")))
    """)
    assert out.strip().splitlines()[-1] == "[]"


@needs_interpreter
def test_sharding_rule_on_four_devices():
    """Batch and head shardings pass through without collectives (no all-gather); a sharding of T or
    K is gathered explicitly before the kernels (they need whole sequences and heads); running a
    multi-device program under the interpreter is refused with a clear error."""
    out = _python("""
        import re
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from rwkv_ops.jax import triton_launcher as t

        B, T, H, K = 4, 20, 4, 32
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))

        def collectives(spec, state_spec, head_first=False, broadcast=False):
            shape = (B, H, T, K) if head_first else (B, T, H, K)
            xs = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))] * 6
            s0 = jax.ShapeDtypeStruct((1 if broadcast else B, H, K, K), jnp.float32,
                                      sharding=NamedSharding(mesh, state_spec))
            def loss(*a):
                o, s = t.generalized_delta_rule(*a, head_first=head_first)
                return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s), (o, s)
            f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))
            compiled = f.lower(*xs, s0).compile()
            ops = set(re.findall(r"= \\S+ (all-gather|all-to-all|collective-permute)", compiled.as_text()))
            outs = compiled.output_shardings
            def norm(spec):  # printed the same by every JAX version
                spec = list(spec)
                while spec and spec[-1] is None:
                    spec.pop()
                return tuple(spec)
            return sorted(ops), norm(outs[0][1][0].spec), norm(outs[1][0].spec), norm(outs[1][6].spec)

        t._COMPILE_ONLY_UNDER_INTERPRETER = True
        print("B+H", collectives(P("data", None, "model", None), P("data", "model")))
        print("HF", collectives(P("data", "model", None, None), P("data", "model"), head_first=True))
        print("BB", collectives(P(("data", "model"), None, None, None), P(("data", "model"))))
        print("H1", collectives(P(None, None, "model", None), P(None, "model"), broadcast=True))
        print("T", collectives(P(None, "data", None, None), P()))
        print("K", collectives(P(None, None, None, "model"), P()))
        t._COMPILE_ONLY_UNDER_INTERPRETER = False
        try:
            collectives(P("data", None, "model", None), P("data", "model"))
        except Exception as e:
            print("REFUSED", "needs the GPU path" in str(e))
    """, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    # (collectives, o's sharding, dr's sharding, d_initial_state's sharding)
    assert lines["B+H"] == "([], ('data', None, 'model'), ('data', None, 'model'), ('data', 'model'))", out
    assert lines["HF"] == "([], ('data', 'model'), ('data', 'model'), ('data', 'model'))", out
    assert lines["BB"] == "([], (('data', 'model'),), (('data', 'model'),), (('data', 'model'),))", out
    assert lines["H1"] == "([], (None, None, 'model'), (None, None, 'model'), (None, 'model'))", out
    assert lines["T"].startswith("(['all-gather']"), out
    assert lines["K"].startswith("(['all-gather']"), out
    assert lines["REFUSED"] == "True", out
