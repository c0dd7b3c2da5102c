"""SMART with a fused per-token noise update: the drop-in (reference: fused_adv.reference.smart).

Same constructor, ``loss`` and numbers as the reference (mt-dnn's SmartPerturbation).  Fused:
the ascent step is one reduction pass over the gradient (per-token max|g| and Σg², from which
the ‖g‖ NaN/Inf guard is decided on the device) and one in-place pass computing
``noise <- v / (max_j|v_j| + epsilon)``, ``v = noise + step_size * g``.

Departure (documented): when ‖g‖ is NaN/Inf the reference returns the Python int 0 after a host
read; here the guard stays on the device: the noise is left unchanged, the final forward runs and
the returned loss is ``where(ok, loss, 0)`` (value 0, zero gradient) — no host sync.  Pass
``host_guard=True`` to read the flag on the host and return 0 exactly as the reference.

Usage::

    smart = SMART(adv_alpha=1.0)
    out = model(**batch)
    loss = out.loss + smart.loss(model, batch, out.logits)
    loss.backward()
"""
from __future__ import annotations

import torch

from fused_adv.ops import activation as _ops
from fused_adv.reference.smart import (SMART as _ReferenceSMART, embedding_module_of, embedding_output,
                                       logits_with_embedding, stable_kl, sym_kl_batchmean)

__all__ = ["SMART", "stable_kl", "sym_kl_batchmean"]


class SMART(_ReferenceSMART):
    """SMART(adv_alpha=1.0, noise_var=1e-5, step_size=1e-3, epsilon=1e-6, adv_K=1,
    embedding_module=None, backend=None, host_guard=False).

    ``loss(model, batch, logits)``: ``batch`` = the model's kwargs, ``logits`` = the clean logits
    [B, C] of that batch.  Returns ``adv_alpha * SymKL(logits, adv_logits)`` (0-dim tensor) to add
    to the task loss.  Parameter ``.grad`` are not touched by the ascent steps.
    """

    def __init__(self, adv_alpha=1.0, noise_var=1e-5, step_size=1e-3, epsilon=1e-6, adv_K=1,
                 embedding_module=None, backend=None, host_guard=False):
        super().__init__(adv_alpha=adv_alpha, noise_var=noise_var, step_size=step_size, epsilon=epsilon,
                         adv_K=adv_K, embedding_module=embedding_module)
        self.backend = backend
        self.host_guard = host_guard

    def loss(self, model, batch, logits):
        module = self.embedding_module if self.embedding_module is not None else embedding_module_of(model)
        embed = embedding_output(model, module, batch)
        noise = (embed.detach().new(embed.size()).normal_(0, 1) * self.noise_var).contiguous()
        noise.requires_grad_()
        ok = None
        for _ in range(self.adv_K):
            adv_logits = logits_with_embedding(model, module, batch, embed + noise)
            adv_loss = stable_kl(adv_logits, logits.detach())
            grad, = torch.autograd.grad(adv_loss, noise, only_inputs=True, retain_graph=False)
            with torch.no_grad():
                step_ok = _ops.smart_update_(noise.detach(), grad, None, self.step_size, self.epsilon,
                                             backend=self.backend)
            ok = step_ok if ok is None else ok * step_ok
            if self.host_guard and not bool(step_ok):
                return 0
        adv_logits = logits_with_embedding(model, module, batch, embed + noise)
        adv = sym_kl_batchmean(logits, adv_logits)
        if ok is not None:
            adv = torch.where(ok > 0, adv, torch.zeros_like(adv))
        return self.adv_alpha * adv
