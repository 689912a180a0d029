"""Tests of the PyTorch `cuda` path: rwkv_ops.torch.cuda_launcher and its kernels in csrc/.

Without a GPU (CI):
- the CUDA kernel sources compile with this machine's nvcc for sm_80 and sm_90 (nothing runs), with
  no register spills, and the PyTorch binding compiles against the torch headers;
- the block programs of csrc/gdr_chunked.cuh run in the CPU emulation (csrc/gdr_emulate.cpp: every
  phase in a random thread order, NaN-filled shared memory) against the float64 reference;
- the custom ops' autograd and torch.compile(fullgraph=True) wiring run with the emulation
  registered as the ops' CPU kernel;
- availability reasons and the explicit-request errors.
With a GPU: the compiled kernels against the float64 reference (forward and backward), outputs
poisoned with NaN before every launch.

Inputs are fresh per run: the seed is printed and can be replayed with RWKV_OPS_TEST_SEED.
Tolerances (relative error ||x - ref|| / ||ref|| per tensor): float32 1e-5 with the model's decays,
2e-4 with decays down to 0; bfloat16 3e-3 and float16 1e-3 (one rounding of each output).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_ops.common import KernelUnavailableError, choose_kernel_type
from rwkv_ops.numpy.reference import (
    generalized_delta_rule_backward,
    generalized_delta_rule_reference,
)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, make_cotangents, make_inputs, rel_error,
                                    seed_from_env)
from rwkv_ops.torch import cuda_launcher as cl

SEED = seed_from_env()
print(f"test_cuda: seed {SEED} (replay with RWKV_OPS_TEST_SEED={SEED})")

CSRC = Path(cl.__file__).resolve().parent / "csrc"
NAMES = ("r", "w", "k", "v", "a", "b")
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "ds0")
TOL_DTYPE = {torch.float32: 1e-5, torch.bfloat16: 3e-3, torch.float16: 1e-3}

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU visible to PyTorch")


def _check(errors: dict, tol: float, what: str) -> None:
    bad = {k: v for k, v in errors.items() if not v <= tol}
    summary = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
    assert not bad, f"{what} (seed {SEED}): errors above {tol:.0e}: {summary}"


def _reference(x: dict, dy, dsT, head_first: bool):
    """Float64 reference forward and backward on the inputs of make_inputs."""
    args = [x[n] for n in NAMES]
    y, sT = generalized_delta_rule_reference(*args, x["initial_state"], head_first=head_first,
                                             mask=x["mask"])
    grads = generalized_delta_rule_backward(*args, x["initial_state"], do=dy, dfinal_state=dsT,
                                            head_first=head_first, mask=x["mask"])
    return y, sT, grads


# ---------------------------------------------------------------------------------------------
# The sources compile (no GPU needed)


def _nvcc():
    path = cl._nvcc_path()
    if path is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDA_HOME): compile checks skipped")
    return path


def _cuda_include_dir(nvcc: str):
    candidates = [os.path.join(cl._cuda_home() or "", "include"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"),
                  "/usr/local/cuda/include"]
    for path in candidates:
        if os.path.exists(os.path.join(path, "cuda_runtime_api.h")):
            return path
    pytest.skip("the CUDA headers (cuda_runtime_api.h) were not found next to nvcc")


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("K", [32, 64, 128])
def test_kernels_compile_with_nvcc(arch, K, tmp_path):
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", f"-DGDR_HEAD_SIZE={K}",
           "-Xptxas", "-v", f"-I{CSRC}", *(f"-I{p}" for p in cpp_extension.include_paths()),
           str(CSRC / "gdr_kernels.cu"), "-o", str(tmp_path / "gdr_kernels.cubin")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"nvcc failed:\n{done.stdout}\n{done.stderr}"
    report = done.stdout + done.stderr
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert len(spills) == 6, f"expected 6 kernels (fwd/bwd x 3 dtypes) in:\n{report}"
    assert all(s == "0" for s in spills), f"register spills in the K={K} kernels:\n{report}"


def test_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler found")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DGDR_HEAD_SIZE=64",
           "-DTORCH_EXTENSION_NAME=rwkv_ops_gdr_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-I{CSRC}", *(f"-I{p}" for p in cpp_extension.include_paths()),
           f"-I{sysconfig.get_paths()['include']}", f"-I{_cuda_include_dir(nvcc)}",
           str(CSRC / "gdr_binding.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"the binding does not compile:\n{done.stderr[-4000:]}"


# ---------------------------------------------------------------------------------------------
# The block programs, run by the CPU emulation


@pytest.fixture(scope="session")
def emulation(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler found: the CPU emulation of the kernels cannot be built")
    out = tmp_path_factory.mktemp("gdr_emulate") / "libgdr_emulate.so"
    done = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{CSRC}",
                           str(CSRC / "gdr_emulate.cpp"), "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(out))
    lib.gdr_shared_memory_bytes.restype = ctypes.c_longlong
    return lib


def _fptr(t):
    return None if t is None else ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


def _bptr(t):
    return None if t is None else ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_uint8))


def _emulate_forward(lib, xs, s0, mask, head_first, o, sT, ckpt, seed):
    B, T, H, K = cl._sizes(xs[0], head_first)
    ins = (ctypes.POINTER(ctypes.c_float) * 6)(*(_fptr(x) for x in xs))
    rc = lib.gdr_emulate_forward(K, ins, _fptr(o), _bptr(mask), _fptr(s0),
                                 0 if s0 is None else s0.shape[0], _fptr(sT), _fptr(ckpt), B, T, H,
                                 int(head_first), ctypes.c_uint(seed))
    assert rc == 0


def _emulate_backward(lib, xs, dy, mask, ckpt, dsT, grads, ds0, head_first, seed):
    B, T, H, K = cl._sizes(xs[0], head_first)
    ins = (ctypes.POINTER(ctypes.c_float) * 6)(*(_fptr(x) for x in xs))
    outs = (ctypes.POINTER(ctypes.c_float) * 6)(*(_fptr(g) for g in grads))
    rc = lib.gdr_emulate_backward(K, ins, _fptr(dy), _bptr(mask), _fptr(ckpt), _fptr(dsT), outs,
                                  _fptr(ds0), B, T, H, int(head_first), ctypes.c_uint(seed))
    assert rc == 0


def _nan(shape):
    return torch.full(shape, float("nan"), dtype=torch.float32)


def _run_emulation(lib, x, dy, dsT, head_first, order_seed):
    """Forward + backward of the block programs on float32 copies of make_inputs' arrays."""
    xs = [torch.tensor(x[n], dtype=torch.float32).contiguous() for n in NAMES]
    B, T, H, K = cl._sizes(xs[0], head_first)
    NC = (T + cl.CHUNK - 1) // cl.CHUNK
    s0 = None if x["initial_state"] is None else torch.tensor(x["initial_state"], dtype=torch.float32)
    mask = None if x["mask"] is None else torch.tensor(x["mask"].astype(np.uint8))
    o, sT, ckpt = _nan(xs[0].shape), _nan((B, H, K, K)), _nan((B, H, NC, K, K))
    _emulate_forward(lib, xs, s0, mask, head_first, o, sT, ckpt, order_seed)
    grads = [_nan(xs[0].shape) for _ in range(6)]
    ds0 = _nan((B, H, K, K))
    _emulate_backward(lib, xs, torch.tensor(dy, dtype=torch.float32),
                      mask, ckpt, torch.tensor(dsT, dtype=torch.float32), grads, ds0, head_first,
                      order_seed + 1)
    if s0 is not None and s0.shape[0] == 1 and B > 1:
        ds0 = ds0.sum(0, keepdim=True)
    return o, sT, grads + [ds0 if s0 is not None else None]


