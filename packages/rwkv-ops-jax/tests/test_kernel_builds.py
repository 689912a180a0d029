"""Every Triton launch of the JAX launcher compiles for sm_80 and sm_90, checked without a GPU.

As the torch suite's test of the same name: the launcher's ``_launch`` is replaced by a recorder
(nothing runs; it returns zeros of the outputs' shapes), a set of calls covering the launcher's
options is traced, and ``benchmarks/compile_check.py`` compiles each distinct launch of the JAX
entry kernels (which wrap the shared kernels) for both targets in a process of its own. The
launcher is told it has 132 SMs, so the L2 prefetches are compiled too. On a GPU machine the GPU
suite compiles every launch for real, so this test is skipped there. CI compiles with the
workspace's Triton; the torch test's docstring says how to compile with the GPU machine's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_ops.jax import triton_launcher as launcher

ROOT = Path(__file__).resolve().parents[3]
CHECK = ROOT / "benchmarks" / "compile_check.py"
ENTRIES = {"prep", "scan_fwd", "combine", "scan_bwd", "bwd"}

pytestmark = pytest.mark.skipif(
    jax.default_backend() == "gpu" or importlib.util.find_spec("triton") is None
    or not CHECK.exists(),
    reason="the GPU suite compiles the kernels for real; needs Triton and a checkout with "
           "benchmarks/compile_check.py")


def _recorder(log):
    """A stand-in for ``launcher._launch`` that describes each launch (compile_check.py's format:
    pointers by dtype, scalars by value) and returns zeros."""

    def launch(entry, arrays, scalars, outs, grid, warps, stages, maxnreg=None, **constexprs):
        kernel = launcher._entries()[entry]
        constexprs = launcher._with_cap(kernel, entry, maxnreg, constexprs)
        names = [n for n in kernel.arg_names if n not in constexprs]
        scalars = [int(s) + 1 for s in scalars]  # as the real _launch passes them
        values = {name: value if isinstance(value, int) else "*" + jnp.dtype(value.dtype).name
                  for name, value in zip(names, [*arrays, *scalars, *outs])}
        log.append({"kernel": f"rwkv_ops.jax.triton_launcher:{entry}", "args": values,
                    "constexprs": constexprs, "warps": warps, "stages": stages,
                    "maxnreg": maxnreg})
        return [jnp.zeros(o.shape, o.dtype) for o in outs]

    return launch


def _inputs(B, T, H, K, dtype, head_first=False):
    shape = (B, H, T, K) if head_first else (B, T, H, K)
    rng = np.random.default_rng(B * 1000 + T * 10 + K)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(6)]


def _fwd_bwd(xs, *rest, fn=None, **options):
    fn = fn or launcher.generalized_delta_rule

    def loss(*xs):
        o, state = fn(*xs, *rest, **options)
        return o.astype(jnp.float32).sum() + state.sum()

    jax.grad(loss, argnums=tuple(range(6)))(*xs)


def _record_calls():
    """Launches covering the constexprs, as in the torch suite's test (no decode step: the JAX
    decode calls jax-triton directly, with the kernel and constexprs the torch suite compiles)."""
    bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    _fwd_bwd(_inputs(2, 64, 2, 64, bf16), initial_state=jnp.ones((2, 2, 64, 64)))
    mask = np.ones((1, 50), bool)
    mask[0, 7] = False
    _fwd_bwd(_inputs(1, 50, 2, 32, bf16), mask=jnp.asarray(mask))
    _fwd_bwd(_inputs(1, 40, 2, 128, f16, head_first=True), head_first=True)
    _fwd_bwd(_inputs(1, 33, 2, 64, f32), initial_state=jnp.ones((1, 2, 64, 64)))
    _fwd_bwd(_inputs(1, 1024, 1, 32, bf16), initial_state=jnp.ones((1, 1, 32, 32)))  # segments
    launcher.generalized_delta_rule(*_inputs(2, 64, 2, 64, bf16))  # no checkpoints
    launcher.generalized_delta_rule(*_inputs(1, 2048, 1, 64, bf16))  # segments, no checkpoints
    _fwd_bwd(_inputs(1, 50, 2, 64, bf16), np.array([0, 20, 50]), jnp.ones((2, 2, 64, 64)),
             fn=launcher.generalized_delta_rule_packed)


def test_every_launch_compiles_for_sm80_and_sm90(monkeypatch):
    log = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the launcher runs on CPU only in this mode
    monkeypatch.setattr(launcher, "_launch", _recorder(log))
    monkeypatch.setattr(launcher, "_sm_count", lambda: 132)
    _record_calls()

    launched = {launch["kernel"].split(":")[1] for launch in log}
    assert launched == ENTRIES, launched
    assert any(launch["constexprs"].get("PREFETCH", 0) > 0 for launch in log
               if launch["kernel"].endswith(":bwd")), "no prefetching launch"
    assert any(launch["maxnreg"] for launch in log
               if launch["kernel"].endswith(":bwd")), "no launch with a register cap"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, str(CHECK), "--arch", "80,90"], input=json.dumps(log),
                          capture_output=True, text=True, env=env, timeout=1500)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " 0 failed" in proc.stdout, proc.stdout[-4000:]


def test_register_cap_reaches_the_compile_options():
    """The JAX launcher's register cap (jax-triton's ``triton_call`` has none): a capped launch
    lowers with the backend ``_capped_backend`` makes, whose compile options carry maxnreg; the
    gradient entry always gets the cap's constexpr (None when uncapped), and an entry without one
    refuses a cap rather than ignoring it."""
    options = launcher._capped_backend(168)(0, 90).parse_options({"num_warps": 4, "num_stages": 1})
    assert options.maxnreg == 168 and options.num_warps == 4
    entries = launcher._entries()
    cap = launcher.CAP_PARAM
    assert launcher._with_cap(entries["bwd"], "bwd", 168, {"K": 64}) == {"K": 64, cap: 168}
    assert launcher._with_cap(entries["bwd"], "bwd", None, {})[cap] is None
    with pytest.raises(ValueError, match="no register cap"):
        launcher._with_cap(entries["prep"], "prep", 168, {})
