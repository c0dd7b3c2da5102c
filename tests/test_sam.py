"""SAM / ASAM (docs/methods.md §11 (SAM)): the reference (davda54/sam) pinned on hand-computed
float64 cases; the sam ops (sam_sumsq, sam_perturb_) on every backend this machine can run against
float64 oracles (tests/tolerance.py); the fused drop-in against the reference class (fp32
trajectories within 2e-5, fp16/bf16 by the tolerance rule, per-group rho / adaptive, step(closure),
bit-exact restore); the GradScaler story (scale invariance of the climb, the non-finite skip on the
device, the second gradient through unscale / clip / step); clear errors for misuse."""
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
from models import ToyBert, batch

pytestmark = pytest.mark.usefixtures("one_thread")

backend = backend_fixture("sam_perturb_")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


# ---------------------------------------------------------------- reference, by hand (float64)
def _two_params(values, grads):
    ps = [nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values]
    for p, g in zip(ps, grads):
        p.grad = torch.tensor(g, dtype=torch.float64)
    return ps


def test_reference_hand_case_sam():
    ps = _two_params([[1.0, 2.0], [3.0]], [[3.0, 0.0], [4.0]])      # ||G|| = 5 over both tensors
    opt = R.SAM(ps, torch.optim.SGD, rho=0.5, lr=0.1)
    opt.first_step()
    # e = G * 0.5/5 = 0.1 * G
    assert torch.allclose(ps[0].data, torch.tensor([1.3, 2.0], dtype=torch.float64))
    assert torch.allclose(ps[1].data, torch.tensor([3.4], dtype=torch.float64))
    assert torch.equal(opt.state[ps[0]]["old_p"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    ps[0].grad = torch.tensor([1.0, 1.0], dtype=torch.float64)  # the gradient at w + e(w)
    ps[1].grad = torch.tensor([-1.0], dtype=torch.float64)
    opt.second_step()
    # restore, then SGD with the second gradient
    assert torch.allclose(ps[0].data, torch.tensor([0.9, 1.9], dtype=torch.float64))
    assert torch.allclose(ps[1].data, torch.tensor([3.1], dtype=torch.float64))


def test_reference_hand_case_asam_and_per_group_rho():
    ps = _two_params([[2.0, -1.0], [1.0]], [[1.0, 2.0], [1.0]])
    # group 0 adaptive: |P|*G = [2, -2]... = [2, 2]; group 1 plain: G = [1]; n = sqrt(4 + 4 + 1) = 3
    opt = R.SAM([{"params": [ps[0]], "adaptive": True, "rho": 0.3}, {"params": [ps[1]], "rho": 0.6}],
                torch.optim.SGD, lr=0.1)
    opt.first_step()
    # group 0: e = P^2 * G * 0.3/3 = [4, 2] * 0.1 = [0.4, 0.2]; group 1: e = 1 * 0.6/3 = 0.2
    assert torch.allclose(ps[0].data, torch.tensor([2.4, -0.8], dtype=torch.float64))
    assert torch.allclose(ps[1].data, torch.tensor([1.2], dtype=torch.float64))


# ---------------------------------------------------------------- ops vs float64 oracles
def _oracle(P, G, rho, adaptive):
    """float64: the per-tensor sums and the perturbed weights (rho, adaptive per tensor lists)."""
    P64, G64 = [p.double() for p in P], [g.double() for g in G]
    sums = [(((p.abs() if a else 1.0) * g) ** 2).sum() for p, g, a in zip(P64, G64, adaptive)]
    n = torch.stack(sums).sum().sqrt() if sums else torch.zeros((), dtype=torch.float64)
    new = [p + (p * p if a else 1.0) * g * (r / (n + 1e-12)) for p, g, r, a in zip(P64, G64, rho, adaptive)]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64), new


def _reference_climb(P, G, rho, adaptive):
    """The reference class's first_step at the tensors' dtype (one param group per tensor)."""
    ps = [nn.Parameter(p.clone()) for p in P]
    for p, g in zip(ps, G):
        p.grad = g.clone()
    opt = R.SAM([{"params": [p], "rho": r, "adaptive": a} for p, r, a in zip(ps, rho, adaptive)],
                torch.optim.SGD, lr=0.1)
    opt.first_step()
    return [p.data for p in ps]


def _tensors(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]
    G = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]
    return P, G


