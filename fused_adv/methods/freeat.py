"""FreeAT with fused noise updates: the drop-in (reference: fused_adv.reference.freeat;
docs/methods.md §8 (FreeAT and YOPO)).

Same constructor, ``replay`` / ``train_batch`` and numbers as the reference.  Fused:

* ``'sign'`` (the original's persistent noise): the update ``noise <- clamp(noise + step *
  sign(g), -clip, clip)`` is ONE in-place pass over the batch's rows of the buffer
  (fused_adv.ops.freeat_update_; the reference runs sign, multiply, add into the buffer and a
  clamp of the whole buffer);
* ``'l2'`` (the FreeLB repo's NLP variant): one per-sample reduction pass over (delta, g) and one
  in-place update pass applying the step and the projection together
  (fused_adv.ops.freelb_reduce / freelb_update_, FreeLB's ops).

The noise leaf shares the buffer's storage (no copy per replay) and nothing is read back by the
host.  Nothing in the model is perturbed: the noise is an input, so a forward that raises leaves
the model as it was and the noise is not updated.

Departure (documented): the 'l2' step divides by ``max(||g_b||, 1e-8)`` (FreeLB's op); the
fairseq code divides by ``||g_b||`` unclamped, so a sample whose gradient is exactly 0 becomes NaN
there and keeps its delta here.

Usage::

    freeat = FreeAT(model, adv_steps=4, adv_lr=1/255, adv_max_norm=4/255)     # 'sign'
    for batch in loader:
        freeat.train_batch(inputs=batch, optimizer=optimizer)                  # 4 optimizer steps
"""
from __future__ import annotations

import math

import torch

from fused_adv._shared import check_steps, freelb_init_delta, lookup_embeddings
from fused_adv.ops import activation as _act
from fused_adv.ops import free as _free

__all__ = ["FreeAT"]

NORM_TYPES = ("sign", "l2")


