"""FreeLB with fused per-sample ascent steps: the drop-in (reference: fused_adv.reference.freelb;
docs/methods.md §6 (FreeLB)).

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

from fused_adv._shared import check_freelb_norm_type, freelb_init_delta, lookup_embeddings
from fused_adv.ops import activation as _ops

__all__ = ["FreeLB"]


class FreeLB:
    """``FreeLB(model=None, adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0,
    adv_norm_type='l2', embedding=None, backend=None)``.

    Args:
        model: used when ``attack`` is called without one (optional).
        adv_K: number of ascent steps K (= forward/backward passes per batch).
        adv_lr: ascent step size.
        adv_init_mag: magnitude of the random initial delta (0: start from zeros).
        adv_max_norm: projection radius (0: no projection).
        adv_norm_type: 'l2' (per-sample L2 ball) or 'linf' (box).
        embedding: the word-embedding module (default ``model.get_input_embeddings()``).
        backend: the op backend ('auto', 'torch', 'cpp', 'triton', 'cuda'; None: auto /
            FUSED_ADV_BACKEND).

    ``attack(model, inputs, gradient_accumulation_steps=1)``: ``inputs`` is a dict of model kwargs
    with ``input_ids`` (replaced by ``inputs_embeds``; the dict is not modified), an
    ``attention_mask`` and whatever makes the model return ``.loss``.  Runs K forward/backward
    passes with loss/K (parameter .grad accumulate the mean of the K adversarial gradients), no
    update after the last one, and returns the sum of the K scaled losses (detached 0-dim tensor).
    """

    def __init__(self, model=None, adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0,
                 adv_norm_type="l2", embedding=None, backend=None):
        """Stores the arguments (see the class docstring); raises ValueError when
        ``adv_norm_type`` is not 'l2' or 'linf'."""
        self.adv_K = adv_K
        self.adv_lr = adv_lr
        self.adv_init_mag = adv_init_mag
        self.adv_max_norm = adv_max_norm
        self.adv_norm_type = check_freelb_norm_type(adv_norm_type)
        self.embedding = embedding
        self.model = model
        self.backend = backend

    def init_delta(self, embeds_init, attention_mask):
        """The initial delta [B, L, E] for embeddings [B, L, E] and mask [B, L], in the embeddings'
        dtype (:func:`fused_adv._shared.freelb_init_delta`: the original's single ``uniform_`` of
        the full shape when adv_init_mag > 0, zeros otherwise).  Mutates nothing."""
        return freelb_init_delta(embeds_init, attention_mask, self.adv_init_mag, self.adv_norm_type)

    def update_delta(self, delta, delta_grad):
        """One ascent step + projection, IN PLACE on ``delta``: one fused reduction pass over
        (delta, grad) and one fused update pass (fused_adv.ops.activation.freelb_reduce /
        freelb_update_), same numbers as the reference's ``update_delta``.

        ``delta``, ``delta_grad``: [B, ...] of the same shape and float dtype; ``delta`` must be
        contiguous and not require grad (pass ``delta.detach()``).  Returns ``delta`` (the same
        tensor, updated).  ``delta_grad`` is not modified.  Raises ValueError when ``delta`` is
        not contiguous or the shapes/dtypes/devices disagree, BackendUnavailableError when the
        backend cannot run here."""
        with torch.no_grad():
            linf = self.adv_norm_type == "linf"
            stats = _ops.freelb_reduce(delta, delta_grad, linf, backend=self.backend)
            _ops.freelb_update_(delta, delta_grad, stats, self.adv_lr, self.adv_max_norm, linf,
                                backend=self.backend)
        return delta

    def attack(self, model=None, inputs=None, gradient_accumulation_steps=1):
        """Runs the K adversarial forward/backward passes on ``inputs_embeds = embeds + delta``.

        ``inputs``: dict of model kwargs with ``input_ids`` [B, L] (replaced by
        ``inputs_embeds`` [B, L, E]; the dict itself is not modified) and ``attention_mask``
        [B, L]; the model must return ``.loss``.  Each pass back-propagates
        ``loss.mean() / gradient_accumulation_steps / K``, so parameter ``.grad`` ACCUMULATE the
        mean adversarial gradient (nothing is zeroed; the caller steps the optimizer); the word
        embeddings are looked up again after each ascent step.  Returns the sum of the K scaled
        losses (a detached 0-dim tensor in the loss's dtype, left on the device).  Raises
        TypeError when no model or no inputs are given, KeyError without ``input_ids``,
        ValueError without ``attention_mask``, and what the model raises.
        """
        model = model if model is not None else self.model
        if model is None or inputs is None:
            raise TypeError("FreeLB.attack(model, inputs): pass the model (here or to FreeLB(model=...)) "
                            "and the batch dict")
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        if "attention_mask" not in inputs:
            raise ValueError("FreeLB.attack: inputs needs an 'attention_mask' (used by the delta init)")
        embeds_init = lookup_embeddings(model, self.embedding, input_ids)
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
            embeds_init = lookup_embeddings(model, self.embedding, input_ids)
        return total
