"""SMART (Jiang et al., ACL 2020): the reference implementation (SPEC.md section 7).

A readable restatement of the smoothness-inducing adversarial regulariser of namisan/mt-dnn
(``mt_dnn/perturbation.py``, ``SmartPerturbation`` with ``stable_kl`` and ``SymKlCriterion``),
for HuggingFace-style models:

* the noise lives on the EMBEDDING-MODULE OUTPUT (after LayerNorm/dropout): the embedding output
  ``embed`` is computed once by an extra forward that stops after the embedding module (a forward
  hook captures it; its graph to the embedding parameters is kept, as in mt-dnn);
* noise = N(0, 1) * noise_var, drawn in embed's dtype;
* K ascent steps: adv_loss = stable_kl(adv_logits, clean_logits.detach()) (mean over rows);
  g = autograd.grad(adv_loss, noise) (parameter .grad untouched); if ‖g‖ is NaN/Inf the method
  returns 0 (host read, as in the original); else noise <- normalize(noise + step_size * g) with
  normalize(v) = v / (max_j |v_j| + epsilon) per token;
* final: adv_loss = SymKL(clean_logits, adv_logits), batchmean, each direction's target detached;
  the caller adds ``adv_alpha * adv_loss`` to the task loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SMART", "stable_kl", "sym_kl_batchmean"]


def stable_kl(logit, target, epsilon=1e-6, reduce=True):
    """mt-dnn's numerically stable KL: sum(p * (rp - ry) * 2) / rows, with rp = -log(1/(p+eps) - 1
    + eps) (detached) and p = softmax(logit), y = softmax(target); float32."""
    logit = logit.view(-1, logit.size(-1)).float()
    target = target.view(-1, target.size(-1)).float()
    bs = logit.size(0)
    p = F.log_softmax(logit, 1).exp()
    y = F.log_softmax(target, 1).exp()
    rp = -(1.0 / (p + epsilon) - 1 + epsilon).detach().log()
    ry = -(1.0 / (y + epsilon) - 1 + epsilon).detach().log()
    if reduce:
        return (p * (rp - ry) * 2).sum() / bs
    return (p * (rp - ry) * 2).sum()


def sym_kl_batchmean(input, target):
    """mt-dnn SymKlCriterion (alpha 1): KL(softmax(target).detach() || input) +
    KL(softmax(input).detach() || target), reduction='batchmean', float32."""
    input = input.float()
    target = target.float()
    return (F.kl_div(F.log_softmax(input, dim=-1, dtype=torch.float32),
                     F.softmax(target.detach(), dim=-1, dtype=torch.float32), reduction="batchmean")
            + F.kl_div(F.log_softmax(target, dim=-1, dtype=torch.float32),
                       F.softmax(input.detach(), dim=-1, dtype=torch.float32), reduction="batchmean"))


class _Stop(Exception):
    pass


def embedding_module_of(model):
    """The module whose output is perturbed: ``model.base_model.embeddings`` for HF models."""
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if emb is None:
        raise ValueError("SMART: cannot find the embedding module (model.base_model.embeddings); "
                         "pass embedding_module=")
    return emb


def embedding_output(model, module, batch):
    """Runs ``model(**batch)`` only up to ``module`` and returns that module's output (with its
    graph to the embedding parameters); the rest of the model is not run."""
    box = {}

    def hook(mod, args, out):
        box["out"] = out
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        h.remove()
    return box["out"]


def logits_with_embedding(model, module, batch, embed):
    """``model(**batch).logits`` with ``module``'s output replaced by ``embed``."""
    h = module.register_forward_hook(lambda mod, args, out: embed)
    try:
        return model(**batch).logits
    finally:
        h.remove()


class SMART:
    """SMART adversarial regulariser in a plain loop.

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
        self.adv_alpha = adv_alpha
        self.noise_var = noise_var
        self.step_size = step_size
        self.epsilon = epsilon
        self.adv_K = adv_K
        self.embedding_module = embedding_module

    def _norm_grad(self, grad):
        return grad / (grad.abs().max(-1, keepdim=True)[0] + self.epsilon)

    def loss(self, model, batch, logits):
        module = self.embedding_module if self.embedding_module is not None else embedding_module_of(model)
        embed = embedding_output(model, module, batch)
        noise = embed.data.new(embed.size()).normal_(0, 1) * self.noise_var
        noise.requires_grad_()
        for _ in range(self.adv_K):
            adv_logits = logits_with_embedding(model, module, batch, embed + noise)
            adv_loss = stable_kl(adv_logits, logits.detach())
            delta_grad, = torch.autograd.grad(adv_loss, noise, only_inputs=True, retain_graph=False)
            norm = delta_grad.norm()
            if torch.isnan(norm) or torch.isinf(norm):
                return 0
            delta_grad = noise + delta_grad * self.step_size
            noise = self._norm_grad(delta_grad).detach()
            noise.requires_grad_()
        adv_logits = logits_with_embedding(model, module, batch, embed + noise)
        return self.adv_alpha * sym_kl_batchmean(logits, adv_logits)
