"""mifgsm: PGD's step with the momentum iterative FGSM attack on the input-embedding WEIGHT
(docs/hf.md, "mifgsm"; docs/methods.md §2b (MI-FGSM))."""
from __future__ import annotations

import fused_adv

from .base import check_at_least_one, hand_back, set_trainable
from .weight import EMBEDDING_OPTIONS, PGDStrategy


class MIFGSMStrategy(PGDStrategy):
    """Clean pass; clean grads set aside; ``steps`` MI-FGSM attacks (the method's own argument, not
    PGD's ``K``) whose intermediate adversarial grads are thrown away; the clean grads handed back
    before the last adversarial backward; restore."""

    name = "mifgsm"
    method_class = fused_adv.MIFGSM
    options = EMBEDDING_OPTIONS

    @classmethod
    def validate(cls, cfg) -> None:
        check_at_least_one(cfg.method_kwargs, "steps")

    def step(self, passes):
        # PGD's loop (strategies/weight.py) with T = the attacker's ``steps``
        adv, T, no_sync = self.attacker, self.attacker.steps, self.cfg.clean_pass_no_sync
        stash = self._begin()
        try:
            loss, prepared = passes.clean(no_sync)
            adv.backup_grad()
            for t in range(T):
                adv.attack(is_first_attack=(t == 0))
                last = t == T - 1
                if not last:
                    passes.model.zero_grad(set_to_none=True)
                else:
                    adv.restore_grad()
                    hand_back(stash)
                    set_trainable(self.frozen, False)
                adv_loss = passes.adversarial(prepared, no_sync and not last)
        finally:
            self._end(stash)
        return loss, adv_loss
