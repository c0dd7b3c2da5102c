"""fused_adv.gan (docs/methods.md §9 (GAN with probability-ratio clipping)): the losses on
hand-computed float64 cases (clip edges, A = 0, saturated D, NaN), gradcheck, torch.compile
(fullgraph), the training helper against a hand-written loop in the official code's order, and
the demo's --tiny setting end to end."""
import json
import math

import pytest
import torch
from torch import nn

from fused_adv import gan
from fused_adv.gan import (PPOGAN, PPOGANConfig, consistency_term, frozen_p_old, gradient_penalty,
                           importance_weights, make_optimizers, ppo_generator_loss, probability_ratio,
                           ratio_classifier_loss, reweighted_fake_term)

pytestmark = pytest.mark.usefixtures("one_thread")
f64 = torch.float64


def t(*v, grad=False):
    return torch.tensor(v, dtype=f64).reshape(-1, 1).requires_grad_(grad)


# --------------------------------------------------------------------------------------------
# generator loss
# --------------------------------------------------------------------------------------------
def test_ratio_and_p_old_hand_values():
    # P0 = (1 - D0)/max(D0, 1e-7): D0 = 0 -> 1e7, D0 = 1 -> 0, D0 = 0.25 -> 3
    assert frozen_p_old(t(0.0, 1.0, 0.25)).flatten().tolist() == [1e7, 0.0, 3.0]
    assert not frozen_p_old(t(0.5, grad=True)).requires_grad
    # r = (1 - D1)/max(D1 P0, 1e-7): 0.75/(0.25*2) = 1.5; D1 = 1 -> 0; D1 = 0 -> 1e7; P0 = 0 -> (1-D1)*1e7
    r = probability_ratio(t(0.25, 1.0, 0.0, 0.5), t(2.0, 3.0, 3.0, 0.0))
    assert r.flatten().tolist() == [1.5, 0.0, 1e7, 0.5e7]


@pytest.mark.parametrize("a", [2.0, -2.0])
@pytest.mark.parametrize("p,r", [(2.0, 1.5), (6.0, 0.5), (3.0, 1.0), (1.5, 2.0), (12.0, 0.25)])
def test_generator_loss_hand_cases(a, p, r):
    # d = 0.25 so r = 0.75/(0.25 p) = 3/p exactly; clip 0.5 -> edges 0.5 and 1.5 (exact in binary)
    d, adv = t(0.25, grad=True), t(a, grad=True)
    loss = ppo_generator_loss(d, t(p), adv, clip=0.5)
    rc = min(max(r, 0.5), 1.5)
    target = min(r * a, rc * a) if a > 0 else max(r * a, rc * a)  # the max branch for A <= 0
    assert loss.item() == -target
    loss.backward()
    # d target / d r: A where the unclipped term is chosen strictly inside or outside the range;
    # 0 where the clipped constant wins; at an edge (tie, clamp passes) A/2 + A/2 = A
    unclipped = (r * a < rc * a) if a > 0 else (r * a > rc * a)
    dt_dr = a if (unclipped or r == rc) else 0.0
    dr_dd = -1.0 / (0.25 ** 2 * p)  # d/dd (1-d)/(d p) = -1/(d^2 p)
    assert d.grad.item() == pytest.approx(-dt_dr * dr_dd, rel=1e-12)
    dt_da = r if (unclipped and r != rc) else rc
    assert adv.grad.item() == pytest.approx(-dt_da, rel=1e-12)


def test_generator_loss_official_clip_edges():
    # c = 0.4: r just inside/outside 1.4 and 0.6, mean over the batch
    d = t(0.5, 0.5, 0.5, 0.5)
    r = torch.tensor([1.39, 1.41, 0.59, 0.61], dtype=f64).reshape(-1, 1)
    p = (1 - d) / (d * r)
    adv = t(1.0, 1.0, -1.0, -1.0)
    loss = ppo_generator_loss(d, p, adv)
    # A>0: min(r, clip r) -> 1.39, 1.4; A<0: max(-r, -clip r) -> -0.59, -0.61
    assert loss.item() == pytest.approx(-(1.39 + 1.4 - 0.59 - 0.61) / 4, rel=1e-12)


