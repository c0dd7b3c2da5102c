"""SiFT (Scale-Invariant Fine-Tuning, DeBERTa) with fused activation ops: the drop-in.

Same API and numbers as DeBERTa's ``DeBERTa.sift`` (reference: fused_adv.reference.sift;
docs/methods.md §5 (SiFT))::

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

# DeBERTa's loss functions, shared with the reference (same module API as DeBERTa.sift)
from fused_adv._shared import kl, mse, perturbation_loss_fns, symmetric_kl
from fused_adv.ops import activation as _ops

__all__ = ["PerturbationLayer", "AdversarialLearner", "hook_sift_layer", "symmetric_kl", "kl", "mse",
           "perturbation_loss_fns"]

LN_EPS = 1e-7


class PerturbationLayer(torch.nn.Module):
    """``PerturbationLayer(hidden_size, learning_rate=1e-4, init_perturbation=1e-2, backend=None)``:
    normalises its input (LayerNorm over the last dim, eps 1e-7, no affine) and, in adversarial
    mode, returns x̂.detach() + delta (delta float32, result in x̂'s dtype).

    Args: hidden_size (H of the [..., H] activations), learning_rate, init_perturbation (sigma
    of the initial delta, clamped to +-2 sigma), backend ('auto', 'torch', 'cpp', 'triton',
    'cuda'; None = auto / FUSED_ADV_BACKEND).
    """

    def __init__(self, hidden_size, learning_rate=1e-4, init_perturbation=1e-2, backend=None):
        """Stores the arguments; starts in normal mode without delta (the fused LayerNorm has no
        parameters).  Raises nothing; a wrong hidden size is reported by :meth:`forward`."""
        super().__init__()
        self.hidden_size = hidden_size
        self.learning_rate = learning_rate
        self.init_perturbation = init_perturbation
        self.backend = backend
        self.delta = None
        self.adversarial_mode = False

    def adversarial_(self, adversarial=True):
        """Switches adversarial mode on or off; switching off drops ``delta`` (the next
        adversarial forward draws a new one).  Returns None; raises nothing."""
        self.adversarial_mode = adversarial
        if not adversarial:
            self.delta = None

    def forward(self, input):
        """Normal mode: returns and stores ``input = LayerNorm(input)`` (fused ``ln_delta``;
        ``input``: [..., H], fp32/fp16/bf16; same shape and dtype out, differentiable).
        Adversarial mode: ignores ``input`` and returns ``perturbated_input`` (x̂.detach() + delta
        in x̂'s dtype), initialising delta first when there is none.  Raises ValueError when the
        last dim is not ``hidden_size``, AttributeError in adversarial mode when no normal-mode
        forward ran before."""
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
        """Initialises delta (first call in adversarial mode) or takes one ascent step on it.

        Initialisation (``sift_perturb``): delta = clamp(N(0, sigma^2) drawn in x̂'s dtype,
        +-2 sigma) as float32, and the perturbed input, in one pass.  Step (``sift_update_``):
        ``delta += learning_rate * g / (1e-6 + max_j |g_j|)`` per token IN PLACE (skipped on the
        device when ‖g‖ is NaN/Inf), g = ``delta.grad`` (then set to None), and the perturbed
        input rewritten in the same pass.  ``delta`` ends as a float32 leaf with
        ``requires_grad=requires_grad``.  Always returns True (also outside adversarial mode,
        where it does nothing).  Raises RuntimeError when a step finds no gradient."""
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
    removes hooks named ``adv_hook`` from an earlier call.  Returns the PerturbationLayers (one per
    matched module; ``backend`` is passed to each).  With ``bind_each=True`` each hook calls its
    own layer; by default every hook calls the last one (DeBERTa's late binding).  Mutates the
    matched modules' forward pre-hooks.  Raises ValueError when nothing matches, TypeError when
    ``target_module`` is neither a str nor a Module."""
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


class AdversarialLearner:
    """``AdversarialLearner(model, adv_modules=None)``: the SiFT adversarial loss term (same API as
    DeBERTa's AdversarialLearner).  ``adv_modules``: the PerturbationLayers to drive (default:
    every :class:`PerturbationLayer` among ``model.modules()``).

    ``loss(target, logits_fn, loss_fn='symmetric-kl', *wargs, **kwargs)``: freezes the
    parameters, runs the adversarial forward (reusing x̂ from the clean forward just before),
    back-propagates ``loss_fn(pert_logits, target.detach()).sum()`` into delta only, takes one
    delta step, restores requires_grad, runs the adversarial forward again and returns
    ``symmetric_kl(pert_logits, target).mean()`` (target not detached).
    """

    def __init__(self, model, adv_modules=None):
        """Records the model, its parameters (in ``model.parameters()`` order) and the layers.
        Raises nothing."""
        if adv_modules is None:
            adv_modules = [m for m in model.modules() if isinstance(m, PerturbationLayer)]
        self.adv_modules = adv_modules
        self.parameters = [p for p in model.parameters()]
        self.model = model

    def loss(self, target, logits_fn, loss_fn="symmetric-kl", *wargs, **kwargs):
        """One delta ascent step, then ``symmetric_kl(perturbed logits, target).mean()``.

        ``target``: the clean logits [..., C] (any float dtype); ``logits_fn(model, *wargs,
        **kwargs)`` returns the logits of a forward (run in adversarial mode); ``loss_fn``:
        'symmetric-kl' | 'kl' | 'mse' or a callable(source_logits, target_logits), used for the
        ascent step only.  Every parameter's ``requires_grad`` is False during the first
        adversarial forward and backward (only delta gets a gradient; parameter ``.grad`` are not
        touched by it) and is put back before the second forward.  Returns a float32 0-dim tensor
        that back-propagates into the parameters and ``target``.  Raises KeyError for an unknown
        ``loss_fn`` name and what ``logits_fn`` raises; unlike the original, ``requires_grad`` and
        normal mode come back also when it raises.
        """
        self.prepare()
        try:
            if isinstance(loss_fn, str):
                loss_fn = perturbation_loss_fns[loss_fn]
            pert_logits = logits_fn(self.model, *wargs, **kwargs)
            pert_loss = loss_fn(pert_logits, target.detach()).sum()
            # Only delta's gradient is wanted: autograd.grad computes it without accumulating into
            # any .grad.  Freezing the parameters is not enough under FSDP2, where the forward
            # computes with FSDP's unsharded copies, whose requires_grad does not follow the
            # sharded parameters': a .backward() would add a parameter gradient (docs/methods.md
            # §12 (Sharded training)).  Same delta gradient as pert_loss.backward().
            deltas = [m.delta for m in self.adv_modules if m.delta is not None and m.delta.requires_grad]
            for d, g in zip(deltas, torch.autograd.grad(pert_loss, deltas, allow_unused=True)):
                d.grad = g
            for m in self.adv_modules:
                m.update_delta(True)
            # the second forward builds the graph into the parameters: unfreeze them first
            for r, p in zip(self.prev, self.parameters):
                p.requires_grad_(r)
            pert_logits = logits_fn(self.model, *wargs, **kwargs)
            return symmetric_kl(pert_logits, target).mean()
        finally:
            self.cleanup()

    def prepare(self):
        """Records every parameter's ``requires_grad``, sets them all to False and puts the layers
        in adversarial mode.  Raises nothing."""
        self.prev = [p.requires_grad for p in self.parameters]
        for p in self.parameters:
            p.requires_grad_(False)
        for m in self.adv_modules:
            m.adversarial_(True)

    def cleanup(self):
        """Puts back the ``requires_grad`` recorded by :meth:`prepare` and the layers' normal mode
        (idempotent).  Raises AttributeError when :meth:`prepare` never ran."""
        for r, p in zip(self.prev, self.parameters):
            p.requires_grad_(r)
        for m in self.adv_modules:
            m.adversarial_(False)
