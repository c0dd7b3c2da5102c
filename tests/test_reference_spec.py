"""The reference classes pinned to docs/methods.md §1 (FGM), §2 (FGSM), §3 (PGD) and §4 (AWP
(Kaggle)) on hand-computed float64 cases, plus the exact gradient bookkeeping of each method's
training loop.  The helpers the reference and fused classes share are pinned in
tests/test_shared_helpers.py."""
import math

import pytest
import torch
from torch import nn

from fused_adv import reference as R


class OneParam(nn.Module):
    """A model whose only parameter is named like an embedding weight."""

    def __init__(self, values, name_part="word_embeddings"):
        super().__init__()
        self.emb = nn.Module()
        setattr(self.emb, name_part, nn.Parameter(torch.tensor(values, dtype=torch.float64)))
        self.name_part = name_part

    @property
    def w(self):
        return getattr(self.emb, self.name_part)


def with_grad(model, grad):
    model.w.grad = torch.tensor(grad, dtype=torch.float64)
    return model


# ---------------------------------------------------------------- FGM / FGSM
def test_fgm_hand_case_and_restore():
    m = with_grad(OneParam([[1.0, 2.0], [3.0, 4.0]]), [[3.0, 0.0], [0.0, 4.0]])
    fgm = R.FGM(m, epsilon=1.0)
    fgm.attack()
    assert torch.allclose(m.w.data, torch.tensor([[1.6, 2.0], [3.0, 4.8]], dtype=torch.float64))
    fgm.restore()
    assert torch.equal(m.w.data, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))


def test_fgm_call_forms():
    m = with_grad(OneParam([0.0, 0.0]), [3.0, 4.0])
    fgm = R.FGM(m, "word_embeddings", 0.5)           # positional
    fgm.attack()
    assert torch.allclose(m.w.data, torch.tensor([0.3, 0.4], dtype=torch.float64))
    fgm.restore()
    R.FGM(m, epsilon=0.25).attack(epsilon=2.0, emb_name="word_embeddings")  # attack overrides
    assert torch.allclose(m.w.data, torch.tensor([1.2, 1.6], dtype=torch.float64))


