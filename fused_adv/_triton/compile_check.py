"""Compile every Triton kernel variant for a GPU target without a GPU (CI's check of the GPU path).

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not the compiler: type errors of
the compiled path (loop-carried types, scalar/block mixing, pointer casts) and lost vectorisation
only show when compiling.  ``triton.compile`` can target sm_90 on a CPU-only machine (it needs
the NVIDIA backend and ptxas that ship with the triton wheel), so this compiles each variant to
PTX and reports the 16-byte vector accesses found.

    python -m fused_adv._triton.compile_check [--all] [--arch 90]

Must run WITHOUT TRITON_INTERPRET=1 (kernels are then real JITFunctions).  Exit status 1 if a
variant fails to compile or an aligned variant has no vector load.
"""
from __future__ import annotations

import argparse
import re
import sys
import time


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def variants(all_variants: bool):
    """(name, kernel, signature, constexprs, expect_vector_loads) for each variant."""
    from fused_adv._triton import multi_tensor as mt
    from fused_adv._triton import weight as w
    kinds = {"f32": mt.F32, "f16": mt.F16, "bf16": mt.BF16, "f64": mt.F64}
    update_sig = {"chunks": "*i64", "tens": "*i64", "s0": "*fp32", "s1": "*fp32", "F0": "fp32", "F1": "fp32",
                  "E_HI": "fp32", "E_MID": "fp32", "E_LO": "fp32"}
    reduce_sig = {"chunks": "*i64", "tens": "*i64", "part": "*fp64", "chunk_base": "i64"}
    restore_sig = {"chunks": "*i64", "tens": "*i64"}
    ops = {"fgm": w.FGM, "fgsm": w.FGSM, "pgd": w.PGD, "awp": w.AWP}
    out = []
    for kname, kind in kinds.items():
        cfg = mt.launch_config(kind, 1 << 20)
        for aligned in ((True, False) if all_variants else (True,)):
            tag = f"{kname}{'' if aligned else '-unaligned'}"
            common = dict(KIND=kind, ALIGNED=aligned, CHUNK_SIZE=cfg.chunk, BLOCK=cfg.block)
            for oname, op in ops.items():
                for write_b in ((False, True) if all_variants else (op in (w.FGSM, w.AWP),)):
                    out.append((f"update[{oname},{tag},write_b={write_b}]", w._update_kernel, update_sig,
                                dict(OP=op, WRITE_B=write_b, **common), aligned, cfg.num_warps))
            for oname, op, first, ts, ncol in (("sumsq", w.SUMSQ, False, 3, 1), ("pgd", w.PGD_STATS, False, 5, 3),
                                               ("pgd-first", w.PGD_STATS, True, 5, 3)):
                out.append((f"reduce[{oname},{tag}]", w._reduce_kernel, reduce_sig,
                            dict(OP=op, FIRST=first, TS=ts, NCOL=ncol, **common), aligned, cfg.num_warps))
            out.append((f"restore[{tag}]", w._restore_kernel, restore_sig, common, aligned, cfg.num_warps))
    for ncol in (1, 3):
        out.append((f"finish[ncol={ncol}]", mt._finish_kernel,
                    {"ranges": "*i64", "part": "*fp64", "out": "*fp32", "n": "i32"},
                    dict(NCOL=ncol, NCOL_P2=triton_next_pow2(ncol), TPB=mt.FINISH_TENSORS, ROWS=mt.FINISH_ROWS),
                    False, 4))
    return out + activation_variants() + weight_ext_variants()


def weight_ext_variants():
    """The weight_ext kernels (fused_adv/_triton/weight_ext.py: MI-FGSM, the AWP paper's add), per
    dtype kind, aligned, as the launchers configure them on a GPU."""
    from fused_adv._triton import multi_tensor as mt
    from fused_adv._triton import weight_ext as x
    three = lambda p: {f"{p}_HI": "fp32", f"{p}_MID": "fp32", f"{p}_LO": "fp32"}  # noqa: E731
    out = []
    for kname, kind in {"f32": mt.F32, "f16": mt.F16, "bf16": mt.BF16, "f64": mt.F64}.items():
        cfg = mt.launch_config(kind, 1 << 20)
        common = dict(KIND=kind, ALIGNED=True, CHUNK_SIZE=cfg.chunk, BLOCK=cfg.block)
        out.append((f"abssum[{kname}]", x._abssum_kernel,
                    {"chunks": "*i64", "tens": "*i64", "part": "*fp64", "chunk_base": "i64"}, common, True,
                    cfg.num_warps))
        for first in (True, False):
            out.append((f"mifgsm[{kname},first={first}]", x._mifgsm_kernel,
                        {"chunks": "*i64", "tens": "*i64", "s0": "*fp32", **three("A"), **three("E"), **three("D")},
                        dict(FIRST=first, **common), True, cfg.num_warps))
        out.append((f"awp_paper_add[{kname}]", x._awp_paper_kernel,
                    {"chunks": "*i64", "tens": "*i64", "s0": "*fp32", "s1": "*fp32", "SCALE": "fp32", **three("C")},
                    common, True, cfg.num_warps))
    return out


