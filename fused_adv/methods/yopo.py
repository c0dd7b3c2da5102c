"""YOPO (NLP variant) with fused inner steps: the drop-in (reference: fused_adv.reference.yopo;
docs/methods.md §8 (FreeAT and YOPO)).

Same constructor, ``attack`` and numbers as the reference (the FreeLB repo's ``yopo_train_step``).
Fused: every Hamiltonian inner step's ascent is one per-sample reduction pass over (delta, g) and
one in-place update pass that applies the normalised step and the projection together
(fused_adv.ops.freelb_reduce / freelb_update_, FreeLB's ops); the reference runs a norm, a clamp,
a division, a multiply-add and, with a projection, a second norm and a rescale.  No host sync.

"First layer" (constructor argument ``first_layer``; :func:`fused_adv._shared.first_layer_of`):
by default the first transformer block (``model.base_model.encoder.layer[0]`` for BERT-likes),
reached through the model's own embedding module -- what fairseq's ``Hamiltonian_fwd`` computes
(embedding post-processing + ``layers[0]``), and the cheapest layer the co-state can be held at.

Departure (documented): the inner step divides by ``max(||g_b||, 1e-8)`` (FreeLB's op) where
the fairseq code clamps at 1e-10; they differ only for a sample whose Hamiltonian gradient norm
lies below 1e-8.

Usage::

    yopo = YOPO(model, adv_steps=2, yopo_steps=3, adv_lr=0.1, adv_init_mag=0.02)
    for batch in loader:
        loss = yopo.attack(inputs=batch)      # 1 + adv_steps full passes, grads accumulate
        optimizer.step(); optimizer.zero_grad()
"""
from __future__ import annotations

import torch

from fused_adv._shared import (capture_output_grad, check_steps, embedding_output, first_layer_of, freelb_init_delta,
                               hidden_of, lookup_embeddings)
from fused_adv.ops import activation as _ops

__all__ = ["YOPO"]


