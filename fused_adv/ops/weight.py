"""Public multi-tensor ops for the weight-space methods (FGM, FGSM, PGD, AWP).

Each function validates its arguments, picks a backend (``backend=`` argument, else
``FUSED_ADV_BACKEND``, else auto; see fused_adv.ops._registry) and calls it.  None of them reads
a value back to the host.  Shapes and dtypes:

* ``params``, ``grads``, ``backups``: lists of N tensors on one device; entry i of each list has
  the same shape and dtype (float16, bfloat16, float32 or float64); params and backups must be
  contiguous (grads are made contiguous if they are not).
* reductions return float32 tensors on that device; ``*_`` functions mutate in place.

The family record :data:`FAMILY` at the end of this file is the only place the op schemas are
written (see fused_adv/ops/__init__.py for what a family record holds).  Schema conventions:

- lists are "tensor lists": any number of tensors (0 included), one device per call, mixed
  dtypes allowed across entries; within entry i, params[i], grads[i] and backups[i] share shape
  and dtype and are contiguous;
- reductions return float32 tensors on the tensors' device; nothing is read back by the host;
- ``*_`` ops mutate the arguments annotated ``(a!)`` / ``(b!)`` in place and return nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fused_adv.ops._library import Op, OpFamily
from fused_adv.ops._registry import kernel, resolve

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _device_of(*lists: Sequence[Tensor]) -> torch.device:
    for lst in lists:
        for t in lst:
            return t.device
    return torch.device("cpu")


def _check(op: str, params: Sequence[Tensor], *others: tuple[str, Sequence[Tensor]],
           mutated: Sequence[Sequence[Tensor]] = ()) -> list[list[Tensor]]:
    """Validates matching lists; returns [params, *others] as lists (grads made contiguous)."""
    n = len(params)
    out = [list(params)]
    device = _device_of(params)
    for label, lst in others:
        if len(lst) != n:
            raise ValueError(f"fused_adv.{op}: got {n} params but {len(lst)} {label}; pass one per param")
        fixed = []
        for i, (p, t) in enumerate(zip(params, lst)):
            if t.shape != p.shape or t.dtype != p.dtype:
                raise ValueError(
                    f"fused_adv.{op}: {label}[{i}] is {tuple(t.shape)} {t.dtype} but params[{i}] is "
                    f"{tuple(p.shape)} {p.dtype}; they must match")
            if t.device != device:
                raise ValueError(f"fused_adv.{op}: {label}[{i}] is on {t.device}, params on {device}; "
                                 "one call serves one device")
            fixed.append(t if t.is_contiguous() else t.contiguous())
        out.append(fixed)
    for i, p in enumerate(params):
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fused_adv.{op}: params[{i}] has dtype {p.dtype}; expected one of "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
        if p.device != device:
            raise ValueError(f"fused_adv.{op}: params[{i}] is on {p.device}, params[0] on {device}")
    for lst in mutated:
        for i, t in enumerate(lst):
            if not t.is_contiguous():
                raise ValueError(f"fused_adv.{op}: tensor {i} is mutated in place and must be contiguous "
                                 "(call .contiguous() on the parameter once, before training)")
    return out


# Sentinel: the native fast path did not run (fall through to the validating path).
_MISSED = object()


def _native(name: str, op: str, *args):
    """The fast path of every wrapper here: when the resolved backend is a compiled kernel (cpp,
    cuda), call it on the arguments as given and return its result.  The kernels check their
    arguments themselves (csrc/common/checks.h: devices, dtypes, shapes, contiguity, the float32
    statistics vectors) before touching any memory, so the Python validation below is only
    needed to turn a rejected call into this module's clear ValueError / TypeError, or to make
    non-contiguous grads contiguous: a RuntimeError from the kernel sends the call down the
    validating path, which then raises that error (or fixes the arguments and calls again).
    Why: the per-tensor Python checks cost ~1 us per tensor, i.e. most of a 400-tensor step's
    host time (docs/design.md §7 (Targets)).  Returns _MISSED when the fast path did not run."""
    if name != "cpp" and name != "cuda":
        return _MISSED
    try:
        return getattr(torch.ops.fused_adv, op)(*args)
    except RuntimeError:
        return _MISSED


def _vector(name: str, t: Tensor, n: int, device: torch.device, cols: int | None = None) -> Tensor:
    shape = (n,) if cols is None else (n, cols)
    if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device:
        raise ValueError(f"fused_adv: {name} must be float32 {shape} on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")
    return t if t.is_contiguous() else t.contiguous()


def multi_tensor_sumsq(tensors: Sequence[Tensor], *, backend: str | None = None) -> Tensor:
    """float32[N]: sum of squares of each tensor, accumulated in fp32 or wider, one launch."""
    if tensors:
        out = _native(resolve(backend, tensors[0].device, "multi_tensor_sumsq"), "multi_tensor_sumsq", tensors)
        if out is not _MISSED:
            return out
    (tensors,) = _check("multi_tensor_sumsq", tensors)
    device = _device_of(tensors)
    if not tensors:
        return torch.empty(0, dtype=torch.float32, device=device)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    return kernel(resolve(backend, device, "multi_tensor_sumsq"), "multi_tensor_sumsq")(tensors)


def pgd_reduce(params, grads, backups, first: bool, *, backend: str | None = None) -> Tensor:
    """float32[N, 3]: (||G||^2, <P-B, G>, ||P-B||^2) per tensor; columns 1-2 are 0 when ``first``."""
    if params:
        out = _native(resolve(backend, params[0].device, "pgd_reduce"), "pgd_reduce", params, grads, backups,
                      bool(first))
        if out is not _MISSED:
            return out
    params, grads, backups = _check("pgd_reduce", params, ("grads", grads), ("backups", backups))
    device = _device_of(params)
    if not params:
        return torch.empty(0, 3, dtype=torch.float32, device=device)
    return kernel(resolve(backend, device, "pgd_reduce"), "pgd_reduce")(params, grads, backups, bool(first))


def fgm_perturb_(params, grads, backups, grad_sumsq: Tensor, epsilon: float, write_backup: bool,
                 *, backend: str | None = None) -> None:
    """If write_backup, B <- P; then P <- P + epsilon*G/||G|| where ||G|| = sqrt(grad_sumsq[i])
    is neither 0 nor NaN (else P unchanged).  Mutates params (and backups)."""
    if params and _native(resolve(backend, params[0].device, "fgm_perturb_"), "fgm_perturb_", params, grads, backups,
                          grad_sumsq, float(epsilon), bool(write_backup)) is not _MISSED:
        return
    params, grads, backups = _check("fgm_perturb_", params, ("grads", grads), ("backups", backups),
                                    mutated=(params, backups))
    if not params:
        return
    device = _device_of(params)
    grad_sumsq = _vector("grad_sumsq", grad_sumsq, len(params), device)
    kernel(resolve(backend, device, "fgm_perturb_"), "fgm_perturb_")(
        params, grads, backups, grad_sumsq, float(epsilon), bool(write_backup))


def fgsm_perturb_(params, grads, backups, epsilon: float, write_backup: bool, *, backend: str | None = None) -> None:
    """If write_backup, B <- P; then P <- P + epsilon*sign(G).  Mutates params (and backups)."""
    if params and _native(resolve(backend, params[0].device, "fgsm_perturb_"), "fgsm_perturb_", params, grads,
                          backups, float(epsilon), bool(write_backup)) is not _MISSED:
        return
    params, grads, backups = _check("fgsm_perturb_", params, ("grads", grads), ("backups", backups),
                                    mutated=(params, backups))
    if not params:
        return
    device = _device_of(params)
    kernel(resolve(backend, device, "fgsm_perturb_"), "fgsm_perturb_")(
        params, grads, backups, float(epsilon), bool(write_backup))


def pgd_perturb_(params, grads, backups, stats: Tensor, alpha: float, epsilon: float, first: bool,
                 *, backend: str | None = None) -> None:
    """One PGD step with the analytic projection onto the epsilon-ball around B.  If ``first``,
    B <- P first.  ``stats`` comes from :func:`pgd_reduce` with the same ``first``."""
    if params and _native(resolve(backend, params[0].device, "pgd_perturb_"), "pgd_perturb_", params, grads, backups,
                          stats, float(alpha), float(epsilon), bool(first)) is not _MISSED:
        return
    params, grads, backups = _check("pgd_perturb_", params, ("grads", grads), ("backups", backups),
                                    mutated=(params, backups))
    if not params:
        return
    device = _device_of(params)
    stats = _vector("stats", stats, len(params), device, cols=3)
    kernel(resolve(backend, device, "pgd_perturb_"), "pgd_perturb_")(
        params, grads, backups, stats, float(alpha), float(epsilon), bool(first))


def awp_perturb_(params, grads, backups, grad_sumsq: Tensor, param_sumsq: Tensor, adv_lr: float,
                 adv_eps: float, first: bool, *, backend: str | None = None) -> None:
    """One AWP step: if ``first``, B <- P; then for tensors whose ||G|| is neither 0 nor NaN,
    P <- clamp(P + adv_lr*G/(||G||+1e-6)*(||P||+1e-6), B - adv_eps|B|, B + adv_eps|B|)."""
    if params and _native(resolve(backend, params[0].device, "awp_perturb_"), "awp_perturb_", params, grads, backups,
                          grad_sumsq, param_sumsq, float(adv_lr), float(adv_eps), bool(first)) is not _MISSED:
        return
    params, grads, backups = _check("awp_perturb_", params, ("grads", grads), ("backups", backups),
                                    mutated=(params, backups))
    if not params:
        return
    device = _device_of(params)
    grad_sumsq = _vector("grad_sumsq", grad_sumsq, len(params), device)
    param_sumsq = _vector("param_sumsq", param_sumsq, len(params), device)
    kernel(resolve(backend, device, "awp_perturb_"), "awp_perturb_")(
        params, grads, backups, grad_sumsq, param_sumsq, float(adv_lr), float(adv_eps), bool(first))


def restore_(params, backups, *, backend: str | None = None) -> None:
    """P <- B for every pair, bit-exact.  Mutates params."""
    if params and _native(resolve(backend, params[0].device, "restore_"), "restore_", params, backups) is not _MISSED:
        return
    params, backups = _check("restore_", params, ("backups", backups), mutated=(params,))
    if not params:
        return
    kernel(resolve(backend, _device_of(params), "restore_"), "restore_")(params, backups)


# ----------------------------------------------------------------------------- fake impls
# What torch.compile and torch.library.opcheck see of each op: results' shapes, dtypes, devices.
def _fake_multi_tensor_sumsq(tensors):
    return torch.empty(len(tensors), dtype=torch.float32, device=_device_of(tensors))


def _fake_pgd_reduce(params, grads, backups, first):
    return torch.empty(len(params), 3, dtype=torch.float32, device=_device_of(params))


def _fake_fgm_perturb_(params, grads, backups, grad_sumsq, epsilon, write_backup):
    return None


def _fake_fgsm_perturb_(params, grads, backups, epsilon, write_backup):
    return None


def _fake_pgd_perturb_(params, grads, backups, stats, alpha, epsilon, first):
    return None


def _fake_awp_perturb_(params, grads, backups, grad_sumsq, param_sumsq, adv_lr, adv_eps, first):
    return None


def _fake_restore_(params, backups):
    return None


# ----------------------------------------------------------------------------- family record
FAMILY = OpFamily(
    name="weight",
    ops=(
        # out[i] = sum(tensors[i]**2), accumulated in fp32 (or wider).  -> float32[N]
        Op("multi_tensor_sumsq(Tensor[] tensors) -> Tensor", _fake_multi_tensor_sumsq),
        # out[i] = (||G_i||^2, <P_i - B_i, G_i>, ||P_i - B_i||^2); when first, columns 1, 2 are 0
        # and backups are not read.  -> float32[N, 3]
        Op("pgd_reduce(Tensor[] params, Tensor[] grads, Tensor[] backups, bool first) -> Tensor",
           _fake_pgd_reduce),
        # if write_backup: B <- P.  n = sqrt(grad_sumsq[i]); if n != 0 and n not NaN: P <- P + eps*G/n
        Op("fgm_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
           "Tensor grad_sumsq, float epsilon, bool write_backup) -> ()", _fake_fgm_perturb_),
        # if write_backup: B <- P.  P <- P + eps*sign(G)
        Op("fgsm_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
           "float epsilon, bool write_backup) -> ()", _fake_fgsm_perturb_),
        # PGD step with the analytic projection (docs/methods.md §3 (PGD)), stats from pgd_reduce.
        Op("pgd_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
           "Tensor stats, float alpha, float epsilon, bool first) -> ()", _fake_pgd_perturb_),
        # AWP step (docs/methods.md §4 (AWP (Kaggle))) with the box B +- adv_eps*|B| recomputed from B.
        Op("awp_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
           "Tensor grad_sumsq, Tensor param_sumsq, float adv_lr, float adv_eps, bool first) -> ()",
           _fake_awp_perturb_),
        # P <- B, bit-exact.
        Op("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()", _fake_restore_),
    ),
    torch_module="fused_adv._torch.weight",
    triton_module="fused_adv._triton.weight",
)