EMULATED_CASES = [
    dict(K=32, T=1),
    dict(K=32, T=15),
    dict(K=32, T=16, mask="random"),
    dict(K=32, T=17, head_first=True),
    dict(K=32, T=100, decays="full", mask="left"),
    dict(K=32, T=40, initial_state=False, mask="right"),
    dict(K=64, T=33, state_batch=1, B=3),
    dict(K=64, T=50, decays="full", head_first=True),
    dict(K=128, T=20, H=1),
    dict(K=128, T=35, H=1, decays="full", mask="random"),
]


@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_emulated_block_programs_match_reference(emulation, case):
    case = dict(case)
    K, T = case.pop("K"), case.pop("T")
    B, H = case.pop("B", 2), case.pop("H", 2)
    decays, head_first = case.get("decays", "model"), case.get("head_first", False)
    x = make_inputs(B, T, H, K, seed=SEED, **case)
    o_shape = x["r"].shape
    dy, dsT = make_cotangents(o_shape, (B, H, K, K), seed=SEED)
    y_ref, sT_ref, g_ref = _reference(x, dy, dsT, head_first)
    o, sT, grads = _run_emulation(emulation, x, dy, dsT, head_first, order_seed=SEED % 1000)
    errors = {"y": rel_error(o, y_ref), "final_state": rel_error(sT, sT_ref)}
    for name, g, ref in zip(GRAD_NAMES, grads, g_ref):
        if ref is not None:
            errors[name] = rel_error(g, ref)
    _check(errors, FLOAT32_TOL[decays], f"emulated K={K} T={T} {case}")


