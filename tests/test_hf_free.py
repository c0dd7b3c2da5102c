"""The free methods with Hugging Face models (docs/hf.md, "yopo" and "freeat: a plain loop";
docs/methods.md §8 (FreeAT and YOPO)), against hand-written loops with fused_adv.reference:

- ``adversarial="yopo"`` in the Trainer (tiny BERT, dropout 0, plain SGD, data in order, the
  init replayed by reseeding at every optimizer step as tests/test_hf_trainer_activation.py does):
  per micro-batch ``reference.YOPO.attack(model, batch, gradient_accumulation_steps=ga_div)``;
- ``train_freeat`` (the plain-loop helper): per batch, m times zero_grad / ``reference.FreeAT.replay``
  / clip / SGD step, the scheduler per batch or per replay.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import fused_adv  # noqa: E402
from fused_adv import reference  # noqa: E402
from fused_adv.integrations.hf import AdversarialConfig  # noqa: E402
from fused_adv.integrations.hf.freeat_loop import train_freeat  # noqa: E402
from hf_harness import (BS, LR, SEED, VOCAB, assert_params_differ, assert_same_params, collate, dataset,  # noqa: E402
                        record_no_sync, run_trainer, trainer_divides_by_ga)
from models import tiny_bert_cls  # noqa: E402

YOPO_KW = {"adv_steps": 2, "yopo_steps": 2, "adv_lr": 0.5, "adv_init_mag": 1.0}


def yopo_loop(steps=2, ga=1, divide_by_ga=True, method="yopo", **kw):
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = dataset()
    div = ga if divide_by_ga else 1
    adv = reference.YOPO(**kw) if method == "yopo" else None
    for s in range(steps):
        torch.manual_seed(SEED + s)
        for j in range(ga):
            batch = collate(data[(s * ga + j) * BS:(s * ga + j + 1) * BS])
            if adv is None:
                (model(**batch).loss / div).backward()
            else:
                adv.attack(model, batch, gradient_accumulation_steps=div)
        opt.step()
        model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("kw", [{}, {"adv_max_norm": 0.8}, {"first_layer": "bert.encoder.layer.1"}])
def test_yopo_trainer_matches_reference_loop(tmp_path, kw):
    akw = dict(YOPO_KW, **kw)
    tr = run_trainer(tmp_path, "yopo", steps=2, **akw)
    expected = yopo_loop(steps=2, **akw)
    assert_same_params(tr.model, expected)
    assert_params_differ(expected, yopo_loop(steps=2, method=None))


def no_loss_kwargs(tr):
    tr.model_accepts_loss_kwargs = False      # the other GA convention: the Trainer divides by GA


@pytest.mark.parametrize("trainer_divides", [False, True])
def test_yopo_trainer_gradient_accumulation(tmp_path, trainer_divides):
    tr = run_trainer(tmp_path, "yopo", steps=2, ga=2, setup=no_loss_kwargs if trainer_divides else None, **YOPO_KW)
    divides = trainer_divides_by_ga(tr)
    assert divides or not trainer_divides
    assert_same_params(tr.model, yopo_loop(steps=2, ga=2, divide_by_ga=divides, **YOPO_KW))


def test_yopo_trainer_non_final_passes_skip_all_reduce(tmp_path):
    """The full passes' gradients accumulate, so all but the last run under no_sync; the inner steps
    (two forwards before each later pass, stopped at the first layer) run outside any no_sync: they
    differentiate w.r.t. delta only, so no parameter gradient and no all-reduce."""
    seen = []
    run_trainer(tmp_path, "yopo", steps=1, setup=record_no_sync(seen), **YOPO_KW)
    full, inner = True, False
    assert seen == [full, inner, inner, full, inner, inner, not full]


def test_yopo_trainer_config_checks():
    with pytest.raises(ValueError, match="adv_steps must be >= 1"):
        AdversarialConfig.build("yopo", {"adv_steps": 0})
    with pytest.raises(ValueError, match="yopo_steps must be >= 1"):
        AdversarialConfig.build("yopo", {"yopo_steps": 0})
    with pytest.raises(TypeError, match="unknown"):
        AdversarialConfig.build("yopo", {"adv_K": 3})
    cfg = AdversarialConfig.build("yopo", dict(YOPO_KW, first_layer=None))
    assert cfg.method == "yopo" and cfg.method_kwargs["yopo_steps"] == 2


# ----------------------------------------------------------------------------- train_freeat
def loader():
    return torch.utils.data.DataLoader(dataset()[:3 * BS], batch_size=BS, shuffle=False, collate_fn=collate)


def hand_freeat_loop(freeat, model, epochs, scheduler_per, max_grad_norm, lr_lambda):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    model.train()
    losses = []
    for _ in range(epochs):
        for batch in loader():
            for j in range(freeat.adv_steps):
                opt.zero_grad()
                losses.append(freeat.replay(model, batch, j))
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                opt.step()
                if scheduler_per == "replay":
                    sched.step()
            if scheduler_per == "batch":
                sched.step()
    return torch.stack(losses).float(), model


@pytest.mark.parametrize("kw,scheduler_per", [
    (dict(adv_steps=3, adv_lr=0.05, adv_max_norm=0.1), "batch"),
    (dict(adv_steps=2, adv_norm_type="l2", adv_lr=0.3, adv_init_mag=0.5, adv_max_norm=0.4), "replay"),
])
def test_train_freeat_matches_hand_loop(kw, scheduler_per):
    lr_lambda = lambda step: 1.0 / (1 + step)          # noqa: E731  (the schedule's count matters)
    want = tiny_bert_cls(seed=0, vocab=VOCAB)          # (reseeds: build before seeding the run)
    torch.manual_seed(SEED)
    want_losses, want = hand_freeat_loop(reference.FreeAT(**kw), want, 2, scheduler_per, 1.0, lr_lambda)
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    seen = []
    torch.manual_seed(SEED)
    losses = train_freeat(model, loader(), opt, fused_adv.FreeAT(model, **kw), epochs=2, scheduler=sched,
                          scheduler_per=scheduler_per, max_grad_norm=1.0, callback=lambda s, j, l: seen.append((s, j)))
    torch.testing.assert_close(losses, want_losses, rtol=2e-5, atol=2e-6)
    assert_same_params(model, want)
    m = kw["adv_steps"]
    assert seen == [(s, s % m) for s in range(2 * 3 * m)]          # one optimizer step per replay
    assert sched.last_epoch == (2 * 3 if scheduler_per == "batch" else 2 * 3 * m)
    plain = tiny_bert_cls(seed=0, vocab=VOCAB)
    torch.manual_seed(SEED)
    hand_freeat_loop(reference.FreeAT(**dict(kw, adv_lr=0.0, adv_init_mag=0.0, adv_max_norm=0.0)), plain, 2,
                     scheduler_per, 1.0, lr_lambda)
    assert_params_differ(want, plain)


def test_train_freeat_errors():
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    fa = fused_adv.FreeAT(model, adv_steps=1)
    with pytest.raises(ValueError, match="epochs"):
        train_freeat(model, loader(), opt, fa, epochs=0)
    with pytest.raises(ValueError, match="scheduler_per"):
        train_freeat(model, loader(), opt, fa, scheduler_per="epoch")
    with pytest.raises(ValueError, match="dicts"):
        train_freeat(model, [(torch.zeros(1),)], opt, fa)

