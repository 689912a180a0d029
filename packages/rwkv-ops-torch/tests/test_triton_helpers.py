"""The numerical claims of the shared Triton helpers (shared-kernels/triton/chunk_common.py),
each checked on its own against float64, with a bound that the naive alternative would miss.

Runs on the GPU when one is visible, otherwise in Triton's interpreter (conftest). The whole-op
tests (test_triton.py) cannot see these: at bf16 their tolerances are set by the outputs' own
rounding, far above the errors here.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from rwkv_ops.numpy.testing import seed_from_env
from rwkv_ops.torch._triton import chunk_common as cc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
L = 16
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")


def _seed(request) -> int:
    return seed_from_env() + zlib.crc32(request.node.name.encode()) % 1000


@triton.jit
def _step_sums_kernel(tri_ptr, x_ptr, out_ptr, N: tl.constexpr, PREC: tl.constexpr):
    rows = tl.arange(0, 16)
    cols = tl.arange(0, N)
    tri = tl.load(tri_ptr + rows[:, None] * 16 + rows[None, :])
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], cc.step_sums(tri, x, PREC))


@triton.jit
def _inverse_kernel(a_ptr, out_ptr, PREC: tl.constexpr):
    rows = tl.arange(0, 16)
    tile = rows[:, None] * 16 + rows[None, :]
    tl.store(out_ptr + tile, cc.unit_lower_inverse(tl.load(a_ptr + tile), PREC))


@triton.jit
def _roundings_kernel(x_ptr, away_ptr, even_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(away_ptr + offs, cc.tf32(x, "tf32"))
    tl.store(even_ptr + offs, cc.tf32_even(x, "tf32"))


@triton.jit
def _row_operand_kernel(x_ptr, y_ptr, fy, xo_ptr, inv_ptr, jx_ptr, jy_ptr, jinv_ptr,
                        R: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr):
    rows = tl.arange(0, R)
    tile = rows[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + tile)
    y = tl.load(y_ptr + tile)
    xo, inv = cc.row_operand(x, PREC)
    tl.store(xo_ptr + tile, xo.to(tl.float32))
    tl.store(inv_ptr + rows, inv)
    jx, jy, jinv = cc.joint_row_operands(x, y, fy, PREC)
    tl.store(jx_ptr + tile, jx.to(tl.float32))
    tl.store(jy_ptr + tile, jy.to(tl.float32))
    tl.store(jinv_ptr + rows, jinv)


def _tf32_np(x: np.ndarray, ties_even: bool) -> np.ndarray:
    """x (float32) rounded to 10 mantissa bits in numpy: ties away from zero, or to even."""
    bits = x.view(np.uint32).astype(np.uint64)
    add = 0xFFF + ((bits >> 13) & 1) if ties_even else 0x1000
    return ((bits + add) & 0xFFFFE000).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("which", ["inclusive", "strict_after"])
def test_step_sums_are_fp32_accurate(which, request):
    """step_sums (tf32 products) sums 16 steps as accurately as an fp32 cumsum: the summand is
    split into its tf32 rounding and the remainder. Summing the tf32 roundings alone is checked
    to miss the bound, so the test can fail."""
    seed = _seed(request)
    rng = np.random.default_rng(seed)
    N = 64
    # magnitudes over six decades and both signs, as the log decays and their gradients have
    x = (rng.standard_normal((L, N)) * 10.0 ** rng.uniform(-3, 3, (L, N))).astype(np.float32)
    i = np.arange(L)
    tri = (i[None, :] <= i[:, None]) if which == "inclusive" else (i[None, :] > i[:, None])
    tri = tri.astype(np.float32)
    out = torch.full((L, N), float("nan"), device=DEVICE)
    _step_sums_kernel[(1,)](torch.tensor(tri, device=DEVICE), torch.tensor(x, device=DEVICE), out,
                            N=N, PREC="tf32")
    exact = tri.astype(np.float64) @ x.astype(np.float64)
    scale = np.abs(tri) @ np.abs(x.astype(np.float64))      # the sum of the terms' magnitudes
    err = np.max(np.abs(out.cpu().numpy() - exact) / np.maximum(scale, 1e-30))
    naive = tri.astype(np.float64) @ _tf32_np(x, ties_even=False).astype(np.float64)
    naive_err = np.max(np.abs(naive - exact) / np.maximum(scale, 1e-30))
    # bound: 16 additions of at most 2^-23 each (a GPU's tensor cores may truncate them), 100x
    # below what the tf32 roundings alone give
    assert naive_err > 1e-4, f"seed={seed}: the bound cannot tell (tf32 alone {naive_err:.1e})"
    assert err <= 2e-6, f"seed={seed}: step_sums error {err:.2e} of the terms' magnitudes"


@pytest.mark.parametrize("prec, tol", [("ieee", 1e-5), ("tf32", 2e-3)])
def test_unit_lower_inverse(prec, tol, request):
    """(I - A)^-1 of a strictly lower triangular A, against float64 (relative Frobenius error)."""
    seed = _seed(request)
    rng = np.random.default_rng(seed)
    A = np.tril(rng.standard_normal((L, L)) * 0.3, -1).astype(np.float32)
    out = torch.full((L, L), float("nan"), device=DEVICE)
    _inverse_kernel[(1,)](torch.tensor(A, device=DEVICE), out, PREC=prec)
    exact = np.linalg.inv(np.eye(L) - A.astype(np.float64))
    err = np.linalg.norm(out.cpu().numpy() - exact) / np.linalg.norm(exact)
    assert err <= tol, f"seed={seed}: inverse error {err:.2e} ({prec})"


def test_tf32_roundings(request):
    """tf32 rounds to 10 mantissa bits with ties away from zero, tf32_even with ties to even,
    which is what an fp32 -> fp16 conversion does (the prep's stores rely on it); exact ties are
    included, where the two differ."""
    seed = _seed(request)
    rng = np.random.default_rng(seed)
    n = 1024
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 4, n)).astype(np.float32)
    bits = x.view(np.uint32).copy()
    bits[: n // 4] = (bits[: n // 4] & 0xFFFFE000) | 0x1000       # exact ties
    x = bits.view(np.float32)
    away = torch.full((n,), float("nan"), device=DEVICE)
    even = torch.full((n,), float("nan"), device=DEVICE)
    _roundings_kernel[(1,)](torch.tensor(x, device=DEVICE), away, even, N=n)
    away, even = away.cpu().numpy(), even.cpu().numpy()
    assert np.array_equal(away, _tf32_np(x, ties_even=False)), f"seed={seed}: tf32"
    assert np.array_equal(even, _tf32_np(x, ties_even=True)), f"seed={seed}: tf32_even"
    assert not np.array_equal(away, even), f"seed={seed}: no tie told the two apart"
    # in fp16's normal range, tf32_even is the fp16 conversion
    normal = (np.abs(x) >= 2.0 ** -14) & (np.abs(x) < 65504)
    as_fp16 = torch.tensor(x[normal]).to(torch.float16).to(torch.float32).numpy()
    assert np.array_equal(even[normal], as_fp16), f"seed={seed}: tf32_even against fp16"


def test_row_operands(request):
    """row_operand (tf32 mode) gives fp16 rows scaled by powers of two whose largest magnitude
    lies in [2^14, 2^15), and times the inverse scale they are the tf32 rounding (ties to even)
    of every entry within 2^28 of its row's largest, over rows 40 decades apart (an unscaled
    fp16 conversion overflows or flushes most of them). joint_row_operands scales two operands
    (the second times a factor) by one power of two per row. ieee mode: the values as they are."""
    seed = _seed(request)
    rng = np.random.default_rng(seed)
    R, N = 16, 64
    row_mag = 10.0 ** rng.uniform(-20, 20, (R, 1))
    x = (rng.standard_normal((R, N)) * row_mag).astype(np.float32)
    x[0, :8] = 0.0                     # zeros stay zeros
    y = (rng.standard_normal((R, N)) * row_mag * 10.0 ** rng.uniform(-3, 3, (R, 1))).astype(
        np.float32)
    fy = 2.0 ** -7
    for prec in ("tf32", "ieee"):
        outs = [torch.full((R, N), float("nan"), device=DEVICE) for _ in range(3)]
        invs = [torch.full((R,), float("nan"), device=DEVICE) for _ in range(2)]
        _row_operand_kernel[(1,)](torch.tensor(x, device=DEVICE), torch.tensor(y, device=DEVICE),
                                  fy, outs[0], invs[0], outs[1], outs[2], invs[1], R=R, N=N,
                                  PREC=prec)
        xo, jx, jy = (o.cpu().numpy() for o in outs)
        inv, jinv = (i.cpu().numpy() for i in invs)
        if prec == "ieee":
            assert np.array_equal(xo, x) and np.all(inv == 1.0), f"seed={seed}: ieee row_operand"
            assert np.array_equal(jx, x) and np.array_equal(jy, y * np.float32(fy))
            assert np.all(jinv == 1.0), f"seed={seed}: ieee joint_row_operands"
            continue
        yf = (y * np.float32(fy)).astype(np.float32)
        # the largest magnitude of each row, before and after scaling (joint: over both operands)
        joint = np.maximum(np.abs(x).max(axis=1), np.abs(yf).max(axis=1))
        joint_top = np.maximum(np.abs(jx).max(axis=1), np.abs(jy).max(axis=1))
        for name, op, scale, want, biggest, top in (
                ("row_operand", xo, inv, x, np.abs(x).max(axis=1), np.abs(xo).max(axis=1)),
                ("joint x", jx, jinv, x, joint, joint_top),
                ("joint y", jy, jinv, yf, joint, joint_top)):
            assert np.all(np.log2(scale) == np.round(np.log2(scale))), f"seed={seed}: {name} scale"
            assert np.all(np.isfinite(op)), f"seed={seed}: {name} overflowed"
            assert np.all((top >= 2.0 ** 14) & (top < 2.0 ** 15)), f"seed={seed}: {name} range"
            kept = np.abs(want) >= biggest[:, None] * 2.0 ** -28
            back = op.astype(np.float64) * scale[:, None]
            assert np.array_equal(back[kept], _tf32_np(want, ties_even=True)[kept]), (
                f"seed={seed}: {name} is not the tf32 rounding")
            if name != "joint y":
                assert np.all(back[0, :8] == 0.0), f"seed={seed}: {name} zeros"