SHAPE_SETS = {"one": [(33, 17)], "mixed": [(1,), (7,), (3, 5, 2), (0,), (70001,)], "many": [(5,)] * 120}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
def test_ops_match_oracle(backend, dtype, adaptive, shapes):
    device, be = backend
    shapes = SHAPE_SETS[shapes]
    if be == "triton" and shapes[-1] == (70001,):
        shapes = shapes[:-1] + [(4099,)]  # the interpreter costs ~1 ms per program
    P, G = _tensors(shapes, dtype, device)
    rho = 0.5 if adaptive else 0.05
    sums_o, new_o = _oracle(P, G, [rho] * len(P), [adaptive] * len(P))
    sums = ops.sam_sumsq(P, G, adaptive, backend=be)
    assert sums.dtype == torch.float32 and sums.device.type == device
    floor = torch.float32 if dtype == torch.float64 else None
    torch.testing.assert_close(sums.double().cpu(), sums_o, rtol=1e-5, atol=1e-30)
    ref = _reference_climb([p.cpu() for p in P], [g.cpu() for g in G], [rho] * len(P), [adaptive] * len(P))
    Pf = [p.clone() for p in P]
    B = [torch.full_like(p, 7.0) for p in P]
    for cycle in range(2):  # backups reused across cycles; restore bit-exact each time
        ops.sam_perturb_(Pf, G, B, sums, rho, adaptive, backend=be)
        assert all(torch.equal(b, p) for b, p in zip(B, P)), "backup is not P bit for bit"
        tolerance.assert_all_close_to_oracle([p.cpu() for p in Pf], ref, new_o, f"sam_perturb_ cycle {cycle}",
                                             floor_dtype=floor)
        ops.restore_(Pf, B, backend=be)
        assert all(torch.equal(a, b) for a, b in zip(Pf, P)), "restore is not bit-exact"


def test_backends_agree_bit_for_bit_on_the_climb(backend):
    """Every backend gives the torch backend's bits (explicit rounding, no FMA contraction, the
    global sum in float64)."""
    device, be = backend
    for dtype in (torch.float32, torch.bfloat16):
        for adaptive in (False, True):
            P, G = _tensors([(5, 3), (300,), (1,)], dtype, device, seed=3)
            sums = ops.sam_sumsq(P, G, adaptive, backend="torch")
            P1, P2 = [p.clone() for p in P], [p.clone() for p in P]
            ops.sam_perturb_(P1, G, [torch.empty_like(p) for p in P], sums, 0.3, adaptive, backend=be)
            ops.sam_perturb_(P2, G, [torch.empty_like(p) for p in P], sums, 0.3, adaptive, backend="torch")
            assert all(torch.equal(a, b) for a, b in zip(P1, P2)), (dtype, adaptive)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_global_norm_skips_on_device(backend, bad):
    device, be = backend
    P, G = _tensors([(4, 3), (9,)], torch.float32, device)
    G[1][2] = bad
    sums = ops.sam_sumsq(P, G, False, backend=be)
    Pf, B = [p.clone() for p in P], [torch.empty_like(p) for p in P]
    ops.sam_perturb_(Pf, G, B, sums, 0.05, False, backend=be)
    assert all(torch.equal(a, b) for a, b in zip(Pf, P)), "P written despite a non-finite norm"
    assert all(torch.equal(a, b) for a, b in zip(B, P)), "backup must be written either way"


def test_global_norm_spans_calls(backend):
    """Two sam_perturb_ calls (two settings) that read the concatenated sums climb exactly as
    one call over all tensors would with the global norm."""
    device, be = backend
    P, G = _tensors([(6,), (4, 2), (3,)], torch.float64, device, seed=5)
    rho, adaptive = [0.1, 0.1, 0.7], [False, False, True]
    sums = torch.cat([ops.sam_sumsq(P[:2], G[:2], False, backend=be), ops.sam_sumsq(P[2:], G[2:], True, backend=be)])
    Pf, B = [p.clone() for p in P], [torch.empty_like(p) for p in P]
    ops.sam_perturb_(Pf[:2], G[:2], B[:2], sums, 0.1, False, backend=be)
    ops.sam_perturb_(Pf[2:], G[2:], B[2:], sums, 0.7, True, backend=be)
    _, new_o = _oracle(P, G, rho, adaptive)
    for f, o in zip(Pf, new_o):
        torch.testing.assert_close(f.cpu(), o, rtol=1e-6, atol=1e-7)


