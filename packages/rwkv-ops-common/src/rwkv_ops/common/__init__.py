"""Framework-free pieces shared by every rwkv-ops backend: validation, errors, configuration.

Nothing here imports numpy, torch, jax or tensorflow.
"""

from rwkv_ops.common.environment import (
    BACKENDS,
    KERNEL_TYPES,
    Environment,
    read_environment,
)
from rwkv_ops.common.errors import KernelUnavailableError
from rwkv_ops.common.selection import choose_kernel_type
from rwkv_ops.common import docs
from rwkv_ops.common.validation import (
    Problem,
    TensorInfo,
    check_head_size,
    check_inputs,
    check_single_step_inputs,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "KERNEL_TYPES",
    "Environment",
    "KernelUnavailableError",
    "Problem",
    "TensorInfo",
    "check_head_size",
    "check_inputs",
    "docs",
    "check_single_step_inputs",
    "choose_kernel_type",
    "read_environment",
]
