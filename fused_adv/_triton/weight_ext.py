"""Triton kernels of the weight_ext ops (MI-FGSM, the AWP paper's perturb/restore).

Same names, signatures and math as fused_adv._torch.weight_ext (the statement of the op math; read
its docstring).  Per tensor i, element math in float32 (float64 tensors: float64):

* multi_tensor_abssum: sum(|X|)                                    reads X               (1 pass)
* mifgsm_perturb_: [B <- P]; M <- decay*M + G/n (first: G/n), stored in M's dtype;
                   P <- clamp(P + alpha*sign(M), B - eps, B + eps) (box rounded to P's dtype)
                   unless n = ||G||_1 is 0 or NaN     reads P, G, (M, B unless first); writes [B], M, P
* awp_paper_add_:  P <- P + coeff * round(f*D), f = ||W||/(scale*||D|| + 1e-20)*scale
                                                      reads P, D; writes P              (3)

Per-tensor factors and guards are computed on the device by every program from the float32
statistics (nothing read back by the host).  Launch tables, dtype/alignment groups and the
two-phase deterministic reduction are fused_adv._triton.multi_tensor's; raw-bit loads and stores
(bit-exact backups; bf16 rounding by kernel_math.from_float).  Scalars that multiply float64
elements travel as three float32 parts (exact double), as in fused_adv._triton.weight.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_adv._triton import multi_tensor as mt
from fused_adv._triton.kernel_math import block_sum, device_function, from_float, norm_ok, round_to, to_float
from fused_adv._triton.multi_tensor import chunk_of, load_bits, role_ptr, store_bits
from fused_adv._triton.weight import _eager, _split3


# ---- multi_tensor_abssum ------------------------------------------------------------------------

@triton.jit
def _abssum_kernel(
    chunks,                   # int64 [c_g, 2]: (tensor row, first element) of each chunk
    tens,                     # int64 [n_g, 3]: (call index, numel, address of X)
    part,                     # float64 [rows, 1]: row chunk_base + program id is written
    chunk_base,
    KIND: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, start, count = chunk_of(chunks, tens, 3, CHUNK_SIZE)
    xp = role_ptr(row, 0, KIND, ALIGNED)
    acc = tl.full([BLOCK], 0, tl.float32)
    if KIND == 3:  # float64 tensors accumulate in float64
        acc = acc.to(tl.float64)
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.abs(to_float(load_bits(xp, offs, offs, False), KIND))
    if n_full * BLOCK < count:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        acc += tl.abs(to_float(load_bits(xp, offs, offs < start + count, True), KIND))
    tl.store(part + chunk_base + tl.program_id(0).to(tl.int64), block_sum(acc, 0).to(tl.float64))


@_eager
def multi_tensor_abssum(tensors: list[Tensor]) -> Tensor:
    """float32[N]: sum of |x| of each tensor (fp32 accumulation, fp64 for fp64 tensors).  One launch
    per dtype group plus one for phase 2, whatever N is."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    p = mt.plan([tensors])
    part = mt.partials(p, 1)
    with mt.quiet():
        for g in p.groups:
            if g.n_chunks == 0:
                continue
            _abssum_kernel[(g.n_chunks,)](g.chunks, g.tens, part, g.chunk_base, KIND=g.kind, ALIGNED=g.aligned,
                                          CHUNK_SIZE=g.config.chunk, BLOCK=g.config.block,
                                          num_warps=g.config.num_warps)
        return mt.finish(p, part, 1).view(-1)


# ---- mifgsm_perturb_ ----------------------------------------------------------------------------

