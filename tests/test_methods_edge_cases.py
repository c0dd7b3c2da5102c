"""Edge cases of the fused classes: None/zero/NaN/Inf grads, tied embeddings, unknown names,
out-of-order calls and exceptions in the middle of an attack (weights always restored)."""
import copy

import pytest
import torch

import fused_adv
from fused_adv import reference
from loops import loss_of
from models import ToyBert, batch


def toy(device, **kw):
    torch.manual_seed(0)
    return ToyBert(**kw).to(device)


def emb(model):
    return model.embeddings.word_embeddings.weight


@pytest.mark.parametrize("cls", ["FGM", "FGSM", "PGD"])
@pytest.mark.parametrize("grad_kind", ["none", "zero", "nan", "inf"])
def test_special_grads_match_reference(cls, grad_kind, device_backend):
    device, backend = device_backend
    m_ref, m_fus = toy(device), toy(device)
    grad = None
    if grad_kind != "none":
        grad = torch.randn_like(emb(m_ref)) if grad_kind != "zero" else torch.zeros_like(emb(m_ref))
        if grad_kind in ("nan", "inf"):
            grad[3, 5] = float(grad_kind)
    for m in (m_ref, m_fus):
        emb(m).grad = None if grad is None else grad.clone()
    ref = getattr(reference, cls)(m_ref)
    fus = getattr(fused_adv, cls)(m_fus, backend=backend)
    before = emb(m_fus).detach().clone()
    kwargs = {"is_first_attack": True} if cls == "PGD" else {}
    ref.attack(**kwargs)
    if grad_kind == "none":
        # the community class silently moves nothing; the fused one says why (docs/methods.md §10)
        with pytest.raises(fused_adv.NoGradientError, match="before loss.backward"):
            fus.attack(**kwargs)
        assert not fus.is_attacked and torch.equal(emb(m_fus), before) and torch.equal(emb(m_ref), before)
        return
    fus.attack(**kwargs)
    torch.testing.assert_close(emb(m_fus), emb(m_ref), equal_nan=True, rtol=2e-5, atol=1e-6)
    if grad_kind in ("zero", "nan") and cls != "FGSM":
        assert torch.equal(emb(m_fus), before)  # skipped tensors are untouched, bit for bit
    fus.restore()
    assert torch.equal(emb(m_fus), before)


def test_tied_embeddings_perturbed_once_restored_once(device_backend):
    device, backend = device_backend
    m_ref, m_fus = toy(device, tie=True), toy(device, tie=True)
    assert m_fus.lm_head.weight is emb(m_fus)
    data = [t.to(device) for t in batch(0)]
    for m in (m_ref, m_fus):
        loss_of(m, data).backward()
    before = emb(m_fus).detach().clone()
    ref, fus = reference.FGM(m_ref, epsilon=0.3), fused_adv.FGM(m_fus, epsilon=0.3, backend=backend)
    ref.attack()
    fus.attack()
    g = emb(m_fus).grad
    torch.testing.assert_close(emb(m_fus), before + 0.3 * g / g.norm())  # once, not twice
    torch.testing.assert_close(emb(m_fus), emb(m_ref))
    fus.restore()
    assert torch.equal(emb(m_fus), before)


def test_awp_tied_weights_selected_once(device_backend):
    device, backend = device_backend
    m = toy(device, tie=True)
    awp = fused_adv.AWP(m, torch.optim.SGD(m.parameters(), lr=0.1), backend=backend, autocast=False)
    loss_of(m, [t.to(device) for t in batch(0)]).backward()
    awp.attack_step(first=True)
    assert sum(p is emb(m) for p, _ in awp._attacked) == 1
    awp.restore()


@pytest.mark.parametrize("cls", ["FGM", "FGSM", "PGD"])
def test_unknown_emb_name_is_a_clear_error(cls):
    m = toy("cpu")
    loss_of(m, batch(0)).backward()
    adv = getattr(fused_adv, cls)(m, emb_name="word_embedding_typo") if cls != "PGD" else \
        fused_adv.PGD(m, emb_name="word_embedding_typo")
    kwargs = {"is_first_attack": True} if cls == "PGD" else {}
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight"):
        adv.attack(**kwargs)
    # the community class silently does nothing: the reason we raise
    ref = reference.FGM(m, emb_name="word_embedding_typo")
    ref.attack()
    assert ref.backup == {}


def test_unknown_adv_param_is_a_clear_error():
    m = toy("cpu")
    loss_of(m, batch(0)).backward()
    awp = fused_adv.AWP(m, torch.optim.SGD(m.parameters(), lr=0.1), adv_param="kernel", autocast=False)
    with pytest.raises(ValueError, match="adv_param='kernel' matches no trainable parameter"):
        awp.attack_backward(closure=lambda: loss_of(m, batch(0)), epoch=0)