def test_climb_is_scale_invariant_for_power_of_two_scales(backend):
    """GradScaler (docs/methods.md §11 (SAM), AMP): with G_s = s*G, n_s = s*n exactly (a power of
    two), so e_s = rho*s*G/(s*n + 1e-12) = rho*G/(n + 1e-12/s): the climb from SCALED gradients
    equals the unscaled one up to the 1e-12 term -- no unscale_ is needed before first_step."""
    device, be = backend
    for adaptive in (False, True):
        P, G = _tensors([(40,), (7, 3)], torch.float32, device, seed=7)
        G = [g * 1e-3 for g in G]
        outs = []
        for s in (1.0, 2.0 ** 16, 2.0 ** -8):
            Gs = [g * s for g in G]
            sums = ops.sam_sumsq(P, Gs, adaptive, backend=be)
            torch.testing.assert_close(sums, ops.sam_sumsq(P, G, adaptive, backend=be) * (s * s), rtol=0, atol=0)
            Pf = [p.clone() for p in P]
            ops.sam_perturb_(Pf, Gs, [torch.empty_like(p) for p in P], sums, 0.05, adaptive, backend=be)
            outs.append([(f - p).double() for f, p in zip(Pf, P)])
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                # the perturbation itself (not P + e, whose rounding hides it) within fp32 rounding
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_opcheck_and_compile_trace():
    P, G = _tensors([(3, 5), (7,), (1,)], torch.float32, "cpu")
    B = [torch.empty_like(p) for p in P]
    torch.library.opcheck(torch.ops.fused_adv.sam_sumsq.default, (P, G, True))
    s = ops.sam_sumsq(P, G, True)
    torch.library.opcheck(torch.ops.fused_adv.sam_perturb_.default, (P, G, B, s, 0.05, True))

    def climb(P, G, B):
        s = torch.ops.fused_adv.sam_sumsq(P, G, False)
        torch.ops.fused_adv.sam_perturb_(P, G, B, s, 0.05, False)
        return s

    P2 = [p.clone() for p in P]
    s1 = torch.compile(climb, backend="aot_eager", fullgraph=True)(P, G, B)
    s2 = climb(P2, G, [torch.empty_like(p) for p in P])
    torch.testing.assert_close(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(P, P2))


def test_op_argument_errors():
    P, G = _tensors([(3,), (2,)], torch.float32, "cpu")
    B = [torch.empty_like(p) for p in P]
    s = ops.sam_sumsq(P, G, False)
    with pytest.raises(ValueError, match="grad_sumsq"):
        ops.sam_perturb_(P, G, B, s.double(), 0.05, False)
    with pytest.raises(ValueError, match="rho"):
        ops.sam_perturb_(P, G, B, s, -1.0, False)
    with pytest.raises(ValueError, match="grads"):
        ops.sam_sumsq(P, G[:1], False)
    with pytest.raises(ValueError, match="contiguous"):
        ops.sam_perturb_([torch.randn(4, 3).t()], [torch.randn(3, 4)], [torch.empty(3, 4)], s[:1], 0.05, False)
    assert ops.sam_sumsq([], [], True).shape == (0,)
    ops.sam_perturb_([], [], [], s, 0.05, False)  # nothing to do


# ---------------------------------------------------------------- drop-in vs reference
def _loss(model, data):
    ids, mask, labels = data
    return model(input_ids=ids, attention_mask=mask, labels=labels)[0]


def _train(model, opt, steps, use_closure=False, seed0=0):
    traj = []
    for step in range(steps):
        data = batch(seed0 + step)
        if use_closure:
            _loss(model, data).backward()

            def closure():
                loss = _loss(model, data)
                loss.backward()
                return loss
            opt.step(closure)
            opt.zero_grad()
        else:
            _loss(model, data).backward()
            opt.first_step(zero_grad=True)
            _loss(model, data).backward()
            opt.second_step(zero_grad=True)
        traj.append([p.detach().clone() for p in model.parameters()])
    return traj


