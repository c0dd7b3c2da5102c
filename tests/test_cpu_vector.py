"""The C++ CPU kernels' two code paths give the same bits (csrc/cpu/vec.h, csrc/cpu/convert.h).

With AVX2 + F16C the kernels run their block loops 8 floats wide and convert bf16/fp16 with vector
instructions; FUSED_ADV_CPU_VECTOR=0 (read once per process, hence the subprocesses) selects the
scalar path: csrc/common's element functions and c10's scalar conversions.  Every bf16 / fp16 bit
pattern, and 65,536 random float32 bit patterns plus specials, go through every op as P, G and B;
the results of the two paths must be equal bit for bit.  One exception, stated by the op contract
(docs/design.md §3): a NaN produced by a reduction, or by float32 arithmetic on NaN operands,
may carry either operand's payload and sign (IEEE leaves the choice to the instruction's operand
order); such NaNs compare as NaN, every other bit must match.  (bf16 stores write c10's one
canonical NaN anyway; an fp16 NaN keeps its sign.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_adv.ops import _library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys, torch
    from fused_adv import ops

    def bits(ts):
        ts = [t.reshape(-1) for t in ts]
        return torch.cat([t.view(torch.int16 if t.element_size() == 2 else torch.int32) for t in ts])

    out = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if dt == torch.float32:
            gen = torch.Generator().manual_seed(0)
            raw = torch.randint(-2**31, 2**31 - 1, (65536,), generator=gen, dtype=torch.int64).to(torch.int32)
            special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45,
                                    3.4e38, -3.4e38, 1e-38]).view(torch.int32)
            allbits = torch.cat([special, raw]).view(torch.float32)
        else:
            allbits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dt)
        P = [allbits.clone(), allbits.clone()[:1001]]
        G = [allbits.roll(12345).clone(), allbits[:1001].roll(7).clone()]
        B = [allbits.roll(-999).clone(), allbits[:1001].roll(3).clone()]
        # finite, moderate G and B too, so that steps are taken and boxes are not all NaN
        Gf = [torch.randn(p.numel(), generator=torch.Generator().manual_seed(i)).to(dt) for i, p in enumerate(P)]
        Bf = [p + torch.randn(p.numel(), generator=torch.Generator().manual_seed(9 + i)).to(dt) * 0.01
              for i, p in enumerate(P)]
        gs = ops.multi_tensor_sumsq(Gf, backend="cpp")
        ps = ops.multi_tensor_sumsq(P, backend="cpp")
        out[f"{dt}-sumsq"] = torch.cat([ops.multi_tensor_sumsq(G, backend="cpp"), gs, ps])
        out[f"{dt}-pgd_reduce"] = torch.cat([ops.pgd_reduce(P, Gf, B, False, backend="cpp"),
                                             ops.pgd_reduce(P, Gf, Bf, False, backend="cpp")])
        for name in ("fgm", "fgsm", "pgd", "awp", "awp_box"):
            for grads in (G, Gf):
                Pc, Bc = [p.clone() for p in P], [b.clone() for b in B]
                if name == "fgm":
                    ops.fgm_perturb_(Pc, grads, Bc, torch.ones(2), 0.5, False, backend="cpp")
                elif name == "fgsm":
                    ops.fgsm_perturb_(Pc, grads, Bc, 0.01, False, backend="cpp")
                elif name == "pgd":
                    st = torch.tensor([[4.0, 1.0, 9.0], [1.0, 0.5, 0.25]])
                    ops.pgd_perturb_(Pc, grads, Bc, st, 0.3, 1.0, False, backend="cpp")
                elif name == "awp":
                    ops.awp_perturb_(Pc, grads, Bc, gs, ps, 1.0, 0.2, False, backend="cpp")
                else:
                    Bc = [p.clone() for p in Pc]
                    ops.awp_perturb_(Pc, grads, Bc, gs, ps, 1e3, 0.01, False, backend="cpp")
                out[f"{dt}-{name}-{grads is Gf}"] = bits(Pc)
        # the other families (csrc/cpu/sam.cpp, weight_ext.cpp)
        for adaptive in (False, True):
            out[f"{dt}-sam_sumsq-{adaptive}"] = ops.sam_sumsq(P, Gf, adaptive, backend="cpp")
            Pc = [p.clone() for p in P]
            ops.sam_perturb_(Pc, Gf, [torch.empty_like(p) for p in P], gs, 0.05, adaptive, backend="cpp")
            out[f"{dt}-sam-{adaptive}"] = bits(Pc)
        out[f"{dt}-abssum"] = torch.cat([ops.multi_tensor_abssum(G, backend="cpp"),
                                         ops.multi_tensor_abssum(Gf, backend="cpp")])
        n1 = ops.multi_tensor_abssum(Gf, backend="cpp")
        for first in (True, False):
            Pc, Bc, Mc = [p.clone() for p in P], [b.clone() for b in B], [g.clone() for g in G]
            ops.mifgsm_perturb_(Pc, Gf, Mc, Bc, n1, 0.01, 0.02, 0.9, first, backend="cpp")
            out[f"{dt}-mifgsm-{first}"] = bits(Pc + Mc)
        Pc = [p.clone() for p in P]
        ops.awp_paper_add_(Pc, G, ps, gs, 0.01, -1.0, backend="cpp")
        ops.awp_paper_add_(Pc, Gf, ps, gs, 0.01, 1.0, backend="cpp")
        out[f"{dt}-awp_paper"] = bits(Pc)
    torch.save(out, sys.argv[1])
""")


