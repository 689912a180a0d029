"""Chunked PyTorch implementation of the generalized delta rule, differentiated by autograd.

The algorithm, names and constants of ``rwkv_ops/numpy/native.py`` (read its docstring for the
derivation): chunks of L = 16 steps, lambda = -exp(w) clamped at ``-LAMBDA_FLOOR``, the four L x L
matrices A_qk, A_qb, A_ak, A_ab from anchored products, ``U = (I - A_ab)^-1 (A_ak V + a_s S_0^T)``,
masked triangle entries removed by selection. Two changes of form:

- Anchoring inside a chunk is per half chunk. Pairs with both steps in one half are anchored at that
  half's middle step (factors <= exp(L/4 * floor) = e^40 in float32), pairs across the halves at the
  boundary between them (factors <= 1). With one anchor at the chunk's middle, factors reach e^80,
  and the backward, which multiplies upstream gradients by them before the small factor, overflows
  float32 once those gradients reach ~1e4 (fp16 loss scaling does that); now it would take ~1e21.
- The outputs are computed inside the scan over chunks from the state entering each chunk:
  ``[U; Y] = [u0; A_qk V + A_qb u0] + [wa; r_s + A_qb wa] S_0^T``, then
  ``S_L = S_0 diag(exp(Lam_L)) + [V; U]^T [k_bar; b_bar]``. No K x K tensor per chunk is built
  (their memory traffic dominated on CPU), the Python loop over chunks runs two batched products per
  chunk, and autograd keeps one state per chunk for the backward, never one per token.

Gradient safety: exp(w) is only taken of ``w`` clamped at ``log(LAMBDA_FLOOR)``, so no inf * 0 = NaN
reaches a gradient; w = -inf gives lambda = 0 and a zero gradient; below the floor
:class:`ClampedLogDecay` returns the true decay's gradient rather than the clamp's zero. Steps past
T (padding to whole chunks) take w = -inf; masked steps get lambda = 0, k = 0, a = 0 (identity
steps) and a zero output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rwkv_ops.common import docs
from rwkv_ops.torch.api import check_torch_inputs

KERNEL_TYPE = "native"
SUPPORTED_HEAD_SIZES = None  # any K

CHUNK = 16
# |lambda| bound per compute dtype. Anchored factors stay below exp(CHUNK / 4 * floor) and masked
# products, dropped by selection, below exp(CHUNK / 2 * floor): finite (log(max float) ~ 88, 709).
LAMBDA_FLOOR = {torch.float32: 10.0, torch.float64: 80.0}


def unavailable_reason(head_size=None):
    """The native implementation runs everywhere torch does, for any head size."""
    return None, False


class ClampedLogDecay(torch.autograd.Function):
    """lambda = max(-exp(w), -floor), with the gradient of the unclamped decay.

    Below the floor (w > log(floor)) the forward uses d_c = exp(-floor) instead of the true
    d = exp(-exp(w)), and plain autograd would give dw = 0 there. The loss's gradient with respect
    to the decay, dl/dd = (dl/dlambda) / d_c, is still known, so the backward returns
    dl/dw = (dl/dlambda) / d_c * dd/dw = (dl/dlambda) * -exp(w - exp(w) + floor): small and finite
    (0 for very large w), and what the reference's gradient is to first order in d_c.
    """

    @staticmethod
    def forward(ctx, w, floor):
        lam = -torch.exp(w.clamp(max=math.log(floor)))
        ctx.save_for_backward(w, lam)
        ctx.floor = floor
        return lam

    @staticmethod
    def backward(ctx, grad):
        w, lam = ctx.saved_tensors
        floor = ctx.floor
        # Above the floor: w stops at 30, where exp(w - e^w) is already 0 (w = inf would give NaN).
        over = w.clamp(min=math.log(floor), max=30.0)
        slope_over = -torch.exp((over + floor) - torch.exp(over))
        return grad * torch.where(w <= math.log(floor), lam, slope_over), None


def compute_dtype(*dtypes):
    """float64 when any input is float64, else float32 (bf16 / fp16 inputs compute in float32)."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


def _to_chunks(x, NC):
    """[B, NC * L, H, K] -> [NC, B * H, L, K]: chunks first, so one chunk's slice is contiguous."""
    B, _, H, K = x.shape
    return x.reshape(B, NC, CHUNK, H, K).permute(1, 0, 3, 2, 4).reshape(NC, B * H, CHUNK, K)