class YOPO:
    """``YOPO(model=None, adv_steps=2, yopo_steps=3, adv_lr=1e-1, adv_init_mag=2e-2,
    adv_max_norm=0.0, embedding=None, first_layer=None, backend=None)``: YOPO-m-n (m = 1 +
    adv_steps full passes, n = yopo_steps inner steps before each pass but the first).

    Args:
        model: used when ``attack`` is called without one (optional; with it, a ``first_layer``
            name is checked here).
        adv_steps: full forward/backward passes after the first one; >= 1.
        yopo_steps: Hamiltonian inner steps per full pass; >= 1.
        adv_lr: inner ascent step size.
        adv_init_mag: magnitude of FreeLB's l2 init (0: zeros).
        adv_max_norm: projection radius (0: no projection).
        embedding: the word-embedding module (default ``model.get_input_embeddings()``).
        first_layer: the module whose output the co-state p is taken at: a module, its name in
            ``model.named_modules()``, or None (the first transformer block).
        backend: the op backend ('auto', 'torch', 'cpp', 'triton', 'cuda'; None: auto /
            FUSED_ADV_BACKEND).

    Raises ValueError for ``adv_steps`` or ``yopo_steps`` < 1 and, when ``model`` is given, for a
    ``first_layer`` name that is not one of its modules.
    """

    def __init__(self, model=None, adv_steps=2, yopo_steps=3, adv_lr=1e-1, adv_init_mag=2e-2, adv_max_norm=0.0,
                 embedding=None, first_layer=None, backend=None):
        """Stores and checks the arguments (see the class docstring); allocates nothing."""
        self.adv_steps = check_steps("YOPO adv_steps", adv_steps)
        self.yopo_steps = check_steps("YOPO yopo_steps", yopo_steps)
        self.adv_lr = adv_lr
        self.adv_init_mag = adv_init_mag
        self.adv_max_norm = adv_max_norm
        self.embedding = embedding
        self.first_layer = first_layer
        self.model = model
        self.backend = backend
        if model is not None:
            first_layer_of(model, first_layer)       # an unknown name fails here, not mid-training

    def update_delta(self, delta, grad):
        """One inner ascent step + projection, IN PLACE on ``delta`` [B, ...] (contiguous, not
        requiring grad): ``delta + adv_lr * g / max(||g_b||, 1e-8)`` per sample, then samples
        with ``||delta_b|| > adv_max_norm`` (> 0) scaled onto that sphere; one fused reduction
        and one fused update pass.  ``grad``: same shape and dtype, not modified.  Returns
        ``delta``.  Raises ValueError for mismatched or non-contiguous tensors."""
        with torch.no_grad():
            stats = _ops.freelb_reduce(delta, grad, False, backend=self.backend)
            _ops.freelb_update_(delta, grad, stats, self.adv_lr, self.adv_max_norm, False, backend=self.backend)
        return delta

    def inner_steps(self, model, layer, inputs, p_var, delta, embeds_init):
        """``yopo_steps`` ascent steps of ``delta`` (a leaf requiring grad, updated in place) on
        H = sum(first_layer(embeds_init + delta) * p_var), ``embeds_init`` detached; each runs
        the model only up to ``layer`` and differentiates w.r.t. delta only (parameter ``.grad``
        untouched).  Returns ``delta``.  Raises what the model raises (no hook left behind)."""
        for _ in range(self.yopo_steps):
            out = hidden_of(embedding_output(model, layer, dict(inputs, inputs_embeds=embeds_init + delta)))
            hal = torch.sum(out * p_var)
            grad, = torch.autograd.grad(hal, delta, only_inputs=True, retain_graph=False)
            self.update_delta(delta.detach(), grad)      # shares delta's storage; the graph is gone
        return delta

    def attack(self, model=None, inputs=None, gradient_accumulation_steps=1):
        """YOPO for one batch: 1 + adv_steps full forward/backward passes, each back-propagating
        ``loss.mean() / gradient_accumulation_steps / (1 + adv_steps)`` (parameter ``.grad``
        ACCUMULATE; nothing is zeroed, the caller steps the optimizer), with ``yopo_steps`` fused
        inner steps before each pass but the first, the co-state p being the first-layer output
        gradient of the latest pass.

        ``inputs``: dict of model kwargs with ``input_ids`` [B, L] (replaced by
        ``inputs_embeds``; not modified), ``attention_mask`` [B, L] and whatever makes the model
        return ``.loss``.  Returns the sum of the scaled losses (detached 0-dim, on the device).
        Raises TypeError without model or inputs, KeyError without ``input_ids``, ValueError
        without ``attention_mask`` or for an unknown ``first_layer`` name, RuntimeError when the
        first layer's output gets no gradient, and what the model raises (no hook is left
        behind; nothing in the model is perturbed)."""
        model = model if model is not None else self.model
        if model is None or inputs is None:
            raise TypeError("YOPO.attack(model, inputs): pass the model (here or to YOPO(model=...)) and the batch dict")
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        if "attention_mask" not in inputs:
            raise ValueError("YOPO.attack: inputs needs an 'attention_mask' (used by the delta init)")
        layer = first_layer_of(model, self.first_layer)
        embeds = lookup_embeddings(model, self.embedding, input_ids)
        delta = freelb_init_delta(embeds, inputs["attention_mask"], self.adv_init_mag, "l2").contiguous()
        delta.requires_grad_()
        box = {}
        total = None
        for k in range(1 + self.adv_steps):
            if k > 0:
                if "grad" not in box:
                    raise RuntimeError(f"YOPO: the first layer ({type(layer).__name__}) got no gradient: it must lie "
                                       "between the embeddings and the loss")
                p_var = box.pop("grad")
                const = lookup_embeddings(model, self.embedding, input_ids).detach()
                delta = self.inner_steps(model, layer, inputs, p_var, delta, const)
                embeds = lookup_embeddings(model, self.embedding, input_ids)
            with capture_output_grad(layer, box):
                loss = model(**dict(inputs, inputs_embeds=delta + embeds)).loss.mean()
                loss = loss / gradient_accumulation_steps / (1 + self.adv_steps)
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total
