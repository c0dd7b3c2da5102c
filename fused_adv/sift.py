"""SiFT (Scale-Invariant Fine-Tuning, DeBERTa) with fused activation ops: the drop-in.

Same API and numbers as DeBERTa's ``DeBERTa.sift`` (reference: fused_adv.reference.sift)::

    from fused_adv.sift import hook_sift_layer, AdversarialLearner
    adv_modules = hook_sift_layer(model, hidden_size=768)
    adv = AdversarialLearner(model, adv_modules)
    logits = model(**batch).logits                       # clean forward (stores x̂)
    loss = task_loss + adv.loss(logits, logits_fn, **batch) * vat_lambda

What is fused (fused_adv.ops.activation): the non-affine LayerNorm of the clean forward (one
pass, differentiable: ``ln_delta``), the delta init + first perturbed input (``sift_perturb``:
clamp the noise and add it to x̂ in one pass), and the delta update (``row_absmax_sumsq``: one
reduction pass over the gradient; ``sift_update_``: step delta in place and write the new
perturbed input in the same pass).  The NaN/Inf guard on ‖g‖ is decided on the device: no host
sync per update (the original reads ‖g‖ on the host).

Deliberate departures (documented, none changes the numbers in normal use):
* ``hook_sift_layer`` raises ValueError when ``target_module`` matches no module (the original
  silently returns []);
* ``update_delta`` always returns True (the guard is on the device; the original returns False
  when it skips the step); it raises a clear error if delta has no gradient;
* ``AdversarialLearner.loss`` restores requires_grad and normal mode even when the adversarial
  forward raises (the original leaves the parameters frozen);
* ``bind_each=True`` (opt-in) gives each matched module its own PerturbationLayer; by default the
  original's late binding is kept (every hook calls the last layer).
"""
from __future__ import annotations

import torch

from fused_adv.ops import activation as _ops
from fused_adv.reference import sift as _reference_sift
from fused_adv.reference.sift import kl, mse, perturbation_loss_fns, symmetric_kl  # noqa: F401 (same API)

__all__ = ["PerturbationLayer", "AdversarialLearner", "hook_sift_layer", "symmetric_kl", "kl", "mse",
           "perturbation_loss_fns"]

LN_EPS = 1e-7


