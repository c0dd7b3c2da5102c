"""FreeAT and YOPO (docs/methods.md §8 (FreeAT and YOPO)): the references pinned on hand-computed
float64 cases, the fused drop-ins against the references on a tiny BERT (every CPU backend this
machine runs), the freeat_update_ op against its float64 statement, and the misuse errors.

Hand-computed cases use a linear toy model (ToyLinear): x = embeds + noise [B, L, E], h = x A^T
(the "first layer"), loss = sum(h * c), so dloss/dx = A^T c at every position, dloss/dh = c, and
every step can be written out by hand.
"""
import copy
import math
import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fused_adv  # noqa: E402
from fused_adv import _shared as S  # noqa: E402
from fused_adv import ops, reference  # noqa: E402
from conftest import backend_fixture  # noqa: E402
from tolerance import assert_close_to_oracle  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "cpp", "triton"]
_device_backend = backend_fixture("freeat_update_", [("cpu", b) for b in BACKENDS])
_device_backend_l2 = backend_fixture("freelb_update_", [("cpu", b) for b in BACKENDS])


@pytest.fixture
def backend(_device_backend):
    return _device_backend[1]


@pytest.fixture
def backend_l2(_device_backend_l2):
    return _device_backend_l2[1]


D = torch.float64


class ToyLinear(nn.Module):
    """x = inputs_embeds (or emb(input_ids)); h = layer0(x) (A, frozen); loss = sum(h * c) over all
    b, l (c [E] trainable): dloss/dx[b, l] = A^T c, dloss/dc = sum_{b,l} h[b, l]."""

    def __init__(self, A, c, vocab=4):
        super().__init__()
        e = len(c)
        self.emb = nn.Embedding(vocab, e).to(D)
        with torch.no_grad():
            self.emb.weight.copy_(torch.arange(vocab * e, dtype=D).view(vocab, e) / 10)
        self.emb.weight.requires_grad_(False)
        self.layer0 = nn.Linear(e, e, bias=False).to(D)
        with torch.no_grad():
            self.layer0.weight.copy_(torch.tensor(A, dtype=D))
        self.layer0.weight.requires_grad_(False)
        self.c = nn.Parameter(torch.tensor(c, dtype=D))
        self.calls = 0

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        self.calls += 1
        x = inputs_embeds if inputs_embeds is not None else self.emb(input_ids)
        h = self.layer0(x)
        return SimpleNamespace(loss=(h * self.c).sum())


def toy_batch(b=2, l=2):
    ids = torch.tensor([[1, 2], [3, 0], [2, 2]])[:b, :l]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


# ----------------------------------------------------------------------- references, by hand
def test_reference_freeat_sign_by_hand():
    # A = I, c = [1, -2]: g = c at every position, sign = [1, -1]; step 0.3, clip 0.5
    model = ToyLinear([[1.0, 0.0], [0.0, 1.0]], [1.0, -2.0])
    fa = reference.FreeAT(adv_steps=2, adv_lr=0.3, adv_max_norm=0.5)
    batch = toy_batch()
    loss0 = fa.replay(model, batch, 0)
    emb = model.emb(batch["input_ids"])
    assert loss0.item() == pytest.approx(((emb) * model.c).sum().item())          # noise starts at 0
    torch.testing.assert_close(fa.noise, torch.tensor([0.3, -0.3], dtype=D).expand(2, 2, 2))
    torch.testing.assert_close(model.c.grad, emb.sum((0, 1)))                      # no loss scaling
    model.c.grad = None
    fa.replay(model, batch, 1)                                                     # 0.6 -> clamped 0.5
    torch.testing.assert_close(fa.noise, torch.tensor([0.5, -0.5], dtype=D).expand(2, 2, 2))
    # a batch of one row (and it persists across batches): only row 0 moves; c = [-1, 1] now
    with torch.no_grad():
        model.c.copy_(torch.tensor([-1.0, 1.0], dtype=D))
    fa.replay(model, toy_batch(b=1), 0)
    want = torch.tensor([[[0.2, -0.2], [0.2, -0.2]], [[0.5, -0.5], [0.5, -0.5]]], dtype=D)
    torch.testing.assert_close(fa.noise, want)


