"""fused_adv.integrations.hf with the activation-space methods (FreeLB, SMART, SiFT) against
hand-written loops with fused_adv.reference, through the same Trainer harness as
tests/test_hf_trainer.py (tiny BERT, dropout 0, plain SGD, data in order).  The random inits are
replayed by reseeding at every optimizer step (hf_harness.SeedEachStep; the hand loops do the same).

What the hand loops pin down, per micro-batch (docs/methods.md §5 (SiFT), §6 (FreeLB), §7 (SMART),
§10 (Cross-cutting rules)):
- freelb: ``reference.FreeLB.attack`` (K passes with loss / K, no clean pass);
- smart:  ``task_loss / ga_div + adv_alpha * SymKL / ga`` with the reference SMART term;
- sift:   ``task_loss / ga_div + vat_lambda * symmetric_kl / ga`` with DeBERTa's hooks and learner;
where ``ga_div`` is whatever the installed Trainer divides the task loss by (1 when it normalises by
num_items_in_batch) and ``ga`` the micro-batches per step (the integration's documented rule for
the extra term).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from fused_adv import reference  # noqa: E402
from fused_adv.integrations.hf import make_adversarial  # noqa: E402
from hf_harness import (BS, KW, LR, RTOL, SEED, VOCAB, AdvTrainer, ScalerSpyTrainer, SeedEachStep,  # noqa: E402
                        TRLStyleTrainer, assert_params_differ, assert_same_params, collate, dataset,
                        frozen_embedding_bert, install_scaler, lora_bert, needs_ddp_opt_in, record_no_sync,
                        run_ddp_worker, run_trainer, targs, trainer_divides_by_ga)
from models import tiny_bert_cls  # noqa: E402

ACTIVATION = ("freelb", "smart", "sift")
HIDDEN = 16     # tiny_bert_cls's hidden size: SiFT's PerturbationLayer width
# SiFT's term has the gradient ps - pt (clean vs perturbed probabilities, nearly equal), so the
# last-bit difference between the fused LayerNorm (cpp/triton) and torch's is amplified: measured
# 1.9e-5 (GA=1) and 5.0e-5 (GA=2) with the cpp backend, exactly 0 with backend="torch" (which the
# sift-torch case pins at the default tolerance).
SIFT_RTOL = 2e-4


def rtol(method, kw):
    return SIFT_RTOL if method == "sift" and kw.get("backend") != "torch" else RTOL


def reference_activation_loop(method, steps=2, ga=1, divide_by_ga=True, model=None, data=None, params=None,
                              backend=None, reseed_each_micro_batch=False, start_step=0, **kw):
    """``steps`` SGD steps of ``ga`` micro-batches with the community usage of ``method``
    (``backend`` is the fused run's option, ignored here).  ``reseed_each_micro_batch``: every
    micro-batch draws from the step's seed, as every rank of a DDP run does."""
    model = tiny_bert_cls(seed=0, vocab=VOCAB) if model is None else model
    model.train()
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=LR)
    kwargs = dict(KW.get(method, {}))
    kwargs.update(kw)
    data = dataset() if data is None else data
    div = ga if divide_by_ga else 1
    if method == "freelb":
        adv = reference.FreeLB(**kwargs)
    elif method == "smart":
        adv = reference.SMART(**kwargs)
    elif method == "sift":
        vat_lambda = kwargs.pop("vat_lambda", 1.0)
        loss_fn = kwargs.pop("loss_fn", "symmetric-kl")
        adv = reference.sift.AdversarialLearner(model, reference.sift.hook_sift_layer(model, HIDDEN, **kwargs))

    for s in range(steps):
        torch.manual_seed(SEED + s)
        for j in range(ga):
            if reseed_each_micro_batch:
                torch.manual_seed(SEED + s)
            batch = collate(data[(s * ga + j) * BS:(s * ga + j + 1) * BS])
            if method is None or s < start_step:
                (model(**batch).loss / div).backward()
            elif method == "freelb":
                adv.attack(model, batch, gradient_accumulation_steps=div)
            else:
                out = model(**batch)
                if method == "smart":
                    term = adv.loss(model, batch, out.logits)
                else:
                    term = adv.loss(out.logits, lambda m, **k: m(**k).logits, loss_fn, **batch) * vat_lambda
                (out.loss / div + term / ga).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("method,kw", [
    ("freelb", {}),
    ("freelb", {"adv_K": 3, "adv_max_norm": 0.8}),                          # l2 projection active
    ("freelb", {"adv_norm_type": "linf", "adv_init_mag": 0.2, "adv_max_norm": 0.1}),
    ("smart", {}),
    ("smart", {"adv_K": 2}),
    ("sift", {}),
    ("sift", {"backend": "torch"}),
    ("sift", {"loss_fn": "kl"}),
])
def test_activation_method_matches_reference_loop(tmp_path, method, kw):
    tr = run_trainer(tmp_path, method, steps=2, **kw)
    expected = reference_activation_loop(method, steps=2, **kw)
    assert_same_params(tr.model, expected, rtol=rtol(method, kw))
    assert_params_differ(expected, reference_activation_loop(None, steps=2))


