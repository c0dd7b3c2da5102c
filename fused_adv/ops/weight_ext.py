"""Public multi-tensor ops of MI-FGSM and the paper's AWP (the ``weight_ext`` family).

docs/methods.md §2b (MI-FGSM) and §4b (AWP (paper)).  Same conventions as fused_adv.ops.weight
(read its docstring): lists of N tensors on one device, entry i of every list with params[i]'s
shape and dtype (float16, bfloat16, float32 or float64), mutated tensors contiguous; per-tensor
statistics are float32 tensors on that device; nothing is read back by the host; ``*_`` ops mutate
in place and return nothing.

* :func:`multi_tensor_abssum` -- float32[N]: ||X_i||_1 (MI-FGSM's reduction), one launch.
* :func:`mifgsm_perturb_` -- one MI-FGSM step (momentum, sign step, box projection, backup on the
  first step) in one pass.
* :func:`awp_paper_add_` -- P <- P + coeff * diff with diff = f * D rounded to P's dtype,
  f = ||W||/(scale*||D|| + 1e-20) * scale from statistics taken once (calc_awp): the paper's
  ``perturb`` (coeff = gamma) and ``restore`` (coeff = -gamma) without materialising ``diff``.
  Its reduction is :func:`fused_adv.ops.multi_tensor_sumsq` over ``W + D`` (one launch).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fused_adv.ops._library import Op, OpFamily
from fused_adv.ops._registry import kernel, resolve
from fused_adv.ops.weight import _check, _device_of, _vector


def multi_tensor_abssum(tensors: Sequence[Tensor], *, backend: str | None = None) -> Tensor:
    """float32[N]: sum of |x| over each tensor (its L1 norm), accumulated in fp32 or wider, one
    launch.  Raises ValueError / TypeError for tensors on several devices or non-float dtypes."""
    (tensors,) = _check("multi_tensor_abssum", tensors)
    device = _device_of(tensors)
    if not tensors:
        return torch.empty(0, dtype=torch.float32, device=device)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    return kernel(resolve(backend, device, "multi_tensor_abssum"), "multi_tensor_abssum")(tensors)


def mifgsm_perturb_(params, grads, momenta, backups, grad_abssum: Tensor, alpha: float, epsilon: float,
                    decay: float, first: bool, *, backend: str | None = None) -> None:
    """One MI-FGSM step (docs/methods.md §2b (MI-FGSM)), per tensor i with n = grad_abssum[i]:

    * if ``first``: B <- P (every tensor) and the momentum starts from 0 (M is not read);
    * if n is 0 or NaN: the tensor is skipped (P and M unchanged; on ``first`` M <- 0);
    * else M <- decay*M + G/n (stored in M's dtype), P <- clamp(P + alpha*sign(M), B - epsilon,
      B + epsilon), NaN-propagating, with the box rounded to P's dtype.

    ``momenta`` and ``backups`` have the params' shapes and dtypes.  Mutates params, momenta and
    (on ``first``) backups.  Raises ValueError for mismatched lists or a bad ``grad_abssum``."""
    params, grads, momenta, backups = _check("mifgsm_perturb_", params, ("grads", grads), ("momenta", momenta),
                                             ("backups", backups), mutated=(params, momenta, backups))
    if not params:
        return
    device = _device_of(params)
    grad_abssum = _vector("grad_abssum", grad_abssum, len(params), device)
    kernel(resolve(backend, device, "mifgsm_perturb_"), "mifgsm_perturb_")(
        params, grads, momenta, backups, grad_abssum, float(alpha), float(epsilon), float(decay), bool(first))


def awp_paper_add_(params, dirs, param_sumsq: Tensor, dir_sumsq: Tensor, scale: float, coeff: float,
                   *, backend: str | None = None) -> None:
    """P <- P + coeff * diff, diff = (f * D) rounded to P's dtype, per tensor i
    f = sqrt(param_sumsq[i]) / (scale*sqrt(dir_sumsq[i]) + 1e-20) * scale (docs/methods.md §4b
    (AWP (paper))): the paper's diff ||W||/(||Delta|| + 1e-20) * Delta with Delta = scale * D.

    ``dirs``: D per tensor (the proxy's W' - W with scale 1, or the ascent gradient with
    scale = the proxy's learning rate).  No guard: a zero D gives diff 0, NaN propagates, as in
    the paper's code.  Mutates params.  Raises ValueError for mismatched lists or statistics."""
    params, dirs = _check("awp_paper_add_", params, ("dirs", dirs), mutated=(params,))
    if not params:
        return
    device = _device_of(params)
    param_sumsq = _vector("param_sumsq", param_sumsq, len(params), device)
    dir_sumsq = _vector("dir_sumsq", dir_sumsq, len(params), device)
    kernel(resolve(backend, device, "awp_paper_add_"), "awp_paper_add_")(
        params, dirs, param_sumsq, dir_sumsq, float(scale), float(coeff))


# ----------------------------------------------------------------------------- fake impls
def _fake_multi_tensor_abssum(tensors):
    return torch.empty(len(tensors), dtype=torch.float32, device=_device_of(tensors))


def _fake_mifgsm_perturb_(params, grads, momenta, backups, grad_abssum, alpha, epsilon, decay, first):
    return None


def _fake_awp_paper_add_(params, dirs, param_sumsq, dir_sumsq, scale, coeff):
    return None


# ----------------------------------------------------------------------------- family record
FAMILY = OpFamily(
    name="weight_ext",
    ops=(
        # out[i] = sum(|tensors[i]|), accumulated in fp32 (or wider).  -> float32[N]
        Op("multi_tensor_abssum(Tensor[] tensors) -> Tensor", _fake_multi_tensor_abssum),
        # MI-FGSM step (docs/methods.md §2b (MI-FGSM)) with grad_abssum from multi_tensor_abssum.
        Op("mifgsm_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, Tensor(c!)[] backups, "
           "Tensor grad_abssum, float alpha, float epsilon, float decay, bool first) -> ()",
           _fake_mifgsm_perturb_),
        # P <- P + coeff * round(f * D) (docs/methods.md §4b (AWP (paper))).
        Op("awp_paper_add_(Tensor(a!)[] params, Tensor[] dirs, Tensor param_sumsq, Tensor dir_sumsq, "
           "float scale, float coeff) -> ()", _fake_awp_paper_add_),
    ),
    torch_module="fused_adv._torch.weight_ext",
    triton_module="fused_adv._triton.weight_ext",
)
