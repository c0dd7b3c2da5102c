"""SMART with a fused per-token noise update: the drop-in (reference: fused_adv.reference.smart;
docs/methods.md §7 (SMART)).

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

# stable_kl / sym_kl_batchmean are looked up in this module's namespace at call time (tests patch
# them here); they and the embedding hooks are shared with the reference class
from fused_adv._shared import (embedding_module_of, embedding_output, logits_with_embedding, stable_kl,
                               sym_kl_batchmean)
from fused_adv.ops import activation as _ops

__all__ = ["SMART", "stable_kl", "sym_kl_batchmean"]


class SMART:
    """``SMART(adv_alpha=1.0, noise_var=1e-5, step_size=1e-3, epsilon=1e-6, adv_K=1,
    embedding_module=None, backend=None, host_guard=False)``.

    Args:
        adv_alpha: weight of the adversarial loss (the returned value is already multiplied).
        noise_var: scale of the initial Gaussian noise.
        step_size: ascent step.
        epsilon: normalisation epsilon of ``v / (max_j |v_j| + epsilon)``.
        adv_K: number of ascent steps.
        embedding_module: the module whose output is perturbed (default
            ``model.base_model.embeddings``).
        backend: the op backend ('auto', 'torch', 'cpp', 'triton', 'cuda'; None: auto /
            FUSED_ADV_BACKEND).
        host_guard: read the NaN/Inf flag on the host and return the int 0 as the reference does.

    ``loss(model, batch, logits)``: ``batch`` = the model's kwargs, ``logits`` = the clean logits
    [B, C] of that batch.  Returns ``adv_alpha * SymKL(logits, adv_logits)`` (0-dim tensor) to add
    to the task loss.  Parameter ``.grad`` are not touched by the ascent steps.
    """

    def __init__(self, adv_alpha=1.0, noise_var=1e-5, step_size=1e-3, epsilon=1e-6, adv_K=1,
                 embedding_module=None, backend=None, host_guard=False):
        """Stores the arguments (see the class docstring); raises nothing."""
        self.adv_alpha = adv_alpha
        self.noise_var = noise_var
        self.step_size = step_size
        self.epsilon = epsilon
        self.adv_K = adv_K
        self.embedding_module = embedding_module
        self.backend = backend
        self.host_guard = host_guard

    def loss(self, model, batch, logits):
        """The SMART term for one batch, to add to the task loss.

        ``batch``: the model's kwargs; ``logits``: the clean logits [B, C] of that batch (any
        float dtype; the term back-propagates into them and, through the perturbed forward, into
        the parameters).  Runs one forward up to the embedding module, draws the noise (N(0, 1) *
        noise_var in the embedding output's dtype, the reference's draw), takes ``adv_K`` ascent
        steps (each a forward, an ``autograd.grad`` w.r.t. the noise only — parameter ``.grad``
        are not touched — and one fused in-place noise update) and one final forward.

        Returns ``adv_alpha * sym_kl_batchmean(logits, adv_logits)`` (float32 0-dim); when an
        ascent gradient's norm is NaN/Inf, a 0-valued tensor with zero gradient (device guard),
        or the Python int 0 with ``host_guard=True``.  Raises ValueError when no embedding module
        is found, and what the model raises.
        """
        module = self.embedding_module if self.embedding_module is not None else embedding_module_of(model)
        embed = embedding_output(model, module, batch)
        noise = (embed.detach().new(embed.size()).normal_(0, 1) * self.noise_var).contiguous()
        noise.requires_grad_()
        ok = None
        for _ in range(self.adv_K):
            adv_logits = logits_with_embedding(model, module, batch, embed + noise)
            adv_loss = stable_kl(adv_logits, logits.detach(), reduce=False)   # a sum over rows, as mt-dnn
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
