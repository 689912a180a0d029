"""The PyTorch ``cuda`` path: hand-written CUDA C++ kernels, compiled on first use.

The kernels (``csrc/``) implement the chunked forward and backward of ALGORITHM.md section 2 with
fp32 state, checkpoints and arithmetic for bf16 / fp16 / fp32 inputs: one thread block per
(batch, head), chunks of 16 steps, the state in shared memory. ``csrc/gdr_chunked.cuh`` holds the
maths as block programs that also run on the CPU through ``csrc/gdr_emulate.cpp`` (tests only).

On first use for a head size, the extension is compiled with ``torch.utils.cpp_extension.load``
(nvcc + ninja) for the current GPU's architecture into a per-user cache
(``$XDG_CACHE_HOME/rwkv_ops/cuda`` or ``~/.cache/rwkv_ops/cuda``), keyed by head size, GPU
architecture, nvcc, torch and Python versions and a hash of the sources and flags. A file lock makes
concurrent first uses build once; the build happens in a temporary directory and the finished
library is renamed into place, so a crashed build never leaves a half-written library behind.

The operator is a ``torch.library`` custom op (``rwkv_ops::cuda_gdr_fwd`` and its backward
``rwkv_ops::cuda_gdr_bwd``) with fake implementations and registered autograd, so
``torch.compile(fullgraph=True)`` traces it without graph breaks; it never synchronises with the
host and only allocates through PyTorch, so it can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from rwkv_ops.common import KernelUnavailableError, check_head_size, docs
from rwkv_ops.common.validation import device_mismatch_reason
from rwkv_ops.torch.api import check_torch_inputs

KERNEL_TYPE = "cuda"
SUPPORTED_HEAD_SIZES = (32, 64, 128)
CHUNK = 16

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("gdr_binding.cpp", "gdr_kernels.cu")
_HEADERS = ("gdr_launch.h", "gdr_chunked.cuh")
# No --use_fast_math: it flushes denormals to zero and approximates expf, and tiny decays matter.
_CUDA_FLAGS = ("-O3",)
_CXX_FLAGS = ("-O3",)

# Every output buffer is allocated through this name, so tests can poison outputs with NaN.
_empty = torch.empty


# --------------------------------------------------------------------------------------------
# Availability (cheap: never compiles)


def _cuda_home() -> Optional[str]:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _nvcc_path() -> Optional[str]:
    home = _cuda_home()
    if home:
        for name in ("nvcc", "nvcc.exe"):
            path = os.path.join(home, "bin", name)
            if os.path.exists(path):
                return path
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def _nvcc_version() -> str:
    path = _nvcc_path()
    if path is None:
        return "none"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


def _ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


def shared_memory_bytes(head_size: int) -> int:
    """Dynamic shared memory per block of the larger of the two kernels (mirrors gdr_chunked.cuh)."""
    K, L = head_size, CHUNK
    sk = K + 4
    lk, vk, ll = L * sk, K * sk, L * (L + 4)
    forward = vk + 9 * lk + 4 * ll + 5 * K
    backward = (2 if K <= 64 else 1) * vk + 9 * lk + 8 * ll + 21 * K
    return 4 * max(forward, backward)


@functools.lru_cache(maxsize=None)
def _toolchain_reason() -> Tuple[Optional[str], bool]:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch", True
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support (the cuda kernels need an NVIDIA CUDA build)", True
    if _nvcc_path() is None:
        return (
            "the CUDA compiler nvcc was not found; install the CUDA toolkit with nvcc matching "
            f"PyTorch's CUDA {torch.version.cuda} (for example `conda install -c nvidia "
            f"cuda-nvcc={torch.version.cuda}` or NVIDIA's installer), or set CUDA_HOME to its "
            "location",
            False,
        )
    if not _ninja_available():
        return "the ninja build tool is missing: pip install ninja", False
    return None, False


def unavailable_reason(head_size: Optional[int] = None) -> Tuple[Optional[str], bool]:
    """Why the cuda kernels cannot run here, or None when they can; never compiles anything.

    Returns ``(reason, quiet)``: ``quiet`` is True when the reason is no surprise (no GPU), so that
    automatic kernel selection skips the cuda path without a warning.
    """
    reason, quiet = _toolchain_reason()
    if reason is not None:
        return reason, quiet
    if head_size is not None:
        reason = check_head_size(int(head_size), SUPPORTED_HEAD_SIZES, KERNEL_TYPE)
        if reason is not None:
            return reason, False
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        need, offered = shared_memory_bytes(int(head_size)), props.shared_memory_per_block_optin
        if offered < need:
            return (
                f"the cuda kernels for K = {head_size} need {need} bytes of shared memory per "
                f"block and this GPU ({props.name}) offers {offered}; use KERNEL_TYPE='triton' or "
                "'native'",
                False,
            )
    return None, False


# --------------------------------------------------------------------------------------------
# Build on first use


def cache_dir() -> Path:
    """Where compiled extensions are kept: $XDG_CACHE_HOME/rwkv_ops/cuda or ~/.cache/rwkv_ops/cuda."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "rwkv_ops" / "cuda"


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock held by this process (released by the OS if the process dies)."""
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; builds still land atomically
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _import_extension(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_key(head_size: int) -> Tuple[str, list, list]:
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    cuda_flags = [*_CUDA_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
                  f"-DGDR_HEAD_SIZE={head_size}"]
    cxx_flags = [*_CXX_FLAGS, f"-DGDR_HEAD_SIZE={head_size}"]
    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), _nvcc_version(),
                 sysconfig.get_config_var("SOABI") or sys.version, " ".join(cuda_flags),
                 " ".join(cxx_flags)):
        digest.update(part.encode() + b"\0")
    for source in (*_SOURCES, *_HEADERS):
        digest.update((_CSRC / source).read_bytes())
    name = f"rwkv_ops_gdr_k{head_size}_sm{arch}_{digest.hexdigest()[:16]}"
    return name, cuda_flags, cxx_flags


def _build(head_size: int):
    from torch.utils import cpp_extension

    name, cuda_flags, cxx_flags = _build_key(head_size)
    root = cache_dir()
    library = root / name / f"{name}.so"
    if library.exists():
        return _import_extension(name, library)
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{name}.lock"):
        if library.exists():  # another process built it while we waited
            return _import_extension(name, library)
        print(f"rwkv-ops: compiling the CUDA kernels for K={head_size} (first use, about a minute)...",
              file=sys.stderr, flush=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}.build-", dir=root))
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(_CSRC / s) for s in _SOURCES],
                extra_cflags=cxx_flags,
                extra_cuda_cflags=cuda_flags,
                extra_include_paths=[str(_CSRC)],
                build_directory=str(scratch),
                verbose=False,
            )
            library.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / f"{name}.so", library)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return module


_modules: dict = {}
_modules_lock = threading.Lock()


def load_extension(head_size: int):
    """The compiled extension for ``head_size`` (built on first use, then cached on disk)."""
    module = _modules.get(head_size)
    if module is None:
        with _modules_lock:
            module = _modules.get(head_size)
            if module is None:
                module = _modules[head_size] = _build(head_size)
    return module


# --------------------------------------------------------------------------------------------
# Custom ops


def _sizes(r: Tensor, head_first: bool):
    if head_first:
        B, H, T, K = r.shape
    else:
        B, T, H, K = r.shape
    return B, T, H, K


@torch.library.custom_op("rwkv_ops::cuda_gdr_fwd", mutates_args=(), device_types="cuda")
def _fwd_op(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
            s0: Optional[Tensor], mask: Optional[Tensor], head_first: bool,
            save_checkpoints: bool) -> Tuple[Tensor, Tensor, Tensor]:
    B, T, H, K = _sizes(r, head_first)
    NC = (T + CHUNK - 1) // CHUNK
    o = _empty(r.shape, dtype=r.dtype, device=r.device)
    sT = _empty((B, H, K, K), dtype=torch.float32, device=r.device)
    ckpt = _empty((B, H, NC, K, K) if save_checkpoints else (0,), dtype=torch.float32, device=r.device)
    load_extension(K).forward(r, w, k, v, a, b, s0, mask, head_first, o, sT,
                              ckpt if save_checkpoints else None)
    return o, sT, ckpt


@_fwd_op.register_fake
def _fwd_fake(r, w, k, v, a, b, s0, mask, head_first, save_checkpoints):
    B, T, H, K = _sizes(r, head_first)
    NC = (T + CHUNK - 1) // CHUNK
    return (r.new_empty(r.shape),
            r.new_empty((B, H, K, K), dtype=torch.float32),
            r.new_empty((B, H, NC, K, K) if save_checkpoints else (0,), dtype=torch.float32))


@torch.library.custom_op("rwkv_ops::cuda_gdr_bwd", mutates_args=(), device_types="cuda")
def _bwd_op(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, do: Tensor,
            checkpoints: Tensor, dsT: Optional[Tensor], mask: Optional[Tensor], head_first: bool,
            want_ds0: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, K = _sizes(r, head_first)
    grads = [_empty(r.shape, dtype=r.dtype, device=r.device) for _ in range(6)]
    ds0 = _empty((B, H, K, K) if want_ds0 else (0,), dtype=torch.float32, device=r.device)
    load_extension(K).backward(r, w, k, v, a, b, do.to(r.dtype).contiguous(), checkpoints,
                               None if dsT is None else dsT.to(torch.float32).contiguous(), mask,
                               head_first, *grads, ds0 if want_ds0 else None)
    return (*grads, ds0)


@_bwd_op.register_fake
def _bwd_fake(r, w, k, v, a, b, do, checkpoints, dsT, mask, head_first, want_ds0):
    B, T, H, K = _sizes(r, head_first)
    grads = [r.new_empty(r.shape) for _ in range(6)]
    return (*grads, r.new_empty((B, H, K, K) if want_ds0 else (0,), dtype=torch.float32))


def _fwd_setup_context(ctx, inputs, output):
    r, w, k, v, a, b, s0, mask, head_first, save_checkpoints = inputs
    ctx.save_for_backward(r, w, k, v, a, b, output[2], mask)
    ctx.head_first = head_first
    ctx.s0_batch = None if s0 is None else s0.shape[0]


def _fwd_backward(ctx, do, dsT, _dckpt):
    r, w, k, v, a, b, ckpt, mask = ctx.saved_tensors
    want_ds0 = ctx.s0_batch is not None and ctx.needs_input_grad[6]
    if do is None:
        do = torch.zeros_like(r)
    dr, dw, dk, dv, da, db, ds0 = _bwd_op(r, w, k, v, a, b, do, ckpt, dsT, mask, ctx.head_first,
                                          want_ds0)
    if not want_ds0:
        ds0 = None
    elif ctx.s0_batch == 1 and r.shape[0] != 1:
        ds0 = ds0.sum(0, keepdim=True)
    return dr, dw, dk, dv, da, db, ds0, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point


def _check_device(r: Tensor) -> None:
    if r.device.type != "cuda":
        raise KernelUnavailableError(
            f"rwkv-ops: KERNEL_TYPE='cuda' cannot run here with torch: "
            f"{device_mismatch_reason('CUDA', r.device)}.")


_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    p = check_torch_inputs(r, w, k, v, a, b, initial_state, mask, head_first)
    _check_device(r)
    reason = check_head_size(p.K, SUPPORTED_HEAD_SIZES, KERNEL_TYPE)
    if reason is not None:
        raise KernelUnavailableError(f"rwkv-ops: KERNEL_TYPE='cuda' cannot run here with torch: {reason}.")
    xs = (r, w, k, v, a, b)
    dtypes = {x.dtype for x in xs}
    # One kernel dtype for all six: theirs when they agree, else float32 (float64 computes in fp32).
    compute = r.dtype if len(dtypes) == 1 and r.dtype in _KERNEL_DTYPES else torch.float32
    state_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    if p.T == 0:
        o = r.new_zeros(r.shape)
        if not output_final_state:
            return o, None
        if s0 is None:
            return o, r.new_zeros((p.B, p.H, p.K, p.K), dtype=state_dtype)
        return o, s0.expand(p.B, p.H, p.K, p.K).to(state_dtype).clone()
    xs = [x.to(compute).contiguous() for x in xs]
    m = None if mask is None else (mask != 0).to(torch.uint8).contiguous()
    save = torch.is_grad_enabled() and (any(x.requires_grad for x in xs)
                                        or (s0 is not None and s0.requires_grad))
    o, sT, _ = _fwd_op(*xs, s0, m, head_first, save)
    o = o.to(r.dtype)
    return o, (sT.to(state_dtype) if output_final_state else None)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="PyTorch, hand-written CUDA kernels compiled on first use; K in {32, 64, 128}",
    tensor="CUDA torch tensors",
    example="""    >>> import torch
    >>> from rwkv_ops.torch.cuda_launcher import generalized_delta_rule
    >>> r, w, k, v, a, b = torch.randn(6, 2, 32, 4, 64, device="cuda").unbind(0)
    >>> o, state = generalized_delta_rule(r, -torch.exp(w), k, v, a, b)
    >>> o.shape, state.shape
    (torch.Size([2, 32, 4, 64]), torch.Size([2, 4, 64, 64]))""",
)
