"""fused_adv.integrations.hf: the Trainer mixin against hand-written loops with the reference classes.

Every numeric test trains a tiny random-init BertForSequenceClassification (dropout 0) through the
Trainer for a few SGD steps (plain SGD, no clipping, constant lr: the update is lr * grad, so a
wrong gradient scale shows up in the weights; Adam would hide it) on a fixed dataset read in
order, and compares every parameter with a loop written by hand with fused_adv.reference (the
community classes) doing the same thing.  fp32: relative error <= 2e-5 per tensor (the loops
sum the same terms in a different order, and the fused kernels round differently from the
reference ones; measured ~1e-7).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from fused_adv import reference  # noqa: E402
from fused_adv.integrations.hf import AdversarialTrainerMixin, make_adversarial  # noqa: E402
from hf_harness import (BS, KW, LR, PGD_K, RTOL, SEQ, VOCAB, AdvTrainer, OrderedTrainer,  # noqa: E402,F401
                        ScalerSpyTrainer, assert_params_differ, assert_same_params, collate, cpu_grad_scaler,
                        TRLStyleTrainer, dataset, frozen_embedding_bert, install_scaler, lora_bert, needs_ddp_opt_in,
                        record_no_sync, run_ddp_worker, run_trainer, targs, trainer_divides_by_ga)
from models import tiny_bert_cls  # noqa: E402

# -- the oracle: hand-written loops with the community classes ---------------------------------


def reference_loop(method, steps=3, ga=1, perturb_from="micro_batch", divide_by_ga=True, scaler=None,
                   autocast=None, start_step=0, model=None, params=None, emb_name="word_embeddings",
                   K=PGD_K, data=None, bs=BS, **kw):
    """``steps`` optimizer steps of ``ga`` micro-batches each, the community usage of each method
    (docs/methods.md §1 (FGM) to §4 (AWP (Kaggle))) per micro-batch, SGD.
    perturb_from="micro_batch": every micro-batch runs on zeroed grads and its resulting grads are
    summed afterwards (an order-free formulation of
    "perturb from this micro-batch's gradient"); "accumulated": the community loop pasted into a
    GA loop (grads accumulate in .grad across micro-batches), except that AWP discards only this
    micro-batch's clean grad."""
    model = tiny_bert_cls(seed=0, vocab=VOCAB) if model is None else model
    model.train()
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=LR)
    kwargs = dict(KW.get(method, {}))
    kwargs.update(kw)
    data = dataset() if data is None else data
    div = ga if divide_by_ga else 1
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext

    def loss_fn(batch):
        with ctx():
            return model(**batch).loss / div

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    adv = None
    if method in ("fgm", "fgsm"):
        adv = getattr(reference, method.upper())(model, emb_name=emb_name, **kwargs)
    elif method == "pgd":
        adv = reference.PGD(model, emb_name=emb_name, **kwargs)
    elif method == "awp":
        adv = reference.AWP(model, opt, autocast=False, **kwargs)

    for s in range(steps):
        acc = {}
        for j in range(ga):
            batch = collate(data[(s * ga + j) * bs:(s * ga + j + 1) * bs])
            if perturb_from == "micro_batch":
                model.zero_grad(set_to_none=True)     # (not opt.zero_grad: params outside the optimizer too)
            earlier = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
            backward(loss_fn(batch))
            if adv is None or s < start_step:
                pass
            elif method in ("fgm", "fgsm"):
                adv.attack()
                backward(loss_fn(batch))
                adv.restore()
            elif method == "pgd":
                adv.backup_grad()
                for t in range(K):
                    adv.attack(is_first_attack=(t == 0))
                    if t != K - 1:
                        model.zero_grad()
                    else:
                        adv.restore_grad()
                    backward(loss_fn(batch))
                adv.restore()
            elif method == "awp":
                # The Kaggle steps (_save, _attack_step, zero, backward, _restore); "zero" keeps the
                # earlier micro-batches' grads (none in micro_batch mode) for the final backward.
                adv._save()
                for i in range(adv.adv_step):
                    adv._attack_step()
                    loss = loss_fn(batch)
                    last = i == adv.adv_step - 1
                    for p in model.parameters():
                        p.grad = earlier[p].clone() if (last and p in earlier) else None
                    backward(loss)
                adv._restore()
            if perturb_from == "micro_batch":
                for p in model.parameters():
                    if p.grad is not None:
                        acc[p] = acc[p] + p.grad if p in acc else p.grad.clone()
        if perturb_from == "micro_batch":
            for p in model.parameters():
                p.grad = acc.get(p)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        model.zero_grad(set_to_none=True)
    return model




