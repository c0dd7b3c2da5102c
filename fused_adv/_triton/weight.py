"""Triton kernels for the weight-space ops (FGM, FGSM, PGD, AWP, restore).

Same names, signatures and math as fused_adv._torch.weight (the statement of the op math; read
its docstrings).  Per tensor i (P param, G grad, B backup), with all element math in float32
(float64 tensors: float64) and one rounding to P's dtype on store:

* multi_tensor_sumsq: sum(X^2)                                   reads X               (1 pass)
* pgd_reduce:    (G.G, (P-B).G, (P-B).(P-B)); first: (G.G, 0, 0) reads G (, P, B)      (1 or 3)
* fgm_perturb_:  [B <- P]; P <- P + G * (eps / ||G||) unless ||G|| is 0 or NaN
                                                    reads P, G; writes [B], P          (3 or 4)
* fgsm_perturb_: [B <- P]; P <- P + eps * sign(G)   reads P, G; writes [B], P          (3 or 4)
* pgd_perturb_:  [B <- P]; P <- B + s * (P + c*G - B) (torch.lerp's formula; first step:
                 P + (s*c)*G), c = alpha/||G||, s the analytic projection factor from ``stats``
                                                    reads P, G, (B unless first); writes [B], P (4)
* awp_perturb_:  [B <- P]; P <- min(max(P + G*f, lo), hi), NaN-propagating, box from B
                                                    reads P, G, (B unless first); writes [B], P (4)
* restore_:      P <- B, raw bits                   reads B; writes P                  (2)

A skipped tensor (guard false) costs only its backup copy, if any: it is neither read nor written
otherwise.

Per-tensor factors are computed on the device by every program of the tensor from the float32
statistics (zero/NaN guard included): nothing is read back by the host.  A tensor whose guard is
false is not written at all (bit-exact).  Backups are raw-bit copies.  Loads and stores move the
raw bits of the elements (unsigned integer pointers); see fused_adv._triton.multi_tensor for the
tables, grouping and launch configs.
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


def _eager(fn):
    """Runs the launcher eagerly under torch.compile (a clean graph break): the launch tables are
    built from real ``data_ptr()`` addresses, which fake tensors do not have, so these launchers
    cannot be traced (``torch.library.triton_op`` needs traceable launchers).  The compiled path
    for these ops is torch.ops.fused_adv.* with its fake impls."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


# op codes (constexpr)
SUMSQ, PGD_STATS = 0, 1
FGM, FGSM, PGD, AWP = 0, 1, 2, 3


# ---- phase 1 of the reductions ----------------------------------------------------------------

@device_function
def _reduce_tile(xp, gp, bp, offs, mask, acc0, acc1, acc2,
                 OP: tl.constexpr, FIRST: tl.constexpr, KIND: tl.constexpr, MASKED: tl.constexpr):
    if OP == 0:  # SUMSQ: xp is the only role
        x = to_float(load_bits(xp, offs, mask, MASKED), KIND)
        acc0 += x * x
    else:        # PGD_STATS: xp = P, gp = G, bp = B
        g = to_float(load_bits(gp, offs, mask, MASKED), KIND)
        acc0 += g * g
        if not FIRST:
            d = to_float(load_bits(xp, offs, mask, MASKED), KIND) - to_float(load_bits(bp, offs, mask, MASKED), KIND)
            acc1 += d * g
            acc2 += d * d
    return acc0, acc1, acc2


@triton.jit
def _reduce_kernel(
    chunks,                   # int64 [c_g, 2]: (tensor row, first element) of each chunk
    tens,                     # int64 [n_g, TS]: (call index, numel, addresses of the roles)
    part,                     # float64 [rows, NCOL]: row chunk_base + program id is written
    chunk_base,               # this group's first row in ``part``
    OP: tl.constexpr,         # SUMSQ (roles: X) or PGD_STATS (roles: P, G, B)
    FIRST: tl.constexpr,      # PGD_STATS on the first step: P == B, so only G is read
    KIND: tl.constexpr,       # element kind of the group (multi_tensor.F32/F16/BF16/F64)
    ALIGNED: tl.constexpr,    # every address is 16-byte aligned (vector loads)
    CHUNK_SIZE: tl.constexpr, # elements per program
    BLOCK: tl.constexpr,      # elements per tile
    TS: tl.constexpr,         # columns of ``tens``
    NCOL: tl.constexpr,       # 1 (SUMSQ) or 3 (PGD_STATS)
):
    # map the program id to its chunk: one tensor, elements [start, start + count)
    row, start, count = chunk_of(chunks, tens, TS, CHUNK_SIZE)
    xp = role_ptr(row, 0, KIND, ALIGNED)
    if OP == 0:
        gp = xp
        bp = xp
    else:
        gp = role_ptr(row, 1, KIND, ALIGNED)
        bp = role_ptr(row, 2, KIND, ALIGNED)
    acc0 = tl.full([BLOCK], 0, tl.float32)  # (tl.zeros is a jitted wrapper: slow in the interpreter)
    if KIND == 3:  # float64 tensors accumulate in float64 (as the torch backend)
        acc0 = acc0.to(tl.float64)
    acc1 = acc0
    acc2 = acc0
    # full tiles: no mask, so aligned addresses give 16-byte vector loads
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc0, acc1, acc2 = _reduce_tile(xp, gp, bp, offs, offs, acc0, acc1, acc2, OP, FIRST, KIND, False)
    if n_full * BLOCK < count:  # the tail tile
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        acc0, acc1, acc2 = _reduce_tile(xp, gp, bp, offs, offs < start + count, acc0, acc1, acc2,
                                        OP, FIRST, KIND, True)
    out = part + (chunk_base + tl.program_id(0).to(tl.int64)) * NCOL
    tl.store(out, block_sum(acc0, 0).to(tl.float64))
    if OP == 1:
        tl.store(out + 1, block_sum(acc1, 0).to(tl.float64))
        tl.store(out + 2, block_sum(acc2, 0).to(tl.float64))


