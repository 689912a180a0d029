"""rwkv_ops.jax: the RWKV-7 generalized delta rule in JAX.

``generalized_delta_rule`` picks the fastest kernel type available here (Triton through jax-triton on
a GPU, else the chunked native implementation, which is jit / grad / vmap friendly and runs on CPU,
TPU and GPU). Importing this package imports jax and nothing of torch, TensorFlow, Keras or Triton.
"""

from rwkv_ops.jax.api import (
    available_kernel_types,
    generalized_delta_rule,
    get_generalized_delta_rule,
    rwkv7_op,
)
from rwkv_ops.jax.decode import generalized_delta_rule_single_step, rwkv7_op_rnn
from rwkv_ops.jax.inference import generalized_delta_rule_inference
from rwkv_ops.jax.varlen import generalized_delta_rule_varlen

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