# -- tests -----------------------------------------------------------------------------------


def test_plain_trainer_matches_hand_loop(tmp_path):
    """The harness itself: a plain Trainer run (GA=2) equals the hand loop with no attack, with
    the GA scaling the installed Trainer applies to this model."""
    tr = run_trainer(tmp_path, None, steps=2, ga=2, trainer_cls=OrderedTrainer)
    divides = not (tr.model_accepts_loss_kwargs and tr.compute_loss_func is None) or \
        getattr(tr, "loss_is_scaled_for_ga", None) is False
    assert_same_params(tr.model, reference_loop(None, steps=2, ga=2, divide_by_ga=divides))


@pytest.mark.parametrize("method", ["fgm", "fgsm", "pgd", "awp"])
def test_method_matches_reference_loop(tmp_path, method):
    tr = run_trainer(tmp_path, method, steps=2)
    expected = reference_loop(method, steps=2)
    assert_same_params(tr.model, expected)
    assert_params_differ(expected, reference_loop(None, steps=2))


@pytest.mark.parametrize("method,perturb_from", [("fgm", "micro_batch"), ("fgm", "accumulated"),
                                                 ("pgd", "micro_batch"), ("awp", "micro_batch"),
                                                 ("awp", "accumulated")])
def test_gradient_accumulation(tmp_path, method, perturb_from):
    extra = {"adv_step": 2} if method == "awp" else {}     # several AWP steps: the hand-back point matters
    tr = run_trainer(tmp_path, method, steps=2, ga=2, perturb_from=perturb_from, **extra)
    expected = reference_loop(method, steps=2, ga=2, perturb_from=perturb_from,
                              divide_by_ga=trainer_divides_by_ga(tr), **extra)
    assert_same_params(tr.model, expected)
    if perturb_from == "accumulated":   # the option must matter, or this test could not tell them apart
        assert_params_differ(expected, reference_loop(method, steps=2, ga=2, perturb_from="micro_batch",
                                                      divide_by_ga=trainer_divides_by_ga(tr), **extra))


def test_gradient_accumulation_when_trainer_divides(tmp_path):
    """The other GA convention (the Trainer divides the loss by the GA steps: models without loss
    kwargs, older transformers): the adversarial pass must be divided the same way."""
    def no_loss_kwargs(tr):
        tr.model_accepts_loss_kwargs = False
    tr = run_trainer(tmp_path, "pgd", steps=2, ga=2, setup=no_loss_kwargs)
    assert trainer_divides_by_ga(tr)
    assert_same_params(tr.model, reference_loop("pgd", steps=2, ga=2, divide_by_ga=True))


@pytest.mark.parametrize("method", ["fgm", "awp"])
def test_grad_scaler_both_passes_scaled_no_unscale(tmp_path, method):
    from torch.amp.grad_scaler import OptState
    tr = run_trainer(tmp_path, method, steps=2, trainer_cls=ScalerSpyTrainer, setup=install_scaler(2.0 ** 12))
    assert all(s in (None, OptState.READY) for s in tr.stages), tr.stages
    expected = reference_loop(method, steps=2, scaler=cpu_grad_scaler(2.0 ** 12))
    assert_same_params(tr.model, expected)
    assert tr.accelerator.scaler.get_scale() == 2.0 ** 12      # no step was skipped


