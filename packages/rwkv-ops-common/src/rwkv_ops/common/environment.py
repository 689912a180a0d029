"""The environment variables of rwkv-ops (SPEC: KERNEL_BACKEND > KERAS_BACKEND > torch; KERNEL_TYPE).

Read once, by the dispatcher, when ``rwkv_ops`` is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

BACKENDS = ("torch", "jax", "tensorflow", "numpy")
KERNEL_TYPES = ("triton", "cuda", "native")
DEFAULT_BACKEND = "torch"

# The package that provides each backend, and the command that installs it.
BACKEND_PACKAGES = {name: f"rwkv-ops-{name}" for name in BACKENDS}


def install_command(backend: str) -> str:
    return f"pip install {BACKEND_PACKAGES[backend]}"


@dataclass(frozen=True)
class Environment:
    """What the variables ask for.

    backend: the operator's framework. kernel_type: None when unset (fastest available).
    keras_backend: the value KERAS_BACKEND must hold before Keras is imported (None: leave it).
    warnings: messages to show once (for example when KERNEL_BACKEND and KERAS_BACKEND differ).
    """

    backend: str
    kernel_type: Optional[str]
    keras_backend: Optional[str]
    warnings: tuple = field(default_factory=tuple)


def _read(environ: Mapping[str, str], name: str, valid: tuple) -> Optional[str]:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip().lower()
    if value not in valid:
        raise ValueError(
            f"rwkv-ops: {name}={raw!r} is not valid; valid values are: {', '.join(valid)}"
            + (" (or leave it unset for the fastest available)" if name == "KERNEL_TYPE" else "")
            + "."
        )
    return value


def read_environment(environ: Optional[Mapping[str, str]] = None) -> Environment:
    """Resolve KERNEL_BACKEND, KERAS_BACKEND and KERNEL_TYPE into one :class:`Environment`."""
    environ = os.environ if environ is None else environ
    kernel_backend = _read(environ, "KERNEL_BACKEND", BACKENDS)
    keras_backend = _read(environ, "KERAS_BACKEND", BACKENDS)
    kernel_type = _read(environ, "KERNEL_TYPE", KERNEL_TYPES)
    warnings = []
    set_keras = None
    if kernel_backend is not None:
        backend = kernel_backend
        if keras_backend is None:
            set_keras = kernel_backend
        elif keras_backend != kernel_backend:
            warnings.append(
                f"rwkv-ops: KERNEL_BACKEND={kernel_backend} and KERAS_BACKEND={keras_backend} differ; "
                f"the operator follows KERNEL_BACKEND ({kernel_backend}) and Keras runs on {keras_backend}."
            )
    elif keras_backend is not None:
        backend = keras_backend
    else:
        backend = DEFAULT_BACKEND
    return Environment(backend=backend, kernel_type=kernel_type, keras_backend=set_keras,
                       warnings=tuple(warnings))
