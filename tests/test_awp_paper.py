"""AWP as the paper does it (docs/methods.md §4b (AWP (paper))): the reference pinned on
hand-computed float64 cases, the awp_paper_add_ op on every backend this machine can run against a
float64 oracle, the fused drop-in against the reference (fp32 trajectories within 2e-5, fp16/bf16
by the tolerance rule), the proxy-free mode against the proxy version within the proxy's own
cancellation error, the memory it saves, and clear errors for misuse."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_adv
import tolerance
from conftest import backend_fixture
from fused_adv import ops
from fused_adv import reference as R
from fused_adv.methods._common import AttackStateError
from models import ToyBert, batch, tiny_bert_cls

pytestmark = pytest.mark.usefixtures("one_thread")

backend = backend_fixture("awp_paper_add_")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
GAMMA = 0.01


class Net(nn.Module):
    """model(x) -> logits, as the paper's image classifiers (a LayerNorm weight and biases that the
    paper's rule leaves alone)."""

    def __init__(self, d_in=6, hidden=8, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def xy(seed, n=5, d_in=6, classes=3, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g).to(device, dtype),
            torch.randint(0, classes, (n,), generator=g).to(device))


# ---------------------------------------------------------------- reference, by hand (float64)
class Lin(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=True).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor(w, dtype=torch.float64))
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x)


def test_reference_hand_case_cross_entropy():
    # logits = W x with x = [1, 0]: [0, 0] for W = [[0, 1], [0, 2]]; softmax [.5, .5]; target 0:
    # dCE/dW = [[-.5, 0], [.5, 0]].  Delta = lr * dCE/dW; diff = ||W||/||Delta|| * Delta.
    model = Lin([[0.0, 1.0], [0.0, 2.0]])
    proxy = copy.deepcopy(model)
    awp = R.AdvWeightPerturb(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.01), gamma=0.1)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    diff = awp.calc_awp(x, torch.tensor([0]))
    assert list(diff) == ["lin.weight"]                       # the bias (dim 1) is not perturbed
    want = math.sqrt(5.0) / math.sqrt(2.0) * torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(diff["lin.weight"], want, atol=1e-12)
    assert torch.equal(model.lin.weight, torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64))
    awp.perturb(diff)
    assert torch.allclose(model.lin.weight, torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64) + 0.1 * want)
    awp.restore(diff)
    assert torch.allclose(model.lin.weight, torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64), atol=1e-15)