def _nan_canonical(key: str, t: torch.Tensor) -> torch.Tensor:
    """Integer view of result ``key`` in which every NaN has one bit pattern."""
    if t.is_floating_point():  # a reduction's float32 output
        t = t.view(torch.int32)
    dtype = {torch.int32: torch.float32, torch.int16: torch.float16 if key.startswith("torch.float16") else torch.bfloat16}[t.dtype]
    f = t.view(dtype)
    return torch.where(torch.isnan(f), torch.full_like(f, float("nan")), f).view(t.dtype)


@pytest.mark.skipif(not _library.has_native("fgm_perturb_", "cpu"), reason="no C++ kernels")
def test_vector_path_matches_the_scalar_path_bit_for_bit(tmp_path):
    results = []
    for flag in ("1", "0"):
        env = dict(os.environ, FUSED_ADV_CPU_VECTOR=flag)
        path = tmp_path / f"out{flag}.pt"
        subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, cwd=ROOT, timeout=300)
        results.append(torch.load(path))
    vec, scalar = results
    assert vec.keys() == scalar.keys()
    for key in vec:
        assert torch.equal(_nan_canonical(key, vec[key]), _nan_canonical(key, scalar[key])), key
    # the comparison is not vacuous: the steps moved the weights and the specials reached the sums
    assert not torch.equal(vec["torch.float32-awp-True"], vec["torch.float32-fgm-True"])
    assert torch.isnan(vec["torch.bfloat16-sumsq"]).any() and torch.isfinite(vec["torch.float32-sumsq"]).any()


ACTIVATION_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fused_adv import ops
    out = {}
    gen = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        acc = torch.float32
        x = (torch.randn(6, 40, 67, generator=gen) * 3).to(dt)   # H = 67: lanes and a tail
        x[0, 0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-30, -65504.0]).to(dt)
        g = torch.randn(6, 40, 67, generator=gen).to(dt)
        g[1, 2, 3] = float("nan")
        d = (torch.randn(6, 40, 67, generator=gen) * 1e-2).to(acc)
        o, mu, rs = ops.ln_delta_fwd(x, d, 1e-7, backend="cpp")
        out[f"{dt}-ln_fwd"] = [o, mu, rs]
        out[f"{dt}-ln_bwd"] = [ops.ln_delta_bwd(g, x, mu, rs, backend="cpp")]
        out[f"{dt}-absmax"] = [ops.row_absmax_sumsq(g, backend="cpp")]
        out[f"{dt}-sift_perturb"] = list(ops.sift_perturb(x, d, 0.01, backend="cpp"))
        dd = d.clone()
        out[f"{dt}-sift_update"] = [ops.sift_update_(dd, g.to(acc), x, lr=1e-3, backend="cpp"), dd]
        nz = d.clone()
        ops.smart_update_(nz, g.to(acc), step_size=1e-3, epsilon=1e-6, backend="cpp")
        out[f"{dt}-smart"] = [nz]
        for linf in (False, True):
            dl = (torch.randn(6, 40, 67, generator=gen) * 1e-2).to(dt)
            out[f"{dt}-freelb_reduce-{linf}"] = [ops.freelb_reduce(dl, g, linf, backend="cpp")]
            ops.freelb_update_(dl, g, None, 0.1, 0.05, linf, backend="cpp")
            out[f"{dt}-freelb_update-{linf}"] = [dl]
        nf = (torch.randn(6, 40, 67, generator=gen) * 1e-2).to(dt)
        ops.freeat_update_(nf, g, 0.01, 0.02, backend="cpp")
        out[f"{dt}-freeat"] = [nf]
    torch.save(out, sys.argv[1])
""")


@pytest.mark.skipif(not _library.has_native("freelb_update_", "cpu"), reason="no C++ kernels")
def test_activation_kernels_vector_path_matches_the_scalar_path(tmp_path):
    """The activation-space and FreeAT kernels (csrc/cpu/activation.cpp, free.cpp), whose loops are
    compiled for AVX2 inside vec::with_width: the same bits as their baseline build (NaNs by value)."""
    results = []
    for flag in ("1", "0"):
        env = dict(os.environ, FUSED_ADV_CPU_VECTOR=flag)
        path = tmp_path / f"act{flag}.pt"
        subprocess.run([sys.executable, "-c", ACTIVATION_SCRIPT, str(path)], env=env, check=True, cwd=ROOT,
                       timeout=300)
        results.append(torch.load(path))
    vec, scalar = results
    assert vec.keys() == scalar.keys()
    for key in vec:
        for a, b in zip(vec[key], scalar[key]):
            assert a.dtype == b.dtype and torch.equal(torch.isnan(a), torch.isnan(b)), key
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            a, b = (torch.where(torch.isnan(t), torch.zeros_like(t), t).view(bits) for t in (a, b))
            assert torch.equal(a, b), key