@pytest.mark.parametrize("method", ["fgm", "awp"])
def test_grad_scaler_nonfinite_grad_does_not_poison_weights(tmp_path, method):
    """An fp16-style overflow in the clean gradient (inf in the embedding row of a token of the
    batch): the perturbation becomes non-finite (an inf norm is not skipped, docs/methods.md
    §1 (FGM), §4 (AWP (Kaggle))), so the adversarial loss and gradients do; the weights are
    restored bit for bit, the scaler finds the inf/NaN, skips the step and backs off: the weights
    are never poisoned."""
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    emb = model.get_input_embeddings().weight
    row = int(dataset()[0]["input_ids"][0])     # a token of the first batch
    calls = []

    def overflow_on_first_clean_pass(grad):
        calls.append(1)
        if len(calls) == 1:                  # the first backward of the run: the clean pass
            grad = grad.clone()
            grad[row] = float("inf")
        return grad

    emb.register_hook(overflow_on_first_clean_pass)
    tr = run_trainer(tmp_path, method, steps=1, model=model, trainer_cls=ScalerSpyTrainer,
                     setup=install_scaler(2.0 ** 12))
    assert calls, "the hook never ran: the test could not fail"
    for n, p in tr.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed by a skipped step"
    assert tr.accelerator.scaler.get_scale() == 2.0 ** 11      # found_inf: backed off once
    assert not tr.adversary.is_attacked


def test_bf16_autocast_both_passes(tmp_path):
    """bf16 (CPU autocast through accelerate) applies to the clean and the adversarial forward."""
    flags = []

    def setup(tr):
        def record(module, args):
            flags.append(torch.is_autocast_enabled("cpu") if _autocast_takes_device() else
                         torch.is_autocast_cpu_enabled())
        tr.model.bert.embeddings.register_forward_pre_hook(record)

    saved = os.environ.get("ACCELERATE_MIXED_PRECISION")
    try:
        tr = run_trainer(tmp_path, "fgm", steps=2, setup=setup, args_kw={"bf16": True})
    finally:
        # transformers 4.x's TrainingArguments(bf16=True) exports ACCELERATE_MIXED_PRECISION=bf16 and
        # accelerate keeps a process-wide state: without this the following tests' Trainers run bf16
        if saved is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = saved
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
    assert flags == [True] * 4                 # 2 steps x (clean + adversarial)
    expected = reference_loop("fgm", steps=2, autocast=torch.bfloat16)
    # Same ops under the same autocast: the runs agree to bf16 rounding of the activations, which
    # the fp32 master weights only see through the gradients (observed ~1e-7; bf16 eps is 8e-3).
    assert_same_params(tr.model, expected, rtol=1e-3)


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
        return True
    except TypeError:
        return False


@pytest.mark.parametrize("method,kw,expected", [
    ("fgm", {}, [True, False]),
    ("pgd", {"K": 3}, [True, True, True, False]),
    ("awp", {"adv_step": 2}, [True, True, False]),
])
def test_clean_pass_no_sync(tmp_path, method, kw, expected):
    """clean_pass_no_sync: the passes that only feed a direction run under accelerator.no_sync,
    the final backward of the step is synchronised (recorded at every forward)."""
    seen = []
    setup = record_no_sync(seen)
    run_trainer(tmp_path, method, steps=1, setup=setup, clean_pass_no_sync=True, **kw)
    assert seen == expected
    if method == "pgd":                       # and by default every pass synchronises
        seen.clear()
        run_trainer(tmp_path, method, steps=1, setup=setup, **kw)
        assert seen == [False] * len(expected)


def tiny_gpt2_cls():
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg)


def test_embedding_from_get_input_embeddings(tmp_path):
    """No emb_name: GPT-2's embedding is 'transformer.wte.weight' (no 'word_embeddings' in it); the
    mixin finds it with get_input_embeddings() and matches the reference run with emb_name='wte'."""
    tr = run_trainer(tmp_path, "fgm", steps=2, model=tiny_gpt2_cls())
    assert tr.adversary.emb_name == "transformer.wte.weight"
    expected = reference_loop("fgm", steps=2, model=tiny_gpt2_cls(), emb_name="wte")
    assert_same_params(tr.model, expected)
    assert_params_differ(expected, reference_loop(None, steps=2, model=tiny_gpt2_cls()))