@pytest.mark.parametrize("method", ["freelb", "smart"])
def test_activation_start_step(tmp_path, method):
    tr = run_trainer(tmp_path, method, steps=3, start_step=2)
    assert_same_params(tr.model, reference_activation_loop(method, steps=3, start_step=2))


def no_loss_kwargs(tr):
    tr.model_accepts_loss_kwargs = False      # the other GA convention: the Trainer divides by GA


@pytest.mark.parametrize("trainer_divides", [False, True])
@pytest.mark.parametrize("method", ACTIVATION)
def test_activation_gradient_accumulation(tmp_path, method, trainer_divides):
    """GA=2 under both of the Trainer's GA conventions: the task loss follows the Trainer's, the
    SMART/SiFT term is divided by the micro-batches per step either way."""
    tr = run_trainer(tmp_path, method, steps=2, ga=2, setup=no_loss_kwargs if trainer_divides else None)
    divides = trainer_divides_by_ga(tr)
    assert divides or not trainer_divides
    assert_same_params(tr.model, reference_activation_loop(method, steps=2, ga=2, divide_by_ga=divides),
                       rtol=rtol(method, {}))


@pytest.mark.parametrize("method", ACTIVATION)
def test_activation_methods_with_frozen_embedding(tmp_path, method):
    """The activation-space fallback for frozen embeddings (where FGM/PGD refuse): the embedding
    OUTPUT is perturbed, the frozen weight gets no gradient and stays as it was."""
    tr = run_trainer(tmp_path, method, steps=2, model=frozen_embedding_bert())
    emb = tr.model.get_input_embeddings().weight
    assert emb.grad is None and not emb.requires_grad
    assert torch.equal(emb.detach(), frozen_embedding_bert().get_input_embeddings().weight.detach())
    assert_same_params(tr.model, reference_activation_loop(method, steps=2, model=frozen_embedding_bert()),
                       rtol=rtol(method, {}))


@pytest.mark.parametrize("method", ACTIVATION)
def test_activation_methods_on_peft_lora(tmp_path, method):
    """A real PEFT/LoRA model (frozen base, embedding included): SMART finds the embedding block
    through the PEFT wrapper, SiFT hooks it by name, FreeLB embeds with get_input_embeddings()."""
    tr = run_trainer(tmp_path, method, steps=2, model=lora_bert(), args_kw={"label_names": ["labels"]})
    ref = lora_bert()
    kw = {"embedding_module": ref.get_base_model().bert.embeddings} if method == "smart" else {}
    expected = reference_activation_loop(method, steps=2, model=ref, **kw)
    assert_same_params(tr.model, expected, rtol=rtol(method, {}))
    assert_params_differ(expected, reference_activation_loop(None, steps=2, model=lora_bert()))


