"""SiFT (Scale-Invariant Fine-Tuning, DeBERTa): the reference implementation
(docs/methods.md §5 (SiFT)).

A readable restatement of microsoft/DeBERTa ``DeBERTa/sift/sift.py`` (MIT), step for step, so that
it can serve as the oracle for the fused drop-in :mod:`fused_adv.sift`.  Kept deliberately as the
original behaves, including:

* the LayerNorm (eps 1e-7, no affine) is ALWAYS applied by the hook, in normal and adversarial
  mode, so the hooked module (e.g. ``embeddings.LayerNorm``) sees an already normalised input;
* in adversarial mode the layer ignores its input and returns ``x̂.detach() + delta`` built from
  the x̂ stored by the most recent normal-mode forward;
* the NaN/Inf guard of the delta update reads ``‖g‖`` on the host (one sync per update);
* ``hook_sift_layer``'s hook closes over the loop variable ``adv`` (Python late binding): when
  ``target_module`` matches several modules, every hook calls the LAST PerturbationLayer.  With the
  default target (one ``embeddings.LayerNorm`` per model) this makes no difference.
"""
from __future__ import annotations

import torch

# the loss functions are shared with the fused drop-in (fused_adv.sift)
from fused_adv._shared import kl, mse, perturbation_loss_fns, symmetric_kl

__all__ = ["PerturbationLayer", "AdversarialLearner", "hook_sift_layer", "symmetric_kl", "kl", "mse",
           "perturbation_loss_fns"]


class PerturbationLayer(torch.nn.Module):
    """``PerturbationLayer(hidden_size, learning_rate=1e-4, init_perturbation=1e-2)``: normalises its
    input and, in adversarial mode, adds the perturbation ``delta``.

    Args:
        hidden_size: size of the last dimension H of the perturbed activations [..., H].
        learning_rate: step of the delta update (normalised by the per-token max |g|).
        init_perturbation: standard deviation sigma of the initial delta, clamped to +-2 sigma.
    State: ``input`` (x̂ from the last normal-mode forward), ``delta`` (float32, same shape as
    x̂, a leaf requiring grad while adversarial), ``perturbated_input`` (x̂.detach() + delta, in
    x̂'s dtype).
    """

    def __init__(self, hidden_size, learning_rate=1e-4, init_perturbation=1e-2):
        """Builds the non-affine LayerNorm(hidden_size, eps=1e-7); starts in normal mode without
        delta.  Raises nothing."""
        super().__init__()
        self.learning_rate = learning_rate
        self.init_perturbation = init_perturbation
        self.delta = None
        self.LayerNorm = torch.nn.LayerNorm(hidden_size, 1e-7, elementwise_affine=False)
        self.adversarial_mode = False

    def adversarial_(self, adversarial=True):
        """Switches adversarial mode on or off; switching off drops ``delta`` (the next
        adversarial forward draws a new one).  Returns None; raises nothing."""
        self.adversarial_mode = adversarial
        if not adversarial:
            self.delta = None

    def forward(self, input):
        """Normal mode: returns and stores ``input = LayerNorm(input)`` (``input``: [..., H], any
        float dtype; same shape and dtype out).  Adversarial mode: ignores ``input`` and returns
        ``perturbated_input`` (x̂.detach() + delta in x̂'s dtype), initialising delta first when
        there is none.  Raises AttributeError in adversarial mode when no normal-mode forward ran
        before, and RuntimeError (from LayerNorm) when the last dim is not ``hidden_size``."""
        if not self.adversarial_mode:
            self.input = self.LayerNorm(input)
            return self.input
        if self.delta is None:
            self.update_delta(requires_grad=True)
        return self.perturbated_input

    def update_delta(self, requires_grad=False):
        """Initialises delta (first call in adversarial mode) or takes one ascent step on it.

        Initialisation: delta = clamp(N(0, sigma^2) drawn in x̂'s dtype, +-2 sigma), float32.
        Step: ``delta += learning_rate * g / (1e-6 + max_j |g_j|)`` per token, g = ``delta.grad``
        (which is then set to None).  Either way ``delta`` becomes a new float32 leaf with
        ``requires_grad=requires_grad`` and ``perturbated_input`` is rebuilt.  Does nothing and
        returns True outside adversarial mode.  Returns False (and leaves delta unchanged) when
        ‖delta.grad‖ is NaN or Inf (read on the host).  Raises AttributeError when a step finds
        no gradient (``delta.grad`` is None).
        """
        if not self.adversarial_mode:
            return True
        if self.delta is None:
            sigma = self.init_perturbation
            # drawn in x̂'s dtype (as the original: input.new(size).normal_), then widened
            noise = self.input.new(self.input.size()).normal_(0, sigma).float()
            delta = torch.clamp(noise, -2 * sigma, 2 * sigma)
        else:
            grad = self.delta.grad
            self.delta.grad = None
            delta = self.delta
            norm = grad.norm()
            if torch.isnan(norm) or torch.isinf(norm):  # host sync, as in the original
                return False
            with torch.no_grad():
                delta = delta + self.learning_rate * grad / (1e-6 + grad.abs().max(-1, keepdim=True)[0])
        self.delta = delta.float().detach().requires_grad_(requires_grad)
        self.perturbated_input = (self.input.to(delta).detach() + self.delta).to(self.input)
        return True


