"""The ``torch`` backend of the weight-space ops: pure PyTorch, any device.

This file is also the executable statement of the op math that every other backend (cpp, cuda,
triton) implements; keep them in step.  Per tensor i (P param, G grad, B backup):

* all element math is done in float32 (float64 inputs stay float64) and rounded once to P's dtype
  when stored, except AWP's box, which is rounded to P's dtype after each op exactly as the
  reference computes it in P's dtype (e = adv_eps*|B|, lo = B - e, hi = B + e);
* per-tensor scalars (norms, factors) are float32 tensors on the device: the zero/NaN guard
  ``ok = (n != 0) & !isnan(n)`` is a device-side select, never a host read.  A skipped tensor
  is SELECTED unchanged (P stays bit for bit), not multiplied by a zero factor: 0 * NaN = NaN.

No function here syncs the host.  Backups are written by ``copy_`` so they are bit-exact.

Memory: whatever cannot be done in place (the fp32 math of fp16/bf16 tensors, AWP's box, PGD's
projected value) runs over flat pieces of at most :func:`piece_size` elements, so the transient
memory of a call is bounded by a few pieces, at most 0.25x the bytes of the tensors it updates
(for calls over 64 Ki elements; tests/test_weight_ops.py measures it), instead of up to 7x the
largest tensor (an fp32 copy of P, G, the box and the new value of a bf16 embedding).  The math
is elementwise, so the pieces give the same bits as whole tensors (NaN payloads aside: ATen
picks them per loop); the reductions add the pieces' float32 partials in float64.
Helper names match the kernels' (csrc/common/kernel_math.h, fused_adv/_triton/kernel_math.py):
``_opmath`` (opmath_t), ``norm_ok``; the per-tensor factors are the kernels' ``*_factors``.
"""
from __future__ import annotations

import torch
from torch import Tensor

_EMPTY_F32 = dict(dtype=torch.float32)