@pytest.mark.parametrize("cls", ["FGM", "FGSM", "PGD"])
def test_out_of_order_calls(cls):
    m = toy("cpu")
    loss_of(m, batch(0)).backward()
    adv = getattr(fused_adv, cls)(m)
    with pytest.raises(fused_adv.AttackStateError, match="without a prior attack"):
        adv.restore()
    if cls == "PGD":
        with pytest.raises(fused_adv.AttackStateError, match="before a first attack"):
            adv.attack()
        adv.attack(is_first_attack=True)
        with pytest.raises(fused_adv.AttackStateError):
            adv.attack(is_first_attack=True)
    else:
        adv.attack()
        with pytest.raises(fused_adv.AttackStateError, match="twice"):
            adv.attack()
    adv.restore()
    with pytest.raises(fused_adv.AttackStateError):
        fused_adv.AWP(m, None).restore()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", ["FGM", "PGD", "AWP"])
def test_swap_restore_is_bit_exact_and_reuses_buffers(cls, dtype):
    m = toy("cpu").to(dtype)
    data = batch(0)
    before = copy.deepcopy(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    adv = fused_adv.AWP(m, opt, autocast=False, restore_mode="swap") if cls == "AWP" else \
        getattr(fused_adv, cls)(m, restore_mode="swap")
    held = set()
    for _ in range(4):
        m.zero_grad()
        loss_of(m, data).backward()
        if cls == "AWP":
            adv.attack_backward(closure=lambda: loss_of(m, data), epoch=0)
        else:
            adv.attack(**({"is_first_attack": True} if cls == "PGD" else {}))
            adv.restore()
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        held.add(emb(m).data_ptr())
    assert len(held) == 2  # two storages alternate: nothing new is allocated in steady state
    with pytest.raises(ValueError, match="restore_mode"):
        fused_adv.FGM(m, restore_mode="pointer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exception_inside_awp_adversarial_pass_restores_weights(dtype, device_backend):
    device, backend = device_backend
    m = toy(device).to(dtype)
    data = [t.to(device) for t in batch(0)]
    loss_of(m, data).backward()
    before = copy.deepcopy(m.state_dict())
    awp = fused_adv.AWP(m, torch.optim.SGD(m.parameters(), lr=0.1), adv_lr=1.0, adv_eps=0.5, adv_step=2,
                        backend=backend, autocast=False)
    calls = []

    def exploding_closure():
        calls.append(1)
        if len(calls) == 2:  # fail in the middle: after the second perturbation step
            raise RuntimeError("CUDA out of memory (simulated)")
        return loss_of(m, data)

    with pytest.raises(RuntimeError, match="simulated"):
        awp.attack_backward(closure=exploding_closure, epoch=0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not awp.is_attacked
    # and the object is usable again afterwards
    loss_of(m, data).backward()
    awp.attack_backward(closure=lambda: loss_of(m, data), epoch=0)


@pytest.mark.parametrize("cls", ["FGM", "FGSM", "PGD"])
def test_exception_inside_perturbed_block_restores_weights(cls, device_backend):
    device, backend = device_backend
    m = toy(device)
    loss_of(m, [t.to(device) for t in batch(0)]).backward()
    before = emb(m).detach().clone()
    adv = getattr(fused_adv, cls)(m, backend=backend)
    with pytest.raises(KeyError):
        with adv.perturbed():
            assert not torch.equal(emb(m), before)
            raise KeyError("boom")
    assert torch.equal(emb(m), before)
    assert not adv.is_attacked


def test_awp_kaggle_call_convention_and_tuple_outputs():
    torch.manual_seed(0)
    m_ref, m_fus = ToyBert(), ToyBert()
    m_fus.load_state_dict(m_ref.state_dict())
    ids, mask, labels = batch(3)
    results = []
    for m, mod in ((m_ref, reference), (m_fus, fused_adv)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        awp = mod.AWP(m, opt, adv_lr=0.5, adv_eps=0.05, autocast=False)
        opt.zero_grad()
        loss_of(m, (ids, mask, labels)).backward()
        results.append(awp.attack_backward(ids, labels, mask, epoch=0))  # (x, y, attention_mask, epoch)
        opt.step()
    torch.testing.assert_close(results[1], results[0].detach())
    for p, q in zip(m_ref.parameters(), m_fus.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-6)


def test_awp_skips_and_memory_is_one_backup():
    m = toy("cpu")
    loss_of(m, batch(0)).backward()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert fused_adv.AWP(m, opt, start_epoch=1).attack_backward(closure=lambda: loss_of(m, batch(0)), epoch=0) is None
    awp = fused_adv.AWP(m, opt, autocast=False)
    awp.attack_backward(closure=lambda: loss_of(m, batch(0)), epoch=0)
    perturbed = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "weight" in n)
    assert awp.extra_memory_bytes() == perturbed  # one copy; the Kaggle class keeps three


def test_pgd_backup_grad_sets_aside_without_copy():
    m = toy("cpu")
    loss_of(m, batch(0)).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    pgd = fused_adv.PGD(m)
    pgd.backup_grad()
    assert all(p.grad is None for p in m.parameters())
    pgd.attack(is_first_attack=True)  # reads the set-aside clean gradient
    pgd.restore_grad()
    assert all(p.grad is grads[n] for n, p in m.named_parameters())  # the same tensors, not copies
    pgd.restore()
