"""One decode step (T = 1) of the generalized delta rule in JAX.

Per batch element and head (ALGORITHM.md section 6)::

    u = S a,   S' = S diag(d) + u b^T + v k^T,   y = S' r,   d = exp(-exp(w))

Two implementations behind :func:`rwkv7_op_rnn`:

* ``decode_triton``: the shared Triton ``decode_kernel`` through ``jax_triton.triton_call`` (a GPU
  backend, K in {32, 64, 128}), one pass over the fp32 state. The new state aliases the old one's
  buffer (``input_output_aliases``), so under ``jax.jit`` with the state donated
  (``donate_argnums``) the update happens in place. Gradients (``jax.grad``/``vjp``) come from the
  native update's derivative (``jax.custom_vjp``).
* ``decode_native``: the same update in jax.numpy (CPU, TPU, GPU; any K; float64 under x64).

The decay is exact in both (no LAMBDA_FLOOR clamp: nothing is factorised here). JAX arrays are
immutable: ``inplace=True`` is a ValueError (donate the state under jit instead).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache, partial

import jax
import jax.numpy as jnp

from rwkv_ops.common import KernelUnavailableError, check_head_size, check_single_step_inputs
from rwkv_ops.common.serving import inplace_unsupported
from rwkv_ops.jax.api import _device_of, as_arrays, tensor_info

KERNEL_HEAD_SIZES = (32, 64, 128)
# Past this w, d = exp(-exp(w)) is 0 in every float type; capping keeps exp(w) finite, so the
# gradient d * -exp(w) is 0, never 0 * inf = NaN.
_W_CAP = 30.0
_HIGHEST = jax.lax.Precision.HIGHEST


def _validate(r, w, k, v, a, b, state, head_first):
    xs = (r, w, k, v, a, b, state)
    devices = [_device_of(x) for x in xs]
    default = next((d for d in devices if d is not None), "any")
    infos = [tensor_info(x, d or default) for x, d in zip(xs, devices)]
    return check_single_step_inputs(*infos, head_first)


def _compute_dtype(*dtypes):
    return jnp.dtype(jnp.float64) if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.dtype(jnp.float32)


@partial(jax.jit, static_argnames=("head_first",))
def _native_call(r, w, k, v, a, b, state, head_first):
    cd = _compute_dtype(*(x.dtype for x in (r, w, k, v, a, b, state)))
    axis = 2 if head_first else 1
    r_, w_, k_, v_, a_, b_ = (jnp.take(x, 0, axis=axis).astype(cd) for x in (r, w, k, v, a, b))
    B, H, K = r_.shape
    S = jnp.broadcast_to(state.astype(cd), (B, H, K, K))
    d = jnp.exp(-jnp.exp(jnp.minimum(w_, _W_CAP)))
    u = jnp.einsum("bhvk,bhk->bhv", S, a_, precision=_HIGHEST)
    S = S * d[..., None, :] + u[..., :, None] * b_[..., None, :] + v_[..., :, None] * k_[..., None, :]
    y = jnp.einsum("bhvk,bhk->bhv", S, r_, precision=_HIGHEST)
    return jnp.expand_dims(y, axis).astype(r.dtype), S


def decode_native(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """:func:`rwkv7_op_rnn` in jax.numpy: any backend and head size, jit / grad / vmap friendly."""
    r, w, k, v, a, b, state = as_arrays(r, w, k, v, a, b, state)
    _validate(r, w, k, v, a, b, state, head_first)
    if inplace:
        raise inplace_unsupported("jax")
    return _native_call(r, w, k, v, a, b, state, head_first=bool(head_first))


@lru_cache(maxsize=None)
def triton_unavailable_reason(K: int, state_dtype: str) -> str | None:
    """Why ``decode_triton`` cannot run here for head size K and this state dtype (None: it can)."""
    if jax.default_backend() != "gpu":
        return f"JAX has no GPU backend here (jax.default_backend() is '{jax.default_backend()}')"
    if importlib.util.find_spec("jax_triton") is None or importlib.util.find_spec("triton") is None:
        return "jax-triton is not installed: pip install rwkv-ops-jax[gpu]"
    if K not in KERNEL_HEAD_SIZES:
        return check_head_size(int(K), KERNEL_HEAD_SIZES, "triton")
    if state_dtype != "float32":
        return f"the Triton decode kernel keeps the state in float32, got {state_dtype}"
    return None


def _kernel_step(r, w, k, v, a, b, state, alias=True):
    """The kernel on contiguous [B, 1, H, K] / [B, H, 1, K] inputs and a [B, H, K, K] fp32 state.

    ``alias``: the new state takes the old one's buffer (in place when the caller donates it).
    """
    import jax_triton

    from rwkv_ops.jax._triton import decode as kernels

    B, H, K = state.shape[0], state.shape[1], state.shape[3]
    bv, warps = kernels.decode_config(K)
    # at T = 1 both layouts put (b, h) at (b * H + h) * K: the kernel needs no layout flag
    return jax_triton.triton_call(
        r, w, k, v, a, b, state, kernel=kernels.decode_kernel,
        out_shape=[jax.ShapeDtypeStruct(r.shape, r.dtype),
                   jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        grid=(B * H * (K // bv),), num_warps=warps, num_stages=1,
        input_output_aliases={6: 1} if alias else None, name="rwkv_ops_decode", K=K, BV=bv)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _kernel_call(r, w, k, v, a, b, state, head_first):
    o, s = _kernel_step(r, w, k, v, a, b, state)
    return o, s


def _kernel_fwd(r, w, k, v, a, b, state, head_first):
    return _kernel_call(r, w, k, v, a, b, state, head_first), (r, w, k, v, a, b, state)


def _kernel_bwd(head_first, residuals, cotangents):
    _, pullback = jax.vjp(lambda *xs: _native_call(*xs, head_first=head_first), *residuals)
    return pullback(cotangents)


_kernel_call.defvjp(_kernel_fwd, _kernel_bwd)


def decode_triton(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """:func:`rwkv7_op_rnn` with the Triton decode kernel (jax-triton, GPU backend).

    Raises KernelUnavailableError when it cannot run here (no GPU backend or jax-triton, head size
    not in {32, 64, 128}, a state that is not float32).
    """
    r, w, k, v, a, b, state = as_arrays(r, w, k, v, a, b, state)
    p = _validate(r, w, k, v, a, b, state, head_first)
    if inplace:
        raise inplace_unsupported("jax")
    reason = triton_unavailable_reason(p.K, jnp.dtype(state.dtype).name)
    if reason is not None:
        raise KernelUnavailableError(f"rwkv-ops: the Triton decode step cannot run here: {reason}.")
    if any(jnp.dtype(x.dtype) == jnp.float64 for x in (r, w, k, v, a, b)):
        r, w, k, v, a, b = (x.astype(jnp.float32) for x in (r, w, k, v, a, b))
    if state.shape[0] != p.B:
        state = jnp.broadcast_to(state, (p.B, p.H, p.K, p.K))
    return _kernel_call(r, w, k, v, a, b, state, bool(head_first))


def rwkv7_op_rnn(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """One recurrent step (decode) of the RWKV-7 generalized delta rule (JAX).

    The Triton decode kernel on a GPU backend with jax-triton (K in {32, 64, 128}, float32 state,
    no float64 input), else the native jax.numpy update. Both work under jit, grad and vmap
    (the kernel's gradient is the native update's).

    Args:
        r, w, k, v, a, b: [B, 1, H, K] (head_first: [B, H, 1, K]), floating dtypes.
        state: [B, H, K, K] float32 (a [1, H, K, K] state broadcasts over B).
        head_first: layout of the six inputs and of ``o``.
        inplace: must be False (JAX arrays are immutable; donate the state under jit instead).

    Returns:
        (o, new_state): o with the inputs' layout and r's dtype; new_state [B, H, K, K] float32
        (float64 for float64 inputs or state).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from rwkv_ops.jax.decode import rwkv7_op_rnn
        >>> r, w, k, v, a, b = jax.random.normal(jax.random.key(0), (6, 2, 1, 4, 64))
        >>> state = jnp.zeros((2, 4, 64, 64))
        >>> o, state = jax.jit(rwkv7_op_rnn, donate_argnums=6)(r, w, k, v, a, b, state)
        >>> o.shape, state.shape
        ((2, 1, 4, 64), (2, 4, 64, 64))
    """
    r, w, k, v, a, b, state = as_arrays(r, w, k, v, a, b, state)
    p = _validate(r, w, k, v, a, b, state, head_first)
    if inplace:
        raise inplace_unsupported("jax")
    wide = any(jnp.dtype(x.dtype) == jnp.float64 for x in (r, w, k, v, a, b))
    if not wide and triton_unavailable_reason(p.K, jnp.dtype(state.dtype).name) is None:
        return decode_triton(r, w, k, v, a, b, state, head_first)
    return _native_call(r, w, k, v, a, b, state, head_first=bool(head_first))


generalized_delta_rule_single_step = rwkv7_op_rnn