@pytest.mark.parametrize("method", ACTIVATION)
def test_activation_grad_scaler_no_unscale(tmp_path, method):
    """fp16's GradScaler path (a CPU GradScaler in accelerate's place, as in test_hf_trainer): every
    backward is scaled, nobody unscales during the step (the directions are scale-invariant), and a
    power-of-two scale is exact, so the result equals the unscaled hand loop."""
    from torch.amp.grad_scaler import OptState
    tr = run_trainer(tmp_path, method, steps=2, trainer_cls=ScalerSpyTrainer, setup=install_scaler(2.0 ** 12))
    assert tr.stages and all(s in (None, OptState.READY) for s in tr.stages), tr.stages
    assert tr.accelerator.scaler.get_scale() == 2.0 ** 12
    assert_same_params(tr.model, reference_activation_loop(method, steps=2), rtol=rtol(method, {}))


def test_freelb_nonfinite_gradient_skips_the_step(tmp_path):
    """An overflowing gradient in FreeLB (inf in delta's gradient): the next delta and loss are
    non-finite, the scaler skips the step and backs off; no weight was ever touched."""
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def setup(tr):
        install_scaler(2.0 ** 12)(tr)

        def poison(module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is not None and emb.requires_grad and not hasattr(tr, "_poisoned"):
                tr._poisoned = True
                emb.register_hook(lambda g: torch.full_like(g, float("inf")))
        tr.model.register_forward_pre_hook(poison, with_kwargs=True)

    tr = run_trainer(tmp_path, "freelb", steps=1, model=model, trainer_cls=ScalerSpyTrainer, setup=setup)
    assert tr._poisoned
    for n, p in tr.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed by a skipped step"
    assert tr.accelerator.scaler.get_scale() == 2.0 ** 11


def test_freelb_non_final_passes_skip_all_reduce(tmp_path):
    """Every FreeLB pass's gradient is kept, so the non-final passes run under no_sync (exact: the
    final synchronised backward all-reduces the accumulated sum); the final one synchronises."""
    seen = []
    run_trainer(tmp_path, "freelb", steps=1, setup=record_no_sync(seen), adv_K=3)
    assert seen == [True, True, False]


def test_logged_losses(tmp_path):
    """smart: ``loss`` is the clean loss (as a plain run logs it), ``adv_loss`` the added term;
    freelb (no clean pass): ``loss`` is the mean of the K adversarial losses, no ``adv_loss``."""
    batch = collate(dataset()[:BS])
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    out = model(**batch)
    torch.manual_seed(SEED)
    term = reference.SMART(**KW["smart"]).loss(model, batch, out.logits)
    tr = run_trainer(tmp_path, "smart", steps=1)
    log = next(e for e in tr.state.log_history if "loss" in e)
    assert log["loss"] == pytest.approx(out.loss.item(), abs=1e-4)     # transformers 4.x rounds it
    assert log["adv_loss"] == pytest.approx(term.item(), rel=1e-4)
    assert term.item() > 0                                  # (so the comparison above is not 0 == 0)

    model = tiny_bert_cls(seed=0, vocab=VOCAB)          # (seeds the RNG itself: before ours)
    torch.manual_seed(SEED)
    mean_adv = reference.FreeLB(**KW["freelb"]).attack(model, batch)
    tr = run_trainer(tmp_path, "freelb", steps=1)
    log = next(e for e in tr.state.log_history if "loss" in e)
    assert log["loss"] == pytest.approx(mean_adv.item(), rel=1e-4)
    assert "adv_loss" not in log


@pytest.mark.parametrize("method", ACTIVATION)
def test_make_adversarial_on_trl_style_subclass(tmp_path, method):
    tr = TRLStyleTrainer(model=tiny_bert_cls(seed=0, vocab=VOCAB), args=targs(tmp_path, 2), train_dataset=dataset())
    tr.counts = {"prepare": 0, "step": 0, "loss": 0}
    tr.add_callback(SeedEachStep())
    make_adversarial(tr, method, **KW[method])
    tr.train()
    passes = KW["freelb"]["adv_K"] if method == "freelb" else 1
    assert tr.counts == {"prepare": 2, "step": 2, "loss": 2 * passes}
    assert_same_params(tr.model, reference_activation_loop(method, steps=2), rtol=rtol(method, {}))


def test_sift_hooks_removed_when_reconfigured(tmp_path):
    tr = run_trainer(tmp_path, "sift", steps=1)
    layer_norm = tr.model.bert.embeddings.LayerNorm
    assert [h.__name__ for h in layer_norm._forward_pre_hooks.values()] == ["adv_hook"]
    tr.configure_adversarial("fgm", epsilon=0.5)
    assert not layer_norm._forward_pre_hooks
    assert all(p.requires_grad for p in tr.model.parameters())


class FailingSiFTForward(AdvTrainer):
    def training_step(self, model, *args, **kwargs):
        layer = self.model.bert.encoder.layer[0]

        def boom(module, args):
            if not next(self.model.parameters()).requires_grad:      # SiFT's frozen adversarial forward
                raise RuntimeError("boom in the adversarial forward")
        handle = layer.register_forward_pre_hook(boom)
        try:
            return super().training_step(model, *args, **kwargs)
        finally:
            handle.remove()


def test_sift_exception_in_adversarial_forward_unfreezes(tmp_path):
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    tr = FailingSiFTForward(model=model, args=targs(tmp_path, 1), train_dataset=dataset(),
                            adversarial="sift", adversarial_kwargs=KW["sift"])
    with pytest.raises(RuntimeError, match="boom"):
        tr.train()
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m.adversarial_mode for m in tr.adversary.adv_modules)