def mlm_data(n=8):
    rows = dataset(n)
    for r in rows:
        r["labels"] = torch.where(torch.arange(SEQ) % 3 == 0, r["input_ids"], torch.full((SEQ,), -100))
    return rows


def tiny_bert_mlm():
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg)


def test_tied_embeddings_refused_or_shared(tmp_path):
    m = tiny_bert_mlm()
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight   # the premise
    with pytest.raises(ValueError, match="tied"):
        run_trainer(tmp_path, "fgm", steps=1, model=m, data=mlm_data())
    tr = run_trainer(tmp_path, "fgm", steps=2, model=tiny_bert_mlm(), data=mlm_data(), tied_embeddings="shared")
    # "shared" = what the community class does: the one matrix (input and output) is perturbed
    assert_same_params(tr.model, reference_loop("fgm", steps=2, model=tiny_bert_mlm(), data=mlm_data()))


def test_frozen_embeddings_refused_or_unfrozen(tmp_path):
    with pytest.raises(ValueError, match="frozen.*PEFT"):
        run_trainer(tmp_path, "pgd", steps=1, model=frozen_embedding_bert())
    tr = run_trainer(tmp_path, "pgd", steps=2, model=frozen_embedding_bert(), frozen_embeddings="unfreeze")
    emb = tr.model.get_input_embeddings().weight
    assert not emb.requires_grad and emb.grad is None
    assert torch.equal(emb.detach(), frozen_embedding_bert().get_input_embeddings().weight.detach())
    # oracle: the embedding trainable for the attack but outside the optimizer
    ref = tiny_bert_cls(seed=0, vocab=VOCAB)
    params = [p for n, p in ref.named_parameters() if "word_embeddings" not in n]
    assert_same_params(tr.model, reference_loop("pgd", steps=2, model=ref, params=params))


def test_peft_lora(tmp_path):
    """A real PEFT model: FGM is refused (frozen embedding) with the explanation; AWP perturbs the
    trainable weights (LoRA A/B, the classifier) and matches the reference loop."""
    with pytest.raises(ValueError, match="frozen"):
        run_trainer(tmp_path, "fgm", steps=1, model=lora_bert())
    tr = run_trainer(tmp_path, "awp", steps=2, model=lora_bert(), args_kw={"label_names": ["labels"]})
    expected = reference_loop("awp", steps=2, model=lora_bert())
    assert_same_params(tr.model, expected)
    assert_params_differ(expected, reference_loop(None, steps=2, model=lora_bert()))


def test_start_step_and_start_epoch(tmp_path):
    tr = run_trainer(tmp_path, "fgm", steps=3, start_step=2)
    assert_same_params(tr.model, reference_loop("fgm", steps=3, start_step=2))
    # AWP start_epoch=1 over 2 epochs of 2 steps: the first epoch is plain (steps 0, 1)
    data = dataset(2 * BS)
    tr = run_trainer(tmp_path, "awp", steps=-1, data=data, start_epoch=1, args_kw={"num_train_epochs": 2})
    assert tr.state.global_step == 4
    assert_same_params(tr.model, reference_loop("awp", steps=4, start_step=2, data=data + data))


def test_logged_loss_is_clean_and_adv_loss_logged(tmp_path):
    tr = run_trainer(tmp_path, "fgm", steps=1)
    log = next(entry for entry in tr.state.log_history if "loss" in entry)
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    batch = collate(dataset()[:BS])
    clean = model(**batch).loss
    clean.backward()
    fgm = reference.FGM(model, **KW["fgm"])
    fgm.attack()
    adv = model(**batch).loss.item()
    assert log["loss"] == pytest.approx(clean.item(), abs=1e-4)    # transformers 4.x rounds it
    assert log["adv_loss"] == pytest.approx(adv, rel=1e-5)
    assert adv > clean.item()                  # the attack does increase the loss (first order)