def test_reference_freeat_sign_train_batch_steps_after_every_replay():
    model = ToyLinear([[1.0, 0.0], [0.0, 1.0]], [1.0, -2.0])
    fa = reference.FreeAT(adv_steps=3, adv_lr=0.1, adv_max_norm=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = toy_batch()
    emb = model.emb(batch["input_ids"])
    c = torch.tensor([1.0, -2.0], dtype=D)
    noise = torch.zeros(2, 2, 2, dtype=D)
    want_losses = []
    for _ in range(3):                     # by hand: the loss, c's gradient of THIS replay only, SGD
        x = emb + noise
        want_losses.append((x * c).sum())
        grad_c = x.sum((0, 1))
        noise = (noise + 0.1 * torch.sign(c)).clamp(-1.0, 1.0)
        c = c - 0.01 * grad_c
    losses = fa.train_batch(model, batch, opt)
    torch.testing.assert_close(losses, torch.stack(want_losses))
    torch.testing.assert_close(model.c.detach(), c)
    torch.testing.assert_close(fa.noise, noise)


def test_reference_freeat_l2_by_hand():
    # adv_init_mag 0: delta0 = 0.  A = [[1, 2], [0, 1]], c = [1, 1]: g = A^T c / (1 + m) = [1, 3]/3
    model = ToyLinear([[1.0, 2.0], [0.0, 1.0]], [1.0, 1.0])
    fa = reference.FreeAT(adv_steps=2, adv_norm_type="l2", adv_lr=0.5, adv_init_mag=0.0, adv_max_norm=0.4)
    batch = toy_batch()
    loss = fa.replay(model, batch, 0)
    h = model.layer0(model.emb(batch["input_ids"]))
    assert loss.item() == pytest.approx((h * model.c).sum().item() / 3)               # loss / (1 + adv_steps)
    torch.testing.assert_close(model.c.grad, h.sum((0, 1)) / 3)
    # per sample: g_b = [[1,3],[1,3]]/3, ||g_b|| = sqrt(20)/3; step 0.5 * g / ||g|| has norm 0.5 > 0.4
    unit = torch.tensor([1.0, 3.0], dtype=D) / math.sqrt(20)
    torch.testing.assert_close(fa.noise, (0.4 * unit).expand(2, 2, 2))
    # replay 1 of the same batch keeps delta: +0.5 along the same direction, projected back to 0.4
    fa.replay(model, batch, 1)
    torch.testing.assert_close(fa.noise, (0.4 * unit).expand(2, 2, 2))
    # a new batch (j = 0) draws a new delta (zeros here), so one step from 0 again, no projection
    fa.adv_max_norm = 0.0
    fa.replay(model, batch, 0)
    torch.testing.assert_close(fa.noise, (0.5 * unit).expand(2, 2, 2))


def test_reference_freeat_l2_zero_gradient_is_nan_as_the_original():
    model = ToyLinear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])                          # g = 0
    fa = reference.FreeAT(adv_steps=1, adv_norm_type="l2", adv_lr=0.5, adv_init_mag=0.0)
    fa.replay(model, toy_batch(), 0)
    assert torch.isnan(fa.noise).all()