def test_activation_config_errors():
    with pytest.raises(TypeError, match="perturb_from.*option, not one of smart"):
        AdvTrainer(adversarial="smart", adversarial_kwargs={"perturb_from": "accumulated"})
    with pytest.raises(TypeError, match="unknown.*epsilon"):
        AdvTrainer(adversarial="freelb", adversarial_kwargs={"epsilon": 1.0})
    with pytest.raises(ValueError, match="loss_fn"):
        AdvTrainer(adversarial="sift", adversarial_kwargs={"loss_fn": "js"})
    with pytest.raises(ValueError, match="adv_K"):
        AdvTrainer(adversarial="freelb", adversarial_kwargs={"adv_K": 0})


def test_sift_unknown_target_module_is_clear(tmp_path):
    with pytest.raises(ValueError, match="matches no module.*Candidates"):
        run_trainer(tmp_path, "sift", steps=1, target_module="embeddings.norm_that_is_not_there")


@needs_ddp_opt_in
@pytest.mark.parametrize("method", ACTIVATION)
def test_ddp_two_processes(tmp_path, method):
    """Real DDP (2 CPU processes, gloo), 2 steps, rank r gets batch 2s+r and the same seed.  DDP
    averages the ranks' gradients, so the oracle is one process with GA=2 over the two batches,
    each micro-batch drawing from the step's seed.  freelb: the non-final pass skips the
    all-reduce; smart/sift: the extra forwards run on the unwrapped module (one DDP forward and
    one all-reduce per step)."""
    res = run_ddp_worker(tmp_path, method)[None]
    assert res["world"] == 2
    assert res["seen"] == ([False, True] if method == "freelb" else [True]) * 2
    expected = reference_activation_loop(method, steps=2, ga=2, divide_by_ga=True, reseed_each_micro_batch=True)
    got = res["params"]
    for name, p in expected.named_parameters():
        err = (got[name] - p.detach()).abs().max().item() / max(p.detach().abs().max().item(), 1e-3)
        assert err <= rtol(method, {}), f"{name}: relative error {err:.3g}"


class NoLogitsTrainer(AdvTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        return (out.loss, {"hidden": out.logits}) if return_outputs else out.loss


def test_regularizer_needs_the_logits(tmp_path):
    tr = NoLogitsTrainer(model=tiny_bert_cls(seed=0, vocab=VOCAB), args=targs(tmp_path, 1), train_dataset=dataset(),
                         adversarial="smart")
    with pytest.raises(TypeError, match="clean logits.*without 'logits'"):
        tr.train()
