"""The ``torch`` backend of the sam ops (SAM / ASAM): pure PyTorch, any device.

The executable statement of the op math that csrc/cpu/sam.cpp, csrc/cuda/sam.cu and
fused_adv/_triton/sam.py implement; keep them in step (docs/methods.md §11 (SAM)).

* sam_sumsq: per tensor sum of (|P|*G)^2 (adaptive) or G^2, the product in float32 (float64
  tensors: float64), accumulated in fp32 or wider.
* sam_perturb_: S = float32(sum of grad_sumsq in float64), n = sqrt(S) (float32),
  scale = (1/(n + 1e-12)) * rho in float32 -- the reference's ``rho / (norm + 1e-12)``, which
  torch evaluates as ``reciprocal() * rho``; ok = S is finite (a device-side select: a skipped
  tensor is selected unchanged, never multiplied by 0).  Per element, in float32 (float64 for
  float64 tensors), rounded once to P's dtype: P' = P + ((P*P)*G if adaptive else G) * scale,
  in the reference's operation order.  The backup is written for every tensor by ``copy_``
  (bit-exact).

No function here syncs the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fused_adv._torch.weight import _opmath, _select_into


def sam_sumsq(params: list[Tensor], grads: list[Tensor], adaptive: bool) -> Tensor:
    if not params:
        return torch.empty(0, dtype=torch.float32)
    out = []
    for p, g in zip(params, grads):
        x = _opmath(p).abs() * _opmath(g) if adaptive else g
        if x.dtype == torch.float64:
            out.append(torch.linalg.vector_norm(x).float())
        else:
            out.append(torch.linalg.vector_norm(x, dtype=torch.float32))
    return torch.stack(out).square()


def sam_scale(grad_sumsq: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """(scale, ok): float32 0-d tensors on grad_sumsq's device (see the module docstring)."""
    total = grad_sumsq.double().sum().float()
    n = total.sqrt()
    return (n + 1e-12).reciprocal() * rho, torch.isfinite(total)


def sam_perturb_(params, grads, backups, grad_sumsq: Tensor, rho: float, adaptive: bool) -> None:
    if not params:
        return
    torch._foreach_copy_(backups, params)
    scale, ok = sam_scale(grad_sumsq, rho)
    for p, g in zip(params, grads):
        pm, gm = _opmath(p), _opmath(g)
        t = pm * pm * gm if adaptive else gm
        _select_into(p, ok, pm + t * scale.to(pm.dtype))