class PerturbationLayer(torch.nn.Module):
    """Normalises its input (LayerNorm over the last dim, eps 1e-7, no affine) and, in
    adversarial mode, returns x̂.detach() + delta (delta float32, result in x̂'s dtype).

    Args: hidden_size (H of the [..., H] activations), learning_rate, init_perturbation (sigma
    of the initial delta, clamped to +-2 sigma), backend ('auto', 'torch', 'cpp', 'triton',
    'cuda'; None = auto / FUSED_ADV_BACKEND).
    """

    def __init__(self, hidden_size, learning_rate=1e-4, init_perturbation=1e-2, backend=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.learning_rate = learning_rate
        self.init_perturbation = init_perturbation
        self.backend = backend
        self.delta = None
        self.adversarial_mode = False

    def adversarial_(self, adversarial=True):
        self.adversarial_mode = adversarial
        if not adversarial:
            self.delta = None

    def forward(self, input):
        if not self.adversarial_mode:
            if input.shape[-1] != self.hidden_size:
                raise ValueError(f"PerturbationLayer(hidden_size={self.hidden_size}) got an input of "
                                 f"shape {tuple(input.shape)}")
            self.input = _ops.ln_delta(input, None, LN_EPS, backend=self.backend)
            return self.input
        if self.delta is None:
            self.update_delta(requires_grad=True)
        return self.perturbated_input

    def update_delta(self, requires_grad=False):
        if not self.adversarial_mode:
            return True
        xhat = self.input.detach()
        with torch.no_grad():
            if self.delta is None:
                sigma = self.init_perturbation
                # same RNG draw as the original (normal_ in x̂'s dtype), so seeds reproduce it
                noise = xhat.new(xhat.size()).normal_(0, sigma)
                delta, out = _ops.sift_perturb(xhat, noise, 2 * sigma, backend=self.backend)
            else:
                grad = self.delta.grad
                if grad is None:
                    raise RuntimeError("SiFT: delta has no gradient; call backward() on a loss computed "
                                       "from the adversarial forward before update_delta()")
                self.delta.grad = None
                delta = self.delta.detach()
                # in place on delta; skipped on the device when ‖g‖ is NaN/Inf
                out = _ops.sift_update_(delta, grad, xhat, None, self.learning_rate, backend=self.backend)
        self.delta = delta.requires_grad_(requires_grad)
        self.perturbated_input = _ops.attach_delta(out, self.delta)
        return True


def hook_sift_layer(model, hidden_size, learning_rate=1e-4, init_perturbation=1e-2,
                    target_module="embeddings.LayerNorm", *, backend=None, bind_each=False):
    """Registers a forward pre-hook on every module whose name contains ``target_module`` (or on
    ``target_module`` itself when it is a Module) replacing its input by PerturbationLayer(input);
    removes hooks named ``adv_hook`` from an earlier call.  Returns the PerturbationLayers.
    Raises ValueError when nothing matches."""
    if isinstance(target_module, str):
        modules = [k for n, k in model.named_modules() if target_module in n]
        if not modules:
            names = [n for n, m in model.named_modules() if "norm" in n.lower() or "emb" in n.lower()]
            raise ValueError(f"hook_sift_layer: target_module={target_module!r} matches no module of "
                             f"{type(model).__name__}, so SiFT would silently do nothing. Candidates: "
                             f"{', '.join(names[:12]) or '(none found)'}")
    else:
        if not isinstance(target_module, torch.nn.Module):
            raise TypeError(f"{type(target_module)} is not an instance of torch.nn.Module")
        modules = [target_module]
    adv_modules = [PerturbationLayer(hidden_size, learning_rate, init_perturbation, backend=backend)
                   for _ in modules]

    def make_hook(layer_of):
        def adv_hook(module, inputs):
            return layer_of()(inputs[0])
        return adv_hook

    for i, m in enumerate(modules):
        # default: every hook calls the last layer, as the original's late-bound closure does
        own = adv_modules[i] if bind_each else None
        hook = make_hook((lambda a=own: a) if bind_each else (lambda: adv_modules[-1]))
        for h in list(m._forward_pre_hooks.keys()):
            if getattr(m._forward_pre_hooks[h], "__name__", "") == "adv_hook":
                del m._forward_pre_hooks[h]
        m.register_forward_pre_hook(hook)
    return adv_modules


class AdversarialLearner(_reference_sift.AdversarialLearner):
    """The SiFT adversarial loss term (same API as DeBERTa's AdversarialLearner).

    ``loss(target, logits_fn, loss_fn='symmetric-kl', *wargs, **kwargs)``: freezes the
    parameters, runs the adversarial forward (reusing x̂ from the clean forward just before),
    back-propagates ``loss_fn(pert_logits, target.detach()).sum()`` into delta only, takes one
    delta step, restores requires_grad, runs the adversarial forward again and returns
    ``symmetric_kl(pert_logits, target).mean()`` (target not detached).
    """

    def __init__(self, model, adv_modules=None):
        if adv_modules is None:
            adv_modules = [m for m in model.modules() if isinstance(m, PerturbationLayer)]
        super().__init__(model, adv_modules)

    def loss(self, target, logits_fn, loss_fn="symmetric-kl", *wargs, **kwargs):
        try:
            return super().loss(target, logits_fn, loss_fn, *wargs, **kwargs)
        finally:  # unlike the original, requires_grad and normal mode come back even if a forward
            self.cleanup()  # raises (cleanup is idempotent: a second call after success changes nothing)

