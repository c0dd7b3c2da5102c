"""smart: ``adv_alpha * SymKL`` between the clean logits and those of the noised embedding output,
added to the loss (docs/hf.md, "smart / sift"; docs/methods.md §7 (SMART))."""
from __future__ import annotations

import fused_adv

from ..embeddings import embedding_block
from ..passes import unwrap
from .base import check_at_least_one
from .regularizer import RegularizerStrategy


class SMARTStrategy(RegularizerStrategy):
    """``fused_adv.SMART`` on ``embedding_module`` (default: the model's ``base_model.embeddings``);
    its ascent forwards use ``autograd.grad``, so the parameter grads are untouched by them."""

    name = "smart"
    method_class = fused_adv.SMART

    @classmethod
    def validate(cls, cfg) -> None:
        check_at_least_one(cfg.method_kwargs, "adv_K")

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        kwargs = dict(cfg.method_kwargs)
        kwargs.setdefault("embedding_module", embedding_block(unwrap(trainer, model)))
        self.attacker = fused_adv.SMART(backend=cfg.backend, **kwargs)

    def term(self, model, batch, logits):
        return self.attacker.loss(model, batch, logits)