def test_make_adversarial_on_trl_style_subclass(tmp_path):
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    tr = TRLStyleTrainer(model=model, args=targs(tmp_path, 2), train_dataset=dataset())
    tr.counts = {"prepare": 0, "step": 0, "loss": 0}
    out = make_adversarial(tr, "pgd", K=2, **KW["pgd"])
    assert out is tr and isinstance(tr, TRLStyleTrainer) and isinstance(tr, AdversarialTrainerMixin)
    assert type(tr).__name__ == "AdversarialTRLStyleTrainer"
    tr.train()
    assert tr.counts == {"prepare": 2, "step": 2, "loss": 2 * 3}   # once, once, clean + K passes
    assert_same_params(tr.model, reference_loop("pgd", steps=2, K=2))


class FailingAdversarialPass(AdvTrainer):
    calls = 0

    def compute_loss(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 2:               # the first adversarial pass
            raise RuntimeError("boom in the adversarial forward")
        return super().compute_loss(*args, **kwargs)


@pytest.mark.parametrize("method", ["fgm", "pgd", "awp"])
def test_exception_in_adversarial_pass_restores(tmp_path, method):
    FailingAdversarialPass.calls = 0
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = FailingAdversarialPass(model=model, args=targs(tmp_path, 1), train_dataset=dataset(),
                                adversarial=method, adversarial_kwargs=KW[method])
    with pytest.raises(RuntimeError, match="boom"):
        tr.train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert not tr.adversary.is_attacked
    if method == "pgd":
        assert not tr.adversary._grads_aside      # the clean grads were handed back


def test_make_adversarial_reconfigures_and_turns_off(tmp_path):
    tr = AdvTrainer(model=tiny_bert_cls(seed=0, vocab=VOCAB), args=targs(tmp_path, 1), train_dataset=dataset(),
                    adversarial="fgm")
    cls = type(tr)
    assert make_adversarial(tr, "awp", adv_lr=0.1) is tr and type(tr) is cls   # no second subclass
    assert tr.adversarial == "awp" and tr.adversarial_kwargs == {"adv_lr": 0.1}
    tr.configure_adversarial(None)
    assert tr.adversarial is None
    before = tiny_bert_cls(seed=0, vocab=VOCAB)
    tr.train()                                   # a plain step now
    assert tr.adversary is None
    assert_same_params(tr.model, reference_loop(None, steps=1, model=before))


def test_config_errors():
    with pytest.raises(ValueError, match="expected one of"):
        AdvTrainer(adversarial="vat")
    with pytest.raises(TypeError, match="unknown"):
        AdvTrainer(adversarial="fgm", adversarial_kwargs={"epsilonn": 1.0})
    with pytest.raises(TypeError, match="PGD option"):
        AdvTrainer(adversarial="fgm", adversarial_kwargs={"K": 2})
    with pytest.raises(ValueError, match="perturb_from"):
        AdvTrainer(adversarial="awp", adversarial_kwargs={"perturb_from": "both"})


@needs_ddp_opt_in
def test_ddp_two_processes(tmp_path):
    """Real DDP (2 CPU processes, gloo) through torch.distributed.run, FGM, 2 steps; rank r gets
    batch 2s+r at step s.  Default: the clean pass all-reduces, so both ranks perturb along the
    global clean gradient: the same as ONE process on the union batch.  clean_pass_no_sync=True:
    the clean pass stays local (one all-reduce per step), each rank perturbs along its own
    gradient, and the all-reduce of the final backward averages clean + adversarial over ranks:
    the same as one process with GA=2 over the two batches in micro_batch mode."""
    res = run_ddp_worker(tmp_path, "fgm")
    assert res[False]["world"] == 2
    # every backward all-reduces by default; with the option the clean passes do not
    assert res[False]["seen"] == [True, True] * 2
    assert res[True]["seen"] == [False, True] * 2
    union = reference_loop("fgm", steps=2, bs=2 * BS)
    local = reference_loop("fgm", steps=2, ga=2, divide_by_ga=True)
    for no_sync, expected in ((False, union), (True, local)):
        got = res[no_sync]["params"]
        for name, p in expected.named_parameters():
            err = (got[name] - p.detach()).abs().max().item() / max(p.detach().abs().max().item(), 1e-3)
            assert err <= RTOL, f"no_sync={no_sync} {name}: relative error {err:.3g}"
    assert_params_differ(union, local)         # the two modes really differ