def activation_variants():
    """The activation-space kernels (fused_adv/_triton/activation.py) for BERT-base rows (H = 768),
    fp32 and bf16 activations; the tiles are what the launchers pick on a GPU."""
    import triton.language as tl

    from fused_adv._triton import activation as a
    H = 768
    rows = dict(OPMATH=tl.float32, BLOCK_R=a._TILE // triton_next_pow2(H), BLOCK_H=triton_next_pow2(H))
    sizes = {"ROWS": "i32", "H": "i32"}
    out = []
    for tname, t in (("f32", "*fp32"), ("bf16", "*bf16")):
        for has_delta in (False, True):
            out.append((f"ln_delta_fwd[{tname},delta={has_delta}]", a._ln_fwd_kernel,
                        {"X": t, "DELTA": "*fp32", "OUT": t, "MEAN": "*fp32", "RSTD": "*fp32", **sizes, "eps": "fp32"},
                        dict(HAS_DELTA=has_delta, **rows), False, 4))
        out += [
            (f"ln_delta_bwd[{tname}]", a._ln_bwd_kernel,
             {"DY": t, "X": t, "MEAN": "*fp32", "RSTD": "*fp32", "DX": t, **sizes}, rows, False, 4),
            (f"row_absmax_sumsq[{tname}]", a._row_stats_kernel, {"X": t, "STATS": "*fp32", **sizes}, rows, False, 4),
            (f"sift_perturb[{tname}]", a._sift_perturb_kernel,
             {"XHAT": t, "NOISE": t, "DELTA": "*fp32", "OUT": t, "N": "i32", "bound": "fp32"},
             dict(OPMATH=tl.float32, BLOCK=a.CHUNK_SIZE), False, 4),
            (f"sift_update_[{tname}]", a._sift_update_kernel,
             {"DELTA": "*fp32", "G": "*fp32", "XHAT": t, "STATS": "*fp32", "OK": "*i32", "OUT": t, **sizes,
              "lr": "fp32"}, dict(XOPMATH=tl.float32, **rows), False, 4),
            (f"smart_update_[{tname}]", a._smart_update_kernel,
             {"NOISE": t, "G": t, "OK": "*i32", **sizes, "step_size": "fp32", "epsilon": "fp32"}, rows, False, 4),
        ]
        for linf in (False, True):
            out.append((f"freelb_reduce[{tname},linf={linf}]", a._freelb_reduce_kernel,
                        {"D": t, "G": t, "PART": "*fp32", "N": "i32", "NCHUNK": "i32"},
                        dict(LINF=linf, OPMATH=tl.float32, BLOCK=a.CHUNK_SIZE), False, 4))
            out.append((f"freelb_update_[{tname},linf={linf}]", a._freelb_update_kernel,
                        {"D": t, "G": t, "STATS": "*fp32", "N": "i32", "lr": "fp32", "max_norm": "fp32"},
                        dict(LINF=linf, PROJECT=True, OPMATH=tl.float32, BLOCK=a.CHUNK_SIZE), False, 4))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="unaligned and every write_backup variant too")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    import os
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, sig, const, aligned, num_warps in variants(args.all):
        t0 = time.time()
        try:
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
            ptx = triton.compile(src, target=target, options={"num_warps": num_warps}).asm["ptx"]
        except Exception as exc:  # report every failure, not just the first
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}")
            failed += 1
            continue
        vld = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))
        vst = len(re.findall(r"st\.global(?:\.\w+)*\.v[24]\.", ptx))
        ok = vld > 0 or not aligned
        failed += not ok
        print(f"{'ok  ' if ok else 'NOVEC'} {name}: {vld} vector loads, {vst} vector stores, "
              f"{time.time() - t0:.1f} s")
    print(f"{failed} failed" if failed else "all compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