class FreeAT:
    """``FreeAT(model=None, adv_steps=4, adv_norm_type='sign', adv_lr=1/255, adv_max_norm=4/255,
    adv_init_mag=2e-2, embedding=None, noise_shape=None, backend=None)``.

    Args:
        model: used when ``replay`` / ``train_batch`` are called without one (optional).
        adv_steps: m, the replays of every batch (one optimizer step each); >= 1.
        adv_norm_type: 'sign' (the original: persistent noise buffer, sign step, box clamp) or
            'l2' (the FreeLB repo's NLP variant: per-batch delta, per-sample L2 step).
        adv_lr: the ascent step ('sign': ``fgsm_step``; 'l2': ``adv_lr``).
        adv_max_norm: 'sign': the box radius ``clip_eps`` (<= 0: no clamp); 'l2': the projection
            radius (<= 0: no projection).
        adv_init_mag: 'l2' only: the magnitude of FreeLB's l2 init (0: zeros).
        embedding: the word-embedding module (default ``model.get_input_embeddings()``).
        noise_shape: 'sign' only: the buffer's shape [B_max, L_max, E] (default: the first
            batch's embedding shape).  A later batch may be smaller in B and L, never larger.
        backend: the op backend ('auto', 'torch', 'cpp', 'triton', 'cuda'; None: auto /
            FUSED_ADV_BACKEND).

    State: ``noise`` ('sign': the buffer, float in the embeddings' dtype, kept across batches and
    epochs until :meth:`reset`; 'l2': the current batch's delta).  Raises ValueError for
    ``adv_steps < 1``, an unknown ``adv_norm_type`` or a ``noise_shape`` that is not 3-D.
    """

    def __init__(self, model=None, adv_steps=4, adv_norm_type="sign", adv_lr=1.0 / 255, adv_max_norm=4.0 / 255,
                 adv_init_mag=2e-2, embedding=None, noise_shape=None, backend=None):
        """Stores and checks the arguments (see the class docstring); allocates nothing."""
        self.adv_steps = check_steps("FreeAT adv_steps", adv_steps)
        if adv_norm_type not in NORM_TYPES:
            raise ValueError(f"FreeAT adv_norm_type must be one of {NORM_TYPES}, got {adv_norm_type!r}")
        if noise_shape is not None and len(tuple(noise_shape)) != 3:
            raise ValueError(f"FreeAT noise_shape must be [B_max, L_max, E], got {tuple(noise_shape)}")
        self.adv_norm_type = adv_norm_type
        self.adv_lr = adv_lr
        self.adv_max_norm = adv_max_norm
        self.adv_init_mag = adv_init_mag
        self.embedding = embedding
        self.noise_shape = None if noise_shape is None else tuple(int(s) for s in noise_shape)
        self.model = model
        self.backend = backend
        self.noise = None

    def reset(self) -> None:
        """Drops the noise ('sign': the persistent buffer is allocated again, zeros, by the next
        replay).  Raises nothing."""
        self.noise = None

    def extra_memory_bytes(self) -> int:
        """Bytes held by the noise buffer / delta (0 before the first replay)."""
        return 0 if self.noise is None else self.noise.numel() * self.noise.element_size()

    # ------------------------------------------------------------------------------ 'sign'
    def _sign_buffer(self, embeds):
        """The persistent buffer, allocated (zeros) on first use; checks that the batch fits."""
        b, l, e = embeds.shape
        if self.noise is None:
            shape = self.noise_shape if self.noise_shape is not None else (b, l, e)
            self.noise = torch.zeros(shape, dtype=embeds.dtype, device=embeds.device)
        buf = self.noise
        if b > buf.shape[0] or l > buf.shape[1] or e != buf.shape[2]:
            raise ValueError(f"FreeAT: the noise buffer is {tuple(buf.shape)} but this batch's embeddings are "
                             f"{(b, l, e)}: a batch may not have more rows or positions than the buffer (pass "
                             f"noise_shape=[B_max, L_max, E] to FreeAT, or pad every batch to one length)")
        if buf.dtype != embeds.dtype or buf.device != embeds.device:
            raise ValueError(f"FreeAT: the noise buffer is {buf.dtype} on {buf.device} but the embeddings are "
                             f"{embeds.dtype} on {embeds.device}; call reset() after moving or casting the model")
        return buf

    # ------------------------------------------------------------------------------ replays
    def replay(self, model=None, inputs=None, j=0):
        """Replay ``j`` (0 <= j < adv_steps) of a batch: one forward on ``inputs_embeds = embeds +
        noise``, one backward (of ``loss`` for 'sign', ``loss / (1 + adv_steps)`` for 'l2'), then
        the fused noise update.  Parameter ``.grad`` receive this replay's gradient (zero them
        before, step the optimizer after).  'l2' draws a new delta when ``j == 0``.

        ``inputs``: dict of model kwargs with ``input_ids`` [B, L] (replaced by ``inputs_embeds``;
        the dict is not modified), ``attention_mask`` ('l2') and whatever makes the model return
        ``.loss``.  Returns the backpropagated loss (detached 0-dim, on the device).  Raises
        TypeError without model or inputs, KeyError without ``input_ids``, ValueError for a bad
        ``j``, a batch larger than the 'sign' buffer, a missing ``attention_mask`` ('l2') or a
        replay j > 0 without replay 0 of the same batch, RuntimeError when the noise gets no
        gradient, and what the model raises (the noise is then left as it was)."""
        model = model if model is not None else self.model
        if model is None or inputs is None:
            raise TypeError("FreeAT.replay(model, inputs): pass the model (here or to FreeAT(model=...)) and the "
                            "batch dict")
        if not 0 <= int(j) < self.adv_steps:
            raise ValueError(f"FreeAT.replay: j must be in [0, adv_steps={self.adv_steps}), got {j}")
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        embeds = lookup_embeddings(model, self.embedding, input_ids)
        if self.adv_norm_type == "sign":
            buf = self._sign_buffer(embeds)
            b, l = embeds.shape[:2]
            view = buf[:b, :l]
            work = view if view.is_contiguous() else view.contiguous()
            new_delta = None
        else:
            if int(j) == 0:
                if "attention_mask" not in inputs:
                    raise ValueError("FreeAT (l2): inputs needs an 'attention_mask' (used by the delta init)")
                new_delta = freelb_init_delta(embeds, inputs["attention_mask"], self.adv_init_mag, "l2").contiguous()
                work = new_delta
            else:
                if self.noise is None or self.noise.shape != embeds.shape:
                    raise ValueError("FreeAT (l2): replay j > 0 of a batch whose replay 0 did not run (delta is "
                                     f"{None if self.noise is None else tuple(self.noise.shape)}, the embeddings "
                                     f"{tuple(embeds.shape)})")
                work = self.noise
                new_delta = None
        leaf = work.detach().requires_grad_()          # shares work's storage: no copy per replay
        inputs["inputs_embeds"] = embeds + leaf
        loss = model(**inputs).loss.mean()
        if self.adv_norm_type == "l2":
            loss = loss / (1 + self.adv_steps)
        loss.backward()
        grad = leaf.grad
        if grad is None:
            raise RuntimeError("FreeAT: the noise got no gradient: the model must take 'inputs_embeds' and its loss "
                               "must depend on them")
        with torch.no_grad():
            if self.adv_norm_type == "sign":
                clip = self.adv_max_norm if self.adv_max_norm > 0 else math.inf
                _free.freeat_update_(work, grad, self.adv_lr, clip, backend=self.backend)
                if work is not view:
                    view.copy_(work)
            else:
                stats = _act.freelb_reduce(work, grad, False, backend=self.backend)
                _act.freelb_update_(work, grad, stats, self.adv_lr, self.adv_max_norm, False, backend=self.backend)
                if new_delta is not None:
                    self.noise = new_delta
        return loss.detach()

    def train_batch(self, model=None, inputs=None, optimizer=None):
        """The original's inner loop for one batch: ``adv_steps`` times ``optimizer.zero_grad()``,
        :meth:`replay` ``(model, inputs, j)``, ``optimizer.step()``.  Returns the replays' losses
        (float tensor [adv_steps], on the device).  Raises TypeError without an optimizer, and what
        :meth:`replay` raises."""
        if optimizer is None:
            raise TypeError("FreeAT.train_batch(model, inputs, optimizer): the optimizer is stepped after every replay")
        losses = []
        for j in range(self.adv_steps):
            optimizer.zero_grad()
            losses.append(self.replay(model, inputs, j))
            optimizer.step()
        return torch.stack(losses)
