"""Weight-space ops (FGM / FGSM / PGD / AWP bookkeeping) on every backend this machine can run,
against the float64 oracles of tests/oracles.py and the torch backend.

Backends (tests/conftest.py's backend_fixture): the compiled C++ kernels (cpu-cpp), the Triton
kernels (cpu-triton runs them under TRITON_INTERPRET=1, set before triton is imported; on a GPU
machine cuda-triton runs them compiled) and the CUDA kernels (cuda-cuda); unavailable pairs are
skipped with the registry's reason.  The torch backend is the at-dtype reference (the executable
statement of the math); it is itself checked where a property is exact (restores, backups,
guards).

Numerical rule (tests/tolerance.py, docs/design.md §5 (Tests)): a backend's max error against the
float64 oracle is at most 2x the torch backend's error at that dtype plus a few ulps.  The compiled
kernels compute the per-tensor factors (norms, step sizes) in float32 by contract for every dtype,
so their float64 results get float32's ulp as the floor.  Exact rules are checked with torch.equal
on raw-bit views: backups and restores are bit-exact (NaN payloads, -0.0, subnormals), skipped
(guarded-off) tensors are untouched, results are deterministic.

Backend-specific tests follow the shared ones: the dispatcher contract of the native kernels
(opcheck, argument errors, thread-count determinism) and the Triton launcher (launch counts, plan
cache, round-to-nearest-even stores, int64 offsets in a subprocess, sm_90 compilation).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():  # conftest does this too; kept so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import oracles  # noqa: E402  (tests/ is on sys.path via conftest.py)
import tolerance  # noqa: E402
from conftest import backend_fixture  # noqa: E402
from fused_adv import ops  # noqa: E402
from oracles import bit_equal, bits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F = torch.ops.fused_adv
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
# empty (two ways), tiny, odd, multi-dim, and one crossing the C++ kernels' 32768-element chunk
# boundary twice (the interpreter runs it as one 2**18-element tile)
SHAPES = [(0,), (4, 0), (1,), (7,), (3, 5, 2), (7, 13), (33, 17), (301,), (70001,)]
EMPTY = [0, 1]  # indices of the empty tensors in SHAPES
# tensor counts: one tensor, the mixed shapes above, and more than apex's 110 tensors per launch
COUNTS = {"one": [(33, 17)], "few": SHAPES, "many": [((i * 37) % 300 + i % 3,) for i in range(120)]}

FUSED = [("cpu", "cpp"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton")]
backend = backend_fixture("restore_", FUSED)          # the fused backends, against the torch backend
any_backend = backend_fixture("restore_")             # every backend, for the exact properties
native = backend_fixture("restore_", [("cpu", "cpp")])  # the C++ kernels behind the dispatcher op
triton = backend_fixture("restore_", [("cpu", "triton"), ("cuda", "triton")])


# ---- helpers -----------------------------------------------------------------------------------

def make(shapes, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device) for s in shapes]


def make_pgb(dtype, device="cpu", shapes=SHAPES, seed=0, spread=0.05):
    """P, G and a backup B = P - small noise (so ||P - B|| is sometimes inside, sometimes outside
    the PGD ball)."""
    gen = torch.Generator().manual_seed(seed)
    P = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    G = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    B = [(p.double().cpu() - spread * torch.randn(p.shape, generator=gen, dtype=torch.float64))
         .to(dtype).to(device) for p in P]
    return P, G, B


def clones(ts):
    return [t.clone() for t in ts]


def floor_dtype(name, dtype, op):
    """The per-tensor factors (norms, step sizes, PGD statistics) are float32 by contract for
    every dtype, so float64 results get float32's ulp as the floor.  FGSM has no factor: Triton
    passes float64 tensors the caller's double epsilon (the strict float64 floor holds there);
    the C++ / CUDA kernels take a float32 epsilon."""
    if dtype != torch.float64 or (op == "fgsm" and name == "triton"):
        return None
    return torch.float32


def check(name, fused, ref, oracle, what, op=None):
    dt = next((t.dtype for t in fused), torch.float32)
    tolerance.assert_all_close_to_oracle(fused, ref, oracle, f"{name} {what}", floor_dtype(name, dt, op))


def run_update(op, name, P, G, B, first):
    """Applies ``op`` with backend ``name`` on copies of P and B; returns (P, B) after.  The
    per-tensor sums the update consumes come from the torch backend, so that fused and reference
    updates see the same inputs."""
    P, B = clones(P), clones(B)
    if op == "fgm":
        ops.fgm_perturb_(P, G, B, ops.multi_tensor_sumsq(G, backend="torch"), 0.7, first, backend=name)
    elif op == "fgsm":
        ops.fgsm_perturb_(P, G, B, 0.01, first, backend=name)
    elif op == "pgd":
        stats = ops.pgd_reduce(P, G, B, first, backend="torch")
        ops.pgd_perturb_(P, G, B, stats, 0.3, 0.6, first, backend=name)
    else:
        ss = ops.multi_tensor_sumsq(G + P, backend="torch")
        ops.awp_perturb_(P, G, B, ss[:len(P)].contiguous(), ss[len(P):].contiguous(), 0.5, 0.01, first,
                         backend=name)
    return P, B


def oracle_update(op, P, G, B, first):
    if op == "fgm":
        return oracles.fgm(P, G, 0.7)
    if op == "fgsm":
        return oracles.fgsm(P, G, 0.01)
    if op == "pgd":
        return oracles.pgd(P, G, B, 0.3, 0.6, first)
    return oracles.awp(P, G, B, 0.5, 0.01, first)


def run_script(code: str, env_update=None, timeout=600):
    """Runs ``code`` in a fresh interpreter at the repository root (for cases that may crash the
    process or need a different TRITON_INTERPRET)."""
    env = dict(os.environ)
    env.update(env_update or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- reductions --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_multi_tensor_sumsq(backend, dtype):
    device, name = backend
    P, G, _ = make_pgb(dtype, device)
    tensors = G + make(SHAPES, dtype, device, seed=3, scale=3.0)  # the AWP call: both norms in one call
    got = ops.multi_tensor_sumsq(tensors, backend=name)
    ref = ops.multi_tensor_sumsq(tensors, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (len(tensors),) and got.device.type == device
    check(name, [got], [ref], [oracles.sumsq(tensors)], "sumsq")
    assert (got[EMPTY] == 0).all()
    assert torch.equal(got, ops.multi_tensor_sumsq(tensors, backend=name))  # deterministic


def test_sumsq_accumulates_in_fp32(backend):
    # 4096 fp16 values of 300: the sum of squares (3.7e8) overflows fp16 (max 65504) by far
    device, name = backend
    x = torch.full((4096,), 300.0, dtype=torch.float16, device=device)
    assert ops.multi_tensor_sumsq([x], backend=name).item() == 4096 * 300.0 ** 2


@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pgd_reduce(backend, dtype, first):
    device, name = backend
    P, G, B = make_pgb(dtype, device, seed=1, spread=0.01)
    got = ops.pgd_reduce(P, G, B, first, backend=name)
    ref = ops.pgd_reduce(P, G, B, first, backend="torch")
    assert got.shape == (len(P), 3) and got.dtype == torch.float32 and got.device.type == device
    oracle = oracles.pgd_stats(P, G, B, first)
    for col in range(3):
        check(name, [got[:, col]], [ref[:, col]], [oracle[:, col]], f"pgd_reduce col {col}")
    if first:
        assert (got[:, 1:] == 0).all()
    assert torch.equal(got, ops.pgd_reduce(P, G, B, first, backend=name))


def test_pgd_reduce_first_does_not_read_backups(backend):
    # On the first step the backups hold garbage (torch.empty): NaNs there must not leak.
    device, name = backend
    P, G = make([(100,)], torch.float32, device, 1), make([(100,)], torch.float32, device, 2)
    B = [torch.full((100,), float("nan"), device=device)]
    assert torch.isfinite(ops.pgd_reduce(P, G, B, True, backend=name)).all()


def test_awp_many_tensors_one_reduction(backend):
    # The AWP pattern: ||G||^2 and ||P||^2 of 120 tensors in one multi_tensor_sumsq call.
    device, name = backend
    shapes = [(i % 13 + 1, 9) for i in range(120)]
    P, G = make(shapes, torch.float32, device, 3), make(shapes, torch.float32, device, 4)
    sq = ops.multi_tensor_sumsq(G + P, backend=name)
    check(name, [sq], [ops.multi_tensor_sumsq(G + P, backend="torch")], [oracles.sumsq(G + P)], "sumsq")


# ---- update passes, one step -------------------------------------------------------------------

@pytest.mark.parametrize("count", list(COUNTS))
@pytest.mark.parametrize("first", [True, False], ids=["write_backup", "no_backup"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["fgm", "fgsm", "pgd", "awp"])
def test_update_matches_oracle(backend, op, dtype, first, count):
    device, name = backend
    P, G, B = make_pgb(dtype, device, shapes=COUNTS[count], seed=1)
    G[-1].view(-1)[0] = 0  # sign(0) = 0 for FGSM; an ordinary entry for the others
    P_t, B_t = run_update(op, name, P, G, B, first)
    P_r, _ = run_update(op, "torch", P, G, B, first)
    check(name, P_t, P_r, oracle_update(op, P, G, B, first), f"{op} {dtype}", op)
    for i in range(len(P)):
        # the backup is a raw-bit copy of P when written, untouched otherwise
        assert bit_equal(B_t[i], P[i] if first else B[i]), f"backup {i}"


@pytest.mark.parametrize("op", ["fgm", "pgd", "awp"])
def test_pgd_projection_and_awp_box_are_active(backend, op):
    """The cases above must exercise the projection / the clamp, or they would not test them."""
    device, name = backend
    P, G, B = make_pgb(torch.float32, device, seed=1)
    P_t, _ = run_update(op, name, P, G, B, False)
    if op == "pgd":  # some tensors end ON the sphere of radius 0.6 around B, some inside
        radii = [(p - b).double().norm().item() for p, b in zip(P_t, B) if p.numel()]
        assert any(abs(r - 0.6) < 1e-5 for r in radii) and any(r < 0.59 for r in radii)
    elif op == "awp":  # some entries sit exactly on the box
        on_box = sum(((p - b).abs() == (0.01 * b.abs())).sum().item() for p, b in zip(P_t, B))
        assert on_box > 0
    else:
        moved = [(p - q).double().norm().item() for p, q in zip(P_t, P) if p.numel()]
        assert all(abs(m - 0.7) < 1e-4 for m in moved)  # each tensor moves by exactly epsilon


# ---- several steps, then restore ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("eps", [1e9, 0.05])  # no projection / projection active
def test_pgd_steps(backend, dtype, eps):
    device, name = backend
    P0, B = make(SHAPES, dtype, device, 1), [torch.empty(s, dtype=dtype, device=device) for s in SHAPES]
    P = clones(P0)
    for t in range(3):
        G = make(SHAPES, dtype, device, 10 + t)
        first = t == 0
        stats = ops.pgd_reduce(P, G, B, first, backend=name)
        pre_P, pre_B = clones(P), (clones(P) if first else clones(B))
        pr, br = clones(P), clones(B)
        ops.pgd_perturb_(P, G, B, stats, 0.3, eps, first, backend=name)
        ops.pgd_perturb_(pr, G, br, stats, 0.3, eps, first, backend="torch")
        if first:
            for b, p in zip(B, pre_P):
                assert bit_equal(b, p)
        check(name, P, pr, oracles.pgd(pre_P, G, pre_B, 0.3, eps), f"pgd step {t}", "pgd")
        if eps < 1:  # the projection keeps every tensor inside the eps-ball (up to rounding)
            for p, b in zip(P, B):
                if p.numel():
                    # per-tensor factors are float32 by contract: float64 gets fp32's eps
                    ulp = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
                    tol = 4 * ulp * (1 + float(b.double().norm()))
                    assert float((p.double() - b.double()).norm()) <= eps + tol
    ops.restore_(P, B, backend=name)
    for p, p0 in zip(P, P0):
        assert bit_equal(p, p0), "restore must be bit-exact"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("adv_eps", [0.2, 1e-3])  # loose / tight box
def test_awp_steps(backend, dtype, adv_eps):
    device, name = backend
    P0, B = make(SHAPES, dtype, device, 1), [torch.empty(s, dtype=dtype, device=device) for s in SHAPES]
    P = clones(P0)
    for t in range(2):
        G = make(SHAPES, dtype, device, 20 + t)
        first = t == 0
        gsq = ops.multi_tensor_sumsq(G, backend=name)
        psq = ops.multi_tensor_sumsq(P, backend=name)
        pre_P, pre_B = clones(P), (clones(P) if first else clones(B))
        pr, br = clones(P), clones(B)
        ops.awp_perturb_(P, G, B, gsq, psq, 0.5, adv_eps, first, backend=name)
        ops.awp_perturb_(pr, G, br, gsq, psq, 0.5, adv_eps, first, backend="torch")
        check(name, P, pr, oracles.awp(pre_P, G, pre_B, 0.5, adv_eps, grad_sumsq=gsq, param_sumsq=psq),
              f"awp step {t}", "awp")
        for p, b in zip(P, B):  # inside the box computed in P's dtype: exact, no tolerance
            e = adv_eps * b.abs()
            assert bool(((p >= b - e) & (p <= b + e)).all())
    ops.restore_(P, B, backend=name)
    for p, p0 in zip(P, P0):
        assert bit_equal(p, p0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("method", ["fgm", "pgd", "awp"])
def test_attack_restore_cycles(backend, method, dtype):
    """Three training-like cycles (new gradient, attack steps, restore, optimizer-like update):
    the perturbed weights follow the torch backend's, and every restore gives back the exact bits
    of the cycle's starting weights.  Backups (and Triton's cached launch plans) are reused across
    cycles."""
    device, name = backend
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=4e-3, atol=4e-3)
    shapes = [(9, 7), (1,), (0,), (130,)]
    P, _, _ = make_pgb(dtype, device, shapes=shapes, seed=8)
    params = {b: clones(P) for b in (name, "torch")}
    backups = {b: [torch.empty_like(p) for p in P] for b in (name, "torch")}
    for cycle in range(3):
        _, G, _ = make_pgb(dtype, device, shapes=shapes, seed=100 + cycle)
        perturbed = {}
        for b in (name, "torch"):
            Pb, Bb = params[b], backups[b]
            start = clones(Pb)
            for step in range(1 if method == "fgm" else 3):
                first = step == 0
                if method == "fgm":
                    ops.fgm_perturb_(Pb, G, Bb, ops.multi_tensor_sumsq(G, backend=b), 0.5, True, backend=b)
                elif method == "pgd":
                    stats = ops.pgd_reduce(Pb, G, Bb, first, backend=b)
                    ops.pgd_perturb_(Pb, G, Bb, stats, 0.3, 0.6, first, backend=b)
                else:
                    ss = ops.multi_tensor_sumsq(G + Pb, backend=b)
                    ops.awp_perturb_(Pb, G, Bb, ss[:4].contiguous(), ss[4:].contiguous(), 0.5, 0.05, first,
                                     backend=b)
            perturbed[b] = clones(Pb)
            ops.restore_(Pb, Bb, backend=b)
            assert all(bit_equal(p, s) for p, s in zip(Pb, start)), f"{b} restore, cycle {cycle}"
            for p, g in zip(Pb, G):  # the optimizer step between cycles
                p.sub_(0.1 * g)
        for a, b in zip(perturbed[name], perturbed["torch"]):
            torch.testing.assert_close(a, b, **tol)


def test_many_tensors_mixed_dtypes_fgm_cycles(backend):
    # 130 tensors (> apex's 110-per-launch table), four dtypes interleaved, three attack/restore
    # cycles: every cycle must restore bit-exactly and match the oracle.
    device, name = backend
    shapes = [((i * 37) % 300 + (i % 3),) for i in range(130)]
    P0 = [make([s], DTYPES[i % 4], device, seed=i)[0] for i, s in enumerate(shapes)]
    P, B = clones(P0), [torch.empty_like(p) for p in P0]
    for cycle in range(3):
        G = [make([s], DTYPES[i % 4], device, seed=1000 * cycle + i)[0] for i, s in enumerate(shapes)]
        gsq = ops.multi_tensor_sumsq(G, backend=name)
        check(name, [gsq], [ops.multi_tensor_sumsq(G, backend="torch")], [oracles.sumsq(G)], "sumsq")
        pr = clones(P)
        ops.fgm_perturb_(P, G, B, gsq, 1.0, True, backend=name)
        ops.fgm_perturb_(pr, G, [torch.empty_like(p) for p in P], gsq, 1.0, True, backend="torch")
        for i in range(4):  # one dtype at a time (the float64 floor depends on it)
            check(name, P[i::4], pr[i::4], oracles.fgm(P0[i::4], G[i::4], 1.0, gsq[i::4]), f"fgm cycle {cycle}",
                  "fgm")
        ops.restore_(P, B, backend=name)
        for p, p0 in zip(P, P0):
            assert bit_equal(p, p0)


# ---- guards: zero / NaN / inf gradients --------------------------------------------------------

def _guard_case(dtype, device):
    P = make([(50,)] * 4, dtype, device, 5)
    G = make([(50,)] * 4, dtype, device, 6)
    G[0].zero_()                 # zero grad: skipped
    G[1][7] = float("nan")       # NaN grad: norm NaN, skipped
    G[2][3] = float("inf")       # inf grad: norm +inf, NOT skipped
    return P, G


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fgm_guards(backend, dtype):
    device, name = backend
    P, G = _guard_case(dtype, device)
    gsq = ops.multi_tensor_sumsq(G, backend=name)
    assert gsq[0] == 0 and torch.isnan(gsq[1]) and torch.isinf(gsq[2])
    out, B = clones(P), [torch.empty_like(p) for p in P]
    ops.fgm_perturb_(out, G, B, gsq, 1.0, True, backend=name)
    assert bit_equal(out[0], P[0]) and bit_equal(out[1], P[1]), "zero/NaN-norm tensors must be untouched"
    assert bit_equal(B[1], P[1]), "the backup is taken even when the step is skipped"
    # n = +inf: factor 0, finite entries keep their value, the inf entry becomes NaN (0 * inf)
    nan_mask = torch.zeros(50, dtype=torch.bool, device=device)
    nan_mask[3] = True
    assert torch.equal(torch.isnan(out[2]), nan_mask)
    assert torch.equal(out[2][~nan_mask], P[2][~nan_mask])
    ref = clones(P[3:])
    ops.fgm_perturb_(ref, G[3:], clones(ref), gsq[3:], 1.0, False, backend="torch")
    check(name, out[3:], ref, oracles.fgm(P[3:], G[3:], 1.0, gsq[3:]), "fgm normal", "fgm")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fgsm_nan_grad_is_sign_zero(backend, dtype):
    # torch.sign(NaN) == 0 (the community class uses torch.sign): a NaN grad entry adds nothing.
    device, name = backend
    P, G = _guard_case(dtype, device)
    out = clones(P)
    ops.fgsm_perturb_(out, G, clones(P), 0.1, False, backend=name)
    ref = clones(P)
    ops.fgsm_perturb_(ref, G, clones(P), 0.1, False, backend="torch")
    assert torch.equal(out[1][7], P[1][7])
    assert torch.equal(out[0], P[0])
    check(name, out, ref, oracles.fgsm(P, G, 0.1), "fgsm", "fgsm")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pgd_awp_guards(backend, dtype):
    device, name = backend
    P, G = _guard_case(dtype, device)
    B = clones(P)
    stats = ops.pgd_reduce(P, G, B, True, backend=name)
    out = clones(P)
    ops.pgd_perturb_(out, G, [torch.empty_like(p) for p in P], stats, 0.3, 1.0, True, backend=name)
    assert bit_equal(out[0], P[0]) and bit_equal(out[1], P[1])
    gsq = ops.multi_tensor_sumsq(G, backend=name)
    psq = ops.multi_tensor_sumsq(P, backend=name)
    out = clones(P)
    ops.awp_perturb_(out, G, [torch.empty_like(p) for p in P], gsq, psq, 1.0, 0.2, True, backend=name)
    assert bit_equal(out[0], P[0]) and bit_equal(out[1], P[1])
    ref = clones(P)
    ops.awp_perturb_(ref, G, [torch.empty_like(p) for p in P], gsq, psq, 1.0, 0.2, True, backend="torch")
    check(name, out, ref, oracles.awp(P, G, P, 1.0, 0.2, grad_sumsq=gsq, param_sumsq=psq), "awp guards", "awp")


@pytest.mark.parametrize("op", ["fgm", "fgsm", "pgd", "awp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_nan_inf_grads(backend, op, dtype):
    device, name = backend
    P, G, B = make_pgb(dtype, device, shapes=[(33,)] * 4, seed=5)
    for p in P:  # signed zeros and a NaN in P: a skipped tensor must keep them bit for bit
        p[0], p[1], p[2] = -0.0, 0.0, float("nan")
    G[0].zero_()                  # ||G|| = 0: skipped
    G[1][7] = float("nan")        # ||G|| NaN: skipped
    G[2][9] = float("inf")        # ||G|| = +inf: NOT skipped (finite entries + 0, the inf one NaN)
    P_t, _ = run_update(op, name, P, G, B, False)
    P_r, _ = run_update(op, "torch", P, G, B, False)
    ulps = 2 * torch.finfo(dtype).eps  # same NaN/inf positions; values within rounding of torch's
    for i in range(4):
        torch.testing.assert_close(P_t[i], P_r[i], rtol=ulps, atol=ulps, equal_nan=True)
    if op != "fgsm":  # FGSM has no guard: sign(0) = sign(NaN) = 0 adds +0 (-0.0 becomes +0.0)
        assert bit_equal(P_t[0], P[0]) and bit_equal(P_t[1], P[1])
    if op in ("fgm", "pgd", "awp"):
        assert torch.isnan(P_t[2][9]) and not bit_equal(P_t[2], P[2])


# ---- bit-exact backups and restores (every backend, torch included) ----------------------------

def test_restore_bit_exact_special_values(any_backend):
    # NaN payloads, signed zeros, infinities and subnormals come back bit for bit, every dtype.
    device, name = any_backend
    for dtype, itype in [(torch.float32, torch.int32), (torch.float64, torch.int64),
                         (torch.float16, torch.int16), (torch.bfloat16, torch.int16)]:
        raw = torch.randint(-(2 ** 15), 2 ** 15 - 1, (4099,), dtype=torch.int64).to(itype)
        B = [raw.view(dtype).clone().to(device),
             torch.tensor([-0.0, 0.0, float("inf"), -float("inf")], dtype=dtype, device=device)]
        P = [torch.zeros_like(b) for b in B]
        ops.restore_(P, B, backend=name)
        for p, b in zip(P, B):
            assert torch.equal(p.view(itype), b.view(itype))
        # and the backup written by an attack is bit-exact too
        out = [torch.empty_like(b) for b in B]
        ops.fgsm_perturb_(clones(B), [torch.zeros_like(b) for b in B], out, 0.0, True, backend=name)
        for o, b in zip(out, B):
            assert torch.equal(o.view(itype), b.view(itype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backup_and_restore_are_bit_exact_for_any_bits(any_backend, dtype):
    """P with random bit patterns (NaN payloads, infinities, -0.0, subnormals): every op that
    writes the backup copies the raw bits, and restore gives them back."""
    device, name = any_backend
    gen = torch.Generator().manual_seed(9)
    width = oracles.BITS[dtype]
    info = torch.iinfo(width)
    P = [torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(width).view(dtype)
         .to(device) for n in (1, 37, 300)]
    # and, surely present: signalling and negative NaNs with payloads, -0.0, the smallest subnormal
    special = {torch.float32: [0x7F800001, -0x003FFEDD, -0x80000000, 1],              # 0xFFC00123
               torch.float16: [0x7C01, -0x01DD, -0x8000, 1],                          # 0xFE23
               torch.bfloat16: [0x7F81, -0x005D, -0x8000, 1],                          # 0xFFA3
               torch.float64: [0x7FF0000000000001, -0x0007FFFFFFFFFEDD, -0x8000000000000000, 1]}[dtype]
    P[2][:4] = torch.tensor(special, dtype=width).view(dtype).to(device)
    G = [torch.randn(p.shape, generator=gen).to(dtype).to(device) for p in P]
    original = clones(P)
    assert torch.isnan(P[2][:2]).all() and bits(P[2][2:3]).item() == torch.iinfo(width).min
    for op in ("fgm", "fgsm", "pgd", "awp"):
        Pc, B = clones(original), [torch.empty_like(p) for p in P]
        if op == "fgm":
            ops.fgm_perturb_(Pc, G, B, ops.multi_tensor_sumsq(G), 1.0, True, backend=name)
        elif op == "fgsm":
            ops.fgsm_perturb_(Pc, G, B, 1.0, True, backend=name)
        elif op == "pgd":
            ops.pgd_perturb_(Pc, G, B, ops.pgd_reduce(Pc, G, B, True), 0.3, 1.0, True, backend=name)
        else:
            ss = ops.multi_tensor_sumsq(G + Pc)
            ops.awp_perturb_(Pc, G, B, ss[:3].contiguous(), ss[3:].contiguous(), 1.0, 0.1, True, backend=name)
        assert all(bit_equal(b, o) for b, o in zip(B, original)), f"{op} backup"
        ops.restore_(Pc, B, backend=name)
        assert all(bit_equal(p, o) for p, o in zip(Pc, original)), f"{op} restore"


# ---- row-sparse gradients (the embedding case) -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_sparse_grads_unchanged_rows_exact(backend, dtype):
    # The C++ kernels skip storing 64-byte lines whose bits do not change (rows of tokens absent
    # from the batch, G = 0).  That must be invisible, on every backend: zero-grad rows come out
    # exactly as the torch backend leaves them, including -0.0 entries (p + 0*f turns -0.0 into
    # +0.0) and NaN entries.
    device, name = backend
    rows, hidden = 301, 40
    P = make([(rows, hidden)], dtype, device, 11)
    P[0][5, :7] = -0.0
    P[0][6, 3] = float("nan")
    G = make([(rows, hidden)], dtype, device, 12)
    live = torch.zeros(rows, dtype=torch.bool, device=device)
    live[torch.tensor([3, 64, 65, 200])] = True
    G[0][~live] = 0
    gsq = ops.multi_tensor_sumsq(G, backend="torch")
    itype = oracles.BITS[dtype]
    for op in ("fgm", "pgd"):
        out, ref = clones(P), clones(P)
        B, Br = [torch.empty_like(P[0])], [torch.empty_like(P[0])]
        if op == "fgm":
            ops.fgm_perturb_(out, G, B, gsq, 0.5, True, backend=name)
            ops.fgm_perturb_(ref, G, Br, gsq, 0.5, True, backend="torch")
        else:
            st = ops.pgd_reduce(P, G, B, True, backend=name)
            ops.pgd_perturb_(out, G, B, st, 0.3, 1.0, True, backend=name)
            ops.pgd_perturb_(ref, G, Br, st, 0.3, 1.0, True, backend="torch")
        o, r = out[0][~live], ref[0][~live]
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(o), nan), op  # NaN payloads may differ
        assert torch.equal(o[~nan].view(itype), r[~nan].view(itype)), op
        p_dead = P[0][~live][~nan]
        assert torch.equal(o[~nan].view(itype), p_dead.abs().view(itype).where(p_dead == 0, p_dead.view(itype))), op
        assert not torch.equal(out[0][live], P[0][live])  # the live rows did move
        ops.restore_(out, B, backend=name)
        assert torch.equal(out[0].view(itype), P[0].view(itype))


# ---- the native kernels behind the dispatcher ops (cpu-cpp) ------------------------------------

def test_deterministic_across_runs_and_threads(native):
    # Large enough to take the parallel path (> 65536 elements in total, many chunks).
    _, name = native
    shapes = [(300_001,), (1000,), (65_537,)]
    P, G = make(shapes, torch.float32, seed=7), make(shapes, torch.float32, seed=8)
    B = [(p + 0.01).contiguous() for p in P]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            sq = ops.multi_tensor_sumsq(G + P, backend=name)
            st = ops.pgd_reduce(P, G, B, False, backend=name)
            out = clones(P)
            ops.awp_perturb_(out, G, clones(B), sq[:3], sq[3:], 1.0, 0.2, False, backend=name)
            results.append((sq, st, out))
    finally:
        torch.set_num_threads(old)
    for sq, st, out in results[1:]:
        assert torch.equal(sq, results[0][0]) and torch.equal(st, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(out, results[0][2]))


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


@pytest.mark.parametrize("op,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(native, op, args):
    assert ops.why_not("cpp", torch.device("cpu"), op) is None  # the native kernel serves the dispatcher op
    torch.library.opcheck(getattr(F, op).default, args)


def test_native_kernels_registered(native):
    from fused_adv.ops import _library
    for op in ["multi_tensor_sumsq", "pgd_reduce", "fgm_perturb_", "fgsm_perturb_", "pgd_perturb_",
               "awp_perturb_", "restore_"]:
        assert (f"fused_adv::{op}", "CPU") in _library.NATIVE


def test_kernel_argument_errors(native):
    p = torch.randn(4)
    with pytest.raises(RuntimeError, match="got 1 params but 0 grads"):
        F.fgsm_perturb_([p], [], [p.clone()], 0.1, True)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        F.restore_([torch.randn(4, 4).t()], [torch.randn(4, 4)])
    with pytest.raises(RuntimeError, match="grad_sumsq must have shape"):
        F.fgm_perturb_([p], [p.clone()], [p.clone()], torch.ones(2), 1.0, True)
    with pytest.raises(RuntimeError, match="dtype"):
        F.multi_tensor_sumsq([torch.ones(3, dtype=torch.int32)])


def test_empty_lists_and_empty_tensors(native):
    # Empty lists never reach the dispatcher (no tensor argument to pick a kernel from): the
    # public functions answer them; lists of empty tensors do reach the kernel.
    _, name = native
    assert ops.multi_tensor_sumsq([], backend=name).shape == (0,)
    assert ops.pgd_reduce([], [], [], True, backend=name).shape == (0, 3)
    ops.restore_([], [], backend=name)
    e = [torch.empty(0), torch.empty(0, 3, dtype=torch.float16)]
    assert torch.equal(F.multi_tensor_sumsq(e), torch.zeros(2))
    F.awp_perturb_(e, clones(e), clones(e), torch.zeros(2), torch.zeros(2), 1.0, 0.2, True)


# ---- the Triton launcher (cpu-triton: interpreter; cuda-triton: compiled) ----------------------

class LaunchCounter:
    """Wraps a kernel object: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def assert_same_bits_as_torch(device, a, b, what):
    """Bit-identical under the interpreter (same fp32 operations in the same order); on a GPU the
    compiler may fuse a multiply-add (one rounding instead of two), so allow one unit in the last
    place of the stored dtype there."""
    if device == "cpu":
        assert bit_equal(a, b), f"{what}: {(bits(a) != bits(b)).sum().item()} elements differ"
    else:
        ulp = torch.finfo(a.dtype).eps * b.double().abs().clamp_min(1)
        assert ((a.double() - b.double()).abs() <= ulp).all(), what


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_stores_round_to_nearest_even(triton, dtype):
    """P + eps*sign(G) is one fp32 addition (eps*sign is exact, so a GPU's fused multiply-add
    changes nothing), then the store to P's dtype: it must round to nearest even, ties included
    (triton's interpreter truncates fp32 -> bf16; the kernels round with integer ops instead)."""
    device, name = triton
    gen = torch.Generator().manual_seed(10)
    P = [torch.randn(2048, generator=gen).to(dtype).to(device)]
    G = [torch.randn(2048, generator=gen).to(dtype).to(device)]
    ulp1 = torch.finfo(dtype).eps  # ulp of 1.0
    P[0][:4] = torch.tensor([1.0, 1.0 + ulp1, 1.0, -1.0 - ulp1], dtype=dtype)
    G[0][:4] = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=dtype)
    for eps in (0.0123, ulp1 / 2):  # a generic step, and exact ties (1 + ulp/2 -> 1, ...)
        Pc = clones(P)
        ops.fgsm_perturb_(Pc, G, [torch.empty_like(P[0])], eps, False, backend=name)
        # the same fp32 operations in torch, then torch's (round-to-nearest-even) conversion
        expected = (P[0].float() + eps * torch.sign(G[0].float())).to(dtype)
        assert bit_equal(Pc[0], expected), f"eps {eps}: {(bits(Pc[0]) != bits(expected)).sum()} differ"
        if eps == ulp1 / 2:  # ties to even: 1+ulp/2 -> 1, (1+ulp)+ulp/2 -> 1+2ulp
            assert Pc[0][0].item() == 1.0 and Pc[0][1].item() == 1.0 + 2 * ulp1


