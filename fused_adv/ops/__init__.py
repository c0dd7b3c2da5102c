"""fused_adv.ops: the multi-tensor ops every fused method is built from.

Each op is a ``torch.ops.fused_adv.*`` custom op (schema, fake impl, torch.compile-safe) and a
Python function here that validates arguments and routes to a backend (cuda, triton, cpp, torch;
see fused_adv.ops._registry).  ``python -m fused_adv.info`` says what this install can run.

Op families
-----------
Ops come in families (``weight``: FGM/FGSM/PGD/AWP; ``activation``: SiFT/FreeLB/SMART;
``weight_ext``: MI-FGSM and the paper's AWP; ``free``: the original FreeAT's sign step; ``sam``:
SAM / ASAM).  A family is one declarative :class:`~fused_adv.ops._library.OpFamily` record, and
every family is registered the same way: :data:`FAMILIES` below lists the records, and
``_library.register(FAMILIES)`` (called once, at the end of this file) defines each schema,
registers the torch backend where no native kernel exists and the fake impls, and fills the tables
the backend registry reads.  Importing a family module registers nothing.

Adding a family ``foo`` touches one new file per backend plus one record:

1. ``fused_adv/ops/foo.py``: the public wrappers (validate arguments, then
   ``kernel(resolve(backend, device, op), op)(*args)``), one fake impl per op next to them
   (``_fake_<op>``: same signature as the schema, returns empty tensors of the result's shape, dtype
   and device, or None), and at the end the record::

       FAMILY = OpFamily(
           name="foo",
           ops=(Op("<op>(Tensor x, float a) -> Tensor", _fake_<op>), ...),  # the ONLY copy of each schema
           torch_module="fused_adv._torch.foo",
           triton_module="fused_adv._triton.foo",   # or None: no Triton kernels
       )
2. ``fused_adv/_torch/foo.py``: one function per op, named like the op, with the schema's
   signature: the executable statement of the math (required; serves every device).
3. ``fused_adv/_triton/foo.py`` (optional): launchers with the same names and signatures.
4. ``csrc/cpu/foo.cpp`` / ``csrc/cuda/foo.cu`` (optional): kernels registered by op name in a
   ``TORCH_LIBRARY_IMPL(fused_adv, CPU|CUDA, m)`` block; no ``m.def`` anywhere in C++ (setup.py
   compiles every file in those folders; the dispatcher checks each kernel's C++ signature
   against the Python schema when it is defined).
5. Here: add ``foo.FAMILY`` to :data:`FAMILIES` and export the wrappers.

tests/test_ops_contract.py then runs its family-wide checks (schemas defined once, every native
kernel belongs to a record, fake impl and opcheck per op) on the new record without edits.
"""
from fused_adv.ops import _library, activation, free, sam, weight, weight_ext
from fused_adv.ops._registry import BACKENDS, BackendUnavailableError, resolve, why_not
from fused_adv.ops.activation import (
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
from fused_adv.ops.free import freeat_update_
from fused_adv.ops.sam import sam_perturb_, sam_sumsq
from fused_adv.ops.weight import (
    awp_perturb_,
    fgm_perturb_,
    fgsm_perturb_,
    multi_tensor_sumsq,
    pgd_perturb_,
    pgd_reduce,
    restore_,
)
from fused_adv.ops.weight_ext import awp_paper_add_, mifgsm_perturb_, multi_tensor_abssum

# Every op family, in the order `python -m fused_adv.info` lists their ops.
FAMILIES: tuple[_library.OpFamily, ...] = (weight.FAMILY, activation.FAMILY, weight_ext.FAMILY, free.FAMILY,
                                            sam.FAMILY)
_library.register(FAMILIES)

__all__ = [
    "BACKENDS", "BackendUnavailableError", "resolve", "why_not", "FAMILIES",
    "multi_tensor_sumsq", "pgd_reduce", "fgm_perturb_", "fgsm_perturb_", "pgd_perturb_",
    "awp_perturb_", "restore_",
    "ln_delta_fwd", "ln_delta_bwd", "ln_delta", "attach_delta", "row_absmax_sumsq", "sift_perturb",
    "sift_update_", "smart_update_", "freelb_reduce", "freelb_update_",
    "multi_tensor_abssum", "mifgsm_perturb_", "awp_paper_add_",
    "freeat_update_",
    "sam_sumsq", "sam_perturb_",
]