def test_generator_loss_zero_advantage():
    # A = 0 takes the max branch (strict A > 0): target 0; d target/dA = (r + clip(r))/2 (tie split)
    d, adv = t(0.25, 0.25, grad=True), t(0.0, 0.0, grad=True)
    loss = ppo_generator_loss(d, t(1.5, 2.0), adv, clip=0.5)  # r = 2 (clipped to 1.5) and 1.5
    assert loss.item() == 0.0
    loss.backward()
    assert adv.grad.flatten().tolist() == [-(2.0 + 1.5) / 2 / 2, -(1.5 + 1.5) / 2 / 2]
    assert d.grad.flatten().tolist() == [0.0, 0.0]


def test_generator_loss_saturated_d():
    # D1 = 1: r = 0 -> A>0 min(0, 0.6A) = 0, A<0 max(0, 0.6A) = 0
    loss = ppo_generator_loss(t(1.0, 1.0), t(2.0, 2.0), t(3.0, -3.0))
    assert loss.item() == 0.0
    # D1 = 0: r = 1e7 -> clipped to 1.4 either way (A>0 min, A<0 max), finite, no grad to D1
    d, adv = t(0.0, 0.0, grad=True), t(3.0, -3.0, grad=True)
    loss = ppo_generator_loss(d, t(2.0, 2.0), adv)
    assert loss.item() == pytest.approx(-(1.4 * 3 - 1.4 * 3) / 2)
    loss.backward()
    assert d.grad.flatten().tolist() == [0.0, 0.0]
    assert adv.grad.flatten().tolist() == pytest.approx([-0.7, -0.7])
    # D0 saturated at 0 -> P0 = 1e7 -> r = 0.5/(0.5e7) = 1e-7 < 1 - c, never clipped: min picks rA for
    # A > 0 and max picks rA for A < 0
    p0 = frozen_p_old(t(0.0, 0.0))
    loss = ppo_generator_loss(t(0.5, 0.5), p0, t(1.0, -3.0))
    assert loss.item() == pytest.approx(-(1e-7 - 3e-7) / 2, rel=1e-9)
    # D0 saturated at 1 -> P0 = 0 -> r = (1 - D1)*1e7, clipped to 1 + c for either sign of A
    loss = ppo_generator_loss(t(0.5, 0.5), frozen_p_old(t(1.0, 1.0)), t(1.0, -3.0))
    assert loss.item() == pytest.approx(-(1.4 - 3 * 1.4) / 2, rel=1e-12)


def test_clip_binds_exactly_above_one_plus_c():
    # with the max branch for A <= 0, the clipped constant wins (no gradient through r) iff r > 1 + c,
    # whatever the sign of A != 0; r < 1 - c is never clipped (what PPOGAN's clipped_frac counts)
    from fused_adv.gan import clipped_surrogate

    g = torch.Generator().manual_seed(3)
    r = (torch.rand(400, 1, generator=g, dtype=f64) * 3).requires_grad_()
    a = torch.randn(400, 1, generator=g, dtype=f64)
    keep = ((r - 0.6).abs() > 1e-9) & ((r - 1.4).abs() > 1e-9)
    clipped_surrogate(r, a, 0.4).sum().backward()
    assert torch.equal((r.grad == 0)[keep], (r > 1.4).detach()[keep])


@pytest.mark.parametrize("which", ["d_new", "p_old", "advantage"])
def test_generator_loss_nan_propagates(which):
    args = {"d_new": t(0.5, 0.5), "p_old": t(1.0, 1.0), "advantage": t(1.0, -1.0)}
    args[which][0, 0] = float("nan")
    assert math.isnan(ppo_generator_loss(**args).item())


def test_generator_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        ppo_generator_loss(t(0.5, 0.5), t(1.0, 1.0).flatten(), t(1.0, 1.0))
    with pytest.raises(ValueError, match="clip"):
        ppo_generator_loss(t(0.5), t(1.0), t(1.0), clip=1.0)


# --------------------------------------------------------------------------------------------
# critic terms
# --------------------------------------------------------------------------------------------
def test_reweighted_fake_term_hand_values():
    f = t(0.0, math.log(3.0), grad=True)  # softmax [1/4, 3/4] -> W = 2*[1/4, 3/4] = [0.5, 1.5]
    assert importance_weights(f).flatten().tolist() == pytest.approx([0.5, 1.5], rel=1e-15)
    term = reweighted_fake_term(f)
    assert term.item() == pytest.approx(0.75 * math.log(3.0), rel=1e-15)
    term.backward()  # W detached: d/df_i = W_i / B
    assert f.grad.flatten().tolist() == pytest.approx([0.25, 0.75], rel=1e-15)
    # large scores do not overflow (softmax subtracts the max); W has mean 1
    w = importance_weights(t(1000.0, 1000.0, 999.0))
    assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0)
    assert math.isnan(reweighted_fake_term(t(float("nan"), 1.0)).item())
    with pytest.raises(ValueError, match="batch"):
        reweighted_fake_term(torch.tensor(1.0))


