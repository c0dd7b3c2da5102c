// The Python module fused_adv._C.  It defines no op: every fused_adv schema is written once, in
// its family's record (fused_adv/ops/<family>.py, `FAMILY = OpFamily(...)`), and defined from
// Python by fused_adv.ops._library.register.  The kernels register by op name with
// TORCH_LIBRARY_IMPL(fused_adv, CPU) in csrc/cpu/<family>.cpp and TORCH_LIBRARY_IMPL(fused_adv,
// CUDA) in csrc/cuda/<family>.cu; the dispatcher keeps such a kernel until the schema is defined,
// then checks the kernel's C++ signature against it (a mismatch fails at `import fused_adv`).
// See docs/design.md §3 (Op contract).  Define no schema in C++ (no TORCH_LIBRARY block, no
// m.def of an op): it would then exist twice; tests/test_ops_contract.py checks this.
#include <torch/extension.h>

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