def _assemble(diag, off, tri):
    """One L x L matrix from its two diagonal blocks [.., 2, h, h] (masked by ``tri``) and the block
    below them [.., h, h]; the block above is zero."""
    d = torch.where(tri, diag, 0.0)
    top = torch.cat([d[..., 0, :, :], torch.zeros_like(off)], -1)
    bottom = torch.cat([off, d[..., 1, :, :]], -1)
    return torch.cat([top, bottom], -2)


def chunked_forward(r, w, k, v, a, b, s0, mask=None):
    """The chunked forward on [B, T, H, K] tensors of the compute dtype (T >= 1).

    Args:
        r, w, k, v, a, b: [B, T, H, K], float32 or float64 (all the same).
        s0: [B, H, K, K] state, same dtype.
        mask: [B, T] bool or None.

    Returns:
        y [B, T, H, K] and the final state [B, H, K, K], both in the compute dtype.
    """
    cd = r.dtype
    B, T, H, K = r.shape
    L = CHUNK
    NC = -(-T // L)
    Tp = NC * L
    if Tp != T:
        pad = (0, 0, 0, 0, 0, Tp - T)
        r, k, v, a, b = (F.pad(x, pad) for x in (r, k, v, a, b))
        w = F.pad(w, pad, value=-math.inf)  # d = 1: padded steps leave S unchanged
    lam = ClampedLogDecay.apply(w, LAMBDA_FLOOR[cd])
    keep = None
    if mask is not None:
        keep = F.pad(mask, (0, Tp - T), value=False)[:, :, None, None]
        lam = torch.where(keep, lam, 0.0)
        k = torch.where(keep, k, 0.0)
        a = torch.where(keep, a, 0.0)

    r, lam, k, v, a, b = (_to_chunks(x, NC) for x in (r, lam, k, v, a, b))
    lam_in = lam.cumsum(-2)                    # Lam_i, inclusive
    lam_ex = lam_in - lam                      # Lam_{i-1}
    lam_end = lam_in[..., -1:, :]
    h = L // 2
    # Diagonal blocks (both steps in one half chunk), anchored at the middle step of that half: no
    # factor exceeds exp(h/2 * floor), which bounds what the backward multiplies gradients by.
    lam_h, lam_hx = lam_in.unflatten(-2, (2, h)), lam_ex.unflatten(-2, (2, h))
    lam_mid = lam_h[..., h // 2 - 1: h // 2, :]            # [NC, BH, 2, 1, K]
    grow = torch.exp(lam_mid - lam_h)
    q_t = r.unflatten(-2, (2, h)) * torch.exp(lam_h - lam_mid)
    a_t = a.unflatten(-2, (2, h)) * torch.exp(lam_hx - lam_mid)
    k_h = k.unflatten(-2, (2, h)) * grow
    b_h = b.unflatten(-2, (2, h)) * grow
    qa = torch.cat([q_t, a_t], -2)                         # [NC, BH, 2, 2h, K]: q rows, then a
    kb = torch.cat([k_h, b_h], -2)
    diag = qa @ kb.transpose(-1, -2)
    # The block below them (i in the second half, j in the first) moves both sides' anchors to the
    # boundary between the halves: exp(Lam_mid1 - Lam_cut) and exp(Lam_cut - Lam_mid0) are decays
    # (<= 1), and so is every factor of the result.
    lam_cut = lam_in[..., h - 1: h, :]
    qa_o = qa[..., 1, :, :] * torch.exp(lam_mid[..., 1, :, :] - lam_cut)
    kb_o = kb[..., 0, :, :] * torch.exp(lam_cut - lam_mid[..., 0, :, :])
    off = qa_o @ kb_o.transpose(-1, -2)
    # Rows of diag/off: q then a; columns: k then b. Entries above the diagonal are dropped by
    # selection (torch.where), never by multiplication.
    incl = torch.ones(h, h, dtype=torch.bool, device=r.device).tril()
    strict = incl.tril(-1)
    A_qk = _assemble(diag[..., :h, :h], off[..., :h, :h], incl)
    A_qb = _assemble(diag[..., :h, h:], off[..., :h, h:], incl)
    A_ak = _assemble(diag[..., h:, :h], off[..., h:, :h], strict)
    A_ab = _assemble(diag[..., h:, h:], off[..., h:, h:], strict)
    # Re-anchored at the chunk start (r_s, a_s) and end (k_bar, b_bar) by per-channel factors; the
    # results are inputs times decays (<= 1). Where a factor underflows to 0 the dropped terms are
    # below e^-45 of the inputs' scale.
    to_start = torch.exp(lam_mid)                            # [NC, BH, 2, 1, K]
    r_s = (q_t * to_start).flatten(-3, -2)
    a_s = (a_t * to_start).flatten(-3, -2)
    to_end = torch.exp(lam_end.unsqueeze(-3) - lam_mid)
    kb_bar = torch.cat([(k_h * to_end).flatten(-3, -2), (b_h * to_end).flatten(-3, -2)], -2)
    decay_end = torch.exp(lam_end)             # [NC, BH, 1, K]

    # A_ak V feeds the solve and A_qk V the outputs: one product for both.
    akv, qkv = (torch.cat([A_ak, A_qk], dim=-2) @ v).split(L, dim=-2)
    # (I - A_ab) is unit lower triangular: one solve for both right-hand sides.
    rhs = torch.cat([akv, a_s], dim=-1)
    sol = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True)
    u0, wa = sol.split(K, dim=-1)              # U = u0 + wa S_0^T
    qb_u0, qb_wa = (A_qb @ sol).split(K, dim=-1)

    # Y = r_s S_0^T + A_qk V + A_qb U regrouped so that S_0 enters through one product with U's:
    # [U; Y] = [u0; A_qk V + A_qb u0] + [wa; r_s + A_qb wa] S_0^T.
    base = torch.cat([u0, qkv + qb_u0], dim=-2)   # [NC, BH, 2L, V]
    lift = torch.cat([wa, r_s + qb_wa], dim=-2)   # [NC, BH, 2L, K]

    # Scan over chunks, S_L = S_0 diag(exp(Lam_L)) + [V; U]^T [k_bar; b_bar]. unbind and split, not
    # indexing: their backward is one stack or cat, that of an index op a full-size zero tensor.
    S = s0.reshape(B * H, K, K)
    ys = []
    per_chunk = (x.unbind(0) for x in (base, lift, v, kb_bar, decay_end))
    for base_c, lift_c, v_c, kb_c, d_c in zip(*per_chunk):
        u_c, y_c = torch.baddbmm(base_c, lift_c, S.transpose(-1, -2)).split(L, dim=1)
        ys.append(y_c)
        S = torch.baddbmm(S * d_c, torch.cat([v_c, u_c], dim=1).transpose(-1, -2), kb_c)
    y = torch.stack(ys, 0)                     # [NC, BH, L, V]
    y = y.reshape(NC, B, H, L, K).permute(1, 0, 3, 2, 4).reshape(B, Tp, H, K)
    if keep is not None:
        y = torch.where(keep, y, 0.0)
    return y[:, :T], S.reshape(B, H, K, K)


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    p = check_torch_inputs(r, w, k, v, a, b, initial_state, mask, head_first)
    out_dtype = r.dtype
    xs = (r, w, k, v, a, b)
    cd = compute_dtype(*(x.dtype for x in xs))
    if head_first:
        xs = tuple(x.transpose(1, 2) for x in xs)
    xs = tuple(x.to(cd) for x in xs)
    shape = (p.B, p.H, p.K, p.K)
    if initial_state is None:
        s0 = torch.zeros(shape, dtype=cd, device=r.device)
    else:
        s0 = initial_state.to(cd).expand(shape)
    if p.T == 0:
        y, state = xs[0], s0.clone()
    else:
        y, state = chunked_forward(*xs, s0, None if mask is None else mask != 0)
    if head_first:
        y = y.transpose(1, 2)
    return y.to(out_dtype).contiguous(), (state if output_final_state else None)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="PyTorch, native chunked implementation: any device, any K, differentiable",
    tensor="torch tensors",
    example="""    >>> import torch
    >>> from rwkv_ops.torch.native import generalized_delta_rule
    >>> r, w, k, v, a, b = torch.randn(6, 2, 32, 4, 64).unbind(0)
    >>> o, state = generalized_delta_rule(r, w, k, v, a, b)
    >>> o.shape, state.shape
    (torch.Size([2, 32, 4, 64]), torch.Size([2, 4, 64, 64]))""",
)