def _reduce_plan(p: mt.Plan, op: int, first: bool) -> Tensor:
    """Both phases of a reduction over a plan (roles: [X] for SUMSQ, [P, G, B] for PGD_STATS)."""
    ncol = 1 if op == SUMSQ else 3
    part = mt.partials(p, ncol)
    with mt.quiet():
        for g in p.groups:
            if g.n_chunks == 0:  # only empty tensors: their ranges are empty, phase 2 gives 0
                continue
            _reduce_kernel[(g.n_chunks,)](
                g.chunks, g.tens, part, g.chunk_base, OP=op, FIRST=first, KIND=g.kind, ALIGNED=g.aligned,
                CHUNK_SIZE=g.config.chunk, BLOCK=g.config.block, TS=g.tens.shape[1], NCOL=ncol,
                num_warps=g.config.num_warps)
        return mt.finish(p, part, ncol)


@_eager
def multi_tensor_sumsq(tensors: list[Tensor]) -> Tensor:
    """float32[N]: sum of squares of each tensor (fp32 accumulation, fp64 for fp64 tensors).
    Two launches (one per dtype group, then one for phase 2) whatever N is."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return _reduce_plan(mt.plan([tensors]), SUMSQ, False).view(-1)


@_eager
def pgd_reduce(params: list[Tensor], grads: list[Tensor], backups: list[Tensor], first: bool) -> Tensor:
    """float32[N, 3]: (||G||^2, <P-B, G>, ||P-B||^2); columns 1-2 are 0 (P, B unread) when first."""
    if not params:
        return torch.empty(0, 3, dtype=torch.float32)
    return _reduce_plan(mt.plan([params, grads, backups]), PGD_STATS, bool(first))


# ---- the update pass ------------------------------------------------------------------------

@device_function
def _update_tile(pp, gp, bp, offs, mask, ok, fa, fb, eps,
                 OP: tl.constexpr, WRITE_B: tl.constexpr, GUARD: tl.constexpr, KIND: tl.constexpr,
                 MASKED: tl.constexpr):
    if WRITE_B:  # raw-bit backup, taken whether or not the tensor is updated
        pbits = load_bits(pp, offs, mask, MASKED)
        store_bits(bp, offs, pbits, mask, MASKED)
    if GUARD:
        do = ok
    else:
        do = True
    if do:  # a skipped tensor (guard false) is neither read nor written (beyond its backup)
        if not WRITE_B:
            pbits = load_bits(pp, offs, mask, MASKED)
        p = to_float(pbits, KIND)
        g = to_float(load_bits(gp, offs, mask, MASKED), KIND)
        if OP == 0:    # FGM: fa = eps / ||G||
            new = p + g * fa
        elif OP == 1:  # FGSM: sign as torch.sign (sign(0) = sign(NaN) = 0)
            sgn = (g > 0).to(g.dtype) - (g < 0).to(g.dtype)
            new = p + eps * sgn
        elif OP == 2:  # PGD: fa = c, fb = s.  P <- B + s*(P + c*G - B), as the torch backend:
            if WRITE_B:  # first step, B == P: P + (s*c)*G
                new = p + g * (fb * fa)
            else:        # torch.lerp(B, P + c*G, s): exact P + c*G when s == 1 (no projection)
                b = to_float(load_bits(bp, offs, mask, MASKED), KIND)
                end = p + g * fa
                diff = end - b
                new = tl.where(fb < 0.5, b + fb * diff, end - diff * (1.0 - fb))
        else:          # AWP: fa = adv_lr*(||P||+1e-6)/(||G||+1e-6); box from B rounded like the reference
            if WRITE_B:
                b = p
            else:
                b = to_float(load_bits(bp, offs, mask, MASKED), KIND)
            e = round_to(tl.abs(b) * eps, KIND)
            lo = round_to(b - e, KIND)
            hi = round_to(b + e, KIND)
            new = tl.minimum(tl.maximum(p + g * fa, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                             propagate_nan=tl.PropagateNan.ALL)
        store_bits(pp, offs, from_float(new, KIND), mask, MASKED)


@triton.jit
def _update_kernel(
    chunks,                   # int64 [c_g, 2]: (tensor row, first element) of each chunk
    tens,                     # int64 [n_g, 5]: (call index, numel, address of P, G, B)
    s0,                       # float32 stats: FGM/AWP grad_sumsq [N]; PGD stats [N, 3]
    s1,                       # float32 stats: AWP param_sumsq [N]
    F0,                       # FGM/FGSM epsilon, PGD alpha, AWP adv_lr (float32)
    F1,                       # PGD epsilon, AWP adv_eps (float32)
    E_HI, E_MID, E_LO,        # FGSM epsilon / AWP adv_eps as three float32 parts (exact double)
    OP: tl.constexpr,         # FGM, FGSM, PGD or AWP
    WRITE_B: tl.constexpr,    # B <- P (write_backup / first)
    KIND: tl.constexpr,       # element kind of the group
    ALIGNED: tl.constexpr,    # every address is 16-byte aligned (vector accesses)
    CHUNK_SIZE: tl.constexpr, # elements per program
    BLOCK: tl.constexpr,      # elements per tile
):
    row, start, count = chunk_of(chunks, tens, 5, CHUNK_SIZE)
    pp = role_ptr(row, 0, KIND, ALIGNED)
    gp = role_ptr(row, 1, KIND, ALIGNED)
    bp = role_ptr(row, 2, KIND, ALIGNED)
    t = tl.load(row)  # index of the tensor in the call: its statistics
    one = tl.full([], 1.0, tl.float32)
    zero = tl.full([], 0.0, tl.float32)
    # per-tensor factors, exactly as fused_adv._torch.weight and csrc/common/kernel_math.h's
    # *_factors compute them (float32 scalars;
    # ``x / n`` of a Python scalar by a tensor is ``n.reciprocal() * x`` in torch)
    ok = True
    fa = zero
    fb = one
    if OP == 0:
        n = tl.sqrt_rn(tl.load(s0 + t))
        ok = norm_ok(n)  # +inf is not skipped: factor 0, inf entries become NaN
        fa = tl.where(ok, tl.div_rn(one, n) * F0, zero)
    elif OP == 2:
        gg = tl.load(s0 + 3 * t)
        if WRITE_B:  # first step: d = P - B = 0 exactly
            dg = zero
            dd = zero
        else:
            dg = tl.load(s0 + 3 * t + 1)
            dd = tl.load(s0 + 3 * t + 2)
        n = tl.sqrt_rn(gg)
        ok = norm_ok(n)
        c = tl.where(ok, tl.div_rn(one, n) * F0, zero)
        # ||d + c G||^2 from the statistics (clamp_min(0) keeps NaN)
        r = tl.sqrt_rn(tl.maximum(dd + 2 * c * dg + c * c * gg, zero, propagate_nan=tl.PropagateNan.ALL))
        fa = c
        fb = tl.where(ok & (r > F1), tl.div_rn(one, r) * F1, one)
    elif OP == 3:
        n1 = tl.sqrt_rn(tl.load(s0 + t))
        n2 = tl.sqrt_rn(tl.load(s1 + t))
        ok = norm_ok(n1)
        fa = tl.where(ok, tl.div_rn(F0 * (n2 + 1e-6), n1 + 1e-6), zero)
    # FGSM's epsilon / AWP's adv_eps multiply elements: in the element math dtype (float64
    # tensors: the double the caller passed, rebuilt exactly from three float32 parts)
    if KIND == 3:
        # (0.0 + hi) + mid + lo: promotes the float32 parts to float64 (also in the interpreter,
        # where scalar args stay Python floats)
        eps = tl.full([], 0, tl.float64) + E_HI + E_MID + E_LO
    else:
        eps = E_HI
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        _update_tile(pp, gp, bp, offs, offs, ok, fa, fb, eps, OP, WRITE_B, OP != 1, KIND, False)
    if n_full * BLOCK < count:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        _update_tile(pp, gp, bp, offs, offs < start + count, ok, fa, fb, eps, OP, WRITE_B, OP != 1,
                     KIND, True)


def _split3(x: float) -> tuple[float, float, float]:
    """x == hi + mid + lo exactly (float64 sum), each part a float32 (for finite normal x)."""
    hi = np.float32(x)
    mid = np.float32(x - float(hi))
    lo = np.float32(x - float(hi) - float(mid))
    return float(hi), float(mid), float(lo)


def _update_plan(p: mt.Plan, op: int, write_b: bool, s0: Tensor | None = None,
                 s1: Tensor | None = None, f0: float = 0.0, f1: float = 0.0, e: float = 0.0) -> None:
    """The update pass over a plan with roles [P, G, B]: one launch per dtype group."""
    s0 = p.table if s0 is None else s0  # unused stat pointers still need a tensor argument
    s1 = p.table if s1 is None else s1
    e_hi, e_mid, e_lo = _split3(e)
    with mt.quiet():
        for g in p.groups:
            if g.n_chunks == 0:
                continue
            _update_kernel[(g.n_chunks,)](
                g.chunks, g.tens, s0, s1, float(f0), float(f1), e_hi, e_mid, e_lo,
                OP=op, WRITE_B=bool(write_b), KIND=g.kind, ALIGNED=g.aligned,
                CHUNK_SIZE=g.config.chunk, BLOCK=g.config.block, num_warps=g.config.num_warps)


def _update(params, grads, backups, op: int, write_b: bool, **scalars) -> None:
    _update_plan(mt.plan([params, grads, backups]), op, write_b, **scalars)


@_eager
def fgm_perturb_(params, grads, backups, grad_sumsq: Tensor, epsilon: float, write_backup: bool) -> None:
    """If write_backup: B <- P.  P <- P + G * (epsilon / sqrt(grad_sumsq[i])) unless that norm is 0
    or NaN (then P is not written).  One launch per dtype group."""
    if params:
        _update(params, grads, backups, FGM, write_backup, s0=grad_sumsq, f0=epsilon)


@_eager
def fgsm_perturb_(params, grads, backups, epsilon: float, write_backup: bool) -> None:
    """If write_backup: B <- P.  P <- P + epsilon * sign(G)."""
    if params:
        _update(params, grads, backups, FGSM, write_backup, f0=epsilon, e=epsilon)


@_eager
def pgd_perturb_(params, grads, backups, stats: Tensor, alpha: float, epsilon: float, first: bool) -> None:
    """If first: B <- P.  P <- B + s * (P + c * G - B), c = alpha/||G||, s = min(1, eps/||r||)
    from ``stats`` (pgd_reduce); tensors with ||G|| 0 or NaN are not written."""
    if params:
        _update(params, grads, backups, PGD, first, s0=stats, f0=alpha, f1=epsilon)


@_eager
def awp_perturb_(params, grads, backups, grad_sumsq: Tensor, param_sumsq: Tensor,
                 adv_lr: float, adv_eps: float, first: bool) -> None:
    """If first: B <- P.  P <- min(max(P + adv_lr*G/(||G||+1e-6)*(||P||+1e-6), lo), hi) with
    lo, hi = B -+ adv_eps*|B| (each op rounded to P's dtype); tensors with ||G|| 0 or NaN are not
    written."""
    if params:
        _update(params, grads, backups, AWP, first, s0=grad_sumsq, s1=param_sumsq, f0=adv_lr, f1=adv_eps,
                e=adv_eps)


# ---- restore ----------------------------------------------------------------------------------

@triton.jit
def _restore_kernel(
    chunks,                   # int64 [c_g, 2]: (tensor row, first element) of each chunk
    tens,                     # int64 [n_g, 4]: (call index, numel, address of P, B)
    KIND: tl.constexpr,       # element kind (only its width matters: raw bits are copied)
    ALIGNED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, start, count = chunk_of(chunks, tens, 4, CHUNK_SIZE)
    pp = role_ptr(row, 0, KIND, ALIGNED)
    bp = role_ptr(row, 1, KIND, ALIGNED)
    n_full = count // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        store_bits(pp, offs, load_bits(bp, offs, offs, False), offs, False)
    if n_full * BLOCK < count:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        m = offs < start + count
        store_bits(pp, offs, load_bits(bp, offs, m, True), m, True)


@_eager
def restore_(params, backups) -> None:
    """P <- B for every pair, bit-exact (raw bits).  One launch per dtype group."""
    if params:
        _restore_plan(mt.plan([params, backups]))


def _restore_plan(p: mt.Plan) -> None:
    """The copy pass over a plan with roles [P, B]."""
    for g in p.groups:
        if g.n_chunks:
            _restore_kernel[(g.n_chunks,)](g.chunks, g.tens, KIND=g.kind, ALIGNED=g.aligned,
                                           CHUNK_SIZE=g.config.chunk, BLOCK=g.config.block,
                                           num_warps=g.config.num_warps)
