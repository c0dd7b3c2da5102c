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
