"""Triton kernels of the activation-space ops (SiFT, FreeLB, SMART): kernels + launchers.

The math is fused_adv/_torch/activation.py's (the executable statement); read its docstrings.
Row-wise ops map each program to BLOCK_R consecutive rows ("tokens") of H elements held whole in
registers (BLOCK_H = next power of two >= H, so H <= MAX_H), with fp32 math (fp64 for fp64
inputs).  The per-sample FreeLB ops map a 2-D grid (sample, chunk of BLOCK elements) and reduce
the per-chunk partials with a deterministic torch sum (two phases; no atomics).  Guards are read
from device memory (``OK``), never from the host.  Every store rounds through
fused_adv._triton.kernel_math.cast_rn (the one bf16 rounding helper); names follow its scheme
(OPMATH: the math dtype, CHUNK_SIZE: elements per program of the per-sample kernels).  Works on
CPU under TRITON_INTERPRET=1 (the interpreter costs ~1 ms per program instance, so it gets bigger
tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_adv._triton.kernel_math import cast_rn, interpreting, nan_absmax

_INTERPRET = interpreting()
# elements per program for the row-wise kernels: 4096 fp32 values = 16 KB of registers per
# 4 warps on GPU; the interpreter prefers few, large programs.
_TILE = 1 << 16 if _INTERPRET else 4096
MAX_H = 1 << 16
# elements per program for the per-sample (FreeLB) kernels
CHUNK_SIZE = 1 << 16 if _INTERPRET else 4096


def _opmath(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _opmath_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_config(x: torch.Tensor):
    h = x.shape[-1]
    rows = x.numel() // h if h else 0
    if h > MAX_H:
        raise ValueError(f"fused_adv triton: rows of {h} elements exceed MAX_H={MAX_H}; use backend='torch'")
    block_h = triton.next_power_of_2(max(h, 1))
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), _TILE // block_h))
    num_warps = 4 if block_h * block_r <= 4096 else 8
    return rows, h, block_r, block_h, num_warps


def grad_ok(stats: torch.Tensor) -> torch.Tensor:
    # ‖g‖ finite <=> sum of the per-row squares finite; a device tensor, never read by the host
    return torch.isfinite(stats[:, 1].sum()).to(torch.int32).reshape(1)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _row_tile(ROWS, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """The [BLOCK_R, BLOCK_H] tile of a row-major [ROWS, H] tensor that this program owns (one
    row per tile row, the whole row in BLOCK_H >= H lanes): (rows, row mask, int64 offsets, mask)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < ROWS
    mask = rmask[:, None] & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    return rows, rmask, offs, mask


