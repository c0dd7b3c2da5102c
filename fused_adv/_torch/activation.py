"""The ``torch`` backend of the activation-space ops (SiFT, FreeLB, SMART): pure PyTorch.

This file is also the executable statement of the op math that every other backend (cpp, cuda,
triton) implements; keep them in step.  Shapes: x, delta, grad, xhat, noise are contiguous
[..., H]; "row" = the last dim (one token), "sample" = everything after dim 0 (FreeLB).

* element math in float32 (float64 stays float64), rounded once to the stored dtype;
* LayerNorm without affine: mean = sum(x)/H, var = sum((x-mean)^2)/H, rstd = 1/sqrt(var+eps),
  xhat = (x-mean)*rstd; out = xhat (+ float(delta)) rounded to x's dtype; mean/rstd float32
  (float64 for float64 x), shape [rows];
* the SiFT/SMART guard ``ok = isfinite(sum_rows(stats[:, 1]))`` (= ‖g‖ finite) is a device-side
  select, never a host read; FreeLB has no guard (NaN propagates, as in the original).

No function here syncs the host.  Helper names match the kernels' (csrc/common/kernel_math.h,
fused_adv/_triton/kernel_math.py): ``_opmath`` (opmath_t), ``rows_of``, ``grad_ok``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _opmath(t: Tensor) -> Tensor:
    """t in its math dtype (opmath_t): float64 stays float64, everything else becomes float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rows_of(t: Tensor) -> Tensor:
    """The [rows, H] view of a [..., H] tensor (a 0-d tensor is one row of one element)."""
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def ln_delta_fwd(x: Tensor, delta: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    h = x.shape[-1]
    # native_layer_norm on the fp32 (fp64) values computes exactly the statement above (on CPU it
    # would return half-precision mean/rstd for half inputs); the normalised value stays in fp32
    # until the delta is added and is rounded once.
    out, mean, rstd = torch.native_layer_norm(_opmath(x), [h], None, None, eps)
    if delta is not None:
        out = out + _opmath(delta)
    return out.to(x.dtype), mean.reshape(-1), rstd.reshape(-1)


def ln_delta_bwd(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)), g = grad_out, per row."""
    h = x.shape[-1]
    shape = x.shape[:-1] + (1,)
    xa = _opmath(x)
    dx, _, _ = torch.ops.aten.native_layer_norm_backward(
        grad_out.to(xa.dtype), xa, [h], mean.reshape(shape), rstd.reshape(shape), None, None,
        [True, False, False])
    return dx.to(x.dtype)


def row_absmax_sumsq(x: Tensor) -> Tensor:
    r = _opmath(rows_of(x))
    if r.numel() == 0:
        return torch.zeros(r.shape[0], 2, dtype=torch.float32, device=x.device)
    amax = r.abs().amax(-1)  # NaN-propagating
    ss = torch.linalg.vector_norm(r, dim=-1).square() if r.dtype == torch.float32 else (r * r).sum(-1)
    return torch.stack([amax, ss], -1).float()


def grad_ok(stats: Tensor) -> Tensor:
    """The SiFT/SMART guard: ‖g‖ finite, from the per-row sums of squares (a 0-d device bool)."""
    return torch.isfinite(stats[:, 1].sum())


def sift_perturb(xhat: Tensor, noise: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    delta = _opmath(noise).float().clamp(-bound, bound)
    out = (_opmath(xhat).float() + delta).to(xhat.dtype) if xhat.dtype != torch.float64 else xhat + delta
    return delta, out


def sift_update_(delta: Tensor, grad: Tensor, xhat: Tensor, stats: Tensor, lr: float) -> Tensor:
    ok = grad_ok(stats)
    g = rows_of(_opmath(grad))
    d = rows_of(delta)
    new = d + lr * g / (1e-6 + stats[:, :1].to(d.dtype))
    d.copy_(torch.where(ok, new, d))
    return (_opmath(xhat) + delta.to(_opmath(xhat).dtype)).to(xhat.dtype)


def smart_update_(noise: Tensor, grad: Tensor, stats: Tensor, step_size: float, epsilon: float) -> Tensor:
    ok = grad_ok(stats)
    n = rows_of(noise)
    v = _opmath(n) + _opmath(rows_of(grad)) * step_size
    new = v / (v.abs().amax(-1, keepdim=True) + epsilon)
    n.copy_(torch.where(ok, new, _opmath(n)))
    return ok.float()


def freelb_reduce(delta: Tensor, grad: Tensor, linf: bool) -> Tensor:
    b = delta.shape[0]
    g = _opmath(grad).reshape(b, -1)
    if linf:
        amax = g.abs().amax(-1) if g.shape[1] else g.new_zeros(b)
        z = torch.zeros_like(amax)
        return torch.stack([amax, z, z], -1).float()
    d = _opmath(delta).reshape(b, -1)
    return torch.stack([(g * g).sum(-1), (d * g).sum(-1), (d * d).sum(-1)], -1).float()


def freelb_update_(delta: Tensor, grad: Tensor, stats: Tensor, lr: float, max_norm: float, linf: bool) -> None:
    """l2: d' = d + lr*g/max(‖g‖, 1e-8); if max_norm > 0, with ‖d'‖ from the stats
    (‖d'‖² = ‖d‖² + 2c<d,g> + c²‖g‖², c = lr/max(‖g‖, 1e-8)): d' *= max_norm/‖d'‖ * exceed
    + (1 - exceed), exceed = ‖d'‖ > max_norm (NaN when ‖d'‖ = 0, as the original).
    linf: d' = d + lr*g/max(max|g|, 1e-8); if max_norm > 0: clamp to +-max_norm."""
    b = delta.shape[0]
    d = delta.reshape(b, -1)
    g = _opmath(grad).reshape(b, -1)
    wide = torch.float64 if delta.dtype == torch.float64 else torch.float32
    s = stats.to(wide)
    if linf:
        denorm = s[:, 0].clamp_min(1e-8)
        new = _opmath(d) + lr * g / denorm[:, None]
        if max_norm > 0:
            new = new.clamp(-max_norm, max_norm)
    else:
        gg, dg, dd = s[:, 0], s[:, 1], s[:, 2]
        denorm = gg.sqrt().clamp_min(1e-8)
        new = _opmath(d) + lr * g / denorm[:, None]
        if max_norm > 0:
            c = lr / denorm
            dn = (dd + 2 * c * dg + c * c * gg).clamp_min(0).sqrt()
            exceed = (dn > max_norm).to(wide)
            new = new * (max_norm / dn * exceed + (1 - exceed))[:, None]
    d.copy_(new)
