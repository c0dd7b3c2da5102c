"""FreeAT ("free" adversarial training): the reference implementation
(docs/methods.md §8 (FreeAT and YOPO)).

Two originals, one class, each with its own step rule (``adv_norm_type``):

* ``'sign'`` -- mahyarnajibi/FreeAdversarialTraining ``main_free.py``: ONE noise buffer, created
  once (zeros) and kept across minibatches and epochs; batch b uses its first B rows.  Each
  minibatch is replayed m (``adv_steps``, the original's ``n_repeats``) times; each replay:
  forward on x + noise, ``zero_grad``, backward, ``noise[:B] += step * sign(g_noise)``, the whole
  buffer clamped to +-clip, ``optimizer.step()``.  One backward gives both the parameter step and
  the ascent.
* ``'l2'`` -- zhuchen03/FreeLB fairseq-RoBERTa ``trainer.py freeat_train_step`` /
  ``tasks/sentence_prediction.py freeat_adv_train_step``: delta drawn anew for each batch with
  FreeLB's l2 init; m replays, each: forward on embeds + delta, ``loss / (1 + adv_steps)``,
  backward, ``delta <- delta + adv_lr * g / ||g_b||`` per sample (no clamp of the norm: a sample
  with a zero gradient becomes NaN, as in the original), rescaled onto the ``adv_max_norm`` sphere
  when it leaves it, ``optimizer.step()``.

Adapted to HF models (both rules): the noise lives on the word-embedding OUTPUT
(``inputs_embeds = embedding(input_ids) + noise``, looked up again at every replay since the
weights move); the images' ``clamp(x + noise, 0, 1)`` of the original has no counterpart there
and is dropped; for 'sign' the buffer has the embeddings' [B, L, E] shape and a batch uses
``noise[:B, :L]`` (a batch with more rows or positions than the buffer is an error).  Dropout
masks are drawn anew by every forward (the fairseq code can reuse them; it needs a patched model).
"""
from __future__ import annotations

import torch

from fused_adv._shared import freelb_init_delta, lookup_embeddings

__all__ = ["FreeAT"]


