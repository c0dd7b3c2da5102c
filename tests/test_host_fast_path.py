"""What the per-step host path keeps between steps, and that it still notices every change
(docs/design.md §7 (Targets), "Host path").

* ``select_params`` hands back the same list object step after step (what the backup pool keys
  on) and a different one once the model changed: a new parameter, a parameter written into a
  module's ``_parameters`` behind the registration hooks, a requires_grad flip.
* AWP reuses its backups without re-checking them; a parameter that changed dtype, shape or
  storage since the last step is still backed up, perturbed and restored as a fresh instance
  would do it, and restore_mode="swap" (which hands the buffers over to the parameters) never
  reuses a stale list.
* A first step whose op refuses moves nothing and leaves nothing attacked (a restore from
  backups that were never written would overwrite the weights).
* Unsharded ``localize`` / ``pieces`` under no_grad pass the parameters themselves (no detach);
  with grad mode on they are detached views.
* ``methods._common.no_grad`` and the environment reads of ``ops._registry.resolve`` behave as
  ``torch.no_grad`` and ``os.environ.get``.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fused_adv
from fused_adv.methods._common import no_grad, select_by_name, select_params
from fused_adv.ops import _library, _registry
from fused_adv.sharding import ShardingLayout
from models import ThreeLayer, grads_on
from oracles import bits

pytestmark = pytest.mark.usefixtures("one_thread")

BACKEND = "cpp" if _library.has_native("awp_perturb_", "cpu") else "torch"


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- select_params
def test_select_params_is_one_list_until_the_model_changes():
    m = ThreeLayer()
    first = select_params(m, "weight", what="x")
    assert [id(p) for p in first] == [id(p) for _, p in select_by_name(m, "weight", what="x")]
    assert select_params(m, "weight", what="x") is first                  # nothing changed
    m.b.extra_weight = nn.Parameter(torch.zeros(3))                        # registration hook
    second = select_params(m, "weight", what="x")
    assert second is not first and second[-1] is m.b.extra_weight
    replaced = nn.Parameter(torch.zeros(4, 4))
    m.a._parameters["weight"] = replaced                                   # behind the hooks
    third = select_params(m, "weight", what="x")
    assert third is not second and any(p is replaced for p in third)
    m.a.weight.requires_grad_(False)                                       # frozen: left out
    assert all(p is not m.a.weight for p in select_params(m, "weight", what="x"))
    m.a.weight.requires_grad_(True)
    assert any(p is m.a.weight for p in select_params(m, "weight", what="x"))
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        select_params(m, "weight", what="x")


# ---------------------------------------------------------------- AWP across model changes
@pytest.mark.parametrize("change", ["dtype", "shape", "storage", "requires_grad", "grad_dropped"])
def test_awp_reused_backups_follow_a_changed_model(change):
    """A model changed between two AWP steps: the step after the change perturbs exactly what a
    fresh AWP instance perturbs, bit for bit, and restores the changed weights bit for bit."""
    torch.manual_seed(0)
    m = grads_on(ThreeLayer())
    awp = fused_adv.AWP(m, None, adv_param="weight", backend=BACKEND)
    for _ in range(2):                                                     # the backups are reused
        with awp.perturbed():
            pass
    if change == "dtype":
        m.to(torch.bfloat16)
        grads_on(m)
    elif change == "shape":
        m.a.weight.data = torch.randn(3, 4)                                # same Parameter, new shape
        m.a.weight.grad = torch.randn(3, 4)
    elif change == "storage":
        for p in m.parameters():
            p.data = torch.randn_like(p)
    elif change == "requires_grad":
        m.a.weight.requires_grad_(False)
    else:
        m.b.weight.grad = None
    twin = ThreeLayer()
    twin.a.weight.data = torch.empty_like(m.a.weight)
    twin.to(next(m.parameters()).dtype)
    twin.load_state_dict(m.state_dict())
    for p, q in zip(m.parameters(), twin.parameters()):
        q.requires_grad_(p.requires_grad)
        q.grad = None if p.grad is None else p.grad.clone()
    fresh = fused_adv.AWP(twin, None, adv_param="weight", backend=BACKEND)
    clean = weights(m)
    with awp.perturbed(), fresh.perturbed():
        for p, q in zip(m.parameters(), twin.parameters()):
            assert torch.equal(bits(p.detach()), bits(q.detach()))
        moved = [not torch.equal(p.detach(), c) for p, c in zip(m.parameters(), clean)]
        names = [n for n, _ in m.named_parameters()]
        assert moved[names.index("word_embeddings.weight")]
        if change in ("requires_grad", "grad_dropped"):
            assert not moved[names.index("a.weight" if change == "requires_grad" else "b.weight")]
    for p, c in zip(m.parameters(), clean):
        assert torch.equal(bits(p.detach()), bits(c))


@pytest.mark.parametrize("method", ["awp", "fgm"])
def test_swap_restore_never_reuses_handed_over_buffers(method):
    """restore_mode='swap' hands the backup buffers to the parameters each step: three steps in
    swap mode give, bit for bit, the weights of three steps in copy mode."""
    runs = []
    for mode in ("swap", "copy"):
        torch.manual_seed(1)
        m = grads_on(ThreeLayer())
        if method == "awp":
            adv = fused_adv.AWP(m, None, adv_param="weight", backend=BACKEND, restore_mode=mode)
        else:
            adv = fused_adv.FGM(m, emb_name="weight", backend=BACKEND, restore_mode=mode)
        seen = []
        for step in range(3):
            with adv.perturbed():
                seen.append(weights(m))
            for p in m.parameters():                                       # an optimizer step
                p.data.add_(p.grad, alpha=-0.1)
            seen.append(weights(m))
        runs.append(seen)
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(bits(x), bits(y))


def test_awp_first_step_that_raises_moves_nothing():
    """A parameter whose dtype no longer matches its gradient: the update op refuses (also after
    re-checking the reused backups), the step raises, nothing is attacked and every weight is
    what it was (before, the backups were marked attacked before the op ran, so the restore in
    perturbed()'s finally copied never-written backups over the weights)."""
    torch.manual_seed(2)
    m = grads_on(ThreeLayer())
    awp = fused_adv.AWP(m, None, adv_param="weight", backend=BACKEND)
    with awp.perturbed():
        pass
    m.a.weight.data = m.a.weight.data.double()                             # the grad stays float32
    clean = weights(m)
    for _ in range(2):
        with pytest.raises(ValueError, match="grads\\[1\\]"):
            with awp.perturbed():
                pass
        assert not awp.is_attacked
        for p, c in zip(m.parameters(), clean):
            assert torch.equal(bits(p.detach()), bits(c))


# ---------------------------------------------------------------- localize / pieces
def test_unsharded_pieces_are_the_parameters_under_no_grad():
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(0)), nn.Parameter(torch.randn(4))]
    grads = [torch.randn(3, 2), torch.randn(0), None]
    layout = ShardingLayout()
    with torch.no_grad():
        loc = layout.localize(params, grads)
        assert loc.locals is params and layout.pieces(params) is params
        assert loc.live == [0, 1]                                          # empty but with a gradient: live
        assert loc.params[0] is params[0] and loc.grads[1] is grads[1]
        full = layout.localize(params[:2], grads[:2])
        assert full.params is full.locals and full.live == [0, 1]
    loc = layout.localize(params, grads)                                   # grad mode on: detached views
    for piece, p in zip(loc.locals + layout.pieces(params), params + params):
        assert type(piece) is torch.Tensor and not piece.requires_grad and piece.data_ptr() == p.data_ptr()
        piece.add_(0)                                                      # mutable in place outside no_grad


# ---------------------------------------------------------------- helpers
def test_no_grad_decorator_restores_the_mode_also_on_error():
    @no_grad
    def inside(fail=False):
        if fail:
            raise KeyError("x")
        return torch.is_grad_enabled()

    assert inside() is False and torch.is_grad_enabled()
    with pytest.raises(KeyError):
        inside(fail=True)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        inside()
        assert not torch.is_grad_enabled()


def test_resolve_reads_the_environment_as_os_environ_get(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FUSED_ADV_BACKEND", "torch")
    assert _registry._getenv("FUSED_ADV_BACKEND") == os.environ.get("FUSED_ADV_BACKEND") == "torch"
    assert _registry.resolve(None, cpu, "restore_") == "torch"
    monkeypatch.delenv("FUSED_ADV_BACKEND")
    assert _registry._getenv("FUSED_ADV_BACKEND") is None
    assert _registry.resolve(None, cpu, "restore_") == BACKEND
    monkeypatch.setattr(os, "environ", {"FUSED_ADV_BACKEND": "torch"})     # a replaced mapping
    assert _registry.resolve(None, cpu, "restore_") == "torch"
