"""YOPO (You Only Propagate Once), NLP variant: the reference implementation
(docs/methods.md §8 (FreeAT and YOPO)).

A readable restatement of zhuchen03/FreeLB fairseq-RoBERTa ``tasks/sentence_prediction.py``
``yopo_train_step`` / ``yopo_inner_steps`` (with ``Hamiltonian_fwd`` of
``modules/transformer_sentence_encoder.py``), for HuggingFace models:

* delta on the token-embedding output, FreeLB's l2 init (``adv_init_mag``);
* pass 0: forward on embeds + delta, ``loss / (1 + adv_steps)``, backward (parameter grads
  accumulate); the gradient p of that loss w.r.t. the FIRST LAYER's output is kept (not negated);
* then ``adv_steps`` times: p is the first-layer output gradient of the latest full pass;
  ``yopo_steps`` inner steps on the Hamiltonian H = <first_layer(embeds.detach() + delta), p>:
  ``delta <- delta + adv_lr * dH/ddelta / max(||dH/ddelta||_b, 1e-10)`` per sample, then
  rescaled onto the ``adv_max_norm`` sphere when it leaves it (norm in delta's dtype); then a full
  forward/backward on ``embedding(input_ids) + delta`` with ``loss / (1 + adv_steps)``;
* the caller steps the optimizer once per batch.

"First layer" for a HF model (:func:`fused_adv._shared.first_layer_of`): the first transformer
block, reached through the model's own embedding module (positions, token types, LayerNorm,
dropout) -- what fairseq's ``Hamiltonian_fwd`` runs (embedding post-processing + ``layers[0]``).
The inner steps run the model's forward and stop at that block (a forward hook), so nothing after
it is computed.  Dropout masks are drawn anew by every forward (the fairseq code reuses them).
"""
from __future__ import annotations

import torch

from fused_adv._shared import (capture_output_grad, embedding_output, first_layer_of, freelb_init_delta, hidden_of,
                               lookup_embeddings)

__all__ = ["YOPO"]


class YOPO:
    """``YOPO(adv_steps=2, yopo_steps=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0,
    embedding=None, first_layer=None)``: YOPO-m-n for transformers in a plain loop (m = 1 +
    adv_steps full passes, n = yopo_steps inner steps after each but the last).

    Args:
        adv_steps: full forward/backward passes after the first one.
        yopo_steps: Hamiltonian inner steps per full pass.
        adv_lr: inner ascent step size.
        adv_init_mag: magnitude of FreeLB's l2 init (0: zeros).
        adv_max_norm: projection radius (0: no projection).
        embedding: the word-embedding module (default ``model.get_input_embeddings()``).
        first_layer: the module whose output the co-state is taken at: a module, its name in
            ``model.named_modules()``, or None (``model.base_model.encoder.layer[0]`` and the other
            usual places, :func:`fused_adv._shared.first_layer_of`).

    Usage::

        yopo = YOPO(adv_steps=2, yopo_steps=3, adv_lr=0.1, adv_init_mag=0.02)
        loss = yopo.attack(model, batch)        # 1 + adv_steps passes, grads accumulate
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, adv_steps=2, yopo_steps=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0,
                 embedding=None, first_layer=None):
        """Stores the arguments (see the class docstring); allocates nothing."""
        self.adv_steps = adv_steps
        self.yopo_steps = yopo_steps
        self.adv_lr = adv_lr
        self.adv_init_mag = adv_init_mag
        self.adv_max_norm = adv_max_norm
        self.embedding = embedding
        self.first_layer = first_layer

    def inner_steps(self, model, layer, inputs, p_var, delta, embeds_init):
        """``yopo_inner_steps``: ``yopo_steps`` ascent steps of delta on H = sum(first_layer(
        embeds_init + delta) * p_var), ``embeds_init`` detached, only delta differentiated
        (parameter ``.grad`` untouched).  Returns the new delta (a leaf requiring grad)."""
        for _ in range(self.yopo_steps):
            out = hidden_of(embedding_output(model, layer, dict(inputs, inputs_embeds=embeds_init + delta)))
            hal = torch.sum(out * p_var)
            delta_grad = torch.autograd.grad(hal, delta, only_inputs=True, retain_graph=False)[0]
            delta = self.update_delta(delta, delta_grad)
            delta.requires_grad_()
        return delta

    def update_delta(self, delta, delta_grad):
        """One inner ascent step + projection of ``yopo_inner_steps`` in plain torch: ``delta +
        adv_lr * g / max(||g_b||, 1e-10)`` per sample b, then, when adv_max_norm > 0, samples with
        ``||delta_b|| > adv_max_norm`` scaled onto that sphere (norm in delta's dtype; a zero delta
        gives NaN, as the original).  ``delta``, ``delta_grad``: [B, ...].  Returns a NEW detached
        tensor; the arguments are not modified."""
        denorm = torch.clamp(torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1), min=1e-10)
        delta = (delta + self.adv_lr * delta_grad / denorm).detach()
        if self.adv_max_norm > 0:
            delta_norm = torch.norm(delta.view(delta.size(0), -1), p=2, dim=1).detach()
            exceed_mask = (delta_norm > self.adv_max_norm).to(delta)
            delta = delta * (self.adv_max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1).detach()
        return delta

    def attack(self, model, inputs, gradient_accumulation_steps=1):
        """``yopo_train_step`` for one batch: 1 + adv_steps full forward/backward passes with
        ``loss / gradient_accumulation_steps / (1 + adv_steps)`` (parameter ``.grad``
        ACCUMULATE; nothing is zeroed, the caller steps the optimizer), with ``yopo_steps`` inner
        steps before each pass but the first.  ``inputs``: dict of model kwargs with
        ``input_ids`` [B, L] (replaced by ``inputs_embeds``) and ``attention_mask`` [B, L]; not
        modified.  Returns the sum of the scaled losses (detached 0-dim).  Raises KeyError without
        ``input_ids`` / ``attention_mask``, and what the model raises (no hook is left behind)."""
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        layer = first_layer_of(model, self.first_layer)
        embeds_init = lookup_embeddings(model, self.embedding, input_ids)
        delta = freelb_init_delta(embeds_init, inputs["attention_mask"], self.adv_init_mag, "l2")
        delta.requires_grad_()
        box = {}
        with capture_output_grad(layer, box):
            loss = model(**dict(inputs, inputs_embeds=delta + embeds_init)).loss.mean()
            loss = loss / gradient_accumulation_steps / (1 + self.adv_steps)
            loss.backward()
        total = loss.detach()
        for _ in range(self.adv_steps):
            p_var = box["grad"].clone().detach()
            const_embeds_init = lookup_embeddings(model, self.embedding, input_ids).detach()
            delta = self.inner_steps(model, layer, inputs, p_var, delta, const_embeds_init)
            adv_embeds_init = lookup_embeddings(model, self.embedding, input_ids)
            with capture_output_grad(layer, box):
                loss = model(**dict(inputs, inputs_embeds=delta + adv_embeds_init)).loss.mean()
                loss = loss / gradient_accumulation_steps / (1 + self.adv_steps)
                loss.backward()
            total = total + loss.detach()
        return total
