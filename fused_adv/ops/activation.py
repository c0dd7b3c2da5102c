"""Public ops for the activation-space methods (SiFT, FreeLB, SMART), op family "activation".

Each function validates its arguments, picks a backend (``backend=`` argument, else
``FUSED_ADV_BACKEND``, else auto; see fused_adv.ops._registry) and calls it.  None of them reads
a value back to the host.  Shapes and dtypes:

* activations ``x``, ``xhat``, ``grad``, ``noise`` are [..., H] tensors (rows of H elements) of
  dtype float16, bfloat16, float32 or float64; the SiFT ``delta`` is float32 (or float64) of the
  same shape; FreeLB's ``delta`` and ``grad`` are [B, ...] of one dtype;
* statistics are float32 tensors on the same device ([rows, 2] or [B, 3]);
* ``*_`` functions mutate their first argument in place (it must be contiguous).

:func:`ln_delta` is differentiable (an autograd.Function over ``ln_delta_fwd``/``ln_delta_bwd``)
so it can be used inside a model's forward; :func:`attach_delta` makes a precomputed perturbed
activation differentiable w.r.t. its delta.

The family record :data:`FAMILY` at the end of this file is the only place the op schemas are
written; importing this module registers nothing (fused_adv/ops/__init__.py registers the records).
Schema conventions (all ops of this family):

- activations are contiguous [..., H] tensors ("rows" of H elements, rows = numel / H) for the
  row-wise ops, [B, ...] for the per-sample FreeLB ops (a "sample" is everything after dim 0);
- float16, bfloat16, float32 or float64; all math in float32 (float64 stays float64), rounded
  once when stored; statistics are float32 (float64 for float64 inputs);
- guards (NaN/Inf) are decided on the device; nothing is read back by the host;
- ``*_`` ops mutate the argument annotated ``(a!)`` in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fused_adv.ops._library import Op, OpFamily
from fused_adv.ops._registry import kernel, resolve

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WIDE = (torch.float32, torch.float64)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows_of(t: Tensor) -> int:
    return t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else (0 if t.dim() else 1)


# ----------------------------------------------------------------------------- validation
def _float(op: str, name: str, t: Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fused_adv.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"fused_adv.{op}: {name} has dtype {t.dtype}; expected one of "
                        f"{', '.join(str(d) for d in dtypes)}")
    if t.dim() == 0:
        raise ValueError(f"fused_adv.{op}: {name} must have at least one dimension")


def _like(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str, same_dtype: bool = True) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"fused_adv.{op}: {name} is {tuple(t.shape)} but {ref_name} is {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"fused_adv.{op}: {name} is on {t.device}, {ref_name} on {ref.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise ValueError(f"fused_adv.{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}")


def _contig(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _mutable(op: str, name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"fused_adv.{op}: {name} is mutated in place and must be contiguous")


def _updated_in_place(op: str, name: str, t: Tensor, grad: Tensor, dtypes=FLOAT_DTYPES) -> Tensor:
    """Checks of the in-place update ops: ``t`` (updated) is a mutable float tensor and ``grad``
    matches it; returns ``grad`` contiguous."""
    _float(op, name, t, dtypes)
    _mutable(op, name, t)
    _like(op, "grad", grad, t, name)
    return _contig(grad)


def _stats(op: str, stats: Tensor, n: int, cols: int, device) -> Tensor:
    if tuple(stats.shape) != (n, cols) or stats.dtype != torch.float32 or stats.device != device:
        raise ValueError(f"fused_adv.{op}: stats must be float32 {(n, cols)} on {device}, got "
                         f"{stats.dtype} {tuple(stats.shape)} on {stats.device}")
    return _contig(stats)


def _run(op: str, backend, device, *args):
    return kernel(resolve(backend, device, op), op)(*args)


# ----------------------------------------------------------------------------- raw ops
def ln_delta_fwd(x: Tensor, delta: Tensor | None = None, eps: float = 1e-7, *,
                 backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd): out = LayerNorm(x) over the last dim without affine, plus ``delta``
    (any float dtype, added in float32) if given, in x's dtype; mean/rstd: [rows] float32
    (float64 for float64 x).  Not differentiable: use :func:`ln_delta` in a forward."""
    _float("ln_delta_fwd", "x", x)
    x = _contig(x)
    if delta is not None:
        _float("ln_delta_fwd", "delta", delta)
        _like("ln_delta_fwd", "delta", delta, x, "x", same_dtype=False)
        delta = _contig(delta)
    return _run("ln_delta_fwd", backend, x.device, x, delta, float(eps))


