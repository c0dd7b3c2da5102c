"""Build for fused_adv: the Python package plus the optional compiled extension fused_adv._C.

The extension (csrc/) is built with ninja through torch.utils.cpp_extension:
  * C++ CPU kernels whenever a C++ compiler is present;
  * CUDA kernels only when torch has CUDA (torch.version.cuda) and nvcc is found.
Environment switches:
  FUSED_ADV_BUILD_EXT=0    build no extension (the pure-PyTorch backend serves)
  FUSED_ADV_CUDA=0 / =1    skip / force the CUDA sources (forcing fails loudly if impossible)
  FUSED_ADV_REQUIRE_EXT=1  a failed extension build is an error (default: warn, torch serves)
  FUSED_ADV_OPENMP=0       build the CPU kernels without OpenMP (they then run on one thread)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured by torch.utils.cpp_extension.
A failed extension build is reported and skipped: it never breaks `import fused_adv`.
Install with `pip install -e . --no-build-isolation` (an isolated build env would pull an
unpinned torch, i.e. several GB of CUDA wheels).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FUSED_ADV_BUILD_EXT", "1") == "0":
        print("fused_adv: FUSED_ADV_BUILD_EXT=0, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fused_adv: torch is not importable at build time; install torch first, then build "
              "with --no-build-isolation. Building no extension.", file=sys.stderr)
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu")
    want_cuda = os.environ.get("FUSED_ADV_CUDA")
    can_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and bool(cuda_sources)
    if want_cuda == "1" and not can_cuda:
        raise RuntimeError(
            f"FUSED_ADV_CUDA=1 but the CUDA kernels cannot be built (torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}, {len(cuda_sources)} .cu files)")
    use_cuda = can_cuda and want_cuda != "0"

    # No -std flag: torch.utils.cpp_extension appends the standard its own headers need (and
    # only when none is given): c++20 for torch 2.13, whose headers do not build as c++17.
    # -ffp-contract=off: no fused multiply-add contraction, so the element math rounds after
    # each op exactly as the torch backend does (fused_adv/_torch/weight.py).
    cxx = ["-O3", "-ffp-contract=off"]
    # at::parallel_for is an inline OpenMP region (ATen/ParallelOpenMP.h): without -fopenmp it
    # silently runs on one thread.  The extension links libgomp.so.1, which resolves to the copy
    # torch already loaded (same soname), so torch.set_num_threads governs our kernels too.
    if os.environ.get("FUSED_ADV_OPENMP", "1") == "1" and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        ext = CUDAExtension(
            "fused_adv._C", sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[("FUSED_ADV_WITH_CUDA", None)],
            # no --use_fast_math: it flushes denormals and approximates sqrt and
            # division, and the op contract is IEEE fp32 math (fused_adv/_torch/weight.py).
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])
    else:
        ext = CppExtension("fused_adv._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension, but a failure leaves a working pure-PyTorch install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, header mismatch, ...
                if want_cuda == "1" or os.environ.get("FUSED_ADV_REQUIRE_EXT") == "1":
                    raise
                print(f"fused_adv: WARNING: extension build failed ({exc}); the torch backend "
                      "will serve. Set FUSED_ADV_REQUIRE_EXT=1 to make this an error.", file=sys.stderr)

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("fused_adv: no C++ compiler found; building no extension", file=sys.stderr)
        return [], {}
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