@triton.jit
def _ln_fwd_kernel(
    X,            # [ROWS, H] input, any float dtype
    DELTA,        # [ROWS, H] delta added after normalising (read only if HAS_DELTA)
    OUT,          # [ROWS, H] output, X's dtype
    MEAN, RSTD,   # [ROWS] statistics (OPMATH dtype) saved for the backward
    ROWS, H,      # sizes
    eps,          # LayerNorm epsilon
    HAS_DELTA: tl.constexpr, OPMATH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, rmask, offs, mask = _row_tile(ROWS, H, BLOCK_R, BLOCK_H)
    x = tl.load(X + offs, mask=mask, other=0.0).to(OPMATH)
    mean = tl.sum(x, axis=1) / H
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_DELTA:
        y += tl.load(DELTA + offs, mask=mask, other=0.0).to(OPMATH)
    tl.store(OUT + offs, cast_rn(y, OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(
    DY,           # [ROWS, H] gradient of the output
    X,            # [ROWS, H] forward input
    MEAN, RSTD,   # [ROWS] forward statistics
    DX,           # [ROWS, H] gradient of the input, X's dtype
    ROWS, H,
    OPMATH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, rmask, offs, mask = _row_tile(ROWS, H, BLOCK_R, BLOCK_H)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(OPMATH)
    x = tl.load(X + offs, mask=mask, other=0.0).to(OPMATH)
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0).to(OPMATH)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0).to(OPMATH)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    mg = tl.sum(dy, axis=1) / H
    mgx = tl.sum(dy * xhat, axis=1) / H
    dx = rstd[:, None] * (dy - mg[:, None] - xhat * mgx[:, None])
    tl.store(DX + offs, cast_rn(dx, DX.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats_kernel(
    X,            # [ROWS, H]
    STATS,        # [ROWS, 2] float32: (max |x| (NaN if any NaN), sum x^2)
    ROWS, H,
    OPMATH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, rmask, offs, mask = _row_tile(ROWS, H, BLOCK_R, BLOCK_H)
    x = tl.load(X + offs, mask=mask, other=0.0).to(OPMATH)
    amax = nan_absmax(x, 1)
    ss = tl.sum(x * x, axis=1)
    tl.store(STATS + rows * 2, amax.to(tl.float32), mask=rmask)
    tl.store(STATS + rows * 2 + 1, ss.to(tl.float32), mask=rmask)


@triton.jit
def _sift_perturb_kernel(
    XHAT,         # [N] normalised activations
    NOISE,        # [N] N(0, sigma) noise, any float dtype
    DELTA,        # [N] float32 out: clamp(noise, -bound, bound)
    OUT,          # [N] out: xhat + delta in XHAT's dtype
    N, bound,
    OPMATH: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    d = tl.load(NOISE + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.minimum(tl.maximum(d, -bound), bound)
    tl.store(DELTA + offs, d, mask=m)
    xh = tl.load(XHAT + offs, mask=m, other=0.0).to(OPMATH)
    tl.store(OUT + offs, cast_rn(xh + d.to(OPMATH), OUT.dtype.element_ty), mask=m)


@triton.jit
def _sift_update_kernel(
    DELTA,        # [ROWS, H] float32 (float64) delta, updated in place
    G,            # [ROWS, H] its gradient (same dtype)
    XHAT,         # [ROWS, H] normalised activations
    STATS,        # [ROWS, 2] (max|g|, sum g^2) from _row_stats_kernel
    OK,           # [1] int32: 1 if ‖g‖ is finite (device-side guard)
    OUT,          # [ROWS, H] out: xhat + delta in XHAT's dtype
    ROWS, H, lr,
    OPMATH: tl.constexpr, XOPMATH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, rmask, offs, mask = _row_tile(ROWS, H, BLOCK_R, BLOCK_H)
    ok = tl.load(OK)
    d = tl.load(DELTA + offs, mask=mask, other=0.0).to(OPMATH)
    g = tl.load(G + offs, mask=mask, other=0.0).to(OPMATH)
    gmax = tl.load(STATS + rows * 2, mask=rmask, other=0.0).to(OPMATH)
    new = d + lr * g / (1e-6 + gmax[:, None])
    d = tl.where(ok != 0, new, d)
    tl.store(DELTA + offs, cast_rn(d, DELTA.dtype.element_ty), mask=mask)
    xh = tl.load(XHAT + offs, mask=mask, other=0.0).to(XOPMATH)
    tl.store(OUT + offs, cast_rn(xh + d.to(XOPMATH), OUT.dtype.element_ty), mask=mask)


@triton.jit
def _smart_update_kernel(
    NOISE,        # [ROWS, H] noise, updated in place
    G,            # [ROWS, H] its gradient
    OK,           # [1] int32 device-side guard
    ROWS, H, step_size, epsilon,
    OPMATH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, rmask, offs, mask = _row_tile(ROWS, H, BLOCK_R, BLOCK_H)
    ok = tl.load(OK)
    n = tl.load(NOISE + offs, mask=mask, other=0.0).to(OPMATH)
    g = tl.load(G + offs, mask=mask, other=0.0).to(OPMATH)
    v = n + g * step_size
    vmax = tl.max(tl.abs(v), axis=1)  # masked lanes hold 0
    new = v / (vmax[:, None] + epsilon)
    n = tl.where(ok != 0, new, n)
    tl.store(NOISE + offs, cast_rn(n, NOISE.dtype.element_ty), mask=mask)


@triton.jit
def _freelb_reduce_kernel(
    D, G,         # [B, N] delta and its gradient
    PART,         # [B, NCHUNK, 3] OPMATH partials (sum g^2, sum d*g, sum d^2) or (max|g|, 0, 0)
    N, NCHUNK,
    LINF: tl.constexpr, OPMATH: tl.constexpr, BLOCK: tl.constexpr,
):
    # map (sample, chunk) to the BLOCK elements it reduces
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(G + b * N + offs, mask=m, other=0.0).to(OPMATH)
    out = PART + (b * NCHUNK + c) * 3
    if LINF:
        amax = nan_absmax(g, 0)
        tl.store(out, amax)
        tl.store(out + 1, amax * 0.0)
        tl.store(out + 2, amax * 0.0)
    else:
        d = tl.load(D + b * N + offs, mask=m, other=0.0).to(OPMATH)
        tl.store(out, tl.sum(g * g, axis=0))
        tl.store(out + 1, tl.sum(d * g, axis=0))
        tl.store(out + 2, tl.sum(d * d, axis=0))


@triton.jit
def _freelb_update_kernel(
    D,            # [B, N] delta, updated in place
    G,            # [B, N] its gradient
    STATS,        # [B, 3] float32 from freelb_reduce
    N, lr, max_norm,
    LINF: tl.constexpr, PROJECT: tl.constexpr, OPMATH: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    d = tl.load(D + b * N + offs, mask=m, other=0.0).to(OPMATH)
    g = tl.load(G + b * N + offs, mask=m, other=0.0).to(OPMATH)
    s0 = tl.load(STATS + b * 3).to(OPMATH)
    if LINF:
        den = tl.where(s0 < 1e-8, 1e-8, s0)  # clamp_min that keeps NaN, as torch.clamp
        new = d + lr * g / den
        if PROJECT:
            new = tl.where(new > max_norm, max_norm, tl.where(new < -max_norm, -max_norm, new))
    else:
        s1 = tl.load(STATS + b * 3 + 1).to(OPMATH)
        s2 = tl.load(STATS + b * 3 + 2).to(OPMATH)
        gn = tl.sqrt(s0)
        den = tl.where(gn < 1e-8, 1e-8, gn)
        new = d + lr * g / den
        if PROJECT:
            c = lr / den
            sq = s2 + 2 * c * s1 + c * c * s0  # ‖d + c g‖², analytically
            dn = tl.sqrt(tl.where(sq < 0, 0.0, sq))
            exceed = (dn > max_norm).to(OPMATH)
            new = new * (max_norm / dn * exceed + (1 - exceed))
    tl.store(D + b * N + offs, cast_rn(new, D.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launchers
def ln_delta_fwd(x, delta, eps):
    rows, h, br, bh, nw = _row_config(x)
    acc = _opmath_torch(x.dtype)
    out = torch.empty_like(x)
    mean = torch.empty(rows, dtype=acc, device=x.device)
    rstd = torch.empty(rows, dtype=acc, device=x.device)
    if rows:
        _ln_fwd_kernel[(triton.cdiv(rows, br),)](
            x, delta if delta is not None else x, out, mean, rstd, rows, h, eps,
            HAS_DELTA=delta is not None, OPMATH=_opmath(x.dtype), BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
    return out, mean, rstd


def ln_delta_bwd(grad_out, x, mean, rstd):
    rows, h, br, bh, nw = _row_config(x)
    dx = torch.empty_like(x)
    if rows:
        _ln_bwd_kernel[(triton.cdiv(rows, br),)](
            grad_out, x, mean, rstd, dx, rows, h, OPMATH=_opmath(x.dtype), BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
    return dx


def row_absmax_sumsq(x):
    rows, h, br, bh, nw = _row_config(x)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
    if rows:
        _row_stats_kernel[(triton.cdiv(rows, br),)](
            x, stats, rows, h, OPMATH=_opmath(x.dtype), BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
    return stats


def sift_perturb(xhat, noise, bound):
    n = xhat.numel()
    delta = torch.empty(xhat.shape, dtype=torch.float32, device=xhat.device)
    out = torch.empty_like(xhat)
    if n:
        block = min(CHUNK_SIZE, triton.next_power_of_2(n))
        _sift_perturb_kernel[(triton.cdiv(n, block),)](
            xhat, noise, delta, out, n, bound, OPMATH=_opmath(xhat.dtype), BLOCK=block, num_warps=4)
    return delta, out


def sift_update_(delta, grad, xhat, stats, lr):
    rows, h, br, bh, nw = _row_config(delta)
    out = torch.empty_like(xhat)
    if rows:
        _sift_update_kernel[(triton.cdiv(rows, br),)](
            delta, grad, xhat, stats, grad_ok(stats), out, rows, h, lr,
            OPMATH=_opmath(delta.dtype), XOPMATH=_opmath(xhat.dtype), BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
    return out


def smart_update_(noise, grad, stats, step_size, epsilon):
    rows, h, br, bh, nw = _row_config(noise)
    ok = grad_ok(stats)
    if rows:
        _smart_update_kernel[(triton.cdiv(rows, br),)](
            noise, grad, ok, rows, h, step_size, epsilon,
            OPMATH=_opmath(noise.dtype), BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
    return ok.reshape(()).to(torch.float32)


def _sample_config(delta):
    b = delta.shape[0]
    n = delta.numel() // b if b else 0
    block = min(CHUNK_SIZE, triton.next_power_of_2(max(n, 1)))
    return b, n, block, triton.cdiv(n, block)


def freelb_reduce(delta, grad, linf):
    b, n, block, nchunk = _sample_config(delta)
    acc = _opmath_torch(delta.dtype)
    if b == 0 or n == 0:
        return torch.zeros(b, 3, dtype=torch.float32, device=delta.device)
    part = torch.empty(b, nchunk, 3, dtype=acc, device=delta.device)
    _freelb_reduce_kernel[(b, nchunk)](delta, grad, part, n, nchunk, LINF=bool(linf), OPMATH=_opmath(delta.dtype),
                                       BLOCK=block, num_warps=4)
    if linf:
        stats = torch.zeros(b, 3, dtype=acc, device=delta.device)
        stats[:, 0] = part[:, :, 0].amax(1)  # NaN-propagating
    else:
        stats = part.sum(1)                  # fixed order: deterministic
    return stats.float()


def freelb_update_(delta, grad, stats, lr, max_norm, linf):
    b, n, block, nchunk = _sample_config(delta)
    if b == 0 or n == 0:
        return
    _freelb_update_kernel[(b, nchunk)](delta, grad, stats, n, lr, max_norm, LINF=bool(linf),
                                       PROJECT=max_norm > 0, OPMATH=_opmath(delta.dtype), BLOCK=block, num_warps=4)
