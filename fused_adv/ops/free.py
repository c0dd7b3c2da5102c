"""Public op of the original FreeAT's sign step (the ``free`` family).

docs/methods.md §8 (FreeAT and YOPO).  The NLP variants of FreeAT and YOPO take FreeLB's per-sample
L2 step (:func:`fused_adv.ops.freelb_reduce` / :func:`fused_adv.ops.freelb_update_`); the
original FreeAT (mahyarnajibi/FreeAdversarialTraining) ascends a persistent noise buffer with a
sign step and a box clamp, which is this family's one op:

* :func:`freeat_update_` -- noise <- clamp(noise + step * sign(grad), -clip, clip), in place, one
  pass (reads noise and grad, writes noise: 3 passes of the noise's size), no host sync.

Conventions as fused_adv.ops.activation: float16, bfloat16, float32 or float64, element math in
float32 (float64 stays float64), one rounding on store; ``sign`` is torch.sign (sign(NaN) = 0,
sign(-0) = 0); the clamp keeps NaN (torch.clamp).  Importing this module registers nothing
(fused_adv/ops/__init__.py registers :data:`FAMILY`).
"""
from __future__ import annotations

from torch import Tensor

from fused_adv.ops._library import Op, OpFamily
from fused_adv.ops._registry import kernel, resolve
from fused_adv.ops.activation import _updated_in_place


def freeat_update_(noise: Tensor, grad: Tensor, step: float, clip: float, *, backend: str | None = None) -> None:
    """The original FreeAT's noise update, in place (docs/methods.md §8 (FreeAT and YOPO)):
    ``noise <- clamp(noise + step * sign(grad), -clip, clip)`` element by element.

    ``noise``: contiguous float tensor of any shape (mutated); ``grad``: same shape, dtype and
    device (read).  ``step``: the sign-step size; ``clip``: the box radius, >= 0 (``math.inf``:
    no clamp).  Returns None; reads nothing back to the host.  Raises TypeError for a non-float
    dtype, ValueError for a non-contiguous ``noise``, mismatched shapes/dtypes/devices, a
    negative or NaN ``clip``, and BackendUnavailableError when the requested backend cannot run."""
    op = "freeat_update_"
    grad = _updated_in_place(op, "noise", noise, grad)
    clip = float(clip)
    if not clip >= 0:
        raise ValueError(f"fused_adv.{op}: clip must be >= 0 (math.inf for no clamp), got {clip}")
    if noise.numel() == 0:
        return
    kernel(resolve(backend, noise.device, op), op)(noise, grad, float(step), clip)


def _fake_freeat_update_(noise, grad, step, clip):
    return None


FAMILY = OpFamily(
    name="free",
    ops=(
        # noise <- clamp(noise + step * sign(grad), -clip, clip) (docs/methods.md §8 (FreeAT and YOPO))
        Op("freeat_update_(Tensor(a!) noise, Tensor grad, float step, float clip) -> ()", _fake_freeat_update_),
    ),
    torch_module="fused_adv._torch.free",
    triton_module="fused_adv._triton.free",
)

__all__ = ["freeat_update_", "FAMILY"]