@device_function
def _mifgsm_tile(pp, gp, mp, bp, offs, mask, ok, n, a, e, d,
                 FIRST: tl.constexpr, KIND: tl.constexpr, MASKED: tl.constexpr):
    pbits = load_bits(pp, offs, mask, MASKED)
    if FIRST:  # raw-bit backup of every tensor, guarded or not
        store_bits(bp, offs, pbits, mask, MASKED)
    if ok:
        p = to_float(pbits, KIND)
        g = to_float(load_bits(gp, offs, mask, MASKED), KIND)
        if KIND == 3:
            step = g / n           # float64 division is correctly rounded
        else:
            step = tl.div_rn(g, n)  # as the reference's grad / norm (not g * (1/n))
        if not FIRST:
            step = d * to_float(load_bits(mp, offs, mask, MASKED), KIND) + step
        mbits = from_float(step, KIND)   # M lives in P's dtype; its sign is taken there
        m = to_float(mbits, KIND)
        sgn = (m > 0).to(m.dtype) - (m < 0).to(m.dtype)   # torch.sign: sign(0) = sign(NaN) = 0
        if FIRST:
            b = p
        else:
            b = to_float(load_bits(bp, offs, mask, MASKED), KIND)
        lo = round_to(b - e, KIND)
        hi = round_to(b + e, KIND)
        new = tl.minimum(tl.maximum(p + a * sgn, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                         propagate_nan=tl.PropagateNan.ALL)
        store_bits(mp, offs, mbits, mask, MASKED)
        store_bits(pp, offs, from_float(new, KIND), mask, MASKED)
    elif FIRST:  # skipped on the first step: the momentum starts at 0 (+0.0: all bits clear)
        store_bits(mp, offs, pbits ^ pbits, mask, MASKED)


@triton.jit
def _mifgsm_kernel(
    chunks,                   # int64 [c_g, 2]
    tens,                     # int64 [n_g, 6]: (call index, numel, address of P, G, M, B)
    s0,                       # float32 [N]: ||G||_1
    A_HI, A_MID, A_LO,        # alpha as three float32 parts
    E_HI, E_MID, E_LO,        # epsilon
    D_HI, D_MID, D_LO,        # decay
    FIRST: tl.constexpr,
    KIND: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, start, count = chunk_of(chunks, tens, 6, CHUNK_SIZE)
    pp = role_ptr(row, 0, KIND, ALIGNED)
    gp = role_ptr(row, 1, KIND, ALIGNED)
    mp = role_ptr(row, 2, KIND, ALIGNED)
    bp = role_ptr(row, 3, KIND, ALIGNED)
    n = tl.load(s0 + tl.load(row))
    ok = norm_ok(n)
    if KIND == 3:  # float64 elements: the doubles the caller passed, rebuilt exactly
        zero = tl.full([], 0, tl.float64)
        a = zero + A_HI + A_MID + A_LO
        e = zero + E_HI + E_MID + E_LO
        d = zero + D_HI + D_MID + D_LO
        n = n.to(tl.float64)
    else:
        a = A_HI
        e = E_HI
        d = D_HI
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        _mifgsm_tile(pp, gp, mp, bp, offs, offs, ok, n, a, e, d, FIRST, KIND, False)
    if n_full * BLOCK < count:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        _mifgsm_tile(pp, gp, mp, bp, offs, offs < start + count, ok, n, a, e, d, FIRST, KIND, True)


@_eager
def mifgsm_perturb_(params, grads, momenta, backups, grad_abssum: Tensor, alpha: float, epsilon: float,
                    decay: float, first: bool) -> None:
    """One MI-FGSM step (see the module docstring); one launch per dtype group."""
    if not params:
        return
    p = mt.plan([params, grads, momenta, backups])
    with mt.quiet():
        for g in p.groups:
            if g.n_chunks == 0:
                continue
            _mifgsm_kernel[(g.n_chunks,)](
                g.chunks, g.tens, grad_abssum, *_split3(alpha), *_split3(epsilon), *_split3(decay),
                FIRST=bool(first), KIND=g.kind, ALIGNED=g.aligned, CHUNK_SIZE=g.config.chunk,
                BLOCK=g.config.block, num_warps=g.config.num_warps)


# ---- awp_paper_add_ -----------------------------------------------------------------------------

@device_function
def _awp_paper_tile(pp, dp, offs, mask, f, c, KIND: tl.constexpr, MASKED: tl.constexpr):
    p = to_float(load_bits(pp, offs, mask, MASKED), KIND)
    diff = round_to(to_float(load_bits(dp, offs, mask, MASKED), KIND) * f, KIND)  # the paper's diff, in P's dtype
    store_bits(pp, offs, from_float(p + c * diff, KIND), mask, MASKED)


@triton.jit
def _awp_paper_kernel(
    chunks,                   # int64 [c_g, 2]
    tens,                     # int64 [n_g, 4]: (call index, numel, address of P, D)
    s0,                       # float32 [N]: ||W||^2
    s1,                       # float32 [N]: ||D||^2
    SCALE,                    # float32
    C_HI, C_MID, C_LO,        # coeff as three float32 parts
    KIND: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, start, count = chunk_of(chunks, tens, 4, CHUNK_SIZE)
    pp = role_ptr(row, 0, KIND, ALIGNED)
    dp = role_ptr(row, 1, KIND, ALIGNED)
    t = tl.load(row)
    # f = ||W|| / (scale*||D|| + 1e-20) * scale, float32, as csrc/common/weight_ext_math.h
    f = tl.div_rn(tl.sqrt_rn(tl.load(s0 + t)), SCALE * tl.sqrt_rn(tl.load(s1 + t)) + 1e-20) * SCALE
    if KIND == 3:
        c = tl.full([], 0, tl.float64) + C_HI + C_MID + C_LO
        f = f.to(tl.float64)
    else:
        c = C_HI
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        _awp_paper_tile(pp, dp, offs, offs, f, c, KIND, False)
    if n_full * BLOCK < count:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        _awp_paper_tile(pp, dp, offs, offs < start + count, f, c, KIND, True)


@_eager
def awp_paper_add_(params, dirs, param_sumsq: Tensor, dir_sumsq: Tensor, scale: float, coeff: float) -> None:
    """P <- P + coeff * round(f * D) (see the module docstring); one launch per dtype group."""
    if not params:
        return
    p = mt.plan([params, dirs])
    with mt.quiet():
        for g in p.groups:
            if g.n_chunks == 0:
                continue
            _awp_paper_kernel[(g.n_chunks,)](
                g.chunks, g.tens, param_sumsq, dir_sumsq, float(np.float32(scale)),
                *_split3(coeff), KIND=g.kind, ALIGNED=g.aligned, CHUNK_SIZE=g.config.chunk,
                BLOCK=g.config.block, num_warps=g.config.num_warps)