def ln_delta_bwd(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, *,
                 backend: str | None = None) -> Tensor:
    """grad w.r.t. x of the non-affine LayerNorm (x's dtype), given mean/rstd from the forward."""
    _float("ln_delta_bwd", "x", x)
    _like("ln_delta_bwd", "grad_out", grad_out, x, "x", same_dtype=False)
    rows = _rows_of(x)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != (rows,) or t.dtype != _acc_dtype(x) or t.device != x.device:
            raise ValueError(f"fused_adv.ln_delta_bwd: {name} must be {_acc_dtype(x)} [{rows}] on {x.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return _run("ln_delta_bwd", backend, x.device, _contig(grad_out), _contig(x), _contig(mean), _contig(rstd))


def row_absmax_sumsq(x: Tensor, *, backend: str | None = None) -> Tensor:
    """float32 [rows, 2]: per row (max |x_j| (NaN if the row holds a NaN), sum x_j^2)."""
    _float("row_absmax_sumsq", "x", x)
    return _run("row_absmax_sumsq", backend, x.device, _contig(x))


def sift_perturb(xhat: Tensor, noise: Tensor, bound: float, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """SiFT init in one pass: (delta, out) with delta = clamp(float(noise), -bound, bound) float32
    and out = (float(xhat) + delta) in xhat's dtype."""
    _float("sift_perturb", "xhat", xhat)
    _float("sift_perturb", "noise", noise)
    _like("sift_perturb", "noise", noise, xhat, "xhat", same_dtype=False)
    return _run("sift_perturb", backend, xhat.device, _contig(xhat), _contig(noise), float(bound))


def sift_update_(delta: Tensor, grad: Tensor, xhat: Tensor, stats: Tensor | None = None, lr: float = 1e-4, *,
                 backend: str | None = None) -> Tensor:
    """SiFT step, in place on ``delta`` (float32): if ‖grad‖ is finite (decided on the device from
    ``stats``), delta += lr * grad / (1e-6 + max_j |grad_j|) per row; else delta is unchanged.
    Returns the new perturbed activation (float(xhat) + delta) in xhat's dtype.
    ``stats`` = :func:`row_absmax_sumsq` (grad) (computed here when None)."""
    op = "sift_update_"
    grad = _updated_in_place(op, "delta", delta, grad, _WIDE)
    _float(op, "xhat", xhat)
    _like(op, "xhat", xhat, delta, "delta", same_dtype=False)
    if stats is None:
        stats = row_absmax_sumsq(grad, backend=backend)
    stats = _stats(op, stats, _rows_of(delta), 2, delta.device)
    return _run(op, backend, delta.device, delta, grad, _contig(xhat), stats, float(lr))


def smart_update_(noise: Tensor, grad: Tensor, stats: Tensor | None = None, step_size: float = 1e-3,
                  epsilon: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """SMART step, in place on ``noise``: if ‖grad‖ is finite (decided on the device),
    noise <- v / (max_j |v_j| + epsilon) per row with v = noise + step_size * grad; else noise is
    unchanged.  Returns ok: float32 0-dim, 1 if the step was taken, 0 if not."""
    op = "smart_update_"
    grad = _updated_in_place(op, "noise", noise, grad)
    if stats is None:
        stats = row_absmax_sumsq(grad, backend=backend)
    stats = _stats(op, stats, _rows_of(noise), 2, noise.device)
    return _run(op, backend, noise.device, noise, grad, stats, float(step_size), float(epsilon))


def freelb_reduce(delta: Tensor, grad: Tensor, linf: bool, *, backend: str | None = None) -> Tensor:
    """float32 [B, 3] per sample (dim 0): l2: (‖g‖², <delta, g>, ‖delta‖²); linf: (max |g|, 0, 0)."""
    _float("freelb_reduce", "delta", delta)
    _like("freelb_reduce", "grad", grad, delta, "delta")
    return _run("freelb_reduce", backend, delta.device, _contig(delta), _contig(grad), bool(linf))


def freelb_update_(delta: Tensor, grad: Tensor, stats: Tensor | None, lr: float, max_norm: float, linf: bool, *,
                   backend: str | None = None) -> None:
    """FreeLB ascent step + projection per sample, in place on ``delta`` (docs/methods.md §6 (FreeLB)):
    l2: delta += lr*g/max(‖g_b‖, 1e-8), then samples with ‖delta_b‖ > max_norm (> 0) are scaled
    onto the sphere; linf: delta += lr*g/max(max|g_b|, 1e-8), then clamp to +-max_norm (> 0).
    ``stats`` = :func:`freelb_reduce` (delta, grad, linf) (computed here when None)."""
    op = "freelb_update_"
    grad = _updated_in_place(op, "delta", delta, grad)
    if stats is None:
        stats = freelb_reduce(delta, grad, linf, backend=backend)
    stats = _stats(op, stats, delta.shape[0], 3, delta.device)
    _run(op, backend, delta.device, delta, grad, stats, float(lr), float(max_norm), bool(linf))


# ----------------------------------------------------------------------------- autograd
class _LNDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, eps, backend):
        out, mean, rstd = ln_delta_fwd(x, delta, eps, backend=backend)
        ctx.save_for_backward(x, mean, rstd)
        ctx.backend = backend
        ctx.delta_dtype = None if delta is None else delta.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd = ctx.saved_tensors
        dx = ddelta = None
        if ctx.needs_input_grad[0]:
            dx = ln_delta_bwd(grad_out, x, mean, rstd, backend=ctx.backend)
        if ctx.delta_dtype is not None and ctx.needs_input_grad[1]:
            ddelta = grad_out.to(ctx.delta_dtype)
        return dx, ddelta, None, None


def ln_delta(x: Tensor, delta: Tensor | None = None, eps: float = 1e-7, *, backend: str | None = None) -> Tensor:
    """Differentiable LayerNorm(x) (+ delta) over the last dim, no affine, eps as given; output in
    x's dtype.  Gradients flow to x and (if it requires grad) to delta."""
    return _LNDelta.apply(x, delta, float(eps), backend)


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, delta):
        ctx.delta_dtype = delta.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return None, grad_out.to(ctx.delta_dtype)


def attach_delta(out: Tensor, delta: Tensor) -> Tensor:
    """``out`` (a precomputed ``xhat.detach() + delta``, e.g. from :func:`sift_update_`) as a tensor
    whose gradient flows to ``delta`` (d out / d delta = identity, cast to delta's dtype)."""
    return _Attach.apply(out, delta)


# ----------------------------------------------------------------------------- fake impls
# What torch.compile and torch.library.opcheck see of each op: results' shapes, dtypes, devices.
def _fake_ln_delta_fwd(x, delta, eps):
    rows = _rows_of(x)
    acc = _acc_dtype(x)
    return torch.empty_like(x), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


def _fake_ln_delta_bwd(grad_out, x, mean, rstd):
    return torch.empty_like(x)


def _fake_row_absmax_sumsq(x):
    return x.new_empty(_rows_of(x), 2, dtype=torch.float32)


def _fake_sift_perturb(xhat, noise, bound):
    return torch.empty_like(noise, dtype=torch.float32), torch.empty_like(xhat)


def _fake_sift_update_(delta, grad, xhat, stats, lr):
    return torch.empty_like(xhat)


def _fake_smart_update_(noise, grad, stats, step_size, epsilon):
    return noise.new_empty((), dtype=torch.float32)


def _fake_freelb_reduce(delta, grad, linf):
    return delta.new_empty(delta.shape[0], 3, dtype=torch.float32)


def _fake_freelb_update_(delta, grad, stats, lr, max_norm, linf):
    return None


# ----------------------------------------------------------------------------- family record
FAMILY = OpFamily(
    name="activation",
    ops=(
        # out = LN(x) (+ delta), LN without affine over the last dim; returns (out, mean, rstd)
        # with mean, rstd of shape [rows] (float32; float64 for float64 x).
        Op("ln_delta_fwd(Tensor x, Tensor? delta, float eps) -> (Tensor, Tensor, Tensor)", _fake_ln_delta_fwd),
        # grad_x of the non-affine LayerNorm from (grad_out, x, mean, rstd).
        Op("ln_delta_bwd(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd) -> Tensor", _fake_ln_delta_bwd),
        # per row: (max_j |x_j| (NaN if the row has a NaN), sum_j x_j^2)  -> float32 [rows, 2]
        Op("row_absmax_sumsq(Tensor x) -> Tensor", _fake_row_absmax_sumsq),
        # SiFT init: delta = clamp(float(noise), -bound, bound) (float32); out = (float(xhat) + delta)
        # in xhat's dtype.  Returns (delta, out).
        Op("sift_perturb(Tensor xhat, Tensor noise, float bound) -> (Tensor, Tensor)", _fake_sift_perturb),
        # SiFT step: if sum(stats[:, 1]) is finite: delta += lr * g / (1e-6 + stats[row, 0]);
        # returns out = (float(xhat) + delta) in xhat's dtype.  stats = row_absmax_sumsq(grad).
        Op("sift_update_(Tensor(a!) delta, Tensor grad, Tensor xhat, Tensor stats, float lr) -> Tensor",
           _fake_sift_update_),
        # SMART step: if sum(stats[:, 1]) is finite: v = noise + step_size * g;
        # noise <- v / (max_j |v_j| + epsilon) per row.  Returns ok (float32 0-dim, 1 or 0).
        Op("smart_update_(Tensor(a!) noise, Tensor grad, Tensor stats, float step_size, float epsilon) -> Tensor",
           _fake_smart_update_),
        # FreeLB per-sample statistics -> float32 [B, 3]:
        # l2: (sum g^2, sum delta*g, sum delta^2); linf: (max |g| (NaN-propagating), 0, 0).
        Op("freelb_reduce(Tensor delta, Tensor grad, bool linf) -> Tensor", _fake_freelb_reduce),
        # FreeLB step + projection per sample (docs/methods.md §6 (FreeLB)), stats from freelb_reduce.
        Op("freelb_update_(Tensor(a!) delta, Tensor grad, Tensor stats, float lr, float max_norm, bool linf) -> ()",
           _fake_freelb_update_),
    ),
    torch_module="fused_adv._torch.activation",
    triton_module="fused_adv._triton.activation",
)