def test_reference_yopo_by_hand():
    # A = [[1, 2], [0, 1]], c = [1, -1] (frozen A); m = 1 + adv_steps = 2 passes, n = 2 inner steps.
    # p = dL/dh / 2 = c / 2 at every position; dH/ddelta = A^T p = [0.5, 0.5]; ||.||_b = 1 (2 positions)
    model = ToyLinear([[1.0, 2.0], [0.0, 1.0]], [1.0, -1.0])
    model.c.requires_grad_(False)
    # a second trainable parameter that every full pass reaches, to check that grads accumulate
    yopo = reference.YOPO(adv_steps=1, yopo_steps=2, adv_lr=0.3, adv_init_mag=0.0, adv_max_norm=0.5,
                          first_layer="layer0")
    batch = toy_batch()
    model.layer0.weight.requires_grad_(True)
    total = yopo.attack(model, batch)
    x0 = model.emb(batch["input_ids"])
    # step 1: 0.3 * g / 1 = 0.15 per element (||delta_b|| = 0.3); step 2: 0.3 per element, norm 0.6 > 0.5:
    # scaled by 0.5 / 0.6 -> 0.25 per element
    delta = torch.full((2, 2, 2), 0.25, dtype=D)
    A = model.layer0.weight.detach()
    c = model.c.detach()
    h0, h1 = x0 @ A.T, (x0 + delta) @ A.T
    want_total = ((h0 * c).sum() + (h1 * c).sum()) / 2
    assert total.item() == pytest.approx(want_total.item(), rel=1e-12)
    # dL/dA = sum_{b,l} c x^T, summed over both passes (accumulated), each / 2
    want_gA = (torch.einsum("i,blj->ij", c, x0) + torch.einsum("i,blj->ij", c, x0 + delta)) / 2
    torch.testing.assert_close(model.layer0.weight.grad, want_gA)


def test_reference_yopo_inner_steps_by_hand_without_projection():
    model = ToyLinear([[2.0, 0.0], [1.0, 1.0]], [1.0, 0.0])
    yopo = reference.YOPO(adv_steps=1, yopo_steps=3, adv_lr=0.1, adv_init_mag=0.0, first_layer=model.layer0)
    p = torch.full((2, 2, 2), 0.5, dtype=D)
    delta = torch.zeros(2, 2, 2, dtype=D, requires_grad=True)
    inputs = dict(attention_mask=torch.ones(2, 2, dtype=torch.long))
    out = yopo.inner_steps(model, model.layer0, inputs, p, delta, model.emb(toy_batch()["input_ids"]).detach())
    # dH/ddelta = A^T p = [1.5, 0.5] per position; per sample norm sqrt(2 * 2.5); 3 steps of 0.1
    g = torch.tensor([1.5, 0.5], dtype=D)
    torch.testing.assert_close(out.detach(), (0.3 * g / math.sqrt(5.0)).expand(2, 2, 2))
    assert model.c.grad is None                                         # parameter grads untouched


# ----------------------------------------------------------------------- shared helpers
def test_check_steps():
    assert S.check_steps("x", 3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="x must be an integer >= 1"):
            S.check_steps("x", bad)


def test_first_layer_of():
    transformers = pytest.importorskip("transformers")
    from test_activation_methods import tiny_bert
    model = tiny_bert()
    assert S.first_layer_of(model) is model.bert.encoder.layer[0]
    assert S.first_layer_of(model, "bert.encoder.layer.1") is model.bert.encoder.layer[1]
    assert S.first_layer_of(model, model.classifier) is model.classifier
    with pytest.raises(ValueError, match="not a submodule"):
        S.first_layer_of(model, "bert.encoder.layers.0")
    with pytest.raises(ValueError, match="cannot find the first transformer block"):
        S.first_layer_of(ToyLinear([[1.0]], [1.0]))
    with pytest.raises(TypeError):
        S.first_layer_of(model, 0)
    del transformers


def test_hidden_of_and_capture_output_grad():
    t = torch.ones(2)
    assert S.hidden_of(t) is t and S.hidden_of((t, None)) is t
    with pytest.raises(TypeError):
        S.hidden_of({"a": t})
    lin = nn.Linear(2, 2, bias=False).to(D)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D))
    x = torch.tensor([[1.0, 1.0]], dtype=D, requires_grad=True)
    box = {}
    with S.capture_output_grad(lin, box):
        y = lin(x)
        (y * torch.tensor([[3.0, 5.0]], dtype=D)).sum().backward()
    torch.testing.assert_close(box["grad"], torch.tensor([[3.0, 5.0]], dtype=D))    # dL/dy
    assert not lin._forward_hooks
    with pytest.raises(RuntimeError), S.capture_output_grad(lin, box):
        raise RuntimeError("boom")
    assert not lin._forward_hooks                                                   # removed on error


