"""fused_adv.ops: the multi-tensor ops every fused method is built from.

Each op is a ``torch.ops.fused_adv.*`` custom op (schema in csrc/ops.cpp, fake impl registered,
torch.compile-safe) and a Python function here that validates arguments and routes to a backend
(cuda, triton, cpp, torch).  See ``python -m fused_adv.info`` for what this install can run.
"""
from fused_adv.ops import _library  # noqa: F401  (defines the ops before anything uses them)
from fused_adv.ops._registry import BACKENDS, BackendUnavailableError, resolve, why_not
from fused_adv.ops.activation import (  # registers the activation family (SiFT, FreeLB, SMART)
    attach_delta,
    freelb_reduce,
    freelb_update_,
    ln_delta,
    ln_delta_bwd,
    ln_delta_fwd,
    row_absmax_sumsq,
    sift_perturb,
    sift_update_,
    smart_update_,
)
from fused_adv.ops.weight import (
    awp_perturb_,
    fgm_perturb_,
    fgsm_perturb_,
    multi_tensor_sumsq,
    pgd_perturb_,
    pgd_reduce,
    restore_,
)

__all__ = [
    "BACKENDS", "BackendUnavailableError", "resolve", "why_not",
    "multi_tensor_sumsq", "pgd_reduce", "fgm_perturb_", "fgsm_perturb_", "pgd_perturb_",
    "awp_perturb_", "restore_",
    "ln_delta_fwd", "ln_delta_bwd", "ln_delta", "attach_delta", "row_absmax_sumsq", "sift_perturb",
    "sift_update_", "smart_update_", "freelb_reduce", "freelb_update_",
]
