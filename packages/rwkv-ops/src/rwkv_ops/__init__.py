"""rwkv-ops: the RWKV-7 generalized delta rule for every framework, one API.

``from rwkv_ops import generalized_delta_rule`` gives the operator of the framework selected by the
environment (read once, when this package is imported):

========== ============================================ =====================================
variable   values                                       default
========== ============================================ =====================================
KERNEL_BACKEND  torch / jax / tensorflow / numpy        (wins over KERAS_BACKEND)
KERAS_BACKEND   torch / jax / tensorflow / numpy        torch when neither is set
KERNEL_TYPE     triton / cuda / native                  unset: fastest available here
========== ============================================ =====================================

Only the selected framework is imported, and only when a dispatched name is first used; the backend
packages (``rwkv_ops.torch``, ``rwkv_ops.jax``, ``rwkv_ops.tensorflow``, ``rwkv_ops.numpy``) can also
be imported directly and never trigger the dispatcher.
"""

# Each backend wheel ships a portion of the rwkv_ops namespace; editable installs put each portion on
# its own sys.path entry, so this package must extend its path to find them.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

import os as _os

from rwkv_ops.common.environment import read_environment as _read_environment

__version__ = "0.12.0"

try:
    _ENVIRONMENT = _read_environment(_os.environ)
    _ENVIRONMENT_ERROR = None
except ValueError as _error:  # raised again when a dispatched name is used
    _ENVIRONMENT, _ENVIRONMENT_ERROR = None, _error

if _ENVIRONMENT is not None and _ENVIRONMENT.keras_backend is not None:
    # KERNEL_BACKEND is set and KERAS_BACKEND is not: Keras must follow, before it is imported.
    _os.environ.setdefault("KERAS_BACKEND", _ENVIRONMENT.keras_backend)

_DISPATCHED = (
    "generalized_delta_rule",
    "rwkv7_op",
    "get_generalized_delta_rule",
    "available_kernel_types",
    "generalized_delta_rule_inference",
    "generalized_delta_rule_varlen",
    "rwkv7_op_rnn",
    "generalized_delta_rule_single_step",
    "RWKV7_USE_KERNEL",
    "BACKEND",
    "KERNEL_TYPE",
)

__all__ = list(_DISPATCHED) + ["__version__"]


def __getattr__(name):
    if name in _DISPATCHED:
        from rwkv_ops import _dispatch

        return _dispatch.resolve(name)
    raise AttributeError(f"module 'rwkv_ops' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_DISPATCHED))