def test_reference_hand_case_closure():
    # loss = sum(W * C): dloss/dW = C; the proxy ascends it: Delta = lr*C; ||W|| = 5, so diff = 5*C/||C||.
    model = Lin([[3.0, 4.0], [0.0, 0.0]])
    proxy = copy.deepcopy(model)
    awp = R.AdvWeightPerturb(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.01), gamma=0.1)
    C = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    diff = awp.calc_awp(closure=lambda m: (m.lin.weight * C).sum())
    assert torch.allclose(diff["lin.weight"], 5.0 * C, atol=1e-12)
    awp.perturb(diff)
    assert torch.allclose(model.lin.weight, torch.tensor([[3.5, 4.0], [0.0, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- the op vs a float64 oracle
@pytest.mark.parametrize("coeff", [0.25, -0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_awp_paper_add_matches_oracle(dtype, coeff, backend):
    device, be = backend
    g = torch.Generator().manual_seed(0)
    shapes = [(0,), (1,), (7, 3), (33, 17), (70001,)]
    P = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    D = [torch.randn(s, generator=g).to(dtype) * 1e-3 for s in shapes]
    D[2].zero_()                                            # Delta = 0: diff 0 (no guard needed)
    scale = 0.01
    stats = ops.multi_tensor_sumsq(P + D, backend="torch")
    n = len(P)

    def run(be_, dev):
        p = [t.clone().to(dev) for t in P]
        ops.awp_paper_add_(p, [t.to(dev) for t in D], stats[:n].to(dev), stats[n:].to(dev), scale, coeff,
                           backend=be_)
        return [t.cpu() for t in p]

    oracle = []
    for p, d in zip(P, D):
        p, d = p.double(), d.double()
        delta = scale * d
        oracle.append(p + coeff * (p.norm() / (delta.norm() + 1e-20)) * delta)
    floor = torch.float32 if dtype == torch.float64 else None
    tolerance.assert_all_close_to_oracle(run(be, device), run("torch", "cpu"), oracle, f"awp_paper_add_ {be}",
                                         floor_dtype=floor)


# ---------------------------------------------------------------- drop-in vs reference
def make_awp(model, *, fused, proxy=True, backend="auto", lr=0.01):
    if not proxy:
        return fused_adv.AdvWeightPerturb(model, gamma=GAMMA, proxy_lr=lr, backend=backend)
    p = copy.deepcopy(model)
    opt = torch.optim.SGD(p.parameters(), lr=lr)
    if fused:
        return fused_adv.AdvWeightPerturb(model, p, opt, GAMMA, backend=backend)
    return R.AdvWeightPerturb(model, p, opt, GAMMA)


def run_logits(model, awp, steps=3, dtype=torch.float32):
    """The paper's loop with model(x) -> logits and calc_awp(inputs_adv, targets)."""
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = []
    for s in range(steps):
        x, y = xy(s, dtype=dtype, device=device)
        diff = awp.calc_awp(x, y)
        awp.perturb(diff)
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        awp.restore(diff)
        snaps.append([p.detach().clone() for p in model.parameters()])
    return snaps


def loss_hf(model, data):
    ids, mask, labels = data
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return (out.loss if hasattr(out, "loss") else out[0]).float()


def run_closure(model, awp, steps=3, vocab=50):
    """The same loop with a loss closure (HF-style models)."""
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = []
    for s in range(steps):
        data = [t.to(device) for t in batch(s, vocab=vocab)]
        diff = awp.calc_awp(closure=lambda m: loss_hf(m, data))
        awp.perturb(diff)
        loss = loss_hf(model, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        awp.restore(diff)
        snaps.append([p.detach().clone() for p in model.parameters()])
    return snaps


def assert_same_trajectory(ref, fus, names, rtol=tolerance.FP32_TRAINING_RTOL):
    for step, (r_, f_) in enumerate(zip(ref, fus)):
        for name, r, f in zip(names, r_, f_):
            tol = rtol * max(1.0, r.abs().max().item())
            err = (r.cpu().double() - f.cpu().double()).abs().max().item()
            assert err <= tol, f"step {step} {name}: {err:.3e} > {tol:.3e}"


def test_fp32_logits_training_matches_reference(backend):
    device, be = backend
    torch.manual_seed(0)
    model = Net().to(device)
    fm = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    assert_same_trajectory(run_logits(model, make_awp(model, fused=False)),
                           run_logits(fm, make_awp(fm, fused=True, backend=be)), names)


@pytest.mark.parametrize("kind", ["toy", "bert"])
def test_fp32_closure_training_matches_reference(kind, backend):
    device, be = backend
    torch.manual_seed(0)
    model = (ToyBert() if kind == "toy" else tiny_bert_cls(num_labels=3)).to(device)
    fm = copy.deepcopy(model)
    vocab = 50 if kind == "toy" else 64
    names = [n for n, _ in model.named_parameters()]
    assert_same_trajectory(run_closure(model, make_awp(model, fused=False), vocab=vocab),
                           run_closure(fm, make_awp(fm, fused=True, backend=be), vocab=vocab), names)


@pytest.mark.parametrize("proxy", [True, False], ids=["proxy", "no_proxy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_training_within_tolerance_rule(dtype, proxy, backend):
    device, be = backend
    torch.manual_seed(1)
    base = Net()
    o = copy.deepcopy(base).double().to(device)
    oracle = run_logits(o, make_awp(o, fused=False), dtype=torch.float64)
    r = copy.deepcopy(base).to(device, dtype)
    ref = run_logits(r, make_awp(r, fused=False), dtype=dtype)
    f = copy.deepcopy(base).to(device, dtype)
    fus = run_logits(f, make_awp(f, fused=True, proxy=proxy, backend=be), dtype=dtype)
    names = [n for n, _ in base.named_parameters()]
    for step in range(len(oracle)):
        for name, o_, r_, f_ in zip(names, oracle[step], ref[step], fus[step]):
            tolerance.assert_close_to_oracle(f_, r_, o_, what=f"awp_paper {dtype} step {step} {name}")


# ---------------------------------------------------------------- proxy=None vs the proxy
def cancellation_bound(w: torch.Tensor, exact_delta_norm: float, diff: torch.Tensor) -> torch.Tensor:
    """What the proxy's diff may be off by: each element of its Delta = fl(w + lr*g) - w carries an
    error up to half an ulp of w' (at most eps*max|w|, call it e), so diff = ||w||/||Delta|| * Delta
    is off by ||w||/||Delta|| * e per element plus the relative error of ||Delta|| (at most
    sqrt(numel)*e/||Delta||) times |diff|; doubled, with ||Delta|| the exact lr*||g||.  Where lr*g is
    below e the bound is large: the proxy's answer is then rounding noise (it can even be 0)."""
    e = torch.finfo(w.dtype).eps * w.abs().max().item()
    dn = max(exact_delta_norm, 1e-30)
    return 2 * (w.norm().item() / dn * e + diff.abs() * math.sqrt(w.numel()) * e / dn) + 1e-12


@pytest.mark.parametrize("kind", ["logits", "toy"])
def test_no_proxy_matches_proxy_within_its_cancellation_error(kind, backend):
    device, be = backend
    torch.manual_seed(3)
    model = (Net() if kind == "logits" else ToyBert()).to(device)
    ref = R.AdvWeightPerturb(model, copy.deepcopy(model), None, GAMMA)
    ref.proxy_optim = torch.optim.SGD(ref.proxy.parameters(), lr=0.01)
    fused = fused_adv.AdvWeightPerturb(model, gamma=GAMMA, proxy_lr=0.01, backend=be)
    if kind == "logits":
        x, y = xy(0, device=device)
        d_ref, d_fus = ref.calc_awp(x, y), fused.calc_awp(x, y)
    else:
        data = [t.to(device) for t in batch(0)]
        d_ref = ref.calc_awp(closure=lambda m: loss_hf(m, data))
        d_fus = fused.calc_awp(closure=lambda m: loss_hf(m, data))
    assert set(d_fus) <= set(d_ref) and len(d_fus) > 0
    named = dict(model.named_parameters())
    exact = {n: 0.01 * math.sqrt(d_fus.dir_sumsq[i].item()) for i, n in enumerate(d_fus)}  # lr * ||g||
    for name in d_ref:
        if name not in d_fus:  # the loss does not reach it: Delta = 0, diff 0 in the paper's code too
            assert not d_ref[name].any()
            continue
        w = named[name].detach()
        bound = cancellation_bound(w, exact[name], d_ref[name])
        err = (d_fus[name] - d_ref[name]).abs()
        assert bool((err <= bound).all()), f"{name}: max err {err.max():.3e}, bound {bound.min():.3e}"
    # in float64 the proxy's cancellation error is 2**29 times smaller; the two then agree within it
    # plus the float32 rounding of the factor f (float32 by the op contract, docs/design.md §3)
    m64 = copy.deepcopy(model).double()
    r64 = R.AdvWeightPerturb(m64, copy.deepcopy(m64), None, GAMMA)
    r64.proxy_optim = torch.optim.SGD(r64.proxy.parameters(), lr=0.01)
    f64 = fused_adv.AdvWeightPerturb(m64, gamma=GAMMA, proxy_lr=0.01, backend=be)
    if kind == "logits":
        x, y = xy(0, device=device, dtype=torch.float64)
        a, b = r64.calc_awp(x, y), f64.calc_awp(x, y)
    else:
        a = r64.calc_awp(closure=lambda m: loss_hf(m, data))
        b = f64.calc_awp(closure=lambda m: loss_hf(m, data))
    named64 = dict(m64.named_parameters())
    for i, name in enumerate(b):
        exact = 0.01 * math.sqrt(b.dir_sumsq[i].item())
        bound = (cancellation_bound(named64[name].detach(), exact, a[name])
                 + 4 * torch.finfo(torch.float32).eps * a[name].abs().max().item())
        assert bool(((a[name] - b[name]).abs() <= bound).all()), name


def test_no_proxy_saves_the_proxy():
    """Extra memory while perturbed: the directions only (one copy of the perturbed weights); the
    proxy version holds the proxy's parameters and gradients on top."""
    torch.manual_seed(0)
    model = ToyBert()
    data = batch(0)
    perturbed = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if "weight" in n and p.dim() > 1)
    all_params = sum(p.numel() * p.element_size() for p in model.parameters())
    no_proxy = fused_adv.AdvWeightPerturb(model, gamma=GAMMA)
    with no_proxy.perturbed(no_proxy.calc_awp(closure=lambda m: loss_hf(m, data))):
        assert no_proxy.extra_memory_bytes() == perturbed
    with_proxy = make_awp(model, fused=True)
    with with_proxy.perturbed(with_proxy.calc_awp(closure=lambda m: loss_hf(m, data))):
        assert with_proxy.extra_memory_bytes() == perturbed + 2 * all_params
    assert all(p.grad is None for p in model.parameters())   # proxy=None never touches the model's .grad


# ---------------------------------------------------------------- diff mapping, call forms, misuse
def test_diff_mapping_matches_reference_and_reference_diff_is_accepted():
    torch.manual_seed(0)
    model = Net()
    x, y = xy(0)
    fused = make_awp(model, fused=True)
    d = fused.calc_awp(x, y)
    ref_d = make_awp(model, fused=False).calc_awp(x, y)
    assert list(d) == list(ref_d) == ["fc1.weight", "fc2.weight"]      # no biases, no LayerNorm weight
    for k in d:
        assert torch.allclose(d[k], ref_d[k], rtol=1e-5, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    fused.perturb(ref_d)                                                 # a plain mapping works too
    assert not torch.equal(model.fc1.weight, before[0])
    fused.restore(ref_d)
    for p, b in zip(model.parameters(), before):
        assert torch.allclose(p, b, atol=1e-7)


def test_misuse_raises_clear_errors():
    model = Net()
    x, y = xy(0)
    proxy = copy.deepcopy(model)
    with pytest.raises(ValueError, match="proxy_optim"):
        fused_adv.AdvWeightPerturb(model, proxy, None, GAMMA)
    with pytest.raises(ValueError, match="separate copy"):
        fused_adv.AdvWeightPerturb(model, model, torch.optim.SGD(model.parameters(), lr=0.01), GAMMA)
    with pytest.raises(ValueError, match="weight"):
        fused_adv.AdvWeightPerturb(nn.Sequential(nn.LayerNorm(4)))
    awp = fused_adv.AdvWeightPerturb(model, gamma=GAMMA)
    with pytest.raises(ValueError, match="closure"):
        awp.calc_awp(x, y, closure=lambda m: m(x).sum())
    with pytest.raises(ValueError, match="closure"):
        awp.calc_awp(x)
    with pytest.raises(AttackStateError):
        awp.restore()
    diff = awp.calc_awp(x, y)
    other = fused_adv.AdvWeightPerturb(model, gamma=GAMMA)
    with pytest.raises(ValueError, match="another"):
        other.perturb(diff)
    with pytest.raises(ValueError, match="not parameters"):
        awp.perturb({"nope.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError):
        awp.perturb([1, 2])
    awp.perturb(diff)
    with pytest.raises(AttackStateError):
        awp.perturb(diff)
    with pytest.raises(AttackStateError):
        awp.calc_awp(x, y)
    with pytest.raises(ValueError, match="not the diff"):
        awp.restore(awp.__class__.__new__(awp.__class__))
    awp.restore(diff)


def test_forward_that_raises_leaves_nothing_perturbed():
    model = Net()
    x, y = xy(0)
    before = [p.detach().clone() for p in model.parameters()]
    awp = fused_adv.AdvWeightPerturb(model, gamma=0.5)

    def boom(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        awp.calc_awp(closure=boom)                  # calc_awp changes no weight
    assert model.training and not awp.is_attacked
    diff = awp.calc_awp(x, y)
    with pytest.raises(RuntimeError, match="boom"):
        with awp.perturbed(diff):
            boom(model)
    assert not awp.is_attacked
    for p, b in zip(model.parameters(), before):
        assert torch.allclose(p, b, atol=1e-6)      # w + g*d - g*d: restored up to rounding (by design)
