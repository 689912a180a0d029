"""The dispatcher's table: which backend package serves ``rwkv_ops.<name>``.

Every backend package has the same face (``generalized_delta_rule``, ``get_generalized_delta_rule``,
``available_kernel_types``), so dispatching is one lookup, not a pile of conditionals.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

import rwkv_ops
from rwkv_ops.common.environment import install_command

_resolved: dict = {}


def environment():
    """The Environment read when rwkv_ops was imported (raises its ValueError if it was invalid)."""
    if rwkv_ops._ENVIRONMENT_ERROR is not None:
        raise rwkv_ops._ENVIRONMENT_ERROR
    return rwkv_ops._ENVIRONMENT


def backend_module(backend: str):
    """Import ``rwkv_ops.<backend>``, or raise ImportError with the exact install command."""
    name = f"rwkv_ops.{backend}"
    if name not in sys.modules and importlib.util.find_spec(name) is None:
        raise ImportError(
            f"rwkv-ops: the '{backend}' backend is selected (KERNEL_BACKEND / KERAS_BACKEND) but its "
            f"package is not installed: {install_command(backend)}  (or: pip install "
            f"'rwkv-ops[{backend}]')"
        )
    return importlib.import_module(name)


def _warn_once(env) -> None:
    if not _resolved.get("_warned"):
        _resolved["_warned"] = True
        for message in env.warnings:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        keras = sys.modules.get("keras")
        if keras is not None and env.keras_backend is not None:
            current = getattr(keras.config, "backend", lambda: None)()
            if current not in (None, env.keras_backend):
                warnings.warn(
                    f"rwkv-ops: Keras was imported before rwkv_ops with backend '{current}'; the "
                    f"operator follows KERNEL_BACKEND={env.backend}.",
                    RuntimeWarning,
                    stacklevel=4,
                )


def get_generalized_delta_rule(HEAD_SIZE=64, KERNEL_TYPE=None):
    """Return ``(op, RWKV7_USE_KERNEL)`` from the selected backend.

    KERNEL_TYPE None means the value of the KERNEL_TYPE environment variable (itself unset: the
    fastest available). See the backend's ``get_generalized_delta_rule`` for the errors.
    """
    env = environment()
    module = backend_module(env.backend)
    return module.get_generalized_delta_rule(
        HEAD_SIZE=HEAD_SIZE, KERNEL_TYPE=KERNEL_TYPE if KERNEL_TYPE is not None else env.kernel_type
    )


def resolve(name: str):
    """The value of ``rwkv_ops.<name>``: taken from the selected backend package once, then cached."""
    if name in _resolved:
        return _resolved[name]
    env = environment()
    _warn_once(env)
    module = backend_module(env.backend)
    if name in ("generalized_delta_rule", "rwkv7_op", "RWKV7_USE_KERNEL"):
        op, use_kernel = module.get_generalized_delta_rule(KERNEL_TYPE=env.kernel_type)
        _resolved.update(generalized_delta_rule=op, rwkv7_op=op, RWKV7_USE_KERNEL=use_kernel)
    else:
        # Every other name is the backend's own function of the same name (one face everywhere).
        table = {"BACKEND": env.backend, "KERNEL_TYPE": env.kernel_type,
                 "get_generalized_delta_rule": get_generalized_delta_rule}
        _resolved[name] = table[name] if name in table else getattr(module, name)
    return _resolved[name]
