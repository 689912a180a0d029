"""Shape, dtype and device checks of the operator's inputs, written once for every backend.

Each backend describes its tensors with :class:`TensorInfo` (shape, whether the dtype is floating,
the dtype's name, the device) and calls :func:`check_inputs`. The messages are the library's:
backends never write their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

INPUT_NAMES = ("r", "w", "k", "v", "a", "b")


@dataclass(frozen=True)
class TensorInfo:
    """What validation needs to know of one tensor, in framework-free terms."""

    shape: tuple
    is_floating: bool
    dtype: str
    device: str = "cpu"
    is_bool_or_integer: bool = False


@dataclass(frozen=True)
class Problem:
    """The sizes of one call, after validation.

    B, T, H, K: batch, sequence length, heads, head size (value size V equals K).
    state_batch: None without an initial state, else its leading size (1 broadcasts over B, or B).
    """

    B: int
    T: int
    H: int
    K: int
    head_first: bool
    state_batch: Optional[int]
    has_mask: bool

    @property
    def layout(self) -> str:
        return "[B, H, T, K]" if self.head_first else "[B, T, H, K]"


def _dim(size):
    """A size as an int when it is known; symbolic sizes (a JAX shape-polymorphic batch under
    Keras, a None batch in a TensorFlow graph) are kept as they are."""
    if size is None:
        return None
    try:
        return int(size)
    except Exception:  # jax InconclusiveDimensionOperation, TypeError, ...
        return size


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(_dim(s)) for s in shape) + "]"


def _check_floating(name: str, info: TensorInfo) -> None:
    if not info.is_floating:
        raise TypeError(
            f"rwkv-ops: `{name}` must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {info.dtype}."
        )


def check_inputs(
    r: TensorInfo,
    w: TensorInfo,
    k: TensorInfo,
    v: TensorInfo,
    a: TensorInfo,
    b: TensorInfo,
    initial_state: Optional[TensorInfo] = None,
    mask: Optional[TensorInfo] = None,
    head_first: bool = False,
) -> Problem:
    """Validate one call of ``generalized_delta_rule`` and return its sizes.

    Raises ValueError for shapes, ranks and devices that disagree (naming the argument, the shape
    received and the shape expected) and TypeError for non-floating inputs or a mask that is neither
    boolean, integer nor floating.
    """
    if not isinstance(head_first, bool):
        raise TypeError(f"rwkv-ops: `head_first` must be a bool, got {type(head_first).__name__}.")
    infos = dict(zip(INPUT_NAMES, (r, w, k, v, a, b)))
    layout = "[B, H, T, K]" if head_first else "[B, T, H, K]"
    if len(r.shape) != 4:
        raise ValueError(
            f"rwkv-ops: `r` must have rank 4 with layout {layout} (head_first={head_first}), "
            f"got shape {_fmt(r.shape)} (rank {len(r.shape)})."
        )
    for name, info in infos.items():
        if tuple(info.shape) != tuple(r.shape):
            extra = ""
            if name == "v" and len(info.shape) == 4 and tuple(info.shape[:3]) == tuple(r.shape[:3]):
                extra = " (the value size V must equal the head size K)"
            raise ValueError(
                f"rwkv-ops: `{name}` has shape {_fmt(info.shape)} but expected {_fmt(r.shape)}, "
                f"the shape of `r` ({layout}){extra}."
            )
    for name, info in infos.items():
        _check_floating(name, info)
    if head_first:
        B, H, T, K = (_dim(s) for s in r.shape)
    else:
        B, T, H, K = (_dim(s) for s in r.shape)
    if K == 0 or H == 0:
        raise ValueError(f"rwkv-ops: head size K and head count H must be >= 1, got shape {_fmt(r.shape)}.")

    devices = {name: info.device for name, info in infos.items()}
    state_batch = None
    if initial_state is not None:
        devices["initial_state"] = initial_state.device
        expected = (B, H, K, K)
        shape = tuple(_dim(s) for s in initial_state.shape)
        if len(shape) != 4 or shape[1:] != expected[1:] or shape[0] not in (1, B):
            alternative = "" if B == 1 else (
                f" or {_fmt((1, H, K, K))} (a leading 1 broadcasts over the batch)")
            raise ValueError(
                f"rwkv-ops: `initial_state` has shape {_fmt(shape)} but expected {_fmt(expected)}"
                f"{alternative}."
            )
        _check_floating("initial_state", initial_state)
        state_batch = shape[0]
    if mask is not None:
        devices["mask"] = mask.device
        shape = tuple(_dim(s) for s in mask.shape)
        if shape != (B, T):
            raise ValueError(
                f"rwkv-ops: `mask` has shape {_fmt(shape)} but expected {_fmt((B, T))} ([B, T]; "
                "1 or True marks a real token, 0 or False padding)."
            )
        if not (mask.is_floating or mask.is_bool_or_integer):
            raise TypeError(f"rwkv-ops: `mask` must be boolean, integer or floating, got {mask.dtype}.")
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"rwkv-ops: all inputs must be on one device, got {listing}.")
    return Problem(B=B, T=T, H=H, K=K, head_first=head_first, state_batch=state_batch,
                   has_mask=mask is not None)


def check_single_step_inputs(
    r: TensorInfo,
    w: TensorInfo,
    k: TensorInfo,
    v: TensorInfo,
    a: TensorInfo,
    b: TensorInfo,
    state: TensorInfo,
    head_first: bool = False,
) -> Problem:
    """Validate one decode step: the six inputs hold T = 1 and ``state`` is [B, H, K, K]."""
    problem = check_inputs(r, w, k, v, a, b, state, None, head_first)
    if problem.T != 1:
        layout = "[B, H, 1, K]" if head_first else "[B, 1, H, K]"
        raise ValueError(
            f"rwkv-ops: a single step takes inputs of layout {layout}, got `r` of shape "
            f"{_fmt(r.shape)} (T = {problem.T}); use generalized_delta_rule for T > 1."
        )
    return problem


def check_head_size(K: int, supported: Sequence[int], kernel_type: str) -> Optional[str]:
    """Return why ``kernel_type`` cannot run head size K (None when it can)."""
    if K in supported:
        return None
    sizes = ", ".join(str(s) for s in supported)
    return (
        f"the {kernel_type} kernels support head sizes K in {{{sizes}}}, got K = {K}; "
        "use KERNEL_TYPE='native' (any K) or leave KERNEL_TYPE unset to fall back automatically"
    )


def device_mismatch_reason(kernel_type: str, device: str, needed: str = "CUDA") -> str:
    """Why ``kernel_type`` cannot take tensors on ``device`` (for KernelUnavailableError)."""
    return f"the {kernel_type} kernels need {needed} tensors, got tensors on {device}"


def static_sizes_required(backend: str, shape, dim: int) -> ValueError:
    """The error for a size other than the batch that is unknown while tracing."""
    return ValueError(
        f"rwkv-ops: the {backend} backend needs static sizes T, H and K, got shape {shape} "
        f"(dimension {dim} unknown while tracing); only the batch size may be None."
    )
