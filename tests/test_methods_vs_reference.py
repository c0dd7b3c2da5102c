"""Every fused drop-in class, on every backend that can run here, against the reference classes:
same training trajectory in fp32 (2e-5 relative), the tolerance rule (tests/tolerance.py) in
fp16/bf16 against a float64 run, and bit-exact restore in every dtype."""
import copy

import pytest
import torch

from loops import METHODS, loss_of, make_adversary, train_step
from models import ToyBert, batch, tiny_bert_cls
from tolerance import FP32_TRAINING_RTOL, assert_close_to_oracle

STEPS = 3


def run(method, model, *, fused, backend="auto", steps=STEPS, seed0=0, vocab=50, classes=3, **adv_kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adv = make_adversary(method, model, opt, fused=fused, backend=backend, **adv_kw)
    device = next(model.parameters()).device
    snapshots = []
    for s in range(steps):
        data = [t.to(device) for t in batch(seed0 + s, vocab=vocab, classes=classes)]
        train_step(method, model, opt, adv, data)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots


def assert_same_trajectory(ref_snaps, fused_snaps, names):
    for step, (ref, fus) in enumerate(zip(ref_snaps, fused_snaps)):
        for name, r, f in zip(names, ref, fus):
            tol = FP32_TRAINING_RTOL * max(1.0, r.abs().max().item())
            err = (r - f).abs().max().item()
            assert err <= tol, f"step {step} {name}: max|fused - reference| = {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("method", METHODS)
def test_fp32_toy_training_matches_reference(method, device_backend):
    device, backend = device_backend
    torch.manual_seed(0)
    model = ToyBert().to(device)
    fused_model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    assert_same_trajectory(run(method, model, fused=False), run(method, fused_model, fused=True, backend=backend),
                           names)


@pytest.mark.parametrize("method", METHODS)
def test_restore_by_pointer_swap_matches_reference(method, device_backend):
    """restore_mode="swap" (opt-in): no restore pass, the backups and parameters trade storage."""
    device, backend = device_backend
    torch.manual_seed(0)
    model = ToyBert().to(device)
    fused_model = copy.deepcopy(model)
    emb = fused_model.embeddings.word_embeddings.weight
    ptr_before = emb.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert_same_trajectory(run(method, model, fused=False),
                           run(method, fused_model, fused=True, backend=backend, restore_mode="swap"), names)
    assert emb.data_ptr() != ptr_before or STEPS % 2 == 0  # storage traded at every restore


@pytest.mark.parametrize("method", METHODS)
def test_fp32_tiny_bert_training_matches_reference(method, device_backend):
    device, backend = device_backend
    model = tiny_bert_cls(num_labels=3).to(device)
    fused_model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    assert_same_trajectory(run(method, model, fused=False, vocab=64, steps=2),
                           run(method, fused_model, fused=True, backend=backend, vocab=64, steps=2), names)


@pytest.mark.parametrize("model_kind", ["toy", "bert"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_training_within_tolerance_rule(method, dtype, model_kind, device_backend):
    device, backend = device_backend
    torch.manual_seed(1)
    base = ToyBert() if model_kind == "toy" else tiny_bert_cls(num_labels=3)
    kw = {} if model_kind == "toy" else {"vocab": 64, "steps": 2}
    oracle = run(method, copy.deepcopy(base).double().to(device), fused=False, **kw)
    ref = run(method, copy.deepcopy(base).to(device, dtype), fused=False, **kw)
    fus = run(method, copy.deepcopy(base).to(device, dtype), fused=True, backend=backend, **kw)
    names = [n for n, _ in base.named_parameters()]
    for step in range(len(oracle)):
        for name, o, r, f in zip(names, oracle[step], ref[step], fus[step]):
            assert_close_to_oracle(f, r, o, what=f"{method} {dtype} step {step} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_exact(method, dtype, device_backend):
    device, backend = device_backend
    torch.manual_seed(2)
    model = ToyBert().to(device, dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    adv = make_adversary(method, model, opt, fused=True, backend=backend)
    data = [t.to(device) for t in batch(0)]
    for _ in range(3):  # several attack/restore cycles reuse the same backups
        model.zero_grad()
        loss_of(model, data).backward()
        if method == "awp":
            moved = []
            adv.attack_backward(closure=lambda: (moved.append(
                any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))), loss_of(model, data))[1],
                epoch=0)
            assert all(moved), "AWP did not perturb anything"
        else:
            if method == "pgd":
                adv.attack(is_first_attack=True)
                adv.attack()
            else:
                adv.attack()
            assert not torch.equal(model.embeddings.word_embeddings.weight, before[0])
            adv.restore()
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)
