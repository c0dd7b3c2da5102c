"""Compile-check every csrc/cuda/*.cu with nvcc, without a GPU and without a CUDA build of torch.

CPU torch cannot build or link a CUDA extension, but its headers (c10/cuda included) are enough
to compile each translation unit to an object file, which catches every syntax, template and
device/host error the GPU machines would hit.  Flags mirror torch.utils.cpp_extension's:

    nvcc -c -gencode=arch=compute_90,code=sm_90 -std=c++20 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
         <torch include paths> <python include> -Icsrc -DFUSED_ADV_WITH_CUDA
         -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H <torch's COMMON_NVCC_FLAGS>

(C10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU torch ships no c10/cuda/impl/cuda_cmake_macros.h.)
About 45 s and 1.5 GB of memory per translation unit here; files are compiled one at a time.
Prints the time of each file; exits 1 if any file fails, 2 if nvcc is missing.

    python tools/cuda_compile_check.py [--nvcc PATH] [--arch 90] [files ...]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if os.path.exists(explicit) else shutil.which(explicit)
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def nvcc_command(nvcc: str, src: str, obj: str, arch: str) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    includes = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    return [
        nvcc, "-c", src, "-o", obj,
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-std=c++20", "-O3",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DFUSED_ADV_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "--compiler-options", "-fPIC",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *[f"-I{p}" for p in includes],
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="default: every csrc/cuda/*.cu")
    ap.add_argument("--nvcc", default=None, help="nvcc to use (default: $NVCC, PATH, $CUDA_HOME/bin)")
    ap.add_argument("--arch", default="90", help="compute capability to compile for (default 90 = H100/H200)")
    args = ap.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("cuda_compile_check: nvcc not found", file=sys.stderr)
        return 2
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not files:
        print("cuda_compile_check: no .cu files", file=sys.stderr)
        return 1
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in files:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = nvcc_command(nvcc, src, obj, args.arch)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            rel = os.path.relpath(src, ROOT)
            if proc.returncode != 0 or not os.path.exists(obj):
                failed.append(rel)
                print(f"FAIL {rel} ({dt:.1f} s)\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
            else:
                print(f"ok   {rel} ({dt:.1f} s, {os.path.getsize(obj) / 1e6:.1f} MB object)")
                if proc.stderr.strip():  # warnings: shown, not fatal
                    print(proc.stderr)
    if failed:
        print(f"cuda_compile_check: {len(failed)} of {len(files)} files failed: {', '.join(failed)}")
        return 1
    print(f"cuda_compile_check: {len(files)} files compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
