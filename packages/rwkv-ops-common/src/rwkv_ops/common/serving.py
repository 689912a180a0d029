"""Checks and messages of the serving entry points (decode step, variable-length batches,
inference-only op), written once for every backend like :mod:`rwkv_ops.common.validation`.

Framework-free: backends describe tensors with :class:`TensorInfo` and pass ``cu_seqlens`` as plain
Python ints (after reading them from the host), so nothing here imports numpy or a framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from rwkv_ops.common.validation import TensorInfo, _fmt, check_inputs


@dataclass(frozen=True)
class VarlenProblem:
    """The sizes of one variable-length call, after validation.

    N sequences packed along T: sequence n is steps ``starts[n] .. starts[n] + lengths[n] - 1`` of
    the packed [1, total_T, H, K] inputs; ``max_len`` is the longest length (0 when all are empty).
    """

    N: int
    total_T: int
    H: int
    K: int
    starts: tuple
    lengths: tuple
    max_len: int


def check_varlen_inputs(
    r: TensorInfo,
    w: TensorInfo,
    k: TensorInfo,
    v: TensorInfo,
    a: TensorInfo,
    b: TensorInfo,
    cu_seqlens: TensorInfo,
    cu_values: Sequence[int],
    initial_state: Optional[TensorInfo] = None,
) -> VarlenProblem:
    """Validate one call of ``generalized_delta_rule_varlen`` and return its sizes.

    ``cu_seqlens`` describes the boundaries' tensor (shape, dtype); ``cu_values`` are its values as
    Python ints. Raises ValueError for a packed batch other than 1, cu_seqlens of the wrong rank,
    not starting at 0, not ending at total_T or decreasing, and an initial state not [N, H, K, K];
    TypeError for non-integer cu_seqlens (and what :func:`check_inputs` raises for the six inputs).
    """
    p = check_inputs(r, w, k, v, a, b, None, None, False)
    if p.B != 1:
        raise ValueError(
            f"rwkv-ops: variable-length inputs are packed as [1, total_T, H, K], got `r` of shape "
            f"{_fmt(r.shape)} (batch {p.B}); concatenate the sequences along T and pass their "
            "boundaries in `cu_seqlens`."
        )
    integer = cu_seqlens.is_bool_or_integer and not cu_seqlens.dtype.startswith("bool")
    if not integer:
        raise TypeError(
            f"rwkv-ops: `cu_seqlens` must hold integers (int32 or int64), got {cu_seqlens.dtype}."
        )
    shape = tuple(int(s) for s in cu_seqlens.shape)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(
            f"rwkv-ops: `cu_seqlens` must be 1-D of length N + 1 (N >= 1 sequences: [0, end_1, ..., "
            f"total_T]), got shape {_fmt(shape)}."
        )
    cu = [int(c) for c in cu_values]
    listing = _short(cu)
    if cu[0] != 0 or cu[-1] != p.T:
        raise ValueError(
            f"rwkv-ops: `cu_seqlens` must start at 0 and end at total_T = {p.T} (the packed length "
            f"of `r`), got {listing}."
        )
    drops = [i for i in range(1, len(cu)) if cu[i] < cu[i - 1]]
    if drops:
        i = drops[0]
        raise ValueError(
            f"rwkv-ops: `cu_seqlens` must be non-decreasing (sequence boundaries), got {listing}: "
            f"entry {i} ({cu[i]}) is below entry {i - 1} ({cu[i - 1]})."
        )
    N = len(cu) - 1
    if initial_state is not None:
        expected = (N, p.H, p.K, p.K)
        got = tuple(int(s) for s in initial_state.shape)
        if got != expected:
            raise ValueError(
                f"rwkv-ops: `initial_state` has shape {_fmt(got)} but expected {_fmt(expected)}: "
                f"one [H, K, K] state per sequence of `cu_seqlens` (N = {N})."
            )
        if not initial_state.is_floating:
            raise TypeError(
                f"rwkv-ops: `initial_state` must have a floating dtype (float16, bfloat16, float32 "
                f"or float64), got {initial_state.dtype}."
            )
        if initial_state.device != r.device:
            raise ValueError(
                f"rwkv-ops: all inputs must be on one device, got r on {r.device}, initial_state on "
                f"{initial_state.device}."
            )
    lengths = tuple(cu[i + 1] - cu[i] for i in range(N))
    return VarlenProblem(N=N, total_T=p.T, H=p.H, K=p.K, starts=tuple(cu[:-1]), lengths=lengths,
                         max_len=max(lengths))


def _short(values: Sequence[int]) -> str:
    if len(values) <= 12:
        return "[" + ", ".join(str(v) for v in values) + "]"
    head = ", ".join(str(v) for v in values[:5])
    tail = ", ".join(str(v) for v in values[-5:])
    return f"[{head}, ..., {tail}] ({len(values)} entries)"


def cu_seqlens_not_concrete(backend: str) -> ValueError:
    """The error for boundaries that are only known at run time (traced / symbolic)."""
    return ValueError(
        f"rwkv-ops: {backend} needs concrete `cu_seqlens` values (a NumPy array, list or tuple, or "
        "an eager tensor), got a traced or symbolic one: the boundaries fix the launch size (the "
        "longest sequence) or the padded batch's shape. Inside jit / tf.function pass them as a "
        "static (closed-over) NumPy array."
    )


def single_step_sizes(shape, head_first: bool, has_mask: bool):
    """(B, H, K) when an inference call is one decode step, else None.

    One step: 4-d inputs with T = 1 and no mask; the inference entry points route it to the
    single-step update (starting from zeros when no initial state is given). ``shape`` is r's
    shape as a tuple (B may be None for a symbolic batch).
    """
    if len(shape) != 4 or has_mask or shape[2 if head_first else 1] != 1:
        return None
    return shape[0], shape[1 if head_first else 2], shape[3]


def inplace_unsupported(backend: str) -> ValueError:
    """The error for ``inplace=True`` outside PyTorch."""
    return ValueError(
        f"rwkv-ops: inplace=True is supported by the torch backend only; {backend} arrays are "
        "immutable here: use `o, state = rwkv7_op_rnn(..., state)` (under jax.jit, donate the "
        "state argument to reuse its buffer)."
    )


def check_inference_options(head_first: bool, has_mask: bool, has_cu_seqlens: bool) -> None:
    """Reject option combinations of ``generalized_delta_rule_inference`` that have no meaning."""
    if not has_cu_seqlens:
        return
    if head_first:
        raise ValueError(
            "rwkv-ops: `cu_seqlens` takes packed inputs [1, total_T, H, K]; head_first=True is not "
            "supported with it."
        )
    if has_mask:
        raise ValueError(
            "rwkv-ops: pass either `mask` (padded batch) or `cu_seqlens` (packed sequences), not "
            "both."
        )
