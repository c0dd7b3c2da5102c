"""The ``torch`` backend of the weight_ext ops (MI-FGSM, the paper's AWP): pure PyTorch, any device.

The executable statement of the op math that csrc/cpu/weight_ext.cpp, csrc/cuda/weight_ext.cu and
fused_adv/_triton/weight_ext.py implement; keep them in step.  Per tensor i (P param, G grad,
M momentum, B backup, D direction):

* element math in float32 (float64 tensors: float64), rounded to P's dtype where the reference
  keeps a value in P's dtype: the momentum M is stored (and its sign taken) in P's dtype, the
  MI-FGSM box is B -+ epsilon rounded to P's dtype, the paper's diff is rounded to P's dtype before
  it is scaled by coeff;
* per-tensor scalars are float32 tensors on the device; the zero/NaN guard of MI-FGSM is a
  device-side select (a skipped tensor is selected unchanged, never multiplied by 0);
* MI-FGSM's G/||G||_1 is a division per element (as the reference's ``grad / norm``), not a
  multiplication by a reciprocal: a one-ulp difference in M could flip sign(M) where M is near 0.

No function here syncs the host.  Backups are written by ``copy_`` (bit-exact).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fused_adv._torch.weight import _opmath, norm_ok


def multi_tensor_abssum(tensors: list[Tensor]) -> Tensor:
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    norms = [torch.linalg.vector_norm(t, ord=1, dtype=torch.float32) if t.dtype != torch.float64
             else torch.linalg.vector_norm(t, ord=1).float() for t in tensors]
    return torch.stack(norms)


def mifgsm_box(b: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """(lo, hi) = (B - epsilon, B + epsilon), each rounded to B's dtype (as the reference)."""
    return b - epsilon, b + epsilon


def mifgsm_perturb_(params, grads, momenta, backups, grad_abssum: Tensor, alpha: float, epsilon: float,
                    decay: float, first: bool) -> None:
    """M <- decay*M + G/n (M <- G/n on ``first``), P <- clamp(P + alpha*sign(M), B -+ epsilon);
    tensors whose n = ||G||_1 is 0 or NaN keep P and M (M <- 0 on ``first``)."""
    if not params:
        return
    if first:
        torch._foreach_copy_(backups, params)
    ok = norm_ok(grad_abssum)
    for i, (p, g, m, b) in enumerate(zip(params, grads, momenta, backups)):
        if _opmath(p) is p:
            _mifgsm_inplace(p, g, m, b, grad_abssum[i], ok[i], alpha, epsilon, decay, first)
            continue
        n = grad_abssum[i].to(_opmath(p).dtype)
        step = _opmath(g) / n
        if not first:
            step = decay * _opmath(m) + step
        new_m = step.to(m.dtype)               # M lives in P's dtype; its sign is taken there
        v = _opmath(p) + alpha * torch.sign(_opmath(new_m))
        lo, hi = mifgsm_box(b, epsilon)
        new_p = torch.clamp(v, _opmath(lo), _opmath(hi))  # NaN-propagating (bounds included)
        p.copy_(torch.where(ok[i], new_p, _opmath(p)))
        m.copy_(torch.where(ok[i], new_m, m if not first else torch.zeros_like(m)))


def _mifgsm_inplace(p, g, m, b, n, ok, alpha, epsilon, decay, first) -> None:
    """The step above for fp32/fp64 tensors (math dtype = P's dtype), with three temporaries
    instead of one per operation: the same operations in the same order, so the same bits."""
    step = torch.div(g, n.to(p.dtype))
    if not first:
        step = torch.mul(m, decay).add_(step)
    v = torch.sign(step).mul_(alpha).add_(p)                   # P + alpha*sign(M)
    bound = torch.sub(b, epsilon)
    torch.maximum(v, bound, out=v)                             # clamp with tensor bounds, NaN-propagating
    torch.add(b, epsilon, out=bound)
    torch.minimum(v, bound, out=v)
    torch.where(ok, v, p, out=p)
    if first:
        m.zero_()
    torch.where(ok, step, m, out=m)


def awp_paper_factor(param_sumsq: Tensor, dir_sumsq: Tensor, scale: float) -> Tensor:
    """float32[N]: f = ||W|| / (scale*||D|| + 1e-20) * scale, in the paper's operation order."""
    return param_sumsq.sqrt() / (scale * dir_sumsq.sqrt() + 1e-20) * scale


def awp_paper_add_(params, dirs, param_sumsq: Tensor, dir_sumsq: Tensor, scale: float, coeff: float) -> None:
    """P <- P + coeff * round_P(f * D)."""
    if not params:
        return
    f = awp_paper_factor(param_sumsq, dir_sumsq, scale)
    for i, (p, d) in enumerate(zip(params, dirs)):
        if _opmath(p) is p:  # fp32/fp64: one temporary, same operations (f*D, coeff*diff, P + that)
            p.add_((d * f[i].to(p.dtype)).mul_(coeff))
            continue
        diff = (_opmath(d) * f[i]).to(p.dtype)
        p.copy_(_opmath(p) + coeff * _opmath(diff))