@pytest.mark.parametrize("adv_lr", [0.015, 1e3], ids=["near_box", "far_outside"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_awp_box_rounded_like_the_reference(triton, dtype, adv_lr):
    """e, lo and hi are each rounded to P's dtype (as the reference computes them in P's dtype):
    steps that end near the box edges (where an unrounded bound would clamp to a different value)
    and far outside it (where P lands exactly on the rounded bound) match the torch backend."""
    device, name = triton
    P, G, _ = make_pgb(dtype, device, shapes=[(4096,)], seed=3)
    B = clones(P)
    ss_g, ss_p = ops.multi_tensor_sumsq(G), ops.multi_tensor_sumsq(P)
    outs = []
    for b in (name, "torch"):
        Pc = clones(P)
        ops.awp_perturb_(Pc, G, B, ss_g, ss_p, adv_lr, 0.013, False, backend=b)
        outs.append(Pc[0])
    assert_same_bits_as_torch(device, outs[0], outs[1], f"awp {dtype} adv_lr={adv_lr}")


def test_fp64_scalars_are_exact(triton):
    """float64 tensors get the caller's double epsilon (not its float32 rounding): bit-identical
    to the torch backend, which computes eps * sign(G) in float64."""
    device, name = triton
    P, G, _ = make_pgb(torch.float64, device, shapes=[(129,)], seed=4)
    outs = []
    for b in (name, "torch"):
        Pc, Bc = clones(P), [torch.empty_like(P[0])]
        ops.fgsm_perturb_(Pc, G, Bc, 0.1, True, backend=b)
        outs.append(Pc[0])
    assert bit_equal(outs[0], outs[1])
    assert not bit_equal(outs[0], P[0] + float(torch.tensor(0.1, dtype=torch.float32)) * torch.sign(G[0]))


@pytest.mark.parametrize("op", ["sumsq", "pgd_reduce", "fgm", "fgsm", "pgd", "awp", "restore"])
def test_many_chunks_per_tensor(triton, op, monkeypatch):
    """Tensors split over many programs (chunk starts > 0, a tail chunk, phase 2 looping over
    several partial rows of several tensors side by side).  Under the interpreter the chunk size
    is forced down to 64 elements so that small tensors have up to 47 chunks."""
    from fused_adv._triton import multi_tensor as mt
    device, name = triton
    monkeypatch.setattr(mt, "_INTERP_MAX_BLOCK", 64)
    monkeypatch.setattr(mt, "_CACHE", type(mt._CACHE)())  # plans made with the usual chunk size
    shapes = [(3001,), (64,), (1,), (0,), (65,), (20, 30)]
    P, G, B = make_pgb(torch.float32, device, shapes=shapes, seed=12)
    if device == "cpu":
        plan = mt.plan([P, G, B])
        assert plan.groups[0].config.chunk == 64 and plan.n_chunks == 47 + 1 + 1 + 2 + 10
    if op in ("sumsq", "pgd_reduce"):
        fused = (ops.multi_tensor_sumsq(G, backend=name) if op == "sumsq"
                 else ops.pgd_reduce(P, G, B, False, backend=name)[:, 2])
        ref = (ops.multi_tensor_sumsq(G, backend="torch") if op == "sumsq"
               else ops.pgd_reduce(P, G, B, False, backend="torch")[:, 2])
        oracle = oracles.sumsq(G) if op == "sumsq" else oracles.sumsq([p - b for p, b in zip(P, B)])
        check(name, [fused], [ref], [oracle], op)
    elif op == "restore":
        Pc = clones(P)
        ops.restore_(Pc, B, backend=name)
        assert all(bit_equal(p, b) for p, b in zip(Pc, B))
    else:
        P_t, B_t = run_update(op, name, P, G, B, True)
        P_r, _ = run_update(op, "torch", P, G, B, True)
        check(name, P_t, P_r, oracle_update(op, P, G, B, True), op, op)
        assert all(bit_equal(b, p) for b, p in zip(B_t, P))


def mixed_set(device, n=131, seed=6):
    """n tensors (> 110, apex's per-launch limit) cycling through dtypes and sizes, with a few
    misaligned views (storage offset of one element) and empty tensors."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    P, G, B = [], [], []
    for i in range(n):
        dt = dtypes[i % 3]
        numel = [1, 0, 17, 64, 5, 129][i % 6]
        if i % 10 == 9:  # misaligned: 4 or 2 bytes past an aligned allocation
            p = torch.randn(numel + 1, generator=gen).to(dt).to(device)[1:]
        else:
            p = torch.randn(numel, generator=gen).to(dt).to(device)
        P.append(p)
        G.append(torch.randn(numel, generator=gen).to(dt).to(device))
        B.append(torch.empty_like(G[-1]))
    assert any(p.data_ptr() % 16 for p in P)
    return P, G, B


def test_many_tensors_mixed_dtypes_one_launch_per_group(triton, monkeypatch):
    from fused_adv._triton import multi_tensor as mt
    from fused_adv._triton import weight as tw
    device, name = triton
    P, G, B = mixed_set(device)
    counters = {}
    for mod, kname in ((tw, "_reduce_kernel"), (tw, "_update_kernel"), (tw, "_restore_kernel"),
                       (mt, "_finish_kernel")):
        counters[kname] = LaunchCounter(getattr(mod, kname))
        monkeypatch.setattr(mod, kname, counters[kname])
    before = clones(P)
    groups = {(t.dtype, all(x.data_ptr() % 16 == 0 for x in (p, g, b)))
              for t, p, g, b in zip(P, P, G, B) if t.numel()}
    # AWP step: one reduction over 2N tensors, one update, one restore
    ss = ops.multi_tensor_sumsq(G + P, backend=name)
    assert counters["_finish_kernel"].launches == 1
    assert counters["_reduce_kernel"].launches == len(groups)
    ref = ops.multi_tensor_sumsq(G + P, backend="torch")
    check(name, [ss], [ref], [oracles.sumsq(G + P)], "sumsq mixed")
    n = len(P)
    ops.awp_perturb_(P, G, B, ss[:n].contiguous(), ss[n:].contiguous(), 0.5, 0.02, True, backend=name)
    assert counters["_update_kernel"].launches == len(groups)
    P_r, B_r = clones(before), [torch.empty_like(b) for b in B]
    ops.awp_perturb_(P_r, G, B_r, ref[:n].contiguous(), ref[n:].contiguous(), 0.5, 0.02, True, backend="torch")
    check(name, P, P_r, oracles.awp(before, G, before, 0.5, 0.02, True), "awp mixed", "awp")
    assert all(bit_equal(b, p) for b, p in zip(B, before))
    ops.restore_(P, B, backend=name)
    assert counters["_restore_kernel"].launches == len(groups)
    assert all(bit_equal(p, q) for p, q in zip(P, before))


def test_plan_is_cached_and_keyed_by_address(triton):
    from fused_adv._triton import multi_tensor as mt
    device, _ = triton
    P, G, B = make_pgb(torch.float32, device, seed=7)
    first = mt.plan([P, G, B])
    assert mt.plan([P, G, B]) is first  # steady state: no new table, no upload
    G2 = clones(G)  # same shapes, new storage: a different table
    other = mt.plan([P, G2, B])
    assert other is not first
    assert [int(a) for a in other.groups[0].tens[:, 3]] == [g.data_ptr() for g in G2 if g.dtype == torch.float32]


def test_ops_under_torch_compile(triton):
    """A compiled training-step fragment that calls the Triton ops: the launchers run eagerly
    (graph break) and give the eager results."""
    device, name = triton
    P, G, _ = make_pgb(torch.float32, device, shapes=[(5, 3), (17,)], seed=11)

    def step(P, G, B):
        ops.fgm_perturb_(P, G, B, ops.multi_tensor_sumsq(G, backend=name), 0.5, True, backend=name)
        return [p * 2 for p in P]

    compiled = torch.compile(step, backend="eager")
    Pc, Bc = clones(P), [torch.empty_like(p) for p in P]
    out = compiled(Pc, G, Bc)
    Pe, Be = clones(P), [torch.empty_like(p) for p in P]
    ref = step(Pe, G, Be)
    assert all(bit_equal(a, b) for a, b in zip(out + Pc + Bc, ref + Pe + Be))


def test_int64_offsets_in_a_subprocess(triton):
    """Every Triton kernel addressed through element offsets beyond 2**32 (and 2**31).

    A real tensor of 2**31 elements would take ~12 GB for P, G, B and hours of interpreter time,
    so the table is rewritten instead: each address moves down by SHIFT elements, each numel and
    chunk start moves up by SHIFT.  The elements touched are the same, but only if the kernels keep
    every offset in int64 (an int32 truncation reads elsewhere: wrong values or a segfault, hence
    the subprocess).  Results must equal the unshifted run bit for bit."""
    device, _ = triton
    if device != "cpu":
        pytest.skip("shifts host addresses; the interpreter path")
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


def test_importing_the_package_does_not_import_triton(triton):
    res = run_script("""
    import sys
    import fused_adv, fused_adv.ops, fused_adv._triton
    assert "triton" not in sys.modules, "triton was imported eagerly"
    print("LAZY OK")
    """, env_update={"TRITON_INTERPRET": "0"})
    assert res.returncode == 0 and "LAZY OK" in res.stdout, res.stderr[-3000:]


def test_kernels_compile_for_sm90(triton):
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