def _opmath(t: Tensor) -> Tensor:
    """t in its math dtype (opmath_t in csrc/common/kernel_math.h): float64 stays float64,
    everything else becomes float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _is_opmath(t: Tensor) -> bool:
    """Whether t is already in its math dtype (asking ``_opmath(t) is t`` would make the fp32 copy
    of an fp16/bf16 tensor just to answer)."""
    return t.dtype in (torch.float32, torch.float64)


def norm_ok(n: Tensor) -> Tensor:
    """The zero/NaN guard of every norm-scaled step: n != 0 and n is not NaN (+inf passes)."""
    return (n != 0) & ~torch.isnan(n)


# Pieces hold at most 1/64 of the call's elements (at least _PIECE_MIN: below that the per-piece
# op overhead dominates; at most _PIECE_MAX: 4 MiB of float32 per temporary is plenty to stream).
# The worst case, AWP on bf16, keeps ~26 bytes of temporaries per element of a piece alive
# (fp32 P, G, new value, lo, hi; bf16 e and lo): 26 / (64 * 2) = 0.2 of the bf16 weights.
_PIECE_MIN = 1 << 10
_PIECE_MAX = 1 << 20


def piece_size(tensors) -> int:
    """Elements per piece for a call over ``tensors`` (see the module docstring)."""
    total = sum(t.numel() for t in tensors)
    return max(_PIECE_MIN, min(_PIECE_MAX, total // 64))


def _pieces(size: int, *tensors: Tensor):
    """Tuples of matching flat views [k:k+size] of same-shaped contiguous tensors (writes to a
    view write the tensor)."""
    flats = [t.view(-1) for t in tensors]
    n = flats[0].numel()
    for k in range(0, n or 1, size):  # an empty tensor: one empty piece (its dot products are 0)
        yield tuple(f[k:k + size] for f in flats)


def _select_into(p: Tensor, ok: Tensor, new: Tensor) -> None:
    """p <- new where ok else p (ok a 0-d device bool): in place when dtypes allow."""
    if new.dtype == p.dtype:
        torch.where(ok, new, p, out=p)
    else:
        p.copy_(torch.where(ok, new, p))


def multi_tensor_sumsq(tensors: list[Tensor]) -> Tensor:
    if not tensors:
        return torch.empty(0, **_EMPTY_F32)
    # torch.linalg.vector_norm with dtype=float32 accumulates in fp32 without an fp32 copy of
    # an fp16/bf16 input; squaring the norm costs one rounding, far below the test tolerance.
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32) if t.dtype != torch.float64
             else torch.linalg.vector_norm(t).float() for t in tensors]
    return torch.stack(norms).square()


def pgd_reduce(params: list[Tensor], grads: list[Tensor], backups: list[Tensor], first: bool) -> Tensor:
    if not params:
        return torch.empty(0, 3, **_EMPTY_F32)
    rows = []
    size = piece_size(params)
    for p, g, b in zip(params, grads, backups):
        parts = []
        for pp, gp, bp in _pieces(size, p, g, b):
            g32 = _opmath(gp)
            gg = torch.dot(g32, g32)
            if first:
                parts.append(gg.double())
                continue
            d = _opmath(pp) - _opmath(bp)
            parts.append(torch.stack([gg, torch.dot(d, g32), torch.dot(d, d)]).double())
        acc = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        if first:
            gg = acc.float()
            zero = gg.new_zeros(())
            rows.append(torch.stack([gg, zero, zero]))
        else:
            rows.append(acc.float())
    return torch.stack(rows)


def fgm_perturb_(params, grads, backups, grad_sumsq: Tensor, epsilon: float, write_backup: bool) -> None:
    if not params:
        return
    if write_backup:
        torch._foreach_copy_(backups, params)
    n = grad_sumsq.sqrt()
    ok = norm_ok(n)
    # n = +inf is not skipped: factor 0, so finite entries get 0 and inf entries NaN (0*inf),
    # as the community class's eps*G/inf does.
    factor = torch.where(ok, epsilon / n, torch.zeros_like(n))
    size = piece_size(params)
    for i, (p, g, b) in enumerate(zip(params, grads, backups)):
        if write_backup and _is_opmath(p):
            # In place, no temporaries: P += f*G, then select the old P (= B) where skipped.
            # (fp32/fp64 only: in-place addcmul would round f to an fp16/bf16 P's dtype.)
            p.addcmul_(g, factor[i])
            torch.where(ok[i], p, b, out=p)
        else:
            for pp, gp in _pieces(size, p, g):
                pp.copy_(torch.where(ok[i], _opmath(pp) + _opmath(gp) * factor[i], pp))


def fgsm_perturb_(params, grads, backups, epsilon: float, write_backup: bool) -> None:
    if not params:
        return
    if write_backup:
        torch._foreach_copy_(backups, params)
    size = piece_size(params)
    for p, g in zip(params, grads):
        for pp, gp in _pieces(size, p, g):
            if _is_opmath(pp):
                pp.add_(torch.sign(gp), alpha=epsilon)
            else:  # fp32 math: add_(alpha=) would round epsilon to fp16/bf16 first
                pp.copy_(_opmath(pp) + epsilon * torch.sign(_opmath(gp)))


def pgd_perturb_(params, grads, backups, stats: Tensor, alpha: float, epsilon: float, first: bool) -> None:
    """P' = P + c*G with c = alpha/||G||; r = P' - B; if ||r|| > eps: r *= eps/||r||; P = B + r.

    ||r||^2 = ||d||^2 + 2c<d, G> + c^2||G||^2 with d = P - B, all from ``stats``, so the
    projection factor s is known before the single update pass: P = B + s*(P + c*G - B).
    Skipped tensors (guard false) keep P bit for bit.
    """
    if not params:
        return
    if first:
        torch._foreach_copy_(backups, params)
    gg, dg, dd = stats[:, 0], stats[:, 1], stats[:, 2]
    if first:  # d = 0 exactly: B was just copied from P
        dg, dd = torch.zeros_like(dg), torch.zeros_like(dd)
    n = gg.sqrt()
    ok = norm_ok(n)
    c = torch.where(ok, alpha / n, torch.zeros_like(n))
    r = (dd + 2 * c * dg + c * c * gg).clamp_min(0).sqrt()
    s = torch.where(ok & (r > epsilon), epsilon / r, torch.ones_like(r))
    size = piece_size(params)
    for i, (p, g, b) in enumerate(zip(params, grads, backups)):
        if first and _is_opmath(p):  # P = B + s*c*G, and B is the old P: select it where skipped
            p.addcmul_(g, s[i] * c[i])
            torch.where(ok[i], p, b, out=p)
            continue
        sc = s[i] * c[i]
        for pp, gp, bp in _pieces(size, p, g, b):
            if first:
                _select_into(pp, ok[i], torch.addcmul(_opmath(pp), _opmath(gp), sc))
            else:
                new = torch.addcmul(_opmath(pp), _opmath(gp), c[i])
                torch.lerp(_opmath(bp), new, s[i], out=new)          # B + s*(new - B)
                _select_into(pp, ok[i], new)


def awp_box(b: Tensor, adv_eps: float) -> tuple[Tensor, Tensor]:
    """(lo, hi) = (B - e, B + e), e = adv_eps*|B|, each op rounded to B's dtype (as the reference)."""
    e = b.abs().mul_(adv_eps)
    lo = b - e
    return lo, e.add_(b)


def awp_perturb_(params, grads, backups, grad_sumsq: Tensor, param_sumsq: Tensor,
                 adv_lr: float, adv_eps: float, first: bool) -> None:
    """P <- clamp(P + adv_lr * G/(||G||+1e-6) * (||P||+1e-6), lo, hi), NaN-propagating.

    Guard on ||G|| (zero or NaN: the tensor is left unchanged, no clamp).  On ``first`` the
    backup is written for every tensor, guarded or not.
    """
    if not params:
        return
    if first:
        torch._foreach_copy_(backups, params)
    n1, n2 = grad_sumsq.sqrt(), param_sumsq.sqrt()
    ok = norm_ok(n1)
    factor = torch.where(ok, adv_lr * (n2 + 1e-6) / (n1 + 1e-6), torch.zeros_like(n1))
    size = piece_size(params)
    for i, (p, g, b) in enumerate(zip(params, grads, backups)):
        for pp, gp, bp in _pieces(size, p, g, b):
            lo, hi = awp_box(bp, adv_eps)
            new = torch.addcmul(_opmath(pp), _opmath(gp), factor[i])
            # torch.maximum/minimum propagate NaN (clamp would not): the Kaggle class uses max/min.
            torch.maximum(new, _opmath(lo), out=new)
            del lo
            torch.minimum(new, _opmath(hi), out=new)
            del hi
            _select_into(pp, ok[i], new)


def restore_(params, backups) -> None:
    if params:
        torch._foreach_copy_(params, backups)
