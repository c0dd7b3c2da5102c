// The one place the fused_adv op schemas are defined (TORCH_LIBRARY may appear only once per
// namespace in a process: a second definition aborts).  Kernels register elsewhere with
// TORCH_LIBRARY_IMPL(fused_adv, CPU) in csrc/cpu/ and TORCH_LIBRARY_IMPL(fused_adv, CUDA) in
// csrc/cuda/.  fused_adv/ops/_schemas.py holds the same strings for installs without this
// extension; tests/test_ops_contract.py checks they agree.  Conventions are documented there.
#include <torch/extension.h>

TORCH_LIBRARY(fused_adv, m) {
  m.def("multi_tensor_sumsq(Tensor[] tensors) -> Tensor");
  m.def("pgd_reduce(Tensor[] params, Tensor[] grads, Tensor[] backups, bool first) -> Tensor");
  m.def("fgm_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "Tensor grad_sumsq, float epsilon, bool write_backup) -> ()");
  m.def("fgsm_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "float epsilon, bool write_backup) -> ()");
  m.def("pgd_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "Tensor stats, float alpha, float epsilon, bool first) -> ()");
  m.def("awp_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
        "Tensor grad_sumsq, Tensor param_sumsq, float adv_lr, float adv_eps, bool first) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  // activation family (SiFT / FreeLB / SMART): fused_adv/ops/_schemas_activation.py
  m.def("ln_delta_fwd(Tensor x, Tensor? delta, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("ln_delta_bwd(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd) -> Tensor");
  m.def("row_absmax_sumsq(Tensor x) -> Tensor");
  m.def("sift_perturb(Tensor xhat, Tensor noise, float bound) -> (Tensor, Tensor)");
  m.def("sift_update_(Tensor(a!) delta, Tensor grad, Tensor xhat, Tensor stats, float lr) -> Tensor");
  m.def("smart_update_(Tensor(a!) noise, Tensor grad, Tensor stats, float step_size, float epsilon) -> Tensor");
  m.def("freelb_reduce(Tensor delta, Tensor grad, bool linf) -> Tensor");
  m.def("freelb_update_(Tensor(a!) delta, Tensor grad, Tensor stats, float lr, float max_norm, bool linf) -> ()");
}

// A Python module so that `import fused_adv._C` loads the library (and runs the registrations).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_adv compiled kernels (registered as torch.ops.fused_adv.*)";
  m.def("built_with_cuda", []() {
#ifdef FUSED_ADV_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
