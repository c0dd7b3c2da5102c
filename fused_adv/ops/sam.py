"""Public multi-tensor ops of SAM and ASAM (the ``sam`` family; docs/methods.md §11 (SAM)).

Same conventions as fused_adv.ops.weight (read its docstring): lists of N tensors on one device,
entry i of every list with params[i]'s shape and dtype (float16, bfloat16, float32 or float64),
mutated tensors contiguous; statistics are float32 tensors on that device; nothing is read back by
the host; ``*_`` ops mutate in place and return nothing.

* :func:`sam_sumsq` -- float32[N]: ||(|P| if adaptive else 1) * G||^2 per tensor, one launch.
* :func:`sam_perturb_` -- B <- P and P <- P + (P^2 if adaptive else 1) * G * scale in one pass,
  scale = rho / (n + 1e-12) with n = sqrt of the sum of the WHOLE ``grad_sumsq`` vector, combined
  on the device: the one global norm of SAM.  A non-finite sum skips the step on the device (the
  GradScaler overflow case); the backup is written either way.

A model whose parameter groups differ in ``rho`` or ``adaptive`` calls :func:`sam_sumsq` once per
run of groups with the same ``adaptive`` and :func:`sam_perturb_` once per run with the same
(``rho``, ``adaptive``), every :func:`sam_perturb_` call reading the concatenation of all
:func:`sam_sumsq` results (fused_adv.methods.sam does this); the usual one-setting model makes one
call of each.  The backups are restored with :func:`fused_adv.ops.restore_` (bit-exact).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fused_adv.ops._library import Op, OpFamily
from fused_adv.ops._registry import kernel, resolve
from fused_adv.ops.weight import _check, _device_of


def sam_sumsq(params, grads, adaptive: bool, *, backend: str | None = None) -> Tensor:
    """float32[N]: per tensor the sum of ((|P| if adaptive else 1) * G)^2, element products in
    float32 (float64 for float64 tensors), accumulated in fp32 or wider (deterministic).  P is not
    read unless ``adaptive``.  Raises ValueError / TypeError for mismatched lists, several devices
    or non-float dtypes."""
    params, grads = _check("sam_sumsq", params, ("grads", grads))
    device = _device_of(params)
    if not params:
        return torch.empty(0, dtype=torch.float32, device=device)
    params = [p if p.is_contiguous() else p.contiguous() for p in params]
    return kernel(resolve(backend, device, "sam_sumsq"), "sam_sumsq")(params, grads, bool(adaptive))


def sam_perturb_(params, grads, backups, grad_sumsq: Tensor, rho: float, adaptive: bool,
                 *, backend: str | None = None) -> None:
    """SAM's climb (docs/methods.md §11 (SAM)): with S = the sum of every entry of ``grad_sumsq``
    (float32[M], any M >= 0: the per-tensor sums of ALL perturbed tensors, not only these N),
    computed in float64 and rounded to float32, n = sqrt(S) and scale = (1/(n + 1e-12)) * rho
    (float32, the reference's operation order), per tensor i:

    * B <- P (raw bits, always);
    * if S is finite: P <- P + (P*P if adaptive else 1) * G * scale (element math in float32,
      float64 for float64 tensors, one rounding to P's dtype); else P is not written.

    Mutates params and backups.  Raises ValueError for mismatched lists, a ``grad_sumsq`` that is
    not a float32 vector on the params' device, or a negative rho."""
    params, grads, backups = _check("sam_perturb_", params, ("grads", grads), ("backups", backups),
                                    mutated=(params, backups))
    if not params:
        return
    device = _device_of(params)
    if grad_sumsq.dim() != 1 or grad_sumsq.dtype != torch.float32 or grad_sumsq.device != device:
        raise ValueError(f"fused_adv.sam_perturb_: grad_sumsq must be a float32 vector on {device}, got "
                         f"{grad_sumsq.dtype} {tuple(grad_sumsq.shape)} on {grad_sumsq.device}")
    if not rho >= 0:
        raise ValueError(f"fused_adv.sam_perturb_: rho must be >= 0, got {rho}")
    grad_sumsq = grad_sumsq if grad_sumsq.is_contiguous() else grad_sumsq.contiguous()
    kernel(resolve(backend, device, "sam_perturb_"), "sam_perturb_")(
        params, grads, backups, grad_sumsq, float(rho), bool(adaptive))


# ----------------------------------------------------------------------------- fake impls
def _fake_sam_sumsq(params, grads, adaptive):
    return torch.empty(len(params), dtype=torch.float32, device=_device_of(params))


def _fake_sam_perturb_(params, grads, backups, grad_sumsq, rho, adaptive):
    return None


# ----------------------------------------------------------------------------- family record
FAMILY = OpFamily(
    name="sam",
    ops=(
        # out[i] = sum(((|P_i| if adaptive else 1) * G_i)^2), fp32 (or wider).  -> float32[N]
        Op("sam_sumsq(Tensor[] params, Tensor[] grads, bool adaptive) -> Tensor", _fake_sam_sumsq),
        # B <- P; if sum(grad_sumsq) finite: P <- P + (P^2 if adaptive else 1) * G * rho/(n + 1e-12)
        Op("sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor grad_sumsq, "
           "float rho, bool adaptive) -> ()", _fake_sam_perturb_),
    ),
    torch_module="fused_adv._torch.sam",
    triton_module="fused_adv._triton.sam",
)