def test_ratio_classifier_loss_hand_values():
    assert ratio_classifier_loss(t(0.5), t(0.5)).item() == pytest.approx(2 * math.log(2.0))
    # saturated the wrong way: BCE clamps log at -100 -> 100 per term, finite
    assert ratio_classifier_loss(t(0.0), t(1.0)).item() == pytest.approx(200.0)
    assert ratio_classifier_loss(t(1.0), t(0.0)).item() == 0.0


def test_gradient_penalty_linear_critic():
    w = torch.tensor([[3.0], [4.0]], dtype=f64, requires_grad=True)  # ||grad_x f|| = ||w|| = 5
    real, fake = torch.randn(4, 2, dtype=f64), torch.randn(4, 2, dtype=f64)
    gp = gradient_penalty(lambda x: x @ w, real, fake, weight=5.0)
    assert gp.item() == pytest.approx(5 * 16.0)
    gp.backward()  # d/dw 5(||w|| - 1)^2 = 10(||w|| - 1) w/||w||
    assert w.grad.flatten().tolist() == pytest.approx([24.0, 32.0])


def test_gradient_penalty_interpolates_per_sample():
    # f = ||x||^2/2 -> grad = x_hat = alpha real + (1 - alpha) fake
    real, fake = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=f64), torch.zeros(2, 2, dtype=f64)
    alpha = torch.tensor([0.5, 0.5], dtype=f64)
    gp = gradient_penalty(lambda x: (x ** 2).sum(1, keepdim=True) / 2, real, fake, weight=1.0, alpha=alpha)
    assert gp.item() == pytest.approx(((0.5 - 1) ** 2 + (2.0 - 1) ** 2) / 2)
    with pytest.raises(ValueError):
        gradient_penalty(lambda x: x, real, fake[:1])


def test_consistency_term_hand_values():
    s1, s2 = t(1.0, 2.0), t(1.0, 0.0)
    h1 = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=f64)
    h2 = torch.zeros(2, 2, dtype=f64)
    # score term 2*(s1-s2)^2 = [0, 8]; feature term 0.2*mean_k (h1-h2)^2 = [0.2, 0.4]
    assert consistency_term(s1, s2, h1, h2).item() == pytest.approx(4.0 + 0.3)
    # M = 1: the official (B,1)+(B,) broadcast pairs every score term with every feature term
    assert consistency_term(s1, s2, h1, h2, factor_m=1.0).item() == pytest.approx((7.2 + 7.4) / 4)
    assert math.isnan(consistency_term(t(float("nan"), 1.0), s2, h1, h2).item())
    with pytest.raises(ValueError):
        consistency_term(s1, s2[:1], h1, h2)


