"""Choosing a kernel type: the one rule every backend package follows.

A backend lists its kernel types fastest first, each with the reason it cannot run here (None when
it can). An explicit request that cannot run raises :class:`KernelUnavailableError` with that reason;
automatic selection takes the first that can run and says once when it skipped a faster one.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from rwkv_ops.common.environment import KERNEL_TYPES
from rwkv_ops.common.errors import KernelUnavailableError

_warned: set = set()


def warn_once(message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose_kernel_type(
    backend: str,
    requested: Optional[str],
    candidates: Sequence[tuple],
) -> str:
    """Return the kernel type to use.

    backend: the framework name, for messages. requested: "triton", "cuda", "native" or None
    (automatic). candidates: (kernel_type, reason it cannot run or None[, quiet]), fastest first;
    "native" must be present and runnable. ``quiet=True`` marks a reason that is no surprise (no GPU
    on this machine): automatic selection then skips that kernel without a warning.
    """
    candidates = [tuple(c) + (False,) * (3 - len(c)) for c in candidates]
    reasons = {name: reason for name, reason, _ in candidates}
    if requested is not None:
        if requested not in KERNEL_TYPES:
            raise ValueError(
                f"rwkv-ops: KERNEL_TYPE={requested!r} is not valid; valid values are: "
                f"{', '.join(KERNEL_TYPES)} (or None for the fastest available)."
            )
        if requested not in reasons:
            offered = ", ".join(name for name, _, _ in candidates)
            raise KernelUnavailableError(
                f"rwkv-ops: the {backend} backend has no '{requested}' implementation; it offers: "
                f"{offered}."
            )
        if reasons[requested] is not None:
            raise KernelUnavailableError(
                f"rwkv-ops: KERNEL_TYPE='{requested}' cannot run here with {backend}: "
                f"{reasons[requested]}."
            )
        return requested
    skipped = []
    for name, reason, quiet in candidates:
        if reason is None:
            if skipped and name == "native":
                why = "; ".join(f"{n}: {r}" for n, r in skipped)
                warn_once(f"rwkv-ops: {backend} falls back to the native implementation ({why}).")
            return name
        if not quiet:
            skipped.append((name, reason))
    raise KernelUnavailableError(f"rwkv-ops: no implementation of {backend} can run here.")
