"""Schemas of the fused_adv custom ops.

The single source of truth is csrc/ops.cpp (``TORCH_LIBRARY(fused_adv, m)``): when the compiled
extension ``fused_adv._C`` loads, it defines these ops. When it is absent (no compiler, failed
build) the same strings are defined from Python, so the ops exist in every install.
tests/test_ops_contract.py checks that the two copies agree.

Conventions (all ops):
- lists are "tensor lists": any number of tensors (0 included), one device per call, mixed
  dtypes allowed across entries; within entry i, params[i], grads[i] and backups[i] share shape
  and dtype and are contiguous.
- reductions return float32 tensors on the tensors' device; nothing is read back by the host.
- ``*_`` ops mutate the arguments annotated ``(a!)`` / ``(b!)`` in place and return nothing.
"""

SCHEMAS: dict[str, str] = {
    # out[i] = sum(tensors[i]**2), accumulated in fp32 (or wider).  -> float32[N]
    "multi_tensor_sumsq": "multi_tensor_sumsq(Tensor[] tensors) -> Tensor",
    # out[i] = (||G_i||^2, <P_i - B_i, G_i>, ||P_i - B_i||^2); when first, columns 1, 2 are 0 and
    # backups are not read.  -> float32[N, 3]
    "pgd_reduce": "pgd_reduce(Tensor[] params, Tensor[] grads, Tensor[] backups, bool first) -> Tensor",
    # if write_backup: B <- P.  n = sqrt(grad_sumsq[i]); if n != 0 and n not NaN: P <- P + eps*G/n
    "fgm_perturb_": (
        "fgm_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "Tensor grad_sumsq, float epsilon, bool write_backup) -> ()"
    ),
    # if write_backup: B <- P.  P <- P + eps*sign(G)
    "fgsm_perturb_": (
        "fgsm_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "float epsilon, bool write_backup) -> ()"
    ),
    # PGD step with the analytic projection (SPEC.md section 3), stats from pgd_reduce.
    "pgd_perturb_": (
        "pgd_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "Tensor stats, float alpha, float epsilon, bool first) -> ()"
    ),
    # AWP step (SPEC.md section 4) with the box B +- adv_eps*|B| recomputed from B.
    "awp_perturb_": (
        "awp_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "Tensor grad_sumsq, Tensor param_sumsq, float adv_lr, float adv_eps, bool first) -> ()"
    ),
    # P <- B, bit-exact.
    "restore_": "restore_(Tensor(a!)[] params, Tensor[] backups) -> ()",
}