@pytest.mark.parametrize("grad, expected", [
    ([0.0, 0.0], [1.0, 2.0]),                         # zero norm: skipped
    ([float("nan"), 1.0], [1.0, 2.0]),                # NaN norm: skipped
    ([float("inf"), 1.0], [float("nan"), 2.0]),       # inf norm: NOT skipped; inf/inf = NaN, 1/inf = 0
])
def test_fgm_skip_rules(grad, expected):
    m = with_grad(OneParam([1.0, 2.0]), grad)
    fgm = R.FGM(m)
    fgm.attack()
    torch.testing.assert_close(m.w.data, torch.tensor(expected, dtype=torch.float64), equal_nan=True)
    assert torch.equal(fgm.backup["emb.word_embeddings"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    fgm.restore()
    assert torch.equal(m.w.data, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_fgm_restore_without_attack_is_an_error():
    with pytest.raises(RuntimeError, match="without attack"):
        R.FGM(with_grad(OneParam([1.0]), [1.0])).restore()


def test_fgsm_hand_case():
    m = with_grad(OneParam([1.0, 2.0, 3.0]), [-5.0, 0.0, 0.1])
    fgsm = R.FGSM(m, epsilon=0.5)
    fgsm.attack()
    assert torch.equal(m.w.data, torch.tensor([0.5, 2.0, 3.5], dtype=torch.float64))
    fgsm.restore()
    assert torch.equal(m.w.data, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


# ---------------------------------------------------------------- PGD
def test_pgd_steps_and_projection():
    m = with_grad(OneParam([0.0, 0.0]), [3.0, 4.0])
    pgd = R.PGD(m, epsilon=1.5, alpha=1.0)
    pgd.attack(is_first_attack=True)           # + [0.6, 0.8], ||r|| = 1 <= 1.5
    assert torch.allclose(m.w.data, torch.tensor([0.6, 0.8], dtype=torch.float64))
    pgd.attack()                               # [1.2, 1.6], ||r|| = 2 > 1.5 -> projected
    assert torch.allclose(m.w.data, torch.tensor([0.9, 1.2], dtype=torch.float64))
    m.w.grad.zero_()
    pgd.attack()                               # zero grad: skipped, no projection
    assert torch.allclose(m.w.data, torch.tensor([0.9, 1.2], dtype=torch.float64))
    m.w.grad = torch.tensor([-4.0, 3.0], dtype=torch.float64)
    pgd.attack(alpha=0.5)                      # [0.5, 1.5]: ||r||^2 = 2.5 > 2.25 -> onto the sphere
    r = torch.tensor([0.5, 1.5], dtype=torch.float64)
    assert torch.allclose(m.w.data, 1.5 * r / r.norm())
    pgd.restore()
    assert torch.equal(m.w.data, torch.zeros(2, dtype=torch.float64))


def quadratic_model(values):
    """loss(w) = sum(c * w**2) / 2 with c = 1..n, so grad(w) = c * w depends on the point."""
    m = OneParam(values)
    c = torch.arange(1, len(values) + 1, dtype=torch.float64)
    return m, (lambda: 0.5 * (c * m.w ** 2).sum()), c


def test_pgd_gradient_bookkeeping_is_clean_plus_last_adversarial():
    m, loss_fn, c = quadratic_model([1.0, -1.0, 0.5])
    w0 = m.w.data.clone()
    K = 3
    pgd = R.PGD(m, epsilon=0.7, alpha=0.3)
    loss_fn().backward()
    pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        if t != K - 1:
            m.zero_grad()
        else:
            pgd.restore_grad()
            w_last = m.w.data.clone()
        loss_fn().backward()
    pgd.restore()
    assert torch.equal(m.w.data, w0)
    torch.testing.assert_close(m.w.grad, c * w0 + c * w_last)
    assert (w_last - w0).norm() <= 0.7 + 1e-12


# ---------------------------------------------------------------- AWP
class AwpModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Module()
        self.layer.weight = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.layer.bias = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))

    def loss(self):  # grad(weight) = weight, grad(bias) = bias
        return 0.5 * (self.layer.weight ** 2).sum() + 0.5 * (self.layer.bias ** 2).sum()


def test_awp_hand_case_box_and_bookkeeping():
    m = AwpModel()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    awp = R.AWP(m, opt, adv_lr=1.0, adv_eps=0.2)
    m.layer.weight.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    m.layer.bias.grad = torch.tensor([1.0], dtype=torch.float64)
    seen = {}

    def closure():
        seen["w"] = m.layer.weight.detach().clone()
        seen["b"] = m.layer.bias.detach().clone()
        return m.loss()

    awp.attack_backward(closure=closure, epoch=0)
    # step = G/(5+1e-6) * (sqrt(5)+1e-6) = [1.342, 1.789] -> [2.342, -0.211] -> box [0.8,1.2]x[-2.4,-1.6]
    assert torch.allclose(seen["w"], torch.tensor([1.2, -1.6], dtype=torch.float64))
    assert torch.equal(seen["b"], torch.tensor([0.5], dtype=torch.float64))  # biases are not perturbed
    assert torch.equal(m.layer.weight.data, torch.tensor([1.0, -2.0], dtype=torch.float64))  # restored
    # the clean gradient is discarded: only the adversarial gradient, taken at the perturbed point
    torch.testing.assert_close(m.layer.weight.grad, torch.tensor([1.2, -1.6], dtype=torch.float64))
    torch.testing.assert_close(m.layer.bias.grad, torch.tensor([0.5], dtype=torch.float64))


def test_awp_unclamped_step_and_two_steps():
    m = AwpModel()
    awp = R.AWP(m, torch.optim.SGD(m.parameters(), lr=0.1), adv_lr=0.01, adv_eps=1.0, adv_step=2)
    m.layer.weight.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    m.layer.bias.grad = torch.zeros(1, dtype=torch.float64)
    seen = []
    awp.attack_backward(closure=lambda: (seen.append(m.layer.weight.detach().clone()), m.loss())[1], epoch=0)
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    n2 = math.sqrt(5.0)
    step1 = w0 + 0.01 * torch.tensor([3.0, 4.0], dtype=torch.float64) / (5 + 1e-6) * (n2 + 1e-6)
    torch.testing.assert_close(seen[0], step1)
    g2 = step1  # grad of the adversarial loss at step1
    step2 = step1 + 0.01 * g2 / (g2.norm() + 1e-6) * (step1.norm() + 1e-6)
    torch.testing.assert_close(seen[1], step2)


def test_awp_skips_before_start_epoch_and_with_zero_lr():
    m = AwpModel()
    m.layer.weight.grad = torch.ones(2, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert R.AWP(m, opt, start_epoch=2).attack_backward(closure=m.loss, epoch=1) is None
    assert R.AWP(m, opt, adv_lr=0).attack_backward(closure=m.loss, epoch=5) is None
    assert torch.equal(m.layer.weight.grad, torch.ones(2, dtype=torch.float64))