def _groups(model, rho, adaptive, split):
    if not split:
        return model.parameters()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    # two groups with their own rho / adaptive and weight decay: a run change along the groups
    return [{"params": decay, "weight_decay": 0.01},
            {"params": rest, "rho": rho * 2, "adaptive": not adaptive, "weight_decay": 0.0}]


def _assert_trajectories(ta, tb):
    for step, (a, b) in enumerate(zip(ta, tb)):
        for x, y in zip(a, b):
            bound = tolerance.FP32_TRAINING_RTOL * max(1.0, y.abs().max().item())
            assert (x - y).abs().max().item() <= bound, f"step {step}: {(x - y).abs().max().item():.3e}"


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("split", [False, True], ids=["one_group", "two_groups"])
def test_dropin_trajectory_matches_reference_fp32(device_backend, adaptive, base, split):
    device, be = device_backend
    torch.manual_seed(0)
    m_ref = ToyBert(tie=True)
    m_fused = copy.deepcopy(m_ref)
    rho = 2.0 if adaptive else 0.05
    cls, kw = (torch.optim.SGD, dict(lr=0.1, momentum=0.9)) if base == "sgd" else (torch.optim.AdamW, dict(lr=1e-2))
    ref = R.SAM(_groups(m_ref, rho, adaptive, split), cls, rho=rho, adaptive=adaptive, **kw)
    fused = fused_adv.SAM(_groups(m_fused, rho, adaptive, split), cls, rho=rho, adaptive=adaptive, backend=be, **kw)
    _assert_trajectories(_train(m_fused.to(device), fused, 4), _train(m_ref, ref, 4))
    assert all(st["old_p"].is_contiguous() for st in fused.state.values())


def test_dropin_step_closure_matches_reference(device_backend):
    device, be = device_backend
    torch.manual_seed(1)
    m_ref = ToyBert()
    m_fused = copy.deepcopy(m_ref)
    ref = R.SAM(m_ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    fused = fused_adv.SAM(m_fused.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, backend=be)
    _assert_trajectories(_train(m_fused, fused, 3, use_closure=True), _train(m_ref, ref, 3, use_closure=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_dropin_half_precision_by_tolerance_rule(device_backend, dtype, adaptive):
    """One SAM step of a low-precision model: the climb and the stepped weights of the fused class
    against the reference at the same dtype, both against a float64 run (tests/tolerance.py)."""
    device, be = device_backend
    torch.manual_seed(2)
    base = ToyBert()
    runs = {}
    for name, dt in (("ref", dtype), ("fused", dtype), ("oracle", torch.float64)):
        m = copy.deepcopy(base).to(dt)
        cls = fused_adv.SAM if name == "fused" else R.SAM
        kw = dict(backend=be) if name == "fused" else {}
        opt = cls(m.parameters(), torch.optim.SGD, rho=0.5 if adaptive else 0.05, adaptive=adaptive, lr=0.1, **kw)
        torch.manual_seed(3)
        grads = [torch.randn(p.shape, dtype=torch.float64) * 0.1 for p in m.parameters()]  # same G for all
        for p, g in zip(m.parameters(), grads):
            p.grad = g.to(dt)
        opt.first_step(zero_grad=False)
        climbed = [p.detach().clone() for p in m.parameters()]
        opt.second_step(zero_grad=True)
        runs[name] = (climbed, [p.detach().clone() for p in m.parameters()])
    for k in (0, 1):
        tolerance.assert_all_close_to_oracle(runs["fused"][k], runs["ref"][k], runs["oracle"][k],
                                             f"{'climb' if k == 0 else 'step'} {dtype}")


def test_params_without_grad_are_left_alone_and_restored(device_backend):
    device, be = device_backend
    torch.manual_seed(0)
    m = ToyBert()
    m.lm_head.weight.requires_grad_(False)
    opt = fused_adv.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend=be)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _loss(m, batch(0)).backward()
    m.classifier.bias.grad = None  # one trainable param without a gradient this step
    opt.first_step(zero_grad=True)
    assert torch.equal(m.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(m.classifier.bias, before["classifier.bias"])
    assert not torch.equal(m.classifier.weight, before["classifier.weight"])
    opt.restore()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n


def test_exception_in_closure_restores_and_does_not_step(device_backend):
    device, be = device_backend
    torch.manual_seed(0)
    m = ToyBert()
    opt = fused_adv.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=be)
    before = [p.detach().clone() for p in m.parameters()]
    _loss(m, batch(0)).backward()

    def closure():
        _loss(m, batch(0)).backward()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert not opt.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    assert not opt.base_optimizer.state  # no step taken (momentum buffers never created)


def test_misuse_errors():
    torch.manual_seed(0)
    m = ToyBert()
    opt = fused_adv.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(AttackStateError, match="without first_step"):
        opt.second_step()
    with pytest.raises(AttackStateError, match="without first_step"):
        opt.restore()
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.first_step()
    _loss(m, batch(0)).backward()
    opt.first_step()
    with pytest.raises(AttackStateError, match="twice"):
        opt.first_step()
    with pytest.raises(AttackStateError, match="perturbed"):
        opt.load_state_dict(opt.state_dict())
    opt.second_step()
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="rho"):
        fused_adv.SAM(m.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(TypeError, match="CLASS"):
        fused_adv.SAM(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1))
    emb = nn.Embedding(10, 4, sparse=True)
    opt2 = fused_adv.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt2.first_step()


def test_state_dict_round_trip_shares_groups():
    torch.manual_seed(0)
    m = ToyBert()
    opt = fused_adv.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    _train(m, opt, 1)
    opt2 = fused_adv.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert opt2.defaults["momentum"] == 0.9 and opt2.param_groups[0]["rho"] == 0.05


def test_no_host_reads_in_the_steps(monkeypatch):
    """CPU stand-in for the GPU sync check: first_step / second_step never turn a tensor into a
    Python value (bool, float, int, item, tolist)."""
    torch.manual_seed(0)
    m = ToyBert()
    opt = fused_adv.SAM(m.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1)
    _loss(m, batch(0)).backward()

    def boom(*a, **k):
        raise AssertionError("host read of a tensor value")

    with monkeypatch.context() as mp:
        for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
            mp.setattr(torch.Tensor, name, boom)
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)


