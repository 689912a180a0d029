"""Public face of rwkv_ops.jax: the same names as every backend package, and input validation.

Kernel types live in modules of one contract (``KERNEL_TYPE``, ``SUPPORTED_HEAD_SIZES``,
``unavailable_reason(head_size)``, ``generalized_delta_rule``), imported lazily so that a build
without the Triton launcher, or a machine without jax-triton, still imports this package.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_ops.common import TensorInfo, check_inputs, choose_kernel_type, docs

BACKEND = "jax"
# Fastest first; "cuda" (XLA FFI) does not exist yet for JAX, and choose_kernel_type says so.
KERNEL_MODULES = {
    "triton": "rwkv_ops.jax.triton_launcher",
    "native": "rwkv_ops.jax.native",
}
GPU_KERNEL_TYPES = ("triton", "cuda")


# ----------------------------------------------------------------------------------------------
# Validation (used by every kernel module)


def as_arrays(*xs):
    """Turn array-likes (NumPy arrays, lists) into jax arrays; None, jax arrays and tracers pass."""
    return tuple(x if x is None or isinstance(x, jax.Array) else jnp.asarray(x) for x in xs)


def _device_of(x):
    # Tracers have no devices to compare, and uncommitted arrays (created without an explicit
    # placement) follow the committed ones, so neither can disagree with the others.
    if x is None or isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return None
    if not x.committed:
        return None
    devices = sorted(x.devices(), key=lambda d: d.id)
    if len(devices) == 1:
        return str(devices[0])
    return f"{devices[0].platform}:{{{','.join(str(d.id) for d in devices)}}}"


def tensor_info(x, device: str) -> TensorInfo:
    """Describe a jax array (or tracer) for :func:`rwkv_ops.common.check_inputs`."""
    dtype = jnp.dtype(x.dtype)
    bool_or_integer = dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)
    return TensorInfo(shape=tuple(x.shape),
                      is_floating=bool(jnp.issubdtype(dtype, jnp.floating)),
                      dtype=str(dtype), device=device, is_bool_or_integer=bool(bool_or_integer))


def validate(r, w, k, v, a, b, initial_state=None, mask=None, head_first=False):
    """Check one call with the library's messages and return its :class:`rwkv_ops.common.Problem`.

    Shapes are static under ``jit``, so this runs at trace time; devices are compared only for
    concrete, committed arrays.
    """
    xs = (r, w, k, v, a, b, initial_state, mask)
    devices = [_device_of(x) for x in xs]
    default = next((d for d in devices if d is not None), "any")
    infos = [None if x is None else tensor_info(x, d or default) for x, d in zip(xs, devices)]
    return check_inputs(*infos[:6], infos[6], infos[7], head_first)


# ----------------------------------------------------------------------------------------------
# Kernel types


def _load(kernel_type):
    """Return (module, None) or (None, why it cannot be imported)."""
    name = KERNEL_MODULES[kernel_type]
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        if e.name == name:
            return None, f"the {kernel_type} kernels are not included in this build of rwkv-ops-jax"
        return None, f"importing {name} failed ({e})"
    except ImportError as e:
        return None, f"importing {name} failed ({e})"


def _reason(kernel_type, head_size, automatic=False):
    """(why ``kernel_type`` cannot run here for ``head_size`` or None, quiet).

    The kernel module judges itself (its ``unavailable_reason``); automatic selection further
    requires a GPU backend, so that a Triton interpreter enabled for tests is never picked silently.
    """
    on_gpu = jax.default_backend() == "gpu"
    if automatic and kernel_type in GPU_KERNEL_TYPES and not on_gpu:
        return f"no GPU backend in JAX (jax.default_backend() is '{jax.default_backend()}')", True
    module, why = _load(kernel_type)
    if module is None:
        return why, not on_gpu  # no surprise on a machine without a GPU
    reason, quiet = module.unavailable_reason(head_size)
    return reason, bool(quiet)


def _candidates(head_size, automatic=False):
    return [(name, *_reason(name, head_size, automatic)) for name in KERNEL_MODULES]


def _module(kernel_type):
    module, why = _load(kernel_type)
    if module is None:  # only reachable if the module vanished after its reason was checked
        raise ImportError(why)
    return module


@lru_cache(maxsize=None)
def _automatic(head_size):
    choice = choose_kernel_type(BACKEND, None, _candidates(head_size, automatic=True))
    return _module(choice).generalized_delta_rule


def available_kernel_types():
    """Kernel types that can run on this machine, fastest first (["native"] without a GPU; Triton's
    CPU interpreter, a testing device, does not count)."""
    return [name for name, reason, _ in _candidates(None, automatic=True) if reason is None]


def choose_kernel(kernel_type, head_size) -> str:
    """The kernel type a call runs with: automatic (None) the fastest that runs on a GPU backend,
    explicit that one or KernelUnavailableError (the rule of every entry point)."""
    return choose_kernel_type(BACKEND, kernel_type,
                              _candidates(int(head_size), automatic=kernel_type is None))


def get_generalized_delta_rule(HEAD_SIZE=64, KERNEL_TYPE=None):
    choice = choose_kernel(KERNEL_TYPE, HEAD_SIZE)
    if KERNEL_TYPE is None:
        op = generalized_delta_rule
    else:
        op = _module(choice).generalized_delta_rule
    return op, choice in GPU_KERNEL_TYPES


get_generalized_delta_rule.__doc__ = docs.GET_GENERALIZED_DELTA_RULE.format(framework="JAX")


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    head_size = int(np.shape(r)[-1]) if np.ndim(r) > 0 else None
    op = _automatic(head_size)
    return op(r, w, k, v, a, b, initial_state, output_final_state, head_first, mask=mask)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="JAX; the fastest kernel type available here for this head size",
    tensor="jax arrays",
    example="""    >>> import jax, jax.numpy as jnp
    >>> from rwkv_ops.jax import generalized_delta_rule
    >>> r, w, k, v, a, b = jax.random.normal(jax.random.key(0), (6, 2, 32, 4, 64))
    >>> o, state = jax.jit(generalized_delta_rule)(r, -jnp.exp(w), k, v, a, b)
    >>> o.shape, state.shape
    ((2, 32, 4, 64), (2, 4, 64, 64))""",
)

rwkv7_op = generalized_delta_rule
