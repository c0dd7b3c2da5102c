"""The Triton backend of the weight-space ops (fused_adv._triton.weight) against the torch backend
and a float64 oracle.

CI has no GPU: tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton, and the
very same kernels then run on CPU tensors (pointer tables hold real host addresses).  On a GPU
machine (no TRITON_INTERPRET) the same tests run on CUDA tensors.  Under the interpreter each
program instance costs ~10 ms of Python, so tensors are small and few; the compiled GPU path is
checked separately by compiling every kernel for sm_90 (test_kernels_compile_for_sm90).

Numerical rule (tests/tolerance.py): the Triton result's max error against a float64 oracle is at
most 2x the torch backend's error at the same dtype plus a few ulps.  Backups and restores are
compared bit for bit (integer views), so NaN payloads, -0.0 and subnormals count.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():  # conftest does this too; kept so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_adv.ops as ops  # noqa: E402
from tolerance import assert_close_to_oracle  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = ops.why_not("triton", torch.device(DEVICE), "restore_")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
# odd, tiny, empty (two ways), multi-dim; one larger than a 16-element interpreter tile
SHAPES = [(7, 13), (1,), (0,), (4, 0), (301,), (3, 5, 2)]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}


# ---- helpers ----------------------------------------------------------------------------------

def make(dtype, shapes=SHAPES, seed=0, spread=0.05):
    """P, G and a backup B = P - small noise (so ||P - B|| is sometimes inside, sometimes outside
    the PGD ball)."""
    gen = torch.Generator().manual_seed(seed)
    P = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
    G = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
    B = [(p.double().cpu() - spread * torch.randn(p.shape, generator=gen, dtype=torch.float64))
         .to(dtype).to(DEVICE) for p in P]
    return P, G, B


def clone(ts):
    return [t.clone() for t in ts]


def bits(t):
    return t.view(BITS[t.dtype]) if t.dtype in BITS else t


def bit_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def guard(n):
    return n != 0 and not math.isnan(n)


def check(fused, ref, oracle, what):
    for i, (f, r, o) in enumerate(zip(fused, ref, oracle)):
        if f.numel():
            assert_close_to_oracle(f.cpu(), r.cpu(), o.cpu(), f"{what}[{i}]")


# float64 oracles, straight from SPEC.md (the statement of the op math)

def o_sumsq(ts):
    return torch.stack([t.double().square().sum() for t in ts]) if ts else torch.empty(0, dtype=torch.float64)


def o_fgm(P, G, eps):
    out = []
    for p, g in zip(P, G):
        p64, g64 = p.double(), g.double()
        n = g64.norm().item()
        out.append(p64 + eps * g64 / n if guard(n) else p64)
    return out


def o_fgsm(P, G, eps):
    return [p.double() + eps * torch.sign(g.double()) for p, g in zip(P, G)]


def o_pgd(P, G, B, alpha, eps, first):
    out = []
    for p, g, b in zip(P, G, B):
        p64, g64 = p.double(), g.double()
        b64 = p64 if first else b.double()
        n = g64.norm().item()
        if not guard(n):
            out.append(p64)
            continue
        r = p64 + alpha * g64 / n - b64
        nr = r.norm().item()
        if nr > eps:
            r = eps * r / nr
        out.append(b64 + r)
    return out


def o_awp(P, G, B, adv_lr, adv_eps, first):
    out = []
    for p, g, b in zip(P, G, B):
        p64, g64 = p.double(), g.double()
        b64 = p64 if first else b.double()
        n1, n2 = g64.norm().item(), p64.norm().item()
        if not guard(n1):
            out.append(p64)
            continue
        new = p64 + adv_lr * g64 / (n1 + 1e-6) * (n2 + 1e-6)
        e = adv_eps * b64.abs()
        out.append(torch.minimum(torch.maximum(new, b64 - e), b64 + e))
    return out


def run_update(op, backend, P, G, B, first):
    """Applies ``op`` with ``backend`` on copies; returns (P, B) after."""
    P, B = clone(P), clone(B)
    if op == "fgm":
        ops.fgm_perturb_(P, G, B, ops.multi_tensor_sumsq(G, backend="torch"), 0.7, first, backend=backend)
    elif op == "fgsm":
        ops.fgsm_perturb_(P, G, B, 0.01, first, backend=backend)
    elif op == "pgd":
        stats = ops.pgd_reduce(P, G, B, first, backend="torch")
        ops.pgd_perturb_(P, G, B, stats, 0.3, 0.6, first, backend=backend)
    else:
        ss = ops.multi_tensor_sumsq(G + P, backend="torch")
        ops.awp_perturb_(P, G, B, ss[:len(P)].contiguous(), ss[len(P):].contiguous(), 0.5, 0.01, first,
                         backend=backend)
    return P, B


def oracle_update(op, P, G, B, first):
    if op == "fgm":
        return o_fgm(P, G, 0.7)
    if op == "fgsm":
        return o_fgsm(P, G, 0.01)
    if op == "pgd":
        return o_pgd(P, G, B, 0.3, 0.6, first)
    return o_awp(P, G, B, 0.5, 0.01, first)


class LaunchCounter:
    """Wraps a kernel object: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def run_script(code: str, env_update=None, timeout=600):
    env = dict(os.environ)
    env.update(env_update or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- reductions -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sumsq_matches_oracle(dtype):
    P, G, _ = make(dtype)
    tensors = G + P  # the AWP call: both norms of every tensor in one launch per dtype
    fused = ops.multi_tensor_sumsq(tensors, backend="triton")
    ref = ops.multi_tensor_sumsq(tensors, backend="torch")
    assert fused.dtype == torch.float32 and fused.shape == (len(tensors),) and fused.device.type == DEVICE
    assert_close_to_oracle(fused.cpu(), ref.cpu(), o_sumsq([t.cpu() for t in tensors]), "sumsq")
    assert (fused[[2, 3]] == 0).all()  # the empty tensors
    assert torch.equal(fused, ops.multi_tensor_sumsq(tensors, backend="triton"))  # deterministic


@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pgd_reduce_matches_oracle(dtype, first):
    P, G, B = make(dtype)
    fused = ops.pgd_reduce(P, G, B, first, backend="triton")
    ref = ops.pgd_reduce(P, G, B, first, backend="torch")
    assert fused.shape == (len(P), 3) and fused.dtype == torch.float32
    oracle = []
    for p, g, b in zip(P, G, B):
        g64, d = g.double().cpu().reshape(-1), (p.double() - b.double()).cpu().reshape(-1)
        oracle.append([g64 @ g64, 0.0 if first else d @ g64, 0.0 if first else d @ d])
    oracle = torch.tensor(oracle, dtype=torch.float64)
    for col in range(3):
        assert_close_to_oracle(fused[:, col].cpu(), ref[:, col].cpu(), oracle[:, col], f"pgd_reduce col {col}")
    if first:
        assert (fused[:, 1:] == 0).all()
    assert torch.equal(fused, ops.pgd_reduce(P, G, B, first, backend="triton"))


def test_sumsq_accumulates_in_fp32():
    # 4096 fp16 values of 300: the sum of squares (3.7e8) overflows fp16 (max 65504) by far
    x = torch.full((4096,), 300.0, dtype=torch.float16, device=DEVICE)
    out = ops.multi_tensor_sumsq([x], backend="triton")
    assert out.item() == 4096 * 300.0 ** 2


# ---- update passes ----------------------------------------------------------------------------

@pytest.mark.parametrize("first", [True, False], ids=["write_backup", "no_backup"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["fgm", "fgsm", "pgd", "awp"])
def test_update_matches_oracle(op, dtype, first):
    P, G, B = make(dtype, seed=1)
    P_t, B_t = run_update(op, "triton", P, G, B, first)
    P_r, _ = run_update(op, "torch", P, G, B, first)
    check(P_t, P_r, oracle_update(op, [p.cpu() for p in P], [g.cpu() for g in G], [b.cpu() for b in B], first),
          f"{op} {dtype}")
    for i in range(len(P)):
        # the backup is a raw-bit copy of P when written, untouched otherwise
        assert bit_equal(B_t[i], P[i] if first else B[i]), f"backup {i}"


@pytest.mark.parametrize("op", ["fgm", "pgd", "awp"])
def test_pgd_projection_and_awp_box_are_active(op):
    """The cases above must exercise the projection / the clamp, or they would not test them."""
    P, G, B = make(torch.float32, seed=1)
    P_t, _ = run_update(op, "triton", P, G, B, False)
    if op == "pgd":  # some tensors end ON the sphere of radius 0.6 around B, some inside
        radii = [(p - b).double().norm().item() for p, b in zip(P_t, B) if p.numel()]
        assert any(abs(r - 0.6) < 1e-5 for r in radii) and any(r < 0.59 for r in radii)
    elif op == "awp":  # some entries sit exactly on the box
        on_box = sum(((p - b).abs() == (0.01 * b.abs())).sum().item() for p, b in zip(P_t, B))
        assert on_box > 0
    else:
        moved = [(p - q).double().norm().item() for p, q in zip(P_t, P) if p.numel()]
        assert all(abs(m - 0.7) < 1e-4 for m in moved)  # each tensor moves by exactly epsilon


def assert_same_bits_as_torch(a, b, what):
    """Bit-identical under the interpreter (same fp32 operations in the same order); on a GPU the
    compiler may fuse a multiply-add (one rounding instead of two), so allow one unit in the last
    place of the stored dtype there."""
    if DEVICE == "cpu":
        assert bit_equal(a, b), f"{what}: {(bits(a) != bits(b)).sum().item()} elements differ"
    else:
        ulp = torch.finfo(a.dtype).eps * b.double().abs().clamp_min(1)
        assert ((a.double() - b.double()).abs() <= ulp).all(), what


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_stores_round_to_nearest_even(dtype):
    """P + eps*sign(G) is one fp32 addition (eps*sign is exact, so a GPU's fused multiply-add
    changes nothing), then the store to P's dtype: it must round to nearest even, ties included
    (triton's interpreter truncates fp32 -> bf16; the kernels round with integer ops instead)."""
    gen = torch.Generator().manual_seed(10)
    P = [torch.randn(2048, generator=gen).to(dtype).to(DEVICE)]
    G = [torch.randn(2048, generator=gen).to(dtype).to(DEVICE)]
    ulp1 = torch.finfo(dtype).eps  # ulp of 1.0
    P[0][:4] = torch.tensor([1.0, 1.0 + ulp1, 1.0, -1.0 - ulp1], dtype=dtype)
    G[0][:4] = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=dtype)
    for eps in (0.0123, ulp1 / 2):  # a generic step, and exact ties (1 + ulp/2 -> 1, ...)
        Pc = clone(P)
        ops.fgsm_perturb_(Pc, G, [torch.empty_like(P[0])], eps, False, backend="triton")
        # the same fp32 operations in torch, then torch's (round-to-nearest-even) conversion
        expected = (P[0].float() + eps * torch.sign(G[0].float())).to(dtype)
        assert bit_equal(Pc[0], expected), f"eps {eps}: {(bits(Pc[0]) != bits(expected)).sum()} differ"
        if eps == ulp1 / 2:  # ties to even: 1+ulp/2 -> 1, (1+ulp)+ulp/2 -> 1+2ulp
            assert Pc[0][0].item() == 1.0 and Pc[0][1].item() == 1.0 + 2 * ulp1


@pytest.mark.parametrize("adv_lr", [0.015, 1e3], ids=["near_box", "far_outside"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_awp_box_rounded_like_the_reference(dtype, adv_lr):
    """e, lo and hi are each rounded to P's dtype (as the reference computes them in P's dtype):
    steps that end near the box edges (where an unrounded bound would clamp to a different value)
    and far outside it (where P lands exactly on the rounded bound) match the torch backend."""
    P, G, _ = make(dtype, shapes=[(4096,)], seed=3)
    B = clone(P)
    ss_g, ss_p = ops.multi_tensor_sumsq(G), ops.multi_tensor_sumsq(P)
    outs = []
    for backend in ("triton", "torch"):
        Pc = clone(P)
        ops.awp_perturb_(Pc, G, B, ss_g, ss_p, adv_lr, 0.013, False, backend=backend)
        outs.append(Pc[0])
    assert_same_bits_as_torch(outs[0], outs[1], f"awp {dtype} adv_lr={adv_lr}")


def test_fp64_scalars_are_exact():
    """float64 tensors get the caller's double epsilon (not its float32 rounding): bit-identical
    to the torch backend, which computes eps * sign(G) in float64."""
    P, G, _ = make(torch.float64, shapes=[(129,)], seed=4)
    outs = []
    for backend in ("triton", "torch"):
        Pc, Bc = clone(P), [torch.empty_like(P[0])]
        ops.fgsm_perturb_(Pc, G, Bc, 0.1, True, backend=backend)
        outs.append(Pc[0])
    assert bit_equal(outs[0], outs[1])
    assert not bit_equal(outs[0], P[0] + float(torch.tensor(0.1, dtype=torch.float32)) * torch.sign(G[0]))


@pytest.mark.parametrize("op", ["sumsq", "pgd_reduce", "fgm", "fgsm", "pgd", "awp", "restore"])
def test_many_chunks_per_tensor(op, monkeypatch):
    """Tensors split over many programs (chunk starts > 0, a tail chunk, phase 2 looping over
    several partial rows of several tensors side by side).  Under the interpreter the chunk size
    is forced down to 64 elements so that small tensors have up to 47 chunks."""
    from fused_adv._triton import multi_tensor as mt
    monkeypatch.setattr(mt, "_INTERP_MAX_BLOCK", 64)
    monkeypatch.setattr(mt, "_CACHE", type(mt._CACHE)())  # plans made with the usual chunk size
    shapes = [(3001,), (64,), (1,), (0,), (65,), (20, 30)]
    P, G, B = make(torch.float32, shapes=shapes, seed=12)
    if DEVICE == "cpu":
        plan = mt.plan([P, G, B])
        assert plan.groups[0].config.chunk == 64 and plan.n_chunks == 47 + 1 + 1 + 2 + 10
    if op in ("sumsq", "pgd_reduce"):
        fused = (ops.multi_tensor_sumsq(G, backend="triton") if op == "sumsq"
                 else ops.pgd_reduce(P, G, B, False, backend="triton")[:, 2])
        ref = (ops.multi_tensor_sumsq(G, backend="torch") if op == "sumsq"
               else ops.pgd_reduce(P, G, B, False, backend="torch")[:, 2])
        oracle = o_sumsq([g.cpu() for g in G]) if op == "sumsq" else o_sumsq([(p - b).cpu() for p, b in zip(P, B)])
        assert_close_to_oracle(fused.cpu(), ref.cpu(), oracle, op)
    elif op == "restore":
        Pc = clone(P)
        ops.restore_(Pc, B, backend="triton")
        assert all(bit_equal(p, b) for p, b in zip(Pc, B))
    else:
        P_t, B_t = run_update(op, "triton", P, G, B, True)
        P_r, _ = run_update(op, "torch", P, G, B, True)
        check(P_t, P_r, oracle_update(op, [p.cpu() for p in P], [g.cpu() for g in G], [b.cpu() for b in B], True), op)
        assert all(bit_equal(b, p) for b, p in zip(B_t, P))


# ---- special gradients: zero, NaN, inf --------------------------------------------------------

@pytest.mark.parametrize("op", ["fgm", "fgsm", "pgd", "awp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_nan_inf_grads(op, dtype):
    P, G, B = make(dtype, shapes=[(33,)] * 4, seed=5)
    for p in P:  # signed zeros and a NaN in P: a skipped tensor must keep them bit for bit
        p[0], p[1], p[2] = -0.0, 0.0, float("nan")
    G[0].zero_()                  # ||G|| = 0: skipped
    G[1][7] = float("nan")        # ||G|| NaN: skipped
    G[2][9] = float("inf")        # ||G|| = +inf: NOT skipped (finite entries + 0, the inf one NaN)
    P_t, _ = run_update(op, "triton", P, G, B, False)
    P_r, _ = run_update(op, "torch", P, G, B, False)
    ulps = 2 * torch.finfo(dtype).eps  # same NaN/inf positions; values within rounding of torch's
    for i in range(4):
        torch.testing.assert_close(P_t[i], P_r[i], rtol=ulps, atol=ulps, equal_nan=True)
    if op != "fgsm":  # FGSM has no guard: sign(0) = sign(NaN) = 0 adds +0 (-0.0 becomes +0.0)
        assert bit_equal(P_t[0], P[0]) and bit_equal(P_t[1], P[1])
    if op in ("fgm", "pgd", "awp"):
        assert torch.isnan(P_t[2][9]) and not bit_equal(P_t[2], P[2])


# ---- many tensors, mixed dtypes, alignment, launch counts -------------------------------------

def mixed_set(n=131, seed=6):
    """n tensors (> 110, apex's per-launch limit) cycling through dtypes and sizes, with a few
    misaligned views (storage offset of one element) and empty tensors."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    P, G, B = [], [], []
    for i in range(n):
        dt = dtypes[i % 3]
        numel = [1, 0, 17, 64, 5, 129][i % 6]
        if i % 10 == 9:  # misaligned: 4 or 2 bytes past an aligned allocation
            p = torch.randn(numel + 1, generator=gen).to(dt).to(DEVICE)[1:]
        else:
            p = torch.randn(numel, generator=gen).to(dt).to(DEVICE)
        P.append(p)
        G.append(torch.randn(numel, generator=gen).to(dt).to(DEVICE))
        B.append(torch.empty_like(G[-1]))
    assert any(p.data_ptr() % 16 for p in P)
    return P, G, B


def test_many_tensors_mixed_dtypes_one_launch_per_group(monkeypatch):
    from fused_adv._triton import multi_tensor as mt
    from fused_adv._triton import weight as tw
    P, G, B = mixed_set()
    counters = {}
    for mod, name in ((tw, "_reduce_kernel"), (tw, "_update_kernel"), (tw, "_restore_kernel"),
                      (mt, "_finish_kernel")):
        counters[name] = LaunchCounter(getattr(mod, name))
        monkeypatch.setattr(mod, name, counters[name])
    before = clone(P)
    groups = {(t.dtype, all(x.data_ptr() % 16 == 0 for x in (p, g, b)))
              for t, p, g, b in zip(P, P, G, B) if t.numel()}
    # AWP step: one reduction over 2N tensors, one update, one restore
    ss = ops.multi_tensor_sumsq(G + P, backend="triton")
    assert counters["_finish_kernel"].launches == 1
    assert counters["_reduce_kernel"].launches == len(groups)
    ref = ops.multi_tensor_sumsq(G + P, backend="torch")
    assert_close_to_oracle(ss.cpu(), ref.cpu(), o_sumsq([t.cpu() for t in G + P]), "sumsq mixed")
    n = len(P)
    ops.awp_perturb_(P, G, B, ss[:n].contiguous(), ss[n:].contiguous(), 0.5, 0.02, True, backend="triton")
    assert counters["_update_kernel"].launches == len(groups)
    P_r, B_r = clone(before), [torch.empty_like(b) for b in B]
    ops.awp_perturb_(P_r, G, B_r, ref[:n].contiguous(), ref[n:].contiguous(), 0.5, 0.02, True, backend="torch")
    before_cpu = [p.cpu() for p in before]
    check(P, P_r, o_awp(before_cpu, [g.cpu() for g in G], before_cpu, 0.5, 0.02, True), "awp mixed")
    assert all(bit_equal(b, p) for b, p in zip(B, before))
    ops.restore_(P, B, backend="triton")
    assert counters["_restore_kernel"].launches == len(groups)
    assert all(bit_equal(p, q) for p, q in zip(P, before))


def test_plan_is_cached_and_keyed_by_address():
    from fused_adv._triton import multi_tensor as mt
    P, G, B = make(torch.float32, seed=7)
    first = mt.plan([P, G, B])
    assert mt.plan([P, G, B]) is first  # steady state: no new table, no upload
    G2 = clone(G)  # same shapes, new storage: a different table
    other = mt.plan([P, G2, B])
    assert other is not first
    assert [int(a) for a in other.groups[0].tens[:, 3]] == [g.data_ptr() for g in G2 if g.dtype == torch.float32]


# ---- cycles and bit-exact restore -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("method", ["fgm", "pgd", "awp"])
def test_attack_restore_cycles(method, dtype):
    """Three training-like cycles (new gradient, attack steps, restore, optimizer-like update):
    the perturbed weights follow the torch backend's, and every restore gives back the exact bits
    of the cycle's starting weights.  Backups and the cached launch plans are reused across cycles."""
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=4e-3, atol=4e-3)
    shapes = [(9, 7), (1,), (0,), (130,)]
    P, _, _ = make(dtype, shapes=shapes, seed=8)
    params = {b: clone(P) for b in ("triton", "torch")}
    backups = {b: [torch.empty_like(p) for p in P] for b in ("triton", "torch")}
    for cycle in range(3):
        _, G, _ = make(dtype, shapes=shapes, seed=100 + cycle)
        perturbed = {}
        for backend in ("triton", "torch"):
            Pb, Bb = params[backend], backups[backend]
            start = clone(Pb)
            for step in range(1 if method == "fgm" else 3):
                first = step == 0
                if method == "fgm":
                    ops.fgm_perturb_(Pb, G, Bb, ops.multi_tensor_sumsq(G, backend=backend), 0.5, True,
                                     backend=backend)
                elif method == "pgd":
                    stats = ops.pgd_reduce(Pb, G, Bb, first, backend=backend)
                    ops.pgd_perturb_(Pb, G, Bb, stats, 0.3, 0.6, first, backend=backend)
                else:
                    ss = ops.multi_tensor_sumsq(G + Pb, backend=backend)
                    ops.awp_perturb_(Pb, G, Bb, ss[:4].contiguous(), ss[4:].contiguous(), 0.5, 0.05, first,
                                     backend=backend)
            perturbed[backend] = clone(Pb)
            ops.restore_(Pb, Bb, backend=backend)
            assert all(bit_equal(p, s) for p, s in zip(Pb, start)), f"{backend} restore, cycle {cycle}"
            for p, g in zip(Pb, G):  # the optimizer step between cycles
                p.sub_(0.1 * g)
        for a, b in zip(perturbed["triton"], perturbed["torch"]):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backup_and_restore_are_bit_exact_for_any_bits(dtype):
    """P with random bit patterns (NaN payloads, infinities, -0.0, subnormals): every op that
    writes the backup copies the raw bits, and restore gives them back."""
    gen = torch.Generator().manual_seed(9)
    width = BITS[dtype]
    info = torch.iinfo(width)
    P = [torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(width).view(dtype)
         .to(DEVICE) for n in (1, 37, 300)]
    # and, surely present: signalling and negative NaNs with payloads, -0.0, the smallest subnormal
    special = {torch.float32: [0x7F800001, -0x003FFEDD, -0x80000000, 1],              # 0xFFC00123
               torch.float16: [0x7C01, -0x01DD, -0x8000, 1],                          # 0xFE23
               torch.bfloat16: [0x7F81, -0x005D, -0x8000, 1],                          # 0xFFA3
               torch.float64: [0x7FF0000000000001, -0x0007FFFFFFFFFEDD, -0x8000000000000000, 1]}[dtype]
    P[2][:4] = torch.tensor(special, dtype=width).view(dtype).to(DEVICE)
    G = [torch.randn(p.shape, generator=gen).to(dtype).to(DEVICE) for p in P]
    original = clone(P)
    assert torch.isnan(P[2][:2]).all() and bits(P[2][2:3]).item() == torch.iinfo(width).min
    for op in ("fgm", "fgsm", "pgd", "awp"):
        Pc, B = clone(original), [torch.empty_like(p) for p in P]
        if op == "fgm":
            ops.fgm_perturb_(Pc, G, B, ops.multi_tensor_sumsq(G), 1.0, True, backend="triton")
        elif op == "fgsm":
            ops.fgsm_perturb_(Pc, G, B, 1.0, True, backend="triton")
        elif op == "pgd":
            ops.pgd_perturb_(Pc, G, B, ops.pgd_reduce(Pc, G, B, True), 0.3, 1.0, True, backend="triton")
        else:
            ss = ops.multi_tensor_sumsq(G + Pc)
            ops.awp_perturb_(Pc, G, B, ss[:3].contiguous(), ss[3:].contiguous(), 1.0, 0.1, True, backend="triton")
        assert all(bit_equal(b, o) for b, o in zip(B, original)), f"{op} backup"
        ops.restore_(Pc, B, backend="triton")
        assert all(bit_equal(p, o) for p, o in zip(Pc, original)), f"{op} restore"


# ---- int64 offsets ----------------------------------------------------------------------------

@pytest.mark.skipif(DEVICE != "cpu", reason="shifts host addresses; the interpreter path")
def test_int64_offsets_in_a_subprocess():
    """Every kernel addressed through element offsets beyond 2**32 (and 2**31).

    A real tensor of 2**31 elements would take ~12 GB for P, G, B and hours of interpreter time,
    so the table is rewritten instead: each address moves down by SHIFT elements, each numel and
    chunk start moves up by SHIFT.  The elements touched are the same, but only if the kernels keep
    every offset in int64 (an int32 truncation reads elsewhere: wrong values or a segfault, hence
    the subprocess).  Results must equal the unshifted run bit for bit."""
    code = """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from fused_adv._triton import multi_tensor as mt, weight as w

    SHIFT = (1 << 32) + (1 << 31)   # a multiple of every CHUNK (powers of two <= 2**18)

    def shifted(plan, elem_size):
        table = plan.table.clone()
        groups = []
        for g in plan.groups:
            to, co = g.tens.storage_offset(), g.chunks.storage_offset()
            tens = table[to:to + g.tens.numel()].view(g.tens.shape)
            chunks = table[co:co + g.chunks.numel()].view(g.chunks.shape)
            tens[:, 1] += SHIFT
            tens[:, 2:] -= SHIFT * elem_size
            chunks[:, 1] += SHIFT
            groups.append(g._replace(tens=tens, chunks=chunks))
        return plan._replace(groups=tuple(groups), table=table, ranges=table[:2 * plan.n].view(plan.n, 2))

    def bits(ts):
        return [t.view(torch.int16 if t.element_size() == 2 else torch.int32) for t in ts]

    torch.manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        P = [torch.randn(n).to(dtype) for n in (1, 70, 333)]
        G = [torch.randn_like(p) for p in P]
        B = [p - 0.01 for p in P]
        es = P[0].element_size()
        results = []
        for shift in (False, True):
            mk = (lambda ps: shifted(mt.plan(ps), es)) if shift else mt.plan
            Pc, Bc = [p.clone() for p in P], [b.clone() for b in B]
            out = [w._reduce_plan(mk([G + Pc]), w.SUMSQ, False),
                   w._reduce_plan(mk([Pc, G, Bc]), w.PGD_STATS, False)]
            w._update_plan(mk([Pc, G, Bc]), w.PGD, False, s0=out[1], f0=0.3, f1=0.5)
            out += [t.clone() for t in Pc]
            w._update_plan(mk([Pc, G, Bc]), w.AWP, False, s0=out[0][:3].contiguous(),
                           s1=out[0][3:].contiguous(), f0=0.5, f1=0.01, e=0.01)
            out += [t.clone() for t in Pc]
            w._update_plan(mk([Pc, G, Bc]), w.FGM, True, s0=out[0][:3].contiguous(), f0=0.7)
            out += [t.clone() for t in Pc] + [t.clone() for t in Bc]
            w._update_plan(mk([Pc, G, Bc]), w.FGSM, False, f0=0.01, e=0.01)
            out += [t.clone() for t in Pc]
            w._restore_plan(mk([Pc, Bc]))
            out += [t.clone() for t in Pc]
            results.append(out)
        for a, b in zip(*results):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
        assert not torch.equal(results[0][2], P[0])  # the ops did something
    print("INT64 OK")
    """
    res = run_script(code, timeout=600)
    assert res.returncode == 0 and "INT64 OK" in res.stdout, (
        f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-5000:]}")


# ---- packaging and the compiled GPU path ------------------------------------------------------

def test_importing_the_package_does_not_import_triton():
    res = run_script("""
    import sys
    import fused_adv, fused_adv.ops, fused_adv._triton
    assert "triton" not in sys.modules, "triton was imported eagerly"
    print("LAZY OK")
    """, env_update={"TRITON_INTERPRET": "0"})
    assert res.returncode == 0 and "LAZY OK" in res.stdout, res.stderr[-3000:]


def test_kernels_compile_for_sm90():
    """Every kernel variant compiles to PTX for sm_90 (no GPU needed) and the aligned variants use
    16-byte vector accesses.  The interpreter never runs the compiler, so this is the only CI check
    of the compiled path's types."""
    probe = run_script("""
    import triton.backends
    print("nvidia" in triton.backends.backends)
    """, env_update={"TRITON_INTERPRET": "0"})
    if probe.returncode != 0 or "True" not in probe.stdout:
        pytest.skip(f"triton has no NVIDIA backend here: {probe.stdout} {probe.stderr[-500:]}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "fused_adv._triton.compile_check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "all compiled" in res.stdout, res.stdout[-5000:] + res.stderr[-5000:]


def test_ops_under_torch_compile():
    """A compiled training-step fragment that calls the Triton ops: the launchers run eagerly
    (graph break) and give the eager results."""
    P, G, _ = make(torch.float32, shapes=[(5, 3), (17,)], seed=11)

    def step(P, G, B):
        ops.fgm_perturb_(P, G, B, ops.multi_tensor_sumsq(G, backend="triton"), 0.5, True, backend="triton")
        return [p * 2 for p in P]

    compiled = torch.compile(step, backend="eager")
    Pc, Bc = clone(P), [torch.empty_like(p) for p in P]
    out = compiled(Pc, G, Bc)
    Pe, Be = clone(P), [torch.empty_like(p) for p in P]
    ref = step(Pe, G, Be)
    assert all(bit_equal(a, b) for a, b in zip(out + Pc + Bc, ref + Pe + Be))
