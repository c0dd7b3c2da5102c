"""FreeLB (Zhu et al., ICLR 2020): the reference implementation
(docs/methods.md §6 (FreeLB)).

A readable restatement of the training-loop code of the official HuggingFace example
(zhuchen03/FreeLB, ``huggingface-transformers/examples/run_glue_freelb.py``), packaged as the
plain-loop class practitioners copy (TorchBlocks-style ``FreeLB(...).attack(model, inputs)``).
Kept as the original behaves:

* delta lives on the word-embedding OUTPUTS [B, L, E] in their dtype; the word embeddings are
  looked up again after every ascent step (so every adversarial loss back-propagates into them);
* each of the K forwards uses ``loss / K`` (and ``/ gradient_accumulation_steps``) and calls
  ``backward()``: parameter gradients ACCUMULATE the average of the K adversarial gradients;
* there is no delta update after the last step;
* l2 projection: ``reweights = max_norm / ‖delta_b‖ * exceed + (1 - exceed)``, so a sample whose
  delta norm is exactly 0 gets NaN (0 * inf), as in the original;
* dropout masks are NOT reused across the K steps (the original needs a patched model for that).
"""
from __future__ import annotations

import torch

from fused_adv._shared import check_freelb_norm_type, freelb_init_delta, lookup_embeddings

__all__ = ["FreeLB"]


class FreeLB:
    """``FreeLB(adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0, adv_norm_type='l2',
    embedding=None)``: FreeLB adversarial training in a plain loop.

    Args:
        adv_K: number of ascent steps K (= forward/backward passes per batch).
        adv_lr: ascent step size.
        adv_init_mag: magnitude of the random initial delta (0: start from zeros).
        adv_max_norm: projection radius (0: no projection).
        adv_norm_type: 'l2' (per-sample L2 ball) or 'linf' (box).
        embedding: the word-embedding module (default ``model.get_input_embeddings()``).

    Usage::

        freelb = FreeLB(adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0)
        loss = freelb.attack(model, batch)   # runs K forward/backward passes
        optimizer.step(); optimizer.zero_grad()

    ``batch`` is a dict of model keyword arguments with ``input_ids`` (replaced by
    ``inputs_embeds``), ``attention_mask`` and whatever makes the model return ``.loss``
    (e.g. ``labels``).  It is not modified.
    """

    def __init__(self, adv_K=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0, adv_norm_type="l2",
                 embedding=None):
        """Stores the arguments (see the class docstring); raises ValueError when
        ``adv_norm_type`` is not 'l2' or 'linf'."""
        self.adv_K = adv_K
        self.adv_lr = adv_lr
        self.adv_init_mag = adv_init_mag
        self.adv_max_norm = adv_max_norm
        self.adv_norm_type = check_freelb_norm_type(adv_norm_type)
        self.embedding = embedding

    def init_delta(self, embeds_init, attention_mask):
        """The initial delta [B, L, E] for embeddings [B, L, E] and mask [B, L], in the embeddings'
        dtype (:func:`fused_adv._shared.freelb_init_delta`: one ``uniform_`` of the full shape when
        adv_init_mag > 0, zeros otherwise).  Mutates nothing."""
        return freelb_init_delta(embeds_init, attention_mask, self.adv_init_mag, self.adv_norm_type)

    def update_delta(self, delta, delta_grad):
        """One ascent step + projection (the original's step (3)) in plain torch.

        ``delta``, ``delta_grad``: [B, ...] (same shape; any float dtype).  'l2':
        ``delta + adv_lr * g / max(||g_b||, 1e-8)`` per sample b, then, when adv_max_norm > 0,
        samples with ||delta_b|| > adv_max_norm are scaled onto that sphere (a sample whose norm
        is exactly 0 becomes NaN, as in the original).  'linf': the step divides by max|g_b|
        (clamped to 1e-8) and the result is clamped to +-adv_max_norm.  Returns a NEW detached
        tensor; the arguments are not modified.  Raises nothing of its own."""
        if self.adv_norm_type == "l2":
            denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1)
            denorm = torch.clamp(denorm, min=1e-8)
            delta = (delta + self.adv_lr * delta_grad / denorm).detach()
            if self.adv_max_norm > 0:
                delta_norm = torch.norm(delta.view(delta.size(0), -1).float(), p=2, dim=1).detach()
                exceed_mask = (delta_norm > self.adv_max_norm).to(delta)
                reweights = (self.adv_max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1)
                delta = (delta * reweights).detach()
        else:
            denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1, p=float("inf")).view(-1, 1, 1)
            denorm = torch.clamp(denorm, min=1e-8)
            delta = (delta + self.adv_lr * delta_grad / denorm).detach()
            if self.adv_max_norm > 0:
                delta = torch.clamp(delta, -self.adv_max_norm, self.adv_max_norm).detach()
        return delta

    def attack(self, model, inputs, gradient_accumulation_steps=1):
        """Runs the K adversarial forward/backward passes on ``inputs_embeds = embeds + delta``.

        ``inputs``: dict of model kwargs with ``input_ids`` [B, L] (replaced by
        ``inputs_embeds`` [B, L, E]; the dict itself is not modified) and ``attention_mask``
        [B, L]; the model must return ``.loss``.  Each pass back-propagates
        ``loss.mean() / gradient_accumulation_steps / K``, so parameter ``.grad`` ACCUMULATE the
        mean adversarial gradient (nothing is zeroed; the caller steps the optimizer).  Returns
        the sum of the K scaled losses (a detached 0-dim tensor in the loss's dtype).  Raises
        KeyError when ``input_ids`` or ``attention_mask`` is missing, and what the model raises.
        """
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        embeds_init = lookup_embeddings(model, self.embedding, input_ids)
        delta = self.init_delta(embeds_init, inputs["attention_mask"])
        total = None
        for astep in range(self.adv_K):
            delta.requires_grad_()
            inputs["inputs_embeds"] = delta + embeds_init
            loss = model(**inputs).loss
            loss = loss.mean()
            if gradient_accumulation_steps > 1:
                loss = loss / gradient_accumulation_steps
            loss = loss / self.adv_K
            total = loss.detach() if total is None else total + loss.detach()
            loss.backward()
            if astep == self.adv_K - 1:
                break
            delta_grad = delta.grad.clone().detach()
            delta = self.update_delta(delta, delta_grad)
            embeds_init = lookup_embeddings(model, self.embedding, input_ids)
        return total
