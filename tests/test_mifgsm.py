"""MI-FGSM (docs/methods.md §2b (MI-FGSM)): the reference pinned on hand-computed float64 cases,
the weight_ext ops (multi_tensor_abssum, mifgsm_perturb_) on every backend this machine can run
against float64 oracles (tests/tolerance.py), and the fused drop-in against the reference class:
fp32 trajectories within 2e-5, fp16/bf16 by the tolerance rule, bit-exact restore, clear errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fused_adv
import tolerance
from conftest import backend_fixture
from fused_adv import ops
from fused_adv import reference as R
from fused_adv.methods._common import AttackStateError
from models import ToyBert, batch, tiny_bert_cls
from oracles import bit_equal

pytestmark = pytest.mark.usefixtures("one_thread")

backend = backend_fixture("mifgsm_perturb_")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
SHAPES = [(0,), (1,), (7,), (3, 5, 2), (33, 17), (70001,)]


# ---------------------------------------------------------------- reference, by hand (float64)
class OneParam(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.word_embeddings = nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_reference_hand_case_two_steps():
    m = OneParam([0.0, 0.0, 0.0])
    adv = R.MIFGSM(m, epsilon=0.3, steps=3, decay=0.5)        # alpha = 0.1
    m.word_embeddings.grad = torch.tensor([1.0, -3.0, 0.0], dtype=torch.float64)
    adv.attack(is_first_attack=True)
    # M = G/||G||_1 = [0.25, -0.75, 0]; P = 0.1*sign(M)
    assert torch.allclose(adv.momentum["word_embeddings"], torch.tensor([0.25, -0.75, 0.0], dtype=torch.float64))
    assert torch.allclose(m.word_embeddings.data, torch.tensor([0.1, -0.1, 0.0], dtype=torch.float64))
    m.word_embeddings.grad = torch.tensor([-2.0, 1.0, 1.0], dtype=torch.float64)
    adv.attack()
    # M = 0.5*[0.25, -0.75, 0] + [-0.5, 0.25, 0.25] = [-0.375, -0.125, 0.25]; P += 0.1*sign(M)
    assert torch.allclose(adv.momentum["word_embeddings"], torch.tensor([-0.375, -0.125, 0.25], dtype=torch.float64))
    assert torch.allclose(m.word_embeddings.data, torch.tensor([0.0, -0.2, 0.1], dtype=torch.float64))
    adv.restore()
    assert torch.equal(m.word_embeddings.data, torch.zeros(3, dtype=torch.float64))


def test_reference_box_binds_and_skip_rules():
    m = OneParam([1.0, 1.0])
    adv = R.MIFGSM(m, epsilon=0.15, steps=1, decay=1.0)       # alpha = 0.15 = epsilon
    m.word_embeddings.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    adv.attack(is_first_attack=True)
    adv.attack()                                              # 1.3 clamped back to 1.15
    assert torch.allclose(m.word_embeddings.data, torch.tensor([1.15, 1.15], dtype=torch.float64))
    for g in ([0.0, 0.0], [math.nan, 1.0]):                   # ||G||_1 zero or NaN: skipped
        before = m.word_embeddings.data.clone()
        m.word_embeddings.grad = torch.tensor(g, dtype=torch.float64)
        adv.attack()
        assert torch.equal(m.word_embeddings.data, before)
    with pytest.raises(ValueError):
        R.MIFGSM(m, steps=0)


def test_reference_loop_bookkeeping_is_pgds():
    """Final grad = clean + last adversarial (docs/methods.md §3 (PGD) loop)."""
    torch.manual_seed(0)
    model = ToyBert().double()
    data = batch(0)
    adv = R.MIFGSM(model, epsilon=0.05, steps=2)
    _ref_step(model, adv, data)
    got = [p.grad.clone() for p in model.parameters()]
    # by hand: the clean grad, then the gradient at the point after both attacks
    m2 = copy.deepcopy(model)
    for p in m2.parameters():
        p.grad = None
    _loss(m2, data).backward()
    clean = [p.grad.clone() for p in m2.parameters()]
    w = m2.embeddings.word_embeddings.weight
    a2 = R.MIFGSM(m2, epsilon=0.05, steps=2)
    a2.attack(is_first_attack=True)
    m2.zero_grad()
    _loss(m2, data).backward()
    a2.attack()
    m2.zero_grad()
    _loss(m2, data).backward()
    adv_g = [p.grad.clone() for p in m2.parameters()]
    assert not torch.equal(w, a2.emb_backup["embeddings.word_embeddings.weight"])
    for g, c, a in zip(got, clean, adv_g):
        assert torch.allclose(g, c + a, atol=1e-12)


# ---------------------------------------------------------------- ops vs float64 oracles
def oracle_mifgsm(P, G, M, B, alpha, eps, decay, first):
    """float64: M' = decay*M + G/||G||_1 (M = 0 first), P' = clamp(P + alpha*sign(M'), B -+ eps),
    skip when ||G||_1 is 0 or NaN.  Returns (P', M', B')."""
    outP, outM, outB = [], [], []
    for p, g, m, b in zip(P, G, M, B):
        p, g, m, b = (t.detach().double().cpu() for t in (p, g, m, b))
        if first:
            b, m = p.clone(), torch.zeros_like(m)
        n = g.abs().sum().item()
        if n == 0 or math.isnan(n):
            outP.append(p), outM.append(m), outB.append(b)
            continue
        m = decay * m + g / n
        outM.append(m)
        outP.append(torch.clamp(p + alpha * torch.sign(m), b - eps, b + eps))
        outB.append(b)
    return outP, outM, outB


def make(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    P = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    G = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    M = [(torch.randn(s, generator=g) * 1e-3).to(dtype) for s in shapes]
    B = [(p.double() - 0.02 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for p, s in zip(P, shapes)]
    return P, G, M, B


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_abssum_matches_oracle(dtype, backend):
    device, be = backend
    X = [t.to(device) for t in make(dtype)[1]]
    got = ops.multi_tensor_abssum(X, backend=be).cpu()
    ref = ops.multi_tensor_abssum([x.cpu() for x in X], backend="torch")
    oracle = torch.tensor([x.double().abs().sum().item() for x in X], dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (len(X),)
    assert torch.allclose(got.double(), oracle, rtol=1e-5, atol=0)
    assert torch.allclose(ref.double(), oracle, rtol=1e-5, atol=0)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mifgsm_perturb_matches_oracle(dtype, first, backend):
    device, be = backend
    P, G, M, B = make(dtype)
    G[2].zero_()                                  # zero norm: skipped
    G[3][0, 0, 0] = math.nan                      # NaN norm: skipped
    alpha, eps, decay = 0.05, 0.07, 0.9
    n1 = torch.tensor([g.double().abs().sum().item() for g in G], dtype=torch.float32)

    def run(be_, dev):
        p, g, m, b = ([t.clone().to(dev) for t in lst] for lst in (P, G, M, B))
        ops.mifgsm_perturb_(p, g, m, b, n1.to(dev), alpha, eps, decay, first, backend=be_)
        return [t.cpu() for t in p], [t.cpu() for t in m], [t.cpu() for t in b]

    fp, fm, fb = run(be, device)
    rp, rm, rb = run("torch", "cpu")
    op, om, ob = oracle_mifgsm(P, G, M, B, alpha, eps, decay, first)
    floor = torch.float32 if dtype == torch.float64 else None
    tolerance.assert_all_close_to_oracle(fm, rm, om, f"M {be}", floor_dtype=floor)
    tolerance.assert_all_close_to_oracle(fp, rp, op, f"P {be}", floor_dtype=floor)
    for i in (2, 3):  # skipped tensors: P untouched, M untouched (0 on the first step)
        assert bit_equal(fp[i], P[i])
        assert bit_equal(fm[i], torch.zeros_like(M[i]) if first else M[i])
    for got, want in zip(fb, P if first else B):  # backups bit-exact, written only on the first step
        assert bit_equal(got, want)


# ---------------------------------------------------------------- drop-in vs reference
K = 3


def _loss(model, data):
    ids, mask, labels = data
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return (out.loss if hasattr(out, "loss") else out[0]).float()


def _ref_step(model, adv, data, steps=None):
    steps = adv.steps if steps is None else steps
    _loss(model, data).backward()
    adv.backup_grad()
    for t in range(steps):
        adv.attack(is_first_attack=(t == 0))
        if t != steps - 1:
            model.zero_grad()
        else:
            adv.restore_grad()
        _loss(model, data).backward()
    adv.restore()


def run(model, *, fused, backend="auto", steps=3, vocab=50, restore_mode="copy", **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"epsilon": 0.05, "steps": K, "decay": 1.0, **kw}
    adv = (fused_adv.MIFGSM(model, backend=backend, restore_mode=restore_mode, **kw) if fused
           else R.MIFGSM(model, **kw))
    device = next(model.parameters()).device
    snaps = []
    for s in range(steps):
        data = [t.to(device) for t in batch(s, vocab=vocab)]
        _ref_step(model, adv, data)
        opt.step()
        model.zero_grad()
        snaps.append([p.detach().clone() for p in model.parameters()])
    return snaps


def assert_same_trajectory(ref, fus, names):
    for step, (r_, f_) in enumerate(zip(ref, fus)):
        for name, r, f in zip(names, r_, f_):
            tol = tolerance.FP32_TRAINING_RTOL * max(1.0, r.abs().max().item())
            err = (r.cpu() - f.cpu()).abs().max().item()
            assert err <= tol, f"step {step} {name}: {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("restore_mode", ["copy", "swap"])
@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_fp32_toy_training_matches_reference(decay, restore_mode, backend):
    device, be = backend
    torch.manual_seed(0)
    model = ToyBert().to(device)
    fused_model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    assert_same_trajectory(run(model, fused=False, decay=decay),
                           run(fused_model, fused=True, backend=be, decay=decay, restore_mode=restore_mode), names)


def test_fp32_tiny_bert_training_matches_reference(backend):
    device, be = backend
    model = tiny_bert_cls(num_labels=3).to(device)
    fused_model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    assert_same_trajectory(run(model, fused=False, vocab=64, steps=2),
                           run(fused_model, fused=True, backend=be, vocab=64, steps=2), names)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_training_within_tolerance_rule(dtype, backend):
    device, be = backend
    torch.manual_seed(1)
    base = ToyBert()
    oracle = run(copy.deepcopy(base).double().to(device), fused=False)
    ref = run(copy.deepcopy(base).to(device, dtype), fused=False)
    fus = run(copy.deepcopy(base).to(device, dtype), fused=True, backend=be)
    names = [n for n, _ in base.named_parameters()]
    for step in range(len(oracle)):
        for name, o, r, f in zip(names, oracle[step], ref[step], fus[step]):
            tolerance.assert_close_to_oracle(f, r, o, what=f"mifgsm {dtype} step {step} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_restore_is_bit_exact(dtype, backend):
    device, be = backend
    torch.manual_seed(2)
    model = ToyBert().to(device, dtype)
    before = [p.detach().clone() for p in model.parameters()]
    adv = fused_adv.MIFGSM(model, epsilon=0.05, steps=2, backend=be)
    data = [t.to(device) for t in batch(0)]
    for _ in range(3):  # the backups and momenta are reused
        model.zero_grad()
        _loss(model, data).backward()
        adv.attack(is_first_attack=True)
        adv.attack()
        assert not torch.equal(model.embeddings.word_embeddings.weight, before[0])
        adv.restore()
        for p, b in zip(model.parameters(), before):
            assert bit_equal(p.detach(), b)
    emb = model.embeddings.word_embeddings.weight
    assert adv.extra_memory_bytes() == 2 * emb.numel() * emb.element_size()   # backup + momentum


# ---------------------------------------------------------------- misuse
def test_misuse_raises_clear_errors():
    model = ToyBert()
    with pytest.raises(ValueError, match="steps"):
        fused_adv.MIFGSM(model, steps=0)
    adv = fused_adv.MIFGSM(model)
    with pytest.raises(AttackStateError):
        adv.restore()
    _loss(model, batch(0)).backward()
    with pytest.raises(AttackStateError):
        adv.attack()                                  # a later step before a first one
    with pytest.raises(ValueError, match="emb_name"):
        adv.attack(is_first_attack=True, emb_name="no_such_weight")
    adv.attack(is_first_attack=True)
    with pytest.raises(AttackStateError):
        adv.attack(is_first_attack=True)              # first attack twice
    with pytest.raises(AttackStateError):
        adv.attack(emb_name="position_embeddings")    # not backed up by the first attack
    adv.restore()


def test_forward_that_raises_leaves_nothing_perturbed():
    model = ToyBert()
    before = [p.detach().clone() for p in model.parameters()]
    adv = fused_adv.MIFGSM(model, epsilon=0.1)
    _loss(model, batch(0)).backward()
    with pytest.raises(RuntimeError, match="boom"):
        with adv.perturbed():
            raise RuntimeError("boom")
    assert not adv.is_attacked
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# ---------------------------------------------------------------- FGSM's sign (docs/methods.md §2)
def test_fgsm_sign_is_torch_sign(backend):
    """sign is torch.sign on the reference and every fused backend: sign(NaN) = sign(-0) = 0 (a NaN
    gradient entry moves nothing), sign(+-inf) = +-1 (issue 15's fidelity note)."""
    device, be = backend
    g = torch.tensor([math.nan, -0.0, 0.0, math.inf, -math.inf, 2.0])
    want = torch.tensor([1.0, 1.0, 1.0, 1.5, 0.5, 1.5])
    for make in (lambda m: R.FGSM(m, epsilon=0.5), lambda m: fused_adv.FGSM(m, epsilon=0.5, backend=be)):
        m = OneParam([1.0] * 6).float().to(device)
        m.word_embeddings.grad = g.to(device)
        adv = make(m)
        adv.attack()
        assert torch.equal(m.word_embeddings.detach().cpu(), want)
        adv.restore()