# ----------------------------------------------------------------------- the op
def _oracle(noise, grad, step, clip):
    return (noise.double() + step * torch.sign(grad.double())).clamp(-clip, clip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_freeat_update_matches_its_statement(backend, dtype):
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(3, 70001, generator=g) * 0.01 - 0.005).to(dtype)     # > one CPU chunk
    grad = torch.randn(3, 70001, generator=g).to(dtype)
    grad[0, :5] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")])
    noise[1, :2] = torch.tensor([float("nan"), 0.0079])
    step, clip = 3e-3, 8e-3
    want = _oracle(noise, grad, step, clip)
    ref = noise.clone()
    ops.freeat_update_(ref, grad, step, clip, backend="torch")
    got = noise.clone()
    ops.freeat_update_(got, grad, step, clip, backend=backend)
    assert_close_to_oracle(got, ref, want, f"freeat_update_ {dtype}")
    assert torch.isnan(got[1, 0]) and got[0, 0] == noise[0, 0]          # NaN kept; sign(NaN) = 0
    if dtype == torch.float32:
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32))   # the torch backend's bits


def test_freeat_update_without_clamp_and_errors(backend):
    noise = torch.tensor([1.0, -1.0, 0.0])
    ops.freeat_update_(noise, torch.tensor([1.0, -1.0, -2.0]), 0.5, math.inf, backend=backend)
    assert noise.tolist() == [1.5, -1.5, -0.5]
    with pytest.raises(ValueError, match="clip must be >= 0"):
        ops.freeat_update_(noise, noise.clone(), 0.5, -1.0, backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        ops.freeat_update_(torch.zeros(4, 2).t(), torch.zeros(2, 4), 0.5, 1.0, backend=backend)
    with pytest.raises(ValueError):
        ops.freeat_update_(torch.zeros(3), torch.zeros(3, dtype=torch.float64), 0.5, 1.0, backend=backend)


# ----------------------------------------------------------------------- fused vs reference
transformers = pytest.importorskip("transformers")
from test_activation_methods import FP32, assert_same_training, padded_batch, tiny_bert  # noqa: E402


def freeat_run(cls, model, batches, seed=5, **kw):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fa = cls(**kw)
    torch.manual_seed(seed)
    losses = [fa.train_batch(model, b, opt).double() for b in batches]
    return torch.cat(losses), model, fa


def three_batches():
    big = padded_batch(seed=1, b=3, t=10)
    small = {k: v[:2] for k, v in padded_batch(seed=2, b=3, t=10).items()}   # fewer rows: the buffer's first
    short = {k: (v[:, :7] if v.dim() == 2 else v) for k, v in padded_batch(seed=3, b=3, t=10).items()}
    return [big, small, short]                         # shorter: a non-contiguous slice of the buffer


@pytest.mark.parametrize("max_norm", [0.08, 0.0])
def test_freeat_sign_matches_reference(backend, max_norm):
    model = tiny_bert()
    kw = dict(adv_steps=3, adv_lr=0.05, adv_max_norm=max_norm)
    ref = freeat_run(reference.FreeAT, model, three_batches(), **kw)
    fused = freeat_run(fused_adv.FreeAT, model, three_batches(), backend=backend, **kw)
    assert_same_training(fused[:2], ref[:2], **FP32)
    torch.testing.assert_close(fused[2].noise, ref[2].noise, **FP32)
    if max_norm:
        assert ref[2].noise.abs().max().item() == pytest.approx(max_norm)      # the clamp was reached
    assert not torch.equal(ref[0][0], ref[0][-1])


@pytest.mark.parametrize("max_norm", [0.0, 0.06])
def test_freeat_l2_matches_reference(backend_l2, max_norm):
    model = tiny_bert()
    kw = dict(adv_steps=3, adv_norm_type="l2", adv_lr=0.05, adv_init_mag=0.05, adv_max_norm=max_norm)
    batches = [padded_batch(seed=1), padded_batch(seed=2)]
    ref = freeat_run(reference.FreeAT, model, batches, **kw)
    fused = freeat_run(fused_adv.FreeAT, model, batches, backend=backend_l2, **kw)
    assert_same_training(fused[:2], ref[:2], **FP32)
    torch.testing.assert_close(fused[2].noise, ref[2].noise, **FP32)


def yopo_run(cls, model, batch, steps=2, seed=5, **kw):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    yopo = cls(**kw)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        losses.append(yopo.attack(model, batch).double())
        opt.step()
        opt.zero_grad()
    return torch.stack(losses), model


@pytest.mark.parametrize("max_norm,first_layer", [(0.0, None), (0.06, None), (0.06, "bert.encoder.layer.1")])
def test_yopo_matches_reference(backend_l2, max_norm, first_layer):
    model, batch = tiny_bert(), padded_batch()
    kw = dict(adv_steps=2, yopo_steps=3, adv_lr=0.05, adv_init_mag=0.05, adv_max_norm=max_norm,
              first_layer=first_layer)
    ref = yopo_run(reference.YOPO, model, batch, **kw)
    fused = yopo_run(fused_adv.YOPO, model, batch, backend=backend_l2, **kw)
    assert_same_training(fused, ref, **FP32)


def test_yopo_gradient_accumulation_matches_reference():
    model, batch = tiny_bert(), padded_batch()
    kw = dict(adv_steps=1, yopo_steps=2, adv_lr=0.1, adv_init_mag=0.0)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    l1 = reference.YOPO(**kw).attack(m1, batch, gradient_accumulation_steps=2)
    l2 = fused_adv.YOPO(model=m2, **kw).attack(inputs=batch, gradient_accumulation_steps=2)
    torch.testing.assert_close(l2, l1, **FP32)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, **FP32)


