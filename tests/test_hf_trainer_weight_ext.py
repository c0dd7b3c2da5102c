"""fused_adv.integrations.hf with adversarial="mifgsm" and adversarial="awp_paper" against loops
written by hand with the reference classes (docs/methods.md §2b (MI-FGSM), §4b (AWP (paper))).

Same harness as tests/test_hf_trainer.py (tiny BERT, plain SGD, data in order, fp32 relative error
<= 2e-5 per tensor).  MI-FGSM: PGD's step per micro-batch.  AWP (paper): per optimizer step the
direction from its first micro-batch, every micro-batch trained at the perturbed weights, restore
after ``optimizer.step()``."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fused_adv  # noqa: E402
from fused_adv import reference  # noqa: E402
from hf_harness import (BS, LR, VOCAB, AdvTrainer, assert_params_differ, assert_same_params, collate,  # noqa: E402
                        dataset, run_trainer, targs, trainer_divides_by_ga)
from models import tiny_bert_cls  # noqa: E402

MI_KW = {"epsilon": 0.05, "steps": 3, "decay": 1.0}
AWP_KW = {"gamma": 0.05, "proxy_lr": 0.01}


def hand_loop(method, steps=3, ga=1, divide_by_ga=True, proxy=True, fused_no_proxy=False, **kw):
    """``steps`` SGD steps of ``ga`` micro-batches: MI-FGSM as the reference loop per micro-batch
    (each micro-batch on zeroed grads, the results summed); the paper's AWP loop with its diff taken
    from the step's first micro-batch and restored after the optimizer step."""
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = dataset()
    div = ga if divide_by_ga else 1
    if method == "mifgsm":
        adv = reference.MIFGSM(model, **{**MI_KW, **kw})
    elif fused_no_proxy:
        adv = fused_adv.AdvWeightPerturb(model, gamma=kw.get("gamma", AWP_KW["gamma"]),
                                         proxy_lr=kw.get("proxy_lr", AWP_KW["proxy_lr"]), backend="torch")
    else:
        import copy
        p = copy.deepcopy(model)
        adv = reference.AdvWeightPerturb(model, p, torch.optim.SGD(p.parameters(), lr=AWP_KW["proxy_lr"]),
                                         kw.get("gamma", AWP_KW["gamma"]))
    for s in range(steps):
        batches = [collate(data[(s * ga + j) * BS:(s * ga + j + 1) * BS]) for j in range(ga)]
        if method == "awp_paper":
            diff = adv.calc_awp(closure=lambda m: m(**batches[0]).loss)
            adv.perturb(diff)
            for b in batches:
                (model(**b).loss / div).backward()
            opt.step()
            adv.restore(diff)
            model.zero_grad(set_to_none=True)
            continue
        acc = {}
        for b in batches:
            model.zero_grad(set_to_none=True)
            (model(**b).loss / div).backward()
            adv.backup_grad()
            for t in range(adv.steps):
                adv.attack(is_first_attack=(t == 0))
                if t != adv.steps - 1:
                    model.zero_grad()
                else:
                    adv.restore_grad()
                (model(**b).loss / div).backward()
            adv.restore()
            for p in model.parameters():
                if p.grad is not None:
                    acc[p] = acc[p] + p.grad if p in acc else p.grad.clone()
        for p in model.parameters():
            p.grad = acc.get(p)
        opt.step()
        model.zero_grad(set_to_none=True)
    return model


def train(tmp_path, method, n_steps, ga=1, **akw):
    """run_trainer without its ``steps`` keyword (MI-FGSM's own argument is called steps)."""
    tr = AdvTrainer(model=tiny_bert_cls(seed=0, vocab=VOCAB), args=targs(tmp_path, n_steps, ga),
                    train_dataset=dataset(), adversarial=method, adversarial_kwargs=akw)
    tr.train()
    return tr


@pytest.mark.parametrize("ga", [1, 2])
def test_mifgsm_matches_reference_loop(tmp_path, ga):
    tr = train(tmp_path, "mifgsm", 3, ga=ga, **MI_KW)
    expected = hand_loop("mifgsm", steps=3, ga=ga, divide_by_ga=trainer_divides_by_ga(tr))
    assert_same_params(tr.model, expected)
    assert_params_differ(tr.model, run_trainer(tmp_path / "plain", "awp_paper", steps=3, ga=ga, gamma=0.0).model)


@pytest.mark.parametrize("ga", [1, 2])
def test_awp_paper_with_proxy_matches_reference_loop(tmp_path, ga):
    tr = run_trainer(tmp_path, "awp_paper", steps=3, ga=ga, proxy=True, **AWP_KW)
    expected = hand_loop("awp_paper", steps=3, ga=ga, divide_by_ga=trainer_divides_by_ga(tr))
    assert_same_params(tr.model, expected)
    assert not tr.adversary.is_attacked                        # restored after the last optimizer step
    assert_params_differ(tr.model, run_trainer(tmp_path / "plain", "awp_paper", steps=3, ga=ga, gamma=0.0).model)


def test_awp_paper_without_proxy_matches_proxy_free_loop(tmp_path):
    tr = run_trainer(tmp_path, "awp_paper", steps=3, **AWP_KW)
    assert tr.adversary.proxy is None
    assert_same_params(tr.model, hand_loop("awp_paper", steps=3, fused_no_proxy=True,
                                           divide_by_ga=trainer_divides_by_ga(tr)))
    # and with the paper's proxy within a loose bound: the proxy's w' - w cancels ~3 digits here
    assert_same_params(tr.model, hand_loop("awp_paper", steps=3, divide_by_ga=trainer_divides_by_ga(tr)),
                       rtol=1e-3)


class FailingPass(AdvTrainer):
    calls = 0

    def compute_loss(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == self.fail_at:
            raise RuntimeError("boom in a forward")
        return super().compute_loss(*args, **kwargs)


@pytest.mark.parametrize("method, kw, fail_at", [("mifgsm", MI_KW, 2), ("awp_paper", AWP_KW, 2)])
def test_exception_in_a_pass_leaves_nothing_perturbed(tmp_path, method, kw, fail_at):
    FailingPass.calls = 0
    FailingPass.fail_at = fail_at          # awp_paper: calc_awp is call 1, the training pass call 2
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = FailingPass(model=model, args=targs(tmp_path, 1), train_dataset=dataset(), adversarial=method,
                     adversarial_kwargs=kw)
    with pytest.raises(RuntimeError, match="boom"):
        tr.train()
    assert not tr.adversary.is_attacked
    for n, p in model.named_parameters():
        # MI-FGSM restores bit for bit; the paper's restore is w + g*d - g*d (rounding only)
        assert torch.allclose(p.detach(), before[n], atol=1e-6, rtol=0), n


def test_config_errors():
    with pytest.raises(ValueError, match="steps"):
        AdvTrainer(adversarial="mifgsm", adversarial_kwargs={"steps": 0})
    with pytest.raises(ValueError, match="proxy"):
        AdvTrainer(adversarial="awp_paper", adversarial_kwargs={"proxy": "yes"})
    with pytest.raises(TypeError, match="unknown"):
        AdvTrainer(adversarial="awp_paper", adversarial_kwargs={"proxy_optim": None})