# --------------------------------------------------------------------------------------------
# gradcheck (float64) and torch.compile
# --------------------------------------------------------------------------------------------
def test_gradcheck_losses():
    g = torch.Generator().manual_seed(0)
    b = 16
    d = (torch.rand(b, 1, generator=g, dtype=f64) * 0.8 + 0.1).requires_grad_()
    adv = (torch.randn(b, 1, generator=g, dtype=f64) + 0.1).requires_grad_()
    p = torch.rand(b, 1, generator=g, dtype=f64) * 2 + 0.2
    # keep r off the clip edges and A off 0 (the kinks, where finite differences disagree)
    r = probability_ratio(d, p).detach()
    assert ((r - 0.6).abs() > 1e-3).all() and ((r - 1.4).abs() > 1e-3).all() and (adv.abs() > 1e-3).all()
    assert torch.autograd.gradcheck(lambda d_, a_: ppo_generator_loss(d_, p, a_), (d, adv))
    # reweighted_fake_term is left out on purpose: W is detached, so finite differences (which see
    # W move with f) and autograd (W/B) differ by design; test_reweighted_fake_term_hand_values pins
    # its gradient
    s1, s2 = torch.randn(2, b, 1, generator=g, dtype=f64).requires_grad_().unbind(0)
    h1, h2 = torch.randn(2, b, 5, generator=g, dtype=f64).requires_grad_().unbind(0)
    assert torch.autograd.gradcheck(consistency_term, (s1, s2, h1, h2))
    pr = (torch.rand(b, 1, generator=g, dtype=f64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(ratio_classifier_loss, (pr, d))
    # the penalty's gradient w.r.t. the critic weights goes through a double backward
    w = torch.randn(3, 1, generator=g, dtype=f64, requires_grad=True)
    real, fake = torch.randn(2, b, 3, generator=g, dtype=f64).unbind(0)
    alpha = torch.rand(b, generator=g, dtype=f64)
    assert torch.autograd.gradcheck(lambda w_: gradient_penalty(lambda x: torch.tanh(x @ w_), real, fake,
                                                                alpha=alpha), (w,))


def _both_losses(d, p, adv, f):
    return ppo_generator_loss(d, p, adv) + reweighted_fake_term(f)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_losses_compile_fullgraph(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    b = 32
    d0 = torch.rand(b, 1, generator=g) * 0.9 + 0.05
    p = frozen_p_old(torch.rand(b, 1, generator=g) * 0.9 + 0.05)
    a0, f0 = torch.randn(b, 1, generator=g), torch.randn(b, 1, generator=g)
    d0[0], d0[1] = 0.0, 1.0  # saturated D inside the compiled graph too
    a0[2] = 0.0
    outs = []
    for fn in (_both_losses, torch.compile(_both_losses, backend=backend, fullgraph=True)):
        d, a, f = (x.clone().requires_grad_() for x in (d0, a0, f0))
        loss = fn(d, p, a, f)
        loss.backward()
        outs.append((loss.detach(), d.grad, a.grad, f.grad))
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the training helper
# --------------------------------------------------------------------------------------------
class _Critic(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Dropout(dropout))
        self.fc = nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), h


def _nets(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    G = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
    D = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    return G, _Critic(dropout), D


def _data(n=64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=g) + 2.0 for _ in range(n)]


def _official_round(G, C, D, opt_g, opt_c, opt_d, batches, cfg):
    """One round written the way the authors' cifar10/main.py orders it: separate backward calls,
    G run twice on the same z, all weight gradients computed and zeroed before use."""
    for _ in range(cfg.diters):
        C.zero_grad()
        real = next(batches)
        r1 = C(real)[0]
        r1.mean().backward(torch.tensor(-1.0), retain_graph=True)
        noise = torch.randn(real.shape[0], cfg.nz)
        fake = G(noise)
        f1 = C(fake.detach())[0]
        with torch.no_grad():
            W = real.shape[0] * torch.softmax(f1.data, dim=0)
        (W * f1).mean().backward(torch.tensor(1.0))
        alpha = torch.rand(real.shape[0], 1).expand_as(real)
        x = (alpha * real + (1 - alpha) * fake.data).requires_grad_(True)
        out = C(x)[0]
        grads = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True, retain_graph=True)[0]
        (((grads.norm(2, dim=1) - 1) ** 2).mean() * cfg.gp_weight).backward()
        opt_c.step()
    with torch.no_grad():
        D0 = D(fake.data)
        P0 = (1.0 - D0) / torch.clamp(D0, min=1e-7)
    bce = nn.BCELoss()
    for _ in range(cfg.ppo_iters):
        D.zero_grad()
        real = next(batches)
        bce(D(real), torch.ones(real.shape[0], 1)).backward()
        fk = G(torch.randn(real.shape[0], cfg.nz))
        bce(D(fk.detach()), torch.zeros(real.shape[0], 1)).backward()
        nn.utils.clip_grad_norm_(D.parameters(), cfg.max_grad_norm)
        opt_d.step()
        G.zero_grad()
        fake = G(noise)
        D1 = D(G(noise))
        ratio = (1.0 - D1) / torch.clamp(D1 * P0, min=1e-7)
        adv = C(fake)[0]
        s1, s2 = ratio * adv, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * adv
        torch.where(adv > 0, torch.min(s1, s2), torch.max(s1, s2)).mean().backward(torch.tensor(-1.0))
        opt_g.step()


@pytest.fixture
def default_f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(f64)  # float64 so that summation order (one backward vs several) is invisible
    yield
    torch.set_default_dtype(old)


def test_train_step_matches_official_order(default_f64):
    cfg = PPOGANConfig(nz=3, diters=2, ppo_iters=3, lr=1e-2)
    runs = []
    for use_helper in (True, False):
        G, C, D = _nets()
        opts = make_optimizers(G, C, D, cfg)
        torch.manual_seed(123)
        batches = iter(_data())
        if use_helper:
            gan = PPOGAN(G, C, D, *opts, cfg)
            for _ in range(3):
                stats = gan.train_step(batches)
                assert all(math.isfinite(v) for v in stats.values()), stats
            assert (gan.rounds, gan.critic_steps, gan.ratio_steps, gan.generator_steps) == (3, 6, 9, 9)
        else:
            for _ in range(3):
                _official_round(G, C, D, *opts, batches, cfg)
        assert len(list(batches)) == 64 - 3 * (2 + 3)  # each critic and each ratio step takes a batch
        runs.append([p.detach().clone() for m in (G, C, D) for p in m.parameters()])
    init = [p.detach() for m in _nets() for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], init))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_train_step_baseline_and_options():
    cfg = PPOGANConfig(nz=3, diters=3, ppo_iters=2, ratio_clip=False, reweight=False)
    G, C, D = _nets()
    opt_g, opt_c, _ = make_optimizers(G, C, None, cfg)
    gan = PPOGAN(G, C, None, opt_g, opt_c, None, cfg)
    data = _data()
    calls = []

    def nxt():  # the callable form of the batch source
        calls.append(1)
        return data[len(calls) - 1]

    for _ in range(2):
        stats = gan.train_step(nxt)
    assert len(calls) == 2 * 3 and (gan.critic_steps, gan.ratio_steps, gan.generator_steps) == (6, 0, 4)
    assert "ratio_loss" not in stats and math.isfinite(stats["generator_loss"])
    # consistency term with a stochastic critic: positive and finite
    cfg = PPOGANConfig(nz=3, diters=1, ppo_iters=1, consistency=True)
    G, C, D = _nets(dropout=0.5)
    gan = PPOGAN(G, C, D, *make_optimizers(G, C, D, cfg), cfg)
    stats = gan.train_step(iter(data))
    assert stats["ct"] > 0 and math.isfinite(stats["critic_loss"])
    assert 0 <= stats["clipped_frac"] <= 1 and 0 <= stats["below_frac"] <= 1 and 0 < stats["d_fake"] < 1
    with pytest.raises(ValueError, match="ratio classifier"):
        PPOGAN(G, C, None, opt_g, opt_c, None, PPOGANConfig())
    with pytest.raises(ValueError):
        PPOGANConfig(diters=0)
    with pytest.raises(StopIteration):
        PPOGAN(G, C, D, *make_optimizers(G, C, D, cfg), cfg).train_step(iter(data[:1]))