def test_freeat_bf16_close_to_reference():
    model = tiny_bert(dtype=torch.bfloat16)
    kw = dict(adv_steps=2, adv_lr=0.05, adv_max_norm=0.08)
    batches = [padded_batch(seed=1)]
    ref = freeat_run(reference.FreeAT, model, batches, **kw)
    fused = freeat_run(fused_adv.FreeAT, model, batches, **kw)
    torch.testing.assert_close(fused[0], ref[0], rtol=3e-2, atol=3e-2)
    # the reference rounds the step to bf16 and then the sum; the op adds in fp32 and rounds once
    torch.testing.assert_close(fused[2].noise.float(), ref[2].noise.float(), rtol=0, atol=1e-3)


# ----------------------------------------------------------------------- misuse
def test_steps_below_one_and_bad_arguments():
    for kw in (dict(adv_steps=0), dict(adv_steps=-2)):
        with pytest.raises(ValueError, match="adv_steps must be an integer >= 1"):
            fused_adv.FreeAT(**kw)
        with pytest.raises(ValueError, match="adv_steps must be an integer >= 1"):
            fused_adv.YOPO(**kw)
    with pytest.raises(ValueError, match="yopo_steps must be an integer >= 1"):
        fused_adv.YOPO(yopo_steps=0)
    with pytest.raises(ValueError, match="adv_norm_type"):
        fused_adv.FreeAT(adv_norm_type="linf")
    with pytest.raises(ValueError, match="noise_shape"):
        fused_adv.FreeAT(noise_shape=(4, 8))
    with pytest.raises(TypeError):
        fused_adv.FreeAT().replay(None, padded_batch())
    with pytest.raises(TypeError, match="optimizer"):
        fused_adv.FreeAT(model=tiny_bert()).train_batch(inputs=padded_batch())
    with pytest.raises(ValueError, match="j must be in"):
        fused_adv.FreeAT(model=tiny_bert(), adv_steps=2).replay(inputs=padded_batch(), j=2)


