"""rwkv_ops.torch: the RWKV-7 generalized delta rule in PyTorch.

``generalized_delta_rule`` picks per call: Triton or CUDA kernels for CUDA tensors when they can run
here, else the chunked native implementation (``rwkv_ops.torch.native``, any device, any K).
Importing this package imports neither Triton nor the CUDA extension.
"""

from rwkv_ops.torch.api import (
    available_kernel_types,
    generalized_delta_rule,
    get_generalized_delta_rule,
    rwkv7_op,
)
from rwkv_ops.torch.decode import generalized_delta_rule_single_step, rwkv7_op_rnn
from rwkv_ops.torch.inference import generalized_delta_rule_inference
from rwkv_ops.torch.varlen import generalized_delta_rule_varlen

__version__ = "0.1.0"

__all__ = [
    "available_kernel_types",
    "generalized_delta_rule",
    "generalized_delta_rule_inference",
    "generalized_delta_rule_single_step",
    "generalized_delta_rule_varlen",
    "get_generalized_delta_rule",
    "rwkv7_op",
    "rwkv7_op_rnn",
]