def test_emulated_results_do_not_depend_on_thread_order(emulation):
    """A phase that reads what another thread writes in the same phase would race on the GPU."""
    x = make_inputs(2, 37, 2, 32, seed=SEED, mask="random")
    dy, dsT = make_cotangents(x["r"].shape, (2, 2, 32, 32), seed=SEED)
    first = _run_emulation(emulation, x, dy, dsT, False, order_seed=1)
    second = _run_emulation(emulation, x, dy, dsT, False, order_seed=2)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("K", cl.SUPPORTED_HEAD_SIZES)
def test_shared_memory_mirror_matches_kernels(emulation, K):
    kernels = max(emulation.gdr_shared_memory_bytes(K, 0), emulation.gdr_shared_memory_bytes(K, 1))
    assert cl.shared_memory_bytes(K) == kernels
    # Every head size fits the 163 KB per block of an A100 (sm_80) and the 227 KB of an H100.
    assert kernels <= 166912


# ---------------------------------------------------------------------------------------------
# Availability and errors


def test_unavailable_reason_on_this_machine():
    reason, quiet = cl.unavailable_reason(64)
    if not HAS_CUDA:
        assert (reason, quiet) == ("no CUDA GPU is visible to PyTorch", True)
    else:
        assert reason is None or "nvcc" in reason or "ninja" in reason
    if reason is None:
        bad, quiet = cl.unavailable_reason(48)
        assert "32, 64, 128" in bad and "K = 48" in bad and not quiet


def test_explicit_request_names_the_reason():
    reason, quiet = cl.unavailable_reason(64)
    candidates = [("cuda", reason, quiet), ("native", None)]
    if reason is None:
        assert choose_kernel_type("torch", "cuda", candidates) == "cuda"
    else:
        with pytest.raises(KernelUnavailableError, match=re.escape(reason)):
            choose_kernel_type("torch", "cuda", candidates)


def test_cpu_tensors_and_unsupported_head_size_are_clear_errors(monkeypatch):
    x = [torch.randn(1, 4, 1, 48) for _ in NAMES]
    with pytest.raises(KernelUnavailableError, match="CUDA kernels need CUDA tensors, got tensors on cpu"):
        cl.generalized_delta_rule(*x)
    monkeypatch.setattr(cl, "_check_device", lambda r: None)
    with pytest.raises(KernelUnavailableError, match=r"K in \{32, 64, 128\}, got K = 48"):
        cl.generalized_delta_rule(*x)
    with pytest.raises(ValueError, match="`k` has shape"):
        cl.generalized_delta_rule(x[0], x[1], torch.randn(1, 4, 1, 32), *x[3:])


# ---------------------------------------------------------------------------------------------
# The custom ops' autograd and torch.compile wiring, with the emulation as their CPU kernel


@pytest.fixture()
def emulated_ops(emulation, monkeypatch):
    """Registers the CPU emulation as the CPU kernel of both custom ops (float32 only)."""
    if not getattr(cl, "_emulation_registered", False):
        def fwd_cpu(r, w, k, v, a, b, s0, mask, head_first, save_checkpoints):
            B, T, H, K = cl._sizes(r, head_first)
            NC = (T + cl.CHUNK - 1) // cl.CHUNK
            o = cl._empty(r.shape, dtype=r.dtype)
            sT = cl._empty((B, H, K, K), dtype=torch.float32)
            ckpt = cl._empty((B, H, NC, K, K) if save_checkpoints else (0,), dtype=torch.float32)
            _emulate_forward(emulation, (r, w, k, v, a, b), s0, mask, head_first, o, sT,
                             ckpt if save_checkpoints else None, 5)
            return o, sT, ckpt

        def bwd_cpu(r, w, k, v, a, b, do, checkpoints, dsT, mask, head_first, want_ds0):
            B, T, H, K = cl._sizes(r, head_first)
            grads = [cl._empty(r.shape, dtype=r.dtype) for _ in range(6)]
            ds0 = cl._empty((B, H, K, K) if want_ds0 else (0,), dtype=torch.float32)
            _emulate_backward(emulation, (r, w, k, v, a, b), do.contiguous(), mask, checkpoints,
                              None if dsT is None else dsT.contiguous(), grads,
                              ds0 if want_ds0 else None, head_first, 6)
            return (*grads, ds0)

        torch.library.register_kernel("rwkv_ops::cuda_gdr_fwd", "cpu", fwd_cpu)
        torch.library.register_kernel("rwkv_ops::cuda_gdr_bwd", "cpu", bwd_cpu)
        cl._emulation_registered = True
    monkeypatch.setattr(cl, "_check_device", lambda r: None)
    monkeypatch.setattr(cl, "_empty", _nan_empty)


