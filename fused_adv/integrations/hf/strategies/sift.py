"""sift: DeBERTa's SiFT, ``vat_lambda * symmetric_kl`` between the clean logits and those with a
normalised perturbation on ``target_module``'s input, added to the loss (docs/hf.md,
"smart / sift"; docs/methods.md §5 (SiFT))."""
from __future__ import annotations

import inspect

from torch import nn

import fused_adv

from ..passes import logits_of, unwrap
from .regularizer import RegularizerStrategy

EXTRA_ARGUMENTS = ("loss_fn", "vat_lambda")     # SiFT has no class: hook_sift_layer's arguments + these


class SiFTStrategy(RegularizerStrategy):
    """Hooks PerturbationLayers on the unwrapped model when built (DeBERTa's ``hook_sift_layer``:
    the hooked module's input is normalised in every forward from then on, evaluation included)
    and keeps the fused ``AdversarialLearner`` as the attacker, with ``loss_fn``/``vat_lambda`` on
    it.  Parameters are frozen for its ascent backward.  ``release`` removes the hooks."""

    name = "sift"

    @classmethod
    def method_arguments(cls) -> set[str]:
        params = set(inspect.signature(fused_adv.hook_sift_layer).parameters) | set(EXTRA_ARGUMENTS)
        return params - {"model", "backend"}

    @classmethod
    def validate(cls, cfg) -> None:
        loss_fn = cfg.method_kwargs.get("loss_fn", "symmetric-kl")
        if not callable(loss_fn) and loss_fn not in fused_adv.sift.perturbation_loss_fns:
            raise ValueError(f"loss_fn={loss_fn!r}: expected one of "
                             f"{', '.join(fused_adv.sift.perturbation_loss_fns)} or a callable")

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        self.hooked: list[nn.Module] = []       # the modules carrying the PerturbationLayer hook
        unwrapped = unwrap(trainer, model)
        kwargs = dict(cfg.method_kwargs)
        loss_fn = kwargs.pop("loss_fn", "symmetric-kl")
        vat_lambda = float(kwargs.pop("vat_lambda", 1.0))
        if "hidden_size" not in kwargs:
            hidden = getattr(getattr(unwrapped, "config", None), "hidden_size", None)
            if hidden is None:
                raise ValueError("SiFT: the model has no config.hidden_size; pass adversarial_kwargs="
                                 "{'hidden_size': <last dim of target_module's input>}")
            kwargs["hidden_size"] = hidden
        target = kwargs.get("target_module", "embeddings.LayerNorm")
        hooked = ([m for n, m in unwrapped.named_modules() if target in n] if isinstance(target, str)
                  else [target])
        adv_modules = fused_adv.hook_sift_layer(unwrapped, backend=cfg.backend, **kwargs)
        self.hooked = hooked
        try:
            learner = fused_adv.sift.AdversarialLearner(unwrapped, adv_modules)
        except BaseException:
            self.release()
            raise
        learner.loss_fn, learner.vat_lambda = loss_fn, vat_lambda
        self.attacker = learner

    def term(self, model, batch, logits):
        learner = self.attacker

        def logits_fn(m, **kw):
            return logits_of(m(**kw))
        return learner.loss(logits, logits_fn, learner.loss_fn, **batch) * learner.vat_lambda

    def release(self) -> None:
        for module in self.hooked:
            for key, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "__name__", "") == "adv_hook":
                    del module._forward_pre_hooks[key]
        self.hooked = []