def hook_sift_layer(model, hidden_size, learning_rate=1e-4, init_perturbation=1e-2,
                    target_module="embeddings.LayerNorm"):
    """Registers a forward pre-hook that replaces the input of every module whose qualified name
    contains ``target_module`` (or of ``target_module`` itself when it is a Module) by
    ``PerturbationLayer(input)``.  Hooks from an earlier call (named ``adv_hook``) are removed.
    Returns the list of PerturbationLayer modules (one per matched module)."""
    if isinstance(target_module, str):
        _modules = [k for n, k in model.named_modules() if target_module in n]
    else:
        assert isinstance(target_module, torch.nn.Module), f"{type(target_module)} is not an instance of torch.nn.Module"
        _modules = [target_module]
    adv_modules = []
    for m in _modules:
        adv = PerturbationLayer(hidden_size, learning_rate, init_perturbation)

        def adv_hook(module, inputs):
            return adv(inputs[0])  # late binding: `adv` is the loop's last value (original behaviour)

        for h in list(m._forward_pre_hooks.keys()):
            if m._forward_pre_hooks[h].__name__ == "adv_hook":
                del m._forward_pre_hooks[h]
        m.register_forward_pre_hook(adv_hook)
        adv_modules.append(adv)
    return adv_modules


class AdversarialLearner:
    """``AdversarialLearner(model, adv_modules=None)``: computes the SiFT adversarial loss term.

    ``adv_modules``: the PerturbationLayers to drive (default: every PerturbationLayer among
    ``model.modules()``).

    Usage (as DeBERTa)::

        adv_modules = hook_sift_layer(model, hidden_size=768)
        adv = AdversarialLearner(model, adv_modules)
        logits = model(**batch).logits                    # the clean forward stores x̂
        loss = task_loss + adv.loss(logits, logits_fn, **batch) * vat_lambda
    """

    def __init__(self, model, adv_modules=None):
        """Records the model, its parameters (in ``model.parameters()`` order) and the layers.
        Raises nothing."""
        if adv_modules is None:
            self.adv_modules = [m for m in model.modules() if isinstance(m, PerturbationLayer)]
        else:
            self.adv_modules = adv_modules
        self.parameters = [p for p in model.parameters()]
        self.model = model

    def loss(self, target, logits_fn, loss_fn="symmetric-kl", *wargs, **kwargs):
        """One delta ascent step, then symmetric_kl(perturbed logits, target).mean().

        ``target``: the clean logits [..., C]; ``logits_fn(model, *wargs, **kwargs)`` returns the
        logits of a forward in adversarial mode; ``loss_fn``: 'symmetric-kl' | 'kl' | 'mse' or a
        callable(source_logits, target_logits) used for the ascent step only.

        Sets every parameter's ``requires_grad`` to False for the first adversarial forward and
        backward (only delta gets a gradient), then puts it back; leaves the layers in normal mode.
        Returns a float32 0-dim tensor that back-propagates into the parameters and ``target``.
        Raises KeyError for an unknown ``loss_fn`` name, and what ``logits_fn`` raises (then the
        parameters stay FROZEN and the layers adversarial, as in the original).
        """
        self.prepare()
        if isinstance(loss_fn, str):
            loss_fn = perturbation_loss_fns[loss_fn]
        pert_logits = logits_fn(self.model, *wargs, **kwargs)
        pert_loss = loss_fn(pert_logits, target.detach()).sum()
        pert_loss.backward()
        for m in self.adv_modules:
            m.update_delta(True)

        for r, p in zip(self.prev, self.parameters):
            p.requires_grad_(r)
        pert_logits = logits_fn(self.model, *wargs, **kwargs)
        pert_loss = symmetric_kl(pert_logits, target)

        self.cleanup()
        return pert_loss.mean()

    def prepare(self):
        """Records every parameter's ``requires_grad``, sets them all to False and puts the layers
        in adversarial mode.  Raises nothing."""
        self.prev = [p.requires_grad for p in self.parameters]
        for p in self.parameters:
            p.requires_grad_(False)
        for m in self.adv_modules:
            m.adversarial_(True)

    def cleanup(self):
        """Puts back the ``requires_grad`` recorded by :meth:`prepare` and the layers' normal mode.
        Raises AttributeError when :meth:`prepare` never ran."""
        for r, p in zip(self.prev, self.parameters):
            p.requires_grad_(r)
        for m in self.adv_modules:
            m.adversarial_(False)