def test_public_api():
    for name in gan.__all__:
        assert getattr(gan, name).__doc__ or name == "RATIO_EPS", name


# --------------------------------------------------------------------------------------------
# the demo, smallest setting, end to end
# --------------------------------------------------------------------------------------------
def test_gan_demo_tiny(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from fused_adv import cli

    assert cli.main(["gan-demo", "--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    for name in ("samples_wgan-gp.png", "samples_ppo-rw.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    res = json.loads((tmp_path / "gan_demo.json").read_text())
    variants = [r["variant"] for r in res["summary"]]
    assert variants == ["wgan-gp", "ppo-rw", "real (held-out)"]
    assert len(res["runs"]) == 2 * 2
    for r in res["runs"]:
        rounds = res["setup"]["rounds"]
        ppo = r["variant"] == "ppo-rw"
        assert r["counts"] == {"rounds": rounds, "critic_steps": 5 * rounds, "ratio_steps": 5 * rounds * ppo,
                               "generator_steps": 5 * rounds}
        assert 1.0 <= r["score"] <= 10.0 and r["fd"] >= 0 and math.isfinite(r["fd"])
    assert res["real_reference"]["score"] > 3.0
    md = (tmp_path / "gan_demo.md").read_text()
    assert "wgan-gp" in md and "ppo-rw" in md and "±" in md


def test_measure_counts_kernels():
    from fused_adv.gan.measure import markdown, measure

    res = measure(batch_size=8, hidden=8, nz=4, reps=2, compile_loss=False)
    rows = {r["step"]: r for r in res["rows"]}
    g, c = rows["generator_step"], rows["critic_step"]
    # the loss is a part of its step: fewer kernels, and the step's forward/backward dominate
    assert 0 < g["loss_kernels"] < g["step_kernels"] and 0 < c["loss_kernels"] < c["step_kernels"]
    assert g["loss_us"] > 0 and c["step_us"] > 0
    assert "generator_step" in markdown(res)
