"""fgm / fgsm / pgd: perturb the input-embedding WEIGHT from its gradient, run the adversarial pass,
restore (docs/hf.md, "fgm / fgsm" and "pgd"; docs/methods.md §1 (FGM), §2 (FGSM), §3 (PGD))."""
from __future__ import annotations

import fused_adv

from ..embeddings import resolve_input_embedding
from ..passes import unwrap
from .base import Strategy, hand_back, set_aside, set_trainable

EMBEDDING_OPTIONS = ("perturb_from", "clean_pass_no_sync", "tied_embeddings", "frozen_embeddings")


class FGMStrategy(Strategy):
    """Clean pass; ``attack()`` from this micro-batch's (or the accumulated) embedding gradient; one
    adversarial pass whose gradient ACCUMULATES onto the clean one; ``restore()``."""

    name = "fgm"
    method_class = fused_adv.FGM
    options = EMBEDDING_OPTIONS

    def __init__(self, trainer, model, cfg):
        super().__init__(trainer, model, cfg)
        kwargs = dict(cfg.method_kwargs)
        emb_name, self.targets, self.frozen = resolve_input_embedding(
            model, unwrap(trainer, model), kwargs.pop("emb_name", None), cfg.method,
            cfg.tied_embeddings, cfg.frozen_embeddings)
        self.attacker = self.method_class(model, emb_name=emb_name, backend=cfg.backend, **kwargs)

    def _begin(self):
        """Earlier micro-batches' embedding grads set aside (perturb_from="micro_batch"); a frozen
        embedding made trainable for the clean pass.  Returns the stash to hand back."""
        stash = set_aside(self.targets) if self.cfg.perturb_from == "micro_batch" else []
        set_trainable(self.frozen, True)
        return stash

    def _end(self, stash) -> None:
        """Everything ``_begin`` and the attack changed is undone (also after an exception)."""
        if self.attacker.is_attacked:
            self.attacker.restore()
        hand_back(stash)
        set_trainable(self.frozen, False)

    def step(self, passes):
        stash = self._begin()
        try:
            loss, prepared = passes.clean(self.cfg.clean_pass_no_sync)
            self.attacker.attack()
            set_trainable(self.frozen, False)     # direction taken: no embedding grad in the adversarial pass
            hand_back(stash)                      # before the final (synchronised) backward
            adv_loss = passes.adversarial(prepared, False)
        finally:
            self._end(stash)
        return loss, adv_loss


class FGSMStrategy(FGMStrategy):
    """FGM's step with ``fused_adv.FGSM`` (sign of the gradient instead of its direction)."""

    name = "fgsm"
    method_class = fused_adv.FGSM


class PGDStrategy(FGMStrategy):
    """Clean pass; clean grads set aside; ``K`` attack steps whose intermediate adversarial grads are
    thrown away; the clean grads handed back before the last adversarial backward."""

    name = "pgd"
    method_class = fused_adv.PGD
    options = EMBEDDING_OPTIONS + ("K",)

    @classmethod
    def validate(cls, cfg) -> None:
        if int(cfg.K) < 1:
            raise ValueError(f"K must be >= 1, got {cfg.K}")

    def step(self, passes):
        pgd, K, no_sync = self.attacker, int(self.cfg.K), self.cfg.clean_pass_no_sync
        stash = self._begin()
        try:
            loss, prepared = passes.clean(no_sync)
            pgd.backup_grad()
            for t in range(K):
                pgd.attack(is_first_attack=(t == 0))
                last = t == K - 1
                if not last:
                    passes.model.zero_grad(set_to_none=True)   # intermediate adversarial grads are thrown away
                else:
                    pgd.restore_grad()                         # clean grads back; the last adversarial grad adds on
                    hand_back(stash)
                    set_trainable(self.frozen, False)
                adv_loss = passes.adversarial(prepared, no_sync and not last)
        finally:
            self._end(stash)
        return loss, adv_loss

    def _end(self, stash) -> None:
        if self.attacker.is_attacked:
            self.attacker.restore()
        if getattr(self.attacker, "_grads_aside", None):   # an exception before the last pass: clean grads back
            self.attacker.restore_grad()
        super()._end(stash)
