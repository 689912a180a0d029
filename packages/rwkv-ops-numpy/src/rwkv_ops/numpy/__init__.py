"""rwkv_ops.numpy: the RWKV-7 generalized delta rule in NumPy.

``generalized_delta_rule`` is the chunked forward; ``generalized_delta_rule_reference`` the float64
sequential oracle; ``generalized_delta_rule_backward`` its explicit backward.
"""

from rwkv_ops.numpy.api import (
    available_kernel_types,
    generalized_delta_rule,
    get_generalized_delta_rule,
    rwkv7_op,
)
from rwkv_ops.numpy.reference import (
    generalized_delta_rule_backward,
    generalized_delta_rule_reference,
)
from rwkv_ops.numpy.decode import generalized_delta_rule_single_step, rwkv7_op_rnn
from rwkv_ops.numpy.inference import generalized_delta_rule_inference
from rwkv_ops.numpy.varlen import generalized_delta_rule_varlen

__version__ = "0.1.0"

__all__ = [
    "available_kernel_types",
    "generalized_delta_rule",
    "generalized_delta_rule_inference",
    "generalized_delta_rule_single_step",
    "generalized_delta_rule_varlen",
    "generalized_delta_rule_backward",
    "generalized_delta_rule_reference",
    "get_generalized_delta_rule",
    "rwkv7_op",
    "rwkv7_op_rnn",
]
