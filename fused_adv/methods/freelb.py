"""FreeLB with fused per-sample ascent steps: the drop-in (reference: fused_adv.reference.freelb).

Same constructor, ``attack`` and numbers as the reference (the official HF example's loop).
Fused: each ascent step is one reduction pass over (delta, grad) giving per-sample
(‖g‖², <delta, g>, ‖delta‖²) (or max|g| for linf) and one in-place update pass that applies the
step and the projection together (the projected norm follows analytically from the three sums, so
delta is not re-read to measure it).  No host syncs: the returned loss stays on the device.

Usage::

    freelb = FreeLB(adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0, adv_norm_type="l2")
    for batch in loader:
        loss = freelb.attack(model, batch)       # K forward/backward passes, grads accumulate
        optimizer.step(); optimizer.zero_grad()
"""
from __future__ import annotations

import torch

from fused_adv.ops import activation as _ops
from fused_adv.reference.freelb import FreeLB as _ReferenceFreeLB

__all__ = ["FreeLB"]


class FreeLB(_ReferenceFreeLB):
    """FreeLB(model=None, adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0,
    adv_norm_type='l2', embedding=None, backend=None).

    ``model`` (optional) is used when ``attack`` is called without one; ``embedding`` defaults to
    ``model.get_input_embeddings()``; ``backend`` selects the op backend (None: auto).

    ``attack(model, inputs, gradient_accumulation_steps=1)``: ``inputs`` is a dict of model kwargs
    with ``input_ids`` (replaced by ``inputs_embeds``; the dict is not modified), an
    ``attention_mask`` and whatever makes the model return ``.loss``.  Runs K forward/backward
    passes with loss/K (parameter .grad accumulate the mean of the K adversarial gradients), no
    update after the last one, and returns the sum of the K scaled losses (detached 0-dim tensor).
    """

    def __init__(self, model=None, adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0,
                 adv_norm_type="l2", embedding=None, backend=None):
        super().__init__(adv_K=adv_K, adv_lr=adv_lr, adv_init_mag=adv_init_mag, adv_max_norm=adv_max_norm,
                         adv_norm_type=adv_norm_type, embedding=embedding)
        self.model = model
        self.backend = backend

    def update_delta(self, delta, delta_grad):
        """In place: one fused reduction + one fused update pass. Returns delta."""
        with torch.no_grad():
            linf = self.adv_norm_type == "linf"
            stats = _ops.freelb_reduce(delta, delta_grad, linf, backend=self.backend)
            _ops.freelb_update_(delta, delta_grad, stats, self.adv_lr, self.adv_max_norm, linf,
                                backend=self.backend)
        return delta

    def attack(self, model=None, inputs=None, gradient_accumulation_steps=1):
        model = model if model is not None else self.model
        if model is None or inputs is None:
            raise TypeError("FreeLB.attack(model, inputs): pass the model (here or to FreeLB(model=...)) "
                            "and the batch dict")
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        if "attention_mask" not in inputs:
            raise ValueError("FreeLB.attack: inputs needs an 'attention_mask' (used by the delta init)")
        embeds_init = self._embed(model, input_ids)
        delta = self.init_delta(embeds_init, inputs["attention_mask"]).contiguous()
        total = None
        for astep in range(self.adv_K):
            delta.requires_grad_()
            inputs["inputs_embeds"] = delta + embeds_init
            loss = model(**inputs).loss.mean()
            if gradient_accumulation_steps > 1:
                loss = loss / gradient_accumulation_steps
            loss = loss / self.adv_K
            total = loss.detach() if total is None else total + loss.detach()
            loss.backward()
            if astep == self.adv_K - 1:
                break
            grad = delta.grad
            delta.grad = None
            # a fresh leaf sharing delta's storage, updated in place (the add above saved nothing)
            delta = self.update_delta(delta.detach(), grad)
            embeds_init = self._embed(model, input_ids)
        return total
