"""On a CUDA device, the fused classes never synchronise the host (docs/design.md §3 (Op
contract)): every zero/NaN guard is a device-side select.  Checked with
torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising call, for every fused
class: FGM, FGSM, MIFGSM, PGD, AWP, AdvWeightPerturb (weights perturbed and restored) and FreeLB,
SMART, SiFT's AdversarialLearner, FreeAT (both rules), YOPO (the embedding output perturbed).

AdvWeightPerturb and the activation methods run forward/backward passes inside the checked region,
so their model must itself be sync-free: :class:`SyncFreeClassifier` (nn.Embedding's CUDA backward synchronises to
count its segments; an index_select lookup, whose backward is index_add_, does not).

On CPU the very same steps run once without the sync check (it needs CUDA), with the same
assertions (weights restored bit for bit, finite losses), so the harness cannot rot between the
rare runs on a GPU (tools/gpu_session.sh runs this file as its no-sync stage)."""
import types

import pytest
import torch
from torch import nn

import fused_adv
from fused_adv import sift as fused_sift
from loops import loss_of
from models import ToyBert, batch

pytestmark = pytest.mark.gpu

WEIGHT_CLASSES = ["FGM", "FGSM", "MIFGSM", "PGD", "AWP"]
ACTIVATION_CLASSES = ["FreeLB", "SMART", "SiFT", "FreeAT", "FreeAT-l2", "YOPO"]


class _IndexSelectEmbedding(nn.Embedding):
    """nn.Embedding whose lookup is index_select: same values, and a backward (index_add_) that
    does not synchronise on CUDA."""

    def forward(self, ids):
        return self.weight.index_select(0, ids.reshape(-1)).view(*ids.shape, self.embedding_dim)


class _Embeddings(nn.Module):
    def __init__(self, vocab, hidden, max_pos=32):
        super().__init__()
        self.word_embeddings = _IndexSelectEmbedding(vocab, hidden)
        self.position_embeddings = _IndexSelectEmbedding(max_pos, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)  # SiFT's default hook target: embeddings.LayerNorm

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        pos = torch.arange(x.shape[1], device=x.device)
        return self.LayerNorm(x + self.position_embeddings(pos))


