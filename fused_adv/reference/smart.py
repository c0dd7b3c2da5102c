"""SMART (Jiang et al., ACL 2020): the reference implementation
(docs/methods.md §7 (SMART)).

A readable restatement of the smoothness-inducing adversarial regulariser of namisan/mt-dnn
(``mt_dnn/perturbation.py``, ``SmartPerturbation`` with ``stable_kl`` and ``SymKlCriterion``),
for HuggingFace-style models:

* the noise lives on the EMBEDDING-MODULE OUTPUT (after LayerNorm/dropout): the embedding output
  ``embed`` is computed once by an extra forward that stops after the embedding module (a forward
  hook captures it; its graph to the embedding parameters is kept, as in mt-dnn);
* noise = N(0, 1) * noise_var, drawn in embed's dtype;
* K ascent steps: adv_loss = stable_kl(adv_logits, clean_logits.detach(), reduce=False) -- a SUM
  over rows, as mt-dnn's K-step SmartPerturbation calls it (the final loss below is batchmean);
  g = autograd.grad(adv_loss, noise) (parameter .grad untouched); if ‖g‖ is NaN/Inf the method
  returns 0 (host read, as in the original); else noise <- normalize(noise + step_size * g) with
  normalize(v) = v / (max_j |v_j| + epsilon) per token;
* final: adv_loss = SymKL(clean_logits, adv_logits), batchmean, each direction's target detached;
  the caller adds ``adv_alpha * adv_loss`` to the task loss.
"""
from __future__ import annotations

import torch

# stable_kl and sym_kl_batchmean are looked up in this module's namespace at call time (tests
# patch them here); they and the embedding hooks are shared with the fused class
from fused_adv._shared import (embedding_module_of, embedding_output, logits_with_embedding, stable_kl,
                               sym_kl_batchmean)

__all__ = ["SMART", "stable_kl", "sym_kl_batchmean", "embedding_module_of", "embedding_output",
           "logits_with_embedding"]


class SMART:
    """``SMART(adv_alpha=1.0, noise_var=1e-5, step_size=1e-3, epsilon=1e-6, adv_K=1,
    embedding_module=None)``: the SMART adversarial regulariser in a plain loop.

    Args:
        adv_alpha: weight of the adversarial loss (the returned value is already multiplied).
        noise_var: scale of the initial Gaussian noise (1e-5).
        step_size: ascent step (1e-3).
        epsilon: normalisation epsilon (1e-6).
        adv_K: number of ascent steps (1).
        embedding_module: the module whose output is perturbed (default
            ``model.base_model.embeddings``).

    Usage::

        out = model(**batch); logits = out.logits
        loss = out.loss + smart.loss(model, batch, logits)
        loss.backward()

    ``batch``: the model's keyword arguments (labels are passed through unchanged; only
    ``.logits`` is read).  Returns ``adv_alpha * adv_loss`` (a 0-dim tensor), or 0 when the
    ascent gradient is NaN/Inf.
    """

    def __init__(self, adv_alpha=1.0, noise_var=1e-5, step_size=1e-3, epsilon=1e-6, adv_K=1,
                 embedding_module=None):
        """Stores the arguments (see the class docstring); allocates nothing.  Raises nothing."""
        self.adv_alpha = adv_alpha
        self.noise_var = noise_var
        self.step_size = step_size
        self.epsilon = epsilon
        self.adv_K = adv_K
        self.embedding_module = embedding_module

    def _norm_grad(self, grad):
        """``grad / (max_j |grad_j| + epsilon)`` per token (over the last dim); a new tensor."""
        return grad / (grad.abs().max(-1, keepdim=True)[0] + self.epsilon)

    def loss(self, model, batch, logits):
        """The SMART term for one batch, to add to the task loss.

        ``batch``: the model's kwargs; ``logits``: the clean logits [B, C] of that batch (any
        float dtype; the term back-propagates into them and, through the perturbed forward, into
        the parameters).  Runs one forward up to the embedding module, draws the noise (N(0, 1) *
        noise_var in the embedding output's dtype), takes ``adv_K`` ascent steps (each a forward
        and an ``autograd.grad`` w.r.t. the noise only: parameter ``.grad`` are not touched) and
        one final forward.  Returns ``adv_alpha * sym_kl_batchmean(logits, adv_logits)`` (float32
        0-dim), or the Python int 0 when an ascent gradient's norm is NaN/Inf (read on the host).
        Raises ValueError when no embedding module is found, and what the model raises.
        """
        module = self.embedding_module if self.embedding_module is not None else embedding_module_of(model)
        embed = embedding_output(model, module, batch)
        noise = embed.data.new(embed.size()).normal_(0, 1) * self.noise_var
        noise.requires_grad_()
        for _ in range(self.adv_K):
            adv_logits = logits_with_embedding(model, module, batch, embed + noise)
            adv_loss = stable_kl(adv_logits, logits.detach(), reduce=False)   # a sum over rows, as mt-dnn
            delta_grad, = torch.autograd.grad(adv_loss, noise, only_inputs=True, retain_graph=False)
            norm = delta_grad.norm()
            if torch.isnan(norm) or torch.isinf(norm):
                return 0
            delta_grad = noise + delta_grad * self.step_size
            noise = self._norm_grad(delta_grad).detach()
            noise.requires_grad_()
        adv_logits = logits_with_embedding(model, module, batch, embed + noise)
        return self.adv_alpha * sym_kl_batchmean(logits, adv_logits)
