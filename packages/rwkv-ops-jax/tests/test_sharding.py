"""The native path under jax.jit with NamedSharding on a mesh of 4 CPU devices.

Batch-sharded (data parallel) and head-sharded (tensor parallel) inputs must compile to a program
without any all-gather (or all-to-all): every device works on its own slice, forward and backward.
Sharding along T or K may need collectives; there only correctness is asserted.

The host-device count must be set before jax is imported, and other test modules import jax first,
so the measurements run in a child process: this file, run as a script, prints them as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DEVICES = 4
COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")
# (name, mesh shape, mesh axes, spec of the [B, T, H, K] inputs, spec of the [B, H, K, K] state)
LAYOUTS = [
    ("batch", (4,), ("data",), ("data",), ("data",)),
    ("head", (4,), ("model",), (None, None, "model"), (None, "model")),
    ("batch_and_head", (2, 2), ("data", "model"), ("data", None, "model"), ("data", "model")),
    ("time", (4,), ("seq",), (None, "seq"), ()),
    ("key", (4,), ("k",), (None, None, None, "k"), ()),
]
NO_GATHER = ("batch", "head", "batch_and_head")


def _child(seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from rwkv_ops.jax import native
    from rwkv_ops.numpy import generalized_delta_rule_backward, generalized_delta_rule_reference
    from rwkv_ops.numpy.testing import NAMES, make_cotangents, make_inputs, rel_error

    assert len(jax.devices()) == DEVICES, jax.devices()
    B, T, H, K = 4, 40, 4, 16
    x = make_inputs(B, T, H, K, seed=seed)
    do, dS = make_cotangents((B, T, H, K), (B, H, K, K), seed=seed)
    o_ref, S_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    grads_ref = generalized_delta_rule_backward(*(x[n] for n in NAMES), x["initial_state"], do=do,
                                                dfinal_state=dS)

    def loss(*args):
        o, S = native.generalized_delta_rule(*args[:7])
        return jnp.sum(o * args[7]) + jnp.sum(S * args[8])

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    forward = jax.jit(native.generalized_delta_rule)
    results = {}
    for name, shape, axes, spec, state_spec in LAYOUTS:
        mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
        inputs = NamedSharding(mesh, P(*spec))
        state = NamedSharding(mesh, P(*state_spec))
        args = [jax.device_put(jnp.asarray(x[n], jnp.float32), inputs) for n in NAMES]
        args.append(jax.device_put(jnp.asarray(x["initial_state"], jnp.float32), state))
        cot = [jax.device_put(jnp.asarray(do, jnp.float32), inputs),
               jax.device_put(jnp.asarray(dS, jnp.float32), state)]
        fwd_hlo = forward.lower(*args).compile().as_text()
        grad_hlo = grad.lower(*args, *cot).compile().as_text()
        o, S = forward(*args)
        grads = grad(*args, *cot)
        results[name] = {
            "forward_collectives": sorted(c for c in COLLECTIVES if c in fwd_hlo),
            "grad_collectives": sorted(c for c in COLLECTIVES if c in grad_hlo),
            "o_keeps_sharding": bool(o.sharding.is_equivalent_to(inputs, 4)),
            "errors": {"o": rel_error(o, o_ref), "final_state": rel_error(S, S_ref),
                       **{f"d{n}": rel_error(g, g_ref)
                          for n, g, g_ref in zip((*NAMES, "initial_state"), grads, grads_ref)}},
        }
    # Committed arrays on different devices are refused with the library's message.
    devices = jax.devices()
    args = [jax.device_put(jnp.ones((1, 3, 1, 8)), devices[1 if n == "r" else 0]) for n in NAMES]
    try:
        native.generalized_delta_rule(*args)
        results["device_mismatch"] = "no error"
    except ValueError as e:
        results["device_mismatch"] = str(e)
    return results


@pytest.fixture(scope="module")
def measured():
    from rwkv_ops.numpy.testing import seed_from_env

    seed = seed_from_env()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(seed)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"seed={seed}\n{proc.stdout}\n{proc.stderr}"
    return seed, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", [layout[0] for layout in LAYOUTS])
def test_sharded_results_match_reference(measured, layout):
    seed, results = measured
    for name, err in results[layout]["errors"].items():
        assert err <= 1e-5, f"{layout}: {name} relative error {err:.3e} > 1e-5 (seed={seed})"


@pytest.mark.parametrize("layout", NO_GATHER)
def test_batch_and_head_sharding_need_no_gather(measured, layout):
    _, results = measured
    r = results[layout]
    for stage in ("forward_collectives", "grad_collectives"):
        found = r[stage]
        assert "all-gather" not in found and "all-to-all" not in found, (layout, stage, found)
    assert r["o_keeps_sharding"], f"{layout}: o does not keep the inputs' sharding"


def test_inputs_on_different_devices_are_refused(measured):
    _, results = measured
    message = results["device_mismatch"]
    assert "all inputs must be on one device" in message and "r on cpu:1" in message, message


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]))))
