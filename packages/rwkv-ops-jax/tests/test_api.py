"""The public face of rwkv_ops.jax: names, kernel-type selection, errors, import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_ops.jax as rj
from rwkv_ops.common import KernelUnavailableError
from rwkv_ops.jax import api, native
from rwkv_ops.numpy import generalized_delta_rule_reference as reference
from rwkv_ops.numpy.testing import NAMES, make_inputs, rel_error, seed_from_env

SEED = seed_from_env()
ON_CPU = jax.default_backend() == "cpu"


def test_public_names():
    assert rj.__version__ == "0.1.0"
    assert rj.rwkv7_op is rj.generalized_delta_rule
    for name in ("generalized_delta_rule", "rwkv7_op", "get_generalized_delta_rule",
                 "available_kernel_types"):
        assert name in rj.__all__ and callable(getattr(rj, name))
    assert "Args:" in rj.generalized_delta_rule.__doc__
    assert "KERNEL_TYPE" in rj.get_generalized_delta_rule.__doc__


@pytest.mark.skipif(not ON_CPU, reason="CPU-only expectation")
def test_only_native_on_cpu():
    assert rj.available_kernel_types() == ["native"]
    op, use_kernel = rj.get_generalized_delta_rule(HEAD_SIZE=64)
    assert use_kernel is False
    op, use_kernel = rj.get_generalized_delta_rule(HEAD_SIZE=48, KERNEL_TYPE="native")
    assert op is native.generalized_delta_rule and use_kernel is False


def test_default_op_matches_reference_under_jit():
    seed = SEED
    x = make_inputs(2, 21, 2, 16, seed=seed, mask="right")
    op, _ = rj.get_generalized_delta_rule(HEAD_SIZE=16)
    args = [jnp.asarray(x[n], jnp.float32) for n in NAMES]
    s0 = jnp.asarray(x["initial_state"], jnp.float32)
    o, S = jax.jit(lambda *a: op(*a, mask=jnp.asarray(x["mask"])))(*args, s0)
    o_ref, S_ref = reference(*(x[n] for n in NAMES), x["initial_state"], mask=x["mask"])
    assert rel_error(o, o_ref) <= 1e-5, f"seed={seed}"
    assert rel_error(S, S_ref) <= 1e-5, f"seed={seed}"
    o2, S2 = rj.generalized_delta_rule(*args, s0, mask=x["mask"])  # NumPy mask, eager
    assert rel_error(o2, o_ref) <= 1e-5, f"seed={seed}"
    assert rel_error(S2, S_ref) <= 1e-5, f"seed={seed}"


def test_unknown_kernel_type_is_a_value_error():
    with pytest.raises(ValueError, match="valid values are: triton, cuda, native"):
        rj.get_generalized_delta_rule(64, KERNEL_TYPE="fast")


def test_cuda_is_not_offered_by_jax():
    with pytest.raises(KernelUnavailableError,
                       match="has no 'cuda' implementation; it offers: triton, native"):
        rj.get_generalized_delta_rule(64, KERNEL_TYPE="cuda")


@pytest.mark.skipif(not ON_CPU, reason="needs a machine without a JAX GPU backend")
def test_explicit_triton_without_gpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="cannot run here with jax: .*no GPU backend"):
        rj.get_generalized_delta_rule(64, KERNEL_TYPE="triton")


@pytest.mark.skipif(not ON_CPU, reason="needs a machine without a JAX GPU backend")
def test_automatic_choice_never_picks_an_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 runs Triton on CPU (for tests); only explicit requests may use it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    api._automatic.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # skipping for "no GPU backend" is quiet
            op, use_kernel = rj.get_generalized_delta_rule(64)
            assert use_kernel is False
            assert api._automatic(64) is native.generalized_delta_rule
    finally:
        api._automatic.cache_clear()


def test_missing_kernel_module(monkeypatch):
    """A build without the launcher: explicit request fails clearly, automatic falls back once."""
    monkeypatch.setitem(api.KERNEL_MODULES, "triton", "rwkv_ops.jax._no_such_launcher")
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    api._automatic.cache_clear()
    try:
        with pytest.raises(KernelUnavailableError,
                           match="not included in this build of rwkv-ops-jax"):
            rj.get_generalized_delta_rule(64, KERNEL_TYPE="triton")
        assert rj.available_kernel_types() == ["native"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op, use_kernel = rj.get_generalized_delta_rule(64)
            x = [jnp.full((1, 3, 1, 64), 0.1)] * 6
            rj.generalized_delta_rule(*x)
        assert use_kernel is False
        messages = [str(w.message) for w in caught]
        assert any("falls back to the native implementation" in m and "not included" in m
                   for m in messages), messages
    finally:
        api._automatic.cache_clear()


def test_kernel_module_contract_of_native():
    assert native.KERNEL_TYPE == "native"
    assert native.SUPPORTED_HEAD_SIZES is None
    assert native.unavailable_reason(64) == (None, True)
    assert native.unavailable_reason() == (None, True)


def test_numpy_and_list_inputs_are_accepted():
    x = make_inputs(1, 5, 1, 8, seed=SEED + 1)
    xs = [x[n].astype(np.float32) for n in NAMES]
    o, S = rj.generalized_delta_rule(*xs)
    o_ref, S_ref = reference(*xs)
    assert rel_error(o, o_ref) <= 1e-5 and rel_error(S, S_ref) <= 1e-5


def test_import_does_not_pull_other_frameworks():
    code = (
        "import sys, json, rwkv_ops.jax\n"
        "others = ('torch', 'tensorflow', 'keras', 'triton', 'jax_triton')\n"
        "print(json.dumps(sorted(m for m in others if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