class SyncFreeClassifier(nn.Module):
    """An HF-shaped sequence classifier (``embeddings``, ``get_input_embeddings()``,
    ``forward(input_ids | inputs_embeds, attention_mask, labels)`` -> ``.loss``, ``.logits``) whose
    forward and backward make no host sync on CUDA."""

    def __init__(self, vocab=50, hidden=16, classes=3):
        super().__init__()
        self.embeddings = _Embeddings(vocab, hidden)
        self.encoder = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.classifier = nn.Linear(hidden, classes)

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None):
        h = self.encoder(self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.classifier(h.mean(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return types.SimpleNamespace(loss=loss, logits=logits)


def _warm_up(step):
    """The first step (lazy imports, kernel compilation, allocations) outside the check; a backend
    without a kernel for one of the class's ops skips with the registry's reason."""
    try:
        return step()
    except fused_adv.BackendUnavailableError as exc:
        pytest.skip(" ".join(str(exc).split())[:400])


def _check_no_sync(device, step, n=2):
    """Runs ``step`` n times; on CUDA under set_sync_debug_mode('error') (any host sync raises)."""
    if device != "cuda":
        for _ in range(n):
            step()
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("cls", WEIGHT_CLASSES)
def test_attack_and_restore_do_not_sync(cls, device_backend):
    device, backend = device_backend
    torch.manual_seed(0)
    model = ToyBert().to(device)
    loss_of(model, [t.to(device) for t in batch(0)]).backward()
    if cls == "AWP":
        adv = fused_adv.AWP(model, torch.optim.SGD(model.parameters(), lr=0.1), backend=backend)

        def step():
            adv.attack_step(first=True)
            adv.attack_step(first=False)
            adv.restore()
    elif cls in ("PGD", "MIFGSM"):
        adv = getattr(fused_adv, cls)(model, backend=backend)

        def step():
            adv.backup_grad()
            adv.attack(is_first_attack=True)
            adv.attack()
            adv.restore_grad()
            adv.restore()
    else:
        adv = getattr(fused_adv, cls)(model, backend=backend)

        def step():
            adv.attack()
            adv.restore()
    _warm_up(step)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _check_no_sync(device, step)
    for n, p in model.named_parameters():  # and the steps really ran and restored, bit for bit
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n


def test_awp_paper_does_not_sync(device_backend):
    """AdvWeightPerturb (docs/methods.md §4b (AWP, paper)), proxy=None: calc_awp's forward and
    gradient, perturb and restore.  Its restore subtracts the diff again (not bit-exact by design)."""
    device, backend = device_backend
    torch.manual_seed(0)
    model = SyncFreeClassifier().to(device)
    ids, mask, labels = (t.to(device) for t in batch(0))
    awp = fused_adv.AdvWeightPerturb(model, gamma=0.01, proxy_lr=0.1, backend=backend)

    def step():
        diff = awp.calc_awp(closure=lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
        awp.perturb(diff)
        awp.restore(diff)

    _warm_up(step)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _check_no_sync(device, step)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=1e-5, atol=1e-6, msg=n)


def _activation_step(cls, model, inputs, backend):
    """One training step's adversarial part for ``cls``: returns a closure giving the loss."""
    if cls == "FreeLB":
        freelb = fused_adv.FreeLB(adv_K=3, adv_lr=0.05, adv_init_mag=0.05, adv_max_norm=0.05, backend=backend)
        return lambda: freelb.attack(model, inputs)
    if cls.startswith("FreeAT"):
        kw = dict(adv_norm_type="l2", adv_init_mag=0.05) if cls == "FreeAT-l2" else {}
        freeat = fused_adv.FreeAT(adv_steps=2, adv_lr=0.01, adv_max_norm=0.05, backend=backend, **kw)
        return lambda: torch.stack([freeat.replay(model, inputs, j) for j in range(2)]).sum()
    if cls == "YOPO":
        yopo = fused_adv.YOPO(adv_steps=1, yopo_steps=2, adv_lr=0.05, adv_init_mag=0.05, adv_max_norm=0.05,
                              first_layer="encoder.0", backend=backend)
        return lambda: yopo.attack(model, inputs)
    if cls == "SMART":
        smart = fused_adv.SMART(adv_K=2, step_size=1e-2, noise_var=1e-3, backend=backend)

        def smart_step():
            out = model(**inputs)
            loss = out.loss + smart.loss(model, inputs, out.logits)
            loss.backward()
            return loss.detach()
        return smart_step
    learner = fused_sift.AdversarialLearner(model, fused_sift.hook_sift_layer(model, 16, backend=backend))

    def sift_step():
        out = model(**inputs)
        loss = out.loss + learner.loss(out.logits, lambda m, **kw: m(**kw).logits, **inputs) * 3.0
        loss.backward()
        return loss.detach()
    return sift_step


@pytest.mark.parametrize("cls", ACTIVATION_CLASSES)
def test_activation_methods_do_not_sync(cls, device_backend):
    device, backend = device_backend
    torch.manual_seed(0)
    model = SyncFreeClassifier().to(device)
    ids, mask, labels = (t.to(device) for t in batch(0))
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    adv_step = _activation_step(cls, model, inputs, backend)
    losses = []

    def step():
        losses.append(adv_step())
        model.zero_grad(set_to_none=False)  # zeroing in place keeps the step sync-free

    _warm_up(step)
    _check_no_sync(device, step)
    assert len(losses) == 3 and all(torch.isfinite(v).all() for v in losses)
    if cls == "SiFT":  # loss() freezes the parameters for its delta step and must unfreeze them
        assert all(p.requires_grad for p in model.parameters())