def _nan_empty(*shape, **kw):
    out = torch.empty(*shape, **kw)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


def _torch_case(B, T, H, K, *, dtype, device, head_first=False, decays="model", state_batch=None,
                mask=None, initial_state=True):
    x = make_inputs(B, T, H, K, seed=SEED, decays=decays, head_first=head_first,
                    state_batch=state_batch, mask=mask, initial_state=initial_state)
    ts = {n: torch.tensor(x[n]).to(device=device, dtype=dtype).requires_grad_() for n in NAMES}
    s0 = None
    if x["initial_state"] is not None:
        s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=device).requires_grad_()
    m = None if x["mask"] is None else torch.tensor(x["mask"], device=device)
    # The reference sees exactly what the kernel sees: the inputs rounded to `dtype`.
    for n in NAMES:
        x[n] = _np(ts[n])
    return x, ts, s0, m


def _torch_run(op, ts, s0, m, head_first, dy, dsT):
    o, sT = op(*(ts[n] for n in NAMES), s0, True, head_first, mask=m)
    inputs = [ts[n] for n in NAMES] + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad((o, sT), inputs, (dy, dsT))
    grads = list(grads) + ([None] if s0 is None else [])
    return o, sT, grads


def _np(t):
    return t.detach().double().cpu().numpy()


def _compare(x, o, sT, grads, dy, dsT, head_first):
    y_ref, sT_ref, g_ref = _reference(x, _np(dy), _np(dsT), head_first)
    errors = {"y": rel_error(_np(o), y_ref), "final_state": rel_error(_np(sT), sT_ref)}
    for name, g, ref in zip(GRAD_NAMES, grads, g_ref):
        if ref is not None:
            errors[name] = rel_error(_np(g), ref)
    return errors


