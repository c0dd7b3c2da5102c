"""The C++ CPU kernels (csrc/cpu/weight.cpp, backend="cpp") against the torch backend and a float64
oracle written from SPEC.md.

Accuracy rule (DESIGN.md section 5): the cpp result's max error against the float64 oracle is at
most 2x the torch backend's own error at that dtype, plus a floor of one ulp of the dtype at the
values' scale.  Exactness rules checked with torch.equal: backups and restores are bit-exact,
skipped (guarded-off) tensors are untouched, results are deterministic (same twice, and the same
with 1 or 2 threads).  Skips the whole module, with fused_adv.ops.why_not's reason, when the
extension is not built.
"""
from __future__ import annotations

import math

import pytest
import torch

import tolerance  # tests/tolerance.py (tests/ is on sys.path via conftest.py)
from fused_adv import ops

CPU = torch.device("cpu")
_REASON = ops.why_not("cpp", CPU, "restore_")
if _REASON is not None:
    pytest.skip(f"cpp backend unavailable: {_REASON}", allow_module_level=True)

F = torch.ops.fused_adv
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# odd, tiny, empty, and one crossing the kernels' 32768-element chunk boundary twice
SHAPES = [(0,), (1,), (7,), (3, 5), (33, 17), (70001,)]


# ---- helpers -----------------------------------------------------------------------------
def make(shapes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def clones(ts):
    return [t.clone() for t in ts]


def assert_close_to_oracle(label, fused, ref, oracle):
    """tests/tolerance.py's rule, tensor by tensor: error(fused) <= 2 x error(torch backend) +
    FLOOR_ULPS ulps at the oracle's scale, NaN positions equal.  One deviation: the per-tensor
    factors (norms, step sizes) are float32 by contract for every dtype, so a float64 tensor's
    floor uses float32's eps (two correctly rounded fp32 factor computations may differ by an
    ulp, which dominates a float64 result's error)."""
    for i, (f, r, o) in enumerate(zip(fused, ref, oracle)):
        o = o.double()
        what = f"{label}[{i}] {tuple(f.shape)} {f.dtype}"
        if f.numel() == 0:
            continue
        fe, re = tolerance.max_error(f, o), tolerance.max_error(r, o)
        eps = max(tolerance.EPS[f.dtype], tolerance.EPS[torch.float32])
        finite = o[torch.isfinite(o)]
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        bound = 2 * re + tolerance.FLOOR_ULPS * eps * scale
        assert fe <= bound, f"{what}: cpp error {fe:.3g} > bound {bound:.3g} (torch backend error {re:.3g})"


def both(op_name, *args):
    """Runs the op through backend='cpp' and backend='torch' on separate copies of the mutated
    lists; returns (cpp_args, torch_args, cpp_result, torch_result)."""
    fn = getattr(ops, op_name)
    a_cpp = [clones(a) if isinstance(a, list) else a for a in args]
    a_ref = [clones(a) if isinstance(a, list) else a for a in args]
    out_cpp = fn(*a_cpp, backend="cpp")
    out_ref = fn(*a_ref, backend="torch")
    return a_cpp, a_ref, out_cpp, out_ref


# ---- float64 oracles (SPEC.md sections 1-4, written independently of the backends) -------------
def o_sumsq(ts):
    return torch.tensor([float((t.double() ** 2).sum()) for t in ts], dtype=torch.float64)


def o_norm(sumsq_f32):
    return [math.sqrt(float(v)) if not math.isnan(float(v)) else float("nan") for v in sumsq_f32]


def o_fgm(P, G, gsq, eps):
    out = []
    for p, g, n in zip(P, G, o_norm(gsq)):
        if n != 0 and not math.isnan(n):
            out.append(p.double() + eps * g.double() / n)
        else:
            out.append(p.double())
    return out


def o_fgsm(P, G, eps):
    return [p.double() + eps * torch.sign(g.double()) for p, g in zip(P, G)]


def o_pgd(P, G, B, alpha, eps):
    """Literal SPEC section 3: step, then project r = P' - B onto the eps-ball."""
    out = []
    for p, g, b in zip(P, G, B):
        n = float(g.double().norm())
        if n == 0 or math.isnan(n):
            out.append(p.double())
            continue
        r = p.double() + alpha * g.double() / n - b.double()
        rn = float(r.norm())
        if rn > eps:
            r = eps * r / rn
        out.append(b.double() + r)
    return out


def o_awp(P, G, B, gsq, psq, lr, adv_eps):
    out = []
    for p, g, b, n1, n2 in zip(P, G, B, o_norm(gsq), o_norm(psq)):
        if n1 == 0 or math.isnan(n1):
            out.append(p.double())
            continue
        e = adv_eps * b.abs()  # the box in P's dtype, as the reference computes it
        lo, hi = (b - e).double(), (b + e).double()
        v = p.double() + lr * g.double() / (n1 + 1e-6) * (n2 + 1e-6)
        out.append(torch.minimum(torch.maximum(v, lo), hi))
    return out


# ---- reductions --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tensor_sumsq(dtype):
    ts = make(SHAPES, dtype, scale=3.0)
    got = ops.multi_tensor_sumsq(ts, backend="cpp")
    ref = ops.multi_tensor_sumsq(ts, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (len(ts),)
    assert_close_to_oracle("sumsq", [got], [ref], [o_sumsq(ts)])


def test_sumsq_fp16_no_overflow():
    # 300 squared = 9e4 > fp16 max: the accumulation must not happen in fp16.
    t = torch.full((1000,), 300.0, dtype=torch.float16)
    got = ops.multi_tensor_sumsq([t], backend="cpp")
    assert got.item() == pytest.approx(9e7, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [True, False])
def test_pgd_reduce(dtype, first):
    P, G = make(SHAPES, dtype, 1), make(SHAPES, dtype, 2)
    B = [(p.double() + 0.01 * torch.randn(p.shape, dtype=torch.float64)).to(dtype) for p in P]
    got = ops.pgd_reduce(P, G, B, first, backend="cpp")
    ref = ops.pgd_reduce(P, G, B, first, backend="torch")
    oracle = []
    for p, g, b in zip(P, G, B):
        g64, d = g.double(), (p.double() - b.double())
        oracle.append([float(g64 @ g64.flatten() if g64.dim() == 1 else (g64 * g64).sum()),
                       0.0 if first else float((d * g64).sum()), 0.0 if first else float((d * d).sum())])
    oracle = torch.tensor(oracle, dtype=torch.float64).reshape(-1, 3)
    assert got.shape == (len(P), 3) and got.dtype == torch.float32
    assert_close_to_oracle("pgd_reduce", [got], [ref], [oracle])
    if first:
        assert torch.equal(got[:, 1:], torch.zeros_like(got[:, 1:]))


def test_pgd_reduce_first_does_not_read_backups():
    # On the first step the backups hold garbage (torch.empty): NaNs there must not leak.
    P, G = make([(100,)], torch.float32, 1), make([(100,)], torch.float32, 2)
    B = [torch.full((100,), float("nan"))]
    got = ops.pgd_reduce(P, G, B, True, backend="cpp")
    assert torch.isfinite(got).all()


# ---- perturbations, one step vs oracle ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_fgm_perturb(dtype):
    P, G = make(SHAPES, dtype, 1), make(SHAPES, dtype, 2)
    gsq = ops.multi_tensor_sumsq(G, backend="torch")
    B0 = [torch.empty_like(p) for p in P]
    (pc, _, bc, *_), (pr, *_), _, _ = both("fgm_perturb_", P, G, B0, gsq, 0.7, True)
    for b, p in zip(bc, P):
        assert torch.equal(b, p), "backup must be bit-exact"
    assert_close_to_oracle("fgm", pc, pr, o_fgm(P, G, gsq, 0.7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fgsm_perturb(dtype):
    P, G = make(SHAPES, dtype, 1), make(SHAPES, dtype, 2)
    G[2][3] = 0  # sign(0) = 0
    B0 = [torch.empty_like(p) for p in P]
    (pc, _, bc, *_), (pr, *_), _, _ = both("fgsm_perturb_", P, G, B0, 0.05, True)
    for b, p in zip(bc, P):
        assert torch.equal(b, p)
    assert_close_to_oracle("fgsm", pc, pr, o_fgsm(P, G, 0.05))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e9, 0.05])  # no projection / projection active
def test_pgd_steps(dtype, eps):
    P0, B = make(SHAPES, dtype, 1), [torch.empty(s, dtype=dtype) for s in SHAPES]
    P = clones(P0)
    for t in range(3):
        G = make(SHAPES, dtype, 10 + t)
        first = t == 0
        stats = ops.pgd_reduce(P, G, B, first, backend="cpp")
        pre_P, pre_B = clones(P), (clones(P) if first else clones(B))
        pr, br = clones(P), clones(B)
        ops.pgd_perturb_(P, G, B, stats, 0.3, eps, first, backend="cpp")
        ops.pgd_perturb_(pr, G, br, stats, 0.3, eps, first, backend="torch")
        if first:
            for b, p in zip(B, pre_P):
                assert torch.equal(b, p)
        assert_close_to_oracle(f"pgd step {t}", P, pr, o_pgd(pre_P, G, pre_B, 0.3, eps))
        if eps < 1:  # the projection keeps every tensor inside the eps-ball (up to rounding)
            for p, b in zip(P, B):
                if p.numel():
                    # per-tensor factors are float32 by contract: float64 gets fp32's eps
                    ulp = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
                    tol = 4 * ulp * (1 + float(b.double().norm()))
                    assert float((p.double() - b.double()).norm()) <= eps + tol
    ops.restore_(P, B, backend="cpp")
    for p, p0 in zip(P, P0):
        assert torch.equal(p, p0), "restore must be bit-exact"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adv_eps", [0.2, 1e-3])  # loose / tight box
def test_awp_steps(dtype, adv_eps):
    P0, B = make(SHAPES, dtype, 1), [torch.empty(s, dtype=dtype) for s in SHAPES]
    P = clones(P0)
    for t in range(2):
        G = make(SHAPES, dtype, 20 + t)
        first = t == 0
        gsq = ops.multi_tensor_sumsq(G, backend="cpp")
        psq = ops.multi_tensor_sumsq(P, backend="cpp")
        pre_P, pre_B = clones(P), (clones(P) if first else clones(B))
        pr, br = clones(P), clones(B)
        ops.awp_perturb_(P, G, B, gsq, psq, 0.5, adv_eps, first, backend="cpp")
        ops.awp_perturb_(pr, G, br, gsq, psq, 0.5, adv_eps, first, backend="torch")
        assert_close_to_oracle(f"awp step {t}", P, pr, o_awp(pre_P, G, pre_B, gsq, psq, 0.5, adv_eps))
        for p, b in zip(P, B):  # inside the box computed in P's dtype: exact, no tolerance
            e = adv_eps * b.abs()
            assert bool(((p >= b - e) & (p <= b + e)).all())
    ops.restore_(P, B, backend="cpp")
    for p, p0 in zip(P, P0):
        assert torch.equal(p, p0)


# ---- many tensors, mixed dtypes, repeat cycles ---------------------------------------------
def test_many_tensors_mixed_dtypes_fgm_cycles():
    # 130 tensors (> apex's 110-per-launch table), four dtypes interleaved, three attack/restore
    # cycles: every cycle must restore bit-exactly and match the oracle.
    shapes = [((i * 37) % 300 + (i % 3),) for i in range(130)]
    P0 = [make([s], DTYPES[i % 4], seed=i)[0] for i, s in enumerate(shapes)]
    P, B = clones(P0), [torch.empty_like(p) for p in P0]
    for cycle in range(3):
        G = [make([s], DTYPES[i % 4], seed=1000 * cycle + i)[0] for i, s in enumerate(shapes)]
        gsq = ops.multi_tensor_sumsq(G, backend="cpp")
        assert_close_to_oracle("sumsq", [gsq], [ops.multi_tensor_sumsq(G, backend="torch")], [o_sumsq(G)])
        pr = clones(P)
        ops.fgm_perturb_(P, G, B, gsq, 1.0, True, backend="cpp")
        ops.fgm_perturb_(pr, G, [torch.empty_like(p) for p in P], gsq, 1.0, True, backend="torch")
        assert_close_to_oracle(f"fgm cycle {cycle}", P, pr, o_fgm(P0, G, gsq, 1.0))
        ops.restore_(P, B, backend="cpp")
        for p, p0 in zip(P, P0):
            assert torch.equal(p, p0)


def test_awp_many_tensors_one_reduction():
    # The AWP pattern: ||G||^2 and ||P||^2 of 120 tensors in one multi_tensor_sumsq call.
    shapes = [(i % 13 + 1, 9) for i in range(120)]
    P, G = make(shapes, torch.float32, 3), make(shapes, torch.float32, 4)
    sq = ops.multi_tensor_sumsq(G + P, backend="cpp")
    assert_close_to_oracle("sumsq", [sq], [ops.multi_tensor_sumsq(G + P, backend="torch")], [o_sumsq(G + P)])


# ---- guards: zero / NaN / inf gradients ----------------------------------------------------
def _guard_case(dtype):
    P = make([(50,), (50,), (50,), (50,)], dtype, 5)
    G = make([(50,), (50,), (50,), (50,)], dtype, 6)
    G[0].zero_()                 # zero grad: skipped
    G[1][7] = float("nan")       # NaN grad: norm NaN, skipped
    G[2][3] = float("inf")       # inf grad: norm +inf, NOT skipped
    return P, G


@pytest.mark.parametrize("dtype", DTYPES)
def test_fgm_guards(dtype):
    P, G = _guard_case(dtype)
    gsq = ops.multi_tensor_sumsq(G, backend="cpp")
    assert gsq[0] == 0 and torch.isnan(gsq[1]) and torch.isinf(gsq[2])
    out, B = clones(P), [torch.empty_like(p) for p in P]
    ops.fgm_perturb_(out, G, B, gsq, 1.0, True, backend="cpp")
    assert torch.equal(out[0], P[0]) and torch.equal(out[1], P[1]), "zero/NaN-norm tensors must be untouched"
    assert torch.equal(B[1], P[1]), "the backup is taken even when the step is skipped"
    # n = +inf: factor 0, finite entries keep their value, the inf entry becomes NaN (0 * inf)
    nan_mask = torch.zeros(50, dtype=torch.bool)
    nan_mask[3] = True
    assert torch.equal(torch.isnan(out[2]), nan_mask)
    assert torch.equal(out[2][~nan_mask], P[2][~nan_mask])
    ref = clones(P[3:])
    ops.fgm_perturb_(ref, G[3:], clones(ref), gsq[3:], 1.0, False, backend="torch")
    assert_close_to_oracle("fgm normal", out[3:], ref, o_fgm(P[3:], G[3:], gsq[3:], 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fgsm_nan_grad_is_sign_zero(dtype):
    # torch.sign(NaN) == 0 (the community class uses torch.sign): a NaN grad entry adds nothing.
    P, G = _guard_case(dtype)
    out = clones(P)
    ops.fgsm_perturb_(out, G, clones(P), 0.1, False, backend="cpp")
    ref = clones(P)
    ops.fgsm_perturb_(ref, G, clones(P), 0.1, False, backend="torch")
    assert torch.equal(out[1][7], P[1][7])
    assert torch.equal(out[0], P[0])
    assert_close_to_oracle("fgsm", out, ref, o_fgsm(P, G, 0.1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pgd_awp_guards(dtype):
    P, G = _guard_case(dtype)
    B = clones(P)
    stats = ops.pgd_reduce(P, G, B, True, backend="cpp")
    out = clones(P)
    ops.pgd_perturb_(out, G, [torch.empty_like(p) for p in P], stats, 0.3, 1.0, True, backend="cpp")
    assert torch.equal(out[0], P[0]) and torch.equal(out[1], P[1])
    gsq = ops.multi_tensor_sumsq(G, backend="cpp")
    psq = ops.multi_tensor_sumsq(P, backend="cpp")
    out = clones(P)
    ops.awp_perturb_(out, G, [torch.empty_like(p) for p in P], gsq, psq, 1.0, 0.2, True, backend="cpp")
    assert torch.equal(out[0], P[0]) and torch.equal(out[1], P[1])
    ref = clones(P)
    ops.awp_perturb_(ref, G, [torch.empty_like(p) for p in P], gsq, psq, 1.0, 0.2, True, backend="torch")
    assert_close_to_oracle("awp guards", out, ref, o_awp(P, G, P, gsq, psq, 1.0, 0.2))


def test_restore_bit_exact_special_values():
    # NaN payloads, signed zeros, infinities and subnormals come back bit for bit, every dtype.
    for dtype, itype in [(torch.float32, torch.int32), (torch.float64, torch.int64),
                         (torch.float16, torch.int16), (torch.bfloat16, torch.int16)]:
        bits = torch.randint(-(2 ** 15), 2 ** 15 - 1, (4099,), dtype=torch.int64).to(itype)
        B = [bits.view(dtype).clone(), torch.tensor([-0.0, 0.0, float("inf"), -float("inf")], dtype=dtype)]
        P = [torch.zeros_like(b) for b in B]
        ops.restore_(P, B, backend="cpp")
        for p, b in zip(P, B):
            assert torch.equal(p.view(itype), b.view(itype))
        # and the backup written by an attack is bit-exact too
        out = [torch.empty_like(b) for b in B]
        ops.fgsm_perturb_(clones(B), [torch.zeros_like(b) for b in B], out, 0.0, True, backend="cpp")
        for o, b in zip(out, B):
            assert torch.equal(o.view(itype), b.view(itype))


# ---- determinism ----------------------------------------------------------------------------
def test_deterministic_across_runs_and_threads():
    # Large enough to take the parallel path (> 65536 elements in total, many chunks).
    shapes = [(300_001,), (1000,), (65_537,)]
    P, G = make(shapes, torch.float32, 7), make(shapes, torch.float32, 8)
    B = [(p + 0.01).contiguous() for p in P]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            sq = ops.multi_tensor_sumsq(G + P, backend="cpp")
            st = ops.pgd_reduce(P, G, B, False, backend="cpp")
            out = clones(P)
            ops.awp_perturb_(out, G, clones(B), sq[:3], sq[3:], 1.0, 0.2, False, backend="cpp")
            results.append((sq, st, out))
    finally:
        torch.set_num_threads(old)
    for sq, st, out in results[1:]:
        assert torch.equal(sq, results[0][0]) and torch.equal(st, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(out, results[0][2]))


# ---- dispatcher ops: opcheck and errors ----------------------------------------------------
def _opcheck_cases():
    P = [torch.randn(5, 3), torch.randn(4, dtype=torch.float64), torch.randn(0), torch.randn(9).half()]
    G = [torch.randn_like(p) for p in P]
    B = [p.clone() for p in P]
    gsq = torch.rand(len(P)) + 0.5
    stats = torch.rand(len(P), 3)
    return [
        ("multi_tensor_sumsq", (G,)),
        ("pgd_reduce", (P, G, B, True)),
        ("pgd_reduce", (P, G, B, False)),
        ("fgm_perturb_", (P, G, B, gsq, 0.5, True)),
        ("fgsm_perturb_", (P, G, B, 0.1, False)),
        ("pgd_perturb_", (P, G, B, stats, 0.3, 1.0, False)),
        ("awp_perturb_", (P, G, B, gsq, gsq, 1.0, 0.2, True)),
        ("restore_", (P, B)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    assert ops.why_not("cpp", CPU, name) is None  # the native kernel serves the dispatcher op
    torch.library.opcheck(getattr(F, name).default, args)


def test_native_kernels_registered():
    from fused_adv.ops import _library
    for name in ["multi_tensor_sumsq", "pgd_reduce", "fgm_perturb_", "fgsm_perturb_", "pgd_perturb_",
                 "awp_perturb_", "restore_"]:
        assert (f"fused_adv::{name}", "CPU") in _library.NATIVE


def test_kernel_argument_errors():
    p = torch.randn(4)
    with pytest.raises(RuntimeError, match="got 1 params but 0 grads"):
        F.fgsm_perturb_([p], [], [p.clone()], 0.1, True)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        F.restore_([torch.randn(4, 4).t()], [torch.randn(4, 4)])
    with pytest.raises(RuntimeError, match="grad_sumsq must have shape"):
        F.fgm_perturb_([p], [p.clone()], [p.clone()], torch.ones(2), 1.0, True)
    with pytest.raises(RuntimeError, match="dtype"):
        F.multi_tensor_sumsq([torch.ones(3, dtype=torch.int32)])


def test_empty_lists_and_empty_tensors():
    # Empty lists never reach the dispatcher (no tensor argument to pick a kernel from): the
    # public functions answer them; lists of empty tensors do reach the kernel.
    assert ops.multi_tensor_sumsq([], backend="cpp").shape == (0,)
    assert ops.pgd_reduce([], [], [], True, backend="cpp").shape == (0, 3)
    ops.restore_([], [], backend="cpp")
    e = [torch.empty(0), torch.empty(0, 3, dtype=torch.float16)]
    assert torch.equal(F.multi_tensor_sumsq(e), torch.zeros(2))
    F.awp_perturb_(e, clones(e), clones(e), torch.zeros(2), torch.zeros(2), 1.0, 0.2, True)


# ---- row-sparse gradients (the embedding case) ---------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sparse_grads_unchanged_rows_exact(dtype):
    # The kernels skip storing 64-byte lines whose bits do not change (rows of tokens absent from
    # the batch, G = 0).  That must be invisible: zero-grad rows come out exactly as the torch
    # backend leaves them, including -0.0 entries (p + 0*f turns -0.0 into +0.0) and NaN entries.
    rows, hidden = 301, 40
    P = make([(rows, hidden)], dtype, 11)
    P[0][5, :7] = -0.0
    P[0][6, 3] = float("nan")
    G = make([(rows, hidden)], dtype, 12)
    live = torch.zeros(rows, dtype=torch.bool)
    live[torch.tensor([3, 64, 65, 200])] = True
    G[0][~live] = 0
    gsq = ops.multi_tensor_sumsq(G, backend="torch")
    for backend_out in ("fgm", "pgd"):
        out, ref = clones(P), clones(P)
        B, Br = [torch.empty_like(P[0])], [torch.empty_like(P[0])]
        if backend_out == "fgm":
            ops.fgm_perturb_(out, G, B, gsq, 0.5, True, backend="cpp")
            ops.fgm_perturb_(ref, G, Br, gsq, 0.5, True, backend="torch")
        else:
            st = ops.pgd_reduce(P, G, B, True, backend="cpp")
            ops.pgd_perturb_(out, G, B, st, 0.3, 1.0, True, backend="cpp")
            ops.pgd_perturb_(ref, G, Br, st, 0.3, 1.0, True, backend="torch")
        itype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[P[0].element_size()]
        o, r = out[0][~live], ref[0][~live]
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(o), nan), backend_out  # NaN payloads may differ
        assert torch.equal(o[~nan].view(itype), r[~nan].view(itype)), backend_out
        assert torch.equal(o[~nan].view(itype), P[0][~live][~nan].abs().view(itype)
                           .where(P[0][~live][~nan] == 0, P[0][~live][~nan].view(itype))), backend_out
        assert not torch.equal(out[0][live], P[0][live])  # the live rows did move
        ops.restore_(out, B, backend="cpp")
        assert torch.equal(out[0].view(itype), P[0].view(itype))