def test_freeat_noise_buffer_smaller_than_the_batch():
    model = tiny_bert()
    fa = fused_adv.FreeAT(model=model, adv_steps=1, noise_shape=(2, 10, 32))
    with pytest.raises(ValueError, match="more rows or positions than the buffer"):
        fa.replay(inputs=padded_batch(b=3, t=10))
    fa = fused_adv.FreeAT(model=model, adv_steps=1)
    fa.replay(inputs=padded_batch(b=3, t=8))                   # the buffer takes this batch's shape
    with pytest.raises(ValueError, match="more rows or positions than the buffer"):
        fa.replay(inputs=padded_batch(b=3, t=10))
    with pytest.raises(ValueError, match="more rows or positions than the buffer"):
        fa.replay(inputs=padded_batch(b=4, t=8))


def test_freeat_l2_replay_without_first_replay_and_without_mask():
    model = tiny_bert()
    fa = fused_adv.FreeAT(model=model, adv_steps=2, adv_norm_type="l2")
    with pytest.raises(ValueError, match="replay 0 did not run"):
        fa.replay(inputs=padded_batch(), j=1)
    batch = padded_batch()
    del batch["attention_mask"]
    with pytest.raises(ValueError, match="attention_mask"):
        fa.replay(inputs=batch, j=0)


def test_yopo_unknown_first_layer_name():
    model = tiny_bert()
    with pytest.raises(ValueError, match="not a submodule"):
        fused_adv.YOPO(model=model, first_layer="encoder.layer.0")          # missing the 'bert.' prefix
    yopo = fused_adv.YOPO(first_layer="nope")
    with pytest.raises(ValueError, match="not a submodule"):
        yopo.attack(model, padded_batch())


class Boom(RuntimeError):
    pass


def _raise_on_call(model, n):
    """Make the n-th forward of ``model`` (1-based, counting from now) raise Boom."""
    count = {"n": 0}

    def pre(mod, args, kwargs):
        count["n"] += 1
        if count["n"] == n:
            raise Boom

    return model.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("norm_type", ["sign", "l2"])
def test_freeat_forward_raising_leaves_nothing_perturbed(norm_type):
    model = tiny_bert()
    fa = fused_adv.FreeAT(model=model, adv_steps=2, adv_norm_type=norm_type, adv_lr=0.05, adv_init_mag=0.05)
    fa.replay(inputs=padded_batch(), j=0)
    model.zero_grad()
    noise = fa.noise.clone()
    params = [p.detach().clone() for p in model.parameters()]
    h = _raise_on_call(model, 1)
    try:
        with pytest.raises(Boom):
            fa.replay(inputs=padded_batch(seed=4), j=0)
    finally:
        h.remove()
    assert torch.equal(fa.noise, noise)                            # the noise is not updated
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_yopo_forward_raising_leaves_no_hook(failing_call):
    model = tiny_bert()
    layer = model.bert.encoder.layer[0]
    params = [p.detach().clone() for p in model.parameters()]
    h = _raise_on_call(model, failing_call)       # 1: pass 0; 2: an inner step; 3: the next inner step
    try:
        with pytest.raises(Boom):
            fused_adv.YOPO(model=model, adv_steps=1, yopo_steps=2).attack(inputs=padded_batch())
    finally:
        h.remove()
    assert not layer._forward_hooks and not model._forward_hooks
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_extra_memory_is_the_noise():
    model = tiny_bert()
    fa = fused_adv.FreeAT(model=model, adv_steps=1)
    assert fa.extra_memory_bytes() == 0
    fa.replay(inputs=padded_batch(b=3, t=10))
    assert fa.extra_memory_bytes() == 3 * 10 * 32 * 4
    fa.reset()
    assert fa.noise is None


def test_freeat_update_opcheck_and_compile():
    noise, grad = torch.randn(3, 5) * 0.01, torch.randn(3, 5)
    torch.library.opcheck(torch.ops.fused_adv.freeat_update_.default, (noise, grad, 0.003, 0.008))
    f = torch.compile(lambda n, g: torch.ops.fused_adv.freeat_update_(n, g, 0.25, 1.0), backend="aot_eager",
                      fullgraph=True)
    n = torch.tensor([0.0, 0.9, -0.9])
    f(n, torch.tensor([1.0, 1.0, -1.0]))
    assert n.tolist() == [0.25, 1.0, -1.0]