@pytest.mark.parametrize("case", [dict(T=20), dict(T=33, head_first=True, mask="random"),
                                  dict(T=18, state_batch=1, B=3), dict(T=5, initial_state=False)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_custom_op_autograd_with_emulated_kernels(emulated_ops, case):
    case = dict(case)
    T, B = case.pop("T"), case.pop("B", 2)
    head_first = case.get("head_first", False)
    x, ts, s0, m = _torch_case(B, T, 2, 32, dtype=torch.float32, device="cpu", **case)
    dy, dsT = (torch.tensor(c, dtype=torch.float32)
               for c in make_cotangents(ts["r"].shape, (B, 2, 32, 32), seed=SEED))
    o, sT, grads = _torch_run(cl.generalized_delta_rule, ts, s0, m, head_first, dy, dsT)
    _check(_compare(x, o, sT, grads, dy, dsT, head_first), 1e-5, f"custom op {case}")


def test_dtypes_empty_sequence_and_final_state_flag(emulated_ops):
    x, ts, s0, _ = _torch_case(2, 9, 2, 32, dtype=torch.float64, device="cpu")
    o, sT = cl.generalized_delta_rule(*(ts[n] for n in NAMES), s0)
    assert o.dtype == torch.float64 and sT.dtype == torch.float64
    y_ref, sT_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    assert rel_error(o.detach().numpy(), y_ref) < 1e-5
    o2, none = cl.generalized_delta_rule(*(ts[n] for n in NAMES), s0, output_final_state=False)
    assert none is None and torch.equal(o2, o)
    empty = [t[:, :0] for t in (ts[n] for n in NAMES)]
    o0, s_out = cl.generalized_delta_rule(*empty, s0)
    assert o0.shape == (2, 0, 2, 32) and torch.equal(s_out, s0.detach().double())
    o0, s_out = cl.generalized_delta_rule(*empty)
    assert s_out.shape == (2, 2, 32, 32) and not s_out.any()


def test_torch_compile_fullgraph_with_emulated_kernels(emulated_ops):
    x, ts, s0, m = _torch_case(2, 19, 2, 32, dtype=torch.float32, device="cpu", mask="left")

    def loss(r, w, k, v, a, b, s0, m):
        o, sT = cl.generalized_delta_rule(r, w, k, v, a, b, s0, mask=m)
        return (o * o).sum() + (sT * sT.transpose(-1, -2)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    args = [ts[n] for n in NAMES] + [s0]
    eager = torch.autograd.grad(loss(*args, m), args)
    traced = torch.autograd.grad(compiled(*args, m), args)
    for a, b in zip(eager, traced):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The compiled kernels on a GPU


@pytest.fixture()
def poisoned(monkeypatch):
    monkeypatch.setattr(cl, "_empty", _nan_empty)


def _gpu_case(B, T, H, K, dtype, **kw):
    head_first = kw.get("head_first", False)
    x, ts, s0, m = _torch_case(B, T, H, K, dtype=dtype, device="cuda", **kw)
    dy, dsT = make_cotangents(ts["r"].shape, (B, H, K, K), seed=SEED)
    dy = torch.tensor(dy, device="cuda").to(dtype)
    dsT = torch.tensor(dsT, device="cuda", dtype=torch.float32)
    o, sT, grads = _torch_run(cl.generalized_delta_rule, ts, s0, m, head_first, dy, dsT)
    return _compare(x, o, sT, grads, dy, dsT, head_first)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 15, 16, 17, 1000])
@pytest.mark.parametrize("K", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_gpu_matches_reference(poisoned, dtype, K, T):
    if dtype == torch.float16 and K != 64:
        pytest.skip("float16 is covered at K = 64")
    errors = _gpu_case(2, T, 2, K, dtype)
    _check(errors, TOL_DTYPE[dtype], f"cuda {dtype} K={K} T={T}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(mask="left"), dict(mask="right"), dict(mask="random", head_first=True),
    dict(state_batch=1, B=3), dict(initial_state=False), dict(decays="full"),
    dict(decays="full", mask="random", K=128), dict(head_first=True, K=32, T=300),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gpu_options(poisoned, case):
    case = dict(case)
    B, T, K = case.pop("B", 2), case.pop("T", 100), case.pop("K", 64)
    errors = _gpu_case(B, T, 2, K, torch.float32, **case)
    _check(errors, FLOAT32_TOL[case.get("decays", "model")], f"cuda {case}")


@gpu
@pytest.mark.gpu
def test_gpu_is_deterministic(poisoned):
    _, ts, s0, m = _torch_case(2, 300, 3, 64, dtype=torch.bfloat16, device="cuda", mask="random")
    dy = torch.randn_like(ts["r"])
    dsT = torch.randn(2, 3, 64, 64, device="cuda")
    first = _torch_run(cl.generalized_delta_rule, ts, s0, m, False, dy, dsT)
    second = _torch_run(cl.generalized_delta_rule, ts, s0, m, False, dy, dsT)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b)


@gpu
@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(poisoned):
    _, ts, s0, m = _torch_case(2, 70, 2, 64, dtype=torch.bfloat16, device="cuda", mask="right")

    def loss(r, w, k, v, a, b, s0, m):
        o, sT = cl.generalized_delta_rule(r, w, k, v, a, b, s0, mask=m)
        return o.float().square().sum() + (sT * sT.transpose(-1, -2)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    args = [ts[n] for n in NAMES] + [s0]
    eager = torch.autograd.grad(loss(*args, m), args)
    traced = torch.autograd.grad(compiled(*args, m), args)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("K", cl.SUPPORTED_HEAD_SIZES)
def test_gpu_extension_reports_its_build(K):
    module = cl.load_extension(K)
    assert module.head_size == K
    need = max(module.forward_shared_memory, module.backward_shared_memory)
    assert need == cl.shared_memory_bytes(K)


@gpu
@pytest.mark.gpu
def test_gpu_second_process_uses_the_cache():
    cl.load_extension(32)
    code = ("from rwkv_ops.torch import cuda_launcher as cl; import torch; "
            "assert cl.load_extension(32).head_size == 32")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "compiling" not in done.stderr
