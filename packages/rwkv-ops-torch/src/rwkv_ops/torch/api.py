"""Public face of rwkv_ops.torch: the same names as every backend package, and kernel selection.

Each implementation lives in its own module, ``rwkv_ops.torch.<module>`` with the contract
``KERNEL_TYPE``, ``SUPPORTED_HEAD_SIZES``, ``unavailable_reason(head_size) -> (reason, quiet)`` and
``generalized_delta_rule(...)``. They are imported only when their kernel type is considered, so
importing this package never imports Triton or builds the CUDA extension.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from rwkv_ops.common import Problem, TensorInfo, check_inputs, choose_kernel_type, docs

BACKEND = "torch"

# Kernel type -> module, fastest first; "native" is always last and always runnable.
KERNEL_MODULES = {
    "triton": "rwkv_ops.torch.triton_launcher",
    "cuda": "rwkv_ops.torch.cuda_launcher",
    "native": "rwkv_ops.torch.native",
}
GPU_KERNEL_TYPES = ("triton", "cuda")


def tensor_info(x) -> TensorInfo:
    """Describe a torch tensor for :func:`rwkv_ops.common.check_inputs`; TypeError for anything
    else (a NumPy array, a list), which the torch operators do not convert."""
    if not isinstance(x, torch.Tensor):
        kind = type(x)
        raise TypeError(
            f"rwkv-ops: the torch operator takes torch.Tensor inputs, got "
            f"{kind.__module__}.{kind.__qualname__}; convert with torch.as_tensor, or use another "
            f"framework's operator (KERNEL_BACKEND=numpy, jax, tensorflow).")
    floating = x.is_floating_point()
    return TensorInfo(shape=tuple(x.shape), is_floating=floating,
                      dtype=str(x.dtype).replace("torch.", ""), device=str(x.device),
                      is_bool_or_integer=not floating and not x.is_complex())


def check_torch_inputs(r, w, k, v, a, b, initial_state=None, mask=None,
                       head_first=False) -> Problem:
    """Validate one call with the library's messages; returns the sizes (B, T, H, K, ...)."""
    return check_inputs(*(tensor_info(x) for x in (r, w, k, v, a, b)),
                        None if initial_state is None else tensor_info(initial_state),
                        None if mask is None else tensor_info(mask), head_first)


def load_kernel_module(kernel_type: str):
    """Import the module of one kernel type; None when this build does not include it."""
    name = KERNEL_MODULES[kernel_type]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return None


def kernel_reason(kernel_type: str, head_size: Optional[int]) -> tuple:
    """(why ``kernel_type`` cannot run head size K here or None, quiet).

    Not cached here: the answer may follow the environment (TRITON_INTERPRET), and each module's
    check is cheap (the CUDA toolchain probe caches itself).
    """
    module = load_kernel_module(kernel_type)
    if module is None:
        return "not included in this build of rwkv-ops-torch", False
    reason, quiet = module.unavailable_reason(head_size)
    return reason, bool(quiet)


def _candidates(head_size: Optional[int], kernel_types=tuple(KERNEL_MODULES)) -> list:
    return [(name, *kernel_reason(name, head_size)) for name in kernel_types]


def _select(device_type: str, head_size: Optional[int]) -> str:
    """Automatic choice for inputs on ``device_type``: GPU kernels only for CUDA tensors."""
    if device_type != "cuda":
        return "native"
    return choose_kernel_type(BACKEND, None, _candidates(head_size))


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    shape = getattr(r, "shape", ())
    head_size = int(shape[-1]) if len(shape) == 4 else None
    device_type = getattr(getattr(r, "device", None), "type", "cpu")
    module = load_kernel_module(_select(device_type, head_size))
    return module.generalized_delta_rule(r, w, k, v, a, b, initial_state, output_final_state,
                                         head_first, mask=mask)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="PyTorch; Triton or CUDA kernels for CUDA tensors when they can run, else native",
    tensor="torch tensors",
    example="""    >>> import torch
    >>> from rwkv_ops.torch import generalized_delta_rule
    >>> r, w, k, v, a, b = torch.randn(6, 2, 32, 4, 64).unbind(0)
    >>> o, state = generalized_delta_rule(r, w, k, v, a, b)
    >>> o.shape, state.shape
    (torch.Size([2, 32, 4, 64]), torch.Size([2, 4, 64, 64]))""",
)

rwkv7_op = generalized_delta_rule


def available_kernel_types(head_size: Optional[int] = None) -> list:
    """Kernel types that can run on this machine (for ``head_size`` when given), fastest first.

    Always ends with "native". GPU kernels count only with a CUDA GPU (Triton's CPU interpreter,
    a testing device, does not).
    """
    gpu = torch.cuda.is_available()
    return [name for name, reason, _ in _candidates(head_size)
            if reason is None and (gpu or name not in GPU_KERNEL_TYPES)]


def choose_kernel(kernel_type: Optional[str], device_type: str, head_size: Optional[int]) -> str:
    """The kernel type a call runs with: automatic (None) as ``_select`` for tensors on
    ``device_type``; explicit that one, or KernelUnavailableError (the rule of every entry point)."""
    if kernel_type is None:
        return _select(device_type, head_size)
    if kernel_type in KERNEL_MODULES:
        candidates = _candidates(head_size, (kernel_type,))
    else:
        candidates = [("native", None)]  # choose_kernel_type rejects unknown names itself
    return choose_kernel_type(BACKEND, kernel_type, candidates)


def get_generalized_delta_rule(HEAD_SIZE=64, KERNEL_TYPE=None):
    if KERNEL_TYPE is None:
        # The automatic op decides per call and CPU tensors always go native; the flag tells whether
        # CUDA tensors of this head size get a GPU kernel on this machine.
        use_kernel = torch.cuda.is_available() and _select("cuda", HEAD_SIZE) in GPU_KERNEL_TYPES
        return generalized_delta_rule, use_kernel
    chosen = choose_kernel(KERNEL_TYPE, "cuda", HEAD_SIZE)
    return load_kernel_module(chosen).generalized_delta_rule, chosen in GPU_KERNEL_TYPES


get_generalized_delta_rule.__doc__ = docs.GET_GENERALIZED_DELTA_RULE.format(framework="PyTorch")