# ---------------------------------------------------------------- GradScaler (CPU, power-of-two scale)
def _scaler(scale):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)


def _amp_loop(model, opt, steps, scaler, clip=None, fused=True):
    """The README loop: scaled clean grads straight into first_step (no unscale_), the second
    gradient through unscale_ / clip / scaler.step / update."""
    for step in range(steps):
        data = batch(step)
        scaler.scale(_loss(model, data)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(_loss(model, data)).backward()
        if clip is not None:
            scaler.unscale_(opt.base_optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()


def _plain_loop(model, opt, steps, clip=None):
    for step in range(steps):
        data = batch(step)
        _loss(model, data).backward()
        opt.first_step(zero_grad=True)
        _loss(model, data).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
@pytest.mark.parametrize("cls", ["fused", "reference"])
def test_grad_scaler_loop_equals_unscaled_run(adaptive, clip, cls):
    """With a power-of-two scale the AMP loop (no unscale_ before first_step) follows the fp32
    loop without a scaler, for the fused class and for the reference with the same loop."""
    torch.manual_seed(0)
    m_plain = ToyBert()
    m_amp = copy.deepcopy(m_plain)
    rho = 1.0 if adaptive else 0.05
    Cls = fused_adv.SAM if cls == "fused" else R.SAM
    plain = R.SAM(m_plain.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9)
    amp = Cls(m_amp.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9)
    scaler = _scaler(2.0 ** 14)
    _amp_loop(m_amp, amp, 3, scaler, clip)
    _plain_loop(m_plain, plain, 3, clip)
    assert scaler.get_scale() == 2.0 ** 14  # no step skipped
    _assert_trajectories([list(m_amp.parameters())], [list(m_plain.parameters())])


def test_grad_scaler_overflow_skips_climb_and_step():
    """An overflowing scale: the clean gradient has inf/NaN, the fused first_step leaves w as it
    is (decided on the device, no NaN weights), the second pass at w overflows the same way, and
    the scaler skips the step and backs off -- the reference ends at the same weights (through
    NaN weights that its restore discards)."""
    torch.manual_seed(0)
    m_f = ToyBert()
    m_r = copy.deepcopy(m_f)
    before = [p.detach().clone() for p in m_f.parameters()]
    f = fused_adv.SAM(m_f.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    r = R.SAM(m_r.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for model, opt in ((m_f, f), (m_r, r)):
        scaler = _scaler(2.0 ** 127)
        data = batch(0)
        scaler.scale(_loss(model, data) * 1e6).backward()
        assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.first_step(zero_grad=True)
        if opt is f:
            assert all(torch.equal(p, b) for p, b in zip(m_f.parameters(), before)), "climbed on an inf grad"
        scaler.scale(_loss(model, data) * 1e6).backward()
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        assert scaler.get_scale() == 2.0 ** 126  # found inf: backed off, step skipped
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_bench_foreach_sam_is_the_reference(adaptive):
    """The benchmark's foreach rewrite (fused_adv._bench.foreach.SAM) computes the reference's
    numbers (bit for bit here: the same per-element ops in the same order)."""
    from fused_adv._bench import foreach
    torch.manual_seed(0)
    m_ref = ToyBert()
    m_fe = copy.deepcopy(m_ref)
    ref = R.SAM(m_ref.parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, lr=0.1)
    fe = foreach.SAM(m_fe.parameters(), rho=0.5, adaptive=adaptive)
    for m in (m_ref, m_fe):
        _loss(m, batch(0)).backward()
    before = [p.detach().clone() for p in m_fe.parameters()]
    ref.first_step()
    fe.first_step()
    for a, b in zip(m_ref.parameters(), m_fe.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    fe.second_step()  # restore only (no base step given)
    for (n, p), b in zip(m_fe.named_parameters(), before):
        assert torch.equal(p, b), n


_SM90_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_adv._triton import multi_tensor as mt
from fused_adv._triton import sam as s
target = GPUTarget("cuda", 90, 32)
for kname, kind in (("f32", mt.F32), ("bf16", mt.BF16), ("f16", mt.F16), ("f64", mt.F64)):
    cfg = mt.launch_config(kind, 1 << 20)
    for adaptive in (False, True):
        common = dict(ADAPTIVE=adaptive, KIND=kind, ALIGNED=True, CHUNK_SIZE=cfg.chunk, BLOCK=cfg.block)
        for name, fn, sig, const in (
                ("sumsq", s._sumsq_kernel, {"chunks": "*i64", "tens": "*i64", "part": "*fp64", "chunk_base": "i64"},
                 common),
                ("perturb", s._perturb_kernel, {"chunks": "*i64", "tens": "*i64", "gsq": "*fp32", "M": "i64",
                                                "RHO": "fp32"}, dict(TOTAL_BLOCK=1024, **common))):
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
            ptx = triton.compile(src, target=target, options={"num_warps": cfg.num_warps}).asm["ptx"]
            vld = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))
            assert vld > 0, (name, kname, adaptive)
            print("ok", name, kname, adaptive, vld)
print("SAM KERNELS COMPILED")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    """The sam Triton kernels compile to PTX for sm_90 without a GPU (the interpreter never runs the
    compiler) and their aligned variants use 16-byte vector loads."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    probe = subprocess.run([sys.executable, "-c",
                            "import triton.backends; print('nvidia' in triton.backends.backends)"],
                           env=env, capture_output=True, text=True, timeout=300)
    if "True" not in probe.stdout:
        pytest.skip(f"triton has no NVIDIA backend here: {probe.stdout} {probe.stderr[-500:]}")
    res = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0 and "SAM KERNELS COMPILED" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_steps_do_not_sync_on_cuda(device, adaptive):
    """first_step / second_step under torch.cuda.set_sync_debug_mode("error") (any host sync
    raises), with a finite and with an inf gradient; on CPU the same steps run unchecked."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device=device)) for s in [(64, 32), (32,), (300,)]]
    before = [p.detach().clone() for p in params]
    opt = fused_adv.SAM(params, torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1, foreach=True)
    for bad in (False, True):
        for p in params:
            p.grad = torch.randn_like(p)
        if bad:
            params[1].grad[3] = math.inf
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.first_step(zero_grad=False)
            climbed = [p.detach().clone() for p in params]
            opt.restore()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert all(torch.equal(c, b) for c, b in zip(climbed, before)) == bad
