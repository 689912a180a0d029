"""rwkv_ops.tensorflow: the RWKV-7 generalized delta rule in TensorFlow.

One kernel type, "native": a chunked implementation of TensorFlow ops that runs eagerly, under
``tf.function`` and with ``jit_compile=True``, and is differentiable with ``tf.GradientTape``.
"""

from rwkv_ops.tensorflow.api import (
    available_kernel_types,
    generalized_delta_rule,
    get_generalized_delta_rule,
    rwkv7_op,
)
from rwkv_ops.tensorflow.decode import generalized_delta_rule_single_step, rwkv7_op_rnn
from rwkv_ops.tensorflow.inference import generalized_delta_rule_inference
from rwkv_ops.tensorflow.varlen import generalized_delta_rule_varlen

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