class FreeAT:
    """``FreeAT(adv_steps=4, adv_norm_type='sign', adv_lr=..., adv_max_norm=..., adv_init_mag=2e-2,
    embedding=None, noise_shape=None)``: free adversarial training in a plain loop.

    Args:
        adv_steps: m, the replays of every batch (one optimizer step each).
        adv_norm_type: 'sign' (the original: persistent noise, sign step, box clamp) or 'l2'
            (the FreeLB repo's NLP variant: per-batch delta, per-sample L2 step).
        adv_lr: the ascent step ('sign': the original's ``fgsm_step``; 'l2': ``adv_lr``).
        adv_max_norm: 'sign': the box radius ``clip_eps`` (<= 0: no clamp); 'l2': the projection
            radius ``max_norm`` (<= 0: no projection).
        adv_init_mag: 'l2' only: the magnitude of FreeLB's l2 init (0: zeros).  'sign' starts
            from zeros, as the original.
        embedding: the word-embedding module (default ``model.get_input_embeddings()``).
        noise_shape: 'sign' only: the buffer's shape [B_max, L_max, E] (default: the first
            batch's embedding shape).

    Usage::

        freeat = FreeAT(adv_steps=4, adv_lr=2/255, adv_max_norm=4/255)     # 'sign'
        for batch in loader:
            losses = freeat.train_batch(model, batch, optimizer)           # m optimizer steps
        # or, one replay at a time (the caller steps the optimizer after each):
        for batch in loader:
            for j in range(freeat.adv_steps):
                optimizer.zero_grad(); freeat.replay(model, batch, j); optimizer.step()

    ``batch`` is a dict of model kwargs with ``input_ids`` (replaced by ``inputs_embeds``),
    ``attention_mask`` ('l2': used by the init) and whatever makes the model return ``.loss``.
    """

    def __init__(self, adv_steps=4, adv_norm_type="sign", adv_lr=1.0 / 255, adv_max_norm=4.0 / 255,
                 adv_init_mag=2e-2, embedding=None, noise_shape=None):
        """Stores the arguments (see the class docstring); allocates nothing."""
        self.adv_steps = adv_steps
        self.adv_norm_type = adv_norm_type
        self.adv_lr = adv_lr
        self.adv_max_norm = adv_max_norm
        self.adv_init_mag = adv_init_mag
        self.embedding = embedding
        self.noise_shape = noise_shape
        self.noise = None     # 'sign': the persistent buffer; 'l2': the current batch's delta

    def _noise_for(self, embeds, attention_mask, j):
        """The perturbation of this replay (a new leaf requiring grad) for embeddings [B, L, E]."""
        if self.adv_norm_type == "sign":
            if self.noise is None:
                shape = tuple(self.noise_shape) if self.noise_shape is not None else tuple(embeds.shape)
                self.noise = torch.zeros(shape, dtype=embeds.dtype, device=embeds.device)
            b, l = embeds.shape[:2]
            return self.noise[:b, :l].detach().clone().requires_grad_()
        if j == 0 or self.noise is None:
            # trainer.py: delta_list[i] = None for each new batch; freeat_adv_train_step draws it
            self.noise = freelb_init_delta(embeds, attention_mask, self.adv_init_mag, "l2")
        return self.noise.detach().clone().requires_grad_()

    def _update(self, grad):
        """The original's noise update from the gradient of this replay's noise."""
        if self.adv_norm_type == "sign":
            b, l = grad.shape[:2]
            pert = self.adv_lr * torch.sign(grad)               # lib/utils.py fgsm(gradz, step_size)
            self.noise[:b, :l] += pert.data
            if self.adv_max_norm > 0:
                self.noise.clamp_(-self.adv_max_norm, self.adv_max_norm)
            return
        delta = self.noise
        denorm = torch.norm(grad.view(grad.size(0), -1), dim=1).view(-1, 1, 1)
        delta = (delta + self.adv_lr * grad / denorm).detach()
        if self.adv_max_norm > 0:
            delta_norm = torch.norm(delta.view(delta.size(0), -1), p=2, dim=1).detach()
            exceed_mask = (delta_norm > self.adv_max_norm).to(delta)
            delta = delta * (self.adv_max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1).detach()
        self.noise = delta

    def replay(self, model, inputs, j=0):
        """Replay ``j`` (0 <= j < adv_steps) of a batch: one forward on ``inputs_embeds = embeds +
        noise``, one backward (of ``loss`` for 'sign', ``loss / (1 + adv_steps)`` for 'l2'), then
        the noise update.  Parameter ``.grad`` receive this replay's gradient (the caller zeroes
        them before and steps the optimizer after, as the original).  'l2' draws a new delta when
        ``j == 0``.  Returns the backpropagated loss (detached 0-dim).  Raises KeyError without
        ``input_ids``, and what the model raises (the noise is then not updated)."""
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        embeds = lookup_embeddings(model, self.embedding, input_ids)
        noise = self._noise_for(embeds, inputs.get("attention_mask"), j)
        inputs["inputs_embeds"] = embeds + noise
        loss = model(**inputs).loss.mean()
        if self.adv_norm_type == "l2":
            loss = loss / (1 + self.adv_steps)
        loss.backward()
        self._update(noise.grad.detach())
        return loss.detach()

    def train_batch(self, model, inputs, optimizer):
        """The original's inner loop for one batch: ``adv_steps`` times ``zero_grad``, :meth:`replay`,
        ``optimizer.step()``.  Returns the replays' losses (a float tensor [adv_steps]).  Raises
        what :meth:`replay` raises."""
        losses = []
        for j in range(self.adv_steps):
            optimizer.zero_grad()
            losses.append(self.replay(model, inputs, j))
            optimizer.step()
        return torch.stack(losses)
