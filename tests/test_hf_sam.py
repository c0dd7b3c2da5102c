"""fused_adv.integrations.hf with adversarial="sam" | "asam" (docs/hf.md, "sam / asam"): the Trainer
against hand-written loops with fused_adv.reference.SAM (davda54's class) wrapped around the same
SGD (tests/hf_harness.py: plain SGD, constant lr, so a wrong gradient shows in the weights);
gradient accumulation, clipping of the second gradient, a GradScaler, the DDP no-sync option."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fused_adv  # noqa: E402
from fused_adv import reference  # noqa: E402
from hf_harness import (BS, LR, RTOL, VOCAB, AdvTrainer, ScalerSpyTrainer, assert_params_differ,  # noqa: E402
                        assert_same_params, collate, cpu_grad_scaler, dataset, install_scaler, needs_ddp_opt_in,
                        record_no_sync, run_ddp_worker, run_trainer, trainer_divides_by_ga)
from models import tiny_bert_cls  # noqa: E402

RHO = {"sam": 0.5, "asam": 2.0}  # large enough on this tiny model that the climb changes the gradient


def sam_reference_loop(method, steps=2, ga=1, divide_by_ga=True, clip=None, scaler=None, bs=BS,
                       perturb_from="micro_batch", rho=None):
    """``steps`` SGD steps with the reference SAM around SGD, ``ga`` micro-batches each: per
    micro-batch clean backward -> first_step -> backward at w + e(w) -> restore; the second
    gradients are summed (micro_batch: each micro-batch climbs from its own gradient;
    accumulated: from the gradient summed so far); then clip and step (through the scaler)."""
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    model.train()
    if method is None:
        sam = None
        opt = torch.optim.SGD(model.parameters(), lr=LR)
    else:
        sam = reference.SAM(model.parameters(), torch.optim.SGD, rho=RHO[method] if rho is None else rho,
                            adaptive=method == "asam", lr=LR)
        opt = sam.base_optimizer
    data = dataset()
    div = ga if divide_by_ga else 1

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    for s in range(steps):
        acc = {}
        for j in range(ga):
            batch = collate(data[(s * ga + j) * bs:(s * ga + j + 1) * bs])
            model.zero_grad(set_to_none=True)
            backward(model(**batch).loss / div)
            if sam is not None:
                if perturb_from == "accumulated":
                    for p in model.parameters():
                        if p in acc:
                            p.grad = p.grad + acc[p]
                sam.first_step(zero_grad=True)
                backward(model(**batch).loss / div)
                for group in sam.param_groups:              # second_step's restore, without the step
                    for p in group["params"]:
                        if p.grad is not None:
                            p.data = sam.state[p]["old_p"]
            for p in model.parameters():
                if p.grad is not None:
                    acc[p] = acc[p] + p.grad if p in acc else p.grad.clone()
        for p in model.parameters():
            p.grad = acc.get(p)
        if scaler is not None:
            if clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_trainer_matches_reference_loop(tmp_path, method):
    tr = run_trainer(tmp_path, method, steps=2, rho=RHO[method])
    expected = sam_reference_loop(method)
    assert_same_params(tr.model, expected)
    assert_params_differ(expected, sam_reference_loop(None))
    assert isinstance(tr.adversary, fused_adv.SAM) and not tr.adversary.is_perturbed
    # the Trainer's own optimizer is the base optimizer, its groups shared
    assert tr.adversary.base_optimizer is tr.optimizer.optimizer
    assert tr.adversary.param_groups is tr.optimizer.optimizer.param_groups


@pytest.mark.parametrize("perturb_from", ["micro_batch", "accumulated"])
def test_gradient_accumulation(tmp_path, perturb_from):
    tr = run_trainer(tmp_path, "sam", steps=2, ga=2, rho=RHO["sam"], perturb_from=perturb_from)
    div = trainer_divides_by_ga(tr)
    expected = sam_reference_loop("sam", steps=2, ga=2, divide_by_ga=div, perturb_from=perturb_from)
    assert_same_params(tr.model, expected)
    if perturb_from == "accumulated":
        assert_params_differ(expected, sam_reference_loop("sam", steps=2, ga=2, divide_by_ga=div))


def test_clipping_applies_to_the_second_gradient(tmp_path):
    tr = run_trainer(tmp_path, "asam", steps=2, rho=RHO["asam"], args_kw={"max_grad_norm": 0.05})
    expected = sam_reference_loop("asam", clip=0.05)
    assert_same_params(tr.model, expected)
    assert_params_differ(expected, sam_reference_loop("asam"))  # the clip binds


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_grad_scaler_clean_pass_scaled_no_unscale(tmp_path, method):
    """The clean gradient reaches first_step SCALED (no unscale_ in the step: the climb is
    scale-invariant); the second one is unscaled by the Trainer's scaler.step.  (No clipping here:
    on CPU accelerate unscales before clipping only for its own fp16 mode, which the harness's
    installed scaler is not; the clip-after-unscale order is tested on the class, in
    tests/test_sam.py::test_grad_scaler_loop_equals_unscaled_run.)"""
    from torch.amp.grad_scaler import OptState
    tr = run_trainer(tmp_path, method, steps=2, rho=RHO[method], trainer_cls=ScalerSpyTrainer,
                     setup=install_scaler(2.0 ** 12))
    assert all(s in (None, OptState.READY) for s in tr.stages), tr.stages
    expected = sam_reference_loop(method, scaler=cpu_grad_scaler(2.0 ** 12))
    assert_same_params(tr.model, expected)
    assert_same_params(tr.model, sam_reference_loop(method))   # = the unscaled run
    assert tr.accelerator.scaler.get_scale() == 2.0 ** 12


def test_nonfinite_clean_gradient_skips_the_climb(tmp_path):
    """An inf in the clean gradient: the climb is skipped on the device (the second pass runs at w,
    weights never NaN), recorded at every forward."""
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    emb = model.get_input_embeddings().weight
    row = int(dataset()[0]["input_ids"][0])
    calls, sums = [], []

    def overflow_on_first_clean_pass(grad):
        calls.append(1)
        if len(calls) == 1:
            grad = grad.clone()
            grad[row] = float("inf")
        return grad

    emb.register_hook(overflow_on_first_clean_pass)
    model.register_forward_pre_hook(lambda m, a: sums.append(emb.detach().double().sum().item()))
    tr = run_trainer(tmp_path, "sam", steps=1, model=model, rho=RHO["sam"], trainer_cls=ScalerSpyTrainer,
                     setup=install_scaler(2.0 ** 12))
    assert calls and len(sums) == 2 and sums[0] == sums[1], sums
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert not tr.adversary.is_perturbed


def test_clean_pass_no_sync_option(tmp_path):
    seen = []
    run_trainer(tmp_path, "sam", steps=1, setup=record_no_sync(seen), clean_pass_no_sync=True)
    assert seen == [True, False]          # the clean pass skips the all-reduce, the second does not
    seen.clear()
    run_trainer(tmp_path, "sam", steps=1, setup=record_no_sync(seen))
    assert seen == [False, False]


def test_exception_in_second_pass_restores(tmp_path):
    model = tiny_bert_cls(seed=0, vocab=VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forwards = []

    def fail_second(m, a):
        forwards.append(1)
        if len(forwards) == 2:
            raise RuntimeError("boom in the second pass")

    model.register_forward_pre_hook(fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        run_trainer(tmp_path, "sam", steps=1, model=model, rho=RHO["sam"])
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_config_errors():
    with pytest.raises(ValueError, match="rho"):
        AdvTrainer(adversarial="sam", adversarial_kwargs={"rho": -1.0})
    with pytest.raises(TypeError, match="unknown"):
        AdvTrainer(adversarial="asam", adversarial_kwargs={"epsilon": 1.0})
    with pytest.raises(TypeError, match="PGD option"):
        AdvTrainer(adversarial="sam", adversarial_kwargs={"K": 2})


@needs_ddp_opt_in
def test_ddp_two_processes(tmp_path):
    """Real DDP (2 CPU processes, gloo), SAM, 2 steps; rank r gets batch 2s+r at step s.  Default:
    the clean pass all-reduces, both ranks climb along the global gradient: one process on the
    union batch.  clean_pass_no_sync=True: each rank climbs along its own gradient (m-sharpness),
    the second pass all-reduces: one process with GA=2 over the two batches."""
    res = run_ddp_worker(tmp_path, "sam")
    assert res[False]["world"] == 2
    assert res[False]["seen"] == [True, True] * 2
    assert res[True]["seen"] == [False, True] * 2
    union = sam_reference_loop("sam", bs=2 * BS, rho=0.05)
    local = sam_reference_loop("sam", ga=2, divide_by_ga=True, rho=0.05)
    for no_sync, expected in ((False, union), (True, local)):
        got = res[no_sync]["params"]
        for name, p in expected.named_parameters():
            err = (got[name] - p.detach()).abs().max().item() / max(p.detach().abs().max().item(), 1e-3)
            assert err <= RTOL, f"no_sync={no_sync} {name}: relative error {err:.3g}"
    assert_params_differ(union, local)
